"""The flash reader's io_uring backend: `uring_reads.c` (liburing), built by `make` as `_uring_reads.so` beside this
file and called through ctypes, which lets go of the GIL for the call. One call submits every read of a reader call
and reaps them all, keeping at most `depth` in flight, so a call of thousands of reads costs Python one call.
Where the library is not built, or the kernel refuses io_uring, `unavailable()` says why and the reader keeps its
threads."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

LIBRARY = Path(__file__).with_name("_uring_reads.so")
IOVEC = np.dtype([("base", np.uintp), ("len", np.uintp)])  # struct iovec


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(LIBRARY), use_errno=True)
    lib.fb_ring_open.restype, lib.fb_ring_open.argtypes = ctypes.c_void_p, [ctypes.c_uint]
    lib.fb_ring_close.restype, lib.fb_ring_close.argtypes = None, [ctypes.c_void_p]
    lib.fb_ring_read.restype = ctypes.c_longlong
    lib.fb_ring_read.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long] + [ctypes.c_void_p] * 4
    return lib


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
    """One io_uring instance; not thread-safe (the reader is used by one thread at a time)."""

    def __init__(self, depth: int):
        self._lib = _library()
        self._handle = self._lib.fb_ring_open(depth)
        if not self._handle:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_queue_init({depth}) failed: {os.strerror(err)}")

    def read(self, fd: int, offsets: np.ndarray, iov: np.ndarray, first: np.ndarray, count: np.ndarray) -> int:
        """Read i is preadv(fd, iov[first[i] : first[i] + count[i]], offsets[i]); the bytes read in all, or -errno."""
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        first = np.ascontiguousarray(first, dtype=np.int32)
        count = np.ascontiguousarray(count, dtype=np.int32)
        return self._lib.fb_ring_read(self._handle, fd, len(offsets), offsets.ctypes.data, iov.ctypes.data,
                                      first.ctypes.data, count.ctypes.data)

    def close(self) -> None:
        if self._handle:
            self._lib.fb_ring_close(self._handle)
            self._handle = None
