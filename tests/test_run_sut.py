"""`flashbench run --sut/--sut-cmd`: any engine's own technique matrix, measured through the SUT interface with the
records, report, verdicts and `compare` of the reference engine's."""

import json
import os
import sys
from pathlib import Path

import pytest

from flashbench.harness.adapters import TransformersSUT
from flashbench.harness.cli import main

from .tiny import scenario

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = f"{sys.executable} suite/conformance/example_sut.py"


@pytest.fixture
def run(monkeypatch, tmp_path, cache_home):
    """`flashbench run` of a small scenario with the given SUT arguments: (exit code, the run folder)."""
    monkeypatch.chdir(REPO)  # tests.broken_suts imports from the repository
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
    (tmp_path / "s.toml").write_text(scenario("sut", tokens=12, model="peers = []"))

    def go(*sut: str, run_id: str = "r"):
        code = main(["run", "--scenario", str(tmp_path / "s.toml"), "--reports", str(tmp_path / "reports"),
                     "--run-id", run_id, "--work", str(tmp_path / "work"), *sut])
        return code, tmp_path / "reports" / run_id

    return go


def configurations(run_dir: Path) -> dict[str, dict]:
    index = json.loads((run_dir / "run.json").read_text())
    recs = [json.loads((run_dir / "records" / rel).read_text()) for rel in index["records"]]
    return {r["configuration"]: r for r in recs if r["kind"] == "configuration"}


def test_run_measures_a_suts_own_matrix_with_records_report_and_compare(run, capsys):
    code, run_dir = run("--sut-cmd", EXAMPLE)
    assert code == 0
    recs = configurations(run_dir)
    assert set(recs) == {"naive", "quantization", "pruning", "quantization+pruning"}
    assert all(r["status"] == "measured" and r["sut"]["name"] == "example dense SUT" for r in recs.values())
    assert recs["naive"]["agreement"]["tolerance"] == "exact" and recs["naive"]["agreement"]["passed"]
    assert recs["quantization"]["agreement"]["tolerance"] == "approximate"
    assert recs["quantization"]["agreement"]["checks"][0]["value"] > 0  # int8 weights move the logits
    assert recs["naive"]["metrics"]["tokens"] == 10 and recs["naive"]["metrics"]["tokens_per_s"] > 0
    assert "Engine measured: example dense SUT" in (run_dir / "report.md").read_text()
    assert main(["compare", str(run_dir), str(run_dir)]) == 0
    assert "PASSED" in capsys.readouterr().out


class LogsItsSteps(TransformersSUT):
    """Declares quantization (and computes dense); logs each decode step as "<SUT's load number> <techniques>
    <token>" to the file $STEP_LOG names, so that a test sees the order of the harness's calls across SUTs."""

    loaded = 0

    def hello(self):
        return super().hello() | {"techniques": ["quantization"]}

    def load(self, checkpoint, dram_budget, tolerance, techniques=(), settings=None):
        LogsItsSteps.loaded += 1
        self.label = f"{LogsItsSteps.loaded} {'+'.join(techniques) or 'naive'}"
        return super().load(checkpoint, dram_budget, tolerance)

    def step(self, token):
        with open(os.environ["STEP_LOG"], "a") as log:
            log.write(f"{self.label} {token}\n")
        return super().step(token)


def test_with_alternate_with_naive_a_naive_sut_steps_between_the_configurations_steps_taking_turns_first(
        run, tmp_path, monkeypatch):
    (tmp_path / "s.toml").write_text(scenario("sut", tokens=12, model="peers = []\nalternate_with_naive = true"))
    monkeypatch.setenv("STEP_LOG", str(tmp_path / "steps.log"))
    code, run_dir = run("--sut", "tests.test_run_sut:LogsItsSteps")
    assert code == 0
    steps = [line.split() for line in (tmp_path / "steps.log").read_text().splitlines()]
    own = [s for s in steps if s[1] == "quantization"]
    alongside = [s for s in steps if s[1] == "naive" and s[0] != steps[0][0]]  # not the naive configuration's
    timed = own[:10]  # then the greedy continuation, the configuration's alone
    assert len(alongside) == 10 and [s[2] for s in alongside] == [s[2] for s in timed]
    turns = steps[steps.index(timed[0]) - 1:]
    expected = []
    for i, (mine, naive) in enumerate(zip(timed, alongside)):
        expected += [naive, mine] if i % 2 == 0 else [mine, naive]
    assert turns[:20] == expected
    recs = configurations(run_dir)
    assert recs["quantization"]["alternated_with_naive"]["tokens"] == 10
    assert recs["naive"]["alternated_with_naive"] is None


def test_a_sut_declaring_no_techniques_is_measured_as_the_naive_configuration_alone(run):
    code, run_dir = run("--sut", "flashbench.harness.adapters:TransformersSUT")
    assert code == 0 and set(configurations(run_dir)) == {"naive"}


def test_a_configuration_the_sut_cannot_run_is_recorded_with_its_message_and_the_run_goes_on(run):
    code, run_dir = run("--sut", "tests.broken_suts:FailsWhenQuantized")
    recs = configurations(run_dir)
    assert code == 0 and recs["naive"]["status"] == "measured"
    assert recs["quantization"]["status"] == "sut-failed" and "int8 kernels not built" in recs["quantization"]["error"]


def test_a_sut_declaring_a_technique_the_table_lacks_is_exit_2(run, capsys):
    code, _ = run("--sut", "tests.broken_suts:DeclaresAnUnknownTechnique")
    assert code == 2 and "declares techniques the table does not have: ['teleportation']" in capsys.readouterr().err
