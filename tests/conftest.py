"""Shared fixtures: small random HF checkpoints of both architectures, written to a real directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashbench.reference import ModelConfig, Transformer
from flashbench.reference.checkpoint import save_checkpoint
from flashbench.suite.models import byte_tokenizer
from flashbench.suite.models.byte_tokenizer import BOS, EOS, PAD, VOCAB_SIZE
from tests.families import FAMILIES, write_family_checkpoint


def tiny_config(arch: str, **overrides) -> ModelConfig:
    fields = dict(
        arch=arch, vocab_size=VOCAB_SIZE, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ffn=256,
        max_positions=256, norm_eps=1e-5, tie_embeddings=(arch == "opt"),
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return ModelConfig(**(fields | overrides))


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session", params=["opt", "llama"])
def tiny_checkpoint(request, tmp_path_factory):
    """A random two-layer checkpoint of each architecture, saved in HF format (fp32)."""
    arch = request.param
    overrides = {"n_kv_heads": 2} if arch == "llama" else {}
    model = random_model(tiny_config(arch, **overrides))
    path = tmp_path_factory.mktemp(f"tiny-{arch}") / "ckpt"
    save_checkpoint(path, model.config, model.state_dict(), tokenizer=byte_tokenizer.write)
    return path


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    """A random checkpoint of each supported family, saved by transformers, with a BPE tokenizer of its own."""
    return write_family_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.fixture(scope="session")
def silu_checkpoint(tmp_path_factory):
    """A Llama checkpoint with the ordinary SiLU-gated FFN (dense activations)."""
    return write_family_checkpoint("llama-silu", tmp_path_factory.mktemp("llama-silu") / "ckpt")


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory):
    """`cache_home(folder)`: an XDG_CACHE_HOME in a test's folder, with a SUT cache (converted layouts) of its own and
    the session's one probe cache, so the small scenarios' fio curve is measured once and not by every run that
    tests something else (test_probe tests the cache itself)."""
    probes = tmp_path_factory.mktemp("probe-cache")

    def make(folder: Path) -> str:
        home = folder / "cache"
        (home / "flashbench").mkdir(parents=True, exist_ok=True)
        if not (home / "flashbench" / "probe").exists():
            (home / "flashbench" / "probe").symlink_to(probes, target_is_directory=True)
        return str(home)

    return make
