"""`flashbench report`: turn a run's records into report.md, report.html, CSV and plots."""

from __future__ import annotations

from pathlib import Path

from .common import EXIT_OK, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="turn a run's records into report.md, report.html, CSV and plots",
                       description="Write report.md, report.html (self-contained), results.csv and plots into a "
                       "run folder from its records.")
    p.add_argument("run_dir", help="reports/<run-id>")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from ..report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").is_file():
        raise UsageError(f"{run_dir}: no run.json (not a finished run folder)")
    for path in write_report(run_dir):
        print(f"wrote {path}")
    return EXIT_OK
