"""Running fio, the reference every I/O figure is reported beside, and reading its JSON defensively."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class FioError(RuntimeError):
    """fio is missing, failed, or printed something that is not its JSON report."""


@dataclass(frozen=True)
class FioResult:
    block_bytes: int
    numjobs: int
    ioengine: str
    iodepth: int
    bandwidth_bytes_s: float
    iops: float
    runtime_s: float
    clat_p50_us: float | None
    clat_p99_us: float | None
    achieved_depth: float | None  # I/Os in flight on average (Little's law: IOPS x mean latency), all jobs
    rw: str = "randread"


def parse_fio_json(text: str) -> dict:
    """fio may print warnings before its JSON; take the first top-level object that parses."""
    start = text.find("{")
    while start != -1:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    raise FioError(f"fio printed no JSON report; its output began: {text[:200]!r}")


def _percentile(clat: dict, key: str) -> float | None:
    pct = clat.get("percentile") or {}
    for k, v in pct.items():
        if abs(float(k) - float(key)) < 1e-9:
            return v / 1e3  # ns -> us
    return None


def _bandwidth(read: dict) -> float:
    """Bytes/s: `bw_bytes` where fio has it (3.x), else `bw`, which older fio gives in KiB/s."""
    return float(read["bw_bytes"]) if "bw_bytes" in read else float(read["bw"]) * 1024


# The ways fio keeps reads in flight. Every figure the reader is set beside is the faster of the two at that block size
# and parallelism: neither is fastest everywhere (16 KiB on this VM's disk: io_uring 965 against psync's 792 MiB/s at
# 32 in flight, psync 1,143 against 915 at 128; paper-24's and paper-25's probes), and a reader beside the slower one
# looks closer to the device than it is.
ENGINES = ("psync", "io_uring")


def in_flight(path: Path, block_bytes: int, reads: int, seconds: float, ioengine: str) -> FioResult:
    """fio randread with `reads` in flight as `ioengine` keeps them: that many psync jobs, or one job's queue that
    deep (io_uring), as the probe measures its grid."""
    jobs, depth = (reads, 1) if ioengine == "psync" else (1, reads)
    return randread(path, block_bytes, jobs, seconds, ioengine=ioengine, iodepth=depth)


def randread(path: Path, block_bytes: int, numjobs: int, seconds: float = 3.0, ioengine: str = "psync",
             iodepth: int = 1, size_bytes: int | None = None, rw: str = "randread") -> FioResult:
    """fio randread (or `rw="read"`: sequential) with direct=1 on an existing file (fio reads it, never writes
    it)."""
    fio = shutil.which("fio")
    if fio is None:
        raise FioError("fio is not installed (Debian/Ubuntu: apt-get install fio)")
    size = size_bytes or Path(path).stat().st_size
    cmd = [
        fio, "--name=flashbench", f"--filename={path}", f"--rw={rw}", f"--bs={block_bytes}", "--direct=1",
        f"--ioengine={ioengine}", f"--iodepth={iodepth}", f"--numjobs={numjobs}", f"--size={size}",
        f"--runtime={max(1, round(seconds * 1000))}ms", "--time_based", "--group_reporting", "--readonly", "--output-format=json",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as e:
        raise FioError(f"fio did not finish within {seconds + 60:.0f} s") from e
    if proc.returncode != 0:
        raise FioError(f"fio failed (exit {proc.returncode}): {proc.stderr.strip()[:500]}")
    report = parse_fio_json(proc.stdout)
    try:
        job = report["jobs"][0]
        read = job["read"]
        clat = read.get("clat_ns") or {}
        lat_mean_ns = (read.get("lat_ns") or {}).get("mean")
        return FioResult(
            block_bytes=block_bytes, numjobs=numjobs, ioengine=ioengine, iodepth=iodepth,
            bandwidth_bytes_s=_bandwidth(read), iops=float(read["iops"]),
            runtime_s=float(read.get("runtime", 0)) / 1e3,
            clat_p50_us=_percentile(clat, "50.0"), clat_p99_us=_percentile(clat, "99.0"),
            achieved_depth=float(read["iops"]) * float(lat_mean_ns) / 1e9 if lat_mean_ns else None, rw=rw,
        )
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise FioError(f"fio's JSON report lacks the read results ({e!r})") from e
