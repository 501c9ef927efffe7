"""`flashbench check-dense`: compare the dense engine with transformers."""

from __future__ import annotations

from flashbench import suite

from ..texts import heldout_text
from .common import EXIT_FAILED, EXIT_OK, UsageError, add_text_arg, load_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser("check-dense", help="compare the dense engine with transformers",
                       description="Compare the dense engine's logits with transformers' on the same checkpoint "
                       "(prefill of held-out text, then greedy decode steps). Exit 1 if over tolerance.")
    p.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--steps", type=int, default=32, help="decode steps (default 32)")
    p.add_argument("--tolerance", type=float, default=None, help="max |logit difference| (default: the exact "
                   "float32 tier's logit bound, 32 units in the last place of the logit scale)")
    add_text_arg(p)
    p.set_defaults(func=cmd_check_dense)


def cmd_check_dense(args) -> int:
    from ..hf_check import compare_with_transformers

    path = suite.model_path(args.model)
    if not path.is_dir():
        raise UsageError(f"{path}: no such checkpoint directory")
    text = heldout_text(args.text)
    prompt = load_tokenizer(path).encode(text.text)[: args.prefill]
    check = compare_with_transformers(path, prompt, decode_steps=args.steps, tolerance=args.tolerance)
    verdict = "PASS" if check.passed else "FAIL"
    print(f"{verdict}: {path}: max |logit difference| vs transformers = {check.max_abs_diff:.3g} "
          f"(tolerance {check.tolerance:g}; {check.prefill_tokens}-token prefill + {check.decode_steps} decode steps)")
    return EXIT_OK if check.passed else EXIT_FAILED
