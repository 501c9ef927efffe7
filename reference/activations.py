"""Recording the FFN activations (the ReLU outputs) of a model: the active sets the technique exploits."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .model import Transformer


@contextmanager
def recorded_activations(model: Transformer):
    """Yields a list that fills, per forward pass, with one ReLU-output tensor per layer (in layer order)."""
    seen: list[torch.Tensor] = []
    hooks = [block.ffn.act.register_forward_hook(lambda _m, _i, out: seen.append(out)) for block in model.layers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@torch.inference_mode()
def activation_counts(model: Transformer, tokens: list[int], context: int, bos: int | None = None) -> tuple[np.ndarray, int]:
    """Per layer and neuron, on how many tokens of `tokens` its ReLU output was non-zero: [n_layers, d_ffn], and
    the number of positions seen. The text is cut into windows of `context` positions (each starting with `bos`
    if given), as at inference."""
    step = context - (bos is not None)
    counts = torch.zeros(model.config.n_layers, model.config.d_ffn, dtype=torch.int64)
    positions = 0
    device = next(model.parameters()).device
    for start in range(0, len(tokens), step):
        window = tokens[start : start + step]
        ids = torch.tensor([([bos] if bos is not None else []) + window], device=device)
        with recorded_activations(model) as acts:
            model(ids)
        for layer, a in enumerate(acts):
            counts[layer] += (a[0] > 0).sum(0).cpu()
        positions += ids.shape[1]
    return counts.numpy(), positions


def active_fraction(model: Transformer, tokens: list[int], context: int, bos: int | None = None) -> list[float]:
    """Per layer, the mean fraction of FFN neurons with a non-zero ReLU output over the tokens of `tokens`."""
    counts, positions = activation_counts(model, tokens, context, bos)
    return (counts.sum(1) / (positions * model.config.d_ffn)).tolist()


def hot_neurons(counts: np.ndarray, fraction: float) -> list[np.ndarray]:
    """Per layer, the `fraction` of neurons most often active (ties broken by id), sorted: the hybrid's set."""
    n = int(round(fraction * counts.shape[1]))
    return [np.sort(np.argsort(-row, kind="stable")[:n]).astype(np.int64) for row in counts]


def ever_active(counts: np.ndarray) -> list[np.ndarray]:
    """Per layer, the neurons active at least once: what dead-neuron pruning keeps."""
    return [np.flatnonzero(row).astype(np.int64) for row in counts]
