"""The technique matrix: naive, each technique alone (with what it needs), cumulative, all, all-but-one."""

import pytest

import json

from flashbench.harness import matrix as table
from flashbench.harness.cli import main
from flashbench.harness.matrix import Configuration, Settings, Technique, matrix, technique_names

from .tiny import scenario


def by_section(configs):
    return {s: c for c in configs for s in c.sections}


def test_naive_comes_first_and_reads_whole_unbundled_files():
    naive = matrix()[0]
    assert naive.name == "naive" and naive.on == frozenset()
    assert naive.engine_settings(Settings(), "predictor").reads_whole_layers
    assert naive.layout().name == "unbundled-float16"


RELU = technique_names(dense_ffn=False)  # what applies to a ReLU FFN: every row but threshold


def test_every_technique_appears_alone_with_its_prerequisites_named():
    s = by_section(matrix())
    assert {f"alone:{t}" for t in RELU} <= set(s)
    assert s["alone:windowing"].prerequisites == ("predictor",)
    assert s["alone:memory"].prerequisites == ("predictor", "windowing")
    assert s["alone:quantization"].prerequisites == ()


def test_cumulative_order_is_the_papers_then_memory_overlap_quantization_pruning_placement():
    s = by_section(matrix())
    n = len(RELU)
    assert [s[f"cumulative:{i}"].name.split("+")[-1] for i in range(1, n + 1)] == list(RELU)
    assert RELU[-5:] == ("memory", "overlap", "quantization", "pruning", "placement")
    assert s[f"cumulative:{n}"] is s["all"]


def test_a_set_reached_from_two_sections_is_measured_once():
    configs = matrix()
    assert len({c.on for c in configs}) == len(configs)
    assert set(by_section(configs)["alone:hybrid"].sections) == {"alone:hybrid", "cumulative:1"}


def test_all_but_predictor_names_the_techniques_left_without_effect():
    c = by_section(matrix())["all-but:predictor"]
    assert c.on == {"hybrid", "overlap", "quantization", "pruning", "placement"}
    assert c.inactive == ("windowing", "bundling", "memory")


def test_only_configurations_without_lossy_techniques_are_exact():
    exact = {c.name for c in matrix() if c.exact}
    assert exact == {"naive", "hybrid", "hybrid+placement", "overlap"}


def test_switches_map_to_the_engine_and_the_layout():
    c = by_section(matrix())["all"]
    t = c.engine_settings(Settings(window=4, hybrid=0.1, threads=8, gap_bytes=4096), source="trace")
    assert (t.source, t.window, t.hybrid, t.memory, t.threads, t.gap_bytes) == ("trace", 4, 0.1, "preallocated", 8, 4096)
    assert c.layout().name == "bundled-int8-pruned-placed"
    assert c.layout(Settings(hybrid=0.1)).hot == 0.1  # the placed layout's hot block is the hybrid's


def test_configurations_needing_every_resident_neuron_merge_reads_past_hot_ones():
    hybrid = by_section(matrix())["alone:hybrid"]
    assert hybrid.engine_settings(Settings(whole_gap_bytes=1 << 20), "predictor").gap_bytes == 1 << 20


def test_a_technique_without_its_prerequisite_in_the_matrix_is_refused():
    with pytest.raises(ValueError, match="'windowing' needs \\['predictor'\\]"):
        matrix(("hybrid", "windowing"))


def test_a_technique_is_one_row_of_the_table_and_reaches_the_matrix_the_records_and_the_report(monkeypatch,
                                                                                                tmp_path, cache_home):
    toy = Technique("toy", "read with two threads", engine=lambda settings, source: {"threads": 2})
    monkeypatch.setattr(table, "TECHNIQUES", table.TECHNIQUES + (toy,))
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
    assert {c.name for c in matrix(("hybrid", "toy"))} == {"naive", "hybrid", "toy", "hybrid+toy"}
    (tmp_path / "toy.toml").write_text(scenario("toy", tokens=8, model='techniques = ["hybrid", "toy"]\npeers = []'))
    assert main(["run", "--scenario", str(tmp_path / "toy.toml"), "--reports", str(tmp_path / "reports"),
                 "--run-id", "t", "--work", str(tmp_path / "work")]) == 0
    run = tmp_path / "reports" / "t"
    record = json.loads((run / "records" / "shakespeare-opt" / "hybrid+toy.json").read_text())
    assert record["techniques_on"] == ["hybrid", "toy"] and record["engine"]["threads"] == 2
    assert record["agreement"]["tolerance"] == "exact"  # not lossy: judged exact, and it is
    report = (run / "report.md").read_text()
    assert "| hybrid+toy |" in report and "| toy | read with two threads | - | exact | threads = 2 | - |" in report


def test_a_relu_ffns_matrix_leaves_threshold_out():
    assert "threshold" in technique_names() and "threshold" not in RELU
    assert all("threshold" not in c.on for c in matrix())


def test_on_a_silu_ffn_every_sparse_technique_needs_threshold():
    s = by_section(matrix(dense_ffn=True))
    assert s["alone:hybrid"].on == {"threshold", "hybrid"} and s["alone:hybrid"].prerequisites == ("threshold",)
    assert s["alone:memory"].prerequisites == ("threshold", "predictor", "windowing")
    assert s["alone:quantization"].on == {"quantization"}  # dense reads: no sparsity needed
    assert s["alone:overlap"].on == {"overlap"}  # the next layer's whole file read ahead
    assert s["cumulative:1"].name == "threshold" and s["cumulative:2"].name == "threshold+hybrid"
    assert s["all-but:threshold"].on == {"overlap", "quantization"}
    assert s["all-but:threshold"].inactive == ("hybrid", "predictor", "windowing", "bundling", "memory", "pruning",
                                              "placement")


def test_threshold_is_lossy_and_switches_the_engines_target_sparsity():
    c = by_section(matrix(dense_ffn=True))["alone:threshold"]
    assert not c.exact and c.engine_settings(Settings(threshold=0.7), "predictor").threshold == 0.7
    assert c.engine_settings(Settings(), "predictor").reads_whole_layers  # alone it reads every neuron


def test_sparse_configurations_say_why_they_do_not_apply():
    s = by_section(matrix(technique_names(), dense_ffn=True))
    assert "needs 'threshold' on" in Configuration(frozenset({"hybrid"})).not_applicable(dense_ffn=True)
    assert s["alone:hybrid"].not_applicable(dense_ffn=True) is None
    assert "applies to SiLU FFNs" in s["alone:threshold"].not_applicable(dense_ffn=False)
    assert s["naive"].not_applicable(dense_ffn=True) is None


def test_a_threshold_target_must_be_a_fraction_below_one():
    with pytest.raises(ValueError, match="threshold target sparsity"):
        Settings(threshold=1.0)
