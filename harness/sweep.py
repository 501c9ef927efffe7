"""The reader's bandwidth sweep: our reader and fio on the same file, record size and parallelism, in one run.

A synthetic one-layer FFN file of random bytes stands in for a paper-scale layer (a 16 KiB record is one bundled
OPT 6.7B neuron in fp16: an up column and a down row of 4096 values). Each reader call fetches `batch` distinct
random neurons, as one layer's delta would, and waits for all of them: every call pays for its threads' ramp-up and
drain, which fio's free-running jobs never do. fio reads random blocks of the record size with as many reads in
flight, both ways it keeps them (`fio.ENGINES`: that many psync jobs, one job's io_uring queue that deep), and each
reader run is set beside the faster. The C reference (pread_calls.c, built with the system's compiler where asked
for) makes the reader's calls with POSIX threads: what it loses to fio the calls cost, and what the threads backend
loses beyond it Python costs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashbench.reference import uring
from flashbench.reference.errors import FlashbenchError
from flashbench.reference.layout import FFNGeometry
from flashbench.reference.reader import BACKENDS, FlashReader, ReadStats, record_buffer

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
    fraction_of_fio: float | None  # the median of bracketed_fractions
    batch: int
    c_bytes_s: float | None = None  # the C reference, making the same calls
    c_fraction_of_fio: float | None = None
    c_error: str | None = None
    reader: str = "threads"  # the reader's backend (FlashReader's `backend`)
    fio_ioengine: str | None = None  # the fio engine that read faster here (median); each run is set beside the
    # faster engine's runs around it


class CReferenceError(RuntimeError):
    pass


C_REFERENCE = Path(__file__).with_name("pread_calls.c")


def bracketed_fractions(ours: list[float], theirs: list[float]) -> list[float]:
    """Each reader run's bandwidth over the mean of the fio runs just before and just after it.

    The runs alternate fio, reader, fio, ..., fio: on a shared virtual disk whose speed drifts by tens of percent
    within a minute, a reader run is judged against the device as it was around that run, not on average."""
    if len(theirs) != len(ours) + 1:
        raise ValueError(f"{len(ours)} reader runs need {len(ours) + 1} fio runs around them, got {len(theirs)}")
    return [o / ((before + after) / 2) for o, before, after in zip(ours, theirs, theirs[1:])]


def synthetic_layer(directory: Path, record_bytes: int, file_bytes: int) -> tuple[FFNGeometry, Path]:
    """A bundled fp16 layer file of random bytes whose records are `record_bytes` long (reused if present)."""
    if record_bytes % 4:
        raise FlashbenchError(f"record size must be a multiple of 4 bytes, got {record_bytes}")
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
                   seed: int = 0, backend: str = "threads") -> tuple[ReadStats, int]:
    """Repeated reader calls of `batch` random distinct neurons for about `seconds`; totals and call count."""
    rng = np.random.default_rng(seed)
    out = record_buffer(geometry, batch)
    total, calls = ReadStats(), 0
    with FlashReader([geometry], [path], threads=threads, backend=backend) as reader:
        reader.read(0, rng.choice(geometry.d_ffn, batch, replace=False), out)  # warm-up: threads, staging
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            total += reader.read(0, rng.choice(geometry.d_ffn, batch, replace=False), out)
            calls += 1
    return total, calls


def choose_reader(directory: Path, file_bytes: int, record_bytes: int, threads: int, batch: int = 256,
                  seconds: float = 1.0, repeats: int = 2) -> dict:
    """`reader = "auto"`: the backend whose reader calls of `batch` random records of `record_bytes` (one layer's
    delta) read faster on this storage, `threads` reads in flight, on the probe's file in `directory` (written as the
    probe writes it where it is missing); the backends alternate `repeats` times, as the disk drifts. Where the
    io_uring reader cannot run here, threads, with the reason."""
    if record_bytes % 4:
        raise FlashbenchError(f"record size must be a multiple of 4 bytes, got {record_bytes}")
    choice = {"record_bytes": record_bytes, "batch": batch, "threads": threads, "bytes_s": {}}
    if why := uring.unavailable():
        return choice | {"chosen": "threads", "why": f"threads: the io_uring reader cannot run here ({why})"}
    _, path = synthetic_layer(directory, 1 << 20, file_bytes)  # the probe's file: 1 MiB records of random bytes
    geometry = FFNGeometry("bundled", "float16", record_bytes // 4, file_bytes // record_bytes, ("up", "down"))
    batch = choice["batch"] = min(batch, geometry.d_ffn)
    rates: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for r in range(repeats):
        for backend in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
            stats, _ = measure_reader(geometry, path, threads, seconds, batch, seed=r, backend=backend)
            rates[backend].append(stats.bytes_read / stats.seconds)
    mean = {b: sum(v) / len(v) for b, v in rates.items()}
    chosen = max(BACKENDS, key=lambda b: mean[b])
    said = ", ".join(f"{b} {mean[b] / 2**20:.0f} MiB/s" for b in BACKENDS)
    return choice | {"bytes_s": mean, "chosen": chosen,
                     "why": f"{chosen}: the faster reader here ({said}; calls of {batch} random {record_bytes / KIB:g} "
                            f"KiB records, {threads} reads in flight, {repeats} alternating runs of {seconds:g} s)"}


def build_c_reference(directory: Path) -> Path:
    """pread_calls.c compiled into `directory` (once per version of the source), with $CC or cc."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise CReferenceError("no C compiler (cc, or $CC) on this machine: the C reference needs one")
    digest = hashlib.sha256(C_REFERENCE.read_bytes()).hexdigest()[:12]
    exe = Path(directory) / f"pread_calls-{digest}"
    if not exe.exists():
        tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
        built = subprocess.run([cc, "-O2", "-pthread", "-o", str(tmp), str(C_REFERENCE)], capture_output=True,
                               text=True)
        if built.returncode:
            raise CReferenceError(f"{cc} could not build {C_REFERENCE}: {built.stderr.strip()[-500:]}")
        os.replace(tmp, exe)
    return exe


