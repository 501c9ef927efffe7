"""Agreement of an engine with dense inference, teacher-forced over the same text, and the tiers it is judged at.

The error model
---------------
An *exact* engine computes what dense inference computes, with the same weights at the same precision; only the
order of its sums differs (a gathered subset of neurons, a matrix split into parts, another CPU's kernels). Its
logits z' then stay within a bound eps of dense's logits z, at every position and entry:

    eps = K(dtype) * machine_epsilon(dtype) * L

where L, the logit scale, is the smallest power of two at or above the largest |z| of the dense run (so eps is a fixed
number of units in the last place of the largest logits, whatever the model's logit range). K is the error model's
one constant per dtype:

- float32, K = 32: weights and activations stay in float32 and a reordered sum over n terms moves by rounding errors
  that add up like a random walk, about sqrt(n) units in the last place; the embedded models sum over 1024 neurons.
- float16 and bfloat16, K = 8: every operation rounds its result to 16 bits (kernels accumulate in float32 inside),
  so a reordered sum moves a result by at most one 16-bit unit in the last place, and the few such roundings of a
  block, carried through the layers, by a few.

Measured on the embedded models under torch's default, avx2 and avx512 kernels (docs/verdicts.md), an exact engine
used at most a quarter of eps. Everything else a tier allows follows from eps:

- perplexity: log p_i = z_i - logsumexp(z), and logsumexp moves by at most max |z' - z| <= eps, so every
  log-probability moves by at most 2 eps and the perplexity ratio stays within exp(2 eps);
- KL(dense || engine) = log E_p[exp(d)] - E_p[d] with d = z' - z in [-eps, eps]: at most eps^2 / 2 by Hoeffding's
  lemma;
- top-1: where dense's best logit leads another by more than 2 eps, the other cannot overtake it; where it leads by
  at most 2 eps (the tie margin) either choice is exact, and the position counts as agreeing;
- greedy: the free-running continuation must match dense's to its end, or part from it at a tie (after which the
  two sequences differ and nothing more can be compared).

So at an exact tier the logit bound is the verdict: no other check can fail while it passes. The approximate tier
bounds the drift a user would notice instead (the paper reports zero-shot accuracy unchanged within noise); it uses
the same tie margin, because a flip within rounding noise is no disagreement at any tier.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

# The error model's constant: an exact engine's logits stay within K units in the last place of the logit scale.
LOGIT_ULPS = {torch.float32: 32, torch.float16: 8, torch.bfloat16: 8}


def logit_scale(dense_logits: torch.Tensor) -> float:
    """L: the smallest power of two at or above the dense run's largest |logit| (at least 1)."""
    largest = float(dense_logits.abs().max()) if dense_logits.numel() else 0.0
    return 2.0 ** max(0, math.ceil(math.log2(largest))) if largest > 1 else 1.0


def logit_bound(dtype: torch.dtype, scale: float) -> float:
    """eps: how far an exact engine computing in `dtype` may move a logit from dense inference in `dtype`."""
    if dtype not in LOGIT_ULPS:
        raise ValueError(f"no error model for {dtype}: exact tiers exist for {', '.join(map(str, LOGIT_ULPS))}")
    return LOGIT_ULPS[dtype] * torch.finfo(dtype).eps * scale


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


def heldout_sequences(ids: list[int], bos: int | None, tokens: int, greedy_prompt: int = 0,
                      offset: int = 0) -> tuple[list[int], list[int]]:
    """The sequences an engine is judged on, cut from held-out ids the same way by every command: `tokens` tokens
    from `offset` to teacher-force, and the greedy continuation's `greedy_prompt`-token prompt (the text right
    after them); each starts with `bos` where the model's tokenizer has one."""
    start, text = ([bos] if bos is not None else []), ids[offset:]
    return start + text[: tokens - len(start)], start + text[tokens : tokens + greedy_prompt - len(start)]


@dataclass(frozen=True)
class Greedy:
    """A free-running greedy continuation, and the logits [n, vocab] that chose each of its tokens."""

    tokens: list[int]
    logits: torch.Tensor


def greedy(engine, prompt: list[int], n: int) -> Greedy:
    """The engine's greedy continuation of `prompt`, n tokens."""
    out, rows = [], [engine.prefill(prompt)[-1]]
    for i in range(n):
        out.append(int(rows[-1].argmax()))
        if i + 1 < n:
            rows.append(engine.step(out[-1]))
    return Greedy(out, torch.stack(rows[:n]) if n else torch.zeros(0))


