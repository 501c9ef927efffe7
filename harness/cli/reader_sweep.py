"""`flashbench reader-sweep`: the flash reader's bandwidth beside fio's."""

from __future__ import annotations

from pathlib import Path

from flashbench.reference import uring
from flashbench.reference.reader import BACKENDS

from ..records import provenance, write_json_atomic
from .common import EXIT_OK, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("reader-sweep", help="the flash reader's bandwidth beside fio's",
                       description="Measure the flash reader's random-read bandwidth per record size and reads in "
                       "flight, beside fio randread at the same block size and reads in flight (the faster of psync "
                       "jobs and one io_uring job's queue), on one file in DIR.")
    p.add_argument("dir", help="directory on the storage to measure (a 1 GiB file is written there once)")
    p.add_argument("--record-kib", default="16,32,64", help="record sizes in KiB (default 16,32,64)")
    p.add_argument("--threads", default="16", help="thread counts (default 16)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="reader runs, each between two fio runs (default 3)")
    p.add_argument("--batch", default="256", help="records per reader call, as one layer's delta; a list runs "
                   "the sweep once per batch (default 256)")
    p.add_argument("--c-reference", action="store_true", help="also make the same calls from C (pread_calls.c, "
                   "built with cc): what the reader loses beyond it is Python's cost, not the calls'")
    p.add_argument("--file-mib", type=int, default=1024, help="size of the test file (default 1024 MiB)")
    p.add_argument("--no-fio", action="store_true", help="measure the reader only")
    p.add_argument("--reader", default="threads", help="the reader's backends: threads (preadv from a thread pool) "
                   "and/or io_uring (one ring from C, built by make); several take turns within each round of runs "
                   "(default threads)")
    p.add_argument("--json", help="also write the points as JSON to this path")
    p.set_defaults(func=cmd_reader_sweep)


def cmd_reader_sweep(args) -> int:
    from ..sweep import KIB, check_batches, sweep

    directory = Path(args.dir)
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory (put it where the flash layouts live)")
    sizes = [int(k) * KIB for k in args.record_kib.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    backends = args.reader.split(",")
    check_batches(batches, sizes, args.file_mib << 20)
    if unknown := set(backends) - set(BACKENDS):
        raise UsageError(f"--reader {args.reader}: unknown {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    if "io_uring" in backends and (why := uring.unavailable()):
        raise UsageError(f"--reader io_uring cannot be used here: {why}")
    points = []
    for batch in batches:
        print(f"reader ({batch} random records per call{', beside the same calls in C' if args.c_reference else ''}) "
              f"vs fio randread (direct=1; the faster of psync jobs and an io_uring queue) on a {args.file_mib} MiB "
              f"file in {directory}: {args.repeats} runs of {args.seconds:g} s each, every one between two fio runs; "
              f"medians, and x/fio the median of each run over the fio runs around it")
        points += sweep(directory, sizes, threads, args.seconds, args.repeats, args.file_mib << 20, not args.no_fio,
                        batch, args.c_reference, backends=tuple(backends))
    if args.json:
        write_json_atomic(Path(args.json), provenance() | {
                                            "points": [vars(p) for p in points]})
    return EXIT_OK
