"""The embedded models' byte-level tokenizer: one token per byte, plus a few special tokens."""

from __future__ import annotations

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str, bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS, *ids] if bos else ids


def decode(ids: list[int]) -> str:
    """Bytes back to text; special tokens are dropped and a byte sequence cut mid-character is replaced."""
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
