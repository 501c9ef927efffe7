"""Paper-scale synthetic models: seeded random weights at the real dimensions of OPT 1.3B / 6.7B and Llama 2 7B.

Their weights are random, so their own activations mean nothing; which neurons each token needs comes from a
trace (traces.py) with a stated profile. They measure I/O, memory management and compute at the paper's scale;
agreement is judged on the embedded models, which are real.

Tensors are made one at a time from (name, seed), so a 13 GB model never sits in memory: written as an HF
checkpoint (which the peers load), or straight into a flash layout, bit for bit what converting that checkpoint
would give.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from flashbench.reference import ModelConfig
from flashbench.reference.checkpoint import expected_shapes, save_checkpoint_streaming
from flashbench.reference.errors import FlashbenchError
from flashbench.reference.layout import FlashLayout, write_layout
from flashbench.suite.models import byte_tokenizer
from flashbench.suite.models.byte_tokenizer import BOS, EOS, PAD

SHAPES = {
    "opt-1.3b": ModelConfig(arch="opt", vocab_size=50272, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32,
                            d_ffn=8192, max_positions=2048, tie_embeddings=True),
    "opt-6.7b": ModelConfig(arch="opt", vocab_size=50272, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                            d_ffn=16384, max_positions=2048, tie_embeddings=True),
    "llama-2-7b": ModelConfig(arch="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                              d_ffn=11008, max_positions=4096, tie_embeddings=False),
}
INIT_STD = 0.02


def shape_config(shape: str) -> ModelConfig:
    if shape not in SHAPES:
        raise FlashbenchError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    # Byte-level token ids are valid in every vocabulary here; the special ids are ours.
    return ModelConfig(**(SHAPES[shape].as_dict() | {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}))


def weight_bytes(config: ModelConfig, element_bytes: int = 2) -> int:
    return sum(int(torch.Size(s).numel()) for s in expected_shapes(config).values()) * element_bytes


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The same tensor for the same (name, seed), whatever order tensors are made in."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g) * INIT_STD


def write_synthetic(shape: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A seeded random-weight HF checkpoint of `shape`, written tensor by tensor."""
    return write_random_checkpoint(shape_config(shape), out_dir, seed, dtype)


def write_random_checkpoint(config: ModelConfig, out_dir: str | Path, seed: int = 0,
                            dtype: torch.dtype = torch.float16) -> Path:
    shapes = expected_shapes(config)
    return save_checkpoint_streaming(out_dir, config, lambda name: random_tensor(name, shapes[name], seed), dtype,
                                     tokenizer=byte_tokenizer.write)


def write_random_layout(config: ModelConfig, out_dir: str | Path, seed: int = 0, layout: str = "bundled",
                        origin: dict | None = None, progress=None) -> FlashLayout:
    """The fp16 flash layout of the seeded random model, written straight from the generator: each tensor is
    rounded to fp16 as the checkpoint stores it, so the files equal those converted from that checkpoint."""
    shapes = expected_shapes(config)
    origin = (origin or {}) | {"synthetic": True, "seed": seed, "init_std": INIT_STD}
    return write_layout(config, lambda name: random_tensor(name, shapes[name], seed).to(torch.float16), origin,
                        out_dir, layout, "float16", progress)
