"""Scenarios are TOML files; bad ones are refused with the file and the key named."""

import pytest

from flashbench.harness import scenario as sc


def test_every_shipped_scenario_loads():
    assert "default" in sc.available()
    for name in sc.available():
        s = sc.load(name)
        assert s.models and s.probe.chunk_bytes and s.settings.threads > 0


def test_the_default_scenario_runs_the_embedded_models():
    names = [m.name for m in sc.load("default").models]
    assert {"shakespeare-opt", "shakespeare-llama-relu"} <= set(names)


def test_an_unknown_key_is_named(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[[models]]\nname = "shakespeare-opt"\ntokenz = 3\n')
    with pytest.raises(sc.ScenarioError, match=r"s.toml \[\[models\]\] #1: unknown key\(s\) \['tokenz'\]"):
        sc.load(str(f))


def test_invalid_toml_is_named(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("name = \n")
    with pytest.raises(sc.ScenarioError, match="s.toml: not valid TOML"):
        sc.load(str(f))


def test_a_missing_scenario_lists_the_available_ones():
    with pytest.raises(sc.ScenarioError, match="no such scenario.*default"):
        sc.load("no-such-scenario")


def test_chunk_sizes_are_given_in_kib(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[probe]\nchunk_kib = [4, 1024]\n[[models]]\nname = "shakespeare-opt"\n')
    assert sc.load(str(f)).probe.chunk_bytes == (4096, 1 << 20)


def test_too_few_tokens_to_time_a_decode_step_are_refused(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[[models]]\nname = "synthetic:opt-1.3b"\nwhole_read_tokens = 2\n')
    with pytest.raises(sc.ScenarioError, match="whole_read_tokens must be at least 3"):
        sc.load(str(f))


def test_an_unknown_compute_dtype_is_named(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[engine]\ncompute_dtype = "float8"\n[[models]]\nname = "shakespeare-opt"\n')
    with pytest.raises(sc.ScenarioError, match=r"s.toml \[engine\]: compute_dtype must be one of float32, float16"):
        sc.load(str(f))
