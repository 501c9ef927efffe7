"""The flash reader: exact counters, coalescing, naive mode, and an honest fallback where O_DIRECT is refused."""

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flashbench.reference.layout import FFNGeometry, FlashLayout, convert
from flashbench.reference.reader import FlashReader, aligned_buffer, plan_in_place, plan_reads, record_buffer
from flashbench.reference.storage import storage_of

# Tiny OPT at fp16: d_model 64, so a vector is 128 bytes, a bundled record 256 bytes: 16 records per 4 KiB block.
BUNDLED = FFNGeometry("bundled", "float16", 64, 256, ("up", "down"))
UNBUNDLED = FFNGeometry("unbundled", "float16", 64, 256, ("up", "down"))


@pytest.mark.parametrize(
    "geometry, ids, gap, reads, bytes_read",
    [
        (BUNDLED, [0, 1, 15], 0, 1, 4096),  # one block holds all three
        (BUNDLED, [0, 16], 0, 1, 8192),  # touching blocks coalesce
        (BUNDLED, [0, 32], 0, 2, 8192),  # a block apart: two reads
        (BUNDLED, [0, 32], 4096, 1, 12288),  # ... unless the gap threshold covers the hole
        (BUNDLED, [255, 0, 100], 0, 3, 12288),
        (BUNDLED, [], 0, 0, 0),
        (UNBUNDLED, [0], 0, 2, 8192),  # one read per matrix region
        (UNBUNDLED, [0, 1, 2], 0, 2, 8192),
        (UNBUNDLED, [0, 80], 0, 4, 16384),  # vectors 128 B: neuron 80 lies in the third block of each region
    ],
)
def test_plan_predicts_reads_and_bytes(geometry, ids, gap, reads, bytes_read):
    plan = plan_reads(geometry, np.array(ids, dtype=np.int64), gap_bytes=gap).reads
    assert len(plan) == reads
    assert sum(r.length for r in plan) == bytes_read
    assert all(r.offset % 4096 == 0 and r.length % 4096 == 0 for r in plan)


@pytest.fixture(scope="module")
def opt_flash(tmp_path_factory):
    from tests.conftest import random_model, tiny_config
    from flashbench.reference.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("reader")
    model = random_model(tiny_config("opt"))
    ck = save_checkpoint(root / "ck", model.config, model.state_dict())
    return {layout: FlashLayout.open(convert(ck, root / layout, layout, "float16").path) for layout in ("bundled", "unbundled")}


@pytest.mark.parametrize("layout, geometry", [("bundled", BUNDLED), ("unbundled", UNBUNDLED)])
def test_reader_counters_match_the_prediction(opt_flash, layout, geometry):
    ids = [255, 3, 17, 18, 40, 200]
    with FlashReader.for_layout(opt_flash[layout], threads=3) as reader:
        stats = reader.read(1, ids, record_buffer(geometry, len(ids)))
    plan = plan_reads(geometry, np.array(ids)).reads
    assert stats.records == 6
    assert stats.bytes_requested == 6 * 256
    assert stats.reads == len(plan)
    assert stats.bytes_read == sum(r.length for r in plan)
    assert stats.direct


@pytest.fixture(scope="module")
def block_flashes(tmp_path_factory):
    """fp16 vectors of d_model 2048: whole 4 KiB blocks, so vectors are read in place, not staged; both layouts."""
    from tests.conftest import random_model, tiny_config
    from flashbench.reference.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("blocks")
    model = random_model(tiny_config("opt", d_model=2048, d_ffn=64, n_layers=1))
    ck = save_checkpoint(root / "ck", model.config, model.state_dict())
    return {layout: convert(ck, root / layout, layout, "float16") for layout in ("bundled", "unbundled")}


@pytest.fixture(scope="module")
def block_flash(block_flashes):
    return block_flashes["unbundled"]


