"""Recording the FFN activations (the ReLU outputs) of a model: the active sets the technique exploits."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .layout import checkpoint_hash
from .model import Transformer

COUNTS_FILE = "activation_counts.safetensors"  # shipped beside an embedded checkpoint (see save_counts)
# Training tokens whose activations are counted: the hybrid's hot neurons and pruning's dead ones come from these,
# in the main job, `flashbench convert --prune-dead`, `window-sweep --prune-dead` and `model counts` alike.
COUNTS_TOKENS = 131072
# The first of them whose activations are kept per position, one bit each: the placed layout's co-activation order
# (180 MB for a 7B Llama's FFN). On shakespeare-opt (window 5, hybrid 25%, its predictor) 4096 tokens cut reads per
# token by 11% against the count order, 1024 by 8%.
COACTIVATION_TOKENS = 4096


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


def context_windows(tokens: list[int], context: int, bos: int | None) -> Iterator[list[int]]:
    """`tokens` cut into sequences of at most `context` positions, each starting with `bos` where the model's
    tokenizer has one, as at inference."""
    start = [bos] if bos is not None else []
    step = context - len(start)
    for i in range(0, len(tokens), step):
        yield start + tokens[i : i + step]


@torch.inference_mode()
def active_per_window(model: Transformer, tokens: list[int], context: int,
                      bos: int | None = None) -> Iterator[list[torch.Tensor]]:
    """Per window of `context_windows`, per layer, which neurons were active at each position: [t, d_ffn] bool
    (ReLU: > 0; a thresholded SiLU: either sign)."""
    device = next(model.parameters()).device
    for window in context_windows(tokens, context, bos):
        with recorded_activations(model) as acts:
            model(torch.tensor([window], device=device))
        yield [(a[0] != 0).cpu() for a in acts]


def activation_counts(model: Transformer, tokens: list[int], context: int, bos: int | None = None) -> tuple[np.ndarray, int]:
    """Per layer and neuron, on how many tokens of `tokens` its activation (ReLU, or a thresholded SiLU) was
    non-zero: [n_layers, d_ffn], and the number of positions seen, over `context_windows`."""
    counts = torch.zeros(model.config.n_layers, model.config.d_ffn, dtype=torch.int64)
    positions = 0
    for active in active_per_window(model, tokens, context, bos):
        for layer, a in enumerate(active):
            counts[layer] += a.sum(0)
        positions += len(active[0])
    return counts.numpy(), positions


def active_sample(model: Transformer, tokens: list[int], context: int, bos: int | None = None) -> list[np.ndarray]:
    """Per layer, which neurons were active at each position of `tokens`, as `coactivation_order` reads it: one bit
    per position and neuron, packed along positions ([ceil(positions / 8), d_ffn] uint8, `np.packbits(axis=0)`)."""
    windows = list(active_per_window(model, tokens, context, bos))
    return [np.packbits(torch.cat([w[layer] for w in windows]).numpy(), axis=0)
            for layer in range(model.config.n_layers)]


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


def counts_provenance(checkpoint: Path, model: Transformer, tokens: list[int], bos: int | None) -> dict[str, str]:
    """What activation counts depend on: the checkpoint, the precision it computes in, the exact counting tokens,
    the window (the model's context), the window's first token, and a thresholded SiLU's thresholds."""
    made = {"checkpoint_sha256": checkpoint_hash(Path(checkpoint)),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tokens_sha256": hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest(),
            "tokens": str(len(tokens)), "context": str(model.config.max_positions), "bos": str(bos)}
    if (key := thresholds_key(model)) is not None:
        made["thresholds"] = key
    return made


def thresholds_key(model: Transformer) -> str | None:
    """A thresholded SiLU's thresholds as what depends on them is keyed (how they were calibrated, or the values);
    None for an unthresholded model."""
    acts = [block.ffn.act for block in model.layers]
    if not any(hasattr(act, "threshold") for act in acts):  # threshold.ThresholdedSiLU
        return None
    return acts[0].calibration or ",".join(repr(act.threshold) for act in acts)


def save_counts(path: Path, counts: np.ndarray, provenance: dict[str, str]) -> None:
    """Counts with their provenance, written beside `path` and renamed into place. Shipping them with an embedded
    model spares every run the dense pass over the counting text (the better part of a minute on two cores)."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    save_file({"counts": torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))}, str(tmp), provenance)
    os.replace(tmp, path)


def load_counts(path: Path, provenance: dict[str, str]) -> np.ndarray | None:
    """The counts at `path` if they were made from exactly `provenance`; None if absent or made from anything
    else (another checkpoint, text, length or window), so that stale counts are recomputed, never used."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() != provenance:
                return None
            return f.get_tensor("counts").numpy()
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path}: not a readable activation-counts file ({e}); delete it to recount") from e


