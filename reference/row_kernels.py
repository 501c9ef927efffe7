"""16-bit products on the CPU over rows by index: `row_kernels.c`, built by `make` as `_row_kernels.so` beside this
file and called through ctypes (which lets go of the GIL for the call). The neuron cache leaves rows where they were
read (`cache.py`), so a layer's rows are a list of slots, multiplied where they lie; the down kernel also skips the
rows of inactive neurons. The up kernel over a whole matrix is also the "rows" matvec kernel (`model.project`),
which the probe measures beside torch's. Where the library is not built, `unavailable()` says why and the engine
gathers the rows and multiplies with torch."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

LIBRARY = Path(__file__).with_name("_row_kernels.so")
DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(LIBRARY))
    pointer, long = ctypes.c_void_p, ctypes.c_long
    for suffix in DTYPES.values():
        up = getattr(lib, f"fb_up_{suffix}")
        up.restype = None
        up.argtypes = [pointer, pointer, long, long, long, pointer, pointer, pointer, ctypes.c_int]
        down = getattr(lib, f"fb_down_{suffix}")
        down.restype = None
        down.argtypes = [pointer, pointer, long, long, long, pointer, pointer, ctypes.c_int]
    return lib


@functools.cache
def unavailable() -> str | None:
    """Why the C kernels cannot be used here, or None where they can."""
    if not LIBRARY.is_file():
        return f"{LIBRARY} is not built (`make setup` builds it where a C compiler is installed)"
    try:
        _library()
    except OSError as e:
        return f"{LIBRARY}: {e}"
    return None


def serves(rows: torch.Tensor) -> bool:
    """Whether these kernels multiply `rows` (16-bit, on the CPU, each row contiguous, and the library built)."""
    return rows.dtype in DTYPES and rows.device.type == "cpu" and rows.stride(1) == 1 and unavailable() is None


def _check(rows: torch.Tensor, slots: np.ndarray | None, n: int) -> None:
    if rows.dim() != 2 or rows.dtype not in DTYPES or rows.device.type != "cpu" or rows.stride(1) != 1:
        raise ValueError(f"row kernels need 16-bit CPU rows [N, d] with contiguous rows, got {tuple(rows.shape)} "
                         f"{rows.dtype} strides {rows.stride()}")
    if slots is not None and (slots.dtype != np.int64 or not slots.flags.c_contiguous or len(slots) != n
                              or (n and (slots.min() < 0 or slots.max() >= rows.shape[0]))):
        raise ValueError(f"slots must be {n} contiguous int64 row numbers below {rows.shape[0]}")


def up(x: torch.Tensor, rows: torch.Tensor, slots: np.ndarray | None = None,
       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [d] . rows[slots[i]] + bias[slots[i]] for each i -> [len(slots)] (slots None: every row, a matrix-vector
    product plus `bias`), in float32 (each row's sum in the same order wherever the row lies), rounded to the rows'
    dtype once; the rows on torch's threads. `bias` is by row as `rows` is (the neuron cache's, by slot)."""
    n = rows.shape[0] if slots is None else len(slots)
    _check(rows, slots, n)
    if bias is not None and (bias.dtype != rows.dtype or bias.shape != rows.shape[:1] or bias.stride(0) != 1):
        raise ValueError(f"the bias must be {rows.shape[0]} contiguous {rows.dtype} values, one a row, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    d = rows.shape[1]
    xs = x.to(torch.float32).contiguous()  # exact: every 16-bit value is a float32
    out = torch.empty(n, dtype=torch.float32)
    getattr(_library(), f"fb_up_{DTYPES[rows.dtype]}")(rows.data_ptr(), None if slots is None else slots.ctypes.data,
                                                       n, d, rows.stride(0), xs.data_ptr(),
                                                       None if bias is None else bias.data_ptr(), out.data_ptr(),
                                                       torch.get_num_threads())
    return out.to(rows.dtype)


def down(h: torch.Tensor, rows: torch.Tensor, slots: np.ndarray | None = None) -> torch.Tensor:
    """h [T, n] @ rows[slots] [n, d] (slots None: rows [n, d] as they are): each position's sum in float32 over the
    rows whose activation is not zero, in the order of h's columns, rounded to the rows' dtype once; the columns on
    torch's threads."""
    n = h.shape[1]
    _check(rows, slots, n)
    if slots is None and rows.shape[0] != n:
        raise ValueError(f"down needs h [T, n] and rows [n, d], got {tuple(h.shape)} and {tuple(rows.shape)}")
    fn = getattr(_library(), f"fb_down_{DTYPES[rows.dtype]}")
    d = rows.shape[1]
    hs = h.to(torch.float32).contiguous()
    out = torch.empty(h.shape[0], d, dtype=torch.float32)
    index = None if slots is None else slots.ctypes.data
    for t in range(h.shape[0]):
        fn(rows.data_ptr(), index, n, d, rows.stride(0), hs[t].data_ptr(), out[t].data_ptr(), torch.get_num_threads())
    return out.to(rows.dtype)
