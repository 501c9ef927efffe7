"""`flashbench run`: the main job: probe, technique matrix, report."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ..records import REPO_ROOT
from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError, add_sut_args, sut_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the main job: probe, technique matrix, report",
                       description="Run a scenario (default: the embedded models through the whole technique "
                       "matrix, beside the storage probe) and write reports/<run-id>/: records and the report.")
    p.add_argument("--scenario", default=None, help="scenario name in suite/scenarios/ or a TOML path "
                   "(default: default; with --model: model)")
    p.add_argument("--model", help="measure this checkpoint folder (yours: config.json, safetensors, tokenizer "
                   "files) with the scenario's first [[models]] table instead of the scenario's models")
    p.add_argument("--text", help="with --model: the held-out text file (agreement, perplexity, timed tokens)")
    p.add_argument("--train-text", help="with --model: the text to count hot and dead neurons and train a "
                   "predictor on (default: the embedded models' training plays)")
    p.add_argument("--source", choices=("predictor", "oracle"), help="with --model: what stands for the predictor "
                   "technique (default: the model's predictor, trained first if there is none)")
    p.add_argument("--reports", default=str(REPO_ROOT / "reports"), help="reports folder (default: reports/)")
    p.add_argument("--run-id", default=None, help="name of the run's folder (default: a timestamp)")
    p.add_argument("--work", default=str(REPO_ROOT / ".work"), help="where flash layouts and the probe file go "
                   "(the storage under test; not tmpfs)")
    p.add_argument("--fresh-probe", action="store_true", help="measure the storage again even if cached")
    p.add_argument("--resume", action="store_true", help="finish the interrupted run --run-id: keep its whole "
                   "records, measure the rest")
    add_sut_args(p, "measured instead of the reference engine over the techniques it declares")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    """The main job: a scenario's probe, models and technique matrix, then the report. Exit 1 where a configuration
    meant to be exact disagrees with dense inference (a lossy one outside its tolerance is a finding, reported)."""
    from ..main_job import run_scenario
    from ..report import write_report
    from ..scenario import for_model, load

    scenario = load(args.scenario or ("model" if args.model else "default"))
    if args.model:
        scenario = for_model(scenario, args.model, heldout_text=args.text, train_text=args.train_text,
                             source=args.source)
    elif args.text or args.train_text or args.source:
        raise UsageError("--text, --train-text and --source go with --model; a scenario names its texts in its "
                         "[[models]] tables (heldout_text, train_text, source)")
    if args.resume and not args.run_id:
        raise UsageError("--resume needs the --run-id of the interrupted run")
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.reports) / run_id
    if args.resume:
        if (out_dir / "run.json").is_file():
            raise UsageError(f"{out_dir}: a finished run (it has run.json): nothing to resume")
        if not out_dir.is_dir():
            raise UsageError(f"{out_dir}: no such run folder to resume")
    else:
        try:  # exclusive: of two runs started with one --run-id, the second stops here
            out_dir.mkdir(parents=True)
        except FileExistsError:
            raise UsageError(f"{out_dir}: already exists; choose another --run-id, or --resume an interrupted "
                           "run") from None
    label, sut = sut_from_args(args, required=False)
    print(f"flashbench run: scenario {scenario.name} ({scenario.path}) -> {out_dir}"
          + (f"; the engine measured: {label}" if label else ""), flush=True)
    try:
        index = run_scenario(scenario, out_dir, Path(args.work), fresh_probe=args.fresh_probe, resume=args.resume,
                             sut=sut)
    except KeyboardInterrupt:
        given = [f"--{key.replace('_', '-')} {shlex.quote(value)}" for key in ("scenario", "model", "text",
                 "train_text", "source") if (value := getattr(args, key))]
        print(f"\ninterrupted: the records finished so far are whole in {out_dir / 'records'}; finish the run "
              f"with: flashbench run {' '.join(given + ['--run-id', run_id])} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    for path in write_report(out_dir):
        print(f"wrote {path}")
    if index["exact_failures"]:
        print(f"FAIL: exact configurations disagree with dense inference: {', '.join(index['exact_failures'])}")
        return EXIT_FAILED
    return EXIT_OK
