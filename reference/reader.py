"""The flash reader: fetch the records of a set of neurons from a layer's FFN file with parallel direct reads.

For each call the reader plans its reads: every vector of every requested record is widened to the aligned blocks
that cover it (O_DIRECT reads whole blocks into aligned memory), and blocks that touch, overlap or lie within
`gap_bytes` of each other are coalesced into one read, cut at every 1 MiB of the file (RUN_BYTES) so that a long
range is shared between threads, as naive reads of whole files are. A pool of threads then issues the reads with
`os.preadv` (which releases the GIL) into an aligned staging buffer and copies each vector into its row of the
caller's output (one plane per vector, `record_buffer`); where vectors are whole blocks they are read straight into
their rows instead (a bundled record's vectors, one after the other in the file, in one read with a buffer each),
and where such reads are merged past a gap, the gap's bytes land in a sink buffer and are thrown away (no copy).

Counters are exact and per call: records, read operations, bytes requested (the records' own bytes) and bytes
read (whole blocks), seconds, and whether the reads were direct. Where O_DIRECT is refused (tmpfs, some
filesystems), or the files lie on a memory filesystem such as tmpfs, the reader uses buffered reads and says so in
`direct` and `fallback_reason`: a page-cache or DRAM measurement is never passed off as a flash one.
"""

from __future__ import annotations

import errno
import functools
import itertools
import mmap
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import uring
from .layout import ALIGNMENT, FFNGeometry, FlashLayout
from .storage import storage_of

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers one preadv may take
RUN_BYTES = 1 << 20  # the longest read of adjacent records, as naive reads whole files in 1 MiB chunks


@dataclass
class ReadStats:
    records: int = 0
    reads: int = 0
    bytes_requested: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    direct: bool = True
    # CPU time of the threads that read (the caller's and the reader's helpers): planning, system calls and the
    # kernel's work in them (interrupts are not counted). On a machine with few cores, reads that run beside the
    # products take this from them.
    cpu_s: float = 0.0

    def __iadd__(self, other: "ReadStats") -> "ReadStats":
        self.records += other.records
        self.reads += other.reads
        self.bytes_requested += other.bytes_requested
        self.bytes_read += other.bytes_read
        self.seconds += other.seconds
        self.cpu_s += other.cpu_s
        self.direct = self.direct and other.direct
        return self


@dataclass
class Read:
    """One read operation: `length` bytes at file `offset`, holding pieces [first, last) of its plan (the staging
    offset is set when the plan is laid into the staging buffer)."""

    offset: int
    length: int
    first: int
    last: int
    staging: int = 0


@dataclass
class Plan:
    """The reads that fetch a set of records, and every piece of every record (sorted by file offset): the output
    row and column it goes to, its file offset and its length."""

    reads: list[Read]
    row: np.ndarray
    column: np.ndarray
    offset: np.ndarray
    length: np.ndarray


