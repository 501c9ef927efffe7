"""Peers measured in the same run: what people run today when a model does not fit in DRAM.

Each peer decodes greedily from the same prompt, inside a memory cgroup capped at the DRAM budget (so the page cache
cannot keep the whole model, and every token faults evicted weights back in from storage), with the page cache
dropped first, timed per token with the same clock (`time.perf_counter` around each decode step):

- `llama.cpp`: llama.cpp itself (`llama-cpp-python`) on the checkpoint converted to GGUF at the storage precision
  (`llama_cpp_peer`), weights memory-mapped, on torch's threads (the other peers' and our engine's);
- `mmap`: ours, an emulation of llama.cpp's approach: our dense engine over the checkpoint's weights memory-mapped
  as stored;
- `accelerate`: Hugging Face transformers with accelerate's disk offload (`offload_folder`, `max_memory` at the
  budget);
- `airllm`: AirLLM, which streams one layer at a time from a per-layer copy of the checkpoint it writes.

Each peer runs in a subprocess of its own (`python -m flashbench.harness.peers`), so its memory is its own, and a
peer that cannot run (not installed, an architecture it lacks, a crash, a timeout) is a "not-run" record with the
reason, never a failed run. Nothing is downloaded: the subprocess runs with the Hugging Face hub offline.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from . import llama_cpp_peer

# name -> what it is (the report's words); the order is the report's
PEERS = {
    "llama.cpp": "llama.cpp (llama-cpp-python) on a GGUF of the checkpoint, weights memory-mapped",
    "mmap": "ours: our dense engine over the memory-mapped weights, an emulation of llama.cpp's approach",
    "accelerate": "transformers with accelerate's disk offload",
    "airllm": "AirLLM: one layer at a time from its per-layer copy of the checkpoint",
}
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


@dataclass
class PeerResult:
    peer: str
    status: str  # "measured" or "not-run"
    reason: str | None = None  # why it did not run
    tool: str | None = None  # what ran, with its version
    threads: int | None = None  # the compute threads it ran with
    model_file: str | None = None  # what it read the weights from, where not the checkpoint itself
    speed_only: str | None = None  # why its outputs are not the checkpoint's (it counts for speed only)
    dense_check: dict | None = None  # its teacher-forced logits against dense inference, where comparable
    tokens: int = 0
    token_ms: list[float] | None = None
    tokens_per_s: float | None = None
    dram_budget_bytes: int | None = None
    cgroup: str | None = None  # where and how the cap was enforced, or why it was not
    limit_bytes: int | None = None  # the cgroup's limit: anonymous memory after the warm-up + budget + slack
    peak_bytes: int | None = None  # the cgroup's peak usage (anonymous + page cache)
    read_bytes: int | None = None  # bytes the process read from storage (/proc/self/io read_bytes)
    major_faults: int | None = None


class NotRun(Exception):
    """A peer that cannot run here, and why (becomes its "not-run" record)."""


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


def _io_counters() -> tuple[int | None, int]:
    import resource

    read = None
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                read = int(line.split()[1])
    except OSError:
        pass
    return read, resource.getrusage(resource.RUSAGE_SELF).ru_majflt


class Meter:
    """One peer's measurement inside its cgroup: `start` after a warm-up pass (caps the group, starts the /proc
    counters), `stop` with the decode steps' seconds (fills the result)."""

    def __init__(self, group: Path, result: PeerResult):
        self.group, self.result = group, result
        self.read0, self.faults0 = None, 0

    def start(self, note: str = "") -> None:
        limit = self.result.limit_bytes = cap(self.group, self.result.dram_budget_bytes)
        self.result.cgroup = (f"{self.group}: limit {limit:,} bytes = anonymous memory + budget + "
                              f"{SLACK_BYTES >> 20} MiB slack for temporaries{note}")
        self.read0, self.faults0 = _io_counters()

    def stop(self, seconds: list[float]) -> None:
        read, faults = _io_counters()
        r = self.result
        r.peak_bytes = int((self.group / "memory.max_usage_in_bytes").read_text())
        r.read_bytes = read - self.read0 if read is not None and self.read0 is not None else None
        r.major_faults = faults - self.faults0
        r.tokens, r.token_ms = len(seconds), [t * 1e3 for t in seconds]
        r.tokens_per_s = len(seconds) / sum(seconds) if seconds else None


@contextmanager
def capped(result: PeerResult) -> Iterator[Meter]:
    """A fresh memory cgroup for this process, with the page cache dropped: cached pages stay charged to whoever
    read them first (the run that wrote the checkpoint), out of the cap's reach, so they are dropped and the peer
    faults every weight in and pays for it. Left and removed afterwards."""
    remove_stale_groups()
    group, where = enter_cgroup(f"flashbench-{result.peer.replace('.', '')}-{os.getpid()}")
    if group is None:
        raise NotRun(where)
    result.cgroup = where
    try:
        drop_page_cache()
        yield Meter(group, result)
    finally:
        leave_and_remove(group)


