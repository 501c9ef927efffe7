"""The flash engine: the dense transformer with each FFN swapped for one that reads its neurons from flash.

Every technique is a switch of `Techniques` on this one engine:
- `source`: which neurons a token needs (`predictor`, `oracle`, `trace`, or `all`: with no hybrid, the naive
  baseline, every FFN file read whole for every token; with a hybrid, every neuron not kept resident);
- `window` k: neurons needed by the last k tokens stay cached; a token reads only the delta (k = 0: no reuse);
- `hybrid`: the fraction of each layer's neurons, the most often active ones, kept resident and never read;
- `memory`: `preallocated` (the neuron cache's fixed matrix) or `regather` (matrices rebuilt per token);
- the flash directory's layout (bundled or unbundled), storage dtype (int8 included) and dead-neuron pruning
  (neurons left out of the layout are dropped from every set) are the directory's;
- `threads`, `direct`, `gap_bytes`, `reader`: the reader's settings (`reader`: how its `threads` reads in flight are
  issued, by threads or by one io_uring ring from C);
- `threshold`: a SiLU-gated FFN made sparse (CATS, `threshold.py`): activations of magnitude at most a per-layer
  threshold (calibrated to this target sparsity, passed in as `thresholds`) are zero, so the sparse techniques
  apply; lossy, and 0 (off) for ReLU FFNs, which are sparse already;
- `compute_dtype`: the precision weights are held and multiplied in. float32 is exact against the float32 dense
  engine; float16 or bfloat16 (the paper's 16-bit setting) halves the DRAM resident weights and the neuron cache
  need, and is compared with a dense engine of the same precision;
- `device`: where the resident weights, the neuron cache, the KV cache and the compute live (`cpu`, or `cuda`: reads
  land in pinned host buffers and go to the GPU in asynchronous copies, `device.py`);
- `matvec`: how a decode step's products of one position with a weight matrix run (attention, the LM head, the FFN's
  up and gate rows): "linear" (F.linear), "mv" (torch.mv / addmv) or, for 16-bit weights on the CPU, "rows" (this
  project's C kernel, row_kernels.c), the same sums by kernels whose speed depends on the CPU and the dtype
  (`model.project`; the probe measures each, harness/compute.py);
- `overlap`: reads run on a thread of their own (`ReadAhead`) while the engine computes, twice over. While layer L
  computes, read what layer L + 1 will need, guessed by the source's lookahead from layer L's FFN input: its most
  confident guesses not cached, at most READ_AHEAD times as many as layer L + 1 read for the last pass (all of them
  where every neuron is needed, as with the hybrid alone: the guess is then the set itself). Layer L + 1
  then reads only what the guess missed, and multiplies the rows it holds (hot and window neurons) while those reads
  are in flight, then the rows read. Naive reads read the next layer's whole file ahead (double buffering). Every
  layer multiplies its rows in two groups, those held before the pass and those it read, with or without overlap, so
  overlap decides only when bytes are read and the logits are the same to the last bit. Nothing is read ahead across
  a token: each pass ends with its reads done.
With no window, nothing is reused, so the delta is multiplied straight from the read buffer and only the hot
neurons live in the neuron cache.
Per token it reports I/O, memory management, predictor and compute seconds, and the reader's exact counters.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import row_kernels
from .activations import hot_neurons
from .cache import NeuronCache, Part, RegatherCache, RowMover, as_words, whole
from .device import NAME as DEVICE_NAME
from .device import Transfer, exact_float32, resolve
from .engine import Engine
from .errors import BudgetError
from .layout import FlashLayout, decode_layer_file, decode_records
from .model import MATVEC, Transformer, activation, check_matvec, project
from .reader import FlashReader, ReadStats, aligned_buffer, record_buffer
from .sources import ActivationSource, AllNeurons, Oracle
from .threshold import ThresholdedSiLU, check_target

SOURCES = ("predictor", "oracle", "trace", "all")
PINNED = np.iinfo(np.int64).max  # the "last needed" position of hot neurons: never evicted
MEMORY = ("preallocated", "regather")
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Overlap reads ahead at most this many times the neurons the layer read for its last pass, the most confident
# guesses first: a lookahead's guesses of a windowed delta are mostly wrong past its top ones (shakespeare-opt's
# lookahead, window 5: capped at 1x it covered 48% of the delta for 0.42 unneeded neurons per needed one; at 2x 62%
# for 0.78; uncapped 73% for 1.6). On the OPT 1.3B shape 2x took as long as 1x, for twice the wasted reads. At the
# paper's shape, 1x read 17,355 neurons ahead a token of which 8,072 were used; each read costs CPU (the reading
# thread's 75-85 ms a token), which on 2 cores the products lose about twice over, and the misses are read while the
# held rows multiply anyway: 0.4x made all combined and all but placement faster in each of 6 paired runs (2-24%, mean
# 9.5%; docs/results.md, 2026-12-03, fourth session).
READ_AHEAD = 0.4


@dataclass(frozen=True)
class Techniques:
    source: str = "predictor"
    window: int = 0
    hybrid: float = 0.0
    memory: str = "preallocated"
    threads: int = 16
    reader: str = "threads"  # "threads" (preadv from a thread pool) or "io_uring" (reader.BACKENDS)
    direct: bool = True
    gap_bytes: int = 0
    compute_dtype: str = "float32"
    device: str = "cpu"
    threshold: float = 0.0  # target sparsity of a thresholded SiLU FFN; 0: not thresholded
    overlap: bool = False  # read layer L + 1's guessed needs while layer L computes
    matvec: str = "linear"  # one-position products: "linear" (F.linear), "mv" (torch.mv) or "rows" (row_kernels)

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.memory not in MEMORY:
            raise ValueError(f"memory must be one of {', '.join(MEMORY)}, got {self.memory!r}")
        if self.matvec not in MATVEC:
            raise ValueError(f"matvec must be one of {', '.join(MATVEC)}, got {self.matvec!r}")
        check_matvec(self.matvec, self.compute_dtype, self.device)
        if self.window < 0 or not 0.0 <= self.hybrid <= 1.0:
            raise ValueError(f"window must be >= 0 and hybrid in [0, 1], got {self.window}, {self.hybrid}")
        if not DEVICE_NAME.fullmatch(self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        check_target(self.threshold)
        if self.source == "all" and self.window:
            raise ValueError("source 'all' needs every neuron every token: a window saves nothing")

    @property
    def torch_dtype(self) -> torch.dtype:
        """compute_dtype as torch names it."""
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def reads_whole_layers(self) -> bool:
        """The naive baseline: every FFN file read whole for every token (no hot neurons kept)."""
        return self.source == "all" and not self.hybrid

    @classmethod
    def naive(cls, **reader_settings) -> "Techniques":
        return cls(source="all", **reader_settings)


@dataclass
class TokenStats:
    """One forward pass (a decode step, or a whole prefill), summed over layers."""

    tokens: int = 0
    total_s: float = 0.0
    memory_s: float = 0.0
    predictor_s: float = 0.0  # the lookahead's guesses included
    io: ReadStats = field(default_factory=ReadStats)  # the reader's counters; io.records = neurons loaded
    io_wait_s: float = 0.0  # of io.seconds, the time the pass waited for reads (all of it without overlap)
    cached: int = 0  # neurons in DRAM after the pass (hot ones included), all layers
    multiplied: int = 0  # neurons in the pass's FFN products (their rows multiplied), all layers
    window_shrinks: int = 0
    read_ahead: int = 0  # neurons read ahead by the overlap (whole-file reads ahead: every neuron of the file)
    read_ahead_used: int = 0  # of them, those the layer then needed (the rest were read for nothing)

    @property
    def io_hidden_s(self) -> float:
        """Read time that ran behind compute (overlap), not waited for."""
        return max(0.0, self.io.seconds - self.io_wait_s)

    @property
    def compute_s(self) -> float:
        return max(0.0, self.total_s - self.io_wait_s - self.memory_s - self.predictor_s)


@dataclass(frozen=True)
class Piece:
    """Where some of a pass's records lie: in `buffer` (a record buffer), the neurons at positions `at` of the pass's
    ids in rows `rows`; `at` None: all of them, in its first rows."""

    buffer: np.ndarray
    at: np.ndarray | None = None
    rows: np.ndarray | None = None


@dataclass
class Ahead:
    """A read-ahead that has landed: what was read, for which layer, into which buffer."""

    layer: int
    ids: np.ndarray | None  # the neurons read (in the file order of their records), or None: the whole layer file
    buffer: np.ndarray  # a record buffer (ids[k] in row k, or in row rows[k]), or the file's bytes
    rows: np.ndarray | None  # where in buffer the records landed (read ahead into a neuron cache: their slots)
    stats: ReadStats
    waited_s: float  # how long the engine waited for it to land


class ReadAhead:
    """One read in flight on a thread of its own, while the engine computes (the overlap technique): the next
    layer's guessed needs, or a layer's own delta while it multiplies the rows it holds. The reader is not
    re-entrant, so the engine takes (waits for) the read in flight before it reads anything else."""

    def __init__(self, reader: FlashReader):
        self.reader = reader
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flash-read-ahead")
        self._pending: tuple[int, np.ndarray | None, np.ndarray, np.ndarray | None, Future] | None = None

    def start(self, layer: int, ids: np.ndarray | None, records: np.ndarray | None, buffer: np.ndarray,
              rows: np.ndarray | None = None, first: int = 0) -> None:
        """Read `records` of `layer` (neurons `ids`) into buffer's first rows (a record buffer), or into `rows`,
        or with ids None the layer's whole file (from record `first` on)."""
        if self._pending is not None:  # each read is taken before the next one starts
            raise RuntimeError(f"a read for layer {self._pending[0]} is still in flight")
        read = (lambda: self.reader.read_layer(layer, buffer, first)) if ids is None else (
            lambda: self.reader.read(layer, records, buffer, rows))
        self._pending = (layer, ids, buffer, rows, self._pool.submit(read))

    def take(self) -> Ahead | None:
        """Wait for the read in flight, if any, and hand it over."""
        if self._pending is None:
            return None
        layer, ids, buffer, rows, future = self._pending
        self._pending = None
        t0 = time.perf_counter()
        stats = future.result()
        return Ahead(layer, ids, buffer, rows, stats, time.perf_counter() - t0)

    def close(self) -> None:
        try:
            self.take()
        finally:
            self._pool.shutdown()


