"""The storage probe: what the device under the flash layouts can do, measured with fio, cached per device.

Random reads (direct=1) over a grid of chunk sizes and parallelism, with two I/O engines: `psync` with that many
jobs (threads), and `io_uring` from one job with that queue depth. Plus one sequential read. Every I/O figure the
suite reports is set beside the probe's figure at the same chunk size and parallelism.

Where fio is missing or fails, the probe falls back to the project's own reader (psync threads), and labels
every point so: those are not a reference, only a curve.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flashbench.reference.storage import storage_of

from . import fio
from .records import write_json_atomic
from .sweep import measure_reader, synthetic_layer

KIB, MIB = 1024, 1024 * 1024
READER = "flashbench-reader"  # the fallback's tool name


@dataclass(frozen=True)
class ProbeGrid:
    chunk_bytes: tuple[int, ...] = (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB)
    threads: tuple[int, ...] = (1, 4, 16, 32)  # psync jobs; io_uring queue depth
    ioengines: tuple[str, ...] = ("psync", "io_uring")
    seconds: float = 1.0
    file_mib: int = 1024


@dataclass(frozen=True)
class ProbePoint:
    tool: str  # "fio" or READER
    ioengine: str
    rw: str  # "randread" or "read" (sequential)
    chunk_bytes: int
    threads: int  # psync: jobs; io_uring: queue depth asked for
    bandwidth_bytes_s: float
    iops: float
    achieved_depth: float | None  # I/Os in flight on average, as fio saw them
    clat_p50_us: float | None = None
    clat_p99_us: float | None = None


@dataclass
class Probe:
    directory: str
    storage: dict
    grid: ProbeGrid
    points: list[ProbePoint]
    measured_at: str
    fio_version: str | None
    fio_error: str | None = None  # why the fallback was used
    cached_from: str | None = None  # the cache file, where this probe was not measured in this run
    key: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def tool(self) -> str:
        return "fio" if self.fio_error is None else READER

    def reference(self, chunk_bytes: float, threads: int, ioengine: str | None = None) -> ProbePoint | None:
        """The random-read point nearest to (chunk size, threads) of `ioengine`: nearest thread count, then nearest
        chunk size on a log scale; with ioengine None, the faster engine's there (`fio.ENGINES`). None if the probe
        has no such engine."""
        if ioengine is None:
            refs = [r for e in {p.ioengine for p in self.points} if (r := self.reference(chunk_bytes, threads, e))]
            return max(refs, key=lambda r: r.bandwidth_bytes_s, default=None)
        pts = [p for p in self.points if p.rw == "randread" and p.ioengine == ioengine]
        if not pts or chunk_bytes <= 0:
            return None
        t = min({p.threads for p in pts}, key=lambda n: (abs(math.log(n / threads)), n))
        return min((p for p in pts if p.threads == t), key=lambda p: abs(math.log(p.chunk_bytes / chunk_bytes)))

    def as_dict(self) -> dict:
        return asdict(self) | {"tool": self.tool}

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        grid = ProbeGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["grid"].items()})
        return cls(d["directory"], d["storage"], grid, [ProbePoint(**p) for p in d["points"]], d["measured_at"],
                   d["fio_version"], d.get("fio_error"), d.get("cached_from"), d.get("key", ""), d.get("notes", []))


def fio_version() -> str | None:
    exe = shutil.which("fio")
    if exe is None:
        return None
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_of(directory: Path) -> dict:
    """Mount point, filesystem and block device of `directory`, with the device's model where sysfs has it."""
    s = storage_of(directory)
    info = {"mount_point": s.mount_point, "filesystem": s.filesystem, "device": s.device, "in_memory": s.in_memory}
    block = Path("/sys/class/block") / Path(s.device).name
    for key, rel in (("model", "device/model"), ("rotational", "queue/rotational"), ("size_sectors", "size")):
        for f in (block / rel, block.parent / block.resolve().parent.name / rel):
            try:
                info[key] = f.read_text().strip()
                break
            except OSError:
                continue
    return info


