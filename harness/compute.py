"""The machine's compute rate per dtype, and `compute_dtype = "auto"`: the 16-bit type this CPU multiplies fastest.

A decode step is matrix-vector products over weights, so the rate that matters is weight bytes per second of
`torch.mv` at the model's FFN shape, with the engine's threads, over weights that DRAM must stream: the products cycle
through copies of the matrix that together exceed the CPU's last-level cache twice over, as a model's layers do (one
matrix multiplied again and again stays in a large last-level cache: at 8192x2048 in bfloat16 that read 46.8 GB/s on
an Intel Xeon with AMX against 31.7 from DRAM, which made the bound one no engine could reach). A fixed 256 MiB was
not enough on a virtual machine whose L3 is 480 MiB: 16384x4096 bfloat16 products over 128 MiB ran at 49 GB/s, over
256 MiB 32-34, over 512 MiB to 4 GiB 28 (2 threads, `stream_bytes`). It depends on the CPU as much as on the dtype: on
an Intel Xeon with AMX and avx512_bf16, bfloat16 ran 4.5x faster than float16 (torch 2.13, 2 threads, 16384x4096);
elsewhere float16 may be the faster. "auto" measures both here and takes the faster; exactness is then judged
against dense inference in that dtype, as for any compute dtype. A model whose weights fit in the caches is
multiplied from them, so the copies stop at the model's own weight bytes where those are fewer (the embedded models:
a few MB); that also keeps a tiny matrix from being cycled through a hundred thousand copies, one Python call each.

One position's product runs by one of three kernels, `torch.mv`, `F.linear` and, for 16-bit weights on the CPU, this
project's C kernel "rows" (the same sums; `model.project`), and which is fastest depends on the CPU and the dtype too
(on that Xeon, bfloat16 mv 24 against linear 21 GB/s, float16 7 against 14; on an Intel Xeon without AMX, bfloat16
mv 6 against rows 21): each is measured, `matvec = "auto"` takes the fastest for the compute dtype, and the bound is
at the fastest one's rate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flashbench.reference import row_kernels
from flashbench.reference.config import ModelConfig
from flashbench.reference.device import host_to_device_rate, resolve
from flashbench.reference.flash import COMPUTE_DTYPES
from flashbench.reference.model import MATVEC, project

HALF = ("float16", "bfloat16")
FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "f16c")  # what decides the 16-bit kernels' speed
SECONDS = 0.15  # per kernel and dtype, after a warm-up product, unless PRODUCTS are done sooner
PRODUCTS = 1000  # a small model's products take microseconds: a thousand of them are as many as the clock needs
MIN_STREAM_BYTES = 256 << 20  # the least the products and the bandwidth read cycle through, whatever the caches
CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # index*/size: "48K", "491520K", "32M"


@dataclass(frozen=True)
class ComputeRates:
    shape: tuple[int, int]  # [rows, columns] of the matrix multiplied: one FFN projection
    threads: int
    gb_per_s: dict[str, float]  # dtype -> matrix bytes multiplied per second by torch.mv
    cpu_flags: tuple[str, ...]  # those of FLAGS the CPU has
    read_gb_per_s: float | None = None  # memory bandwidth: one pass summing a float32 array of stream_bytes
    device: str = "cpu"  # where the products ran (the engine's device)
    host_to_device_gb_per_s: float | None = None  # on a GPU: a copy from pinned host memory (what reads must cross)
    linear_gb_per_s: dict[str, float] | None = None  # the same by F.linear (None: not measured)
    stream_bytes: int | None = None  # past the caches: what the bandwidth pass reads, the products' most
    rows_gb_per_s: dict[str, float] | None = None  # the same by the "rows" C kernel: 16-bit dtypes on the CPU
    cycled_bytes: dict[str, int] | None = None  # dtype -> the weight bytes its products cycled through

    def rate(self, dtype: str, matvec: str) -> float:
        """Matrix bytes per second of one position's product in `dtype` by the `matvec` kernel; 0 where that kernel
        was not measured for it ("rows": only 16-bit weights on the CPU, where the kernels are built)."""
        if matvec == "rows":
            return (self.rows_gb_per_s or {}).get(dtype, 0.0)
        return self.linear_gb_per_s[dtype] if matvec == "linear" and self.linear_gb_per_s else self.gb_per_s[dtype]

    def rates_line(self, dtype: str) -> str:
        """"mv 6.0, linear 7.1, rows 21.4 GB/s": each kernel measured for `dtype`."""
        return ", ".join(f"{kernel} {self.rate(dtype, kernel):.1f}" for kernel in MATVEC
                         if self.rate(dtype, kernel)) + " GB/s"

    def matvec(self, dtype: str) -> str:
        """The fastest kernel for `dtype` (one of MATVEC; linear where rates tie)."""
        return max(MATVEC, key=lambda kernel: (self.rate(dtype, kernel), kernel == "linear"))

    def fastest_half(self) -> str:
        return max(HALF, key=lambda d: self.rate(d, self.matvec(d)))

    def why(self) -> str:
        """The choice, with the rates it came from."""
        rates = "; ".join(f"{d} {self.rates_line(d)}" for d in COMPUTE_DTYPES)
        flags = ", ".join(self.cpu_flags) or "none of " + ", ".join(FLAGS)
        where = (f"{self.threads} threads; CPU flags: {flags}" if self.device == "cpu"
                 else f"on {self.device}, {torch.cuda.get_device_name(self.device)}")
        cycled = self.cycled_bytes or {}
        over = (" cycled over " + ", ".join(f"{d} {cycled[d] / 2**20:.3g}" for d in cycled) + " MiB" if cycled else
                f" cycled over {self.stream_bytes >> 20} MiB" if self.stream_bytes else "")
        return (f"{self.fastest_half()}: the faster 16-bit matrix-vector product here ({rates}; "
                f"{self.shape[0]}x{self.shape[1]} matrices{over}, {where})")

    def as_dict(self) -> dict:
        return asdict(self) | {"chosen": self.fastest_half(), "matvec": {d: self.matvec(d) for d in COMPUTE_DTYPES},
                               "why": self.why()}


def last_level_cache_bytes(caches: Path = CACHES) -> int:
    """The CPU's largest cache in bytes (sysfs), 0 where the kernel does not say."""
    sizes = []
    for size in caches.glob("index*/size"):
        text = size.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def stream_bytes(device: torch.device, caches: Path = CACHES) -> int:
    """How many bytes of weights the products cycle through so that each reads DRAM, not a cache: twice the last-level
    cache (the CPU's from sysfs, or the GPU's L2), and at least MIN_STREAM_BYTES."""
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    else:
        cache = last_level_cache_bytes(caches)
    return max(MIN_STREAM_BYTES, 2 * cache)


