"""Target sparsity against agreement and bytes read: a SiLU model thresholded (CATS) at each target, beside the
unthresholded naive run of the same invocation.

For each target the thresholds are calibrated on training text, then the flash engine is teacher-forced over
held-out text one token at a time with the thresholded active sets, and judged against the unthresholded dense
model (the approximate tier's teacher-forced limits). The sets come from the oracle: the gate rows held in DRAM
(a gate-resident layout) decide them exactly, as CATS's kernel computes the gate densely, so the bytes per token
are the active neurons' up and down rows, with no predictor's misses or extras. The naive row reads every neuron's
gate, up and down rows from a layout of all three, and is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashbench.reference import Engine, Transformer
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import FlashLayout
from flashbench.reference.threshold import calibrate

from .agreement import APPROXIMATE, agreement, checks, teacher_forced
from .measure import token_metrics


@dataclass(frozen=True)
class ThresholdPoint:
    target_sparsity: float | None  # None: the unthresholded naive run
    measured_sparsity: float  # held-out: the fraction of FFN neurons zero per token, over layers
    thresholds: list[float]
    top1_agreement: float
    perplexity_ratio: float
    mean_kl: float
    max_abs_logit_diff: float
    passed: bool  # within the approximate tier's teacher-forced limits
    bytes_per_token: float  # FFN bytes read per decode step (whole blocks, as the device reads them)
    requested_per_token: float  # the records' own bytes: what a device with no block granularity would read
    neurons_per_token: float
    gate_resident_bytes: int  # DRAM the gate rows take to decide the set (0 for naive)
    total_ms: float


def threshold_sweep(model: Transformer, flash: FlashLayout, gate_resident: FlashLayout, targets: list[float],
                    calibration: list[int], tokens: list[int], bos: int | None, threads: int = 16,
                    progress=print) -> list[ThresholdPoint]:
    """The naive point (on `flash`), then one per target (on `gate_resident`, the same weights with the gates in
    DRAM); `model` is the dense model (unthresholded)."""
    dense_logits = teacher_forced(Engine(model), tokens)
    targets_of = tokens[1:]
    thresholds = calibrate(model, calibration, targets, bos)
    c = flash.config
    runs = [(None, flash, Techniques.naive(threads=threads), None)] + [
        (t, gate_resident, Techniques(source="oracle", threshold=t, threads=threads), thresholds[t]) for t in targets]
    gate_bytes = c.n_layers * c.d_ffn * c.d_model * next(model.parameters()).dtype.itemsize
    points = []
    for target, layout, techniques, layer_thresholds in runs:
        with FlashEngine(layout, techniques, thresholds=layer_thresholds) as engine:
            logits = teacher_forced(engine, tokens)
        m = token_metrics(engine.history[1:])  # decode steps only
        a = agreement(dense_logits, logits, targets_of)
        multiplied = sum(s.multiplied for s in engine.history[1:]) / len(engine.history[1:])
        point = ThresholdPoint(
            target_sparsity=target, measured_sparsity=1 - multiplied / (c.n_layers * c.d_ffn),
            thresholds=layer_thresholds or [], top1_agreement=a.top1_agreement, perplexity_ratio=a.perplexity_ratio,
            mean_kl=a.mean_kl, max_abs_logit_diff=a.max_abs_logit_diff,
            passed=all(check.passed for check in checks(a, None, APPROXIMATE)),
            bytes_per_token=m["per_token"]["bytes_read"], requested_per_token=m["per_token"]["bytes_requested"],
            neurons_per_token=m["per_token"]["neurons"],
            gate_resident_bytes=gate_bytes if target is not None else 0, total_ms=m["ms"]["total"]["mean"])
        points.append(point)
        if progress:
            progress(format_point(point, points[0]))
    return points


HEADER = ("target  measured  top-1   ppl ratio       KL   max |dlogit|  verdict   KiB/token  vs naive  "
          "(records)  gate in DRAM  ms/token")


def format_point(p: ThresholdPoint, naive: ThresholdPoint) -> str:
    target = "naive " if p.target_sparsity is None else f"{p.target_sparsity:6.0%}"
    return (f"{target}  {p.measured_sparsity:8.1%}  {p.top1_agreement:5.1%}  {p.perplexity_ratio:10.4f}  "
            f"{p.mean_kl:7.4f}  {p.max_abs_logit_diff:13.4f}  {'PASS' if p.passed else 'FAIL':7s}  "
            f"{p.bytes_per_token / 1024:10.1f}  {p.bytes_per_token / naive.bytes_per_token:8.1%}  "
            f"({p.requested_per_token / naive.requested_per_token:7.1%})  "
            f"{p.gate_resident_bytes / 2**20:9.2f} MiB  {p.total_ms:8.2f}")
