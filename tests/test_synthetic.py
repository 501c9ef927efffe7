"""Paper-scale synthetic models and their traces: real dimensions, seeded weights, calibrated active sets."""

import numpy as np
import pytest
import torch

from flashbench.reference import Transformer
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import convert
from flashbench.reference.sources import Trace as TraceSource
from flashbench.suite import synthetic, traces

from .conftest import tiny_config


def test_shapes_have_the_papers_dimensions():
    opt = synthetic.shape_config("opt-6.7b")
    assert (opt.d_model, opt.n_layers, opt.d_ffn) == (4096, 32, 16384)
    assert synthetic.weight_bytes(opt) / 1e9 == pytest.approx(13.4, abs=0.1)  # the paper's 13.4 GB in fp16
    assert synthetic.shape_config("llama-2-7b").d_ffn == 11008


def test_unknown_shape_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="opt-1.3b, opt-6.7b, llama-2-7b"):
        synthetic.shape_config("gpt-5")


def test_random_checkpoint_is_a_loadable_hf_checkpoint_and_seeded(tmp_path):
    config = tiny_config("llama", n_kv_heads=2)
    a = synthetic.write_random_checkpoint(config, tmp_path / "a", seed=3)
    b = synthetic.write_random_checkpoint(config, tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    model = Transformer.from_checkpoint(a)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_paper_profile_trace_meets_its_targets():
    trace = traces.generate(traces.PAPER_OPT_6_7B, n_layers=2, d_ffn=4096, tokens=64, seed=1)
    for layer in trace.layers:
        assert layer["predicted_achieved"] == pytest.approx(0.10, rel=0.02)
        assert layer["new_achieved"] == pytest.approx(0.024, rel=0.2)


def test_new_fraction_counts_ids_outside_the_window():
    sets = [np.array([0, 1]), np.array([1, 2]), np.array([2, 3, 4])]
    assert traces.new_fraction(sets, window=1, d_ffn=10) == pytest.approx((1 + 2) / 2 / 10)
    assert traces.new_fraction(sets, window=2, d_ffn=10) == pytest.approx(2 / 10)


def test_trace_survives_save_and_load(tmp_path):
    trace = traces.generate(traces.PAPER_OPT_6_7B, n_layers=2, d_ffn=512, tokens=5, seed=0)
    trace.save(tmp_path / "t")
    back = traces.Trace.load(tmp_path / "t")
    assert back.profile == trace.profile and back.layers == trace.layers
    assert all(np.array_equal(x, y) for a, b in zip(trace.sets, back.sets) for x, y in zip(a, b))


def test_engine_replaying_a_trace_reads_exactly_each_tokens_new_neurons(tmp_path):
    config = tiny_config("opt")
    flash = convert(synthetic.write_random_checkpoint(config, tmp_path / "ck"), tmp_path / "flash")
    trace = traces.generate(traces.PAPER_OPT_6_7B, config.n_layers, config.d_ffn, tokens=12, seed=0)
    engine = FlashEngine(flash, Techniques(source="trace", window=0, threads=2), source=TraceSource(trace.sets))
    engine.prefill([1])
    for t in range(2, 12):
        engine.step(t)
    engine.close()
    assert [s.io.records for s in engine.history] == [sum(len(s) for s in per) for per in trace.sets[:11]]


@pytest.mark.parametrize("arch, layout", [("opt", "bundled"), ("llama", "unbundled")])
def test_a_layout_written_straight_from_the_generator_equals_the_converted_checkpoint(tmp_path, arch, layout):
    config = tiny_config(arch)
    converted = convert(synthetic.write_random_checkpoint(config, tmp_path / "ck", seed=5), tmp_path / "c",
                        layout=layout)
    straight = synthetic.write_random_layout(config, tmp_path / "s", seed=5, layout=layout)
    assert straight.files == converted.files  # every file's size and sha256
    assert straight.origin["synthetic"] and straight.origin["seed"] == 5


def test_synth_cli_writes_layouts_without_a_checkpoint_unless_asked(tmp_path, monkeypatch, capsys):
    from flashbench.harness.cli import main

    monkeypatch.setitem(synthetic.SHAPES, "opt-1.3b", tiny_config("opt"))  # the CLI's shape, at a test's size
    assert main(["model", "synth", str(tmp_path / "m"), "--shape", "opt-1.3b", "--layout", "bundled",
                 "--trace-tokens", "8"]) == 0
    assert (tmp_path / "m" / "flash-bundled" / "layout.json").is_file() and not (tmp_path / "m" / "checkpoint").exists()
    assert main(["model", "synth", str(tmp_path / "n"), "--shape", "opt-1.3b"]) == 2
    assert "nothing to write" in capsys.readouterr().err


def test_a_traces_lookahead_guesses_its_sets_first_in_guesses_of_the_measured_size():
    from flashbench.suite import traces

    trace = traces.generate(traces.PAPER_OPT_6_7B, n_layers=4, d_ffn=4096, tokens=24, seed=3)
    guesses = traces.lookahead(trace.sets, 4096, seed=3)
    assert all(len(g[0]) == 0 for g in guesses)  # nothing guesses layer 0 a layer earlier
    pairs = [(t[layer], g[layer]) for t, g in zip(trace.sets, guesses) for layer in range(1, 4)]
    size = sum(len(g) for _, g in pairs) / sum(len(s) for s, _ in pairs)
    assert size == pytest.approx(traces.LOOKAHEAD_SIZE, abs=0.01)
    half = [(np.isin(g[: len(g) // 2], s).mean(), np.isin(g[len(g) // 2 :], s).mean()) for s, g in pairs]
    first, second = np.mean(half, axis=0)
    assert first > 0.5 > 0.2 > second  # most confident first: the set's ids lead (0.69 and 0.14 here)