def weight_elements(config: ModelConfig, ffn_rows: int | None = None) -> int:
    """The weight elements one position multiplies: attention's projections and the LM head, and the FFN's matrices
    over `ffn_rows` neurons counted over all layers (every layer's every neuron where None)."""
    d, kv = config.d_model, config.n_kv_heads * config.head_dim
    ffn = (config.n_layers * config.d_ffn if ffn_rows is None else ffn_rows) * (3 if config.gated else 2) * d
    return config.n_layers * (2 * d * d + 2 * kv * d) + config.vocab_size * d + ffn


def cpu_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return tuple(f for f in FLAGS if f in have)


@torch.inference_mode()
def measure_rates(shape: tuple[int, int], threads: int | None = None, device: str = "cpu",
                  model_elements: int | None = None) -> ComputeRates:
    """Weight bytes per second of `torch.mv`, `F.linear` and the "rows" kernel (one position) on [rows, columns]
    matrices too many for any cache (`stream_bytes`), or as many as the model's `model_elements` where those are
    fewer, in every compute dtype, on the engine's device, and the memory bandwidth of one summing pass over
    `stream_bytes` (the rate weights could stream at); on a GPU also the host-to-device copy rate."""
    where = resolve(device)
    sync = (lambda: torch.cuda.synchronize(where)) if where.type == "cuda" else (lambda: None)  # noqa: E731
    threads = threads or torch.get_num_threads()
    streamed = stream_bytes(where)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=g)
        x32 = torch.randn(shape[1], generator=g)
        rates, cycled = {kernel: {} for kernel in MATVEC}, {}
        for name, dtype in COMPUTE_DTYPES.items():
            w, x = base.to(device=where, dtype=dtype), x32.to(device=where, dtype=dtype)
            copies = -(-streamed // w.nbytes)  # together past any cache
            if model_elements:
                copies = min(copies, -(-model_elements // w.numel()))
            ws = [w] + [w.clone() for _ in range(copies - 1)]  # the clones touch every page
            cycled[name] = w.nbytes * len(ws)
            for kernel in MATVEC:
                if kernel == "rows" and not row_kernels.serves(w):
                    continue
                project(x, w, None, kernel)  # warm-up: the first call picks and loads the kernel
                sync()
                n, t0 = 0, time.perf_counter()
                while ((elapsed := time.perf_counter() - t0) < SECONDS and n < PRODUCTS) or n < len(ws):
                    project(x, ws[n % len(ws)], None, kernel)
                    sync()
                    n += 1
                rates[kernel][name] = w.nbytes * n / elapsed / 1e9
            del w, ws
        array = torch.ones(streamed // 4, device=where)
        array.sum()
        sync()
        t0 = time.perf_counter()
        array.sum()
        sync()
        read = array.nbytes / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(before)
    return ComputeRates(tuple(shape), threads, rates["mv"], cpu_flags(), read, str(where), host_to_device_rate(where),
                        rates["linear"], streamed, rates["rows"] or None, cycled)


def latency_bound(metrics: dict, fio: dict | None, rates: ComputeRates, dtype: str, config: ModelConfig,
                  overlap: bool = False) -> dict | None:
    """The machine's bound on one decode step of a configuration, from its own exact counters: the bytes it reads per
    token at fio's bandwidth for its mean read size and parallelism, plus the weight bytes it multiplies per token
    (attention projections, LM head, and the FFN rows of the neurons in its products) at this CPU's matrix-vector
    rate in its compute dtype (the faster of the two kernels); on a GPU, the bytes read cross to the device at the
    measured copy rate too. Without `overlap` the engine reads and then computes, one after the other, so the bound
    is the sum; with it the reads may run beside the compute, so the bound is the larger of the two (its
    read-ahead's wasted bytes counted in); the ratio of the measured step (the harness's clock) to it says how far
    the configuration is from what this machine could do. None where the engine reports no product counter, or it
    reads but the probe has no point."""
    per_token = metrics.get("per_token", {})
    if "neurons_multiplied" not in per_token or "harness_ms" not in metrics:
        return None
    read = per_token.get("bytes_read") or 0.0
    if read and not (fio and fio.get("bandwidth_bytes_s")):
        return None
    multiplied = weight_elements(config, per_token["neurons_multiplied"]) * COMPUTE_DTYPES[dtype].itemsize
    io_ms = read / fio["bandwidth_bytes_s"] * 1e3 if read else 0.0
    h2d = rates.host_to_device_gb_per_s
    copy_ms = read / (h2d * 1e9) * 1e3 if read and h2d else 0.0
    matvec = rates.matvec(dtype)
    compute_ms = multiplied / (rates.rate(dtype, matvec) * 1e9) * 1e3
    moving = io_ms + copy_ms
    bound = max(moving, compute_ms) if overlap else moving + compute_ms
    measured = metrics["harness_ms"]["mean"]
    return {"io_ms": io_ms, "copy_ms": copy_ms, "compute_ms": compute_ms, "ms": bound, "measured_ms": measured,
            "ratio": measured / bound, "bytes_multiplied": multiplied,
            "mv_bytes_s": rates.rate(dtype, matvec) * 1e9, "matvec": matvec,
            "fio_bytes_s": fio["bandwidth_bytes_s"] if read else None,
            "read_bytes_s": rates.read_gb_per_s and rates.read_gb_per_s * 1e9,
            "sequential": ("reads beside compute (overlap): the larger of the two" if overlap else
                           "reads, then compute" if not h2d else "reads, then the copy to the device, then compute")}
