"""The neuron cache: one layer's FFN neurons held in DRAM, in a matrix preallocated once.

Each neuron lies in a slot (a row of each vector's matrix), `ids[s]` the neuron in slot s (-1: free). A delete frees
its slots and moves nothing; the next reads land in free slots, the lowest first (straight from flash where the
reader can fill them, `planes`), and an insert records which neuron lies where. So nothing is reallocated, gathered or
moved per token (the paper's section 3.3 moves the last rows into the freed ones, which at the paper's shape cost
a quarter of the reads' time; docs/results.md): the FFN multiplies the rows where they lie, by a list of their slots
(`rows_of`, `row_kernels`). The hybrid's hot neurons are pinned in the first slots and never deleted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .reader import aligned_buffer

VECTORS_GATED = ("gate", "up", "down")
VECTORS_PLAIN = ("up", "down")


def as_words(matrix: torch.Tensor) -> torch.Tensor:
    """A row-major matrix's bytes as rows of the widest integers its rows divide into (a view: no copy). torch moves
    whole rows with index_select and index_copy_ element by element, and 16-bit elements cost as much as 64-bit words:
    375 scattered rows of 4,096 bfloat16 (an eviction of the paper's shape) moved in 1.15 ms as bfloat16, 0.25 as
    int64 (Intel Xeon, 2 threads)."""
    row_bytes = matrix.shape[-1] * matrix.element_size()
    for word in (torch.int64, torch.int32, torch.int16):
        if row_bytes % word.itemsize == 0 and matrix.data_ptr() % word.itemsize == 0:
            return matrix.view(word)
    return matrix.view(torch.uint8)


class RowMover:
    """Copies scattered rows between matrices (or within one), as words, through one staging buffer kept for good:
    a gather into a fresh tensor pays the kernel's first-touch page faults on every call (blocks this large come
    from mmap). With it, an all-combined step at the paper's shape spent about half as long on memory management
    (docs/results.md)."""

    STAGING_BYTES = 4 << 20

    def __init__(self, device: torch.device | str = "cpu", nbytes: int = STAGING_BYTES):
        self.staging = torch.zeros(nbytes, dtype=torch.uint8, device=device)

    def copy(self, dst: torch.Tensor, dst_rows: np.ndarray, src: torch.Tensor, src_rows: np.ndarray) -> None:
        """dst[dst_rows] = src[src_rows] for 2-D matrices of the same row bytes; within one matrix the two row sets
        must not overlap."""
        into, rows = as_words(dst), as_words(src)
        if into.dtype != rows.dtype or into.shape[1] != rows.shape[1]:  # widths chosen by alignment may differ
            into, rows = dst.view(torch.uint8), src.view(torch.uint8)
        row_bytes = into.shape[1] * into.element_size()
        to = torch.from_numpy(np.ascontiguousarray(dst_rows, dtype=np.int64)).to(into.device)
        frm = torch.from_numpy(np.ascontiguousarray(src_rows, dtype=np.int64)).to(into.device)
        per = self.staging.numel() // row_bytes
        if per == 0:  # a row larger than the staging buffer
            into.index_copy_(0, to, rows.index_select(0, frm))
            return
        staging = self.staging[: per * row_bytes].view(into.dtype).view(per, into.shape[1])
        for i in range(0, len(to), per):
            chunk = staging[: len(to[i : i + per])]
            torch.index_select(rows, 0, frm[i : i + per], out=chunk)
            into.index_copy_(0, to[i : i + per], chunk)


@dataclass(frozen=True)
class Part:
    """Where some of an insert's rows lie: one matrix per vector, in which the insert's neurons `at` (positions in
    its ids) are rows `rows`; `at` None: all the insert's neurons, in order, each matrix's rows exactly. Rows read
    ahead stay where they landed until the insert moves them into the cache: one copy, not two."""

    vectors: dict[str, torch.Tensor]
    at: np.ndarray | None = None
    rows: np.ndarray | None = None


def parts_of(rows: dict[str, torch.Tensor] | list[Part]) -> list[Part]:
    return rows if isinstance(rows, list) else [Part(rows)]


def whole(rows: dict[str, torch.Tensor] | list[Part]) -> dict[str, torch.Tensor]:
    """One matrix per vector, from parts that each hold all the insert's neurons (some of their vectors)."""
    if any(part.at is not None for part in parts_of(rows)):
        raise ValueError("expected parts that each hold all the neurons")
    return {name: m for part in parts_of(rows) for name, m in part.vectors.items()}