@dataclass(frozen=True)
class Agreement:
    tokens: int
    max_abs_logit_diff: float
    mean_kl: float  # KL(dense || engine), nats per token
    top1_agreement: float  # fraction of positions where the argmax matches dense's, or differs within a tie
    top1_ties: int  # positions whose argmax differs from dense's within the tie margin (counted as agreeing)
    perplexity: float
    dense_perplexity: float
    tie_margin: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.dense_perplexity


def agreement(dense_logits: torch.Tensor, logits: torch.Tensor, targets: list[int],
              tie_margin: float = 0.0) -> Agreement:
    """How far `logits` [T, vocab] are from `dense_logits` on the same positions. A position whose argmax differs
    from dense's agrees still if dense rates the engine's choice within `tie_margin` of its own best."""
    target = torch.tensor(targets)
    dense_logp, logp = F.log_softmax(dense_logits.double(), -1), F.log_softmax(logits.double(), -1)
    best, choice = dense_logits.argmax(-1), logits.argmax(-1)
    lead = dense_logits.gather(-1, best[:, None]) - dense_logits.gather(-1, choice[:, None])
    differs = best != choice
    ties = differs & (lead[:, 0] <= tie_margin)
    return Agreement(
        tokens=len(targets),
        max_abs_logit_diff=float((dense_logits - logits).abs().max()),
        mean_kl=float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()),
        top1_agreement=float((~differs | ties).double().mean()),
        top1_ties=int(ties.sum()),
        perplexity=float(F.nll_loss(logp, target).exp()),
        dense_perplexity=float(F.nll_loss(dense_logp, target).exp()),
        tie_margin=tie_margin,
    )


@dataclass(frozen=True)
class GreedyMatch:
    matched: int  # tokens produced before the first difference
    total: int
    parted_at_tie: bool  # the first difference was a choice dense rates within the tie margin of its own

    @property
    def value(self) -> float:
        """The fraction of the continuation judged to match: all of it if it parted only at a tie."""
        return 1.0 if self.parted_at_tie or not self.total else self.matched / self.total


def matched_prefix(expected: list[int], got: list[int]) -> int:
    """Tokens produced before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(expected, got)) if x != y), min(len(expected), len(got)))


def greedy_match(dense: Greedy, got: list[int], tie_margin: float = 0.0) -> GreedyMatch:
    """The engine's continuation against dense's. Up to the first difference both saw the same prefix, so dense's
    logits there say whether the engine's choice was a tie."""
    matched = matched_prefix(dense.tokens, got)
    tie = False
    if matched < min(len(dense.tokens), len(got)):
        row = dense.logits[matched]
        tie = float(row[dense.tokens[matched]] - row[got[matched]]) <= tie_margin
    return GreedyMatch(matched, len(dense.tokens), tie)


@dataclass(frozen=True)
class Tolerance:
    """The limits a configuration's agreement is judged against."""

    exact: bool
    max_abs_logit_diff: float
    max_mean_kl: float
    min_top1_agreement: float
    max_perplexity_ratio: float
    min_greedy_match: float  # fraction of the greedy continuation matched before the first difference (not a tie)


def exact_tier(bound: float) -> Tolerance:
    """The exact tier for a logit bound eps: every other limit follows from it (see the module's error model)."""
    return Tolerance(True, bound, bound * bound / 2, 1.0, math.exp(2 * bound), 1.0)


# The paper reports zero-shot accuracy unchanged within noise; these bound the drift a user would notice.
APPROXIMATE = Tolerance(False, 10.0, 0.05, 0.95, 1.03, 0.25)
LIMITS = tuple(f.name for f in fields(Tolerance) if f.name != "exact")


