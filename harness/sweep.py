"""The reader's bandwidth sweep: our reader and fio on the same file, record size and parallelism, in one run.

A synthetic one-layer FFN file of random bytes stands in for a paper-scale layer (a 32 KiB record is, e.g., one
bundled OPT 6.7B-sized neuron at d_model 8192 in fp16). Each reader call fetches `batch` distinct random neurons,
as one token's delta would; fio reads random blocks of the record size with the same number of threads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashbench.reference.layout import FFNGeometry
from flashbench.reference.reader import FlashReader, ReadStats, aligned_buffer

from . import fio

KIB = 1024


@dataclass(frozen=True)
class SweepPoint:
    record_bytes: int
    threads: int
    reader_bytes_s: float
    reader_reads_s: float
    reader_direct: bool
    fio_bytes_s: float | None
    fio_error: str | None

    @property
    def fraction_of_fio(self) -> float | None:
        return self.reader_bytes_s / self.fio_bytes_s if self.fio_bytes_s else None


def synthetic_layer(directory: Path, record_bytes: int, file_bytes: int) -> tuple[FFNGeometry, Path]:
    """A bundled fp16 layer file of random bytes whose records are `record_bytes` long (reused if present)."""
    if record_bytes % 4:
        raise ValueError(f"record size must be a multiple of 4 bytes, got {record_bytes}")
    d_ffn = file_bytes // record_bytes
    geometry = FFNGeometry("bundled", "float16", record_bytes // 4, d_ffn, ("up", "down"))
    path = Path(directory) / f"sweep-{file_bytes >> 20}MiB.bin"
    if not path.exists() or path.stat().st_size != geometry.file_bytes:
        tmp = path.with_suffix(".tmp")
        rng = np.random.default_rng(0)
        with open(tmp, "wb") as f:
            for _ in range(0, geometry.file_bytes, 1 << 24):
                f.write(rng.integers(0, 256, min(1 << 24, geometry.file_bytes - f.tell()), dtype=np.uint8).tobytes())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return geometry, path


def measure_reader(geometry: FFNGeometry, path: Path, threads: int, seconds: float, batch: int = 256,
                   seed: int = 0) -> tuple[ReadStats, int]:
    """Repeated reader calls of `batch` random distinct neurons for about `seconds`; totals and call count."""
    rng = np.random.default_rng(seed)
    out = aligned_buffer(batch * geometry.record_bytes).reshape(batch, geometry.record_bytes)
    total, calls = ReadStats(), 0
    with FlashReader([geometry], [path], threads=threads) as reader:
        reader.read(0, rng.choice(geometry.d_ffn, batch, replace=False), out)  # warm-up: threads, staging
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            total += reader.read(0, rng.choice(geometry.d_ffn, batch, replace=False), out)
            calls += 1
    return total, calls


def sweep(directory: Path, record_sizes: list[int], threads: list[int], seconds: float = 2.0, repeats: int = 3,
          file_bytes: int = 1 << 30, with_fio: bool = True, progress=print) -> list[SweepPoint]:
    """Reader and fio alternate `repeats` times per point (so drift on a shared device hits both alike); each
    figure is the median of its repeats."""
    points = []
    for record in record_sizes:
        geometry, path = synthetic_layer(directory, record, file_bytes)
        for t in threads:
            ours, theirs, fio_err, direct = [], [], None, True
            for r in range(repeats):
                stats, _ = measure_reader(geometry, path, t, seconds, seed=r)
                ours.append((stats.bytes_read / stats.seconds, stats.reads / stats.seconds))
                direct = direct and stats.direct
                if with_fio and fio_err is None:
                    try:
                        theirs.append(fio.randread(path, record, t, seconds).bandwidth_bytes_s)
                    except fio.FioError as e:
                        fio_err = str(e)
            bw, reads = np.median(np.array(ours), axis=0).tolist()
            point = SweepPoint(record, t, bw, reads, direct, float(np.median(theirs)) if theirs else None, fio_err)
            points.append(point)
            if progress:
                progress(format_point(point))
    return points


def format_point(p: SweepPoint) -> str:
    mib = lambda b: f"{b / 2**20:8.1f}" if b is not None else "       -"  # noqa: E731
    frac = f"{p.fraction_of_fio:6.1%}" if p.fraction_of_fio is not None else "     -"
    note = "" if p.reader_direct else "  (NOT direct: page cache / memory)"
    note += f"  fio: {p.fio_error}" if p.fio_error else ""
    return f"{p.record_bytes // KIB:6d} KiB {p.threads:4d} threads  reader {mib(p.reader_bytes_s)} MiB/s  " \
           f"fio {mib(p.fio_bytes_s)} MiB/s  reader/fio {frac}{note}"