def greedy_steps(step, first, tokens: int) -> list[float]:
    """The seconds of each of `tokens - 1` greedy decode steps; `step(token)` returns the next token."""
    seconds, token = [], first
    for _ in range(tokens - 1):
        t0 = time.perf_counter()
        token = step(token)
        seconds.append(time.perf_counter() - t0)
    return seconds


# ---- the peers, each run in its own process ------------------------------------------------------------------


@dataclass(frozen=True)
class PeerInput:
    """What a peer is given: the checkpoint (or the file made from it that it runs on), the DRAM budget, the prompt,
    how many tokens to decode, the storage precision, and (llama.cpp, on a comparable checkpoint) dense inference's
    teacher-forced tokens and logits to check its own against."""

    checkpoint: Path
    budget: int
    prompt: list[int]
    tokens: int
    dtype: str = "float16"
    model_file: Path | None = None
    reference: Path | None = None  # a .pt of {"tokens", "logits", "tie_margin", "dtype"}


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


def run_mmap(given: PeerInput) -> PeerResult:
    import torch

    from flashbench.reference import Engine, ModelConfig, Transformer

    result = PeerResult("mmap", "measured", tool=f"flashbench dense engine, torch {torch.__version__}",
                        threads=torch.get_num_threads(), dram_budget_bytes=given.budget)
    with capped(result) as meter:
        config = ModelConfig.load(given.checkpoint)
        state = mmap_state(given.checkpoint, config)
        dtype = next(iter(state.values())).dtype
        model = Transformer.for_assignment(config)
        model.load_state_dict(state, strict=True, assign=True)  # the mapped weights
        if config.arch != "opt":
            model.rope_cos, model.rope_sin = model.rope_cos.to(dtype), model.rope_sin.to(dtype)
        engine = Engine(model.eval(), max_len=len(given.prompt) + given.tokens + 1)
        first = int(engine.prefill(given.prompt)[-1].argmax())  # a warm-up pass: every allocation made once
        meter.start()
        meter.stop(greedy_steps(lambda t: int(engine.step(t).argmax()), first, given.tokens))
    return result


def run_accelerate(given: PeerInput) -> PeerResult:
    try:
        import accelerate
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise NotRun(f"transformers/accelerate not installed ({e})") from e
    result = PeerResult("accelerate", "measured", tool=f"accelerate {accelerate.__version__}",
                        threads=torch.get_num_threads(), dram_budget_bytes=given.budget)
    with capped(result) as meter, tempfile.TemporaryDirectory(prefix="flashbench-offload-") as offload:
        model = AutoModelForCausalLM.from_pretrained(
            given.checkpoint, device_map="auto", max_memory={"cpu": given.budget}, offload_folder=offload,
            dtype=getattr(torch, given.dtype), local_files_only=True)
        # The same rule as the others. Where accelerate holds its in-DRAM weights as anonymous memory they are
        # counted twice (in the anonymous memory and the budget): generous to the peer, never to us.
        _hf_decode(model, given, meter, " (weights accelerate keeps as tensors may count twice: in its favour)")
    return result


def _hf_decode(model, given: PeerInput, meter: Meter, note: str = "") -> None:
    """Greedy decoding through a transformers-style forward with a KV cache (accelerate, AirLLM): the prefill as
    the warm-up pass, then the cap and the decode steps, each timed."""
    import torch

    torch.set_grad_enabled(False)
    out = model(torch.tensor([given.prompt]), use_cache=True)
    meter.start(note)
    cache = out.past_key_values

    def step(token: int) -> int:
        nonlocal cache
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        return int(out.logits[0, -1].argmax())

    meter.stop(greedy_steps(step, int(out.logits[0, -1].argmax()), given.tokens))


def run_llama_cpp(given: PeerInput) -> PeerResult:
    try:
        tool = llama_cpp_peer.version()
    except ImportError as e:
        raise NotRun(f"llama-cpp-python is not installed ({e}): `make peers` builds it (about 2.5 min)") from e
    from flashbench.reference.config import ModelConfig

    result = PeerResult("llama.cpp", "measured", tool=tool, threads=llama_cpp_peer.threads(),
                        model_file=str(given.model_file), dram_budget_bytes=given.budget,
                        speed_only=llama_cpp_peer.speed_only(ModelConfig.load(given.checkpoint)))
    with capped(result) as meter:
        llm = llama_cpp_peer.load(given.model_file, n_ctx=len(given.prompt) + given.tokens)
        first = llama_cpp_peer.next_token(llm, given.prompt)  # the prefill, as the warm-up pass
        meter.start()
        meter.stop(greedy_steps(lambda t: llama_cpp_peer.next_token(llm, [t]), first, given.tokens))
    if given.reference is not None and result.speed_only is None:
        result.dense_check = dense_check(given.model_file, given.reference)
    return result


