"""Regression benchmarks of the flash reader (pytest-benchmark): one token's delta of random records per call.

    .venv/bin/python -m pytest suite/benchmarks --benchmark-only

The file lives under FLASHBENCH_BENCH_DIR (default: .benchmarks/data in the repository) so that it is on the
storage being measured, not on tmpfs.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from flashbench.harness.sweep import KIB, synthetic_layer
from flashbench.reference.reader import FlashReader, aligned_buffer

DATA = Path(os.environ.get("FLASHBENCH_BENCH_DIR", Path(__file__).resolve().parents[2] / ".benchmarks" / "data"))
BATCH = 256


@pytest.fixture(scope="module")
def layers():
    DATA.mkdir(parents=True, exist_ok=True)
    return {kib: synthetic_layer(DATA, kib * KIB, 256 << 20) for kib in (4, 16, 32, 64)}


@pytest.mark.parametrize("threads", [1, 4, 16, 32])
@pytest.mark.parametrize("record_kib", [4, 16, 32, 64])
def test_reader_random_records(benchmark, layers, record_kib, threads):
    geometry, path = layers[record_kib]
    out = aligned_buffer(BATCH * geometry.record_bytes).reshape(BATCH, geometry.record_bytes)
    rng = np.random.default_rng(0)
    with FlashReader([geometry], [path], threads=threads) as reader:
        stats = benchmark(lambda: reader.read(0, rng.choice(geometry.d_ffn, BATCH, replace=False), out))
    assert stats.records == BATCH and stats.direct
    benchmark.extra_info["bytes_per_call"] = stats.bytes_read
