"""Activation counts shipped with the embedded models are used only where they were made from exactly what the run
would count."""

import numpy as np
import pytest

from flashbench import suite
from flashbench.harness.cli import main
from flashbench.reference import Transformer
from flashbench.reference.activations import (COUNTS_FILE, activation_counts, counts_provenance, load_counts,
                                              save_counts)
from flashbench.suite.models.byte_tokenizer import BOS, encode
from flashbench.suite.models.corpus import train_text

COUNTING_TOKENS = 131072  # the default scenario's counts_tokens


@pytest.fixture(scope="module")
def train_tokens():
    return encode(train_text(), bos=False)


@pytest.mark.parametrize("name", suite.RELU_MODELS)
def test_the_shipped_counts_were_made_from_this_checkpoint_and_the_default_counting_tokens(name, train_tokens):
    path = suite.model_path(name)
    model = Transformer.from_checkpoint(path)
    provenance = counts_provenance(path, model, train_tokens[:COUNTING_TOKENS], BOS)
    counts = load_counts(path / COUNTS_FILE, provenance)
    assert counts is not None, f"{path / COUNTS_FILE} is stale: run `flashbench model counts {name}`"
    assert counts.shape == (model.config.n_layers, model.config.d_ffn)


def test_counts_of_other_tokens_or_another_checkpoint_are_not_used(tmp_path, train_tokens):
    opt, llama = (suite.model_path(n) for n in ("shakespeare-opt", "shakespeare-llama-relu"))
    model = Transformer.from_checkpoint(opt)
    made = counts_provenance(opt, model, train_tokens[:64], BOS)
    save_counts(tmp_path / COUNTS_FILE, np.ones((6, 1024), dtype=np.int64), made)
    assert load_counts(tmp_path / COUNTS_FILE, made) is not None
    assert load_counts(tmp_path / COUNTS_FILE, counts_provenance(opt, model, train_tokens[1:65], BOS)) is None
    assert load_counts(tmp_path / COUNTS_FILE, counts_provenance(opt, model, train_tokens[:65], BOS)) is None
    assert load_counts(tmp_path / COUNTS_FILE, made | {"checkpoint_sha256": counts_provenance(
        llama, model, [], BOS)["checkpoint_sha256"]}) is None


def test_the_counts_command_writes_what_activation_counts_computes(tmp_path, train_tokens, capsys):
    out = tmp_path / "counts.safetensors"
    assert main(["model", "counts", "shakespeare-opt", "--tokens", "1024", "--out", str(out)]) == 0
    assert "6 layers x 1024 neurons" in capsys.readouterr().out
    path = suite.model_path("shakespeare-opt")
    model = Transformer.from_checkpoint(path)
    expected, _ = activation_counts(model, train_tokens[:1024], model.config.max_positions, BOS)
    loaded = load_counts(out, counts_provenance(path, model, train_tokens[:1024], BOS))
    assert np.array_equal(loaded, expected)


def test_a_damaged_counts_file_is_named(tmp_path):
    (tmp_path / COUNTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=f"{COUNTS_FILE}: not a readable activation-counts file"):
        load_counts(tmp_path / COUNTS_FILE, {})
