"""Prefill and step over a model with a KV cache, and generation with per-token timings.

`Engine` is the interface every inference path offers (the dense one here, the flash one later): prefill a
prompt, then step one token at a time, each returning logits. `generate` drives any such engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import FlashbenchError
from .model import Transformer


class Engine:
    """Dense inference: every weight in DRAM. The ground truth the flash engine is compared with."""

    def __init__(self, model: Transformer, max_len: int | None = None):
        self.model = model
        self.max_len = max_len or model.config.max_positions
        self.cache = model.new_cache(self.max_len)

    def reset(self) -> None:
        self.cache.length = 0

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """Logits [T, vocab] for the prompt, starting a new sequence (on the host, in float32, wherever the model
        computes)."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self.reset()
        device = self.cache.k.device
        return self.model(torch.tensor([tokens], device=device), self.cache)[0].float().cpu()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Logits [vocab] for one more token of the current sequence."""
        device = self.cache.k.device
        return self.model(torch.tensor([[token]], device=device), self.cache)[0, -1].float().cpu()


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise sample (optionally from the top k) with a seeded generator."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise FlashbenchError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise FlashbenchError(f"top_k must be >= 1, got {self.top_k}")


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    token_seconds: list[float] = field(default_factory=list)  # one entry per decode step
    stopped_at_eos: bool = False


def generate(
    engine: Engine, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(), eos: int | None = None
) -> Generation:
    """Prefill, then decode up to `max_new_tokens`; the first new token comes from the prefill's logits."""
    generator = torch.Generator().manual_seed(sampling.seed)
    out = Generation(prompt=list(prompt))
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)[-1]
    out.prefill_seconds = time.perf_counter() - t0
    for _ in range(max_new_tokens):
        token = pick(logits, sampling, generator)
        out.tokens.append(token)
        if eos is not None and token == eos:
            out.stopped_at_eos = True
            break
        if len(out.tokens) == max_new_tokens or len(prompt) + len(out.tokens) >= engine.max_len:
            break
        t0 = time.perf_counter()
        logits = engine.step(token)
        out.token_seconds.append(time.perf_counter() - t0)
    return out
