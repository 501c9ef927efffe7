"""The independent check of the dense path: our engine's logits against `transformers` on the same checkpoint.

Our engine prefills a prompt and decodes greedily step by step through its KV cache; `transformers` then scores
the whole resulting sequence in one forward pass, so the check covers the cache as well as the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flashbench.reference import Engine, Transformer

from .agreement import logit_bound, logit_scale


@dataclass(frozen=True)
class HFCheck:
    checkpoint: str
    prefill_tokens: int
    decode_steps: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def compare_with_transformers(
    checkpoint: str | Path, prompt: list[int], decode_steps: int = 32, tolerance: float | None = None
) -> HFCheck:
    """`tolerance` defaults to the exact float32 tier's logit bound at transformers' logit scale."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise RuntimeError("the dense check needs transformers: pip install 'flashbench[peers]'") from e

    engine = Engine(Transformer.from_checkpoint(checkpoint))
    ours = [engine.prefill(prompt)]
    sequence = list(prompt)
    for _ in range(decode_steps):
        sequence.append(int(ours[-1][-1].argmax()))
        ours.append(engine.step(sequence[-1])[None])
    ours_logits = torch.cat(ours)  # one row per position of `sequence`

    hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = hf(torch.tensor([sequence])).logits[0].float()
    return HFCheck(
        checkpoint=str(checkpoint),
        prefill_tokens=len(prompt),
        decode_steps=decode_steps,
        max_abs_diff=float((ours_logits - theirs).abs().max()),
        max_abs_logit=float(theirs.abs().max()),
        tolerance=tolerance if tolerance is not None else logit_bound(torch.float32, logit_scale(theirs)),
    )