@dataclass
class _Shared:
    """What the layers of one engine share: the reader, the source, buffers and the current pass's stats."""

    techniques: Techniques
    layout: FlashLayout
    reader: FlashReader
    source: ActivationSource
    capacity: int  # neuron cache rows per layer: the window's room (a pass's delta included)
    spare: int  # more free slots per layer, for the read-ahead to land in (overlap, where reads land in the caches)
    lands: bool  # reads land in the neuron caches' free slots (a window, preallocated, the CPU, the same dtype)
    transfer: Transfer  # read buffers -> the device (the identity on the CPU)
    mover: RowMover  # moves scattered rows of the read buffers (the read-ahead's) through one staging buffer
    cache_mover: RowMover  # the same for the neuron caches' inserts, on their device
    touch_caches: bool  # the caches' pages written at build (their capacity is the DRAM budget's)
    stats: TokenStats = field(default_factory=TokenStats)
    # Every layer's file read whole, from its first record not kept hot (naive, and the hybrid alone over a layout
    # that stores its hot records first): the file's bytes land where they lie, in one buffer (two: overlap)
    whole_files: bool = False
    file_buffers: list[np.ndarray] = field(default_factory=list)
    record_buffer: np.ndarray | None = None  # the delta's records (reader.record_buffer): its rows bound a pass's reads
    ahead_buffer: np.ndarray | None = None  # overlap: the next layer's guessed records, as many rows
    read_ahead: ReadAhead | None = None  # overlap
    layers: list["FlashFFN"] = field(default_factory=list)

    def landed(self, layer: int) -> Ahead | None:
        """The read-ahead, waited for and counted; None where there was none for `layer` (one for another layer,
        left by an interrupted pass, is counted as read and dropped)."""
        ahead = self.read_ahead.take() if self.read_ahead else None
        if ahead is None:
            return None
        self.stats.io += ahead.stats
        self.stats.io_wait_s += ahead.waited_s
        self.stats.read_ahead += ahead.stats.records
        return ahead if ahead.layer == layer else None

    def read(self, layer: int, ids: np.ndarray, records: np.ndarray, out: np.ndarray,
             rows: np.ndarray | None = None) -> None:
        """A read of the pass's own, counted: done now, or with overlap started in the background, for `wait_read`
        to wait for while the layer multiplies the rows it holds."""
        if self.read_ahead is not None:
            self.read_ahead.start(layer, ids, records, out, rows)
            return
        stats = self.reader.read(layer, records, out, rows)
        self.stats.io += stats
        self.stats.io_wait_s += stats.seconds

    def wait_read(self) -> None:
        """Wait for the pass's own read in flight (overlap), if any, counting how long it took and was waited for."""
        done = self.read_ahead.take() if self.read_ahead else None
        if done is not None:
            self.stats.io += done.stats
            self.stats.io_wait_s += done.waited_s


