"""`flashbench window-sweep`: window size k against agreement and I/O, with the predictor."""

from __future__ import annotations

from pathlib import Path

from flashbench import suite

from ..records import provenance, write_json_atomic
from ..texts import heldout_text
from .common import EXIT_OK, add_pruning_args, add_sweep_layout_args, add_text_arg, load_tokenizer, pruning_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("window-sweep", help="window size k against agreement and I/O, with the predictor",
                       description="Run the flash engine with the trained predictor for windows 0..K over held-out "
                       "text (teacher-forced): top-1 agreement and perplexity beside dense, FFN bytes read per "
                       "token, and per-token I/O, memory management, predictor and compute time.")
    p.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    p.add_argument("--predictor", help="predictor path without suffix (default: MODEL_DIR/predictor)")
    p.add_argument("--max-window", type=int, default=8, help="largest k (default 8)")
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens (default 512)")
    add_sweep_layout_args(p)
    p.add_argument("--json", help="also write the points as JSON to this path")
    add_pruning_args(p)
    add_text_arg(p)
    p.set_defaults(func=cmd_window_sweep)


def cmd_window_sweep(args) -> int:
    import shutil
    import tempfile

    from flashbench.reference.layout import convert
    from flashbench.reference.predictor import Predictor

    from ..window_sweep import HEADER, window_sweep

    path = suite.model_path(args.model)
    predictor_path = Path(args.predictor) if args.predictor else path / "predictor"
    Predictor.load(predictor_path)  # fail early, with the path, if it is missing
    windows = list(range(args.max_window + 1))
    text = heldout_text(args.text)
    tokens = load_tokenizer(path).encode(text.text)[: args.tokens]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="window-sweep-", dir=work))
    keep, pruning = pruning_from_args(path, args)
    try:
        flash = convert(path, tmp / "flash", layout=args.layout, dtype=args.storage_dtype, keep=keep, pruning=pruning)
        ffn_bytes = sum(flash.geometry_of(i).file_bytes for i in range(flash.config.n_layers))
        print(f"FFN files: {ffn_bytes:,} bytes" + (" (dead neurons pruned)" if keep else ""))
        print(f"{path.name}: predictor source, {args.layout} {args.storage_dtype} flash layout in {tmp}, "
              f"{len(tokens) - 1} held-out tokens teacher-forced, {args.threads} reader threads")
        print(HEADER)
        points = window_sweep(path, flash, lambda: Predictor.load(predictor_path), windows, tokens, args.threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        write_json_atomic(Path(args.json), {"model": str(path), "layout": args.layout,
                                            "storage_dtype": args.storage_dtype, "source": "predictor",
                                            "text": text.label, "tokens": len(tokens), "pruning": pruning,
                                            **provenance(), "points": [vars(p) for p in points]})
    return EXIT_OK