class NeuronCache:
    def __init__(self, capacity: int, d_model: int, d_ffn: int, gated: bool, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", touch: bool = False,
                 mover: RowMover | None = None):
        """`touch`: write every row now, so that no token pays the kernel's first-touch page faults (a cache the DRAM
        budget sized is the budget's to hold); otherwise rows are uninitialised, and untouched pages cost no DRAM
        until a row first fills them. `mover`: the staging buffer inserts copy scattered rows through (one per
        engine)."""
        self.capacity, self.device = capacity, torch.device(device)
        self.vectors = VECTORS_GATED if gated else VECTORS_PLAIN
        # One matrix per vector, the planes of one buffer: on the CPU page-aligned, so that the reader can read
        # records straight into free rows (`planes`), as into a record buffer.
        shape = (len(self.vectors), capacity, d_model)
        self.bytes = None  # the planes' bytes, where the reader can fill them
        if self.device.type == "cpu":
            row_bytes = d_model * dtype.itemsize
            self.bytes = aligned_buffer(math.prod(shape[:2]) * row_bytes).reshape(*shape[:2], row_bytes)
            storage = torch.from_numpy(self.bytes).view(dtype)
        else:
            storage = torch.empty(shape, dtype=dtype, device=device)
        if touch:
            storage.zero_()
        self.rows = {v: storage[j] for j, v in enumerate(self.vectors)}
        self.mover = mover or RowMover(device)
        self.up_bias = torch.empty(capacity, dtype=dtype, device=device) if bias else None
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.slot_of = np.full(d_ffn, -1, dtype=np.int64)
        self.n = 0  # occupied slots
        self.pinned = 0  # the first slots, the hot neurons'
        self._cached: np.ndarray | None = None  # cached_ids() until the next insert or delete

    def missing(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` are not cached (the delta to read)."""
        return ids[self.slot_of[ids] < 0]

    def free_slots(self, k: int, taken: np.ndarray | None = None) -> np.ndarray:
        """The lowest k free slots (not in `taken`, slots already promised to rows in flight): where the next reads
        land. Lowest first keeps the rows in use few pages."""
        free = self.ids < 0
        if taken is not None:
            free[taken] = False
        slots = np.flatnonzero(free)[:k]
        if len(slots) < k:
            raise RuntimeError(f"neuron cache full: {self.n} rows and {k} more > capacity {self.capacity}")
        return slots

    def planes(self, vectors: tuple[str, ...]) -> np.ndarray | None:
        """The matrices of `vectors` as a record buffer's bytes ([vectors, capacity, row bytes], `reader.record_buffer`)
        for the reader to fill free slots, which an insert then takes where they lie; None where the reader cannot
        (off the CPU, or `vectors` not consecutive planes here: a layout without the cache's gate rows keeps them in
        DRAM, before the others)."""
        names = list(self.vectors)
        if self.bytes is None or vectors[0] not in names:
            return None
        first = names.index(vectors[0])
        if tuple(names[first : first + len(vectors)]) != tuple(vectors):
            return None
        return self.bytes[first : first + len(vectors)]

    def insert(self, ids: np.ndarray, rows: dict[str, torch.Tensor] | list[Part], up_bias: torch.Tensor | None = None,
               pin: bool = False, slots: np.ndarray | None = None) -> np.ndarray:
        """Neurons `ids` (not cached yet) into free `slots` (default: the lowest free ones), their vectors copied in
        from `rows` (one matrix each, or parts); vectors no part holds must lie in those slots already (read there,
        `planes`). `pin` keeps them for good (hybrid). Returns the slots."""
        k = len(ids)
        if pin and self.n != self.pinned:
            raise RuntimeError("pinned neurons must be inserted before any others")
        if slots is None:
            slots = self.free_slots(k)
        elif len(slots) != k or (self.ids[slots] >= 0).any():
            raise RuntimeError(f"an insert of {k} neurons needs as many free slots, got {slots}")
        for part in parts_of(rows):
            for name, vectors in part.vectors.items():
                at = np.arange(k) if part.at is None else part.at
                self.mover.copy(self.rows[name], slots[at], vectors, at if part.rows is None else part.rows)
        if self.up_bias is not None:
            self.up_bias[torch.from_numpy(slots).to(self.device)] = up_bias
        self.ids[slots] = ids
        self.slot_of[ids] = slots
        self.n += k
        self._cached = None
        if pin:
            self.pinned = self.n
        return slots

    def delete(self, ids: np.ndarray) -> None:
        """Forget neurons `ids` (cached, not pinned): their slots are free for the next reads; nothing moves."""
        freed = self.slot_of[ids]
        if (freed < self.pinned).any():
            raise RuntimeError("cannot delete a pinned or uncached neuron")
        self.slot_of[ids] = -1
        self.ids[freed] = -1
        self.n -= len(ids)
        self._cached = None

    def cached_ids(self) -> np.ndarray:
        """The cached neurons, by id: the order a layer multiplies the rows it holds in, wherever they lie. Kept
        until the next insert or delete, read-only: a pass asks up to four times, and with overlap each
        `flatnonzero` over the layer's slots took 140 us beside the reads at the paper's shape (memory management
        7.1-7.7 against 8.8-9.5 ms a token, all but placement, docs/results.md 2026-12-05)."""
        if self._cached is None:
            self._cached = np.flatnonzero(self.slot_of >= 0)
            self._cached.flags.writeable = False
        return self._cached

    def rows_of(self, ids: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray, torch.Tensor | None]:
        """What the FFN multiplies for cached neurons `ids`, with no copy: every slot's rows, the slots of `ids` in
        their order, and every slot's up bias."""
        return self.rows, self.slot_of[ids], self.up_bias


class RegatherCache:
    """What a plain implementation does (the `memory=regather` ablation): the matrices kept sorted by neuron id,
    and every insertion or deletion builds them anew (allocate, gather, copy) instead of editing them in place."""

    def __init__(self, capacity: int, d_model: int, gated: bool, bias: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.capacity, self.device = capacity, torch.device(device)
        self.vectors = VECTORS_GATED if gated else VECTORS_PLAIN
        self.ids = np.zeros(0, dtype=np.int64)
        self.rows = {v: torch.zeros(0, d_model, dtype=dtype, device=device) for v in self.vectors}
        self.up_bias = torch.zeros(0, dtype=dtype, device=device) if bias else None
        self.pinned_ids = np.zeros(0, dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self.ids)

    def missing(self, ids: np.ndarray) -> np.ndarray:
        return ids[~np.isin(ids, self.ids)]

    def _regather(self, ids: np.ndarray, rows: dict[str, torch.Tensor], up_bias: torch.Tensor | None) -> None:
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        order = torch.from_numpy(order).to(self.device)
        self.rows = {v: rows[v].index_select(0, order) for v in self.vectors}
        if self.up_bias is not None:
            self.up_bias = up_bias.index_select(0, order)

    def insert(self, ids: np.ndarray, rows: dict[str, torch.Tensor] | list[Part], up_bias: torch.Tensor | None = None,
               pin: bool = False, slots: None = None) -> None:
        """As NeuronCache.insert, from rows in buffers (`slots`: none, rows here have no place of their own)."""
        if slots is not None:
            raise ValueError("a regathering cache takes rows from buffers, not in slots")
        if self.n + len(ids) > self.capacity:
            raise RuntimeError(f"neuron cache full: {self.n} + {len(ids)} rows > capacity {self.capacity}")
        new = whole(rows)  # the engine hands a regathering cache one buffer's rows
        bias = torch.cat([self.up_bias, up_bias]) if self.up_bias is not None else None
        self._regather(np.concatenate([self.ids, ids]), {v: torch.cat([self.rows[v], new[v]]) for v in self.vectors},
                       bias)
        if pin:
            self.pinned_ids = np.union1d(self.pinned_ids, ids)

    def delete(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if np.isin(ids, self.pinned_ids).any() or not np.isin(ids, self.ids).all():
            raise RuntimeError("cannot delete a pinned or uncached neuron")
        keep = np.flatnonzero(~np.isin(self.ids, ids))
        self.ids = self.ids[keep]
        keep = torch.from_numpy(keep).to(self.device)
        self.rows = {v: self.rows[v].index_select(0, keep) for v in self.vectors}
        if self.up_bias is not None:
            self.up_bias = self.up_bias.index_select(0, keep)

    def cached_ids(self) -> np.ndarray:
        return self.ids.copy()

    def rows_of(self, ids: np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray, torch.Tensor | None]:
        """The matrices as they are, the rows of cached neurons `ids` in them, and the up biases as they are."""
        return self.rows, np.searchsorted(self.ids, ids), self.up_bias
