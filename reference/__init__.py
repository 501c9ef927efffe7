"""flashbench.reference: the reference implementation (model, engines, flash layout), usable as a library."""

from .config import ModelConfig
from .engine import Engine, Generation, Sampling, generate
from .errors import BudgetError, CheckpointError, FlashbenchError, LayoutError
from .model import KVCache, Transformer

__all__ = ["BudgetError", "CheckpointError", "Engine", "FlashbenchError", "Generation", "KVCache", "LayoutError",
           "ModelConfig", "Sampling", "Transformer", "generate"]
