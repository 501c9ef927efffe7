"""The peers, each in its own process under a memory cgroup: llama.cpp on a GGUF of the checkpoint, our mmap
emulation, accelerate's disk offload and AirLLM; a peer that cannot run is a not-run record with the reason."""

import importlib.util
import os

import pytest
import torch

from flashbench import suite
from flashbench.harness import llama_cpp_peer, peers
from flashbench.harness.agreement import logit_bound, logit_scale, teacher_forced
from flashbench.reference import Engine, ModelConfig, Transformer
from flashbench.reference.layout import checkpoint_hash
from flashbench.reference.tokenizer import Tokenizer
from flashbench.reference.checkpoint import save_checkpoint
from flashbench.suite.models import byte_tokenizer
from tests.conftest import random_model, tiny_config
from tests.exactness import note
from tests.families import write_family_checkpoint

can_cap = pytest.mark.skipif(not (peers.CGROUP_ROOT.is_dir() and os.geteuid() == 0),
                             reason="needs root and the cgroup v1 memory controller")
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
    reason="llama-cpp-python and gguf are not installed: `make peers` builds them (about 2.5 min)")
PROMPT = [257, 72, 101, 108]


def measure(peer, checkpoint, work, **kw):
    kw = {"budget": 100_000, "prompt": PROMPT, "tokens": 4, "timeout_s": 180} | kw
    return peers.measure_peer(peer, checkpoint, work=work, origin=checkpoint_hash(checkpoint), **kw)


@can_cap
def test_mmap_peer_decodes_under_a_memory_cap(tiny_checkpoint, tmp_path):
    r = measure("mmap", tiny_checkpoint, tmp_path)
    assert r.status == "measured", r.reason
    assert r.tokens == 3 and len(r.token_ms) == 3 and r.tokens_per_s > 0
    assert "limit" in r.cgroup and r.peak_bytes > 0 and r.threads >= 1


@can_cap
def test_accelerate_peer_decodes_with_disk_offload(tiny_checkpoint, tmp_path):
    pytest.importorskip("accelerate")
    r = measure("accelerate", tiny_checkpoint, tmp_path)
    assert r.status == "measured", r.reason
    assert r.tokens == 3 and r.tokens_per_s > 0 and r.tool.startswith("accelerate ")


def test_a_peer_that_fails_is_not_run_with_its_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = peers.measure_peer("mmap", tmp_path, 1, PROMPT, 2, work=tmp_path, origin="x", timeout_s=60)
    assert r.status == "not-run" and "failed" in r.reason and "config.json" in r.reason


def test_without_the_memory_controller_the_cap_is_refused_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "CGROUP_ROOT", tmp_path / "nothing")
    group, why = peers.enter_cgroup("x")
    assert group is None and "no cgroup v1 memory controller" in why


# ---- llama.cpp -----------------------------------------------------------------------------------------------


def test_llama_cpp_cannot_run_an_opt_checkpoint_and_says_why(tmp_path):
    r = measure("llama.cpp", suite.model_path("shakespeare-opt"), tmp_path)
    assert r.status == "not-run" and "model_type 'opt'" in r.reason
    assert not list(tmp_path.iterdir())  # nothing half-converted left behind


def test_a_missing_llama_cpp_is_a_not_run_record_with_the_reason(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "llama_cpp.py").write_text("raise ImportError(\"No module named 'llama_cpp'\")\n")
    monkeypatch.setenv("PYTHONPATH", f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = measure("llama.cpp", suite.model_path("shakespeare-llama-relu"), tmp_path / "work")
    assert r.status == "not-run" and "llama-cpp-python is not installed" in r.reason and "make peers" in r.reason


@needs_llama_cpp
@can_cap
def test_llama_cpp_decodes_the_embedded_llama_for_speed_only(tmp_path):
    """llama.cpp applies SiLU to every Llama: on a ReLU one its tokens/s count, its outputs do not."""
    r = measure("llama.cpp", suite.model_path("shakespeare-llama-relu"), tmp_path, tokens=8)
    assert r.status == "measured", r.reason
    assert r.tokens == 7 and r.tokens_per_s > 0 and r.tool.startswith("llama-cpp-python ")
    assert r.threads == torch.get_num_threads() and "limit" in r.cgroup
    assert "SiLU" in r.speed_only and r.dense_check is None
    assert r.model_file.endswith("llama.cpp-float16.gguf")


@needs_llama_cpp
def test_the_gguf_is_converted_once_per_checkpoint(tmp_path):
    checkpoint = suite.model_path("shakespeare-llama-relu")
    first = llama_cpp_peer.gguf_for(checkpoint, "hash-a", tmp_path, "float16")
    made = first.stat().st_mtime_ns
    assert llama_cpp_peer.gguf_for(checkpoint, "hash-a", tmp_path, "float16").stat().st_mtime_ns == made
    again = llama_cpp_peer.gguf_for(checkpoint, "hash-b", tmp_path, "float16")  # another checkpoint's hash
    assert again == first and again.stat().st_mtime_ns != made
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp file left


@needs_llama_cpp
@pytest.mark.exactness
@pytest.mark.parametrize("family", ["llama-silu", "mistral", "qwen2"])
def test_llama_cpp_logits_match_dense_inference_on_silu_checkpoints(family, tmp_path):
    """The second independent check of the dense path: llama.cpp's own kernels on a float32 GGUF (q and k rows
    permuted for its RoPE where the family needs it) agree with our engine within the exact float32 bound."""
    checkpoint = write_family_checkpoint(family, tmp_path / "ckpt")
    config = ModelConfig.load(checkpoint)
    tokens = Tokenizer.load(checkpoint, config).encode(suite.heldout_text())[:128]
    gguf = llama_cpp_peer.gguf_for(checkpoint, checkpoint_hash(checkpoint), tmp_path, "float32")
    theirs = llama_cpp_peer.score(gguf, tokens)
    ours = teacher_forced(Engine(Transformer.from_checkpoint(checkpoint)), tokens)
    bound = logit_bound(torch.float32, logit_scale(ours))
    diff = float((ours - theirs).abs().max())
    note(diff, bound, torch.float32)
    assert diff <= bound, (family, diff, bound)


# ---- AirLLM ------------------------------------------------------------------------------------------------------


@can_cap
def test_airllm_streams_a_llama_layer_by_layer(tmp_path):
    pytest.importorskip("airllm", reason="airllm is not installed: `make peers` installs it")
    model = random_model(tiny_config("llama", n_kv_heads=2))
    checkpoint = save_checkpoint(tmp_path / "ckpt", model.config, model.state_dict(), tokenizer=byte_tokenizer.write)
    r = measure("airllm", checkpoint, tmp_path)
    assert r.status == "measured", r.reason
    assert r.tokens == 3 and r.tokens_per_s > 0 and r.tool.startswith("airllm ")
    assert (tmp_path / r.model_file).is_dir()  # its per-layer copy of the checkpoint
