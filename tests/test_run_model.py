"""`flashbench run --model PATH [--text FILE]`: a user's checkpoint, with its own tokenizer and text, through the
matrix, records and report as the embedded models go; a SiLU one with its sparse configurations not applicable."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from flashbench import suite
from flashbench.harness.cli import main
from tests.exactness import within_exact_bound
from tests.families import write_family_checkpoint

from .tiny import scenario

TECHNIQUES = 'techniques = ["hybrid", "predictor", "quantization"]\npeers = []\npredictor_tokens = 4096'


@pytest.fixture
def run(monkeypatch, tmp_path, cache_home):
    """`flashbench run --model` with a small scenario: (exit code, the run folder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
    (tmp_path / "s.toml").write_text(scenario("model", tokens=12, engine='storage_dtype = "checkpoint"',
                                              model=TECHNIQUES))

    def go(*args: str, run_id: str = "r"):
        code = main(["run", "--scenario", str(tmp_path / "s.toml"), "--reports", str(tmp_path / "reports"),
                     "--run-id", run_id, "--work", str(tmp_path / "work"), *args])
        return code, tmp_path / "reports" / run_id

    return go


def records(run_dir: Path) -> dict[str, dict]:
    index = json.loads((run_dir / "run.json").read_text())
    recs = [json.loads((run_dir / "records" / rel).read_text()) for rel in index["records"]]
    return {r.get("configuration", r["kind"]): r for r in recs}


@pytest.fixture(scope="module")
def bpe_opt(tmp_path_factory):
    return write_family_checkpoint("opt", tmp_path_factory.mktemp("bpe-opt") / "ckpt")


def test_a_users_checkpoint_runs_end_to_end_on_its_tokenizer_and_text_training_its_predictor_once(
        run, bpe_opt, tmp_path, capsys):
    text = tmp_path / "mine.txt"
    text.write_text(suite.heldout_text()[20000:30000])
    code, run_dir = run("--model", str(bpe_opt), "--text", str(text), "--train-text", str(text))
    assert code == 0
    recs = records(run_dir)
    model = recs["model"]
    assert model["texts"]["heldout"]["text"] == str(text) and model["texts"]["train"]["text"] == str(text)
    assert 0 < model["texts"]["heldout"]["tokens"] < len(text.read_text())  # BPE: fewer tokens than characters
    assert "tokenizer.json (512 tokens" in model["tokenizer"]
    assert recs["naive"]["agreement"]["passed"], "stored as the checkpoint is, naive reads are exact"
    assert {r["status"] for r in recs.values() if r["kind"] == "configuration"} == {"measured"}
    assert f"held-out text {text}" in (run_dir / "report.md").read_text()
    assert "training one per layer" in capsys.readouterr().out
    assert run("--model", str(bpe_opt), "--text", str(text), "--train-text", str(text), run_id="again")[0] == 0
    assert "training one per layer" not in capsys.readouterr().out, "the trained predictor is cached"


def test_a_silu_checkpoints_sparse_configurations_are_recorded_not_applicable_with_the_reason(run, silu_checkpoint):
    code, run_dir = run("--model", str(silu_checkpoint))
    assert code == 0
    recs = records(run_dir)
    assert recs["naive"]["status"] == "measured" and recs["naive"]["agreement"]["passed"]
    assert recs["quantization"]["status"] == "measured"
    for name in ("hybrid", "predictor", "hybrid+predictor"):
        assert recs[name]["status"] == "not-applicable"
        assert "SiLU FFN: no activation is exactly zero" in recs[name]["error"]
        assert "needs 'threshold' on" in recs[name]["error"]


def run_thresholded(tmp_path, checkpoint: Path, target: float, source: str = "predictor",
                    techniques: str = '"threshold", "hybrid", "predictor", "windowing"') -> dict[str, dict]:
    """A SiLU checkpoint through the matrix of `techniques` at `target` sparsity."""
    (tmp_path / "t.toml").write_text(scenario(
        "model", tokens=12, engine=f'storage_dtype = "checkpoint"\nthreshold = {target}',
        model=f'techniques = [{techniques}]\npeers = []\npredictor_tokens = 4096\nsource = "{source}"'))
    assert main(["run", "--scenario", str(tmp_path / "t.toml"), "--reports", str(tmp_path / "reports"),
                 "--run-id", f"t{target}", "--work", str(tmp_path / "work"), "--model", str(checkpoint)]) == 0
    return records(tmp_path / "reports" / f"t{target}")


def test_a_silu_checkpoints_sparse_configurations_run_with_threshold_at_the_approximate_tier(
        silu_checkpoint, monkeypatch, tmp_path, cache_home):
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
    recs = run_thresholded(tmp_path, silu_checkpoint, 0.5)
    calibrated = recs["model"]["threshold"]
    assert calibrated["target_sparsity"] == 0.5 and len(calibrated["thresholds"]) == 2
    for name in ("threshold", "threshold+hybrid", "threshold+predictor", "threshold+hybrid+predictor+windowing"):
        assert recs[name]["status"] == "measured" and recs[name]["agreement"]["tolerance"] == "approximate", name
        assert recs[name]["engine"]["threshold"] == 0.5
    assert recs["naive"]["agreement"]["tolerance"] == "exact" and recs["naive"]["agreement"]["passed"]
    assert "all-but:threshold" in recs["naive"]["sections"]  # nothing sparse without it: the naive set
    neurons = lambda n: recs[n]["metrics"]["per_token"]["neurons"]  # noqa: E731
    assert neurons("threshold+predictor") < 0.8 * neurons("threshold")  # the predicted set, not every neuron


def test_with_the_oracle_a_silu_checkpoints_gate_rows_stay_in_dram_and_only_up_and_down_are_read(
        silu_checkpoint, monkeypatch, tmp_path, cache_home):
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
    recs = run_thresholded(tmp_path, silu_checkpoint, 0.5, source="oracle",
                           techniques='"threshold", "predictor"')
    sparse = recs["threshold+predictor"]
    assert sparse["layout"]["name"].endswith("-gate-resident") and sparse["dram"]["source"] == 0
    assert not recs["naive"]["layout"]["gate_resident"]  # the baseline keeps every weight on flash
    assert "kept in DRAM (CATS)" in sparse["activation_source"]


def test_a_threshold_set_far_too_high_is_caught_by_the_verdicts(silu_checkpoint, monkeypatch, tmp_path, cache_home):
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
    recs = run_thresholded(tmp_path, silu_checkpoint, 0.99, source="oracle", techniques='"threshold"')
    assert recs["threshold"]["status"] == "measured" and recs["threshold"]["agreement"]["passed"] is False


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
                    reason="llama-cpp-python and gguf are not installed: `make peers` builds them (about 2.5 min)")
