"""Peers measured in the same run: what people do today when a model does not fit in DRAM.

- `mmap`: dense inference over the checkpoint's weights memory-mapped in their stored fp16 (what llama.cpp does),
  inside a memory cgroup capped at the DRAM budget, so the page cache cannot keep the whole model and every token
  faults the evicted weights back in from storage;
- `accelerate`: Hugging Face transformers with accelerate's disk offload (`offload_folder`, `max_memory` at the
  budget) on the same checkpoint.

Each peer runs in a subprocess of its own (`python -m flashbench.harness.peers`), so its memory is its own and a
crash is a skipped peer, not a failed run. A peer the platform cannot run is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

PEERS = ("mmap", "accelerate")
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


@dataclass
class PeerResult:
    peer: str
    status: str  # "measured" or "skipped"
    reason: str | None = None
    tokens: int = 0
    token_ms: list[float] | None = None
    tokens_per_s: float | None = None
    dram_budget_bytes: int | None = None
    cgroup: str | None = None  # where and how the cap was enforced, or why it was not
    peak_bytes: int | None = None  # the cgroup's peak usage (anonymous + page cache)
    read_bytes: int | None = None  # bytes the process read from storage (/proc/self/io read_bytes)
    major_faults: int | None = None


# ---- the memory cap ----------------------------------------------------------------------------------------------


def enter_cgroup(name: str, pid: int | None = None) -> tuple[Path | None, str]:
    """Move a process (default: this one) into a fresh cgroup-v1 memory group; (its path, or None and why not)."""
    if not CGROUP_ROOT.is_dir():
        return None, f"no cgroup v1 memory controller at {CGROUP_ROOT}"
    group = CGROUP_ROOT / name
    try:
        group.mkdir(exist_ok=True)
        (group / "cgroup.procs").write_text(str(pid or os.getpid()))
    except OSError as e:
        return None, f"cannot create or join {group} ({e.strerror}; needs root)"
    return group, str(group)


# Per-token temporaries (activations, logits, a growing KV cache) on top of the anonymous memory measured after a
# warm-up pass: without it the kernel kills the peer. A model smaller than this is not constrained by the cap.
SLACK_BYTES = 32 << 20


def cap(group: Path, budget: int) -> int:
    """Limit the group to its anonymous memory now (after a warm-up pass: KV cache, buffers) plus the budget plus a
    slack for per-token temporaries; the kernel evicts mapped or cached weight pages beyond it. The limit."""
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    limit = int(stat["rss"]) + budget + SLACK_BYTES
    (group / "memory.limit_in_bytes").write_text(str(limit))
    (group / "memory.max_usage_in_bytes").write_text("0")  # the peak from here on
    return limit


def remove_stale_groups() -> None:
    """Groups left by a peer that was killed (a timeout): empty ones are removed."""
    for group in CGROUP_ROOT.glob("flashbench-*"):
        try:
            if not (group / "cgroup.procs").read_text().strip():
                group.rmdir()
        except OSError:
            pass


def leave_and_remove(group: Path) -> None:
    try:
        (CGROUP_ROOT / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()
    except OSError:
        pass


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def _io_counters() -> tuple[int | None, int | None]:
    import resource

    read = None
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                read = int(line.split()[1])
    except OSError:
        pass
    return read, resource.getrusage(resource.RUSAGE_SELF).ru_majflt


# ---- the mmap peer -----------------------------------------------------------------------------------------------


def mmap_state(checkpoint: Path, config) -> dict:
    """Every weight of the checkpoint as a tensor over the memory-mapped file (nothing is read until used)."""
    import numpy as np
    import torch

    from flashbench.reference.checkpoint import _translate, weight_files

    state = {}
    for path in weight_files(checkpoint):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            ours = None if name == "__metadata__" else _translate(name, config.arch, to_hf=False)
            if ours is None or (config.tie_embeddings and ours == "lm_head.weight"):
                continue
            start, end = (8 + n + o for o in info["data_offsets"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the mapping is read-only; nothing writes to it
                t = torch.frombuffer(mapped[start:end], dtype=getattr(torch, ST_DTYPES[info["dtype"]]))
            state[ours] = t.view(info["shape"])
    return state


def run_mmap(checkpoint: Path, budget: int, prompt: list[int], tokens: int) -> PeerResult:
    import torch

    from flashbench.reference import Engine, ModelConfig, Transformer, generate
    from flashbench.reference.model import rope_tables

    result = PeerResult("mmap", "measured", dram_budget_bytes=budget)
    remove_stale_groups()
    group, where = enter_cgroup(f"flashbench-mmap-{os.getpid()}")
    result.cgroup = where
    if group is None:
        return PeerResult("mmap", "skipped", reason=where, dram_budget_bytes=budget)
    try:
        # Cached pages stay charged to whoever read them first (here: the run that wrote the checkpoint), and the
        # cap would not reach them: drop them, so that this group faults every weight in and pays for it.
        drop_page_cache()
        config = ModelConfig.load(checkpoint)
        state = mmap_state(checkpoint, config)
        dtype = next(iter(state.values())).dtype
        with torch.device("meta"):
            model = Transformer(config)
        model = model.to_empty(device="cpu").to(dtype)  # never touched: replaced by the mapped weights below
        model.load_state_dict(state, strict=True, assign=True)
        if config.arch != "opt":
            model.rope_cos, model.rope_sin = (t.to(dtype) for t in rope_tables(config))
        engine = Engine(model.eval(), max_len=len(prompt) + tokens + 1)
        engine.prefill(prompt)  # a warm-up pass: every allocation a token makes has been made once
        limit = cap(group, budget)
        result.cgroup = (f"{where}: limit {limit:,} bytes = anonymous memory + budget + {SLACK_BYTES >> 20} MiB "
                         "slack for temporaries")
        read0, faults0 = _io_counters()
        gen = generate(engine, prompt, tokens)
        read1, faults1 = _io_counters()
        result.tokens = len(gen.token_seconds)
        result.token_ms = [s * 1e3 for s in gen.token_seconds]
        result.tokens_per_s = len(gen.token_seconds) / sum(gen.token_seconds) if gen.token_seconds else None
        result.peak_bytes = int((group / "memory.max_usage_in_bytes").read_text())
        result.read_bytes = read1 - read0 if read0 is not None else None
        result.major_faults = faults1 - faults0
    finally:
        leave_and_remove(group)
    return result


# ---- the accelerate peer -----------------------------------------------------------------------------------------


def run_accelerate(checkpoint: Path, budget: int, prompt: list[int], tokens: int) -> PeerResult:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return PeerResult("accelerate", "skipped", reason=f"transformers/accelerate not installed ({e})")
    result = PeerResult("accelerate", "measured", dram_budget_bytes=budget)
    remove_stale_groups()
    group, where = enter_cgroup(f"flashbench-accelerate-{os.getpid()}")
    if group is None:
        return PeerResult("accelerate", "skipped", reason=where, dram_budget_bytes=budget)
    try:
        drop_page_cache()  # as for the mmap peer: every page it reads is charged to its group
        with tempfile.TemporaryDirectory(prefix="flashbench-offload-") as offload:
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint, device_map="auto", max_memory={"cpu": budget}, offload_folder=offload,
                torch_dtype=torch.float16, local_files_only=True)
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                model(ids, use_cache=True)  # a warm-up pass
                # The same rule as the mmap peer. Where accelerate holds its in-DRAM weights as anonymous memory they
                # are counted twice (in the anonymous memory and the budget): generous to the peer, never to us.
                limit = cap(group, budget)
                result.cgroup = (f"{where}: limit {limit:,} bytes = anonymous memory + budget + {SLACK_BYTES >> 20} "
                                 "MiB slack (weights accelerate keeps as tensors may count twice: in its favour)")
                read0, faults0 = _io_counters()
                times = []
                out = model(ids, use_cache=True)
                for _ in range(tokens - 1):
                    nxt = out.logits[:, -1:].argmax(-1)
                    t0 = time.perf_counter()
                    out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                    times.append(time.perf_counter() - t0)
                read1, faults1 = _io_counters()
                result.peak_bytes = int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        leave_and_remove(group)
    result.tokens = len(times)
    result.token_ms = [s * 1e3 for s in times]
    result.tokens_per_s = len(times) / sum(times) if times else None
    result.read_bytes = read1 - read0 if read0 is not None else None
    result.major_faults = faults1 - faults0
    return result


# ---- running a peer in its own process ---------------------------------------------------------------------------


def measure_peer(peer: str, checkpoint: Path, budget: int, prompt: list[int], tokens: int,
                 timeout_s: float = 600) -> PeerResult:
    """Run `peer` in a subprocess and return what it measured, or a skipped result with the reason."""
    with tempfile.TemporaryDirectory(prefix="flashbench-peer-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "flashbench.harness.peers", peer, str(checkpoint), "--budget", str(budget),
               "--prompt", ",".join(map(str, prompt)), "--tokens", str(tokens), "--out", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return PeerResult(peer, "skipped", reason=f"did not finish within {timeout_s:.0f} s",
                              dram_budget_bytes=budget)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return PeerResult(peer, "skipped", reason=f"failed (exit {proc.returncode}): {' | '.join(tail)}",
                              dram_budget_bytes=budget)
        return PeerResult(**json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashbench.harness.peers")
    p.add_argument("peer", choices=PEERS)
    p.add_argument("checkpoint")
    p.add_argument("--budget", type=int, required=True, help="DRAM budget for the weights, bytes")
    p.add_argument("--prompt", required=True, help="token ids, comma-separated")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    run = run_mmap if args.peer == "mmap" else run_accelerate
    result = run(Path(args.checkpoint), args.budget, [int(t) for t in args.prompt.split(",")], args.tokens)
    Path(args.out).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
