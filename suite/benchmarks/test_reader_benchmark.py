"""The flash reader: one token's delta of random records per call, over record sizes and thread counts."""

import numpy as np
import pytest

from flashbench.harness.sweep import KIB, synthetic_layer
from flashbench.reference.reader import FlashReader, record_buffer

BATCH = 256


@pytest.fixture(scope="module")
def layers(bench_dir):
    return {kib: synthetic_layer(bench_dir, kib * KIB, 256 << 20) for kib in (4, 16, 32, 64)}


@pytest.mark.parametrize("threads", [1, 4, 16, 32])
@pytest.mark.parametrize("record_kib", [4, 16, 32, 64])
def test_reader_random_records(benchmark, layers, record_kib, threads):
    geometry, path = layers[record_kib]
    out = record_buffer(geometry, BATCH)
    rng = np.random.default_rng(0)
    with FlashReader([geometry], [path], threads=threads) as reader:
        stats = benchmark(lambda: reader.read(0, rng.choice(geometry.d_ffn, BATCH, replace=False), out))
    assert stats.records == BATCH and stats.direct
    benchmark.extra_info["bytes_per_call"] = stats.bytes_read
