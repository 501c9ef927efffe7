"""flashbench.reference: the reference implementation (model, engines, flash layout), usable as a library."""

from .config import CheckpointError, ModelConfig
from .engine import Engine, Generation, Sampling, generate
from .model import KVCache, Transformer

__all__ = ["CheckpointError", "Engine", "Generation", "KVCache", "ModelConfig", "Sampling", "Transformer", "generate"]
