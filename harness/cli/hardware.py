"""`flashbench hardware`: merge runs from different machines into one comparison report."""

from __future__ import annotations

from pathlib import Path

from .common import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("hardware", help="merge runs from different machines into one comparison report",
                       description="Merge runs of one scenario from different machines (or storage) into "
                       "report.md, report.html, comparison.csv and plots.")
    p.add_argument("runs", nargs="+", help="finished run folders, the first is the reference")
    p.add_argument("--out", required=True, help="folder for the comparison report")
    p.set_defaults(func=cmd_hardware)


def cmd_hardware(args) -> int:
    from ..hardware import write_hardware_report

    for path in write_hardware_report(args.runs, Path(args.out)):
        print(f"wrote {path}")
    return EXIT_OK