def dead_neuron_pruning(counts: np.ndarray, text: str, tokens: int) -> tuple[list[np.ndarray], dict]:
    """Pruning from activation counts [n_layers, d_ffn] on `tokens` tokens of `text` (where they came from): the
    neurons each layer keeps (those active at least once), and how they were chosen, for the layout and the record."""
    keep = ever_active(counts)
    return keep, {"rule": "never active on the counting text", "text": text, "tokens": tokens,
                  "dead_per_layer": [counts.shape[1] - len(k) for k in keep]}


def placement_order(counts: np.ndarray, hot: float, active: np.ndarray | None = None) -> np.ndarray:
    """One layer's neurons in the order a placed layout stores them. First the hybrid's hot neurons (the `hot`
    fraction most often active, as `hot_neurons` picks them), by activation count: one block, read once. Then the
    others: in co-activation order on the counting text where `active` (its bits, as `active_sample` packs them) is
    given (`coactivation_order`), so that a pass's delta coalesces into fewer reads; else by count too. Ties by
    id."""
    by_count = np.argsort(-counts, kind="stable").astype(np.int64)
    n = int(round(hot * len(counts)))
    if active is None:
        return by_count
    return np.concatenate([by_count[:n], coactivation_order(active, by_count[n:])])


# Candidate partners per neuron in `coactivation_order`: a chain needs two, more lets it route around placed ones.
NEIGHBOURS = 8


def coactivation_order(active: np.ndarray, neurons: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """`neurons` reordered so that neurons often active on the same tokens lie next to each other, as Ripple lays
    neurons out on phones: a predicted set then coalesces into fewer, longer reads. `active`: the layer's activations
    on the counting text, a bit per position and neuron packed along positions (`active_sample`); `neurons` in the
    order that breaks ties (most often active first).

    Greedy path merging, as for a travelling salesman: each neuron's `neighbours` most co-activated partners are the
    candidate edges; taken heaviest first, an edge joins two chains end to end where both neurons are ends of
    different chains. The chains are then laid out one after another, the one holding the earliest of `neurons`
    first, each walked from its end that comes first in `neurons`; a neuron never active with another is a chain of
    one, in its place."""
    m = len(neurons)
    k = min(neighbours, m - 1)
    a = torch.from_numpy(np.unpackbits(active[:, neurons], axis=0)).to(torch.float32)  # [T, m]; padding rows: 0
    if k < 1 or not a.any():
        return neurons
    heads, tails, weights = [], [], []
    for start in range(0, m, 2048):  # [block, m] co-activation counts at a time, not [m, m]
        block = a[:, start : start + 2048].T @ a
        rows = torch.arange(len(block))
        block[rows, start + rows] = 0  # not with itself
        w, j = block.topk(k, dim=1)
        heads.append((start + rows)[:, None].expand(-1, k).reshape(-1))
        tails.append(j.reshape(-1))
        weights.append(w.reshape(-1))
    i, j, w = (torch.cat(x).numpy() for x in (heads, tails, weights))
    lo, hi = np.minimum(i, j)[w > 0], np.maximum(i, j)[w > 0]
    w = w[w > 0]
    # each pair once, heaviest first, ties by position in `neurons`
    order = np.lexsort((hi, lo, -w))
    pairs = np.unique(np.stack([lo[order], hi[order]], 1), axis=0, return_index=True)[1]
    order = order[np.sort(pairs)]
    chain = np.arange(m)  # union-find: the chain each neuron is in
    degree = np.zeros(m, np.int8)
    links = [[] for _ in range(m)]

    def root(x: int) -> int:
        while chain[x] != x:
            chain[x] = chain[chain[x]]
            x = chain[x]
        return x

    for x, y in zip(lo[order].tolist(), hi[order].tolist()):
        if degree[x] < 2 and degree[y] < 2 and (rx := root(x)) != (ry := root(y)):
            chain[max(rx, ry)] = min(rx, ry)
            degree[x] += 1
            degree[y] += 1
            links[x].append(y)
            links[y].append(x)
    roots = np.array([root(x) for x in range(m)])
    ends: dict[int, int] = {}  # each chain's end that comes first in `neurons`
    for x in np.flatnonzero(degree < 2).tolist():
        ends.setdefault(int(roots[x]), x)
    out, placed = [], np.zeros(m, bool)
    for first in range(m):  # the chains in the order of their earliest neuron
        if placed[first]:
            continue
        previous, x = -1, ends[int(roots[first])]
        while x != -1:
            out.append(x)
            placed[x] = True
            previous, x = x, next((y for y in links[x] if y != previous), -1)
    return neurons[np.array(out)]
