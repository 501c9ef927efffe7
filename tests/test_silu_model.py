"""The embedded SiLU model (shakespeare-llama-silu): shipped with its card, thresholded to its targets, and judged
by the verdicts: a modest threshold keeps its output, one far too high is caught."""

import json

import pytest
import torch

from flashbench import suite
from flashbench.harness.agreement import logit_bound
from flashbench.harness.cli import main
from flashbench.reference import Transformer
from flashbench.suite.models.card import measure

PATH = suite.model_path(suite.SILU_MODEL)


@pytest.fixture(scope="module")
def card():
    return json.loads((PATH / "card.json").read_text())


def test_it_is_a_silu_gated_llama_trained_without_a_sparsity_objective(card):
    config = Transformer.from_checkpoint(PATH).config
    assert (config.arch, config.activation, config.gated) == ("llama", "silu", True)
    run = json.loads((PATH / "training.json").read_text())
    relu = json.loads((suite.model_path("shakespeare-llama-relu") / "training.json").read_text())
    assert run["config"]["l1"] == 0 and run["config"]["activation"] == "silu"
    same = ("d_model", "n_layers", "n_heads", "d_ffn", "context", "batch", "lr", "min_lr", "warmup_steps",
            "weight_decay", "seed", "save_dtype")
    assert {k: run["config"][k] for k in same} == {k: relu["config"][k] for k in same}, "the ReLU models' recipe"


def test_card_figures_are_what_the_model_measures(card):
    measured = measure(PATH, targets=(0.5,))  # one target of the card's: each is a pass over the held-out text
    # On another CPU a mean log-loss may move by 2 eps (harness/agreement.py; these logits stay below 32); a
    # sparsity moves only where an activation rounds to the other side of its threshold (one: 1.6e-7 of a layer).
    eps = logit_bound(torch.float32, 32.0)
    assert measured["heldout_loss"] == pytest.approx(card["measured"]["heldout_loss"], abs=2 * eps)
    shipped_at = {t["target_sparsity"]: t for t in card["measured"]["thresholded"]}
    for got in measured["thresholded"]:
        shipped = shipped_at[got["target_sparsity"]]
        assert got["sparsity"] == pytest.approx(shipped["sparsity"], abs=1e-5)
        assert got["heldout_loss"] == pytest.approx(shipped["heldout_loss"], abs=1e-3)


def test_its_thresholds_reach_their_targets_within_five_points_on_held_out_text(card):
    for t in card["measured"]["thresholded"]:
        assert all(abs(s - t["target_sparsity"]) <= 0.05 for s in t["sparsity"]), t


def test_card_readme_shows_each_layers_sparsity_at_each_target(card):
    readme = (PATH / "README.md").read_text()
    for t in card["measured"]["thresholded"]:
        assert f"{t['sparsity'][0]:.1%} (t = {t['thresholds'][0]:.4f})" in readme


def test_a_modest_threshold_passes_and_one_far_too_high_is_caught(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["threshold-sweep", "--targets", "0.3,0.99", "--tokens", "128", "--threads", "2",
                 "--work", str(tmp_path), "--json", str(out)]) == 0
    naive, modest, high = json.loads(out.read_text())["points"]
    assert naive["target_sparsity"] is None and naive["passed"] and naive["measured_sparsity"] == 0
    assert modest["passed"], modest
    assert not high["passed"] and high["mean_kl"] > 0.05, high
    assert high["bytes_per_token"] < modest["bytes_per_token"] < naive["bytes_per_token"]
    assert "FAIL" in capsys.readouterr().out
