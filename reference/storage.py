"""What storage a path lives on: its mount point, filesystem type and device, read from /proc/self/mountinfo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}


@dataclass(frozen=True)
class Storage:
    mount_point: str
    filesystem: str
    device: str

    @property
    def in_memory(self) -> bool:
        """True where "flash" reads would be served from DRAM whatever the flags (tmpfs and the like)."""
        return self.filesystem in MEMORY_FILESYSTEMS


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")  # mountinfo writes spaces as \040


def storage_of(path: str | Path) -> Storage:
    """The mount holding `path` (the longest mount point that prefixes its real path)."""
    real = os.path.realpath(path)
    best = Storage("/", "unknown", "unknown")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        mount = _unescape(fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best.mount_point):
            best = Storage(mount, rest[0], rest[1])
    return best
