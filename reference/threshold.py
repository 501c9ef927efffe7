"""Thresholded sparsity for SiLU-gated FFNs (CATS, Lee et al. 2024): a SiLU FFN made sparse on purpose.

A SiLU FFN's activations are never exactly zero, so nothing can be skipped. CATS zeroes every activation
SiLU(gate x) whose magnitude is at most a per-layer threshold t, calibrated so that a target fraction of them
(the target sparsity) falls below it on calibration text. The FFN becomes

    down((SiLU(gate x) * [|SiLU(gate x)| > t]) * up x)

and its active set {i : |SiLU(gate_i x)| > t} is what the flash techniques read. This changes the model: a
thresholded configuration is lossy, judged against the unthresholded dense model at the approximate tier.

The gate row decides the set, so it must be known before the up and down rows are read: the oracle source holds
every layer's gate matrix in DRAM (CATS's own kernel: the gate is computed densely, up and down only for the
active neurons), the predictor source guesses the set from the FFN input, and the engine reads each active
neuron's gate, up and down rows and applies the threshold to the gate it read.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .activations import context_windows
from .model import Transformer

# Calibration tokens: the thresholds are quantiles of |SiLU(gate x)| over this many tokens' activations per layer
# (tokens x d_ffn values; 8192 x 1024 for the embedded models).
CALIBRATION_TOKENS = 8192


def active(gate_pre: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which neurons a thresholded SiLU keeps: |SiLU(gate x)| > t (a boolean tensor of gate_pre's shape)."""
    return F.silu(gate_pre).abs() > threshold


class ThresholdedSiLU(nn.Module):
    """SiLU with every output of magnitude at most `threshold` set to exactly zero. A module, like the FFN's own
    activation, so that its output (zeros included) is hooked by activation counts and predictor training."""

    def __init__(self, threshold: float, calibration: str = ""):
        super().__init__()
        self.threshold = float(threshold)
        self.calibration = calibration  # how it was calibrated (`calibration_key`), for what depends on it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(x)
        return y.masked_fill(y.abs() <= self.threshold, 0.0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}"


def check_target(target: float) -> float:
    """A target sparsity must be a fraction in [0, 1)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"threshold target sparsity must be a fraction in [0, 1), got {target!r}")
    return float(target)


@torch.inference_mode()
def calibrate(model: Transformer, tokens: list[int], targets: list[float],
              bos: int | None = None) -> dict[float, list[float]]:
    """Per target sparsity, per layer, the threshold t below which that fraction of |SiLU(gate x)| lies over
    `tokens` (cut into the model's context windows, as at inference): {target: [t per layer]}."""
    if model.config.activation != "silu" or not model.config.gated:
        raise ValueError(f"thresholding is for SiLU-gated FFNs; this model's FFN is {model.config.activation}"
                         f"{' gated' if model.config.gated else ''}")
    targets = [check_target(t) for t in targets]
    magnitudes: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = [block.ffn.act.register_forward_hook(lambda _m, _i, out, i=i: magnitudes[i].append(out[0].abs().float()))
             for i, block in enumerate(model.layers)]
    device = next(model.parameters()).device
    try:
        for window in context_windows(tokens, model.config.max_positions, bos):
            model(torch.tensor([window], device=device))
    finally:
        for h in hooks:
            h.remove()
    out: dict[float, list[float]] = {t: [] for t in targets}
    for layer in magnitudes:
        values = torch.cat(layer).flatten()
        for t in targets:
            k = math.floor(t * values.numel())  # the k smallest magnitudes are at most the threshold
            out[t].append(0.0 if k == 0 else values.kthvalue(k).values.item())
    return out


def calibration_key(target: float, tokens: list[int]) -> str:
    """What calibrated thresholds are made from, besides the checkpoint and its precision: the target and the exact
    calibration tokens. Activation counts and predictors of a thresholded model are keyed by it, not by the
    thresholds' last bits, which another CPU's kernels may round differently."""
    digest = hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()
    return f"target sparsity {target!r} calibrated on {len(tokens)} tokens (sha256 {digest})"


def thresholded(model: Transformer, thresholds: list[float], calibration: str = "") -> Transformer:
    """`model` (in place) with each layer's SiLU thresholded at its t: the dense thresholded model. `calibration`
    (`calibration_key`) says how the thresholds were made."""
    if len(thresholds) != len(model.layers):
        raise ValueError(f"{len(thresholds)} thresholds for {len(model.layers)} layers")
    for block, t in zip(model.layers, thresholds):
        block.ffn.act = ThresholdedSiLU(t, calibration)
    return model


def threshold_at(model: Transformer, tokens: list[int], target: float, bos: int | None = None) -> list[float]:
    """`model` thresholded in place at `target` sparsity, calibrated on `tokens` (and keyed by them, as
    `calibration_key` says); its per-layer thresholds."""
    thresholds = calibrate(model, tokens, [target], bos)[target]
    thresholded(model, thresholds, calibration_key(target, tokens))
    return thresholds


def unthresholded(model: Transformer) -> Transformer:
    """`model` (in place) with its plain SiLU back."""
    for block in model.layers:
        block.ffn.act = nn.SiLU()
    return model
