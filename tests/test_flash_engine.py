"""The flash engine: with the oracle, every combination of techniques gives the dense engine's tokens and logits."""

import itertools
import os
import threading

import numpy as np
import pytest
import torch

from flashbench import suite
from flashbench.reference import Engine, Transformer
from flashbench.reference.activations import activation_counts
from flashbench.reference.flash import BudgetError, FlashEngine, FlashFFN, Techniques, first_occurrences, union_of
from flashbench.reference.layout import convert
from flashbench.suite.models.byte_tokenizer import BOS, encode
from tests.exactness import within_exact_bound

PROMPT = encode(suite.heldout_text())[:32]
STEPS = 128


@pytest.fixture(scope="module", params=suite.RELU_MODELS)
def model(request, tmp_path_factory):
    """A shipped model: its dense reference run, fp32 flash directories of both layouts (and a bfloat16 one, whose
    rows a bfloat16 engine reads straight into its caches and multiplies by the C kernels), and its hot neurons."""
    path = suite.model_path(request.param)
    dense = Transformer.from_checkpoint(path)
    engine = Engine(dense)
    logits = [engine.prefill(PROMPT)[-1]]
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(logits[-1].argmax()))
        logits.append(engine.step(tokens[-1]))
    root = tmp_path_factory.mktemp(request.param)
    flash = {layout: convert(path, root / layout, layout, "float32") for layout in ("bundled", "unbundled")}
    flash["bundled-bfloat16"] = convert(path, root / "bundled-bfloat16", "bundled", "bfloat16")
    counts, _ = activation_counts(dense, encode(suite.heldout_text(), bos=False)[:8192], 512, BOS)
    return {"path": path, "tokens": tokens, "logits": torch.stack(logits), "flash": flash, "counts": counts}


def replay(engine, tokens, prompt=PROMPT):
    """Logits after the prompt and after each of `tokens`, fed in order (teacher-forced on the dense run)."""
    out = [engine.prefill(prompt)[-1]]
    out += [engine.step(t) for t in tokens]
    return torch.stack(out)


# On the native kernels only: under the other CPU kernel paths (make test) the float32 engine's exactness is held by
# the pruning tests (oracle and naive) and the reference SUT through validate, at a quarter of the time.
COMBINATIONS = list(itertools.product(["bundled", "unbundled"], [0, 4], ["preallocated", "regather"], [0.0, 0.1]))


@pytest.mark.parametrize("layout, window, memory, hybrid", COMBINATIONS)
def test_oracle_flash_engine_reproduces_dense_inference(model, layout, window, memory, hybrid):
    techniques = Techniques(source="oracle", window=window, memory=memory, hybrid=hybrid, threads=4)
    engine = FlashEngine(model["flash"][layout], techniques, neuron_counts=model["counts"])
    logits = replay(engine, model["tokens"])
    engine.close()
    assert (logits[:-1].argmax(-1)[: STEPS] == torch.tensor(model["tokens"])).all(), "greedy tokens differ"
    assert within_exact_bound(logits, model["logits"])


def test_naive_configuration_reproduces_dense_inference_reading_every_weight(model):
    engine = FlashEngine(model["flash"]["bundled"], Techniques.naive(threads=4))
    logits = replay(engine, model["tokens"][:16])
    engine.close()
    assert within_exact_bound(logits, model["logits"][:17])
    layout = model["flash"]["bundled"]
    for stats in engine.history[1:]:
        assert stats.io.bytes_read == layout.config.n_layers * layout.geometry.file_bytes
        assert stats.io.records == layout.config.n_layers * layout.geometry.d_ffn


