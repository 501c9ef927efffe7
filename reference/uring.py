"""The flash reader's io_uring backend: `uring_reads.c` (liburing), built by `make` as `_uring_reads.so` beside this
file and called through ctypes, which lets go of the GIL for the call. One call submits every read of a reader call
and reaps them all, keeping at most `depth` in flight, so a call of thousands of reads costs Python one call.
Where the library is not built, or the kernel refuses io_uring, `unavailable()` says why and the reader keeps its
threads. The library also plans a call's reads (`plan_records`), for either backend, where it is built."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import numpy as np

LIBRARY = Path(__file__).with_name("_uring_reads.so")
IOVEC = np.dtype([("base", np.uintp), ("len", np.uintp)])  # struct iovec


@functools.cache
def _library() -> ctypes.CDLL:
    """The library; OSError where it cannot be loaded or lacks a function (built from an older uring_reads.c: the
    reader then says so and keeps its threads and numpy's plan)."""
    lib = ctypes.CDLL(str(LIBRARY), use_errno=True)
    try:
        lib.fb_ring_open.restype, lib.fb_ring_open.argtypes = ctypes.c_void_p, [ctypes.c_uint]
        lib.fb_ring_close.restype, lib.fb_ring_close.argtypes = None, [ctypes.c_void_p]
        lib.fb_ring_read.restype = ctypes.c_longlong
        lib.fb_ring_read.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long] + [ctypes.c_void_p] * 4
        lib.fb_plan_records.restype = ctypes.c_long
        lib.fb_plan_records.argtypes = ([ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                         ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 8)
    except AttributeError as e:
        raise OSError(f"{LIBRARY} is out of date ({e}): `make setup` builds it anew") from e
    return lib


@functools.cache
def can_plan() -> bool:
    """Whether `plan_records` can be called here (the library is built and loads)."""
    try:
        _library()
    except OSError:
        return False
    return True


def plan_records(ids: np.ndarray, rows: np.ndarray, bases: np.ndarray, stride: int, vector_bytes: int, plane: int,
                 gap_bytes: int, run_bytes: int, most: int) -> tuple[np.ndarray, ...] | None:
    """`FlashReader._in_place`'s plan in C (`fb_plan_records` in uring_reads.c says how): the reads' offsets, first
    pieces and piece counts, and the pieces' starts, lengths and whether each is the sink's; None where two vectors
    overlap. ids, rows and bases int64 and contiguous."""
    n, k = len(ids), len(bases)
    m = n * k
    vecs = np.empty(2 * m, np.int64)
    offsets, first, count = np.empty(m, np.int64), np.empty(m, np.int32), np.empty(m, np.int32)
    starts, lengths, to_sink = np.empty(2 * m, np.int64), np.empty(2 * m, np.int64), np.zeros(2 * m, np.bool_)
    n_pieces = np.empty(1, np.int64)
    reads = _library().fb_plan_records(
        n, ids.ctypes.data, rows.ctypes.data, k, bases.ctypes.data, stride, vector_bytes, plane, gap_bytes,
        run_bytes, most, *(a.ctypes.data for a in (vecs, offsets, first, count, starts, lengths, to_sink, n_pieces)))
    if reads < 0:
        return None
    pieces = int(n_pieces[0])
    return offsets[:reads], first[:reads], count[:reads], starts[:pieces], lengths[:pieces], to_sink[:pieces]


@functools.cache
def unavailable() -> str | None:
    """Why the io_uring backend cannot read here, or None where it can."""
    if not LIBRARY.is_file():
        return f"{LIBRARY} is not built (`make setup` builds it where liburing-dev is installed)"
    try:
        Ring(1).close()
    except OSError as e:
        return f"io_uring: {e}"
    return None


class Ring:
    """io_uring for one reader: an instance per thread that reads through it (the C ring lets only the thread that
    made it submit, so that its completions' work waits for that thread: `uring_reads.c`), made on the thread's first
    read. Used by one thread at a time, as the reader is; the engine's reads move between the caller's thread and the
    overlap's read-ahead thread."""

    def __init__(self, depth: int):
        self._lib, self._depth = _library(), depth
        self._mine = threading.local()  # this thread's handle (a new thread never finds a dead one's)
        self._handles: list[int] = []
        self._handle()  # made now on the caller's thread: a kernel that refuses io_uring says so at once

    def _handle(self) -> int:
        handle = getattr(self._mine, "handle", None)
        if handle is None:
            handle = self._lib.fb_ring_open(self._depth)
            if not handle:
                err = ctypes.get_errno()
                raise OSError(err, f"io_uring_queue_init({self._depth}) failed: {os.strerror(err)}")
            self._mine.handle = handle
            self._handles.append(handle)
        return handle

    def read(self, fd: int, offsets: np.ndarray, iov: np.ndarray, first: np.ndarray, count: np.ndarray) -> int:
        """Read i is preadv(fd, iov[first[i] : first[i] + count[i]], offsets[i]); the bytes read in all, or -errno."""
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        first = np.ascontiguousarray(first, dtype=np.int32)
        count = np.ascontiguousarray(count, dtype=np.int32)
        return self._lib.fb_ring_read(self._handle(), fd, len(offsets), offsets.ctypes.data, iov.ctypes.data,
                                      first.ctypes.data, count.ctypes.data)

    def close(self) -> None:
        for handle in self._handles:
            self._lib.fb_ring_close(handle)
        self._handles = []
        self._mine = threading.local()