class FlashFFN(nn.Module):
    """One layer's FFN, served from flash through the neuron cache."""

    def __init__(self, layer: int, shared: _Shared, up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
                 gate: torch.Tensor | None, hot: np.ndarray, threshold: float | None = None):
        """`gate`: the layer's resident gate matrix [d_ffn, d] where the layout keeps it in DRAM (its records then
        hold only up and down)."""
        super().__init__()
        self.layer, self.shared = layer, shared
        self.up_bias, self.down_bias, self.gate = up_bias, down_bias, gate
        self.geometry = g = shared.layout.geometry_of(layer)
        d_ffn = shared.layout.config.d_ffn
        # Neuron id -> record index in this layer's file (-1: pruned from the layout).
        self.stored = shared.layout.stored_ids(layer)
        self.record_of = np.full(d_ffn, -1, dtype=np.int64)
        self.record_of[self.stored] = np.arange(len(self.stored))
        self.gated = shared.layout.config.gated
        # A module: in naive reads its output is every neuron's. Thresholded, it zeroes the weak activations of the
        # neurons read (the predictor's false positives among them), as the dense thresholded model does.
        self.act = ThresholdedSiLU(threshold) if threshold is not None else activation(shared.layout.config)
        dtype, device = shared.techniques.torch_dtype, shared.transfer.device
        if shared.techniques.memory == "regather":
            self.cache = RegatherCache(shared.capacity, g.d_model, self.gated, up_bias is not None, dtype, device)
        else:
            self.cache = NeuronCache(shared.capacity + shared.spare, g.d_model, d_ffn, self.gated, up_bias is not None,
                                     dtype, device, touch=shared.touch_caches, mover=shared.cache_mover)
        # Where a windowed pass's records, and the previous layer's read-ahead of them, can be read straight into
        # the cache's free slots (their bytes on flash are the rows' bytes, and the cache lies on the CPU): nothing
        # is copied then. (Without a window the cache holds only the hot neurons: no free slots.)
        self.landing = self.cache.planes(g.vectors) if shared.lands else None
        self.in_id_order = bool((np.diff(self.stored) > 0).all())  # records by neuron id (not a placed layout)
        self.hot = self._in_file_order(self._stored_only(np.sort(hot).astype(np.int64)))
        # Reading the layer's file whole, the first record read: past the hot ones where they lie first (placed)
        self.first_read = len(self.hot) if hot_first(self.stored, self.hot) else 0
        # The window: the position of the last token that needed each neuron (hot ones: never evicted).
        self.last_needed = np.full(d_ffn, -1, dtype=np.int64)
        self.last_needed[self.hot] = PINNED
        self.position = 0  # tokens of the current sequence seen by this layer
        self.last_read: int | None = None  # neurons read for the last pass (None: none yet in this sequence)
        self.peak_rows = 0  # most neurons held at once (window + this pass): the cache size this run needed
        self.max_needed = 0  # most neurons one pass needed (hot ones included)

    def load_hot(self) -> None:
        """Read the hybrid's hot neurons once and pin them (not counted as per-token I/O)."""
        if not len(self.hot):
            return
        sh = self.shared
        if sh.whole_files:  # no record buffer (the file buffers take its place): one for the hot records, for now
            g = self.geometry
            buffer = record_buffer(g, len(self.hot), aligned_buffer(len(self.hot) * g.record_bytes))
            sh.reader.read(self.layer, self.record_of[self.hot], buffer)
            self.cache.insert(self.hot, self._rows(self.hot, [Piece(buffer)]), self._bias(self.hot), pin=True)
            sh.transfer.wait()  # copied out before the buffer goes
            return
        step = sh.record_buffer.shape[1]
        for i in range(0, len(self.hot), step):  # as many at a time as the read buffer holds
            ids = self.hot[i : i + step]
            sh.transfer.wait()
            sh.reader.read(self.layer, self.record_of[ids], sh.record_buffer)
            self.cache.insert(ids, self._rows(ids, [Piece(sh.record_buffer)]), self._bias(ids), pin=True)

    def reset(self) -> None:
        self.cache.delete(np.setdiff1d(self.cache.cached_ids(), self.hot))
        self.last_needed[self.last_needed != PINNED] = -1
        self.position = 0
        self.last_read = None

    def _in_file_order(self, ids: np.ndarray) -> np.ndarray:
        """`ids` (sorted) in the order their records lie in the layer file, the order they are read, land in the
        read buffer and are multiplied in: a run of adjacent records then lands in adjacent rows, one buffer per
        read (a placed layout's records are not in neuron-id order; read in id order, its cold run was scattered
        record by record over the buffer, which read about a third slower)."""
        return ids if self.in_id_order else ids[np.argsort(self.record_of[ids], kind="stable")]

    def _stored_only(self, ids: np.ndarray) -> np.ndarray:
        """`ids` without the neurons pruned from the layout (they were never active on the pruning text)."""
        return ids[self.record_of[ids] >= 0]

    def _bias(self, ids: np.ndarray) -> torch.Tensor | None:
        if self.up_bias is None:
            return None
        return self.up_bias[torch.from_numpy(ids).to(self.up_bias.device)]

    def _fetch(self, ids: np.ndarray, gather: bool) -> tuple[list[Piece], np.ndarray | None]:
        """Bring the records of neurons `ids` (in file order) into DRAM. Where the neuron cache can take reads
        (`landing`), the ones the read-ahead brought lie in its free slots already and the others are read into
        more of them, in the background with overlap (`_Shared.wait_read`): returns no pieces and every id's slot,
        nothing to copy. Elsewhere, returns where the records lie (pieces) for the insert to copy: the read-ahead's
        stay in its buffer (where it brought exactly these, the buffers swap roles), the others are read into their
        rows of the record buffer; with `gather`, the read-ahead's are copied there too, so that all lie in one (for
        products straight from it, or one copy to a device)."""
        sh = self.shared
        self.last_read = len(ids)
        sh.transfer.wait()  # the last copy out of the buffer is done before it is filled again
        ahead = sh.landed(self.layer)
        if not gather and self.landing is not None:
            slots, missed, taken = np.empty(len(ids), dtype=np.int64), np.arange(len(ids)), None
            if ahead is not None:  # read ahead into this cache's free slots
                hits, at, missed = self._found(ahead.ids, ids)
                slots[hits] = taken = ahead.rows[at]
                sh.stats.read_ahead_used += len(hits)
            slots[missed] = self.cache.free_slots(len(missed), taken=taken)
            sh.read(self.layer, ids[missed], self.record_of[ids[missed]], self.landing, rows=slots[missed])
            return [], slots
        if ahead is not None and np.array_equal(ahead.ids, ids):  # all read ahead, in order: the buffers swap roles
            sh.record_buffer, sh.ahead_buffer = sh.ahead_buffer, sh.record_buffer
            sh.stats.read_ahead_used += len(ids)
            return [Piece(sh.record_buffer)], None
        out = sh.record_buffer
        if ahead is None:
            sh.read(self.layer, ids, self.record_of[ids], out)
            return [Piece(out)], None
        hits, at, missed = self._found(ahead.ids, ids)
        # First, so that the copies run beside it.
        sh.read(self.layer, ids[missed], self.record_of[ids[missed]], out, rows=missed)
        sh.stats.read_ahead_used += len(hits)
        if not gather:
            return [Piece(ahead.buffer, hits, at), Piece(out, missed, missed)], None
        t0 = time.perf_counter()
        for plane, ahead_plane in zip(out, ahead.buffer):  # [rows, vector_bytes] per vector
            sh.mover.copy(torch.from_numpy(plane), hits, torch.from_numpy(ahead_plane), at)
        sh.stats.memory_s += time.perf_counter() - t0
        return [Piece(out)], None

    def _found(self, have: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Of `want`, those read ahead in `have` (both in file order): their positions in want and in have, and the
        positions in want of the rest."""
        have, want = self.record_of[have], self.record_of[want]  # increasing
        at = np.searchsorted(have, want)
        hit = at < len(have)
        hit[hit] = have[at[hit]] == want[hit]
        return np.flatnonzero(hit), at[hit], np.flatnonzero(~hit)

    def _rows(self, ids: np.ndarray, pieces: list[Piece]) -> list[Part]:
        """The vectors of neurons `ids` where `_fetch` left them, on the device (views of the buffers where the
        dtypes agree), and their gate rows from DRAM where the layout keeps them there."""
        sh = self.shared
        t0 = time.perf_counter()
        parts = []
        for piece in pieces:
            n = len(ids) if piece.at is None else int(piece.rows.max(initial=-1)) + 1  # the buffer rows in use
            vectors = decode_records(piece.buffer[:, :n], self.geometry, sh.techniques.torch_dtype)
            parts.append(Part(sh.transfer.to_device(vectors), piece.at, piece.rows))
        parts += self._gate_rows(ids)
        sh.stats.memory_s += time.perf_counter() - t0
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ValueError("the flash engine decodes one sequence at a time (batch 1)")
        sh, xs = self.shared, x[0]
        t0 = time.perf_counter()
        sets = sh.source.sets(self.layer, xs)
        sh.stats.predictor_s += time.perf_counter() - t0
        if sh.whole_files:
            return self._naive(xs)[None]

        start, end = self.position, self.position + len(sets)
        self.position = end
        needed = self._stored_only(union_of([self.hot, *sets], len(self.record_of)))
        self.max_needed = max(self.max_needed, len(needed))
        if not sh.techniques.window:
            return self._uncached(xs, needed)[None]
        for j, ids in enumerate(sets):
            self.last_needed[ids] = np.maximum(self.last_needed[ids], start + j)
        delta = self._in_file_order(self._make_room(needed, start, self.cache.missing(needed)))
        # One buffer on a GPU (one copy to the device) and for the regathering cache (the plain implementation).
        pieces, slots = self._fetch(delta, gather=sh.transfer.gpu or not isinstance(self.cache, NeuronCache))
        # While the delta is read: the window's and hot rows, by neuron id wherever they lie (so the sums' order does
        # not depend on where reads landed); the next layer's guesses; and the neurons the window no longer keeps
        # forgotten (the delta, not inserted yet, is needed by this token: it stays).
        held_ids = self.cache.cached_ids()
        held = self._share(xs, *self.cache.rows_of(held_ids))
        guess = self._guess_ahead(xs)
        t0 = time.perf_counter()
        self._evict_before(end - sh.techniques.window)  # keep what the last k tokens needed
        sh.stats.memory_s += time.perf_counter() - t0
        sh.wait_read()
        rows = self._rows(delta, pieces)
        t0 = time.perf_counter()
        self.cache.insert(delta, rows, self._bias(delta), slots=slots)  # before the read-ahead refills its buffer
        self.peak_rows = max(self.peak_rows, len(held_ids) + len(delta))
        sh.stats.memory_s += time.perf_counter() - t0
        self._read_ahead(guess)
        sh.stats.multiplied += len(held_ids) + len(delta)

        out = self._total(xs, [held, self._share(xs, *self.cache.rows_of(delta))])
        sh.stats.cached += self.cache.n
        return out[None]

    def _uncached(self, xs: torch.Tensor, needed: np.ndarray) -> torch.Tensor:
        """No window, so no reuse: the delta (every needed neuron not hot) is multiplied straight from the read
        buffer, beside the hot neurons in the cache; nothing is inserted or evicted."""
        delta = self._in_file_order(self.cache.missing(needed))
        room = self.shared.record_buffer.shape[1]
        if len(delta) > room:
            raise BudgetError(f"layer {self.layer}: a pass needs {len(delta)} neurons read, the read buffer holds "
                              f"{room}: raise the DRAM budget")
        pieces, _ = self._fetch(delta, gather=True)
        hot = self._share(xs, *self.cache.rows_of(self.cache.cached_ids()))  # while the delta is read
        guess = self._guess_ahead(xs)
        self.shared.wait_read()
        rows = whole(self._rows(delta, pieces))
        self._read_ahead(guess)
        self.peak_rows = max(self.peak_rows, self.cache.n)
        self.shared.stats.cached += self.cache.n
        self.shared.stats.multiplied += len(delta) + self.cache.n
        return self._total(xs, [hot, self._share(xs, rows, None, self._bias(delta))])

    def _guess_ahead(self, xs: torch.Tensor) -> np.ndarray | None:
        """Overlap: the next layer's likeliest needs that it does not hold, guessed from this layer's FFN input: its
        guesses most confident first, at most READ_AHEAD times what it read for its last pass and what the
        read-ahead buffer takes, in file order; None without overlap or after the last layer (no read crosses a
        token). Where every neuron is needed (source "all": the hybrid alone) the guess is exact, so all of it: the
        next layer's buffers then swap roles, where a part would be copied beside the rest (docs/results.md, seventh
        session). Made while this layer's own reads are in flight; `_read_ahead` starts reading it."""
        sh = self.shared
        if sh.read_ahead is None or self.layer + 1 == len(sh.layers):
            return None
        nxt = sh.layers[self.layer + 1]
        t0 = time.perf_counter()
        guesses = np.concatenate(sh.source.lookahead(self.layer, xs) or [np.zeros(0, np.int64)]).astype(np.int64)
        guess = nxt.cache.missing(nxt._stored_only(first_occurrences(guesses, len(nxt.record_of))))
        # Into the next layer's free slots where its cache takes reads, else into the read-ahead buffer.
        room = nxt.cache.capacity - nxt.cache.n if nxt.landing is not None else sh.ahead_buffer.shape[1]
        exact = sh.techniques.source == "all"
        most = room if nxt.last_read is None or exact else min(room, READ_AHEAD * nxt.last_read)
        ids = nxt._in_file_order(np.sort(guess[: int(most)]))
        sh.stats.predictor_s += time.perf_counter() - t0
        return ids

    def _read_ahead(self, ids: np.ndarray | None) -> None:
        """Overlap: start reading the next layer's guessed needs (`_guess_ahead`) while this layer computes."""
        sh = self.shared
        if ids is None:
            return
        nxt = sh.layers[self.layer + 1]
        if len(ids) and nxt.landing is not None:
            sh.read_ahead.start(nxt.layer, ids, nxt.record_of[ids], nxt.landing, rows=nxt.cache.free_slots(len(ids)))
        elif len(ids):
            sh.read_ahead.start(nxt.layer, ids, nxt.record_of[ids], sh.ahead_buffer)

    def _evict_before(self, position: int) -> None:
        """Delete the cached neurons last needed before `position` (hot ones never are)."""
        cached = self.cache.cached_ids()
        self.cache.delete(cached[self.last_needed[cached] < position])

    def _make_room(self, needed: np.ndarray, start: int, delta: np.ndarray) -> np.ndarray:
        """Where the window's neurons and this pass's delta overflow the cache, forget the window's oldest tokens
        first (shrinking it, as the paper does), as few as make room, in one delete; a pass
        that alone does not fit is an error. Memory management, and timed as such."""
        sh = self.shared
        oldest = start - sh.techniques.window  # the window's first position: older neurons are gone already
        must_go = self.cache.n + len(delta) - sh.capacity  # the spare slots are the read-ahead's alone
        if must_go > 0 and self.cache.n:
            t0 = time.perf_counter()
            last = np.sort(self.last_needed[self.cache.cached_ids()])  # hot neurons' PINNED sorts last
            # The window's new first position: after the must_go-th oldest neuron's last need (at most this pass).
            keep_from = min(start, max(oldest + 1, int(last[min(must_go, len(last)) - 1]) + 1))
            self._evict_before(keep_from)
            sh.stats.window_shrinks += keep_from - oldest
            sh.stats.memory_s += time.perf_counter() - t0
        if self.cache.n + len(delta) > sh.capacity:
            raise BudgetError(f"layer {self.layer}: a pass needs {len(needed)} neurons, the cache holds "
                              f"{sh.capacity}: raise the DRAM budget")
        return delta

    def _naive(self, xs: torch.Tensor) -> torch.Tensor:
        """Every neuron, from the layer's whole file, as naive reads it; with overlap the file was read ahead
        (buffers alternate by layer) and the next one's read starts now. The hybrid alone over a layout that stores
        its hot records first reads the file from the first cold record on, in the same reads, and adds the hot
        neurons' share from the cache: fewer bytes in naive's reads, where runs of cold records between scattered
        hot ones land in as many pieces a read (their reads took a third more CPU than naive's at the paper's
        shape, docs/results.md)."""
        sh = self.shared
        buffer = sh.file_buffers[self.layer % len(sh.file_buffers)][: self.geometry.file_bytes]
        sh.transfer.wait()
        ahead = sh.landed(self.layer)
        if ahead is None:
            stats = sh.reader.read_layer(self.layer, buffer, self.first_read)
            sh.stats.io += stats
            sh.stats.io_wait_s += stats.seconds
        else:
            sh.stats.read_ahead_used += ahead.stats.records
        if sh.read_ahead is not None and self.layer + 1 < len(sh.layers):
            nxt = sh.layers[self.layer + 1]
            sh.read_ahead.start(nxt.layer, None, None,
                                sh.file_buffers[nxt.layer % len(sh.file_buffers)][: nxt.geometry.file_bytes],
                                first=nxt.first_read)
        hot = self._share(xs, *self.cache.rows_of(self.hot)) if len(self.hot) else None
        t0 = time.perf_counter()
        cold = self.stored[self.first_read:]
        weights = sh.transfer.to_device({name: v[self.first_read:] for name, v in decode_layer_file(
            buffer, self.geometry, sh.techniques.torch_dtype).items()})
        weights |= {name: v for part in self._gate_rows(cold) for name, v in part.vectors.items()}
        sh.stats.memory_s += time.perf_counter() - t0
        sh.stats.multiplied += len(self.stored)
        return self._total(xs, [hot, self._share(xs, weights, None, self._bias(cold))])

    def _gate_rows(self, ids: np.ndarray) -> list[Part]:
        """The gate rows of neurons `ids` where the layout keeps the gate in DRAM (as they are, for every neuron
        in id order), else none."""
        if self.gate is None:
            return []
        if len(ids) == len(self.record_of) and (np.diff(ids) > 0).all():
            return [Part({"gate": self.gate})]
        return [Part({"gate": self.gate[torch.from_numpy(ids).to(self.gate.device)]})]

    def _share(self, xs: torch.Tensor, weights: dict[str, torch.Tensor], slots: np.ndarray | None,
               up_bias: torch.Tensor | None) -> torch.Tensor | None:
        """One group of neurons' share of the FFN over their rows: down(act(up x + b)), or down(act(gate x) * up x)
        if gated; None for no rows. The rows are `slots` of `weights`' matrices and of `up_bias` (the neuron cache's,
        multiplied where they lie) or, with slots None, all of them. The FFN is the sum of its groups' shares (act
        acts per neuron), so a group can be multiplied as soon as its rows are in DRAM."""
        if not (len(weights["down"]) if slots is None else len(slots)):
            return None
        sh = self.shared
        if slots is not None and not (xs.shape[0] == 1 and row_kernels.serves(weights["down"])):
            # No kernel by index here (float32, a GPU, the C library not built), or several positions (a prefill),
            # for which torch's matrix products beat one pass over the rows per position: gather the rows.
            t0 = time.perf_counter()
            index = torch.from_numpy(slots).to(weights["down"].device)
            weights = {name: as_words(w).index_select(0, index).view(w.dtype) for name, w in weights.items()}
            up_bias = None if up_bias is None else up_bias.index_select(0, index)
            slots = None
            sh.stats.memory_s += time.perf_counter() - t0
        if slots is None and weights["down"].dtype != torch.float32 and weights["down"].device.type == "cpu":
            # A bundled layout's whole file (naive reads) holds each vector's rows strided by the record; the CPU's
            # 16-bit products run about 20x slower over them (28.6 against 1.5 ms at 1945 x 4096, bfloat16 or
            # float16, 2 threads; float32 the same either way). Record buffers are contiguous already: no copy for
            # them. The C down kernel sums strided rows where they lie.
            t0 = time.perf_counter()
            strided_ok = {"down"} if row_kernels.serves(weights["down"]) else set()
            weights = {name: w if name in strided_ok else w.contiguous() for name, w in weights.items()}
            sh.stats.memory_s += time.perf_counter() - t0
        matvec = sh.techniques.matvec
        h = _times_rows(xs, weights["gate" if self.gated else "up"], matvec, slots, up_bias)  # [T, n]
        h = self.act(h[None])[0]  # hooked as the dense FFN's is: [1, T, n]
        if self.gated:
            h = h * _times_rows(xs, weights["up"], matvec, slots)
        return _down(h, weights["down"], slots)  # [T, d]

    def _total(self, xs: torch.Tensor, shares: list[torch.Tensor | None]) -> torch.Tensor:
        """The FFN's output from its groups' shares, summed in the order given, and the down bias."""
        shares = [s for s in shares if s is not None]
        out = shares[0] if shares else torch.zeros_like(xs)
        for share in shares[1:]:
            out = out + share
        return out + self.down_bias if self.down_bias is not None else out


