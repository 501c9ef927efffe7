"""A checkpoint bigger than the memory its process may hold goes through `convert` and the flash engine: neither ever
holds all its weights (a memory cgroup caps the process below the checkpoint's size; the kernel kills it otherwise)."""

import subprocess
import sys

import pytest

from flashbench.harness.sut import MemoryCap
from flashbench.reference import ModelConfig
from flashbench.suite.synthetic import weight_bytes, write_random_checkpoint

# 16 layers of 3,072 neurons at width 768 (GQA, 2 KV heads), float16: 273 MiB of checkpoint, 216 MiB of it FFN.
# Shaped as real models are, with many layers, so that one layer's working set is a small part of the whole.
CONFIG = ModelConfig(arch="llama", vocab_size=4096, d_model=768, n_layers=16, n_heads=8, n_kv_heads=2, d_ffn=3072,
                     max_positions=256, activation="relu", tie_embeddings=False, bos_token_id=1, eos_token_id=2)
CHILD = """
import sys
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import convert
print("ready", flush=True)
sys.stdin.readline()  # the parent caps this process's memory now
layout = convert(sys.argv[1], sys.argv[2], "bundled", "float16")
with FlashEngine(layout, Techniques.naive(threads=2, compute_dtype="float16")) as engine:
    logits = engine.prefill([1, 5, 9])
    for t in (17, 33):
        logits = engine.step(t)
print("finished", int(logits.argmax()), flush=True)
"""


def test_a_checkpoint_bigger_than_the_process_memory_limit_converts_and_runs(tmp_path):
    checkpoint = write_random_checkpoint(CONFIG, tmp_path / "big")
    size = weight_bytes(CONFIG)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(checkpoint), str(tmp_path / "flash")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = MemoryCap(proc.pid)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        if memory.group is None:
            proc.kill()
            pytest.skip(f"no memory cgroup to cap the process with: {memory.reason}")
        memory.cap(size // 2)  # what it holds after importing torch, plus half the checkpoint
        out, err = proc.communicate("go\n", timeout=300)
        assert proc.returncode == 0 and out.strip().startswith("finished"), (
            f"exit {proc.returncode}, {memory.oom_kills()} OOM kills under a limit of {memory.limit:,} bytes "
            f"for a {size:,}-byte checkpoint:\n{err[-2000:]}")
        assert memory.oom_kills() == 0
    finally:
        proc.kill()
        memory.remove()
