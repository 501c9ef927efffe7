"""`flashbench probe`: measure the storage with fio (cached per device and filesystem)."""

from __future__ import annotations

from pathlib import Path

from ..records import REPO_ROOT, provenance, write_json_atomic
from .common import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure the storage with fio (cached per device and filesystem)",
                       description="fio random reads (direct=1) over chunk sizes and parallelism, with psync jobs "
                       "and io_uring queue depth, plus a sequential read, on a file in DIR. Cached per device, "
                       "filesystem, fio version and grid. Falls back to flashbench's own reader, labelled, "
                       "where fio is missing or fails.")
    p.add_argument("dir", nargs="?", default=str(REPO_ROOT / ".work"), help="directory on the storage to probe "
                   "(default: .work/)")
    p.add_argument("--chunk-kib", default="4,16,64,256,1024", help="chunk sizes in KiB (default 4,16,64,256,1024)")
    p.add_argument("--threads", default="1,4,16,32", help="psync jobs / io_uring depths (default 1,4,16,32)")
    p.add_argument("--ioengines", default="psync,io_uring", help="fio engines (default psync,io_uring)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per point (default 1)")
    p.add_argument("--file-mib", type=int, default=1024, help="test file size (default 1024 MiB)")
    p.add_argument("--fresh", action="store_true", help="measure even if a cached probe exists")
    p.add_argument("--json", help="also write the probe as JSON to this path")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args) -> int:
    from ..probe import KIB, ProbeGrid, probe, table

    grid = ProbeGrid(chunk_bytes=tuple(int(k) * KIB for k in args.chunk_kib.split(",")),
                     threads=tuple(int(t) for t in args.threads.split(",")),
                     ioengines=tuple(args.ioengines.split(",")), seconds=args.seconds, file_mib=args.file_mib)
    result = probe(Path(args.dir), grid, fresh=args.fresh)
    print(table(result))
    for note in result.notes:
        print(f"note: {note}")
    if args.json:
        write_json_atomic(Path(args.json), provenance() | {
                                            "probe": result.as_dict()})
    return EXIT_OK