def measure_c_reference(exe: Path, path: Path, record_bytes: int, threads: int, seconds: float, batch: int,
                        seed: int) -> float:
    """Bytes per second inside the C reference's calls of `batch` random distinct records."""
    args = [str(exe), str(path), str(record_bytes), str(threads), str(batch), f"{seconds}", str(seed)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode:
        raise CReferenceError(done.stderr.strip() or f"{exe.name} exited with {done.returncode}")
    nbytes, inside, _ = done.stdout.split()
    return int(nbytes) / float(inside)


def check_batches(batches: list[int], record_sizes: list[int], file_bytes: int) -> None:
    """A reader call fetches 1 to (file size / record size) distinct records of the test file."""
    for batch in batches:
        too_few = [s for s in record_sizes if not 1 <= batch <= file_bytes // s]
        if too_few:
            raise FlashbenchError(f"--batch {batch}: a reader call fetches 1 to (file size / record size) distinct "
                                  f"records, and a {file_bytes >> 20} MiB file holds {file_bytes // max(too_few)} "
                                  f"records of {max(too_few) // KIB} KiB")


def sweep(directory: Path, record_sizes: list[int], threads: list[int], seconds: float = 2.0, repeats: int = 3,
          file_bytes: int = 1 << 30, with_fio: bool = True, batch: int = 256, c_reference: bool = False,
          progress=print, backends: tuple[str, ...] = ("threads",)) -> list[SweepPoint]:
    """Per point (record size, threads): fio runs, then `repeats` rounds of a run of each backend's reader and of
    the C reference, and fio runs, so that every run lies between two fio runs (see bracketed_fractions), each the
    faster of fio's two engines at that moment (an engine fio cannot run is left out, and `fio_error` says why); a
    point per backend. The runs of a round take turns going first, round by round: swept one after the other,
    whichever backend ran first read faster against fio by more than the backends differ (docs/results.md).
    Bandwidths are the medians of their runs."""
    exe, c_error = None, None
    if c_reference:
        try:
            exe = build_c_reference(directory)
        except CReferenceError as e:
            c_error = str(e)
    points = []
    for record in record_sizes:
        geometry, path = synthetic_layer(directory, record, file_bytes)
        for t in threads:
            ours = {b: [] for b in backends}
            reads = {b: [] for b in backends}
            direct = dict.fromkeys(backends, True)
            in_c, theirs, failed = [], {e: [] for e in fio.ENGINES}, {}

            def run_fio() -> None:
                for engine in fio.ENGINES:
                    if with_fio and engine not in failed:
                        try:
                            theirs[engine].append(fio.in_flight(path, record, t, seconds, engine).bandwidth_bytes_s)
                        except fio.FioError as e:
                            failed[engine] = str(e)

            def reader_of(backend: str):
                def run(r: int) -> None:
                    stats, _ = measure_reader(geometry, path, t, seconds, batch=batch, seed=r, backend=backend)
                    ours[backend].append(stats.bytes_read / stats.seconds)
                    reads[backend].append(stats.reads / stats.seconds)
                    direct[backend] = direct[backend] and stats.direct
                return run

            def run_c(r: int) -> None:
                nonlocal c_error
                if exe is not None and c_error is None:
                    try:
                        in_c.append(measure_c_reference(exe, path, record, t, seconds, batch, seed=r))
                    except CReferenceError as e:
                        c_error = str(e)

            turns = [reader_of(b) for b in backends] + ([run_c] if exe is not None else [])
            run_fio()
            for r in range(repeats):
                first = r % len(turns)
                for run in turns[first:] + turns[:first]:
                    run(r)
                run_fio()

            usable = [e for e in fio.ENGINES if e not in failed]
            best = [max(runs) for runs in zip(*(theirs[e] for e in usable))]  # each moment's faster engine
            faster = max(usable, key=lambda e: np.median(theirs[e]), default=None) if best else None
            fio_error = "; ".join(f"{e}: {m}" for e, m in failed.items()) or None

            def fraction(runs: list[float]) -> float | None:
                if not best or len(runs) != repeats:
                    return None
                return float(np.median(bracketed_fractions(runs, best)))

            median = lambda runs: float(np.median(runs)) if runs else None  # noqa: E731
            for b in backends:
                point = SweepPoint(record, t, median(ours[b]), median(reads[b]), direct[b], median(best), fio_error,
                                   fraction(ours[b]), batch, median(in_c), fraction(in_c), c_error, b, faster)
                points.append(point)
                if progress:
                    progress(format_point(point))
    return points


def format_point(p: SweepPoint) -> str:
    mib = lambda b: f"{b / 2**20:8.1f}" if b is not None else "       -"  # noqa: E731
    frac = f"{p.fraction_of_fio:6.1%}" if p.fraction_of_fio is not None else "     -"
    note = "" if p.reader_direct else "  (NOT direct: page cache / memory)"
    note += f"  fio: {p.fio_error}" if p.fio_error else ""
    if p.c_bytes_s is not None:
        c_frac = f"{p.c_fraction_of_fio:6.1%}" if p.c_fraction_of_fio is not None else "     -"
        note += f"  C, same calls {mib(p.c_bytes_s)} MiB/s  C/fio {c_frac}"
    note += f"  C reference: {p.c_error}" if p.c_error else ""
    return f"{p.record_bytes // KIB:6d} KiB {p.threads:4d} threads  reader ({p.reader}) {mib(p.reader_bytes_s)} " \
           f"MiB/s  fio ({p.fio_ioengine or '-'}) {mib(p.fio_bytes_s)} MiB/s  reader/fio {frac}{note}"
