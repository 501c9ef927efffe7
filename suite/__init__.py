"""flashbench.suite: what is measured: the embedded default models, the held-out text, (later) scenarios."""

from __future__ import annotations

from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent
MODELS_DIR = SUITE_DIR / "models"
HELDOUT_TEXT = SUITE_DIR / "data" / "heldout.txt"
RELU_MODELS = ("shakespeare-opt", "shakespeare-llama-relu")  # trained sparse (an L1 penalty on the ReLU outputs)
SILU_MODEL = "shakespeare-llama-silu"  # the same recipe with a SiLU-gated FFN and no penalty: for thresholding
EMBEDDED_MODELS = RELU_MODELS + (SILU_MODEL,)
DEFAULT_MODEL = EMBEDDED_MODELS[0]


def model_path(name_or_path: str | Path) -> Path:
    """An embedded model's folder by name, or any checkpoint folder by path."""
    if str(name_or_path) in EMBEDDED_MODELS:
        return MODELS_DIR / str(name_or_path)
    return Path(name_or_path)


def heldout_text() -> str:
    """Text never seen in training (two whole plays were held out), for agreement and perplexity checks."""
    return HELDOUT_TEXT.read_text(encoding="utf-8")