def hot_first(stored: np.ndarray, hot: np.ndarray) -> bool:
    """Whether a layer's file stores the hot neurons `hot` as its first records (`stored`: the neuron of each
    record, in file order), as a placed layout does: read from the first record after them, a whole-file read skips
    exactly them. Trivially so with none hot."""
    return bool(np.array_equal(np.sort(stored[: len(hot)]), np.sort(hot)))


def union_of(sets: list[np.ndarray], n: int) -> np.ndarray:
    """The ids (below n) in any of `sets`, sorted: a mark per id (np.union1d hashes: 100 us against 10 for a pass's
    1,200 ids of 8,192, numpy 2.4, once a layer a token)."""
    mark = np.zeros(n, dtype=bool)
    for ids in sets:
        mark[ids] = True
    return np.flatnonzero(mark)


def first_occurrences(ids: np.ndarray, n: int) -> np.ndarray:
    """`ids` (below n) with each id only where it first appears, in order: as they are, where no id repeats (a
    decode step's guesses), which a count tells in a tenth of np.unique's time."""
    if len(ids) == 0 or np.bincount(ids, minlength=n).max() == 1:
        return ids
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def down_kernel(techniques: Techniques) -> str:
    """What multiplies the FFN's down projection for these settings (records say it: it is much of a step's time)."""
    if techniques.compute_dtype == "float32" or techniques.device != "cpu":
        return "torch (h @ down)"
    why = row_kernels.unavailable()
    return ("C, the active neurons' rows only, where they lie in the cache (row_kernels.c)" if why is None
            else f"torch, one matrix-vector product per position ({why})")