@pytest.mark.parametrize("which", ["staged bundled", "staged unbundled", "in place bundled", "in place unbundled"])
def test_records_can_be_read_into_rows_of_the_callers_choosing(opt_flash, block_flashes, which):
    """The overlap fills some rows from its read-ahead and reads the rest straight into theirs; the engine reads a
    windowed delta straight into the neuron cache's free rows."""
    path, layout = which.rsplit(" ", 1)
    flash = block_flashes[layout] if path == "in place" else opt_flash[layout]
    ids, rows = [3, 17, 18, 40], [5, 0, 2, 7]
    with FlashReader.for_layout(flash, threads=3) as reader:
        in_order = record_buffer(flash.geometry, len(ids))
        reader.read(0, ids, in_order)
        placed = record_buffer(flash.geometry, 8)
        reader.read(0, ids, placed, rows=np.array(rows))
    assert in_order.any() and (placed[:, rows] == in_order).all()
    assert not placed[:, [1, 3, 4, 6]].any()  # rows not asked for are left alone


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
def test_a_record_buffer_holds_each_vector_of_a_record_in_a_plane_of_its_own(opt_flash, layout):
    """Vector j of the record in row k at [j, k], whatever the layout, so that each vector's rows form one
    contiguous matrix (the products run about 20x slower over rows strided by a bundled record)."""
    flash = opt_flash[layout]
    g, ids = flash.geometry, [200, 3, 17]
    data = flash.ffn_path(1).read_bytes()
    with FlashReader.for_layout(flash, threads=2) as reader:
        out = record_buffer(g, 4)
        reader.read(1, ids, out)
    for k, neuron in enumerate(ids):
        for j, (offset, length) in enumerate(g.extents(neuron)):
            assert out[j, k].tobytes() == data[offset : offset + length]
    assert out.shape == (2, 4, g.vector_bytes)


def test_a_run_of_adjacent_bundled_records_is_one_read_with_a_buffer_per_vector(block_flashes, monkeypatch):
    """A bundled record's vectors lie one after the other in the file and go to different planes: a run of
    adjacent records is still one read, its buffers alternating between the planes, and nothing is staged."""
    real_preadv, buffers_per_read = os.preadv, []

    def counting_preadv(fd, buffers, offset):
        buffers_per_read.append(len(buffers))
        return real_preadv(fd, buffers, offset)

    flash = block_flashes["bundled"]
    monkeypatch.setattr(os, "preadv", counting_preadv)
    with FlashReader.for_layout(flash, threads=1) as reader:
        out = record_buffer(flash.geometry, 16)
        stats = reader.read(0, np.arange(8, 24), out)
        staged = len(reader._staging)
    assert stats.reads == 1 and buffers_per_read == [32] and staged == 0
    data = flash.ffn_path(0).read_bytes()
    for j, (offset, length) in enumerate(flash.geometry.extents(23)):
        assert out[j, 15].tobytes() == data[offset : offset + length]


