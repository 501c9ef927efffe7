"""Activation sources: which neurons of a layer a token needs, decided before its FFN runs.

- `oracle`: the exact active set, computed from the up (or gate) projection held in DRAM. For validation only:
  it needs those weights resident, which defeats the purpose, and every report labels it so.
- `trace`: replays recorded or generated sets, for synthetic paper-scale models.
- `all`: every neuron, every token: the naive baseline.
The real `predictor` source lives in predictor.py.

Each source also guesses, from layer L's FFN input, the sets of layer L+1 (`lookahead`), most confident first, so
that the overlap technique can read the likeliest while layer L computes: `all` knows them (every neuron), the
oracle applies layer L+1's rows to layer L's input (the residual stream changes little from one layer to the next,
as Deja Vu observed), a trace replays guesses drawn with it, and the predictor has a lookahead predictor of its
own. A guess only decides what is read early: what is read late (the misses) and what the layer multiplies come
from its own sets.
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

    def lookahead(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        """Per token of x [T, d] (layer `layer`'s FFN input), a guess of the ids layer + 1 will need, most
        confident first."""
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

    lookahead = sets  # exact: every neuron again

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

    def _active(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """The pre-activations [T, n] and which are active."""
        pre = x @ self.weights[layer].t()
        if self.biases[layer] is not None:
            pre = pre + self.biases[layer]
        active = pre > 0 if self.thresholds is None else threshold.active(pre, self.thresholds[layer])
        return pre, active.cpu().numpy()

    def sets(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        _, active = self._active(layer, x)
        return [np.sort(self.ids[layer][np.flatnonzero(row)]) for row in active]  # a placed layout's ids: any order

    def lookahead(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        """Layer + 1's rule on this layer's input, the largest pre-activations first."""
        pre, active = self._active(layer + 1, x)
        pre = pre.float().cpu().numpy()
        out = []
        for row, on in zip(pre, active):
            rows = np.flatnonzero(on)
            out.append(self.ids[layer + 1][rows[np.argsort(-row[rows], kind="stable")]])
        return out

    def reset(self) -> None:
        pass

    def on(self, device: torch.device) -> "Oracle":
        self.weights = [w.to(device) for w in self.weights]
        self.biases = [b.to(device) if b is not None else None for b in self.biases]
        return self


class Trace:
    """Replays sets: `sets[token][layer]` for the tokens in order (prefill tokens first), and with `ahead` the
    lookahead's guesses, `ahead[token][layer]` for that layer (layer 0's unused)."""

    name = "trace"
    nbytes = 0

    def __init__(self, sets: list[list[np.ndarray]], ahead: list[list[np.ndarray]] | None = None):
        self.trace, self.ahead = sets, ahead
        self.reset()

    def reset(self) -> None:
        self.position = [0] * (len(self.trace[0]) if self.trace else 0)

    def sets(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        start = self.position[layer]
        if start + x.shape[0] > len(self.trace):
            raise IndexError(f"trace exhausted: {len(self.trace)} tokens recorded, token {start + x.shape[0]} asked")
        self.position[layer] = start + x.shape[0]
        return [np.asarray(self.trace[t][layer], dtype=np.int64) for t in range(start, start + x.shape[0])]

    def lookahead(self, layer: int, x: torch.Tensor) -> list[np.ndarray]:
        if self.ahead is None:
            raise ValueError("this trace has no lookahead guesses (suite.traces.lookahead makes them)")
        start = self.position[layer + 1]
        return [np.asarray(self.ahead[t][layer + 1], dtype=np.int64)
                for t in range(start, min(start + x.shape[0], len(self.ahead)))]

    def on(self, device: torch.device) -> "Trace":
        return self