def cache_key(storage: dict, grid: ProbeGrid, version: str | None) -> str:
    ident = json.dumps({"storage": storage, "grid": asdict(grid), "fio": version,
                        "host": os.uname().nodename}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashbench" / "probe"


def probe(directory: Path, grid: ProbeGrid = ProbeGrid(), cache_dir: Path | None = None, fresh: bool = False,
          progress=print) -> Probe:
    """The probe for the storage holding `directory`: from the cache where this device, filesystem, fio version
    and grid were measured before (unless `fresh`), else measured now and cached."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    storage, version = device_of(directory), fio_version()
    key = cache_key(storage, grid, version)
    cache_file = (cache_dir or default_cache_dir()) / f"probe-{key}.json"
    if cache_file.is_file() and not fresh:
        try:
            cached = Probe.from_dict(json.loads(cache_file.read_text()))
            cached.cached_from = str(cache_file)
            if progress:
                progress(f"probe: cached {cached.tool} curve of {storage['device']} ({storage['filesystem']}) from "
                         f"{cached.measured_at}: {cache_file} (--fresh-probe measures again)")
            return cached
        except (OSError, ValueError, KeyError, TypeError) as e:
            if progress:
                progress(f"probe: ignoring unreadable cache {cache_file} ({e}); measuring")
    result = measure(directory, grid, storage, version, progress)
    result.key = key
    write_json_atomic(cache_file, result.as_dict())
    return result


def measure(directory: Path, grid: ProbeGrid, storage: dict, version: str | None, progress=print) -> Probe:
    geometry, path = synthetic_layer(directory, MIB, grid.file_mib * MIB)
    result = Probe(str(directory), storage, grid, [], time.strftime("%Y-%m-%dT%H:%M:%S%z"), version)
    if storage["in_memory"]:
        result.notes.append(f"{directory} is on {storage['filesystem']}: reads come from memory, not a device")
    runs = [(e, c, t) for e in grid.ioengines for c in grid.chunk_bytes for t in grid.threads]
    for i, (engine, chunk, threads) in enumerate(runs, 1):
        try:
            r = fio.in_flight(path, chunk, threads, grid.seconds, engine)
        except fio.FioError as e:
            if engine != "psync":  # an engine this fio or kernel lacks: keep the psync curve
                result.notes.append(f"fio {engine}: {e}")
                continue
            result.fio_error = str(e)
            if progress:
                progress(f"probe: fio failed ({e}); falling back to flashbench's own reader (not a reference)")
            return _reader_fallback(result, directory, grid, progress)
        result.points.append(_point(r, threads))
        if progress:
            progress(f"probe [{i}/{len(runs)}] {_describe(result.points[-1])}")
    try:
        r = fio.randread(path, MIB, 1, grid.seconds, rw="read")
        result.points.append(_point(r, 1))
        if progress:
            progress(f"probe [seq] {_describe(result.points[-1])}")
    except fio.FioError as e:
        result.notes.append(f"fio sequential read: {e}")
    return result


def _point(r: fio.FioResult, threads: int) -> ProbePoint:
    return ProbePoint("fio", r.ioengine, r.rw, r.block_bytes, threads, r.bandwidth_bytes_s, r.iops,
                      r.achieved_depth, r.clat_p50_us, r.clat_p99_us)


def _reader_fallback(result: Probe, directory: Path, grid: ProbeGrid, progress) -> Probe:
    result.points = []
    for chunk in grid.chunk_bytes:
        geometry, path = synthetic_layer(directory, chunk, grid.file_mib * MIB)
        for threads in grid.threads:
            stats, _ = measure_reader(geometry, path, threads, grid.seconds, batch=max(threads, 64))
            result.points.append(ProbePoint(READER, "psync", "randread", chunk, threads,
                                            stats.bytes_read / stats.seconds, stats.reads / stats.seconds, None))
            if progress:
                progress(f"probe (fallback) {_describe(result.points[-1])}")
    return result


def _describe(p: ProbePoint) -> str:
    par = f"{p.threads:2d} jobs " if p.ioengine == "psync" else f"depth {p.threads:2d}"
    depth = f"  in flight {p.achieved_depth:5.1f}" if p.achieved_depth is not None else ""
    return (f"{p.tool} {p.ioengine:8s} {p.rw:8s} {p.chunk_bytes // KIB:5d} KiB {par} "
            f"{p.bandwidth_bytes_s / MIB:8.1f} MiB/s {p.iops:9.0f} IOPS{depth}")


def table(result: Probe) -> str:
    """Bandwidth (MiB/s) by chunk size (rows) and parallelism (columns), one block per engine."""
    lines = []
    for engine in result.grid.ioengines:
        pts = {(p.chunk_bytes, p.threads): p for p in result.points if p.ioengine == engine and p.rw == "randread"}
        if not pts:
            continue
        label = "jobs" if engine == "psync" else "depth"
        lines.append(f"{result.tool} randread {engine}, MiB/s    " + "".join(f"{label} {t:<5d}" for t in result.grid.threads))
        for c in result.grid.chunk_bytes:
            cells = "".join(f"{pts[(c, t)].bandwidth_bytes_s / MIB:10.1f}" if (c, t) in pts else "         -"
                            for t in result.grid.threads)
            lines.append(f"  {c // KIB:6d} KiB{'':17s}{cells}")
    seq = [p for p in result.points if p.rw == "read"]
    if seq:
        lines.append(f"sequential read, 1 MiB, 1 job: {seq[0].bandwidth_bytes_s / MIB:.1f} MiB/s")
    return "\n".join(lines)
