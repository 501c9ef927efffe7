"""Agreement of an engine with dense inference, teacher-forced over the same text."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def teacher_forced(engine, tokens: list[int], prompt: int = 1) -> torch.Tensor:
    """Logits [len(tokens) - 1, vocab] predicting tokens[1:]: prefill the first `prompt` tokens, then step
    through the rest one at a time, as decoding does."""
    logits = [engine.prefill(tokens[:prompt])]
    logits += [engine.step(t)[None] for t in tokens[prompt:-1]]
    return torch.cat(logits)


@dataclass(frozen=True)
class Agreement:
    tokens: int
    max_abs_logit_diff: float
    mean_kl: float  # KL(dense || engine), nats per token
    top1_agreement: float  # fraction of positions where the argmax matches dense's
    perplexity: float
    dense_perplexity: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.dense_perplexity


def agreement(dense_logits: torch.Tensor, logits: torch.Tensor, targets: list[int]) -> Agreement:
    target = torch.tensor(targets)
    dense_logp, logp = F.log_softmax(dense_logits.double(), -1), F.log_softmax(logits.double(), -1)
    return Agreement(
        tokens=len(targets),
        max_abs_logit_diff=float((dense_logits - logits).abs().max()),
        mean_kl=float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()),
        top1_agreement=float((dense_logits.argmax(-1) == logits.argmax(-1)).double().mean()),
        perplexity=float(F.nll_loss(logp, target).exp()),
        dense_perplexity=float(F.nll_loss(dense_logp, target).exp()),
    )
