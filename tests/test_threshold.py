"""Thresholded sparsity for SiLU FFNs (CATS): calibrated thresholds, the thresholded dense model, and the flash
engine computing it from the thresholded active set."""

import pytest
import torch

from flashbench import suite
from flashbench.harness.agreement import teacher_forced
from flashbench.harness.cli import main
from flashbench.reference import Engine, ModelConfig, Transformer
from flashbench.reference.activations import activation_counts, counts_provenance
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import convert
from flashbench.reference.threshold import ThresholdedSiLU, calibrate, thresholded, unthresholded
from flashbench.reference.tokenizer import Tokenizer
from tests.exactness import within_exact_bound


@pytest.fixture(scope="module")
def silu(silu_checkpoint):
    """(checkpoint, model, held-out token ids) of the random Llama-SiLU checkpoint."""
    config = ModelConfig.load(silu_checkpoint)
    ids = Tokenizer.load(silu_checkpoint, config).encode(suite.heldout_text())
    return silu_checkpoint, Transformer.from_checkpoint(silu_checkpoint), ids


def test_thresholded_silu_zeroes_outputs_of_magnitude_at_most_the_threshold():
    x = torch.tensor([-4.0, -1.0, 0.0, 0.3, 2.0])
    y = ThresholdedSiLU(0.2)(x)
    assert torch.equal(y != 0, torch.nn.functional.silu(x).abs() > 0.2)
    assert torch.equal(y[y != 0], torch.nn.functional.silu(x)[y != 0])


@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_calibrated_thresholds_reach_the_target_sparsity_on_the_calibration_tokens(silu, target):
    _, model, ids = silu
    tokens = ids[:1024]
    model = thresholded(model, calibrate(model, tokens, [target])[target])
    try:
        counts, positions = activation_counts(model, tokens, model.config.max_positions)
    finally:
        unthresholded(model)
    sparsity = 1 - counts.sum(1) / (positions * model.config.d_ffn)
    # Calibrated on the unthresholded model (as CATS does): the first layer sees the same inputs, so its sparsity is
    # the quantile's; a later layer's inputs move with the thresholding before it, and its sparsity a little.
    assert abs(sparsity[0] - target) <= 1e-3 and all(abs(s - target) <= 0.05 for s in sparsity), sparsity


def test_higher_targets_give_higher_thresholds(silu):
    _, model, ids = silu
    t = calibrate(model, ids[:512], [0.2, 0.5, 0.8])
    assert all(a < b < c for a, b, c in zip(t[0.2], t[0.5], t[0.8]))


def test_calibration_refuses_a_relu_ffn(tiny_checkpoint):
    model = Transformer.from_checkpoint(tiny_checkpoint)
    with pytest.raises(ValueError, match="thresholding is for SiLU-gated FFNs"):
        calibrate(model, list(range(64)), [0.5])


@pytest.mark.exactness
@pytest.mark.parametrize("window", [0, 4])
def test_the_flash_engine_with_the_oracle_computes_the_thresholded_dense_model(silu, tmp_path, window):
    """Only the neurons the thresholded SiLU keeps are read, and the sums are dense's: every logit within the exact
    bound of the thresholded dense model's. On these tokens the activation nearest its threshold is 8e-5 of it
    away, two orders above float32 rounding, so no neuron can change sides on another CPU's kernels."""
    path, model, ids = silu
    thresholds = calibrate(model, ids[:2000], [0.5])[0.5]
    tokens = ids[5000:5048]
    try:
        dense = teacher_forced(Engine(thresholded(model, thresholds)), tokens, prompt=16)
    finally:
        unthresholded(model)
    flash = convert(path, tmp_path / "flash", "bundled", "float32")
    techniques = Techniques(source="oracle", window=window, threshold=0.5, threads=2)
    with FlashEngine(flash, techniques, thresholds=thresholds) as engine:
        assert within_exact_bound(teacher_forced(engine, tokens, prompt=16), dense, torch.float32)
        read = sum(s.io.records for s in engine.history[1:]) / (len(engine.history) - 1)
    assert read < 0.6 * model.config.n_layers * model.config.d_ffn  # about half active (50% target): half read


def test_a_threshold_engine_needs_one_threshold_per_layer(silu, tmp_path):
    flash = convert(silu[0], tmp_path / "flash", "bundled", "float32")
    with pytest.raises(ValueError, match="needs one calibrated threshold per layer"):
        FlashEngine(flash, Techniques(source="oracle", threshold=0.5), thresholds=[0.1])


def test_threshold_refuses_a_relu_ffn(tiny_checkpoint, tmp_path):
    flash = convert(tiny_checkpoint, tmp_path / "flash", "bundled", "float32")
    with pytest.raises(ValueError, match="thresholding is for SiLU-gated FFNs"):
        FlashEngine(flash, Techniques(source="oracle", threshold=0.5), thresholds=[0.1, 0.1])


def test_counts_of_a_thresholded_model_are_told_apart_from_the_plain_ones(silu):
    path, model, ids = silu
    plain = counts_provenance(path, model, ids[:64], None)
    try:
        made = counts_provenance(path, thresholded(model, [0.1, 0.2]), ids[:64], None)
    finally:
        unthresholded(model)
    assert "thresholds" not in plain and made["thresholds"] == "0.1,0.2"


@pytest.mark.exactness
def test_a_gate_resident_layout_reads_only_up_and_down_and_computes_the_same(silu, tmp_path):
    """The gate rows in DRAM decide the set and multiply from there: the same logits as reading them from flash,
    with two vectors per record instead of three."""
    path, model, ids = silu
    thresholds = calibrate(model, ids[:2000], [0.5])[0.5]
    tokens = ids[5000:5032]
    techniques = Techniques(source="oracle", window=4, threshold=0.5, threads=2)
    runs = {}
    for resident in (False, True):
        flash = convert(path, tmp_path / f"flash-{resident}", "bundled", "float32", gate_resident=resident)
        with FlashEngine(flash, techniques, thresholds=thresholds) as engine:
            runs[resident] = (teacher_forced(engine, tokens, prompt=8), engine.dram, flash.geometry)
    assert runs[True][2].vectors == ("up", "down") and runs[False][2].vectors == ("gate", "up", "down")
    assert within_exact_bound(runs[True][0], runs[False][0], torch.float32)
    gates = model.config.n_layers * model.config.d_ffn * model.config.d_model * 4
    assert runs[True][1].resident - runs[False][1].resident == gates  # in DRAM as resident weights
    assert runs[False][1].source == gates and runs[True][1].source == 0  # not held twice by the oracle


def test_the_threshold_sweep_refuses_a_relu_model_with_exit_2(capsys):
    assert main(["threshold-sweep", "shakespeare-opt", "--targets", "0.5"]) == 2
    assert "thresholding is for SiLU-gated FFNs" in capsys.readouterr().err


def test_the_threshold_sweep_refuses_a_target_of_one_with_exit_2(silu_checkpoint, capsys):
    assert main(["threshold-sweep", str(silu_checkpoint), "--targets", "0.5,1"]) == 2
    assert "--targets '0.5,1'" in capsys.readouterr().err