ROW_BUCKET = 64  # rows: products over a buffer's rows take one of d_ffn / 64 shapes


def _times_rows(xs: torch.Tensor, rows: torch.Tensor, matvec: str = "linear", slots: np.ndarray | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """xs [T, d] @ rows[slots] [n, d].t() + bias[slots] -> [T, n]; slots None: all rows. By slot: one position,
    16-bit rows on the CPU, by the C kernel (`row_kernels.up`, the bias added before its one rounding). All rows: one
    position by `matvec`'s kernel (`model.project`), then the bias.
    On the CPU, torch's 16-bit products (oneDNN) build a kernel for each new shape, which takes about as long as the
    product itself here (1-2 ms at 3,000 x 4,096), and a pass's row count changes every pass. So where the rows'
    buffer goes on after them (a record buffer's unused rows) the product runs over n rounded up to ROW_BUCKET rows,
    whatever the extra rows hold, and their columns are dropped (each column is its own row's sum). The "rows"
    kernel builds nothing: it multiplies the n rows."""
    if slots is not None:
        return row_kernels.up(xs[0], rows, slots, bias)[None]
    n = rows.shape[0]
    padded = -(-n // ROW_BUCKET) * ROW_BUCKET
    if (matvec != "rows" and padded != n and rows.dtype != torch.float32 and rows.device.type == "cpu"
            and rows.is_contiguous()):
        room = (rows.untyped_storage().nbytes() // rows.element_size() - rows.storage_offset()) // rows.stride(0)
        if room >= padded:
            rows = rows.as_strided((padded, rows.shape[1]), rows.stride())
    out = project(xs, rows, None, matvec)[:, :n]
    return out if bias is None else out + bias


def _down(h: torch.Tensor, down: torch.Tensor, slots: np.ndarray | None = None) -> torch.Tensor:
    """h [T, n] @ down[slots] [n, d] (slots None: all rows). In 16 bits on the CPU, torch's products in this
    orientation (the sum runs down the rows) are slow (bfloat16 on an Intel Xeon with AMX: 6.6 GB/s against 27 for
    matrix-vector products; float16 on an AMD EPYC: h @ down 40x slower than matrix-vector products), so there the C
    kernel sums the rows of the active neurons only (`row_kernels.down`; at the OPT 6.7B shape, 3,300 rows, half of
    them active: 0.96 ms against torch's 3.45), or, where it is not built, each position is one matrix-vector
    product."""
    if slots is not None or (row_kernels.serves(down) and h.device.type == "cpu"):
        return row_kernels.down(h, down, slots)
    if h.dtype == torch.float32 or h.device.type != "cpu":
        return h @ down
    return torch.stack([torch.mv(down.t(), row) for row in h])


@dataclass(frozen=True)
class DramUse:
    """Bytes the engine holds for weights (the DRAM budget covers these); the KV cache is reported apart."""

    resident: int
    cache: int
    buffers: int
    source: int
    kv_cache: int
    staging: int  # the row movers' staging buffers

    @property
    def weights_total(self) -> int:
        return self.resident + self.cache + self.buffers + self.source + self.staging


class FlashEngine(Engine):
    """prefill/step like the dense `Engine`, with FFN weights on flash; `history` holds a `TokenStats` per pass."""

    def __init__(self, flash_dir: str | Path | FlashLayout, techniques: Techniques,
                 source: ActivationSource | None = None, neuron_counts: np.ndarray | None = None,
                 dram_budget: int | None = None, max_len: int | None = None,
                 resident: dict[str, torch.Tensor] | None = None, thresholds: list[float] | None = None):
        """`neuron_counts` [n_layers, d_ffn]: how often each neuron was active on held-out text; the hybrid keeps
        the `techniques.hybrid` most frequent ones resident. `source` overrides the default for
        `techniques.source` (needed for `predictor` and `trace`). `resident`: the layout's resident tensors already
        loaded (`layout.resident_state()`), to share them between engines instead of reading them again.
        `thresholds`: per layer, the SiLU threshold calibrated to `techniques.threshold` (`threshold.calibrate`)."""
        layout = flash_dir if isinstance(flash_dir, FlashLayout) else FlashLayout.open(flash_dir)
        config, dtype, device = layout.config, techniques.torch_dtype, resolve(techniques.device)
        exact_float32(device)
        self.layout, self.techniques = layout, techniques
        resident = {k: v.to(device=device, dtype=dtype)
                    for k, v in (resident if resident is not None else layout.resident_state(dtype)).items()}
        # Per layer, the FFN's tensors kept in DRAM: (up bias, down bias, gate matrix of a gate-resident layout)
        ffn_resident = {i: tuple(resident.pop(f"layers.{i}.ffn.{name}", None)
                                 for name in ("up.bias", "down.bias", "gate.weight"))
                        for i in range(config.n_layers)}
        reader = FlashReader.for_layout(layout, threads=techniques.threads, direct=techniques.direct,
                                        backend=techniques.reader,
                                        gap_bytes=techniques.gap_bytes)
        transfer = Transfer(device)
        try:  # a configuration that does not fit (BudgetError) or bad arguments must not leak threads or pinned pages
            self._build(layout, techniques, reader, transfer, source, neuron_counts, dram_budget, max_len, resident,
                        ffn_resident, thresholds)
        except BaseException:
            reader.close()
            transfer.close()
            raise

    def _build(self, layout: FlashLayout, techniques: Techniques, reader: FlashReader, transfer: Transfer, source,
               neuron_counts, dram_budget: int | None, max_len: int | None, resident: dict, ffn_resident: dict,
               thresholds: list[float] | None) -> None:
        config, g, dtype = layout.config, layout.geometry, techniques.torch_dtype
        if techniques.threshold:
            if config.activation != "silu" or not config.gated:
                raise ValueError(f"{layout.path}: thresholding is for SiLU-gated FFNs, this one is "
                                 f"{config.activation}")
            if thresholds is None or len(thresholds) != config.n_layers:
                raise ValueError(f"threshold {techniques.threshold} needs one calibrated threshold per layer "
                                 f"({config.n_layers}), got {thresholds!r}")
        else:
            thresholds = None
            if not techniques.reads_whole_layers:
                config.require_relu(f"{layout.path}: techniques {techniques}")
        if source is None:
            source = self._default_source(techniques, layout, reader, ffn_resident, thresholds)
        if techniques.source != source.name:
            raise ValueError(f"techniques ask for source {techniques.source!r}, got a {source.name!r} source")
        if transfer.gpu:
            source = source.on(transfer.device)  # what it computes with, beside the layers
        if techniques.hybrid and neuron_counts is None:
            raise ValueError("hybrid needs neuron_counts (activation frequencies) to choose the hot neurons")
        hot = (hot_neurons(neuron_counts, techniques.hybrid) if techniques.hybrid
               else [np.zeros(0, np.int64)] * config.n_layers)
        n_hot = max(len(h) for h in hot)
        # Every layer's file read whole (from its first cold record): naive, or the hybrid alone over a layout that
        # stores each layer's hot records first (placed with the same counts and fraction)
        whole_files = techniques.source == "all" and all(
            hot_first(layout.stored_ids(i), h) for i, h in enumerate(hot))

        resident_bytes = sum(t.nbytes for t in resident.values()) + sum(
            b.nbytes for pair in ffn_resident.values() for b in pair if b is not None)
        # A neuron cache row: its vectors (a resident gate's rows too) and up bias, in the compute dtype.
        vectors = 3 if config.gated else 2
        self.row_bytes = row_bytes = (vectors * g.d_model + (1 if config.bias else 0)) * dtype.itemsize
        # The row movers' staging: one buffer on the host (the read buffers' rows), one on a GPU (the caches').
        staging = 0 if whole_files else min(RowMover.STAGING_BYTES, g.d_ffn * max(g.record_bytes, row_bytes))
        staging_bytes = staging * (2 if transfer.gpu else 1)
        capacity, buffer_rows = self._sizes(techniques, layout, resident_bytes + source.nbytes + staging_bytes, n_hot,
                                            dram_budget, max_delta=g.d_ffn - min(len(h) for h in hot),
                                            whole_files=whole_files)
        # Within a budget the caches' capacity is the budget's: preallocated in earnest, every page written now (at
        # the paper's shape, all combined, the inserts took 110 ms a pass with first-touch faults, 44 without). Without
        # one the capacity is the whole layer, an upper bound: pages are touched as rows first fill.
        host = RowMover("cpu", staging)
        copies = 2 if techniques.overlap else 1  # overlap: a second buffer, read ahead into while the first is used
        # Where reads land in the caches, the read-ahead lands in the next layer's free slots, and the second buffer's
        # DRAM becomes spare slots in every layer instead: the window's room (what `_make_room` keeps) is the same
        # with or without overlap, and the read-ahead is not limited to the slots the window happens to leave free.
        lands = bool(techniques.window) and techniques.memory == "preallocated" and not transfer.gpu and \
            layout.geometry.dtype == techniques.compute_dtype
        spare = 0
        if lands and copies == 2:
            copies = 1
            spare = min(g.d_ffn - capacity, buffer_rows * g.record_bytes // (config.n_layers * row_bytes))
        shared = _Shared(techniques, layout, reader, source, capacity, spare, lands, transfer, host,
                         host if not transfer.gpu else RowMover(transfer.device, staging),
                         touch_caches=dram_budget is not None, whole_files=whole_files)
        if whole_files:
            shared.file_buffers = [transfer.pin(aligned_buffer(g.file_bytes)) for _ in range(copies)]
        else:
            shared.record_buffer, shared.ahead_buffer, *_ = [
                record_buffer(g, buffer_rows, transfer.pin(aligned_buffer(buffer_rows * g.record_bytes)))
                for _ in range(copies)] + [None]
        self.shared = shared
        model = Transformer.for_assignment(
            config, ffn=lambda i: FlashFFN(i, shared, *ffn_resident[i], hot[i], thresholds[i] if thresholds else None))
        shared.layers = [block.ffn for block in model.layers]
        model.load_state_dict(resident, strict=True, assign=True)
        model.to(transfer.device)  # the computed buffers (RoPE tables) too
        model.use_matvec(techniques.matvec)
        model.eval()
        for block in model.layers:
            block.ffn.load_hot()
        shared.read_ahead = ReadAhead(reader) if techniques.overlap else None
        transfer.synchronize()
        transfer.seconds()  # the hot neurons' copies are not a pass's memory management
        super().__init__(model, max_len)
        self.history: list[TokenStats] = []
        cache_bytes = (capacity + spare) * config.n_layers * row_bytes
        buffer_bytes = copies * (g.file_bytes if whole_files else buffer_rows * g.record_bytes)
        self.dram = DramUse(resident_bytes, cache_bytes, buffer_bytes, source.nbytes, self.cache.nbytes,
                            staging_bytes)
        if dram_budget is not None and self.dram.weights_total > dram_budget:
            raise BudgetError(f"DRAM budget {dram_budget:,} bytes < {self.dram.weights_total:,} needed ({self.dram})")

    def cache_peak_used(self) -> int:
        """Bytes of the neuron caches' rows ever occupied at once, summed over layers: the cache DRAM the run needed
        (`dram.cache` is what was reserved, which a budget caps)."""
        return sum(block.ffn.peak_rows for block in self.model.layers) * self.row_bytes

    def cache_held(self) -> int:
        """Bytes of neuron-cache DRAM the run held: all it reserved where the caches were written through at build
        (within a budget), else the rows ever occupied at once (untouched pages cost nothing)."""
        return self.dram.cache if self.shared.touch_caches else self.cache_peak_used()

    def _sizes(self, techniques: Techniques, layout: FlashLayout, fixed: int, n_hot: int, dram_budget: int | None,
               max_delta: int, whole_files: bool = False) -> tuple[int, int]:
        """Neuron cache rows per layer and read buffer rows (records), within `dram_budget` where one is given.
        With a window, every layer's cache holds its window and the buffer one pass's delta; without one, the caches
        hold the hot neurons only and the buffer, shared by all layers, as much of a pass as the budget leaves;
        reading whole files, the caches hold the hot neurons and the file buffers take the place of the buffer."""
        g, n_layers = layout.geometry, layout.config.n_layers
        if whole_files:
            return n_hot, 0
        copies = 2 if techniques.overlap else 1  # read buffers: overlap reads ahead into a second one
        if not techniques.window:
            rows = max_delta
            if dram_budget is not None:
                rows = min(rows, max(0, (dram_budget - fixed - n_hot * n_layers * self.row_bytes)
                                     // (copies * g.record_bytes)))
                if rows == 0:
                    raise BudgetError(
                        f"DRAM budget {dram_budget:,} bytes cannot hold the resident weights and activation source "
                        f"({fixed:,}), {n_hot} hot neurons per layer and a read buffer")
            return n_hot, rows
        if dram_budget is None:
            return g.d_ffn, g.d_ffn
        per_neuron = self.row_bytes * n_layers + copies * g.record_bytes  # a cache row in every layer + buffer rows
        capacity = min(g.d_ffn, max(0, (dram_budget - fixed) // per_neuron))
        if capacity <= n_hot:
            raise BudgetError(
                f"DRAM budget {dram_budget:,} bytes cannot hold the resident weights and activation source "
                f"({fixed:,}), buffers and {n_hot} hot neurons plus any cache: it would leave room for {capacity} "
                f"neurons per layer")
        return capacity, capacity

    @staticmethod
    def _default_source(techniques: Techniques, layout: FlashLayout, reader: FlashReader, ffn_resident,
                        thresholds: list[float] | None) -> ActivationSource:
        if techniques.source == "all":
            return AllNeurons(layout.geometry.d_ffn)
        if techniques.source == "oracle":
            return oracle_from_flash(layout, reader, ffn_resident, techniques.torch_dtype, thresholds)
        raise ValueError(f"source {techniques.source!r} must be passed in (a trained predictor or a trace)")

    def _timed(self, run, tokens: int) -> torch.Tensor:
        self.shared.stats = TokenStats(tokens=tokens, io=ReadStats(direct=self.shared.reader.direct))
        t0 = time.perf_counter()
        logits = run()
        self.shared.transfer.synchronize()  # on a GPU, the pass has run only when the device says so
        self.shared.stats.total_s = time.perf_counter() - t0
        self.shared.stats.memory_s += self.shared.transfer.seconds()  # the copies to the device, as the paper counts
        self.history.append(self.shared.stats)
        return logits

    def reset(self) -> None:
        super().reset()
        if self.shared.read_ahead is not None:
            self.shared.read_ahead.take()  # one left by an interrupted pass
        self.shared.source.reset()
        for block in self.model.layers:
            block.ffn.reset()

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        self.history = []
        return self._timed(lambda: super(FlashEngine, self).prefill(tokens), len(tokens))

    def step(self, token: int) -> torch.Tensor:
        return self._timed(lambda: super(FlashEngine, self).step(token), 1)

    def close(self) -> None:
        if self.shared.read_ahead is not None:
            self.shared.read_ahead.close()
        self.shared.reader.close()
        self.shared.transfer.close()
        self.shared.layers = []  # layers and shared state refer to each other: unlinked, they free with the engine
        # (at once: no cyclic collection, which tensors of gigabytes would not trigger)

    def __enter__(self) -> "FlashEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def oracle_from_flash(layout: FlashLayout, reader: FlashReader, ffn_resident, dtype: torch.dtype = torch.float32,
                      thresholds: list[float] | None = None) -> Oracle:
    """The oracle's weights (up, or gate for gated FFNs) read once from flash and held in DRAM; with `thresholds`,
    its sets are the thresholded SiLU's. A gate-resident layout's oracle is its resident gates (counted there)."""
    if layout.gate_resident:
        n = layout.config.n_layers
        oracle = Oracle([ffn_resident[layer][2] for layer in range(n)], [None] * n, None, thresholds)
        oracle.nbytes = 0
        return oracle
    name = "gate" if "gate" in layout.geometry.vectors else "up"
    buffer = aligned_buffer(layout.geometry.file_bytes)
    weights, layer_biases, ids = [], [], []
    for layer in range(layout.config.n_layers):
        g = layout.geometry_of(layer)
        reader.read_layer(layer, buffer[: g.file_bytes])
        weights.append(decode_layer_file(buffer[: g.file_bytes], g, dtype)[name].clone())
        stored = layout.stored_ids(layer)
        bias = ffn_resident[layer][0] if name == "up" else None
        layer_biases.append(bias[torch.from_numpy(stored)] if bias is not None else None)
        ids.append(stored)
    return Oracle(weights, layer_biases, ids, thresholds)
