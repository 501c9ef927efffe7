"""Measuring one configuration of the matrix on one model: per-token latency, I/O counters, DRAM, agreement.

Timings and counters come from a teacher-forced pass over held-out tokens (decode steps only: the first token's
prefill is left out). Agreement with dense inference comes from the same pass plus a free-running greedy
continuation; a model with no dense reference (a synthetic one replaying a trace) says why instead.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flashbench.reference.flash import BudgetError, FlashEngine, TokenStats
from flashbench.reference.layout import FlashLayout, checkpoint_hash, convert
from flashbench.reference.sources import ActivationSource

from .agreement import DenseReference, greedy, judge, teacher_forced
from .matrix import Configuration, LayoutSpec, Settings
from .probe import Probe
from .records import portable_path
from .stats import spread


@dataclass
class ModelUnderTest:
    """One model of a run, with everything its configurations share."""

    name: str
    checkpoint: Path
    work: Path  # where its flash layouts are converted
    source: str  # the activation source standing for the "predictor" technique: "predictor" or "trace"
    source_label: str  # what produced the sets, for every figure's caption
    new_source: Callable[[], ActivationSource]
    neuron_counts: np.ndarray  # how often each neuron was active: the hybrid keeps the most frequent
    tokens: list[int]  # the teacher-forced sequence
    reference: DenseReference | None = None
    no_reference: str | None = None  # why there is no agreement check
    keep: list[np.ndarray] | None = None  # pruning: neurons each layer keeps
    pruning: dict | None = None
    whole_read_tokens: int | None = None  # fewer tokens for configurations that read every neuron
    layouts: dict[str, FlashLayout] = field(default_factory=dict)
    _checkpoint_hash: str | None = None
    _resident: dict = field(default_factory=dict)  # resident file's sha256 -> its tensors, shared by engines

    def release(self) -> None:
        """Forget the shared resident tensors (gigabytes at paper scale), e.g. before the peers run."""
        self._resident.clear()

    def resident(self, layout: FlashLayout, dtype: torch.dtype) -> dict:
        key = (layout.files["resident.safetensors"]["sha256"], dtype)
        if key not in self._resident:
            self._resident = {key: layout.resident_state(dtype)}  # one at a time: a paper-scale one is gigabytes
        return self._resident[key]

    @property
    def max_len(self) -> int:
        ref = self.reference
        return max(len(self.tokens), len(ref.prompt) + len(ref.continuation.tokens) if ref else 0)

    def layout(self, spec: LayoutSpec, progress=None) -> FlashLayout:
        """The flash layout `spec` of this model: converted on first use, reused while it matches (same checkpoint
        hash, same kept neurons), converted again where it does not."""
        if spec.name not in self.layouts:
            out = self.work / spec.name
            keep = self.keep if spec.pruned else None
            if (out / "layout.json").is_file():
                existing = FlashLayout.open(out, verify=False)
                if self._matches(existing, keep):
                    self.layouts[spec.name] = existing
                    return existing
                shutil.rmtree(out)
            if progress:
                progress(f"  converting {self.name} -> {spec.name}")
            self.layouts[spec.name] = convert(self.checkpoint, out, spec.layout, spec.dtype, keep=keep,
                                              pruning=self.pruning if spec.pruned else None)
        return self.layouts[spec.name]

    def _matches(self, layout: FlashLayout, keep: list[np.ndarray] | None) -> bool:
        if self._checkpoint_hash is None:
            self._checkpoint_hash = checkpoint_hash(self.checkpoint)
        if layout.source.get("sha256") != self._checkpoint_hash or (layout.kept is None) != (keep is None):
            return False
        return keep is None or all(np.array_equal(a, b) for a, b in zip(layout.kept, keep))


def token_metrics(steps: list[TokenStats]) -> dict:
    """Per-token figures over decode steps: latency split (ms: mean, p50, p90) and the reader's exact counters."""
    n = len(steps)
    total = sum(s.total_s for s in steps)
    io_s = sum(s.io.seconds for s in steps)
    bytes_read = sum(s.io.bytes_read for s in steps)
    reads = sum(s.io.reads for s in steps)
    ms = lambda f: spread([f(s) * 1e3 for s in steps])  # noqa: E731
    return {
        "tokens": n,
        "tokens_per_s": n / total if total else None,
        "ms": {"io": ms(lambda s: s.io.seconds), "memory": ms(lambda s: s.memory_s),
               "predictor": ms(lambda s: s.predictor_s), "compute": ms(lambda s: s.compute_s),
               "total": ms(lambda s: s.total_s)},
        "per_token": {"bytes_read": bytes_read / n, "bytes_requested": sum(s.io.bytes_requested for s in steps) / n,
                      "reads": reads / n, "neurons": sum(s.io.records for s in steps) / n},
        "totals": {"bytes_read": bytes_read, "reads": reads, "neurons": sum(s.io.records for s in steps)},
        "read_bandwidth_bytes_s": bytes_read / io_s if io_s else None,
        "mean_read_bytes": bytes_read / reads if reads else None,
        "direct": all(s.io.direct for s in steps),
        "window_shrinks": sum(s.window_shrinks for s in steps),
    }


