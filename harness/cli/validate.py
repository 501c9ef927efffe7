"""`flashbench validate`: validate a system under test (in-process or a JSON-lines process)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..records import provenance, write_json_atomic
from ..validate import CASES
from .common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, add_sut_args, sut_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="validate a system under test (in-process or a JSON-lines process)",
                       description="Run the conformance suite against a SUT: accuracy against dense inference, "
                       "performance timed by the harness on other held-out tokens, and audits (determinism, "
                       "the timed run's own accuracy, memory within the budget, the timed run's storage reads "
                       "consistent with its claims). Exit 0 VALID, "
                       "1 INVALID, 2 if the SUT could not be run. The protocol: suite/conformance/PROTOCOL.md.")
    add_sut_args(p, "e.g. flashbench.harness.adapters:ReferenceSUT or :TransformersSUT")
    p.add_argument("--cases", default=str(CASES), help="the conformance cases (TOML)")
    p.add_argument("--case", action="append", help="run only this case (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="draws the held-out tokens of the performance runs "
                   "(default: a fresh seed each run, printed and recorded)")
    p.add_argument("--json", help="also write the verdicts and every sub-check as JSON here")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    """The conformance suite against a SUT: exit 0 VALID, 1 INVALID, 2 if the SUT could not be run."""
    from ..sut import SUTError
    from ..validate import load_cases, validate

    label, make = sut_from_args(args, required=True)
    cases = load_cases(Path(args.cases), args.case or None)
    print(f"flashbench validate: {label}, {len(cases)} case(s) from {args.cases}", flush=True)
    try:
        result = validate(make, cases, seed=args.seed)
    except SUTError as e:
        print(f"SUT COULD NOT BE RUN: {e}", file=sys.stderr)
        if args.json:
            write_json_atomic(Path(args.json), {"sut": label, "status": "could not be run", "error": str(e)})
        return EXIT_BAD_INPUT
    checks = [c for r in result["cases"] for c in r["subchecks"]]
    failed = [f"{r['case']['name']}: {c['name']}" for r in result["cases"] for c in r["subchecks"] if not c["passed"]]
    print(("VALID" if result["valid"] else "INVALID") + f": {len(cases)} case(s), {len(checks)} sub-checks"
          + (f", failing: {'; '.join(failed)}" if failed else ", all passed"))
    if args.json:
        write_json_atomic(Path(args.json), {"sut": label, "status": "valid" if result["valid"] else "invalid",
                                            **provenance()}
                          | result)
    return EXIT_OK if result["valid"] else EXIT_FAILED
