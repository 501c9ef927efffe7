"""llama.cpp as a peer: what people run today when a model is larger than DRAM, through `llama-cpp-python`.

The checkpoint is converted to GGUF once (at the storage precision our engine reads, cached beside the flash
layouts and keyed by the checkpoint's hash), then llama.cpp decodes from it as its users run it: weights
memory-mapped (its default), the page cache dropped first, inside the same memory cgroup as the other peers, its
threads set to the machine's cores, timed per token with the same clock. Where llama.cpp's FFN differs from the
checkpoint's (llama.cpp applies SiLU to every Llama, so a ReLU-gated one computes another function), the record
says so and the peer counts for speed only; on a SiLU checkpoint its teacher-forced logits are a second independent
check of the dense path (`transformers` is the first), compared with dense inference by the caller.

Only what llama.cpp's own architectures compute the same way is converted: Llama and Mistral as GGUF "llama"
(q and k rows permuted from Hugging Face's rotate-half RoPE to llama.cpp's interleaved one, as llama.cpp's
convert_hf_to_gguf.py does), Qwen2 as "qwen2". The vocabulary is left out ("none"): the peer is given token ids,
the same ones every engine here is given, so llama.cpp's tokenizer plays no part.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flashbench.reference.config import ModelConfig
from flashbench.reference.errors import FlashbenchError
from flashbench.reference.layout import TensorSource

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # our model_type -> llama.cpp's architecture
GGUF_DTYPES = ("float32", "float16", "bfloat16")
ORIGIN_KEY = "flashbench.origin.sha256"  # the checkpoint a cached GGUF was converted from


class NotRunnable(FlashbenchError):
    """llama.cpp cannot run this checkpoint (its architecture, a missing package): a peer record says why."""


def speed_only(config: ModelConfig) -> str | None:
    """Why llama.cpp's outputs are not comparable with the checkpoint's (None where they are)."""
    if config.activation != "silu":
        return (f"llama.cpp's {GGUF_ARCH[config.model_type]} FFN applies SiLU, this checkpoint's applies "
                f"{config.activation}: it computes another function, so it counts for speed only")
    return None


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k from rotate-half RoPE order (the first half of each head's dims, then the second) to
    interleaved pairs, which llama.cpp's "llama" rotates."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_names(config: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
                 "ffn.gate.weight": "ffn_gate.weight", "ffn.up.weight": "ffn_up.weight",
                 "ffn.down.weight": "ffn_down.weight"}
    for ours, theirs in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
        per_layer[f"attn.{ours}.weight"] = f"{theirs}.weight"
        if (config.qkv_bias and ours != "o") or (config.out_bias and ours == "o"):
            per_layer[f"attn.{ours}.bias"] = f"{theirs}.bias"
    for i in range(config.n_layers):
        names |= {f"layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in per_layer.items()}
    return names


def convertible(checkpoint: Path, dtype: str) -> ModelConfig:
    """The checkpoint's config, or NotRunnable saying why llama.cpp cannot run it as converted here."""
    config = ModelConfig.load(checkpoint)
    if config.model_type not in GGUF_ARCH:
        raise NotRunnable(f"llama.cpp has no architecture for model_type {config.model_type!r} as converted here "
                          f"(converted: {', '.join(GGUF_ARCH)})")
    if dtype not in GGUF_DTYPES:
        raise NotRunnable(f"no GGUF conversion at {dtype} here ({', '.join(GGUF_DTYPES)})")
    return config