def test_hybrid_alone_reads_every_neuron_but_the_hot_ones_and_stays_exact(model):
    layout = model["flash"]["unbundled"]
    engine = FlashEngine(layout, Techniques(source="all", hybrid=0.25, threads=4), neuron_counts=model["counts"])
    logits = replay(engine, model["tokens"][:16])
    engine.close()
    assert within_exact_bound(logits, model["logits"][:17])
    hot = round(0.25 * layout.config.d_ffn)
    assert all(s.io.records == layout.config.n_layers * (layout.config.d_ffn - hot) for s in engine.history[1:])


def neurons_loaded(model, **techniques):
    engine = FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", threads=4, **techniques),
                         neuron_counts=model["counts"])
    replay(engine, model["tokens"][:64])
    engine.close()
    return sum(s.io.records for s in engine.history[1:])


def test_windowing_loads_fewer_neurons_the_longer_the_window(model):
    loaded = [neurons_loaded(model, window=k) for k in (0, 1, 4)]
    assert loaded[0] > loaded[1] > loaded[2]


def test_hybrid_hot_neurons_are_never_read(model):
    assert neurons_loaded(model, hybrid=0.1) < neurons_loaded(model)


def test_hybrid_without_activation_counts_is_refused(model):
    with pytest.raises(ValueError, match="hybrid needs neuron_counts"):
        FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", hybrid=0.1))


def test_a_budget_too_small_for_the_resident_weights_is_refused_with_the_numbers(model):
    with pytest.raises(BudgetError, match=r"DRAM budget 1,000,000 bytes cannot hold the resident weights"):
        FlashEngine(model["flash"]["bundled"], Techniques(source="oracle"), dram_budget=1_000_000)


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_engine_refused_for_its_budget_leaves_no_threads_or_open_files(model):
    threads, files = threading.active_count(), open_files()
    for _ in range(3):
        with pytest.raises(BudgetError):
            FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", threads=8), dram_budget=1_000_000)
    assert threading.active_count() == threads and open_files() == files


def test_an_engine_closes_its_reader_as_a_context_manager(model):
    threads = threading.active_count()
    with FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", threads=8)) as engine:
        engine.prefill(PROMPT[:4])
        assert threading.active_count() > threads
    assert threading.active_count() == threads


def tight_budget(model) -> tuple[int, list]:
    """A DRAM budget whose neuron cache holds every pass but not every window (windows of 8 on two-token prompts),
    and the logits of the same run with room."""
    flash = model["flash"]["bundled"]
    roomy = FlashEngine(flash, Techniques(source="oracle", window=8, threads=4))
    logits = replay(roomy, model["tokens"][:48], PROMPT[:2])  # a long prompt's union of sets would not fit
    roomy.close()
    layers = [b.ffn for b in roomy.model.layers]
    capacity = max(f.max_needed for f in layers)  # every pass fits, but not every window
    assert capacity < max(f.peak_rows for f in layers)
    fixed = roomy.dram.weights_total - roomy.dram.cache - roomy.dram.buffers
    row_bytes = roomy.dram.cache // (flash.geometry.d_ffn * flash.config.n_layers)
    return fixed + capacity * (row_bytes * flash.config.n_layers + flash.geometry.record_bytes), logits


def test_a_tight_budget_shrinks_the_window_and_stays_exact(model):
    budget, roomy_logits = tight_budget(model)
    engine = FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", window=8, threads=4),
                         dram_budget=budget)
    logits = replay(engine, model["tokens"][:48], PROMPT[:2])
    engine.close()
    assert engine.dram.weights_total <= budget
    assert sum(s.window_shrinks for s in engine.history) > 0
    assert within_exact_bound(logits, roomy_logits)


def test_a_budgets_caches_count_whole_in_the_dram_held_and_an_unbudgeted_engines_only_where_used(model):
    """Within a budget the caches are written through at build (no token pays first-touch faults), so the DRAM they
    hold is all they reserved; without one, only the rows the run occupied were ever touched."""
    budget, _ = tight_budget(model)
    for dram_budget in (budget, None):
        engine = FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", window=8, threads=4),
                             dram_budget=dram_budget)
        replay(engine, model["tokens"][:8], PROMPT[:2])
        engine.close()
        used = engine.cache_peak_used()
        assert 0 < used < engine.dram.cache
        assert engine.cache_held() == (engine.dram.cache if dram_budget else used)


