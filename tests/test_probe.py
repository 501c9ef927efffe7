"""The storage probe: fio's JSON read defensively, a grid of points, a cache per device, a labelled fallback."""

import shutil

import pytest

from flashbench.harness import fio
from flashbench.harness.probe import READER, ProbeGrid, probe

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
GRID = ProbeGrid(chunk_bytes=(4096, 65536), threads=(1, 2), ioengines=("psync",), seconds=0.2, file_mib=8)


def test_old_fio_bandwidth_in_kib_is_converted():
    assert fio._bandwidth({"bw": 1000}) == 1024000.0
    assert fio._bandwidth({"bw_bytes": 5, "bw": 1000}) == 5.0


@needs_fio
def test_probe_measures_every_point_and_the_queue_depth_achieved(tmp_path):
    p = probe(tmp_path, GRID, cache_dir=tmp_path / "cache", progress=None)
    random = [q for q in p.points if q.rw == "randread"]
    assert p.tool == "fio" and len(random) == 4 and all(q.bandwidth_bytes_s > 0 for q in random)
    assert all(q.achieved_depth == pytest.approx(q.threads, rel=0.3) for q in random)
    assert [q.rw for q in p.points].count("read") == 1


@needs_fio
def test_probe_is_cached_per_device_and_grid_until_asked_fresh(tmp_path):
    first = probe(tmp_path, GRID, cache_dir=tmp_path / "cache", progress=None)
    again = probe(tmp_path, GRID, cache_dir=tmp_path / "cache", progress=None)
    assert first.cached_from is None and again.cached_from and again.points == first.points
    assert probe(tmp_path, GRID, cache_dir=tmp_path / "cache", fresh=True, progress=None).cached_from is None


def test_without_fio_the_probe_falls_back_to_our_reader_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    p = probe(tmp_path, GRID, cache_dir=tmp_path / "cache", progress=None)
    assert p.tool == READER and "fio is not installed" in p.fio_error
    assert len(p.points) == 4 and all(q.tool == READER for q in p.points)


@needs_fio
def test_reference_is_the_nearest_chunk_size_at_the_nearest_thread_count(tmp_path):
    p = probe(tmp_path, GRID, cache_dir=tmp_path / "cache", progress=None)
    ref = p.reference(chunk_bytes=8000, threads=16)  # log-nearest: 4 KiB
    assert (ref.chunk_bytes, ref.threads) == (4096, 2)
    assert p.reference(50000, 1).chunk_bytes == 65536


def test_a_configurations_reads_are_set_beside_fios_faster_engine_at_their_size_and_depth():
    from flashbench.harness.measure import fio_reference
    from flashbench.harness.probe import Probe, ProbePoint

    # io_uring faster at 32 in flight, psync at 128 (as this VM's disk was)
    rates = {("psync", 32): 800e6, ("io_uring", 32): 1000e6, ("psync", 128): 1100e6, ("io_uring", 128): 900e6}
    points = [ProbePoint("fio", e, "randread", 16384, t, rate, rate / 16384, t) for (e, t), rate in rates.items()]
    probe = Probe("d", {}, ProbeGrid(), points, "now", "fio-3.33")
    metrics = {"mean_read_bytes": 16384.0, "read_bandwidth_bytes_s": 880e6}
    at32, at128 = fio_reference(metrics, 32, probe), fio_reference(metrics, 128, probe)
    assert (at32["ioengine"], at32["ratio"]) == ("io_uring", 0.88)
    assert (at128["ioengine"], at128["ratio"]) == ("psync", 0.8)
