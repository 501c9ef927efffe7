"""Activation sources: which neurons of a layer a token needs, decided before its FFN runs.

- `oracle`: the exact active set, computed from the up (or gate) projection held in DRAM. For validation only:
  it needs those weights resident, which defeats the purpose, and every report labels it so.
- `trace`: replays recorded or generated sets, for synthetic paper-scale models.
- `all`: every neuron, every token: the naive baseline.
The real `predictor` source lives in predictor.py.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from . import threshold


class ActivationSource(Protocol):
    name: str
    nbytes: int  # DRAM the source holds

    def sets(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        """Per token of x [T, d] (the FFN input), the sorted neuron ids it needs."""
        ...

    def reset(self) -> None:
        """A new sequence starts."""
        ...

    def on(self, device: torch.device) -> "ActivationSource":
        """The source with what it computes with on `device` (the engine's); its sets are ids on the host."""
        ...


class AllNeurons:
    name = "all"
    nbytes = 0

    def __init__(self, d_ffn: int):
        self.every = np.arange(d_ffn, dtype=np.int64)

    def sets(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        return [self.every] * x.shape[0]

    def reset(self) -> None:
        pass

    def on(self, device: torch.device) -> "AllNeurons":
        return self


class Oracle:
    """Exact active sets: neurons whose ReLU input is positive, or with `thresholds` (a thresholded SiLU FFN) those
    with |SiLU(gate x)| above their layer's threshold. `weights[layer]` is the up projection (the gate for gated
    FFNs) as stored, [n, d]; `biases[layer]` its bias or None; `ids[layer]` the neuron id of each row (default: row i
    is neuron i)."""

    name = "oracle"

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                 ids: list[np.ndarray] | None = None, thresholds: list[float] | None = None):
        self.weights, self.biases, self.thresholds = weights, biases, thresholds
        self.ids = ids or [np.arange(len(w)) for w in weights]
        self.nbytes = sum(w.nbytes for w in weights) + sum(b.nbytes for b in biases if b is not None)

    def sets(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        pre = x @ self.weights[layer].t()
        if self.biases[layer] is not None:
            pre = pre + self.biases[layer]
        active = pre > 0 if self.thresholds is None else threshold.active(pre, self.thresholds[layer])
        active = active.cpu().numpy()
        return [np.sort(self.ids[layer][np.flatnonzero(row)]) for row in active]  # a placed layout's ids: any order

    def reset(self) -> None:
        pass

    def on(self, device: torch.device) -> "Oracle":
        self.weights = [w.to(device) for w in self.weights]
        self.biases = [b.to(device) if b is not None else None for b in self.biases]
        return self


class Trace:
    """Replays sets: `sets[token][layer]` for the tokens in order (prefill tokens first)."""

    name = "trace"
    nbytes = 0

    def __init__(self, sets: list[list[np.ndarray]]):
        self.trace = sets
        self.reset()

    def reset(self) -> None:
        self.position = [0] * (len(self.trace[0]) if self.trace else 0)

    def sets(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        start = self.position[layer]
        if start + x.shape[0] > len(self.trace):
            raise IndexError(f"trace exhausted: {len(self.trace)} tokens recorded, token {start + x.shape[0]} asked")
        self.position[layer] = start + x.shape[0]
        return [np.asarray(self.trace[t][layer], dtype=np.int64) for t in range(start, start + x.shape[0])]

    def on(self, device: torch.device) -> "Trace":
        return self
