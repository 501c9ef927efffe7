"""What every record carries (machine, package versions, git commit) and how it is written (atomically)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from flashbench.reference.errors import FlashbenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1  # the records' format: `flashbench compare` refuses to set records of different schemas side by side
PACKAGES = ("flashbench", "torch", "safetensors", "numpy", "pandas", "transformers", "accelerate")


class RecordError(FlashbenchError):
    """Records that cannot be used: unreadable, or of another scenario, schema or commit than asked."""


def speedup_over_naive(rec: dict, naive: dict | None) -> float | None:
    """A configuration's tokens/s over the same run's naive; where it was timed alternately with a naive SUT
    (`alternated_with_naive`), the ratio of those same moments instead, which the disk's drift between two
    configurations' turns does not move."""
    if rec.get("status") != "measured":
        return None
    if alternated := rec.get("alternated_with_naive"):
        return alternated["speedup_over_naive"]
    if naive is None or naive.get("status") != "measured":
        return None
    return rec["metrics"]["tokens_per_s"] / naive["metrics"]["tokens_per_s"]


def portable_path(path: str | Path) -> str:
    """A path as records name it: relative to the repository where it lies inside it, else under ~ or absolute, so
    that committed records do not carry the machine they were made on."""
    p = Path(path).absolute()
    for root, prefix in ((REPO_ROOT, ""), (Path.home(), "~/")):
        if p.is_relative_to(root):
            return prefix + (str(p.relative_to(root)) or ".")
    return str(p)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write to a temp file beside `path`, fsync, then rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk says nothing of which file: name it
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"{e.strerror or e}; nothing written", str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: dict) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    ram = None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict:
    """The commit of the flashbench checkout, and whether it had uncommitted changes (None outside git)."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def provenance() -> dict:
    """What every record and every --json output carries: the machine, the package versions, the git commit."""
    return {"machine": machine_info(), "versions": versions(), "git": git_commit()}
