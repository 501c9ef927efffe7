"""Dead-neuron pruning: neurons never active on some text are left out of the flash layout."""

import json

import numpy as np
import pytest
import torch

from flashbench import suite
from flashbench.harness.cli import main
from flashbench.reference import Engine, Transformer
from flashbench.reference.activations import activation_counts, ever_active
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import FlashLayout, LayoutError, convert, decode_records, ffn_file
from flashbench.reference.reader import FlashReader, record_buffer
from flashbench.suite.models.byte_tokenizer import BOS, encode
from tests.exactness import within_exact_bound

TOKENS = encode(suite.heldout_text())[:96]


@pytest.fixture(scope="module", params=suite.RELU_MODELS)
def pruned(request, tmp_path_factory):
    """A model pruned to the neurons active somewhere in TOKENS, and the dense logits over TOKENS."""
    path = suite.model_path(request.param)
    dense = Transformer.from_checkpoint(path)
    counts, _ = activation_counts(dense, TOKENS[1:], dense.config.max_positions, BOS)
    keep = ever_active(counts)
    root = tmp_path_factory.mktemp("pruned")
    flash = convert(path, root / "flash", "bundled", "float32", keep=keep, pruning={"rule": "test"})
    engine = Engine(dense)
    logits = torch.cat([engine.prefill(TOKENS[:1])] + [engine.step(t)[None] for t in TOKENS[1:-1]])
    return {"path": path, "dense": dense, "keep": keep, "flash": flash, "logits": logits, "root": root}


def test_pruned_layout_stores_only_the_kept_neurons(pruned):
    flash, keep = pruned["flash"], pruned["keep"]
    assert [len(k) for k in flash.kept] == [len(k) for k in keep]
    for layer in range(flash.config.n_layers):
        g = flash.geometry_of(layer)
        assert (flash.path / ffn_file(layer)).stat().st_size == g.file_bytes
        assert g.d_ffn == len(keep[layer]) < flash.config.d_ffn
    meta = json.loads((flash.path / "layout.json").read_text())
    assert meta["pruning"] == {"rule": "test"}


def test_a_kept_neurons_record_holds_its_own_weights(pruned):
    flash, dense = pruned["flash"], pruned["dense"]
    layer = flash.config.n_layers - 1
    neuron = int(flash.kept[layer][-1])
    record = int(np.flatnonzero(flash.kept[layer] == neuron)[0])
    out = record_buffer(flash.geometry_of(layer), 1)
    with FlashReader.for_layout(flash, threads=2) as reader:
        reader.read(layer, [record], out)
    assert torch.equal(decode_records(out, flash.geometry_of(layer))["up"][0], dense.layers[layer].ffn.up.weight[neuron])


@pytest.mark.exactness
@pytest.mark.parametrize("techniques", [Techniques(source="oracle", window=3, threads=4), Techniques.naive(threads=4)],
                         ids=["oracle", "naive"])
def test_pruning_neurons_inactive_on_the_text_leaves_its_logits_unchanged(pruned, techniques):
    engine = FlashEngine(pruned["flash"], techniques)
    logits = torch.cat([engine.prefill(TOKENS[:1])] + [engine.step(t)[None] for t in TOKENS[1:-1]])
    engine.close()
    assert within_exact_bound(logits, pruned["logits"])


def test_kept_ids_listed_twice_are_refused_when_opened(pruned):
    meta_path = pruned["flash"].path / "layout.json"
    meta = json.loads(meta_path.read_text())
    copy = pruned["root"] / "bad"
    copy.mkdir()
    for f in pruned["flash"].path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    meta["kept"][0] = [5, 3, 5]  # any order is a placement; a neuron twice is not
    (copy / "layout.json").write_text(json.dumps(meta))
    with pytest.raises(LayoutError, match="distinct neuron ids"):
        FlashLayout.open(copy, verify=False)


def test_convert_prune_dead_command_records_what_it_pruned(tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(suite.heldout_text()[:2000])
    args = ["convert", str(tiny_checkpoint), str(tmp_path / "flash"), "--prune-dead", "--prune-text", str(text)]
    assert main(args) == 0
    meta = json.loads((tmp_path / "flash" / "layout.json").read_text())
    assert meta["pruning"]["text"] == str(text) and meta["pruning"]["tokens"] == 2000
    assert [256 - len(k) for k in meta["kept"]] == meta["pruning"]["dead_per_layer"]
    assert "dead per layer" in capsys.readouterr().out