def test_a_shrinking_window_forgets_its_oldest_tokens_first_and_no_more_than_make_room(model, monkeypatch):
    make_room, shrinks = FlashFFN._make_room, []

    def watched(self, needed, start, delta):
        before = self.last_needed[self.cache.cached_ids()]
        out = make_room(self, needed, start, delta)
        kept = self.last_needed[self.cache.cached_ids()]
        if len(kept) < len(before):
            gone = np.setdiff1d(before, kept)  # the positions forgotten (the neurons last needed there)
            assert not len(kept) or gone.max() < kept.min()  # the oldest first
            newest_gone = (before == gone.max()).sum()  # keeping that position's neurons too would not fit
            assert self.cache.n + newest_gone + len(delta) > self.cache.capacity
            shrinks.append(len(gone))
        return out

    monkeypatch.setattr(FlashFFN, "_make_room", watched)
    budget, _ = tight_budget(model)
    with FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", window=8, threads=4),
                     dram_budget=budget) as engine:
        replay(engine, model["tokens"][:48], PROMPT[:2])
    assert shrinks


class Recording:
    """Wraps a source and records the sets it gives, as `Trace` replays them: sets[token][layer]."""

    def __init__(self, source, n_layers):
        self.source, self.name, self.nbytes = source, source.name, source.nbytes
        self.n_layers, self.by_layer = n_layers, [[] for _ in range(n_layers)]

    def sets(self, layer, x):
        out = self.source.sets(layer, x)
        self.by_layer[layer] += out
        return out

    def reset(self):
        self.by_layer = [[] for _ in range(self.n_layers)]

    def trace(self):
        return [list(per_token) for per_token in zip(*self.by_layer)]


def test_a_trace_of_recorded_sets_replays_the_same_run(model):
    from flashbench.reference.sources import Trace

    flash = model["flash"]["bundled"]
    first = FlashEngine(flash, Techniques(source="oracle", window=2, threads=4))
    recording = Recording(first.shared.source, flash.config.n_layers)
    first.shared.source = recording
    expected = replay(first, model["tokens"][:24])
    first.close()
    replayed = FlashEngine(flash, Techniques(source="trace", window=2, threads=4), source=Trace(recording.trace()))
    assert torch.equal(replay(replayed, model["tokens"][:24]), expected)
    assert [s.io.records for s in replayed.history] == [s.io.records for s in first.history]
    replayed.close()


def test_int8_storage_stays_close_to_dense(model, tmp_path):
    from flashbench.harness.agreement import agreement

    flash = convert(model["path"], tmp_path / "int8", "bundled", "int8")
    engine = FlashEngine(flash, Techniques(source="oracle", window=4, threads=4))
    logits = replay(engine, model["tokens"][:64])
    engine.close()
    a = agreement(model["logits"][:65], logits, model["tokens"][:64] + [0])
    assert a.top1_agreement >= 0.95 and a.mean_kl < 0.01, a
    assert engine.history[1].io.bytes_requested == engine.history[1].io.records * (flash.config.d_model + 4) * len(
        flash.geometry.vectors)  # an int8 vector is its values and a float32 scale


def test_without_a_window_only_the_hot_neurons_are_cached(model):
    engine = FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", hybrid=0.1, threads=4),
                         neuron_counts=model["counts"])
    replay(engine, model["tokens"][:8])
    engine.close()
    hot = [len(b.ffn.hot) for b in engine.model.layers]
    assert [b.ffn.cache.n for b in engine.model.layers] == hot == [b.ffn.peak_rows for b in engine.model.layers]
    assert engine.dram.cache == max(hot) * engine.model.config.n_layers * engine.row_bytes


