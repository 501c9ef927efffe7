"""Neuron placement: each layer's records stored hot first, by activation count, so that the hybrid's hot neurons are
one block and everything it reads one contiguous range, then the rest by co-activation, so that a pass's delta
coalesces into fewer reads; the same logits, fewer bytes and reads."""

import numpy as np
import pytest
import torch

from flashbench import suite
from flashbench.reference import Engine, Transformer
from flashbench.reference.activations import (active_sample, activation_counts, coactivation_order, hot_neurons,
                                              placement_order)
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import FlashLayout, convert
from flashbench.suite.models.byte_tokenizer import BOS, encode
from tests.exactness import within_exact_bound

TOKENS = encode(suite.heldout_text())[:48]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    path = suite.model_path("shakespeare-opt")
    dense = Transformer.from_checkpoint(path)
    text = encode(suite.heldout_text(), bos=False)
    counts, _ = activation_counts(dense, text[:8192], 512, BOS)
    order = [np.argsort(-row, kind="stable") for row in counts]
    active = active_sample(dense, text[:4096], 512, BOS)
    coactive = [placement_order(c, 0.25, a) for c, a in zip(counts, active)]
    root = tmp_path_factory.mktemp("placement")
    plain = convert(path, root / "plain", "unbundled", "float32")
    placed = convert(path, root / "placed", "unbundled", "float32", keep=order, placement={"order": "by count"})
    chained = convert(path, root / "chained", "bundled", "float32", keep=coactive, placement={"order": "chains"})
    by_count = convert(path, root / "by-count", "bundled", "float32", keep=order, placement={"order": "by count"})
    engine = Engine(dense)
    logits = torch.cat([engine.prefill(TOKENS[:1])] + [engine.step(t)[None] for t in TOKENS[1:-1]])
    return {"plain": plain, "placed": placed, "chained": chained, "by count": by_count, "counts": counts,
            "order": order, "coactive": coactive, "logits": logits}


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


def test_the_hybrid_alone_on_a_placed_layout_reads_its_cold_span_in_naives_whole_file_reads(layouts):
    """Hot records first: a layer's cold records are one span per matrix, read as naive reads its file (the same
    chunks, each byte where it lies in the file buffer, no records planned), with or without overlap (the next
    layer's span read ahead); over the unplaced layout the hybrid reads its records as before."""
    g, layers = layouts["placed"].geometry, layouts["placed"].config.n_layers
    spans = g.spans_from(round(0.25 * g.d_ffn))
    reads, span_bytes = sum(-(-(end - start) // (1 << 20)) for start, end in spans), sum(e - s for s, e in spans)
    got = []
    for overlap in (False, True):
        techniques = Techniques(source="all", hybrid=0.25, overlap=overlap)
        with FlashEngine(layouts["placed"], techniques, neuron_counts=layouts["counts"]) as e:
            got.append(torch.cat([e.prefill(TOKENS[:1])] + [e.step(t)[None] for t in TOKENS[1:-1]]))
            assert e.shared.whole_files
            assert all(s.io.reads == reads * layers and s.io.bytes_read == span_bytes * layers for s in e.history[1:])
    assert torch.equal(got[0], got[1]) and within_exact_bound(got[0], layouts["logits"])
    with FlashEngine(layouts["plain"], Techniques(source="all", hybrid=0.25), neuron_counts=layouts["counts"]) as e:
        assert not e.shared.whole_files


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


def test_coactivation_order_lays_neurons_active_together_next_to_each_other():
    """Four groups interleaved by id (neuron i in group i % 4), each token activating most of one group: the order
    puts each group in one run."""
    rng = np.random.default_rng(0)
    active = np.zeros((200, 40), dtype=bool)
    for t in range(len(active)):
        group = rng.integers(4)
        active[t, group::4] = rng.random(10) < 0.8
    order = coactivation_order(np.packbits(active, axis=0), np.arange(40))
    assert sorted(order) == list(range(40))
    assert all(len(set(order[i : i + 10] % 4)) == 1 for i in range(0, 40, 10))


def test_the_placed_order_is_the_hot_block_then_every_other_neuron_once(layouts):
    for order, hot, counts in zip(layouts["coactive"], hot_neurons(layouts["counts"], 0.25), layouts["counts"]):
        assert set(order[: len(hot)]) == set(hot)
        assert sorted(order) == list(range(len(counts)))


def test_a_coactivation_placed_layout_reads_the_same_windowed_deltas_in_fewer_reads(layouts):
    """The oracle's sets, window 4, hybrid 25%, on held-out text past the sample the order was made from: the same
    records per token as on the layout placed by count, in fewer reads (on this machine 1244 against 1323)."""
    tokens = encode(suite.heldout_text(), bos=False)[16384 : 16384 + 64]
    reads, records = {}, {}
    for name in ("by count", "chained"):
        techniques = Techniques(source="oracle", window=4, hybrid=0.25, threads=4)
        with FlashEngine(layouts[name], techniques, neuron_counts=layouts["counts"]) as e:
            e.prefill(tokens[:1])
            for t in tokens[1:]:
                e.step(t)
            reads[name] = sum(s.io.reads for s in e.history[1:])
            records[name] = sum(s.io.records for s in e.history[1:])
    assert records["chained"] == records["by count"]
    assert reads["chained"] < reads["by count"]
