"""The down projection that skips inactive neurons: `sparse_down.c`, built by `make` as `_sparse_down.so` beside this
file and called through ctypes (which lets go of the GIL for the call). The flash engine uses it for 16-bit rows on
the CPU; where the library is not built, `unavailable()` says why and the engine multiplies with torch."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

LIBRARY = Path(__file__).with_name("_sparse_down.so")
FUNCTIONS = {torch.bfloat16: "fb_down_bf16", torch.float16: "fb_down_f16"}


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(LIBRARY))
    for name in FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    return lib


@functools.cache
def unavailable() -> str | None:
    """Why the C kernel cannot be used here, or None where it can."""
    if not LIBRARY.is_file():
        return f"{LIBRARY} is not built (`make setup` builds it where a C compiler is installed)"
    try:
        _library()
    except OSError as e:
        return f"{LIBRARY}: {e}"
    return None


def down(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [T, n] @ rows [n, d] for 16-bit CPU tensors whose rows are contiguous (any row stride): each position's sum in
    float32 over the rows whose activation is not zero, in row order, rounded to the rows' dtype once."""
    if rows.dtype not in FUNCTIONS or rows.device.type != "cpu" or rows.stride(1) != 1 or h.shape[1] != rows.shape[0]:
        raise ValueError(f"sparse_down.down needs h [T, n] and 16-bit CPU rows [n, d] with contiguous rows, got "
                         f"{tuple(h.shape)} and {tuple(rows.shape)} {rows.dtype} strides {rows.stride()}")
    fn = getattr(_library(), FUNCTIONS[rows.dtype])
    n, d = rows.shape
    hs = h.to(torch.float32).contiguous()  # exact: every 16-bit value is a float32
    out = torch.empty(h.shape[0], d, dtype=torch.float32)
    for t in range(h.shape[0]):
        fn(rows.data_ptr(), n, d, rows.stride(0), hs[t].data_ptr(), out[t].data_ptr())
    return out.to(rows.dtype)
