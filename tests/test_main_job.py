"""The main job on a small scenario: one record per configuration, verdicts, and the report built from them."""

import copy
import json

import pytest

from flashbench.harness.cli import main
from flashbench.harness.matrix import matrix
from flashbench.harness.report import _bound_table, to_markdown

from .tiny import scenario

SCENARIO = scenario("tiny", tokens=12, window=2, engine='hybrid = 0.25\nreader = "auto"',
                    model='peers = ["llama.cpp", "mmap"]\nalternate_with_naive = true')


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_home):
    root = tmp_path_factory.mktemp("main-job")
    (root / "tiny.toml").write_text(SCENARIO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", cache_home(root))  # not the user's cache
        code = main(["run", "--scenario", str(root / "tiny.toml"), "--reports", str(root / "reports"),
                     "--run-id", "r1", "--work", str(root / "work")])
    return {"code": code, "dir": root / "reports" / "r1"}


def records(run):
    index = json.loads((run["dir"] / "run.json").read_text())
    return [json.loads((run["dir"] / "records" / rel).read_text()) for rel in index["records"]]


def test_run_writes_a_record_per_configuration_plus_probe_and_model(run):
    kinds = [r["kind"] for r in records(run)]
    assert kinds.count("configuration") == len(matrix()) and kinds.count("probe") == 1 and kinds.count("model") == 1


def test_every_record_carries_machine_versions_commit_and_parameters(run):
    for r in records(run):
        assert r["machine"]["cores"] >= 1 and r["versions"]["torch"].startswith("2.13.0") and "commit" in r["git"]
        assert r["scenario"]["name"] == "tiny"
        if r["kind"] == "configuration":
            assert r["settings"]["window"] == 2 and r["engine"]["threads"] == 4 and "seeds" in r


def test_reader_auto_measures_both_backends_after_the_probe_and_every_configuration_reads_with_the_faster(run):
    recs = records(run)
    choice = next(r for r in recs if r["kind"] == "probe")["probe"]["reader_choice"]
    configurations = [r for r in recs if r["kind"] == "configuration" and r["status"] == "measured"]
    assert choice["chosen"] in ("threads", "io_uring") and choice["why"].startswith(choice["chosen"])
    if choice["bytes_s"]:  # both measured (io_uring can run here)
        assert choice["bytes_s"][choice["chosen"]] == max(choice["bytes_s"].values())
    assert configurations and all(r["settings"]["reader"] == r["engine"]["reader"] == choice["chosen"]
                                  for r in configurations)
    assert choice["why"] in (run["dir"] / "report.md").read_text()


def test_exact_configurations_pass_and_the_run_exits_0(run):
    exact = [r for r in records(run) if r.get("exact")]
    assert {r["configuration"] for r in exact} == {"naive", "hybrid", "hybrid+placement", "overlap"}
    assert all(r["agreement"]["passed"] and r["agreement"]["tolerance"] == "exact" for r in exact)
    assert run["code"] == 0


def test_counters_and_reference_are_filled_for_every_configuration(run):
    for r in records(run):
        if r["kind"] == "configuration":
            m = r["metrics"]  # 12 tokens: a 1-token prefill, then 10 decode steps
            assert r["status"] == "measured" and m["tokens"] == 10 and m["per_token"]["bytes_read"] > 0
            assert m["ms"]["io_cpu"]["mean"] > 0  # the reads' CPU time
            assert r["fio_reference"]["tool"] == "fio" and r["fio_reference"]["ratio"] > 0


def test_configurations_reading_every_neuron_carry_their_speedup_over_a_naive_sut_alternated_with_them(run):
    """`alternate_with_naive`: the hybrid's ratio to naive is of the same moments (naive's steps between its own),
    the sparse configurations' (a few tokens among many) from naive's record as before."""
    recs = {r["configuration"]: r for r in records(run) if r["kind"] == "configuration"}
    hybrid, alternated = recs["hybrid"], recs["hybrid"]["alternated_with_naive"]
    assert alternated["tokens"] == hybrid["metrics"]["tokens"] == 10
    own_s, naive_s = (alternated["tokens"] * m["harness_ms"]["mean"] for m in (hybrid["metrics"],
                                                                                alternated["naive"]))
    assert alternated["speedup_over_naive"] == pytest.approx(naive_s / own_s)
    assert alternated["naive"]["tokens"] == 10 and alternated["naive"]["ms"]["io"]["mean"] > 0  # naive's own parts
    assert recs["naive"]["alternated_with_naive"] is None and recs["predictor"]["alternated_with_naive"] is None
    assert recs["overlap"]["alternated_with_naive"] is None  # naive's steps beside it read slower (not understood)
    assert f"| {hybrid['metrics']['tokens_per_s']:.3g} | {alternated['speedup_over_naive']:.2f}x alternated |" \
        in (run["dir"] / "report.md").read_text()  # the matrix's row


def test_report_has_every_section_and_a_self_contained_html(run):
    md = (run["dir"] / "report.md").read_text()
    for section in ("## Summary", "## Storage probe", "Table 2 shape", "Table 3 shape", "### Technique matrix",
                    "### Agreement with dense inference", "### All but one", "### Latency against the machine's bound"):
        assert section in md
    assert "reads' CPU ms" in md
    html = (run["dir"] / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and 'src="http' not in html  # bandwidth, latency, bytes, bound
    csv = (run["dir"] / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + len(matrix()) and "metrics.tokens_per_s" in csv[0]


def test_the_report_says_why_a_step_came_out_under_its_bound(run):
    """A ratio under 1x means the probe is stale or unlike the reads, and the report says so by name; none, nothing."""
    bounded = [r for r in records(run) if r["kind"] == "configuration" and r.get("bound")]
    assert bounded
    assert ("Under 1x" in to_markdown(_bound_table(bounded))) == any(r["bound"]["ratio"] < 1 for r in bounded)
    fast = copy.deepcopy(bounded[0])
    fast["bound"]["ratio"] = 0.84
    text = to_markdown(_bound_table([fast] + bounded[1:]))
    assert f"Under 1x: {fast['configuration']} (0.84x)" in text and "The probe is stale" in text


def test_a_peer_that_cannot_run_is_a_labelled_not_run_record(run):
    """llama.cpp has no OPT: the run goes on, its record and the report say why; our emulation is labelled ours."""
    peer = {r["peer"]: r for r in records(run) if r["kind"] == "peer"}
    assert peer["llama.cpp"]["status"] == "not-run" and "model_type 'opt'" in peer["llama.cpp"]["reason"]
    assert peer["mmap"]["status"] == "measured" and run["code"] == 0
    md = (run["dir"] / "report.md").read_text()
    assert "llama.cpp not run: llama.cpp has no architecture" in md and "| mmap (ours) |" in md


def test_report_can_be_rebuilt_from_the_records(run, capsys):
    (run["dir"] / "report.md").unlink()
    assert main(["report", str(run["dir"])]) == 0
    assert (run["dir"] / "report.md").is_file()


def test_an_existing_run_folder_is_not_overwritten(run, capsys):
    reports = run["dir"].parent
    assert main(["run", "--reports", str(reports), "--run-id", "r1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_an_unknown_scenario_exits_2(tmp_path, capsys):
    assert main(["run", "--scenario", "nope", "--reports", str(tmp_path)]) == 2
    assert "no such scenario" in capsys.readouterr().err


def test_records_name_paths_relative_to_the_repository(run):
    """Committed records (the smoke baseline) must not carry the machine they were made on."""
    from flashbench.harness.records import REPO_ROOT

    for r in records(run):
        text = json.dumps(r)
        assert str(REPO_ROOT) + "/" not in text, r.get("configuration", r["kind"])
    model = next(r for r in records(run) if r["kind"] == "model")
    assert model["checkpoint"] == "suite/models/shakespeare-opt"


def test_a_configuration_that_cannot_fit_the_budget_is_recorded_as_such_and_the_run_goes_on(tmp_path, cache_home):
    (tmp_path / "s.toml").write_text(scenario("tight", tokens=8, model='techniques = ["hybrid"]\npeers = []\n'
                                              'dram_budget = 0.01\nengine_within_budget = true'))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
        code = main(["run", "--scenario", str(tmp_path / "s.toml"), "--reports", str(tmp_path / "reports"),
                     "--run-id", "t", "--work", str(tmp_path / "work")])
    recs = {r.get("configuration"): r for r in records({"dir": tmp_path / "reports" / "t"})}
    assert code == 0 and {recs["naive"]["status"], recs["hybrid"]["status"]} == {"does-not-fit"}
    assert "DRAM budget" in recs["hybrid"]["error"] and recs["hybrid"]["dram_budget"] > 0
