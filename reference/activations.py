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
def activation_counts(model: Transformer, tokens: list[int], context: int, bos: int | None = None) -> tuple[np.ndarray, int]:
    """Per layer and neuron, on how many tokens of `tokens` its activation (ReLU, or a thresholded SiLU) was
    non-zero: [n_layers, d_ffn], and the number of positions seen, over `context_windows`."""
    counts = torch.zeros(model.config.n_layers, model.config.d_ffn, dtype=torch.int64)
    positions = 0
    device = next(model.parameters()).device
    for window in context_windows(tokens, context, bos):
        ids = torch.tensor([window], device=device)
        with recorded_activations(model) as acts:
            model(ids)
        for layer, a in enumerate(acts):
            counts[layer] += (a[0] != 0).sum(0).cpu()  # ReLU: > 0; a thresholded SiLU: either sign
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