def test_a_run_of_adjacent_records_is_read_into_one_buffer_per_vector(block_flash, monkeypatch):
    """Unbundled, a run of adjacent neurons' vectors lands in consecutive rows of their vector's plane: one
    buffer per read, not one per record (many small buffers slow a direct read)."""
    real_preadv, buffers_per_read = os.preadv, []

    def counting_preadv(fd, buffers, offset):
        buffers_per_read.append(len(buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    with FlashReader.for_layout(block_flash, threads=1) as reader:
        out = record_buffer(block_flash.geometry, 16)
        stats = reader.read(0, np.arange(8, 24), out)
    assert stats.reads == 2 and buffers_per_read == [1, 1]  # one read per vector region, each into one buffer
    data = block_flash.ffn_path(0).read_bytes()
    assert out[1, 15].tobytes() == data[block_flash.geometry.extents(23)[1][0]:][: block_flash.geometry.vector_bytes]


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("gap_records", [0, 3])
def test_a_neuron_asked_for_twice_lands_in_both_rows(block_flashes, layout, gap_records):
    """Two rows cannot be one read's buffers for the same bytes (a read merged past gaps would give the second row
    the bytes after the first): the reader stages such a call and copies each."""
    flash = block_flashes[layout]
    gap = gap_records * flash.geometry.neuron_stride
    with FlashReader.for_layout(flash, threads=2, gap_bytes=gap) as reader:
        out = record_buffer(flash.geometry, 3)
        reader.read(0, [7, 3, 7], out)
    data = flash.ffn_path(0).read_bytes()
    for k, neuron in enumerate([7, 3, 7]):
        for j, (offset, length) in enumerate(flash.geometry.extents(neuron)):
            assert out[j, k].tobytes() == data[offset : offset + length]


@pytest.mark.parametrize("backend", ["threads", "io_uring"])
@pytest.mark.parametrize("layout, reads", [("bundled", 3), ("unbundled", 6)])
def test_merged_gaps_are_read_into_a_sink_and_the_records_straight_into_their_rows(block_flashes, backend, layout,
                                                                                  reads):
    """With gap_bytes, records a gap apart are one read: the reads and bytes plan_reads predicts, each record in its
    row as an unmerged read puts it, and nothing copied through the staging buffer."""
    if backend == "io_uring":
        io_uring_here()
    flash = block_flashes[layout]
    g, ids, gap = flash.geometry, np.array([40, 3, 5, 6, 10, 30, 31]), 3 * flash.geometry.neuron_stride
    with FlashReader.for_layout(flash, threads=3, backend=backend) as reader:
        apart = record_buffer(g, len(ids))
        reader.read(0, ids, apart)
    with FlashReader.for_layout(flash, threads=3, backend=backend, gap_bytes=gap) as reader:
        merged = record_buffer(g, len(ids))
        stats = reader.read(0, ids, merged)
        staged = len(reader._staging)
    plan = plan_reads(g, ids, gap_bytes=gap).reads
    assert stats.reads == len(plan) == reads  # 3, 5-6 and 10 merge; 30-31 and 40 do not (per vector region)
    assert stats.bytes_read == sum(r.length for r in plan) > stats.bytes_requested
    assert (merged == apart).all() and apart.any()
    assert staged == 0


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("gap_bytes", [0, 3 * 4096])
def test_the_c_planner_plans_the_reads_numpy_plans(layout, gap_bytes):
    """The reader plans a call's in-place reads in C where the io_uring library is built, else in numpy: the same
    reads and pieces for ids in any order, rows anywhere, runs cut at `most` vectors or a block, and None for an id
    asked for twice."""
    from flashbench.reference import uring

    if not uring.can_plan():
        pytest.skip(f"the C planner is not built: {uring.LIBRARY}")
    vb, d_ffn, k = 4096, 512, 2
    bases, stride = (np.array([0, vb]), k * vb) if layout == "bundled" else (np.array([0, d_ffn * vb]), vb)
    rng = np.random.default_rng(0)
    for case in range(200):
        n = int(rng.integers(1, 120))
        ids = rng.choice(d_ffn, n, replace=False) if case % 4 else np.sort(rng.choice(d_ffn, n, replace=False))
        if case % 10 == 9:
            ids[-1] = ids[0]  # asked for twice
        rows = rng.permutation(n) if case % 3 else np.arange(n)
        args = (ids.astype(np.int64), rows.astype(np.int64), bases.astype(np.int64), stride, vb, 1 << 22, gap_bytes,
                1 << 17, int(rng.integers(1, 40)))
        ours, theirs = uring.plan_records(*args), plan_in_place(*args)
        assert (ours is None) == (theirs is None) == (case % 10 == 9)
        if ours is not None:
            for a, b in zip(ours, theirs, strict=True):
                assert np.array_equal(a, b)


def test_an_io_uring_library_from_older_code_is_reported_and_the_reader_keeps_threads(opt_flash, monkeypatch):
    """A library built before a function was added (a checkout updated without `make`) is not called: io_uring says
    why it cannot read, the plan comes from numpy, and the threads read as ever."""
    from flashbench.reference import row_kernels, uring

    if row_kernels.unavailable():
        pytest.skip(f"needs a built library without the reader's functions: {row_kernels.unavailable()}")
    caches = (uring._library, uring.unavailable, uring.can_plan)
    for cached in caches:
        cached.cache_clear()
    monkeypatch.setattr(uring, "LIBRARY", row_kernels.LIBRARY)  # a real library, lacking fb_ring_open
    try:
        assert "out of date" in uring.unavailable() and not uring.can_plan()
        flash = opt_flash["bundled"]
        with pytest.raises(ValueError, match="out of date"):
            FlashReader.for_layout(flash, backend="io_uring")
        with FlashReader.for_layout(flash, threads=2) as reader:
            out = record_buffer(flash.geometry, 3)
            reader.read(0, [9, 2, 30], out)
        data = flash.ffn_path(0).read_bytes()
        offset, length = flash.geometry.extents(30)[1]
        assert out[1, 2].tobytes() == data[offset : offset + length]
    finally:
        monkeypatch.undo()
        for cached in caches:
            cached.cache_clear()


def io_uring_here() -> None:
    from flashbench.reference import uring

    if why := uring.unavailable():
        pytest.skip(f"io_uring reader: {why}")


@pytest.mark.parametrize("which", ["staged bundled", "staged unbundled", "in place bundled", "in place unbundled",
                                   "whole file unbundled"])
def test_the_io_uring_reader_reads_what_the_threads_read_and_counts_it_alike(opt_flash, block_flashes, which):
    io_uring_here()
    path, layout = which.rsplit(" ", 1)
    flash = opt_flash[layout] if path == "staged" else block_flashes[layout]
    ids = [40, 3, 17, 18, 63, 0]
    got = {}
    for backend in ("threads", "io_uring"):
        with FlashReader.for_layout(flash, threads=4, backend=backend) as reader:
            if path == "whole file":
                out = aligned_buffer(flash.geometry.file_bytes)
                stats = reader.read_layer(0, out)
            else:
                out = record_buffer(flash.geometry, len(ids))
                stats = reader.read(0, ids, out)
        got[backend] = (out, stats)
    (a, sa), (b, sb) = got["threads"], got["io_uring"]
    assert a.any() and (a == b).all()
    assert (sa.records, sa.reads, sa.bytes_read, sa.direct) == (sb.records, sb.reads, sb.bytes_read, sb.direct)


def test_an_io_uring_reader_reads_from_whichever_thread_calls_it(block_flashes, monkeypatch):
    """Its rings submit only from the thread that made them (uring_reads.c), so each thread gets its own: the engine
    reads on its own thread and on the overlap's read-ahead thread, taking turns. A ring that refused a read would
    not show in the bytes (the reader reads them again one by one), so those retries are counted too."""
    io_uring_here()
    retries = []
    pread = FlashReader._pread
    monkeypatch.setattr(FlashReader, "_pread", lambda self, *a: retries.append(a) or pread(self, *a))
    flash = block_flashes["bundled"]
    ids = [40, 3, 17, 18, 63, 0]
    with FlashReader.for_layout(flash, threads=4, backend="threads") as reader:
        expected = record_buffer(flash.geometry, len(ids))
        reader.read(0, ids, expected)
    with FlashReader.for_layout(flash, threads=4, backend="io_uring") as reader:
        outs = [record_buffer(flash.geometry, len(ids)) for _ in range(4)]
        reader.read(0, ids, outs[0])
        for out in outs[1:3]:  # two more threads, one after the other
            worker = threading.Thread(target=reader.read, args=(0, ids, out))
            worker.start()
            worker.join()
        reader.read(0, ids, outs[3])  # the first thread again
    assert expected.any() and all((out == expected).all() for out in outs) and not retries


def test_a_read_counts_the_cpu_time_of_every_thread_that_read(opt_flash, monkeypatch):
    """Four reads on four threads (the caller and three helpers), each read held until all four have begun, so
    that each thread makes one, and each burning 20 ms of its thread's CPU: the read's CPU time is all four."""
    real, started = os.preadv, threading.Barrier(4, timeout=10)

    def burning(*args):
        started.wait()
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass
        return real(*args)

    flash = opt_flash["bundled"]
    ids = list(range(0, 256, 64))  # far enough apart that each is a read of its own
    with FlashReader.for_layout(flash, threads=4, backend="threads") as reader:
        monkeypatch.setattr(os, "preadv", burning)
        stats = reader.read(0, ids, record_buffer(flash.geometry, len(ids)))
    assert stats.reads == 4
    assert stats.cpu_s >= 4 * 0.02


def test_an_unknown_reader_backend_is_refused(opt_flash):
    with pytest.raises(ValueError, match="backend must be one of threads, io_uring"):
        FlashReader.for_layout(opt_flash["bundled"], backend="aio")


def test_bundled_needs_fewer_reads_than_unbundled_for_the_same_neurons(opt_flash):
    ids = list(range(0, 256, 64))  # far enough apart that no two share or touch a block
    counts = {}
    for layout, flash in opt_flash.items():
        with FlashReader.for_layout(flash, threads=2) as reader:
            counts[layout] = reader.read(0, ids, record_buffer(flash.geometry, len(ids))).reads
    assert counts["bundled"] < counts["unbundled"]


def test_empty_id_set_reads_nothing(opt_flash):
    with FlashReader.for_layout(opt_flash["bundled"]) as reader:
        stats = reader.read(0, [], record_buffer(opt_flash["bundled"].geometry, 0))
    assert (stats.records, stats.reads, stats.bytes_read) == (0, 0, 0)


def test_naive_mode_reads_the_whole_layer_file(opt_flash):
    flash = opt_flash["unbundled"]
    out = aligned_buffer(flash.geometry.file_bytes)
    with FlashReader.for_layout(flash, threads=4) as reader:
        stats = reader.read_layer(1, out, chunk_bytes=4096)
    assert out.tobytes() == flash.ffn_path(1).read_bytes()
    assert stats.bytes_read == flash.geometry.file_bytes and stats.reads == flash.geometry.file_bytes // 4096


def test_out_of_range_ids_are_refused(opt_flash):
    with FlashReader.for_layout(opt_flash["bundled"]) as reader, pytest.raises(IndexError, match=r"\[0, 256\)"):
        reader.read(0, [256], record_buffer(opt_flash["bundled"].geometry, 1))


def test_a_negative_row_is_refused_before_anything_is_read(opt_flash):
    flash = opt_flash["bundled"]
    with FlashReader.for_layout(flash) as reader, pytest.raises(IndexError, match="rows must be >= 0"):
        reader.read(0, [1, 2], record_buffer(flash.geometry, 2), rows=np.array([0, -1]))


def test_on_a_memory_filesystem_the_reader_uses_buffered_reads_and_says_so(opt_flash):
    shm = Path("/dev/shm")
    if not shm.is_dir() or storage_of(shm).filesystem != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    copy = shm / f"flashbench-test-{os.getpid()}"
    shutil.copytree(opt_flash["bundled"].path, copy)
    try:
        flash = FlashLayout.open(copy)
        with pytest.warns(UserWarning, match="NOT flash"):
            reader = FlashReader.for_layout(flash, threads=2)
        with reader:
            out = record_buffer(flash.geometry, 2)
            stats = reader.read(0, [0, 9], out)
            assert not stats.direct and "tmpfs (memory)" in reader.fallback_reason
            assert out[:, 1].tobytes() == (copy / "ffn-000.bin").read_bytes()[9 * 256 : 10 * 256]
    finally:
        shutil.rmtree(copy)


def test_direct_io_can_be_switched_off_and_is_labelled(opt_flash):
    with FlashReader.for_layout(opt_flash["bundled"], direct=False) as reader:
        assert not reader.read(0, [1], record_buffer(opt_flash["bundled"].geometry, 1)).direct
        assert reader.fallback_reason == "direct I/O switched off by the caller"


def test_where_o_direct_is_refused_at_open_the_reader_falls_back_and_says_so(opt_flash, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.warns(UserWarning, match="falling back to buffered reads"):
        reader = FlashReader.for_layout(opt_flash["bundled"], threads=2)
    with reader:
        out = record_buffer(opt_flash["bundled"].geometry, 1)
        assert not reader.read(1, [5], out).direct
        assert "O_DIRECT refused when opening" in reader.fallback_reason
        assert out[:, 0].tobytes() == opt_flash["bundled"].ffn_path(1).read_bytes()[5 * 256 : 6 * 256]


@pytest.fixture
def page_records(tmp_path):
    """A bundled layer file whose 16 KiB records are read in place, straight into the caller's rows."""
    from flashbench.harness.sweep import synthetic_layer

    return synthetic_layer(tmp_path, 16384, 16 << 20)


def test_where_o_direct_is_refused_at_read_the_reader_falls_back_and_says_so(page_records, monkeypatch):
    geometry, path = page_records
    real_preadv = os.preadv
    with FlashReader([geometry], [path], threads=4) as reader:
        direct_fd = reader._fds[0]

        def refusing_preadv(fd, buffers, offset):
            if fd == direct_fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", refusing_preadv)
        out = record_buffer(geometry, 8)
        with pytest.warns(UserWarning, match="falling back to buffered reads"):
            stats = reader.read(0, [3, 4, 100, 7, 900, 901, 902, 11], out)
    assert not stats.direct and "O_DIRECT read refused" in reader.fallback_reason
    data = path.read_bytes()
    assert out[:, 2].tobytes() == data[100 * 16384 : 101 * 16384]
    assert out[:, 5].tobytes() == data[901 * 16384 : 902 * 16384]


def test_a_file_truncated_under_the_reader_is_a_short_read_error(page_records):
    geometry, path = page_records
    with FlashReader([geometry], [path], threads=4) as reader:
        os.truncate(path, 512 * 16384)
        with pytest.raises(OSError, match=r"short read: 0 of 16384 bytes at offset 16384000 of .*sweep-16MiB.bin \(file truncated\?\)"):
            reader.read(0, [10, 1000], record_buffer(geometry, 2))