@dataclass
class Batch:
    """The reads of one reader call into one buffer: read i fetches file offset `offsets[i]` into the buffer pieces
    first[i] .. first[i] + count[i] - 1, piece j being lengths[j] bytes at byte starts[j] of `base`, or of `sink`
    where to_sink[j]: the bytes a read takes between the records it was asked for, thrown away."""

    base: np.ndarray  # flat uint8, page aligned where reads are direct
    offsets: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    first: np.ndarray
    count: np.ndarray
    sink: np.ndarray | None = None
    to_sink: np.ndarray | None = None  # bool per piece; None: none

    @classmethod
    def whole(cls, base: np.ndarray, offsets, starts, lengths) -> "Batch":
        """One piece per read."""
        n = len(offsets)
        return cls(base, np.asarray(offsets, np.int64), np.asarray(starts, np.int64), np.asarray(lengths, np.int64),
                   np.arange(n), np.ones(n, np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())

    def _sunk(self) -> np.ndarray:
        return np.zeros(len(self.starts), dtype=bool) if self.to_sink is None else self.to_sink

    def runs(self) -> list[tuple[list, int]]:
        """(buffers, file offset) per read, as os.preadv takes them."""
        flat = memoryview(self.base)
        sink = memoryview(self.sink) if self.sink is not None else None
        buffers = [(sink if sunk else flat)[s : s + n]
                   for s, n, sunk in zip(self.starts.tolist(), self.lengths.tolist(), self._sunk().tolist())]
        return [(buffers[f : f + c], o)
                for o, f, c in zip(self.offsets.tolist(), self.first.tolist(), self.count.tolist())]

    def iovecs(self) -> np.ndarray:
        iov = np.empty(len(self.starts), dtype=uring.IOVEC)
        sink = self.sink.ctypes.data if self.sink is not None else 0
        iov["base"] = np.where(self._sunk(), sink, self.base.ctypes.data) + self.starts
        iov["len"] = self.lengths
        return iov


def _cut_runs(bounds: list[int], most: int) -> list[int]:
    """Run boundaries [0, ..., n] with every run longer than `most` cut into pieces of `most`."""
    out = []
    for a, b in zip(bounds, bounds[1:]):
        out += range(a, b, most)
    return out + [bounds[-1]]


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array whose memory starts on a page boundary (as O_DIRECT requires)."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, ALIGNMENT)), dtype=np.uint8)[:nbytes]


def record_buffer(geometry: FFNGeometry, rows: int, buffer: np.ndarray | None = None) -> np.ndarray:
    """Room for `rows` records as the reader fills them: [vectors, rows, vector_bytes] (an aligned buffer of
    rows x record_bytes, or `buffer` reshaped), record k's vector j at [j, k]: one plane per vector, whatever the
    layout, so that each vector's rows are one contiguous matrix, multiplied where they landed. A neuron cache's
    matrices are such planes too, and the engine reads into them directly (`NeuronCache.planes`)."""
    buffer = aligned_buffer(rows * geometry.record_bytes) if buffer is None else buffer
    return buffer.reshape(len(geometry.vectors), rows, geometry.vector_bytes)


def plan_reads(geometry: FFNGeometry, ids: np.ndarray, gap_bytes: int = 0, block: int = ALIGNMENT,
               rows: np.ndarray | None = None) -> Plan:
    """The reads that fetch records `ids` (output row rows[k], default k, gets record ids[k]), coalesced as
    described above."""
    if len(ids) == 0:
        return Plan([], *(np.zeros(0, dtype=np.int64),) * 4)
    # Every piece of every record: file offset, length, output row and column (numpy, for thousands of pieces).
    first = geometry.extents(0)  # the vectors of neuron 0; neuron i's lie i * stride further
    stride = geometry.neuron_stride
    base = np.array([o for o, _ in first], dtype=np.int64)
    lengths = np.array([n for _, n in first], dtype=np.int64)
    columns = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offset = (ids[:, None] * stride + base[None, :]).ravel()
    length = np.broadcast_to(lengths, (len(ids), len(lengths))).ravel()
    row = np.repeat(np.arange(len(ids)) if rows is None else rows, len(lengths))
    column = np.broadcast_to(columns, (len(ids), len(lengths))).ravel()
    order = np.argsort(offset, kind="stable")
    offset, length, row, column = offset[order], length[order], row[order], column[order]
    start = offset - offset % block
    end = -(-(offset + length) // block) * block
    reach = np.maximum.accumulate(end)  # pieces are sorted by start; a read ends at the furthest end so far
    new_read = np.ones(len(offset), dtype=bool)
    new_read[1:] = start[1:] > reach[:-1] + gap_bytes
    # ... and at every RUN_BYTES boundary of the file, so that a long coalesced range (the hybrid's cold neurons,
    # merged past the hot ones) is read in pieces the threads share, not in one read by one thread.
    new_read[1:] |= start[1:] // RUN_BYTES != start[:-1] // RUN_BYTES
    firsts = np.flatnonzero(new_read)
    lasts = np.append(firsts[1:], len(offset))
    reads = [Read(s0, e0 - s0, a, b) for a, b, s0, e0 in zip(firsts.tolist(), lasts.tolist(), start[firsts].tolist(),
                                                            reach[lasts - 1].tolist())]
    return Plan(reads, row, column, offset, length)


def plan_in_place(ids: np.ndarray, rows: np.ndarray, bases: np.ndarray, stride: int, vector_bytes: int, plane: int,
                  gap_bytes: int, run_bytes: int, most: int) -> tuple[np.ndarray, ...] | None:
    """The reads of `FlashReader._in_place` where vector j of record ids[i] (file offset ids[i] * stride + bases[j])
    goes to byte rows[i] * vector_bytes + j * plane of the output: per read its file offset, first piece and piece
    count, per piece its start, length and whether it is the sink's (`uring.plan_records` plans the same in C). Sorted
    by file offset, a new read starts, with `gap_bytes`, where the next vector lies more than that past the last or in
    another `run_bytes` block (the bytes between two vectors of a read are a sink piece), without, at every gap and
    every `most` vectors of a run. A read's pieces that follow one another in the output are one piece. None where two
    vectors overlap (an id asked for twice)."""
    vb, k = vector_bytes, len(bases)
    offset = (ids[:, None] * stride + bases).ravel()  # vector j of record i at [i * k + j]
    start = (rows[:, None] * vb + np.arange(k) * plane).ravel()
    order = np.argsort(offset, kind="stable")
    offset, start, n = offset[order], start[order], len(offset)
    gap = offset[1:] - offset[:-1] - vb  # bytes between a vector and the next one read
    if (gap < 0).any():  # a duplicate id: its vectors overlap
        return None
    new = np.ones(n, dtype=bool)
    if gap_bytes:
        new[1:] = (gap > gap_bytes) | (offset[1:] // run_bytes != offset[:-1] // run_bytes)
    else:
        cuts = _cut_runs([0, *(np.flatnonzero(gap) + 1).tolist(), n], most)
        new[:] = False
        new[cuts[:-1]] = True
    hole = np.zeros(n, dtype=bool)  # vector i continues a read past a gap: a sink piece before it
    hole[1:] = ~new[1:] & (gap > 0)
    at = np.arange(n) + np.cumsum(hole)  # vector i's piece
    size = n + int(hole.sum())
    starts, lengths, sunk = np.zeros(size, np.int64), np.full(size, vb, np.int64), np.zeros(size, bool)
    starts[at] = start
    lengths[at[hole] - 1] = gap[hole[1:]]
    sunk[at[hole] - 1] = True
    firsts = np.zeros(size, dtype=bool)
    firsts[at[new]] = True
    read_of = np.cumsum(firsts) - 1
    # A piece joins the last one where both are the output's, of one read, and adjacent in the output: a run of
    # records read into consecutive rows of a plane is one buffer, not one per record (many small scattered buffers
    # slow a direct read: 4 KiB buffers at an 8 KiB stride read about 25% slower than one 1 MiB buffer, measured).
    join = np.zeros(size, dtype=bool)
    join[1:] = (read_of[1:] == read_of[:-1]) & (starts[:-1] + lengths[:-1] == starts[1:]) & ~sunk[:-1] & ~sunk[1:]
    keep = np.flatnonzero(~join)
    first = (np.cumsum(~join) - 1)[at[new]]
    return (offset[new], first, np.diff(np.append(first, len(keep))), starts[keep], np.add.reduceat(lengths, keep),
            sunk[keep])


def copy_pieces(out: np.ndarray, staging: np.ndarray, dst: np.ndarray, src: np.ndarray, length: int) -> None:
    """out's bytes [dst[k], dst[k] + length) = staging's [src[k], src[k] + length) for every k, in one numpy copy
    (no Python loop per piece: the reader's threads copy thousands of pieces per layer without holding the GIL
    for each). Both are cut into rows of the largest size that divides every offset and the length."""
    if len(dst) == 0:
        return
    unit = int(np.gcd.reduce(np.concatenate([dst, src, [length, len(out.reshape(-1)), len(staging)]])))
    k = length // unit
    spans = np.arange(k)
    target = out.reshape(-1, unit)
    target[(dst // unit)[:, None] + spans] = staging.reshape(-1, unit)[(src // unit)[:, None] + spans]


class _Crew:
    """Persistent helper threads, each woken once per call through a lock of its own.

    Cheaper per call than a thread pool's futures (C-level locks only), which matters at thousands of
    reads a second on two cores."""

    def __init__(self, helpers: int):
        self._job = None
        self._error: BaseException | None = None
        self.cpu_s = [0.0] * helpers  # each helper's CPU time in jobs, summed over calls
        self._go = [threading.Lock() for _ in range(helpers)]
        self._done = [threading.Lock() for _ in range(helpers)]
        for lock in self._go + self._done:
            lock.acquire()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"flash-read-{i}")
                         for i in range(helpers)]
        for t in self._threads:
            t.start()

    def _loop(self, i: int) -> None:
        while True:
            self._go[i].acquire()
            job = self._job
            if job is None:
                return
            cpu = time.thread_time()
            try:
                job()
            except BaseException as e:  # handed to the caller in run()
                self._error = e
            finally:
                self.cpu_s[i] += time.thread_time() - cpu
                self._done[i].release()

    def run(self, job, helpers: int) -> None:
        """Run `job` on the calling thread and on `helpers` helper threads; return when all are done."""
        self._job, self._error = job, None
        for i in range(helpers):
            self._go[i].release()
        try:
            job()
        finally:
            for i in range(helpers):
                self._done[i].acquire()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._job = None
        for lock in self._go:
            lock.release()
        for t in self._threads:
            t.join()


BACKENDS = ("threads", "io_uring")


class FlashReader:
    """Reads records of a flash directory's FFN files. One instance per engine; not re-entrant."""

    def __init__(self, geometries: list[FFNGeometry], files: list[Path], threads: int = 16, direct: bool = True,
                 gap_bytes: int = 0, backend: str = "threads"):
        """`files[layer]` is that layer's FFN file, laid out as `geometries[layer]` says. `threads` reads are in
        flight at once: issued by that many threads (`backend` "threads", preadv), or kept in flight by one io_uring
        ring from C ("io_uring", where `uring.unavailable()` is None)."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "io_uring" and (why := uring.unavailable()):
            raise ValueError(f"the io_uring reader cannot be used here: {why}")
        if len(geometries) != len(files):
            raise ValueError(f"{len(geometries)} geometries for {len(files)} files")
        self.geometries = geometries
        self.files = [Path(f) for f in files]
        self.threads = threads
        self.gap_bytes = gap_bytes
        self.direct = direct
        self.fallback_reason: str | None = None if direct else "direct I/O switched off by the caller"
        self.storage = storage_of(self.files[0].parent if self.files else ".")
        if self.storage.in_memory:
            self._fall_back(f"{self.files[0].parent} lies on {self.storage.filesystem} (memory): no storage device to read")
        self._fds = [self._open(f) for f in self.files]
        self._retired: list[int] = []
        self.backend = backend
        self._ring = uring.Ring(threads) if backend == "io_uring" else None
        self._crew = _Crew(threads - 1) if threads > 1 and self._ring is None else None
        self._staging = aligned_buffer(0)
        self._sink = aligned_buffer(0)
        self._lock = threading.Lock()

    @classmethod
    def for_layout(cls, layout: FlashLayout, **options) -> "FlashReader":
        layers = range(layout.config.n_layers)
        return cls([layout.geometry_of(i) for i in layers], [layout.ffn_path(i) for i in layers], **options)

    def _open(self, path: Path) -> int:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._fall_back(f"O_DIRECT refused when opening {path}: {e.strerror}")
        return os.open(path, os.O_RDONLY)

    def _fall_back(self, reason: str) -> None:
        if self.direct:
            warnings.warn(f"flash reader: {reason}; falling back to buffered reads (page cache, NOT flash)",
                          stacklevel=3)
        self.direct, self.fallback_reason = False, reason

    def close(self) -> None:
        if self._crew:
            self._crew.close()
            self._crew = None
        if self._ring:
            self._ring.close()
            self._ring = None
        for fd in self._fds + self._retired:
            os.close(fd)
        self._fds, self._retired = [], []

    def __enter__(self) -> "FlashReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sink_for(self, nbytes: int) -> np.ndarray:
        """Where merged reads drop the bytes between their records (every gap of a call at its start)."""
        if len(self._sink) < nbytes:
            self._sink = aligned_buffer(max(nbytes, 2 * len(self._sink)))
        return self._sink

    def _staging_for(self, nbytes: int) -> np.ndarray:
        if len(self._staging) < nbytes:
            self._staging = aligned_buffer(max(nbytes, 2 * len(self._staging)))
        return self._staging

    def read(self, layer: int, ids, out: np.ndarray, rows: np.ndarray | None = None) -> ReadStats:
        """Fill row rows[k] of `out` (a `record_buffer`, [vectors, >= n, vector_bytes]; rows default 0, 1, ...) with
        record ids[k] of `layer`. `rows` lets a caller fill some rows of a buffer from elsewhere (the overlap's
        read-ahead) and read the others straight into theirs."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        rows = np.arange(len(ids), dtype=np.int64) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
        g = self.geometries[layer]
        need, k = (int(rows.max()) + 1 if len(rows) else 0), len(g.vectors)
        if out.dtype != np.uint8 or out.ndim != 3 or out.shape[0] != k or out.shape[1] < need or \
                out.shape[2] != g.vector_bytes or len(rows) != len(ids) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous uint8 record buffer [{k}, >= {need}, {g.vector_bytes}] "
                             f"with a row for each of {len(ids)} ids, got {out.dtype} {list(out.shape)} and "
                             f"{len(rows)} rows")
        if len(ids) and (ids.min() < 0 or ids.max() >= g.d_ffn):
            raise IndexError(f"record ids must lie in [0, {g.d_ffn}), got {ids.min()}..{ids.max()}")
        if len(rows) and rows.min() < 0:  # a read's buffer before out's: the kernel would write outside it
            raise IndexError(f"rows must be >= 0, got {rows.min()}")
        t0, cpu = time.perf_counter(), self._cpu()
        runs = self._in_place(g, ids, out, rows)
        if runs is not None:  # aligned vectors: each run of adjacent ones is one read straight into their rows
            self._submit(layer, runs)
            n_reads, total = len(runs.offsets), runs.nbytes
        else:
            n_reads, total = self._read_staged(layer, g, ids, out, rows)
        return ReadStats(
            records=len(ids), reads=n_reads, bytes_requested=len(ids) * g.record_bytes, bytes_read=total,
            seconds=time.perf_counter() - t0, direct=self.direct, cpu_s=self._cpu() - cpu,
        )

    def _cpu(self) -> float:
        """CPU seconds so far of the calling thread and the reader's helpers (a difference of two is a call's)."""
        return time.thread_time() + (sum(self._crew.cpu_s) if self._crew else 0.0)

    def _in_place(self, g: FFNGeometry, ids: np.ndarray, out: np.ndarray, out_rows: np.ndarray) -> Batch | None:
        """A read per run of vectors adjacent in the file, each vector straight into its row, where vectors can be
        read in place: each a multiple of the alignment long, into an aligned buffer, no duplicate ids. Else None
        (the staged path). A bundled record's vectors go to their planes in one read (one buffer each); an
        unbundled run of records is one read per matrix region, into consecutive rows of its plane (one buffer).
        Without `gap_bytes`, a run is cut after RUN_BYTES of its own; with them, vectors at most that far apart are
        one read, cut at the file's RUN_BYTES boundaries as `plan_reads` cuts, the bytes between them read into a
        sink: merging costs the gap's bytes on the disk and no copy. The bytes read are the ones `plan_reads`
        plans for these ids. Planned in C where the io_uring library is built (`uring.plan_records`), else by
        `plan_in_place`: the same plan."""
        vb, plane = g.vector_bytes, out.strides[0]
        if vb % ALIGNMENT or len(ids) == 0 or out.ctypes.data % ALIGNMENT:
            return None
        bases = np.array([offset for offset, _ in g.extents(0)], dtype=np.int64)
        plan = uring.plan_records if uring.can_plan() else plan_in_place
        planned = plan(ids, out_rows, bases, g.neuron_stride, vb, plane, self.gap_bytes, RUN_BYTES,
                       max(1, min(IOV_MAX, RUN_BYTES // vb)))
        if planned is None:
            return None
        offsets, first, count, starts, lengths, to_sink = planned
        sink = self._sink_for(int(lengths[to_sink].max())) if to_sink.any() else None
        return Batch(out.reshape(-1), offsets, starts, lengths, first, count, sink,
                     to_sink if sink is not None else None)

    def _submit(self, layer: int, batch: Batch, done=None) -> None:
        """Issue a batch's reads. With io_uring, all of them from C in one call; with threads, each thread runs
        `sum(starmap(preadv, shared iterator of reads))`: the loop between reads is wholly in C, so a thread holds
        the GIL for about a microsecond per read. `done(reads)` (a slice), where given, is called as reads land:
        per read from the thread that read it, or once for all with io_uring.

        The sums tell whether every read was whole. If not (a short read, an error, O_DIRECT refused at read),
        the reads are made again one by one through `_pread`, which falls back or raises naming the file."""
        n = len(batch.offsets)
        if self._ring is not None:
            got = self._ring.read(self._fds[layer], batch.offsets, batch.iovecs(), batch.first, batch.count)
            if got != batch.nbytes:
                for buffers, offset in batch.runs():
                    self._pread(layer, buffers, offset)
            if done is not None:
                done(slice(0, n))
            return
        runs = batch.runs()
        if done is not None:
            def one(i: int) -> None:
                self._pread(layer, *runs[i])
                done(slice(i, i + 1))

            self._run_all(one, list(range(n)))
            return
        preadv, shared = functools.partial(os.preadv, self._fds[layer]), iter(runs)
        finished: list[int] = []

        def job() -> None:
            try:
                finished.append(sum(itertools.starmap(preadv, shared)))
            except OSError:
                finished.append(-1)

        if self._crew is None or n == 1:
            job()
        else:
            self._crew.run(job, min(self.threads, n) - 1)
        if -1 in finished or sum(finished) != batch.nbytes:
            for buffers, offset in runs:
                self._pread(layer, buffers, offset)

    def _read_staged(self, layer: int, g: FFNGeometry, ids: np.ndarray, out: np.ndarray,
                     out_rows: np.ndarray) -> tuple[int, int]:
        """The general path: covering blocks into the staging buffer, then the pieces of the reads that landed
        copied to their rows (every piece is one vector: bundled records are split between the planes)."""
        plan = plan_reads(g, ids, self.gap_bytes, rows=out_rows)
        total = 0
        for r in plan.reads:
            r.staging, total = total, total + r.length
        staging = self._staging_for(total)
        length = g.vector_bytes
        dst = plan.column // length * out.strides[0] + plan.row * length  # vector j of row r: out[j, r]
        read_at = np.repeat([r.offset - r.staging for r in plan.reads], [r.last - r.first for r in plan.reads])

        def landed(reads: slice) -> None:
            pieces = slice(plan.reads[reads.start].first, plan.reads[reads.stop - 1].last)
            copy_pieces(out, staging, dst[pieces], plan.offset[pieces] - read_at[pieces], length)

        batch = Batch.whole(staging, [r.offset for r in plan.reads], [r.staging for r in plan.reads],
                            [r.length for r in plan.reads])
        if plan.reads:
            self._submit(layer, batch, landed)
        return len(plan.reads), total

    def read_layer(self, layer: int, out: np.ndarray, first: int = 0, chunk_bytes: int = 1 << 20) -> ReadStats:
        """Naive mode: the layer's whole FFN file into `out` (an aligned uint8 buffer of its size), in chunks; from
        record `first` on (the hybrid alone over a placed layout, its hot records first), each byte where it lies
        in the file."""
        g = self.geometries[layer]
        size = g.file_bytes
        if out.dtype != np.uint8 or out.shape != (size,) or out.ctypes.data % ALIGNMENT:
            raise ValueError(f"out must be an aligned uint8 buffer of {size} bytes (see aligned_buffer)")
        t0, cpu = time.perf_counter(), self._cpu()
        offsets = np.concatenate([np.arange(start, end, chunk_bytes, dtype=np.int64)
                                  for start, end in g.spans_from(first)])
        ends = np.concatenate([np.minimum(np.arange(start, end, chunk_bytes) + chunk_bytes, end)
                               for start, end in g.spans_from(first)])
        self._submit(layer, Batch.whole(out, offsets, offsets, ends - offsets))
        size = int((ends - offsets).sum())
        return ReadStats(records=g.d_ffn - first, reads=len(offsets), bytes_requested=size, bytes_read=size,
                         seconds=time.perf_counter() - t0, direct=self.direct, cpu_s=self._cpu() - cpu)

    def _run_all(self, fn, items: list) -> None:
        """Run fn over items on the pool; each worker pulls the next item, so slow reads do not stall others."""
        if self._crew is None or len(items) <= 1:
            for item in items:
                fn(item)
            return
        counter = itertools.count()

        def worker() -> None:
            while (i := next(counter)) < len(items):
                fn(items[i])

        self._crew.run(worker, min(self.threads, len(items)) - 1)

    def _pread(self, layer: int, buffers: list[np.ndarray], offset: int) -> None:
        expected = sum(len(b) for b in buffers)
        fd = self._fds[layer]
        try:
            n = os.preadv(fd, buffers, offset)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            with self._lock:  # some filesystems accept O_DIRECT at open and refuse it at read
                if fd in self._fds:  # nobody has fallen back since this read began
                    if not self.direct:
                        raise
                    self._fall_back(f"O_DIRECT read refused on {self.files[layer]}: {e.strerror}")
                    self._retired += self._fds  # other threads may still be reading through them
                    self._fds = [os.open(f, os.O_RDONLY) for f in self.files]
            n = os.preadv(self._fds[layer], buffers, offset)
        if n != expected:
            raise OSError(errno.EIO, f"short read: {n} of {expected} bytes at offset {offset} of "
                          f"{self.files[layer]} (file truncated?)")
