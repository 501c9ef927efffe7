"""The embedded models' tokenizer: one token per UTF-8 byte (ids 0-255), then `<pad>`, `<bos>`, `<eos>`.

Written as an ordinary `tokenizer.json` (byte-level BPE without merges, GPT-2's byte-to-character map), so the
embedded models declare their tokenizer as any checkpoint does and transformers' AutoTokenizer reads it too.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from flashbench.reference.tokenizer import TOKENIZER_FILE
from flashbench.reference.tokenizer import Tokenizer as ModelTokenizer

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
SPECIAL = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS}


def _byte_characters() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, as the ByteLevel pre-tokenizer applies it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def build() -> Tokenizer:
    vocab = {c: b for b, c in _byte_characters().items()} | SPECIAL
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", BOS)])
    return tok


@functools.cache
def tokenizer() -> ModelTokenizer:
    """The byte tokenizer as a model's (what `Tokenizer.load` gives for an embedded model)."""
    return ModelTokenizer(build(), Path(TOKENIZER_FILE), BOS, EOS)


def encode(text: str, bos: bool = True) -> list[int]:
    """Byte ids of `text` (BOS first with `bos`): for the training code and tests that build byte-level models."""
    return tokenizer().encode(text, bos)


def write(checkpoint_dir: Path) -> None:
    """`tokenizer.json` and a `tokenizer_config.json` that lets transformers' AutoTokenizer load it."""
    build().save(str(checkpoint_dir / TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    (checkpoint_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":  # python -m flashbench.suite.models.byte_tokenizer: write it into the embedded models
    from flashbench import suite

    for name in suite.EMBEDDED_MODELS:
        write(suite.model_path(name))
        print(f"wrote {suite.model_path(name) / 'tokenizer.json'}")
