/* The flash reader's io_uring backend: every read of one reader call submitted through one ring and reaped before
   the call returns, all in C. Called through ctypes (which lets go of Python's GIL for the call), so a call of
   thousands of reads costs Python one call, not a thread wake-up and a GIL hand-over per read as the thread pool's
   preadv calls do. Built by `make` (with liburing) as reference/_uring_reads.so; without it the reader uses threads.

   fb_ring_open(depth): a ring that keeps at most `depth` reads in flight (the reader's parallelism); NULL on failure,
   with errno set. fb_ring_read(ring, fd, n, offsets, iov, first, count): read i is preadv(fd, iov + first[i],
   count[i], offsets[i]); returns the bytes read in all, or -errno of the first failed read or of the ring itself.
   A short read shows as a total short of what the caller expected. No read of a call lands after it returns: where
   the ring itself fails, the reads the kernel took are waited for and the ring is made anew without the ones it did
   not take (the next call would otherwise submit them, into buffers the caller has moved on from).

   The ring defers its completions' work to the thread that waits (IORING_SETUP_DEFER_TASKRUN, Linux 6.1; it needs
   IORING_SETUP_SINGLE_ISSUER: only the thread that made the ring submits to it, so `uring.Ring` keeps one per
   thread), and that thread waits for a quarter of the reads in flight at a time rather than for each one. Otherwise
   every read that lands interrupts the thread to post it, and on a machine of few cores that thread shares its core
   with the products. Calls of 256 random 16 KiB records at 32 in flight (`flashbench reader-sweep --record-kib 16
   --threads 32 --batch 256 --reader io_uring`, each run bracketed by fio, alternating; Intel Xeon, 2 cores): 72-84% of
   fio as before, 84-96% (mean 90%) so; waiting for a quarter without deferring 77-82%, deferring and waiting for each
   73-77%. Where the kernel refuses the flags, the ring is made without them. */
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <sys/uio.h>

struct fb_ring {
    struct io_uring ring;
    unsigned depth, flags;
    int broken;  /* -errno: the ring could not be made anew after a failure; every call fails with it */
};

void *fb_ring_open(unsigned depth) {
    struct fb_ring *r = calloc(1, sizeof *r);
    if (r == NULL) return NULL;
    r->flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    int ret = io_uring_queue_init(depth, &r->ring, r->flags);
    if (ret == -EINVAL) {  /* a kernel before 6.1 */
        r->flags = 0;
        ret = io_uring_queue_init(depth, &r->ring, 0);
    }
    if (ret < 0) {
        free(r);
        errno = -ret;
        return NULL;
    }
    r->depth = depth;
    return r;
}

void fb_ring_close(void *handle) {
    struct fb_ring *r = handle;
    if (r == NULL) return;
    if (!r->broken) io_uring_queue_exit(&r->ring);
    free(r);
}

/* The ring failed with `err` (-errno) while `in_flight` reads were the kernel's: wait for them, then make the ring
   anew, dropping the reads queued but never taken. Returns err. */
static long long fail(struct fb_ring *r, long in_flight, int err) {
    while (in_flight > 0) {
        struct io_uring_cqe *cqe;
        int ret = io_uring_wait_cqe(&r->ring, &cqe);  /* waits without submitting */
        if (ret == -EINTR) continue;
        if (ret < 0) break;  /* nothing more can be waited for */
        io_uring_cqe_seen(&r->ring, cqe);
        in_flight--;
    }
    io_uring_queue_exit(&r->ring);
    int ret = io_uring_queue_init(r->depth, &r->ring, r->flags);
    r->broken = ret < 0 ? ret : 0;
    return err;
}

long long fb_ring_read(void *handle, int fd, long n, const long long *offsets, const struct iovec *iov,
                       const int *first, const int *count) {
    struct fb_ring *r = handle;
    if (r->broken) return r->broken;
    long submitted = 0, done = 0;
    long long total = 0;
    int failed = 0;
    while (done < n) {
        while (submitted < n && submitted - done < (long)r->depth) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
            if (sqe == NULL) break;
            io_uring_prep_readv(sqe, fd, iov + first[submitted], (unsigned)count[submitted], offsets[submitted]);
            submitted++;
        }
        long flying = submitted - done, quarter = r->depth / 4 > 1 ? r->depth / 4 : 1;
        int ret = io_uring_submit_and_wait(&r->ring, (unsigned)(flying < quarter ? flying : quarter));
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)  /* the last two: retry once some land */
            return fail(r, submitted - (long)io_uring_sq_ready(&r->ring) - done, ret);
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            if (cqe->res < 0) {
                if (!failed) failed = cqe->res;
            } else {
                total += cqe->res;
            }
            seen++;
        }
        io_uring_cq_advance(&r->ring, seen);
        done += seen;
    }
    return failed ? failed : total;
}
