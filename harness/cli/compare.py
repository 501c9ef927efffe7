"""`flashbench compare`: compare runs' records with a baseline's; exit 1 on a regression."""

from __future__ import annotations

from pathlib import Path

from ..records import write_json_atomic
from .common import EXIT_FAILED, EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare runs' records with a baseline's; exit 1 on a regression",
                       description="Compare candidate runs with a baseline run of the same scenario. Counters "
                       "(bytes, reads, neurons per token) must not grow; same-run ratios (speedup over naive, "
                       "fraction of fio) may fall by a tolerance; raw times are gated only on the same machine. "
                       "Exit 1 with the list of regressions, 0 if none, 2 if the records cannot be compared.")
    p.add_argument("baseline", help="a finished run folder (reports/<run-id>) or its run.json")
    p.add_argument("candidates", nargs="+", metavar="candidate", help="run folders to compare with the baseline")
    p.add_argument("--fail-on", metavar="RULES",
                   help="comma-separated METRIC[:TOLERANCE]: counters, bytes_per_token, reads_per_token, "
                        "neurons_per_token (default tolerance 0), verdicts, speedup_over_naive, fio_fraction, "
                        "tokens_per_s (same machine only; default 10%%), or none "
                        "(default: counters,verdicts,speedup_over_naive:30%%); timed metrics are "
                        "gated on each model's geometric mean over its configurations")
    p.add_argument("--json", help="also write the comparison as JSON here")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    """Candidates against a baseline: exit 1 with the list of regressions, 0 if none."""
    from ..compare import DEFAULT_RULES, compare, load, parse_rules, render

    rules = parse_rules(args.fail_on or DEFAULT_RULES)
    base = load(args.baseline)
    results = []
    for path in args.candidates:
        cand = load(path)
        result = compare(base, cand, rules)
        print(render(result, base, cand), end="\n\n")
        results.append(result.as_dict())
    if args.json:
        write_json_atomic(Path(args.json), {"baseline": str(base.path), "passed": all(r["passed"] for r in results),
                                            "comparisons": results})
    return EXIT_OK if all(r["passed"] for r in results) else EXIT_FAILED
