"""Small random checkpoints of every supported model family, made by transformers' own classes (as a user's come),
each with a BPE tokenizer trained here on the held-out text with that family's BOS/EOS conventions."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from flashbench import suite

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, vocab_size=520)
# family -> (transformers config class name, its settings, BOS token or None, EOS token)
FAMILIES = {
    "opt": ("OPTConfig", dict(ffn_dim=192, max_position_embeddings=256, word_embed_proj_dim=64,
                              activation_function="relu", do_layer_norm_before=True), "</s>", "</s>"),
    "llama-relu": ("LlamaConfig", dict(num_key_value_heads=2, hidden_act="relu", max_position_embeddings=256),
                   "<s>", "</s>"),
    "llama-silu": ("LlamaConfig", dict(num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
                                       rope_theta=500000.0, tie_word_embeddings=False, attention_bias=True),
                   "<s>", "</s>"),
    # Its window (200) is shorter than its positions (1024): the suite runs it up to the window.
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, hidden_act="silu", max_position_embeddings=1024,
                                      sliding_window=200), "<s>", "</s>"),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
                                  rope_theta=1000000.0, tie_word_embeddings=True), None, "<|endoftext|>"),
}
MODEL_CLASSES = {"OPTConfig": "OPTForCausalLM", "LlamaConfig": "LlamaForCausalLM",
                 "MistralConfig": "MistralForCausalLM", "Qwen2Config": "Qwen2ForCausalLM"}


def bpe_tokenizer(bos: str | None, eos: str, vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the held-out text: BOS put first by its post-processor, if any."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([t for t in (bos, eos) if t]))
    tok.train_from_iterator([suite.heldout_text()], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_family_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    """A random checkpoint of `family` saved by transformers (safetensors), with its tokenizer.json."""
    import transformers

    config_class, settings, bos, eos = FAMILIES[family]
    tok = bpe_tokenizer(bos, eos)
    ids = {"bos_token_id": tok.token_to_id(bos) if bos else None, "eos_token_id": tok.token_to_id(eos),
           "pad_token_id": tok.token_to_id(eos)}
    config = getattr(transformers, config_class)(**(COMMON | settings | ids))
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[config_class])(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero and norms to one: move them all
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name and name.endswith("weight")
                    else 0.08 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    return out
