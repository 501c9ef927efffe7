"""`flashbench compare` and `flashbench hardware` on real runs of a small scenario: the unchanged engine twice, and
deliberately worse variants of it (a slower reader, a window that forgets, a predictor that drops neurons)."""

import dataclasses
import json
import shutil
import time
import tomllib
from pathlib import Path

import pytest

from flashbench import suite
from flashbench.harness.cli import main
from flashbench.harness.compare import CompareError, parse_rules
from flashbench.harness.compare import load as load_records
from flashbench.harness.main_job import run_scenario
from flashbench.harness.matrix import matrix
from flashbench.harness.scenario import SCENARIOS_DIR, load
from flashbench.reference.flash import FlashFFN
from flashbench.reference.predictor import Predictor
from flashbench.reference.reader import FlashReader
from flashbench.reference.storage import storage_of

from .tiny import scenario

SCENARIO = scenario("compare-tiny", tokens=12, model='techniques = ["predictor", "windowing"]\npeers = []')
EASY = "counters,verdicts,speedup_over_naive:50%"  # what a slower reader (2 ms a read) falls well outside
# Two runs of the unchanged engine agree exactly on counters and verdicts. Their timing ratios do not (a 24-token run's
# moved 59% with a test running beside it), so how a timed rule's tolerance decides is tested on edited records.
SAME = "counters,verdicts"


def slower_reader(mp):
    """Every read operation of the sparse path costs 2 ms more (naive reads whole files, through read_layer)."""
    read = FlashReader.read

    def slow(self, layer, ids, out, rows=None):
        stats = read(self, layer, ids, out, rows)
        time.sleep(0.002 * stats.reads)
        return dataclasses.replace(stats, seconds=stats.seconds + 0.002 * stats.reads)

    mp.setattr(FlashReader, "read", slow)


def forgetful_window(mp):
    """The window forgets every token as soon as it is computed: more bytes read per token."""
    evict = FlashFFN._evict_before
    mp.setattr(FlashFFN, "_evict_before", lambda self, position: evict(self, self.position))