@pytest.mark.skipif(os.geteuid() != 0, reason="the peers' memory cgroup needs root")
def test_llama_cpp_on_a_silu_checkpoint_is_a_second_check_of_dense_inference(silu_checkpoint, monkeypatch, tmp_path,
                                                                              cache_home):
    """Stored in float32 and converted so, llama.cpp's logits stay within the exact bound of ours, in the record
    and the report."""
    monkeypatch.setenv("XDG_CACHE_HOME", cache_home(tmp_path))
    (tmp_path / "s.toml").write_text(scenario("model", tokens=12, engine='storage_dtype = "checkpoint"',
                                              model='techniques = []\npeers = ["llama.cpp"]'))
    assert main(["run", "--scenario", str(tmp_path / "s.toml"), "--reports", str(tmp_path / "reports"),
                 "--run-id", "r", "--work", str(tmp_path / "work"), "--model", str(silu_checkpoint)]) == 0
    recs = records(tmp_path / "reports" / "r")
    peer, bound = recs["peer"], recs["model"]["dense"]["logit_bound"]
    assert peer["status"] == "measured" and peer["speed_only"] is None and peer["model_file"].endswith("float32.gguf")
    assert peer["dense_check"]["tokens"] == 11 and peer["dense_check"]["max_abs_logit_diff"] <= bound
    assert "llama.cpp's teacher-forced logits against dense inference (float32)" in (
        tmp_path / "reports" / "r" / "report.md").read_text()


@pytest.mark.parametrize("content, problem", [(b"", "empty"), (b"\xff\xfe bad", "not UTF-8 text")])
def test_a_bad_text_file_exits_2_naming_it_and_leaves_no_run(run, bpe_opt, tmp_path, capsys, content, problem):
    text = tmp_path / "bad.txt"
    text.write_bytes(content)
    code, run_dir = run("--model", str(bpe_opt), "--text", str(text))
    assert code == 2 and f"{text}: {problem}" in capsys.readouterr().err
    assert not run_dir.exists()


def test_text_options_without_a_model_are_refused(run, tmp_path, capsys):
    assert run("--text", str(tmp_path / "t.txt"))[0] == 2
    assert "--text, --train-text and --source go with --model" in capsys.readouterr().err


@pytest.mark.exactness
def test_a_streamed_dense_model_is_the_dense_model(tiny_checkpoint, tmp_path):
    """dense = "streamed" (automatic where the weights would not fit): the reference, the activation counts and a
    predictor's training run on the naive flash engine, layer by layer, and give dense inference's results."""
    import numpy as np

    from flashbench.harness.main_job import checkpoint_model
    from flashbench.harness.scenario import ModelSpec

    def prepare(dense: str):
        spec = ModelSpec(name=str(tiny_checkpoint), tokens=24, greedy_prompt=8, greedy_tokens=8,
                         counts_tokens=2048, source="oracle", dense=dense)
        return checkpoint_model(spec, tmp_path / dense, progress=lambda _: None)

    (memory, _), (streamed, info) = prepare("memory"), prepare("streamed")
    assert info["dense"]["streamed"].startswith("streamed: the naive flash engine over the unbundled-float32 layout")
    assert within_exact_bound(streamed.reference.logits, memory.reference.logits)
    assert np.abs(streamed.neuron_counts - memory.neuron_counts).sum() <= 1e-3 * memory.neuron_counts.sum()
