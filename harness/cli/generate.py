"""`flashbench generate`: generate text with the dense engine."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from flashbench import suite
from flashbench.reference import Engine, Sampling, Transformer, generate
from flashbench.reference.tokenizer import Tokenizer

from ..records import write_json_atomic
from ..stats import percentile
from .common import EXIT_OK, UsageError, load_model

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the dense engine",
                       description="Generate text from a checkpoint with the dense engine, with per-token timings.")
    p.add_argument("model", nargs="?", default=suite.DEFAULT_MODEL, help="embedded model name or HF checkpoint dir")
    p.add_argument("--json", help="also write the result as JSON to this path")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    p.add_argument("--tokens", type=int, default=64, help="new tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--per-token", action="store_true", help="print every token's time")


def _generation_record(path: Path, model: Transformer, tokenizer: Tokenizer, prompt: str, args) -> dict:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    prompt_ids = tokenizer.encode(prompt)
    if len(prompt_ids) >= model.config.max_positions:  # bad input, not a bug: say so (exit 2)
        raise UsageError(f"--prompt: {len(prompt_ids)} tokens with {path.name}'s tokenizer; its context holds "
                         f"{model.config.max_positions} positions, so the prompt must be shorter to leave room for a "
                         "new token")
    result = generate(Engine(model), prompt_ids, args.tokens, sampling, eos=tokenizer.eos)
    ms = [s * 1e3 for s in result.token_seconds]
    return {
        "model": str(path),
        "config": model.config.as_dict(),
        "engine": "dense",
        "prompt": prompt,
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "seed": args.seed},
        "max_new_tokens": args.tokens,
        "tokenizer": tokenizer.describe(),
        "text": tokenizer.decode(result.tokens),
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
        print(f"-- {len(rec['token_ms'])} decode steps (the first new token comes from the prefill): mean "
              f"{rec['token_ms_mean']:.2f} ms, p90 {rec['token_ms_p90']:.2f} ms, {rec['tokens_per_s']:.1f} tokens/s")


def cmd_generate(args) -> int:
    path, model, tokenizer = load_model(args.model)
    rec = _generation_record(path, model, tokenizer, args.prompt, args)
    _print_generation(rec, per_token=args.per_token)
    if args.json:
        write_json_atomic(Path(args.json), rec)
    return EXIT_OK
