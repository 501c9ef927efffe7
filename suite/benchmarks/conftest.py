"""Regression benchmarks (pytest-benchmark): `make bench` runs them and compares with the last saved run.

Their files live under FLASHBENCH_BENCH_DIR (default: .benchmarks/data in the repository), a stable path on the
storage being measured (not tmpfs), so runs on one machine are comparable.
"""

import os
import shutil
from pathlib import Path

import pytest

from flashbench import suite
from flashbench.reference.layout import FlashLayout, LayoutError, convert

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bench_dir() -> Path:
    path = Path(os.environ.get("FLASHBENCH_BENCH_DIR", REPO / ".benchmarks" / "data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def opt_layout(bench_dir) -> FlashLayout:
    """The embedded OPT model as a bundled fp16 flash directory, converted once and reused while it is whole."""
    path = bench_dir / "shakespeare-opt-bundled-float16"
    try:
        return FlashLayout.open(path)
    except LayoutError:
        shutil.rmtree(path, ignore_errors=True)
        return convert(suite.model_path("shakespeare-opt"), path, "bundled", "float16")
