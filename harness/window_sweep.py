"""Window size against accuracy and I/O: the flash engine with the predictor, k = 0..8, beside dense inference.

For each window k the engine is teacher-forced over held-out text one token at a time, and reports top-1
agreement and perplexity beside dense's, the fraction of the FFN's bytes it read per token (the naive
configuration reads all of them), and the mean per-token I/O, memory management, predictor and compute time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flashbench.reference import Engine, Transformer
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import FlashLayout

from .agreement import agreement, teacher_forced
from .measure import token_metrics


@dataclass(frozen=True)
class WindowPoint:
    window: int
    top1_agreement: float
    perplexity: float
    dense_perplexity: float
    mean_kl: float
    neurons_per_token: float
    ffn_fraction_requested: float  # records' own bytes per token / the FFN's bytes
    ffn_fraction_read: float  # whole blocks actually read per token / the FFN's bytes
    io_ms: float
    memory_ms: float
    predictor_ms: float
    compute_ms: float
    total_ms: float
    direct: bool


def window_sweep(checkpoint: Path, flash: FlashLayout, source_factory, windows: list[int], tokens: list[int],
                 threads: int = 16, progress=print) -> list[WindowPoint]:
    dense_logits = teacher_forced(Engine(Transformer.from_checkpoint(checkpoint)), tokens)
    targets = tokens[1:]
    g = flash.geometry
    ffn_bytes = flash.config.n_layers * g.d_ffn * g.record_bytes
    points = []
    for k in windows:
        engine = FlashEngine(flash, Techniques(source="predictor", window=k, threads=threads), source=source_factory())
        logits = teacher_forced(engine, tokens)
        engine.close()
        m = token_metrics(engine.history[1:])  # decode steps only
        a = agreement(dense_logits, logits, targets)
        point = WindowPoint(
            window=k, top1_agreement=a.top1_agreement, perplexity=a.perplexity, dense_perplexity=a.dense_perplexity,
            mean_kl=a.mean_kl, neurons_per_token=m["per_token"]["neurons"],
            ffn_fraction_requested=m["per_token"]["bytes_requested"] / ffn_bytes,
            ffn_fraction_read=m["per_token"]["bytes_read"] / ffn_bytes,
            io_ms=m["ms"]["io"]["mean"], memory_ms=m["ms"]["memory"]["mean"],
            predictor_ms=m["ms"]["predictor"]["mean"], compute_ms=m["ms"]["compute"]["mean"],
            total_ms=m["ms"]["total"]["mean"], direct=m["direct"],
        )
        points.append(point)
        if progress:
            progress(format_point(point))
    return points


HEADER = ("  k  top-1   ppl (dense)      KL  neurons/tok  FFN read  (requested)   io ms  mem ms  pred ms  "
          "comp ms  mem/io")


def format_point(p: WindowPoint) -> str:
    return (f"{p.window:3d}  {p.top1_agreement:5.1%}  {p.perplexity:5.3f} ({p.dense_perplexity:5.3f})  "
            f"{p.mean_kl:6.4f}  {p.neurons_per_token:11.1f}  {p.ffn_fraction_read:8.2%}  ({p.ffn_fraction_requested:7.2%})  "
            f"{p.io_ms:6.2f}  {p.memory_ms:6.2f}  {p.predictor_ms:7.2f}  {p.compute_ms:7.2f}  "
            f"{p.memory_ms / p.io_ms if p.io_ms else float('nan'):6.2f}" + ("" if p.direct else "  NOT direct"))
