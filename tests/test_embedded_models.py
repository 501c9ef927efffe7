"""The embedded default models: shipped, loadable, genuinely sparse, and their cards tell the truth."""

import json

import pytest
import torch

from flashbench import suite
from flashbench.harness.agreement import logit_bound
from flashbench.reference import Transformer
from flashbench.suite.models.card import measure


@pytest.fixture(scope="module", params=suite.RELU_MODELS)
def embedded(request):
    path = suite.model_path(request.param)
    return path, json.loads((path / "card.json").read_text())


def test_both_architectures_are_embedded():
    archs = {Transformer.from_checkpoint(suite.model_path(n)).config.arch for n in suite.RELU_MODELS}
    assert archs == {"opt", "llama"}


def test_card_figures_are_what_the_model_measures_on_heldout_text(embedded):
    path, card = embedded
    measured = measure(path)
    # Measured on another CPU, a mean log-loss may move by 2 eps (harness/agreement.py; these models' logits stay
    # below 32), and a neuron whose pre-activation rounds to either side of zero may flip (one flip: 1.5e-8).
    assert measured["active_fraction"] == pytest.approx(card["measured"]["active_fraction"], abs=1e-6)
    assert measured["heldout_loss"] == pytest.approx(card["measured"]["heldout_loss"],
                                                     abs=2 * logit_bound(torch.float32, 32.0))


def test_at_least_half_the_layers_are_at_most_ten_percent_active(embedded):
    _, card = embedded
    active = card["measured"]["active_fraction"]
    assert sum(a <= 0.10 for a in active) * 2 >= len(active), active


def test_sparsity_costs_at_most_a_tenth_of_a_nat_per_byte(embedded):
    path, card = embedded
    run = json.loads((path / "training.json").read_text())
    base = json.loads((path / "baseline.json").read_text())
    assert run["config"]["l1"] > 0 and base["config"]["l1"] == 0
    assert {k: v for k, v in run["config"].items() if k not in ("l1", "out")} == {
        k: v for k, v in base["config"].items() if k not in ("l1", "out")
    }, "the baseline must be the same recipe without the sparsity objective"
    assert run["best"]["val_loss"] - base["best"]["val_loss"] <= 0.1


def test_card_readme_shows_the_per_layer_table(embedded):
    path, card = embedded
    readme = (path / "README.md").read_text()
    for layer, a in enumerate(card["measured"]["active_fraction"]):
        assert f"| {layer} | {a:.2%} |" in readme


def test_bundled_fp16_record_is_at_least_one_kib(embedded):
    _, card = embedded
    c = card["config"]
    vectors = 3 if c["arch"] == "llama" else 2
    assert vectors * c["d_model"] * 2 >= 1024
