"""Agreement of an engine with dense inference, teacher-forced over the same text."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def teacher_forced(engine, tokens: list[int], prompt: int = 1, step_seconds: list[float] | None = None) -> torch.Tensor:
    """Logits [len(tokens) - 1, vocab] predicting tokens[1:]: prefill the first `prompt` tokens, then step
    through the rest one at a time, as decoding does. `step_seconds` collects each step's wall time."""
    logits = [engine.prefill(tokens[:prompt])]
    for t in tokens[prompt:-1]:
        t0 = time.perf_counter()
        logits.append(engine.step(t)[None])
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - t0)
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


def greedy_tokens(engine, prompt: list[int], n: int) -> list[int]:
    """The engine's free-running greedy continuation of `prompt`, n tokens."""
    out, logits = [], engine.prefill(prompt)[-1]
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            logits = engine.step(out[-1])
    return out


def matched_prefix(expected: list[int], got: list[int]) -> int:
    """Tokens produced before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), min(len(expected), len(got)))


@dataclass(frozen=True)
class Tolerance:
    """The limits a configuration's agreement is judged against. Exact configurations (every needed weight read at
    the checkpoint's own precision, only the order of sums may differ) get `EXACT`; lossy ones (a predictor,
    quantization, pruning) get `APPROXIMATE` or a scenario's own."""

    exact: bool
    max_abs_logit_diff: float
    max_mean_kl: float
    min_top1_agreement: float
    max_perplexity_ratio: float
    min_greedy_match: float  # fraction of the greedy continuation matched before the first difference


EXACT = Tolerance(True, 1e-4, 1e-8, 1.0, 1.0 + 1e-6, 1.0)


def exact_at(dtype: torch.dtype) -> Tolerance:
    """Exact, for an engine computing in `dtype` against a dense engine computing in the same `dtype`: a different
    order of sums moves each rounding by up to one unit in the last place (eps), so the limits scale with eps.
    Logits of magnitude up to ~32 may move by 8 units in their last place (256 eps: 0.25 in float16, 2.0 in
    bfloat16), the perplexity by 4 eps (measured on the embedded models in float16: 0.047 and 1.0014); near-ties may
    flip, so a few top-1 choices may differ and the greedy run may part after half."""
    if dtype == torch.float32:
        return EXACT
    eps = torch.finfo(dtype).eps
    return Tolerance(True, 256 * eps, 0.1 * eps, 0.98, 1.0 + 4 * eps, 0.5)


# The paper reports zero-shot accuracy unchanged within noise; these bound the drift a user would notice.
APPROXIMATE = Tolerance(False, 10.0, 0.05, 0.95, 1.03, 0.25)


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit


def checks(a: Agreement, match: int, continuation: int, tol: Tolerance) -> list[Check]:
    return [
        Check("max_abs_logit_diff", a.max_abs_logit_diff, tol.max_abs_logit_diff, True),
        Check("mean_kl", a.mean_kl, tol.max_mean_kl, True),
        Check("top1_agreement", a.top1_agreement, tol.min_top1_agreement, False),
        Check("perplexity_ratio", a.perplexity_ratio, tol.max_perplexity_ratio, True),
        Check("greedy_match", match / continuation if continuation else 1.0, tol.min_greedy_match, False),
    ]