def write_gguf(checkpoint: Path, out: Path, dtype: str, origin: str, progress=None) -> Path:
    """The checkpoint as a GGUF file of llama.cpp's architecture for it, matrices in `dtype` (norms and biases
    in float32, as llama.cpp keeps them), written tensor by tensor to a temp file and renamed into place. `origin`
    (the checkpoint's hash) goes into its metadata."""
    import gguf

    config = convertible(checkpoint, dtype)
    arch = GGUF_ARCH[config.model_type]
    source, names = TensorSource(checkpoint, config), _gguf_names(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_string(ORIGIN_KEY, origin)
    writer.add_context_length(config.max_positions)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ffn)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("none")  # token ids in, logits out: no tokenizer needed
    writer.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])

    def tensor(ours: str) -> np.ndarray:
        t = source.get(ours)
        if arch == "llama" and ".attn.q." in ours:
            t = _permute_rope(t, config.n_heads)
        elif arch == "llama" and ".attn.k." in ours:
            t = _permute_rope(t, config.n_kv_heads)
        if t.dim() == 1 or dtype == "float32":
            return t.float().numpy()
        if dtype == "float16":
            return t.half().numpy()
        return t.bfloat16().view(torch.uint8).numpy()  # GGUF takes bfloat16 as raw bytes

    def raw(ours: str):
        return gguf.GGMLQuantizationType.BF16 if dtype == "bfloat16" and len(source.shapes[ours]) > 1 else None

    try:
        for ours, theirs in names.items():
            shape = source.shapes[ours]
            itemsize = 4 if len(shape) == 1 or dtype == "float32" else 2
            np_dtype = np.uint8 if raw(ours) else (np.float32 if itemsize == 4 else np.float16)
            byte_shape = (*shape[:-1], shape[-1] * 2) if raw(ours) else shape
            writer.add_tensor_info(theirs, byte_shape, np.dtype(np_dtype), int(np.prod(shape)) * itemsize,
                                   raw_dtype=raw(ours))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, ours in enumerate(names, 1):
            writer.write_tensor_data(tensor(ours))
            if progress and (i % 64 == 0 or i == len(names)):
                progress(f"  GGUF {out.name}: {i}/{len(names)} tensors")
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out


def gguf_for(checkpoint: Path, origin: str, work: Path, dtype: str, progress=None) -> Path:
    """The checkpoint's GGUF at `dtype` under `work`, converted on first use and reused while its origin matches
    the checkpoint's hash (`origin`)."""
    convertible(checkpoint, dtype)
    import gguf

    out = work / f"llama.cpp-{dtype}.gguf"
    if out.is_file():
        try:
            field = gguf.GGUFReader(out).get_field(ORIGIN_KEY)
            if field is not None and field.contents() == origin:
                return out
        except (ValueError, OSError):
            pass  # not a whole GGUF file: convert it again
        out.unlink()
    if progress:
        progress(f"  converting {checkpoint.name} to GGUF ({dtype}) for llama.cpp: {out}")
    return write_gguf(checkpoint, out, dtype, origin, progress)


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


def threads() -> int:
    """llama.cpp's threads, for decoding and for batches: torch's, as the other peers and our engine run on (the
    physical cores by default, which is llama.cpp's own default too; OMP_NUM_THREADS where set). So `make test`,
    which runs the exactness tests of three kernel paths beside each other on one thread each, runs llama.cpp's on
    one thread too; on every core they slowed the three paths by about a third."""
    return torch.get_num_threads()


def load(path: Path, n_ctx: int, logits_all: bool = False, exact_cache: bool = False):
    """llama.cpp on a GGUF file as its users run it: memory-mapped weights, torch's threads (`threads`). `exact_cache`
    keeps the KV cache in float32 (llama.cpp's default is float16), for the check of its logits."""
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32 if exact_cache else None
    batch = max(n_ctx, 32)
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, n_threads=threads(),
                           n_threads_batch=threads(), use_mmap=True, logits_all=logits_all, type_k=f32, type_v=f32,
                           verbose=False)


def next_token(llm, tokens: list[int]) -> int:
    """Evaluate `tokens` after what llm holds; the greedy choice after the last."""
    llm.eval(tokens)
    return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())


def score(path: Path, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len(tokens) - 1, vocab] predicting tokens[1:], with a float32 KV cache."""
    llm = load(path, n_ctx=len(tokens), logits_all=True, exact_cache=True)
    llm.eval(tokens[:-1])
    return torch.from_numpy(np.array(llm.scores[: len(tokens) - 1], dtype=np.float32))
