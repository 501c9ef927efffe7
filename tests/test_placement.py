"""Neuron placement: each layer's records stored by activation count, most often active first, so that the hybrid's
hot neurons are one block and everything it reads one contiguous range; the same logits, fewer bytes read."""

import numpy as np
import pytest
import torch

from flashbench import suite
from flashbench.reference import Engine, Transformer
from flashbench.reference.activations import activation_counts, hot_neurons
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import FlashLayout, convert
from flashbench.suite.models.byte_tokenizer import BOS, encode
from tests.exactness import within_exact_bound

TOKENS = encode(suite.heldout_text())[:48]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    path = suite.model_path("shakespeare-opt")
    dense = Transformer.from_checkpoint(path)
    counts, _ = activation_counts(dense, encode(suite.heldout_text(), bos=False)[:8192], 512, BOS)
    order = [np.argsort(-row, kind="stable") for row in counts]
    root = tmp_path_factory.mktemp("placement")
    plain = convert(path, root / "plain", "unbundled", "float32")
    placed = convert(path, root / "placed", "unbundled", "float32", keep=order, placement={"order": "by count"})
    engine = Engine(dense)
    logits = torch.cat([engine.prefill(TOKENS[:1])] + [engine.step(t)[None] for t in TOKENS[1:-1]])
    return {"plain": plain, "placed": placed, "counts": counts, "order": order, "logits": logits}


def run(layout, counts):
    with FlashEngine(layout, Techniques(source="all", hybrid=0.25, gap_bytes=1 << 20), neuron_counts=counts) as e:
        logits = torch.cat([e.prefill(TOKENS[:1])] + [e.step(t)[None] for t in TOKENS[1:-1]])
        return logits, e.history[1:]


def test_a_placed_layout_keeps_its_order_and_says_how_it_was_chosen(layouts):
    opened = FlashLayout.open(layouts["placed"].path)
    assert all(np.array_equal(k, o) for k, o in zip(opened.kept, layouts["order"]))
    hot = hot_neurons(layouts["counts"], 0.25)
    assert all(set(k[: len(h)]) == set(h) for k, h in zip(opened.kept, hot))  # the hot neurons: the first block


@pytest.mark.exactness
def test_the_hybrid_on_a_placed_layout_gives_dense_logits_and_reads_one_range_per_layer(layouts):
    plain_logits, plain = run(layouts["plain"], layouts["counts"])
    placed_logits, placed = run(layouts["placed"], layouts["counts"])
    assert within_exact_bound(plain_logits, layouts["logits"]) and within_exact_bound(placed_logits, layouts["logits"])
    g, layers = layouts["plain"].geometry, layouts["plain"].config.n_layers
    cold = g.d_ffn - round(0.25 * g.d_ffn)
    assert all(s.io.records == cold * layers for s in placed)
    # the cold neurons' rows are adjacent: the blocks read are their own bytes, to within a block per vector
    assert all(s.io.bytes_read <= s.io.bytes_requested + 2 * len(g.vectors) * layers * 4096 for s in placed)
    assert sum(s.io.bytes_read for s in placed) < sum(s.io.bytes_read for s in plain)


def test_a_placed_layout_is_read_in_file_order_and_overlap_changes_no_logit(layouts):
    """Each pass reads and multiplies its neurons in the order their records lie in the file (adjacent records into
    adjacent rows); the read-ahead's hits are found by record, so overlap still changes only when bytes are read."""
    got = []
    for overlap in (False, True):
        techniques = Techniques(source="oracle", window=4, hybrid=0.1, overlap=overlap)
        with FlashEngine(layouts["placed"], techniques, neuron_counts=layouts["counts"]) as e:
            got.append(torch.cat([e.prefill(TOKENS[:1])] + [e.step(t)[None] for t in TOKENS[1:-1]]))
            ffn = e.model.layers[0].ffn
            delta = ffn._in_file_order(np.arange(0, ffn.geometry.d_ffn, 7))
            assert (np.diff(ffn.record_of[delta]) > 0).all() and not ffn.in_id_order
            if overlap:
                assert sum(s.read_ahead_used for s in e.history) > 0
    assert torch.equal(got[0], got[1]) and within_exact_bound(got[0], layouts["logits"])
