"""Scenarios are TOML files; bad ones are refused with the file and the key named."""

import re

import pytest
import torch

from flashbench.harness import scenario as sc


def test_every_shipped_scenario_loads():
    """The GPU one where there is a GPU; without one it is refused with the reason (tests/test_device.py)."""
    assert "default" in sc.available() and "gpu" in sc.available()
    for name in sc.available():
        if name == "gpu" and not torch.cuda.is_available():
            continue
        s = sc.load(name)
        assert s.models and s.probe.chunk_bytes and s.settings.threads > 0


def test_the_default_scenario_runs_the_embedded_models():
    names = [m.name for m in sc.load("default").models]
    assert {"shakespeare-opt", "shakespeare-llama-relu"} <= set(names)


def test_storage_dtype_compute_stores_the_ffn_in_the_compute_dtype(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[engine]\nstorage_dtype = "compute"\ncompute_dtype = "bfloat16"\n[[models]]\nname = "shakespeare-opt"\n')
    assert sc.load(str(f)).settings.storage_dtype == "bfloat16"


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


def test_an_approximate_table_sets_the_approximate_tier(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[engine.approximate]\nmax_mean_kl = 0.1\nmin_top1_agreement = 0.9\n[[models]]\nname = "x"\n')
    tol = sc.load(str(f)).settings.approximate
    assert not tol.exact and tol.max_mean_kl == 0.1 and tol.min_top1_agreement == 0.9


@pytest.mark.parametrize("table, message", [
    ("[engine.approximate]\nmax_kl = 0.1\n", r"unknown limit\(s\) \['max_kl'\]"),
    ("[engine.approximate]\nmax_mean_kl = \"small\"\n", "non-negative numbers"),
    ("[engine]\napproximate = 0.05\n", "a table of limits"),
])
def test_a_bad_approximate_table_is_refused_when_the_scenario_loads(tmp_path, table, message):
    f = tmp_path / "s.toml"
    f.write_text(table + '[[models]]\nname = "x"\n')
    with pytest.raises(sc.ScenarioError, match=rf"s.toml \[engine\]: .*{message}"):
        sc.load(str(f))


def test_pruning_counts_on_the_same_tokens_in_the_main_job_and_in_convert():
    from flashbench.harness.cli import build_parser

    convert = build_parser().parse_args(["convert", "shakespeare-opt", "out", "--prune-dead"])
    sweep = build_parser().parse_args(["window-sweep", "--prune-dead"])
    assert convert.prune_tokens == sweep.prune_tokens == sc.ModelSpec("x").counts_tokens


@pytest.mark.parametrize("table, message", [
    ('[engine]\nstorage_dtype = "int4"\n', "storage_dtype must be one of float32, float16, bfloat16"),
    ('[engine]\ncompute_dtype = "float8"\n', "compute_dtype must be one of"),
    ('[engine]\nwindow = -1\n', "window must be an integer >= 0"),
    ('[engine]\nhybrid = 1.5\n', "hybrid must be a fraction"),
    ('[engine]\nmatvec = "rows"\n', 'matvec "rows" multiplies 16-bit weights on the CPU, not float32'),
    ('[engine]\ndtype = "float16"\n', "'dtype' is now 'storage_dtype'"),
    ('[[models]]\nname = "x"\ntokens = "64"\n', "tokens must be a non-negative integer"),
])
def test_a_bad_setting_fails_when_the_scenario_loads_before_anything_runs(tmp_path, table, message):
    f = tmp_path / "s.toml"
    f.write_text(table + ('' if "[[models]]" in table else '[[models]]\nname = "x"\n'))
    with pytest.raises(sc.ScenarioError, match=f"s.toml.*{re.escape(message)}"):
        sc.load(str(f))
