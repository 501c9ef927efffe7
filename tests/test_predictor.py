"""The low-rank predictor: trained from the model's activations, saved and loaded, judged on held-out text."""

import json

import numpy as np
import pytest
import torch

from flashbench import suite
from flashbench.harness.agreement import agreement, teacher_forced
from flashbench.harness.cli import main
from flashbench.reference import Engine, Transformer
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import convert
from flashbench.reference.predictor import LowRankPredictor, Predictor, collect, evaluate, train_predictor
from flashbench.suite.models.byte_tokenizer import BOS, encode

HELDOUT = encode(suite.heldout_text(), bos=False)


def exact_predictor(model: Transformer) -> Predictor:
    """Rank d_model, identity then the up projection itself: it predicts the active set exactly."""
    c = model.config
    module = LowRankPredictor(c.n_layers, c.d_model, c.d_ffn, rank=c.d_model)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            module.down[i].weight.copy_(torch.eye(c.d_model))
            module.up[i].weight.copy_(block.ffn.up.weight)
            module.up[i].bias.copy_(block.ffn.up.bias)
    return Predictor(module, threshold=0.5)


def test_a_predictor_that_computes_the_preactivation_has_perfect_recall_and_precision(tmp_path):
    from tests.conftest import random_model, tiny_config

    model = random_model(tiny_config("opt"))
    (x, active), *_ = collect(model, HELDOUT[:300], model.config.max_positions, BOS)
    m = evaluate(exact_predictor(model), 0, x, active)
    assert m.recall == pytest.approx(1.0) and m.precision == pytest.approx(1.0) and m.predicted_per_active == 1.0


def test_saved_predictor_loads_back_with_the_same_sets(tmp_path, tiny_checkpoint):
    model = Transformer.from_checkpoint(tiny_checkpoint)
    predictor = train_predictor(model, HELDOUT[:2000], HELDOUT[2000:2500], BOS, rank=8, epochs=1, progress=None)
    predictor.save(tmp_path / "p")
    loaded = Predictor.load(tmp_path / "p")
    x = torch.randn(5, model.config.d_model)
    for layer in range(model.config.n_layers):
        assert [a.tolist() for a in loaded.sets(layer, x)] == [a.tolist() for a in predictor.sets(layer, x)]
    assert loaded.metrics["heldout_layers"] == predictor.metrics["heldout_layers"]


def test_a_missing_predictor_is_reported_with_its_path(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'}: cannot load predictor"):
        Predictor.load(tmp_path / "nope")


def test_predictor_train_command_writes_the_predictor_and_its_metrics(tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "train.txt"
    text.write_text(suite.heldout_text()[:3000])
    args = ["predictor", "train", str(tiny_checkpoint), "--out", str(tmp_path / "p"), "--train-text", str(text),
            "--rank", "4", "--epochs", "1"]
    assert main(args) == 0
    assert "precision" in capsys.readouterr().out
    meta = json.loads((tmp_path / "p.json").read_text())
    assert meta["rank"] == 4 and len(meta["metrics"]["heldout_layers"]) == 2


@pytest.mark.parametrize("name", suite.RELU_MODELS)
def test_shipped_predictors_recall_at_least_nine_in_ten_active_neurons(name):
    model = Transformer.from_checkpoint(suite.model_path(name))
    predictor = Predictor.load(suite.model_path(name) / "predictor")
    for layer, (x, active) in enumerate(collect(model, HELDOUT[:8000], model.config.max_positions, BOS)):
        m = evaluate(predictor, layer, x, active)
        assert m.recall >= 0.9 and m.predicted_per_active >= 1.0, (layer, m)


@pytest.mark.parametrize("name", suite.RELU_MODELS)
def test_predictor_driven_flash_engine_agrees_with_dense(name, tmp_path):
    path = suite.model_path(name)
    tokens = encode(suite.heldout_text())[:129]
    dense = teacher_forced(Engine(Transformer.from_checkpoint(path)), tokens)
    flash = convert(path, tmp_path / "flash", "bundled", "float16")
    engine = FlashEngine(flash, Techniques(source="predictor", window=4, threads=4),
                         source=Predictor.load(path / "predictor"))
    a = agreement(dense, teacher_forced(engine, tokens), tokens[1:])
    engine.close()
    assert a.top1_agreement >= 0.95 and a.perplexity_ratio < 1.05, a
    loaded = np.mean([s.io.records for s in engine.history[1:]])
    assert 0 < loaded < 0.05 * flash.config.n_layers * flash.geometry.d_ffn


def test_window_sweep_reports_each_window_beside_dense(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    args = ["window-sweep", "shakespeare-opt", "--max-window", "1", "--tokens", "24", "--threads", "2",
            "--work", str(tmp_path), "--json", str(out)]
    assert main(args) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["window"] for p in points] == [0, 1]
    for p in points:
        assert 0 < p["ffn_fraction_requested"] <= p["ffn_fraction_read"] <= 1 and p["direct"]
        assert p["dense_perplexity"] > 1 and 0 <= p["top1_agreement"] <= 1
    assert points[1]["neurons_per_token"] < points[0]["neurons_per_token"]  # the window reuses neurons
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]  # the flash directory is cleaned up
