"""A checkpoint's own tokenizer: text to token ids and back, with the checkpoint's conventions.

Every model brings its tokenizer as Hugging Face checkpoints do: a `tokenizer.json` (read with the `tokenizers`
package), or the files transformers' AutoTokenizer reads (`tokenizer.model`, `vocab.json` + `merges.txt`; read
offline, then used through the same fast tokenizer). The embedded models ship a byte-level one
(`flashbench.suite.models.byte_tokenizer`). A checkpoint without any of these is refused: guessing byte ids for a
model trained on another vocabulary measures nothing.

The start of a sequence follows the tokenizer's own post-processor: Llama's and the embedded models' put one BOS
token first, Qwen2's none. `bos` is that token, or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from .config import ModelConfig
from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
SLOW_TOKENIZER_FILES = (("tokenizer.model",), ("vocab.json", "merges.txt"))  # what AutoTokenizer can convert


@dataclass(frozen=True)
class Tokenizer:
    backend: tokenizers.Tokenizer
    source: Path  # the file (or the checkpoint folder, for a converted slow tokenizer) it came from
    bos: int | None  # the token the tokenizer puts before a text, if one
    eos: int | None  # the token that ends a generation: the config's eos_token_id, else the tokenizer's

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`; with `bos`, as a sequence starts (the BOS token first where the model has one)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos] if bos and self.bos is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens dropped (a byte sequence cut mid-character shows as U+FFFD)."""
        return self.backend.decode(ids, skip_special_tokens=True)

    def describe(self) -> str:
        return f"{self.source.name} ({self.vocab_size:,} tokens, BOS {self.bos}, EOS {self.eos})"

    @classmethod
    def load(cls, checkpoint_dir: str | Path, config: ModelConfig) -> "Tokenizer":
        """The checkpoint's tokenizer, checked against its config: every id it makes must index the embedding."""
        checkpoint_dir = Path(checkpoint_dir)
        path = checkpoint_dir / TOKENIZER_FILE
        if path.is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust parser raises plain Exceptions
                raise CheckpointError(f"{path}: not a tokenizer the tokenizers package can read ({e})") from e
            source, bos = path, _bos_of(lambda text, special: backend.encode(text, add_special_tokens=special).ids)
        elif any(all((checkpoint_dir / f).is_file() for f in files) for files in SLOW_TOKENIZER_FILES):
            (backend, bos), source = _converted(checkpoint_dir), checkpoint_dir
        else:
            expected = " or ".join(" + ".join(files) for files in ((TOKENIZER_FILE,), *SLOW_TOKENIZER_FILES))
            raise CheckpointError(f"{checkpoint_dir}: no tokenizer ({expected}): the suite turns text into tokens "
                                  "with the checkpoint's own tokenizer; copy its tokenizer files from where the "
                                  "model came from")
        tok = cls(backend, source, bos, config.eos_token_id)
        if tok.eos is None:
            tok = cls(backend, source, tok.bos, _special_id(backend, ("</s>", "<|endoftext|>", "<eos>")))
        if tok.vocab_size > config.vocab_size:
            raise CheckpointError(f"{source}: the tokenizer has {tok.vocab_size:,} tokens but the model's embedding "
                                  f"only {config.vocab_size:,} rows (vocab_size in config.json): ids past "
                                  f"{config.vocab_size - 1} would index nothing; is it this model's tokenizer?")
        return tok


def _bos_of(encode: Callable[[str, bool], list[int]]) -> int | None:
    """The token the tokenizer puts before a single text (`encode(text, special_tokens)`), if exactly one."""
    plain, full = encode("a", False), encode("a", True)
    if len(full) != len(plain) + 1 or full[1:] != plain:
        return None
    return full[0]


def _special_id(backend: tokenizers.Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        if (i := backend.token_to_id(name)) is not None:
            return i
    return None


def _converted(checkpoint_dir: Path) -> tuple[tokenizers.Tokenizer, int | None]:
    """A slow tokenizer's files made into a fast one by transformers, offline, and its BOS as transformers applies
    it (tokenizer_config.json's add_bos_token, which the fast tokenizer's own post-processor may not carry)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise CheckpointError(f"{checkpoint_dir}: its tokenizer has no tokenizer.json, and reading the other files "
                              "needs transformers (pip install -e '.[peers]')") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many kinds for bad tokenizer files
        raise CheckpointError(f"{checkpoint_dir}: transformers cannot read its tokenizer files ({e})") from e
    if not hasattr(tok, "backend_tokenizer"):
        raise CheckpointError(f"{checkpoint_dir}: transformers read its tokenizer but has no fast version of it")
    return tok.backend_tokenizer, _bos_of(lambda text, special: tok(text, add_special_tokens=special)["input_ids"])