def test_the_hybrid_alone_fits_a_budget_below_one_whole_layer_cached_per_layer(model):
    """Every non-hot neuron is read each token, into one read buffer that all layers share."""
    flash = model["flash"]["unbundled"]
    techniques = Techniques(source="all", hybrid=0.25, threads=4)
    roomy = FlashEngine(flash, techniques, neuron_counts=model["counts"])
    roomy.close()
    g, n_layers = flash.geometry, flash.config.n_layers
    fixed = roomy.dram.resident + roomy.dram.source + roomy.dram.staging
    budget = roomy.dram.weights_total
    assert budget < fixed + g.d_ffn * (n_layers * roomy.row_bytes + g.record_bytes)  # a cache of every neuron
    engine = FlashEngine(flash, techniques, neuron_counts=model["counts"], dram_budget=budget)
    logits = replay(engine, model["tokens"][:8])
    engine.close()
    assert within_exact_bound(logits, model["logits"][:9])


def test_a_pass_needing_more_reads_than_the_budgets_buffer_holds_is_a_budget_error(model):
    flash = model["flash"]["bundled"]
    roomy = FlashEngine(flash, Techniques(source="oracle", threads=4))
    roomy.close()
    budget = roomy.dram.resident + roomy.dram.source + roomy.dram.staging + 8 * flash.geometry.record_bytes  # 8 a pass
    engine = FlashEngine(flash, Techniques(source="oracle", threads=4), dram_budget=budget)
    with pytest.raises(BudgetError, match=r"layer \d+: a pass needs \d+ neurons read, the read buffer holds 8"):
        replay(engine, model["tokens"][:4])
    engine.close()


OVERLAPPED = [("naive", "unbundled", dict(source="all")), ("hybrid", "bundled", dict(source="all", hybrid=0.25)),
              ("oracle", "bundled", dict(source="oracle")),
              ("oracle, window, hybrid", "unbundled", dict(source="oracle", window=4, hybrid=0.1)),
              ("predictor, window", "bundled", dict(source="predictor", window=4)),
              ("predictor, window, regather", "bundled", dict(source="predictor", window=4, memory="regather")),
              ("predictor, window, bfloat16", "bundled", dict(source="predictor", window=4, compute_dtype="bfloat16")),
              ("predictor, window, bfloat16 rows read into the caches", "bundled-bfloat16",
               dict(source="predictor", window=4, compute_dtype="bfloat16"))]


def overlapped(model, layout, overlap: bool, **techniques):
    """Logits and per-step stats over 24 tokens; the predictor source with its shipped lookahead."""
    from flashbench.reference.predictor import Predictor, lookahead_path

    shipped = model["path"] / "predictor"
    source = Predictor.load(shipped, lookahead=lookahead_path(shipped)) if techniques["source"] == "predictor" else None
    with FlashEngine(model["flash"][layout], Techniques(threads=4, overlap=overlap, **techniques), source=source,
                     neuron_counts=model["counts"]) as engine:
        logits = replay(engine, model["tokens"][:24])
    return logits, engine.history[1:]


