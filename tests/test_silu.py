"""A SiLU-gated checkpoint (Llama 2/3, Mistral, Qwen2 as most people hold them): dense and exact through convert
and the naive flash engine; the sparse techniques, which need exact zeros, refuse it unless it is thresholded."""

import pytest
import torch

from flashbench import suite
from flashbench.harness.agreement import teacher_forced
from flashbench.harness.cli import main
from flashbench.reference import Engine, ModelConfig, Transformer
from flashbench.reference.errors import CheckpointError
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import FlashLayout, convert
from flashbench.reference.tokenizer import Tokenizer
from tests.exactness import within_exact_bound


def test_convert_writes_a_flash_layout_of_a_silu_checkpoint(silu_checkpoint, tmp_path, capsys):
    assert main(["convert", str(silu_checkpoint), str(tmp_path / "flash"), "--layout", "bundled"]) == 0
    layout = FlashLayout.open(tmp_path / "flash")
    assert layout.config.activation == "silu" and layout.geometry.vectors == ("gate", "up", "down")


@pytest.mark.exactness
def test_the_naive_flash_engine_reproduces_dense_inference_of_a_silu_model(silu_checkpoint, tmp_path):
    config = ModelConfig.load(silu_checkpoint)
    tokens = Tokenizer.load(silu_checkpoint, config).encode(suite.heldout_text())[:48]
    dense = teacher_forced(Engine(Transformer.from_checkpoint(silu_checkpoint)), tokens, prompt=16)
    flash = convert(silu_checkpoint, tmp_path / "flash", "unbundled", "float32")
    with FlashEngine(flash, Techniques.naive(threads=2)) as engine:
        assert within_exact_bound(teacher_forced(engine, tokens, prompt=16), dense, torch.float32)


@pytest.mark.parametrize("techniques", [Techniques(source="oracle"), Techniques(source="all", hybrid=0.25)])
def test_sparse_reads_refuse_a_silu_model_saying_why(silu_checkpoint, tmp_path, techniques):
    flash = convert(silu_checkpoint, tmp_path / "flash", "bundled", "float32")
    with pytest.raises(CheckpointError, match="activation 'silu' is dense .* needs a ReLU FFN; naive reads"):
        FlashEngine(flash, techniques, neuron_counts=torch.ones(2, 192, dtype=torch.int64).numpy())


@pytest.mark.parametrize("command", [["predictor", "train", "--tokens", "512", "--epochs", "1"],
                                     ["model", "counts", "--tokens", "512"]])
def test_what_counts_exact_zeros_thresholds_a_silu_checkpoint_first(silu_checkpoint, command, tmp_path, capsys):
    out = tmp_path / ("p" if command[0] == "predictor" else "counts.safetensors")
    assert main([*command, str(silu_checkpoint), "--out", str(out), "--target-sparsity", "0.6"]) == 0
    assert "SiLU FFN thresholded at a target sparsity of 60%" in capsys.readouterr().out


def test_a_target_sparsity_outside_0_to_1_is_refused_with_exit_2(silu_checkpoint, tmp_path, capsys):
    assert main(["model", "counts", str(silu_checkpoint), "--out", str(tmp_path / "c"), "--target-sparsity", "1"]) == 2
    assert "--target-sparsity" in capsys.readouterr().err


def test_generate_and_check_dense_run_on_a_silu_checkpoint(silu_checkpoint, capsys):
    pytest.importorskip("transformers")
    assert main(["generate", str(silu_checkpoint), "--prompt", "Shall I compare thee", "--tokens", "4"]) == 0
    assert main(["check-dense", str(silu_checkpoint), "--prefill", "16", "--steps", "4"]) == 0
    assert "PASS" in capsys.readouterr().out
