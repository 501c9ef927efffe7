"""Measuring one configuration of the matrix on one model, through the SUT interface: per-token latency on the
harness's clock, the SUT's own breakdown and counters, DRAM, agreement.

The harness prefills the first held-out token, then times every decode step of a teacher-forced pass over the rest;
agreement with dense inference comes from the same pass plus a free-running greedy continuation (a model with no
dense reference, a synthetic one replaying a trace, says why instead). The reference engine is one SUT among others
(`adapters.EngineSUT`, in-process, so nothing is lost in speed); `flashbench validate` drives SUTs the same way.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flashbench.reference.activations import NEIGHBOURS, placement_order
from flashbench.reference.config import ModelConfig
from flashbench.reference.flash import BudgetError, TokenStats
from flashbench.reference.layout import FlashLayout, LayoutError, checkpoint_hash, convert
from flashbench.reference.sources import ActivationSource

from .agreement import DenseReference, greedy, judge
from .compute import ComputeRates, latency_bound
from .matrix import Configuration, LayoutSpec, Settings, ordered
from .probe import Probe
from .stats import spread
from .sut import Guarded, SUTError, SystemUnderTest, reported


@dataclass
class ModelUnderTest:
    """One model of a run, with everything its configurations share."""

    name: str
    checkpoint: Path
    work: Path  # where its flash layouts are converted
    source: str  # the activation source standing for the "predictor" technique: "predictor" or "trace"
    source_label: str  # what produced the sets, for every figure's caption
    new_source: Callable[[bool], ActivationSource]  # a fresh source; True: with its lookahead (overlap)
    neuron_counts: np.ndarray  # how often each neuron was active: the hybrid keeps the most frequent
    tokens: list[int]  # the teacher-forced sequence
    reference: DenseReference | None = None
    no_reference: str | None = None  # why there is no agreement check
    # A SiLU FFN: sparse configurations apply with the threshold technique, at these per-layer thresholds
    # (calibrated to the run's target sparsity; None for a ReLU FFN)
    dense_ffn: bool = False
    thresholds: list[float] | None = None
    # Thresholded with the oracle source: the gate rows stay in DRAM and decide the set (CATS), so the threshold
    # configurations read gate-resident layouts (records of up and down only)
    gate_resident: bool = False
    rates: ComputeRates | None = None  # this CPU's matrix-vector rates at the model's FFN shape: the compute bound
    kept: list[np.ndarray] | None = None  # pruning: the neurons each layer keeps
    # Per layer, which neurons were active at each position of a sample of the counting text (bits packed along
    # positions, `activations.active_sample`): a placed layout's co-activation order (None: every neuron by count)
    active: list[np.ndarray] | None = None
    active_tokens: int = 0  # the positions in that sample
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
            kept, placement = self.kept if spec.pruned else None, None
            if spec.placed:
                kept, placement = self.placement(kept, spec.hot)
            if out.exists():
                try:
                    existing = FlashLayout.open(out, verify=False)
                except LayoutError:  # half-written, or of another format version: convert it again
                    existing = None
                if existing is not None and self._matches(existing, kept) and \
                        existing.gate_resident == spec.gate_resident:
                    self.layouts[spec.name] = existing
                    return existing
                shutil.rmtree(out)
            if progress:
                progress(f"  converting {self.name} -> {spec.name}")
            self.layouts[spec.name] = convert(self.checkpoint, out, spec.layout, spec.storage_dtype, keep=kept,
                                              pruning=self.pruning if spec.pruned else None, placement=placement,
                                              gate_resident=spec.gate_resident, sha256=self.checkpoint_sha256)
        return self.layouts[spec.name]

    def placement(self, kept: list[np.ndarray] | None, hot: float) -> tuple[list[np.ndarray], dict]:
        """Per layer, the neurons in the order a placed layout stores them (`activations.placement_order`): the
        hybrid's `hot` fraction first, by activation count, then the rest by co-activation on the counting text's
        sample (by count where there is none), less those pruning leaves out; and how that order was chosen, for
        layout.json."""
        active = self.active or [None] * len(self.neuron_counts)
        order = [placement_order(row, hot, a) for row, a in zip(self.neuron_counts, active)]
        if kept is not None:
            order = [o[np.isin(o, k)] for o, k in zip(order, kept)]
        how = {"order": "activation count on the counting text, descending; ties by neuron id", "hot": hot}
        if self.active:
            how["cold"] = (f"after the hot {hot:.0%}: chains of neurons active together on {self.active_tokens:,} "
                           f"counting tokens (greedy path merging over each neuron's {NEIGHBOURS} most co-activated)")
        return order, how

    @property
    def checkpoint_sha256(self) -> str:
        """The checkpoint's hash (computed once: at paper scale it reads 13 GB), which every converted copy of it
        (flash layouts, a peer's GGUF) records as its origin."""
        if self._checkpoint_hash is None:
            self._checkpoint_hash = checkpoint_hash(self.checkpoint)
        return self._checkpoint_hash

    def _matches(self, layout: FlashLayout, kept: list[np.ndarray] | None) -> bool:
        if layout.origin.get("sha256") != self.checkpoint_sha256 or (layout.kept is None) != (kept is None):
            return False
        return kept is None or all(np.array_equal(a, b) for a, b in zip(layout.kept, kept))


def token_metrics(steps: list[TokenStats]) -> dict:
    """Per-token figures over decode steps: latency split (ms: mean, p50, p90; `io` is the reading the step waited
    for, `io_hidden` what the overlap's reads ahead ran behind compute, `io_cpu` the CPU time the reading took) and
    the reader's exact counters."""
    n = len(steps)
    total = sum(s.total_s for s in steps)
    io_s = sum(s.io.seconds for s in steps)
    bytes_read = sum(s.io.bytes_read for s in steps)
    reads = sum(s.io.reads for s in steps)
    ms = lambda f: spread([f(s) * 1e3 for s in steps])  # noqa: E731
    return {
        "tokens": n,
        "tokens_per_s": n / total if total else None,
        "ms": {"io": ms(lambda s: s.io_wait_s), "memory": ms(lambda s: s.memory_s),
               "predictor": ms(lambda s: s.predictor_s), "compute": ms(lambda s: s.compute_s),
               "total": ms(lambda s: s.total_s), "io_hidden": ms(lambda s: s.io_hidden_s),
               "io_cpu": ms(lambda s: s.io.cpu_s)},
        "per_token": {"bytes_read": bytes_read / n, "bytes_requested": sum(s.io.bytes_requested for s in steps) / n,
                      "reads": reads / n, "neurons": sum(s.io.records for s in steps) / n,
                      "neurons_multiplied": sum(s.multiplied for s in steps) / n,
                      "neurons_read_ahead": sum(s.read_ahead for s in steps) / n,
                      "neurons_read_ahead_used": sum(s.read_ahead_used for s in steps) / n},
        "totals": {"bytes_read": bytes_read, "reads": reads, "neurons": sum(s.io.records for s in steps)},
        "read_bandwidth_bytes_s": bytes_read / io_s if io_s else None,
        "mean_read_bytes": bytes_read / reads if reads else None,
        "direct": all(s.io.direct for s in steps),
        "window_shrinks": sum(s.window_shrinks for s in steps),
    }


def fio_reference(metrics: dict, threads: int, probe: Probe | None) -> dict | None:
    """The probe's bandwidth at our mean read size and reads in flight, fio's faster engine there (its `ioengine`
    says which), and our effective bandwidth's ratio to it."""
    if probe is None or not metrics["mean_read_bytes"]:
        return None
    ref = probe.reference(metrics["mean_read_bytes"], threads)
    if ref is None:
        return None
    ours = metrics["read_bandwidth_bytes_s"]
    return {"tool": ref.tool, "ioengine": ref.ioengine, "chunk_bytes": ref.chunk_bytes, "threads": ref.threads,
            "bandwidth_bytes_s": ref.bandwidth_bytes_s, "ratio": ours / ref.bandwidth_bytes_s if ours else None}


def _per_token(before: dict, after: dict, steps: int) -> dict:
    """The counters a SUT reports (cumulative), per decode step over the timed steps."""
    names = {"bytes_read": "bytes_read", "reads": "reads", "neurons_loaded": "neurons"}
    return {ours: (reported(after, k) - (reported(before, k) or 0)) / steps for k, ours in names.items()
            if reported(after, k) is not None}


def metrics_of(step_seconds: list[float], before: dict, after: dict) -> dict:
    """A configuration's figures: tokens/s and per-step times on the harness's clock; the SUT's own breakdown and
    counters beside them. A SUT that reports its decode steps in detail (the reference engine: `decode_steps`,
    token_metrics of its passes) gives every figure of the matrix table; any other gives what it reports."""
    steps = len(step_seconds)
    harness = {"tokens": steps, "tokens_per_s": steps / sum(step_seconds), "harness_ms": spread(
        [s * 1e3 for s in step_seconds])}
    own = after.get("decode_steps")
    if isinstance(own, dict):
        return own | harness | {"sut_tokens_per_s": own.get("tokens_per_s")}
    per_token = _per_token(before, after, steps)
    ms = after.get("ms_per_token") if isinstance(after.get("ms_per_token"), dict) else {}
    return harness | {"per_token": per_token, "ms": {k: {"mean": v} for k, v in ms.items()
                                                     if isinstance(v, (int, float))}}


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory() -> bool:
    """Hand the heap that closed SUTs freed back to the system (False where the C library cannot). glibc keeps freed
    blocks below its mmap threshold, which rises to 32 MiB as large blocks are freed (a 4096 x 4096 bfloat16 matrix
    is one), in its arenas: over the paper scenario the harness held 13 GB it no longer used when the peers started,
    and the kernel killed it as the mmap peer filled the page cache. So it is trimmed after each SUT closes."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def reads_every_neuron(config: Configuration) -> bool:
    """Without the predictor a configuration reads every neuron it does not hold (naive, the hybrid alone): seconds
    a token at paper scale, a few tokens timed, and set beside naive by margins the disk's drift can turn over."""
    return "predictor" not in config.on


def measure(make_sut: Callable[[], SystemUnderTest], model: ModelUnderTest, config: Configuration,
            settings: Settings, probe: Probe | None, dram_budget: int, within_budget: bool = False,
            alternate_with_naive: bool = False) -> dict:
    """One configuration on one model, through the SUT interface, as `flashbench validate` measures: the harness
    owns the tokens, the clock (every decode step) and the verdicts; the SUT only computes, and what it reports of
    itself (counters, its own breakdown) is recorded as its own. With `dram_budget` the SUT is held to it (a
    configuration that cannot fit is recorded as such). With `alternate_with_naive`, a configuration that reads every
    neuron (without overlap) is timed beside a naive SUT loaded with it, their decode steps alternating token by token
    (which of the two goes first alternating too): its ratio to naive is then of the same minutes of the disk, not of
    two runs minutes apart."""
    record = {
        "model": model.name, "configuration": config.name, "techniques_on": sorted(config.on),
        "sections": list(config.sections), "prerequisites": list(config.prerequisites),
        "inactive": list(config.inactive), "exact": config.exact,
        "activation_source": model.source_label if "predictor" in config.on else "all neurons (no prediction)",
    }
    if why := config.not_applicable(model.dense_ffn):
        return record | {"status": "not-applicable", "error": why}
    tokens = model.tokens
    if reads_every_neuron(config) and model.whole_read_tokens:
        tokens = tokens[: model.whole_read_tokens]
    record["teacher_forced_tokens"] = len(tokens)
    record["dram_budget"] = dram_budget if within_budget else None
    ref = model.reference
    # Not with overlap: naive's steps beside an overlap SUT were slower in both paper runs that paired them (8.0 and
    # 7.0 s against 5.2-5.5 beside the others; docs/results.md, 2026-12-05, second session), which pairing them
    # outside a run did not reproduce: until that is understood, their ratio is to naive's own record.
    alternate = alternate_with_naive and reads_every_neuron(config) and bool(config.on) and "overlap" not in config.on
    raws = [make_sut()] + ([make_sut()] if alternate else [])
    sut, naive = Guarded(raws[0]), (Guarded(raws[1]) if alternate else None)
    try:
        hello = sut.hello()
        record["sut"] = hello
        sut.load(hello, model.checkpoint, dram_budget, "exact" if config.exact else "approximate",
                 ordered(config.on), run_settings(settings, within_budget))
        if naive is not None:
            naive.load(naive.hello(), model.checkpoint, dram_budget, "exact", (), run_settings(settings, within_budget))
            naive.prefill(tokens[:1])
            naive_before = naive.counters()
        logits = [sut.prefill(tokens[:1])]
        before, step_seconds, naive_seconds = sut.counters(), [], []
        for i, t in enumerate(tokens[1:-1]):  # the harness's clock around every decode step
            if naive is not None and i % 2 == 0:
                naive_seconds.append(_timed(naive.step, t)[1])
            out, seconds = _timed(sut.step, t)
            logits.append(out[None])
            step_seconds.append(seconds)
            if naive is not None and i % 2 == 1:
                naive_seconds.append(_timed(naive.step, t)[1])
        after = sut.counters()
        if naive is not None:  # naive's own breakdown of those steps: which of its parts the moments moved
            naive_metrics = metrics_of(naive_seconds, naive_before, naive.counters())
        verdict = None
        if ref is not None:
            got = greedy(sut, ref.prompt, len(ref.continuation.tokens)).tokens
            verdict = judge(ref, torch.cat(logits), got, None if config.exact else settings.approximate).as_dict()
    except SUTError as e:
        status = "does-not-fit" if isinstance(e.__cause__, BudgetError) else "sut-failed"
        return record | {"status": status, "error": str(e.__cause__ or e)}
    finally:
        for raw in raws:
            raw.close()
        return_freed_memory()
    metrics = metrics_of(step_seconds, before, after)
    fio = fio_reference(metrics, settings.threads, probe) if "mean_read_bytes" in metrics else None
    bound = (latency_bound(metrics, fio, model.rates, settings.compute_dtype, ModelConfig.load(model.checkpoint),
                           overlap="overlap" in config.on) if model.rates is not None else None)
    alternated = None if naive is None else {
        "tokens": len(naive_seconds), "speedup_over_naive": sum(naive_seconds) / sum(step_seconds),
        "naive": naive_metrics}
    return record | {
        "status": "measured",
        "engine": after.get("engine"), "layout": after.get("layout"),
        "metrics": metrics,
        "alternated_with_naive": alternated,
        "fio_reference": fio,
        "bound": bound,
        "dram": after.get("dram"),
        "sut_reported": {k: v for k, v in after.items() if k not in ("decode_steps", "engine", "layout", "dram")},
        "agreement": verdict if verdict is not None else {"not_applicable": model.no_reference},
    }


def _timed(step: Callable[[int], torch.Tensor], token: int) -> tuple[torch.Tensor, float]:
    """One decode step on the harness's clock."""
    t0 = time.perf_counter()
    out = step(token)
    return out, time.perf_counter() - t0


def run_settings(settings: Settings, within_budget: bool) -> dict:
    """The settings a SUT is loaded with: the scenario's [engine] table, and whether the DRAM budget binds it."""
    return {k: v for k, v in asdict(settings).items() if k != "approximate"} | {"within_budget": within_budget}
