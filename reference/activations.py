"""Recording the FFN activations (the ReLU outputs) of a model: the active sets the technique exploits."""

from __future__ import annotations

from contextlib import contextmanager

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
def active_fraction(model: Transformer, tokens: list[int], context: int, bos: int | None = None) -> list[float]:
    """Per layer, the mean fraction of FFN neurons with a non-zero ReLU output, over the tokens of `tokens`.

    The text is cut into windows of `context` positions (each starting with `bos` if given), as at inference.
    """
    step = context - (bos is not None)
    active = torch.zeros(model.config.n_layers, dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    for start in range(0, len(tokens), step):
        window = tokens[start : start + step]
        ids = torch.tensor([([bos] if bos is not None else []) + window], device=device)
        with recorded_activations(model) as acts:
            model(ids)
        for layer, a in enumerate(acts):
            active[layer] += (a[0] > 0).double().mean(-1).sum().cpu()
        count += ids.shape[1]
    return (active / count).tolist()
