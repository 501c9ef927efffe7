"""The transformer shared by the dense and the flash engines: OPT, and Llama (Mistral, Qwen2) with a gated FFN.

Everything here is ordinary dense PyTorch. The FFN is the seam: each `Block` calls `self.ffn(x)`, and the flash
engine swaps that module for one that loads only the active neurons from flash. Attention, norms, positions and
the KV cache are reused unchanged, which is what makes the dense engine the ground truth for the flash one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import row_kernels
from .checkpoint import load_state_dict
from .config import ModelConfig

OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (a fairseq legacy)


class KVCache:
    """Preallocated keys and values for every layer; `length` is how many positions are filled."""

    def __init__(self, config: ModelConfig, max_len: int, batch: int = 1, device=None, dtype=torch.float32):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position, [max_positions, head_dim], as Llama's rotate-half convention needs. On the CPU
    even within torch's meta device (`Transformer.for_assignment`): arange there imports sympy and some 800 other
    modules, about 70 MiB that a flash engine under a DRAM cap would carry."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    freqs = torch.outer(torch.arange(config.max_positions, dtype=torch.float32, device="cpu"), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


MATVEC = ("linear", "mv", "rows")  # how a product of one position with a weight matrix runs


def check_matvec(matvec: str, compute_dtype: str, device: str) -> None:
    """Refuse "rows" where it cannot run: the C kernel multiplies 16-bit weights on the CPU only."""
    if matvec == "rows" and (compute_dtype == "float32" or device != "cpu"):
        raise ValueError(f"matvec \"rows\" multiplies 16-bit weights on the CPU, not {compute_dtype} on {device}")


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, matvec: str = "linear") -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., d]; with one position, by another kernel if `matvec` says: "mv", a
    matrix-vector product (torch.addmv), or "rows", this project's C kernel for 16-bit weights on the CPU
    (`row_kernels.up`, float32 sums; F.linear for other weights). The same sums by other kernels, whose speed depends
    on the CPU and the dtype (bfloat16 on an Intel Xeon with AMX: mv 24, linear 21 GB/s, float16 7 against 14; on
    one without AMX, mv 6, rows 21). The probe measures each (harness/compute.py); the engine says which it uses
    (`Techniques.matvec`)."""
    if x.numel() == x.shape[-1] and (matvec == "mv" or matvec == "rows" and row_kernels.serves(weight)):
        one = x.reshape(-1)
        if matvec == "rows":
            y = row_kernels.up(one, weight, None, bias)
        else:
            y = torch.mv(weight, one) if bias is None else torch.addmv(bias, weight, one)
        return y.view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose one-position products run as `matvec` says (`project`); set by `Transformer.use_matvec`."""

    matvec = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias, self.matvec)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.q = Linear(d, d, bias=config.qkv_bias)
        self.k = Linear(d, kv, bias=config.qkv_bias)
        self.v = Linear(d, kv, bias=config.qkv_bias)
        self.o = Linear(d, d, bias=config.out_bias)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope = config.arch == "llama"

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None, layer: int, rope=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = (t[start : start + T].to(q.dtype) for t in rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            k, v = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
        mask = None
        if T > 1 and start > 0:  # a chunk after earlier positions: query i sees keys up to start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=(T > 1 and start == 0), enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def activation(config: ModelConfig) -> nn.Module:
    """The FFN's activation, a module of its own so that its output can be hooked (its non-zero entries, with ReLU,
    are the layer's active set)."""
    return nn.ReLU() if config.activation == "relu" else nn.SiLU()


class FFN(nn.Module):
    """The dense FFN: down(act(up x)) for OPT, down(act(gate x) * up x) for the Llama family; act is ReLU or
    SiLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.d_model, config.d_ffn
        self.up = Linear(d, f, bias=config.bias)
        self.gate = Linear(d, f, bias=config.bias) if config.gated else None
        self.down = Linear(f, d, bias=config.bias)
        self.act = activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


class Embedding(nn.Embedding):
    """nn.Embedding, left uninitialised on the meta device (`Transformer.for_assignment`): torch's normal_ there
    imports sympy and the rest, as `rope_tables` says."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ffn: nn.Module):
        super().__init__()
        norm = (lambda: nn.LayerNorm(config.d_model, eps=config.norm_eps)) if config.arch == "opt" else (
            lambda: RMSNorm(config.d_model, config.norm_eps)
        )
        self.attn_norm, self.attn = norm(), Attention(config)
        self.ffn_norm, self.ffn = norm(), ffn

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None, layer: int, rope=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start, cache, layer, rope)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, ffn: Callable[[int], nn.Module] | None = None):
        """`ffn(layer)` makes each layer's FFN module: the dense `FFN` by default, the flash engine's otherwise."""
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.d_model)
        if config.arch == "opt":
            self.pos_embed = Embedding(config.max_positions + OPT_POSITION_OFFSET, config.d_model)
            self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        else:
            self.final_norm = RMSNorm(config.d_model, config.norm_eps)
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        ffn = ffn or (lambda _layer: FFN(config))
        self.layers = nn.ModuleList(Block(config, ffn(i)) for i in range(config.n_layers))
        self.lm_head = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        self.matvec = "linear"

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T] that follow the `cache.length` positions already cached."""
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_positions or (cache is not None and start + T > cache.max_len):
            limit = min(self.config.max_positions, cache.max_len if cache is not None else self.config.max_positions)
            raise ValueError(f"sequence of {start + T} positions exceeds the limit of {limit}")
        x = self.embed(tokens)
        rope = None
        if self.config.arch == "opt":
            positions = torch.arange(start, start + T, device=tokens.device) + OPT_POSITION_OFFSET
            x = x + self.pos_embed(positions)
        else:
            rope = (self.rope_cos, self.rope_sin)
        for i, block in enumerate(self.layers):
            x = block(x, start, cache, i, rope)
        if cache is not None:
            cache.length = start + T
        x = self.final_norm(x)
        return project(x, self.embed.weight, None, self.matvec) if self.lm_head is None else self.lm_head(x)

    def use_matvec(self, matvec: str) -> None:
        """Run one position's products (attention, the dense FFN, the LM head) as `matvec` says (MATVEC)."""
        if matvec not in MATVEC:
            raise ValueError(f"matvec must be one of {', '.join(MATVEC)}, got {matvec!r}")
        self.matvec = matvec
        for module in self.modules():
            if isinstance(module, Linear):
                module.matvec = matvec

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, max_len or self.config.max_positions, batch, device=p.device, dtype=p.dtype)

    @classmethod
    def for_assignment(cls, config: ModelConfig, ffn: Callable[[int], nn.Module] | None = None) -> "Transformer":
        """A model whose weights will all come from `load_state_dict(..., assign=True)`, with FFNs `ffn(layer)` (the
        dense `FFN` by default): the weights are built on torch's meta device, never initialised (that takes seconds
        at paper scale); its computed buffers (RoPE tables) are real, made on the CPU."""
        with torch.device("meta"):
            model = cls(config, ffn=lambda _layer: None) if ffn is not None else cls(config)
        if ffn is not None:
            for i, block in enumerate(model.layers):
                block.ffn = ffn(i)
        return model

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Transformer":
        """Load an HF checkpoint; weights in any stored float dtype are held and computed in `dtype`."""
        config = ModelConfig.load(checkpoint_dir)
        state = load_state_dict(checkpoint_dir, config)
        model = cls(config)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        return model.to(device=device, dtype=dtype).eval()