def dropping_predictor(mp):
    """Half of each predicted set is dropped: fewer bytes, and outputs that drift from dense inference."""
    sets = Predictor.sets
    mp.setattr(Predictor, "sets", lambda self, layer, x: [s[: len(s) // 2] for s in sets(self, layer, x)])


VARIANTS = {"base": None, "again": None, "slow": slower_reader, "hungry": forgetful_window,
            "lossy": dropping_predictor}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_home):
    root = tmp_path_factory.mktemp("compare")
    (root / "tiny.toml").write_text(SCENARIO)
    scenario = load(str(root / "tiny.toml"))
    out = {}
    for name, variant in VARIANTS.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XDG_CACHE_HOME", cache_home(root))
            if variant:
                variant(mp)
            run_scenario(scenario, root / "reports" / name, root / "work", progress=lambda line: None)
        out[name] = root / "reports" / name
    return out


def compare(capsys, *args):
    code = main(["compare", *map(str, args)])
    return code, capsys.readouterr()


def test_two_runs_of_the_unchanged_engine_pass(runs, capsys):
    code, out = compare(capsys, runs["base"], runs["again"], "--fail-on", SAME)
    assert code == 0, out.out
    assert "PASSED: no regression" in out.out


def test_a_slower_reader_fails_on_speedup_over_naive(runs, capsys):
    code, out = compare(capsys, runs["base"], runs["slow"], "--fail-on", EASY)
    assert code == 1
    assert "shakespeare-opt: speedup_over_naive (geometric mean over 2 configurations) fell from" in out.out
    assert "bytes_per_token" not in out.out.split("REGRESSED")[1]  # the same reads, only slower


def test_a_slower_reader_is_further_from_the_machines_bound_and_compare_gates_on_it(runs, capsys):
    code, out = compare(capsys, runs["base"], runs["slow"], "--fail-on", "bound_ratio:50%")
    assert code == 1
    assert "shakespeare-opt: bound_ratio (geometric mean over 3 configurations) grew from" in out.out


def test_a_more_io_hungry_engine_fails_on_bytes_per_token(runs, capsys):
    code, out = compare(capsys, runs["base"], runs["hungry"], "--fail-on", EASY)
    assert code == 1
    findings = out.out.split("REGRESSED")[1]
    assert "shakespeare-opt/predictor+windowing: bytes_per_token grew from" in findings
    assert "counters are deterministic: bytes_per_token: must not grow" in findings
    assert "shakespeare-opt/predictor: bytes_per_token" not in findings  # no window there: nothing to forget


def test_a_lossy_engine_fails_on_verdicts_naming_the_failing_checks(runs, capsys):
    code, out = compare(capsys, runs["base"], runs["lossy"], "--fail-on", EASY)
    assert code == 1
    assert ("shakespeare-opt/predictor: agreement with dense inference broke (approximate tolerance): "
            "max_abs_logit_diff") in out.out
    assert "bytes_per_token grew" not in out.out  # it reads less: only the verdict catches it


def test_json_holds_every_comparison_and_its_findings(runs, capsys, tmp_path):
    code, _ = compare(capsys, runs["base"], runs["again"], runs["hungry"], "--fail-on", SAME,
                      "--json", tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert code == 1 and data["passed"] is False
    assert [c["passed"] for c in data["comparisons"]] == [True, False]
    hungry = data["comparisons"][1]
    assert {r["metric"] for r in hungry["regressions"]} >= {"bytes_per_token"}
    row = next(r for r in hungry["rows"] if r["configuration"] == "predictor+windowing")
    assert row["metrics"]["bytes_per_token"]["ratio"] < 1  # oriented so that > 1 is better


def slowed_copy(run: Path, to: Path, factor: float) -> Path:
    """The run with every configuration but naive `factor` times as fast: its speedups over naive scaled by it."""
    shutil.copytree(run, to)
    for path in (to / "records").rglob("*.json"):
        rec = json.loads(path.read_text())
        if rec.get("kind") == "configuration" and rec["configuration"] != "naive" and rec.get("metrics"):
            rec["metrics"]["tokens_per_s"] *= factor
            path.write_text(json.dumps(rec))
    return to


@pytest.mark.parametrize("factor, passed", [(0.55, True), (0.45, False), (1.5, True)])
def test_a_timed_rule_fails_only_where_the_ratio_fell_past_its_tolerance(runs, capsys, tmp_path, factor, passed):
    code, out = compare(capsys, runs["base"], slowed_copy(runs["base"], tmp_path / "slowed", factor), "--fail-on",
                        "speedup_over_naive:50%")
    assert code == (0 if passed else 1), out.out
    assert ("speedup_over_naive (geometric mean over 2 configurations) fell" in out.out) is not passed


def test_a_raw_time_rule_is_refused_between_different_machines(runs, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["again"], other)
    index = json.loads((other / "run.json").read_text())
    index["machine"]["cpu"] = "another CPU"
    (other / "run.json").write_text(json.dumps(index))
    code, out = compare(capsys, runs["base"], other, "--fail-on", "tokens_per_s:10%")
    assert code == 2 and "tokens_per_s: a raw time, and the runs come from different machines" in out.err
    assert compare(capsys, runs["base"], runs["again"], "--fail-on", "tokens_per_s:90%")[0] == 0  # same machine


def edited_copy(run: Path, to: Path, edit) -> Path:
    shutil.copytree(run, to)
    index = json.loads((to / "run.json").read_text())
    edit(index)
    (to / "run.json").write_text(json.dumps(index))
    return to


def test_records_of_another_scenario_are_refused(runs, capsys, tmp_path):
    other = edited_copy(runs["again"], tmp_path / "other", lambda i: i["scenario"]["raw"]["engine"].update(window=9))
    code, out = compare(capsys, runs["base"], other)
    assert code == 2 and "records of different scenarios are not compared" in out.err and "engine" in out.err


def test_records_of_another_schema_are_refused(runs, capsys, tmp_path):
    old = edited_copy(runs["again"], tmp_path / "old", lambda i: i.pop("schema"))
    code, out = compare(capsys, runs["base"], old)
    assert code == 2 and "records of schema none" in out.err and str(old / "run.json") in out.err


def test_an_interrupted_run_without_its_index_is_refused(runs, capsys, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(runs["again"], partial)
    (partial / "run.json").unlink()
    code, out = compare(capsys, runs["base"], partial)
    assert code == 2 and "no run.json: not a finished run folder" in out.err


def test_a_configuration_set_beside_another_fio_engine_is_noted(runs, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["again"], other)
    for path in (other / "records").glob("*/*.json"):
        record = json.loads(path.read_text())
        if record.get("fio_reference"):
            ref = record["fio_reference"]
            ref["ioengine"] = {"psync": "io_uring", "io_uring": "psync"}[ref["ioengine"]]
            path.write_text(json.dumps(record))
    assert "configurations set beside another fio engine (baseline " in compare(capsys, runs["base"], other)[1].out
    assert "another fio engine" not in compare(capsys, runs["base"], runs["again"])[1].out


def test_a_configuration_timed_alternately_with_naive_in_one_run_only_is_noted(runs, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["again"], other)
    path = other / "records" / "shakespeare-opt" / "predictor.json"  # as if it read every neuron
    record = json.loads(path.read_text())
    record["alternated_with_naive"] = {"tokens": 4, "speedup_over_naive": 1.5, "naive": record["metrics"]}
    path.write_text(json.dumps(record))
    out = compare(capsys, runs["base"], other)[1].out
    assert "1 configurations timed alternately with naive in one run only (shakespeare-opt/predictor)" in out
    assert "alternately" not in compare(capsys, runs["base"], runs["again"])[1].out


def test_rules_parse_counters_tolerances_and_refuse_unknown_names():
    rules = parse_rules("counters,verdicts,speedup_over_naive:15%,fio_fraction")
    assert [(r.metric, r.tolerance) for r in rules] == [
        ("bytes_per_token", 0.0), ("reads_per_token", 0.0), ("neurons_per_token", 0.0), ("verdicts", 0.0),
        ("speedup_over_naive", 0.15), ("fio_fraction", 0.10)]
    assert parse_rules("none") == []
    with pytest.raises(CompareError, match="unknown metric 'latency'"):
        parse_rules("latency:5%")
    with pytest.raises(CompareError, match="verdicts take no tolerance"):
        parse_rules("verdicts:5%")


@pytest.fixture(scope="module")
def tmpfs_run(runs, tmp_path_factory):
    """The same scenario with its flash layouts on tmpfs: another 'machine' as far as storage goes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or storage_of(shm).filesystem != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    root = tmp_path_factory.mktemp("tmpfs-run")
    work = Path(f"/dev/shm/flashbench-test-{root.name}")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
            run_scenario(load(str(runs["base"].parent.parent / "tiny.toml")), root / "shm", work,
                         progress=lambda line: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root / "shm"


def test_hardware_report_has_a_row_per_machine_and_labels_tmpfs(runs, tmpfs_run, capsys, tmp_path):
    assert main(["hardware", str(runs["base"]), str(tmpfs_run), "--out", str(tmp_path / "hw")]) == 0
    md = (tmp_path / "hw" / "report.md").read_text()
    assert "| base |" in md and "| shm [in memory] |" in md
    assert "tmpfs): in memory, not a storage device" in md
    for section in ("## Machines", "## Geometric means of normalised ratios", "### shakespeare-opt: tokens/s"):
        assert section in md
    assert (tmp_path / "hw" / "bandwidth.png").stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "hw" / "report.html").read_text()
    csv = (tmp_path / "hw" / "comparison.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * 3  # two runs x three configurations


def test_hardware_report_refuses_runs_of_different_scenarios(runs, capsys, tmp_path):
    other = edited_copy(runs["again"], tmp_path / "other", lambda i: i["scenario"].update(name="else"))
    code = main(["hardware", str(runs["base"]), str(other), "--out", str(tmp_path / "hw")])
    assert code == 2 and "records of different scenarios are not compared" in capsys.readouterr().err


def test_the_committed_smoke_baseline_is_whole_and_matches_the_smoke_scenario():
    baseline = load_records(suite.SUITE_DIR / "baselines" / "smoke")
    scenario = tomllib.loads((SCENARIOS_DIR / "smoke.toml").read_text())
    assert baseline.index["scenario"]["raw"] == scenario, "smoke.toml changed: refresh suite/baselines/smoke"
    assert len(baseline.configurations) == 2 * len(matrix())
    assert all(r["status"] == "measured" for r in baseline.configurations.values())
