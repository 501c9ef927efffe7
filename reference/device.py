"""Where the engine computes: the CPU, or a CUDA GPU with its weights, neuron cache and KV cache in device memory.

Reads from flash land in host buffers either way (O_DIRECT into page-aligned memory); on a GPU those buffers are
also page-locked (pinned), so each layer's delta goes to the device in an asynchronous copy on a stream of its own,
timed with CUDA events (the paper counts this copy in memory management). On the CPU there is nothing to copy and
every call here is the identity, so the same engine code runs in CI without a GPU.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .errors import FlashbenchError


class DeviceError(FlashbenchError):
    """A device the machine does not have."""


NAME = re.compile(r"cpu|cuda(:\d+)?")  # the device names a scenario or `Techniques` may give


def resolve(name: str) -> torch.device:
    """"cpu", "cuda" or "cuda:N" as a torch device, or DeviceError saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {name!r} is not a device name (cpu, cuda, cuda:N)") from e
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r}: the engine runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build of torch" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise DeviceError(f"device {name!r}: no CUDA GPU here (torch {torch.__version__}, {build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def exact_float32(device: torch.device) -> None:
    """float32 products in float32 on a GPU (TF32 would round their inputs to 10 bits: not the exact tier)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


class Transfer:
    """Host-to-device copies of what was read, on a copy stream, with their time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gpu = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.gpu else None
        self._copies: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._pinned: list[np.ndarray] = []

    def pin(self, buffer: np.ndarray) -> np.ndarray:
        """Page-lock a read buffer (on a GPU), so that copies from it are asynchronous DMA."""
        if self.gpu and buffer.nbytes:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, 0)
            if err != cudart.cudaError.success:
                raise DeviceError(f"cannot pin a {buffer.nbytes:,}-byte read buffer (cudaHostRegister: {err})")
            self._pinned.append(buffer)
        return buffer

    def to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` (views of a read buffer) on the device. The compute stream waits for the copy; the buffer may
        be read into again only after `wait()`."""
        if not self.gpu:
            return tensors
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record()
            out = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
            end.record()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._copies.append((start, end))
        return out

    def wait(self) -> None:
        """Before a read buffer is filled again: the copies out of it are done."""
        if self._copies:
            self._copies[-1][1].synchronize()

    def synchronize(self) -> None:
        """The end of a pass: everything queued on the device has run (so the clock can stop)."""
        if self.gpu:
            torch.cuda.synchronize(self.device)

    def seconds(self) -> float:
        """The copies' device time since the last call (after `synchronize`)."""
        total = sum(a.elapsed_time(b) for a, b in self._copies) / 1e3
        self._copies.clear()
        return total

    def close(self) -> None:
        for buffer in self._pinned:
            torch.cuda.cudart().cudaHostUnregister(buffer.ctypes.data)
        self._pinned.clear()


def host_to_device_rate(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float | None:
    """GB/s of a copy from pinned host memory to `device` (the best of `repeats`); None on the CPU."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9