def dense_check(gguf: Path, reference: Path) -> dict:
    """llama.cpp's teacher-forced logits against dense inference's on the same tokens: a second independent check
    of the dense path (transformers is the first), at the GGUF's precision."""
    import torch

    from .agreement import agreement

    ref = torch.load(reference)
    theirs = llama_cpp_peer.score(gguf, ref["tokens"])
    a = agreement(ref["logits"], theirs, ref["tokens"][1:], ref["tie_margin"])
    return asdict(a) | {"perplexity_ratio": a.perplexity_ratio, "kv_cache": "float32",
                        "reference_dtype": ref["dtype"]}


def run_airllm(given: PeerInput) -> PeerResult:
    try:
        from importlib.metadata import version

        import torch
        from airllm import AutoModel
    except ImportError as e:
        raise NotRun(f"airllm is not installed ({e}): `make peers` installs it") from e
    result = PeerResult("airllm", "measured", tool=f"airllm {version('airllm')}", threads=torch.get_num_threads(),
                        model_file=str(given.model_file), dram_budget_bytes=given.budget)
    with capped(result) as meter:
        try:
            model = AutoModel.from_pretrained(str(given.checkpoint), device="cpu", dtype=getattr(torch, given.dtype),
                                              layer_shards_saving_path=str(given.model_file), prefetching=False)
        except (RuntimeError, ValueError, KeyError) as e:  # an architecture it does not know
            raise NotRun(f"AirLLM cannot load it: {str(e).splitlines()[0][:300]}") from e
        _hf_decode(model, given, meter)
    return result


RUNNERS = {"llama.cpp": run_llama_cpp, "mmap": run_mmap, "accelerate": run_accelerate, "airllm": run_airllm}


# ---- running a peer from the harness -----------------------------------------------------------------------------


def measure_peer(peer: str, checkpoint: Path, budget: int, prompt: list[int], tokens: int, *, work: Path,
                 origin: str, dtype: str = "float16", reference=None, timeout_s: float = 600,
                 progress=None) -> PeerResult:
    """Prepare what `peer` runs on (llama.cpp: a GGUF under `work`, converted once per `origin`, the checkpoint's
    hash; AirLLM: its per-layer copy there), run it in a subprocess, and return what it measured, or a not-run
    result with the reason. `reference` (a DenseReference) lets llama.cpp check its logits on a comparable model."""
    import torch

    model_file = None
    with tempfile.TemporaryDirectory(prefix="flashbench-peer-") as tmp:
        ref_file = None
        if peer == "llama.cpp":
            try:
                model_file = llama_cpp_peer.gguf_for(checkpoint, origin, work, dtype, progress)
            except ImportError as e:
                return PeerResult(peer, "not-run", reason=f"gguf is not installed ({e}): `make peers` installs it",
                                  dram_budget_bytes=budget)
            except llama_cpp_peer.NotRunnable as e:
                return PeerResult(peer, "not-run", reason=str(e), dram_budget_bytes=budget)
            if reference is not None:
                ref_file = Path(tmp) / "reference.pt"
                torch.save({"tokens": reference.tokens, "logits": reference.logits, "tie_margin": reference.tie_margin,
                            "dtype": str(reference.dtype).removeprefix("torch.")}, ref_file)
        elif peer == "airllm":
            model_file = work / f"airllm-{origin[:16]}"
        given = PeerInput(checkpoint, budget, prompt, tokens, dtype, model_file, ref_file)
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "flashbench.harness.peers", peer, "--input",
               json.dumps(asdict(given), default=str), "--out", str(out)]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # never a download
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return PeerResult(peer, "not-run", reason=f"did not finish within {timeout_s:.0f} s",
                              dram_budget_bytes=budget)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return PeerResult(peer, "not-run", reason=f"failed (exit {proc.returncode}): {' | '.join(tail)[:500]}",
                              dram_budget_bytes=budget)
        return PeerResult(**json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashbench.harness.peers")
    p.add_argument("peer", choices=list(PEERS))
    p.add_argument("--input", required=True, help="a PeerInput as JSON")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    fields = json.loads(args.input)
    for key in ("checkpoint", "model_file", "reference"):
        fields[key] = Path(fields[key]) if fields[key] is not None else None
    given = PeerInput(**fields)
    try:
        result = RUNNERS[args.peer](given)
    except NotRun as e:
        result = PeerResult(args.peer, "not-run", reason=str(e), dram_budget_bytes=given.budget)
    Path(args.out).write_text(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