@pytest.mark.parametrize("name, layout, techniques", OVERLAPPED, ids=[o[0] for o in OVERLAPPED])
def test_overlap_changes_when_bytes_are_read_never_a_logit(model, name, layout, techniques):
    """The guess decides only what is read early: each layer multiplies the same rows in the same order."""
    plain, plain_steps = overlapped(model, layout, False, **techniques)
    ahead, ahead_steps = overlapped(model, layout, True, **techniques)
    assert torch.equal(plain, ahead)
    assert [s.multiplied for s in plain_steps] == [s.multiplied for s in ahead_steps]
    assert sum(s.read_ahead_used for s in ahead_steps) > 0
    # What is read ahead and not needed is the only extra: every needed neuron is read once, early or late.
    for p, a in zip(plain_steps, ahead_steps):
        assert a.io.records == p.io.records + a.read_ahead - a.read_ahead_used
        assert p.io_wait_s == p.io.seconds  # without overlap every read is waited for


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("layout, dtype", [("bundled", "float32"), ("bundled-bfloat16", "bfloat16")])
def test_a_windowed_pass_and_its_read_ahead_land_in_the_neuron_cache_and_nothing_is_copied(model, layout, dtype,
                                                                                         overlap):
    """Each layer's own reads land in its neuron cache's free slots, and so does what the layer before read ahead
    for it: its inserts copy no rows, with or without overlap."""
    from flashbench.reference.predictor import Predictor, lookahead_path

    shipped = model["path"] / "predictor"
    source = Predictor.load(shipped, lookahead=lookahead_path(shipped))
    with FlashEngine(model["flash"][layout], Techniques(source="predictor", window=4, threads=4, overlap=overlap,
                                                        compute_dtype=dtype), source=source) as engine:
        engine.prefill(PROMPT[:4])
        reader, layers = engine.shared.reader, [block.ffn for block in engine.model.layers]
        into, inserted = [], []  # per read: its layer's cache, or the read-ahead's buffer
        real_read = reader.read

        def read(layer, ids, out, rows=None):
            into.append("cache" if np.shares_memory(out, layers[layer].cache.bytes) else
                        "ahead" if out is engine.shared.ahead_buffer else "elsewhere")
            return real_read(layer, ids, out, rows)

        def spy(ffn):
            real_insert = ffn.cache.insert

            def insert(ids, parts, *args, **kwargs):
                inserted.append(sum(len(ids) if p.at is None else len(p.at) for p in parts))
                return real_insert(ids, parts, *args, **kwargs)
            return insert

        reader.read = read
        for ffn in layers:
            ffn.cache.insert = spy(ffn)
        for token in PROMPT[4:12]:
            engine.step(token)
    steps = engine.history[-8:]
    assert into.count("cache") > 0 and set(into) == {"cache"}
    assert inserted and sum(inserted) == 0
    assert (sum(s.read_ahead_used for s in steps) > 0) == overlap


def test_with_overlap_a_layer_multiplies_the_rows_it_holds_while_its_delta_is_read(model):
    """Layer 0 (which nothing reads ahead for) starts reading its delta, multiplies its cached rows, then waits:
    here its read is held back until those rows were multiplied, which an engine that waited first never does."""
    with FlashEngine(model["flash"]["unbundled"], Techniques(source="oracle", window=4, threads=4,
                                                             overlap=True)) as engine:
        engine.prefill(PROMPT[:4])
        ffn, reader = engine.model.layers[0].ffn, engine.shared.reader
        multiplied, waited = threading.Event(), []
        real_read, real_share = reader.read, ffn._share

        def read(layer, *args, **kwargs):
            if layer == 0:
                waited.append(multiplied.wait(timeout=5))
            return real_read(layer, *args, **kwargs)

        def share(*args):
            multiplied.set()
            return real_share(*args)

        reader.read, ffn._share = read, share
        engine.step(PROMPT[4])
    assert waited == [True]


def test_with_overlap_a_layer_guesses_ahead_and_evicts_while_its_delta_is_read(model):
    """What a pass knows before its reads land, the next layer's guesses and the neurons its window no longer keeps,
    is worked out while they are in flight: here layer 0's read is held back until both were done."""
    with FlashEngine(model["flash"]["unbundled"], Techniques(source="oracle", window=4, threads=4,
                                                             overlap=True)) as engine:
        engine.prefill(PROMPT[:4])
        ffn, reader = engine.model.layers[0].ffn, engine.shared.reader
        guessed, evicted, waited = threading.Event(), threading.Event(), []
        real_read, real_guess, real_evict = reader.read, ffn._guess_ahead, ffn._evict_before

        def read(layer, *args, **kwargs):
            if layer == 0:
                waited.append(guessed.wait(timeout=5) and evicted.wait(timeout=5))
            return real_read(layer, *args, **kwargs)

        def guess(*args):
            guessed.set()
            return real_guess(*args)

        def evict(*args):
            evicted.set()
            return real_evict(*args)

        reader.read, ffn._guess_ahead, ffn._evict_before = read, guess, evict
        engine.step(PROMPT[4])
    assert waited == [True]


