/* The flash reader's call pattern in C: the reference that tells what Python costs and what the calls cost.

   Each call reads BATCH distinct random records of RECORD_BYTES from FILE with THREADS POSIX threads issuing
   O_DIRECT pread, and returns when all of them are in, as FlashReader.read does (and as fio's free-running jobs
   never do: each call pays for its threads' start and for the wait on its last reads). The records are drawn
   between calls, outside the timed part, as the Python sweep draws them.

   usage: pread_calls FILE RECORD_BYTES THREADS BATCH SECONDS SEED
   prints: "<bytes read> <seconds inside calls> <calls>"; exit 2 on bad arguments or a file it cannot open
   with O_DIRECT, 1 on a failed or short read. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int fd;
static long record_bytes, batch;
static long *offsets;       /* this call's file offsets, one per record */
static char *buffer;        /* batch * record_bytes, page aligned */
static atomic_long next_read;
static atomic_int failed;
static int stop;
static pthread_barrier_t call_start, call_end;

static void *reader_thread(void *unused) {
    (void)unused;
    for (;;) {
        pthread_barrier_wait(&call_start);
        if (stop) return NULL;
        long i;
        while ((i = atomic_fetch_add(&next_read, 1)) < batch) {
            ssize_t n = pread(fd, buffer + i * record_bytes, record_bytes, offsets[i]);
            if (n != record_bytes) atomic_store(&failed, n < 0 ? errno : EIO);  /* short: truncated file */
        }
        pthread_barrier_wait(&call_end);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s FILE RECORD_BYTES THREADS BATCH SECONDS SEED\n", argv[0]);
        return 2;
    }
    record_bytes = atol(argv[2]);
    long threads = atol(argv[3]);
    batch = atol(argv[4]);
    double seconds = atof(argv[5]);
    srand48(atol(argv[6]));
    fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        fprintf(stderr, "pread_calls: %s: cannot open with O_DIRECT: %s\n", argv[1], strerror(errno));
        return 2;
    }
    long records = lseek(fd, 0, SEEK_END) / (record_bytes > 0 ? record_bytes : 1);
    if (record_bytes <= 0 || record_bytes % 4096 || threads < 1 || batch < 1 || batch > records) {
        fprintf(stderr, "pread_calls: %s: need RECORD_BYTES a multiple of 4096, THREADS >= 1 and BATCH in 1..%ld\n",
                argv[1], records);
        return 2;
    }
    long *ids = malloc(records * sizeof(long));
    offsets = malloc(batch * sizeof(long));
    pthread_t *pool = malloc(threads * sizeof(pthread_t));
    if (!ids || !offsets || !pool || posix_memalign((void **)&buffer, 4096, batch * record_bytes)) {
        fprintf(stderr, "pread_calls: out of memory\n");
        return 2;
    }
    for (long i = 0; i < records; i++) ids[i] = i;
    pthread_barrier_init(&call_start, NULL, threads + 1);
    pthread_barrier_init(&call_end, NULL, threads + 1);
    for (long t = 0; t < threads; t++) pthread_create(&pool[t], NULL, reader_thread, NULL);

    double inside = 0, deadline = now() + seconds;
    long calls = 0;
    while (now() < deadline && !atomic_load(&failed)) {
        for (long i = 0; i < batch; i++) {  /* distinct records: a partial Fisher-Yates shuffle */
            long j = i + (long)(drand48() * (records - i)), id = ids[j];
            ids[j] = ids[i];
            ids[i] = id;
            offsets[i] = id * record_bytes;
        }
        atomic_store(&next_read, 0);
        double t0 = now();
        pthread_barrier_wait(&call_start);
        pthread_barrier_wait(&call_end);
        inside += now() - t0;
        calls++;
    }
    stop = 1;
    pthread_barrier_wait(&call_start);
    for (long t = 0; t < threads; t++) pthread_join(pool[t], NULL);
    if (atomic_load(&failed)) {
        fprintf(stderr, "pread_calls: %s: read failed: %s\n", argv[1], strerror(atomic_load(&failed)));
        return 1;
    }
    printf("%ld %.6f %ld\n", calls * batch * record_bytes, inside, calls);
    return 0;
}