def approximate_tier(overrides: dict, where: str) -> Tolerance:
    """APPROXIMATE with some limits replaced, e.g. a scenario's `[engine.approximate]` table; bad keys or values
    are a ValueError naming `where`."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: approximate must be a table of limits ({', '.join(LIMITS)}), got {overrides!r}")
    unknown = set(overrides) - set(LIMITS)
    if unknown:
        raise ValueError(f"{where}: unknown limit(s) {sorted(unknown)} in approximate; known: {', '.join(LIMITS)}")
    bad = {k: v for k, v in overrides.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0}
    if bad:
        raise ValueError(f"{where}: approximate limits must be non-negative numbers, got {bad}")
    return replace(APPROXIMATE, **{k: float(v) for k, v in overrides.items()})


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def describe(self) -> str:
        """"value <= limit" with enough digits to see the margin: ratios near 1 as 1 + x (1 + 1.7e-07 <= 1 + 0.00024,
        not 1 <= 1), other numbers with three digits past those they share."""
        op = "<=" if self.at_most else ">="
        if abs(self.value - 1) < 0.01 and abs(self.limit - 1) < 0.01 and self.limit != 1:
            return f"{_near_one(self.value)} {op} {_near_one(self.limit)}"
        digits = _shared_digits(self.value, self.limit) + 3
        return f"{self.value:.{digits}g} {op} {self.limit:.{digits}g}"


def _near_one(x: float) -> str:
    return "1" if x == 1 else f"1 {'+' if x > 1 else '-'} {abs(x - 1):.2g}"


def _shared_digits(a: float, b: float) -> int:
    """Leading significant digits that `a` and `b` have in common."""
    if a == b or not (math.isfinite(a) and math.isfinite(b)):
        return 0
    x, y = f"{a:.15e}", f"{b:.15e}"
    if x.split("e")[1] != y.split("e")[1]:
        return 0
    mx, my = x.split("e")[0].replace(".", "").lstrip("-"), y.split("e")[0].replace(".", "").lstrip("-")
    return next((i for i, (p, q) in enumerate(zip(mx, my)) if p != q), len(mx))


def checks(a: Agreement, g: GreedyMatch | None, tol: Tolerance) -> list[Check]:
    """The tier's checks; without a greedy continuation (`g` None) only the teacher-forced ones."""
    out = [
        Check("max_abs_logit_diff", a.max_abs_logit_diff, tol.max_abs_logit_diff, True),
        Check("mean_kl", a.mean_kl, tol.max_mean_kl, True),
        Check("top1_agreement", a.top1_agreement, tol.min_top1_agreement, False),
        Check("perplexity_ratio", a.perplexity_ratio, tol.max_perplexity_ratio, True),
    ]
    return out + ([Check("greedy_match", g.value, tol.min_greedy_match, False)] if g is not None else [])


@dataclass(frozen=True)
class DenseReference:
    """Dense inference on the tokens an engine is judged on: teacher-forced logits, a greedy continuation, the
    precision it computed in, and its own speed for context."""

    tokens: list[int]  # the teacher-forced sequence
    logits: torch.Tensor  # [len(tokens) - 1, vocab]
    prompt: list[int]  # the greedy continuation's prompt
    continuation: Greedy
    dtype: torch.dtype
    tokens_per_s: float

    @property
    def logit_bound(self) -> float:
        """eps for an exact engine at this reference's precision and logit scale."""
        return logit_bound(self.dtype, logit_scale(torch.cat([self.logits, self.continuation.logits.reshape(
            -1, self.logits.shape[-1])])))

    @property
    def tie_margin(self) -> float:
        return 2 * self.logit_bound


def dense_reference(engine, tokens: list[int], prompt: list[int], greedy_tokens: int,
                    dtype: torch.dtype) -> DenseReference:
    seconds: list[float] = []
    logits = teacher_forced(engine, tokens, step_seconds=seconds)
    return DenseReference(tokens, logits, prompt, greedy(engine, prompt, greedy_tokens), dtype,
                          len(seconds) / sum(seconds) if seconds else float("nan"))


@dataclass(frozen=True)
class Verdict:
    tier: str  # "exact", "exact at float16", "approximate"
    tolerance: Tolerance
    logit_bound: float  # eps of the dense reference's precision and logit scale; the tie margin is 2 eps
    agreement: Agreement
    greedy: GreedyMatch
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        return {"tolerance": self.tier, "passed": self.passed, "logit_bound": self.logit_bound,
                "tie_margin": 2 * self.logit_bound, "limits": {k: getattr(self.tolerance, k) for k in LIMITS},
                "checks": [vars(c) | {"passed": c.passed} for c in self.checks],
                "perplexity": self.agreement.perplexity, "dense_perplexity": self.agreement.dense_perplexity,
                "top1_ties": self.agreement.top1_ties, "greedy_matched_tokens": self.greedy.matched,
                "greedy_tokens": self.greedy.total, "greedy_parted_at_tie": self.greedy.parted_at_tie}


def tier_name(dtype: torch.dtype) -> str:
    return "exact" if dtype == torch.float32 else f"exact at {str(dtype).removeprefix('torch.')}"


def judge(ref: DenseReference, logits: torch.Tensor, continuation: list[int],
          approximate: Tolerance | None = None) -> Verdict:
    """An engine's teacher-forced `logits` (on ref.tokens, or a prefix of them) and greedy `continuation` against
    the dense reference: exact at the reference's precision, or at the `approximate` tier where one is given."""
    n = len(logits)
    eps = ref.logit_bound
    a = agreement(ref.logits[:n], logits, ref.tokens[1 : n + 1], 2 * eps)
    g = greedy_match(ref.continuation, continuation, 2 * eps)
    tol = approximate if approximate is not None else exact_tier(eps)
    name = "approximate" if approximate is not None else tier_name(ref.dtype)
    return Verdict(name, tol, eps, a, g, checks(a, g, tol))