def test_the_io_uring_reader_changes_no_logit(model):
    from tests.test_reader import io_uring_here

    io_uring_here()
    logits = {}
    for reader in ("threads", "io_uring"):
        with FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", window=4, threads=4, reader=reader,
                                                               overlap=True)) as engine:
            logits[reader] = replay(engine, model["tokens"][:16])
    assert torch.equal(logits["threads"], logits["io_uring"])


def test_naive_overlap_reads_every_next_layer_ahead_and_nothing_after(model):
    _, steps = overlapped(model, "bundled", True, source="all")
    n, d = model["flash"]["bundled"].config.n_layers, model["flash"]["bundled"].config.d_ffn
    assert all(s.read_ahead == s.read_ahead_used == (n - 1) * d for s in steps)  # layer 0's: nothing to hide behind


def test_the_hybrid_alone_reads_each_next_layers_cold_part_ahead_whole(model):
    """Every neuron not hot is needed, so the guess is the set itself: read ahead whole (not READ_AHEAD of it), and
    used whole (the buffers swap roles; nothing is read twice or late)."""
    _, steps = overlapped(model, "bundled", True, source="all", hybrid=0.25)
    config = model["flash"]["bundled"].config
    cold = config.d_ffn - int(round(0.25 * config.d_ffn))  # a layer's neurons not hot
    n = config.n_layers
    assert all(s.read_ahead == s.read_ahead_used == (n - 1) * cold for s in steps)  # layer 0's: nothing before it
    assert all(s.io.records == n * cold for s in steps)


def test_an_overlapping_engine_leaves_no_threads_when_closed(model):
    threads = threading.active_count()
    with FlashEngine(model["flash"]["bundled"], Techniques(source="oracle", threads=4, overlap=True)) as engine:
        engine.prefill(PROMPT[:4])
        engine.step(PROMPT[4])
    assert threading.active_count() == threads


@pytest.mark.parametrize("overlap", [False, True])
def test_a_closed_engine_frees_its_buffers_at_once(model, overlap):
    """At paper scale a run makes one engine per configuration, each holding gigabytes: each must be freed when it
    is closed, not when the cyclic collector happens to run (tensors do not prompt it). Torch's lazy imports during
    a process's first model construction keep that one's frames (torch.fx.wrap holds its own frame), so a first
    engine is built and closed before the one observed."""
    import gc
    import weakref

    techniques = Techniques(source="oracle", window=4, threads=4, overlap=overlap)
    FlashEngine(model["flash"]["bundled"], techniques).close()
    gc.disable()
    try:
        engine = FlashEngine(model["flash"]["bundled"], techniques)
        engine.prefill(PROMPT[:4])
        state = weakref.ref(engine.shared)
        engine.close()
        del engine
        assert state() is None
    finally:
        gc.enable()


def test_a_pass_needs_the_sorted_ids_in_any_of_its_sets():
    rng = np.random.default_rng(0)
    sets = [rng.choice(512, k, replace=False) for k in (40, 0, 300, 7)]
    assert np.array_equal(union_of(sets, 512), np.unique(np.concatenate(sets)))
    assert union_of([], 512).size == 0


def test_guesses_keep_each_id_where_it_was_first_guessed():
    assert first_occurrences(np.array([5, 3, 5, 1, 3]), 8).tolist() == [5, 3, 1]
    assert first_occurrences(np.array([7, 2, 4]), 8).tolist() == [7, 2, 4]
    assert first_occurrences(np.zeros(0, dtype=np.int64), 8).size == 0