def fio_reference(metrics: dict, threads: int, probe: Probe | None) -> dict | None:
    """The probe's bandwidth at our mean read size and thread count, and our effective bandwidth's ratio to it."""
    if probe is None or not metrics["mean_read_bytes"]:
        return None
    ref = probe.reference(metrics["mean_read_bytes"], threads)
    if ref is None:
        return None
    ours = metrics["read_bandwidth_bytes_s"]
    return {"tool": ref.tool, "ioengine": ref.ioengine, "chunk_bytes": ref.chunk_bytes, "threads": ref.threads,
            "bandwidth_bytes_s": ref.bandwidth_bytes_s, "ratio": ours / ref.bandwidth_bytes_s if ours else None}


def measure(model: ModelUnderTest, config: Configuration, settings: Settings, probe: Probe | None,
            progress=print, dram_budget: int | None = None) -> dict:
    """One configuration on one model: the record's parameters, metrics and verdicts. With `dram_budget` the engine
    must fit it (else the record says it does not)."""
    techniques = config.engine_settings(settings, model.source)
    spec = config.layout(settings.dtype)
    layout = model.layout(spec, progress)
    record = {
        "model": model.name, "configuration": config.name, "techniques_on": sorted(config.on),
        "sections": list(config.sections), "prerequisites": list(config.prerequisites),
        "inactive": list(config.inactive), "exact": config.exact,
        "activation_source": model.source_label if "predictor" in config.on else "all neurons (no prediction)",
        "engine": vars(techniques), "layout": {"name": spec.name, "layout": spec.layout, "dtype": spec.dtype,
                                               "pruned": spec.pruned, "path": portable_path(layout.path)},
    }
    tokens = model.tokens
    if techniques.source == "all" and model.whole_read_tokens:
        tokens = tokens[: model.whole_read_tokens]
    record["teacher_forced_tokens"] = len(tokens)
    record["dram_budget"] = dram_budget
    try:
        engine = FlashEngine(layout, techniques, source=model.new_source() if "predictor" in config.on else None,
                             neuron_counts=model.neuron_counts, max_len=model.max_len, dram_budget=dram_budget,
                             resident=model.resident(layout, techniques.dtype))
    except BudgetError as e:
        return record | {"status": "does-not-fit", "error": str(e)}
    try:
        logits = teacher_forced(engine, tokens)
        metrics = token_metrics(engine.history[1:])
        dram = vars(engine.dram) | {"weights_total": engine.dram.weights_total,
                                    "cache_peak_used": engine.cache_peak_used()}
        ref = model.reference
        verdict = None
        if ref is not None:
            got = greedy(engine, ref.prompt, len(ref.continuation.tokens)).tokens
            verdict = judge(ref, logits, got, None if config.exact else settings.approximate).as_dict()
    except BudgetError as e:  # a pass needed more neurons than the budget's cache or buffer holds
        return record | {"status": "does-not-fit", "error": str(e)}
    finally:
        engine.close()
    return record | {
        "status": "measured",
        "metrics": metrics,
        "fio_reference": fio_reference(metrics, techniques.threads, probe),
        "dram": dram,
        "agreement": verdict if verdict is not None else {"not_applicable": model.no_reference},
    }
