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
   73-77%. Where the kernel refuses the flags, the ring is made without them.

   fb_plan_records(...): the reads of one reader call where vectors are read in place (`FlashReader._in_place` says
   what they are; `reader.plan_in_place` plans the same in numpy where this library is not built). In C because
   numpy's planning of a call of 256 records of 16 KiB took about 200 us of the call's 4-5 ms, on the thread that
   reads: with it in C, the reader's calls took 1.00 ms of CPU against 1.17 (means of 6 rounds) and read at 86.1% of
   fio against 82.9% (means of 14 rounds, alternating, each run between two fio runs; Intel Xeon, 2 cores), within
   2% of the same calls' reads planned beforehand. */
#include <errno.h>
#include <liburing.h>
#include <stdint.h>
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

struct vec { int64_t offset, start; };  /* a vector's file offset and its byte in the output */

static int by_offset(const void *a, const void *b) {
    int64_t x = ((const struct vec *)a)->offset, y = ((const struct vec *)b)->offset;
    return (x > y) - (x < y);
}

/* Vector j of record ids[i] (at file offset ids[i] * stride + bases[j], vb bytes) goes to byte rows[i] * vb + j *
   plane of the output. Sorted by file offset, the vectors are cut into reads: with gap_bytes, a new read where the
   next vector lies more than gap_bytes past the last one or in another run_bytes block of the file, the bytes between
   two vectors of one read going to the sink (a piece of its own); without, a new read at every gap and after `most`
   vectors of a run. A read's pieces that follow one another in the output are one piece. Writes, per read, its file
   offset, first piece and piece count; per piece, its start (0 for the sink), length and whether it is the sink's;
   `vecs` is scratch for n * k. Returns the reads, with the pieces in *n_pieces; -1 where two vectors overlap (an id
   asked for twice). */
long fb_plan_records(long n, const int64_t *ids, const int64_t *rows, long k, const int64_t *bases, int64_t stride,
                     int64_t vb, int64_t plane, int64_t gap_bytes, int64_t run_bytes, int64_t most,
                     struct vec *vecs, int64_t *offsets, int *first, int *count, int64_t *starts, int64_t *lengths,
                     uint8_t *to_sink, int64_t *n_pieces) {
    long m = n * k, sorted = 1;
    for (long i = 0; i < n; i++)
        for (long j = 0; j < k; j++) {
            struct vec *v = &vecs[i * k + j];
            v->offset = ids[i] * stride + bases[j];
            v->start = rows[i] * vb + j * plane;
            if (i * k + j > 0 && v[-1].offset > v->offset) sorted = 0;
        }
    if (!sorted) qsort(vecs, (size_t)m, sizeof *vecs, by_offset);  /* offsets are distinct but for duplicates */
    long reads = 0, pieces = 0, run = 0;  /* run: vectors since the last gap (no gap_bytes) */
    for (long t = 0; t < m; t++) {
        int64_t gap = t ? vecs[t].offset - vecs[t - 1].offset - vb : 0;
        if (gap < 0) return -1;
        int new_read;
        if (t == 0) new_read = 1;
        else if (gap_bytes) new_read = gap > gap_bytes || vecs[t].offset / run_bytes != vecs[t - 1].offset / run_bytes;
        else {
            run = gap ? 0 : run + 1;
            new_read = run % most == 0;
        }
        if (new_read) {
            offsets[reads] = vecs[t].offset;
            first[reads] = (int)pieces;
            count[reads++] = 0;
        } else if (gap > 0) {  /* a read past a gap: its bytes into the sink */
            starts[pieces] = 0, lengths[pieces] = gap, to_sink[pieces++] = 1;
            count[reads - 1]++;
        }
        if (!new_read && !to_sink[pieces - 1] && starts[pieces - 1] + lengths[pieces - 1] == vecs[t].start) {
            lengths[pieces - 1] += vb;  /* follows the last piece in the output: the same piece */
            continue;
        }
        starts[pieces] = vecs[t].start, lengths[pieces] = vb, to_sink[pieces++] = 0;
        count[reads - 1]++;
    }
    *n_pieces = pieces;
    return reads;
}
