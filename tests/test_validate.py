"""`flashbench validate`: the shipped SUTs come out VALID, each deliberately broken SUT is caught by the check
meant for it (tests/broken_suts.py, tests/broken_protocol.py), and a SUT that cannot be run is exit 2 with a message naming what it did."""

import json
import sys
from pathlib import Path

import pytest
import torch

from flashbench.harness.cli import main
from flashbench.harness.sut import SUTError, decode_logits, encode_logits
from flashbench.harness.validate import load_cases, performance_offset

REPO = Path(__file__).resolve().parents[1]
SERVE = f"{sys.executable} -m flashbench.harness.serve"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # `python -m ... tests.broken_suts:X` imports from the repository
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the reference SUT's converted layouts


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """The shipped cases on 24 tokens instead of 64: the same checks, in less time."""
    path = tmp_path_factory.mktemp("cases") / "cases.toml"
    shipped = load_cases()
    path.write_text("".join(f'[[cases]]\nname = "{c.name}"\nmodel = "{c.model}"\ntolerance = "{c.tolerance}"\n'
                            f"dram_budget = {c.dram_budget}\ntokens = 24\noffset = {c.offset}\n"
                            f"greedy_prompt = 8\ngreedy_tokens = 8\ndeterminism_prompt = 8\n" for c in shipped))
    return path


@pytest.fixture
def validate(capsys, cases):
    """`flashbench validate` on the short cases: (exit code, stdout, stderr)."""

    def run(*args, case="opt-exact"):
        code = main(["validate", "--cases", str(cases), "--seed", "7", *args] + (["--case", case] if case else []))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def failing(out: str) -> list[str]:
    return [line.split(":")[0].strip().removeprefix("FAIL ") for line in out.splitlines()
            if line.strip().startswith("FAIL ")]


@pytest.mark.exactness
def test_reference_in_process_is_valid_on_every_case(validate, tmp_path):
    code, out, _ = validate("--sut", "flashbench.harness.adapters:ReferenceSUT", "--json",
                            str(tmp_path / "v.json"), case=None)
    assert code == 0, out
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["status"] == "valid" and len(result["cases"]) == 3
    names = {c["name"] for c in result["cases"][0]["subchecks"]}
    assert {"accuracy.max_abs_logit_diff", "audit.determinism", "audit.performance_accuracy",
            "audit.memory", "audit.storage"} <= names
    assert result["cases"][0]["performance"]["sut_reported"]["bytes_read"] > 0


def test_reference_through_the_protocol_is_valid(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} flashbench.harness.adapters:ReferenceSUT",
                            case="llama-exact")
    assert code == 0, out
    assert "PASS audit.storage" in out and "VALID: 1 case(s), 9 sub-checks, all passed" in out
    assert "storage served what it claims" in out


@pytest.mark.exactness
def test_transformers_is_valid(validate):
    code, out, _ = validate("--sut", "flashbench.harness.adapters:TransformersSUT")
    assert code == 0, out
    assert "claims dense inference (no flash)" in out


def test_the_example_sut_is_valid(validate):
    code, out, _ = validate("--sut-cmd", f"{sys.executable} suite/conformance/example_sut.py")
    assert code == 0, out


def test_a_sut_dropping_active_neurons_fails_accuracy(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:DropsNeurons")
    assert code == 1 and "INVALID" in out
    assert "accuracy.max_abs_logit_diff" in failing(out) and "accuracy.mean_kl" in failing(out)
    assert [f for f in failing(out) if f.startswith("audit.")] == ["audit.performance_accuracy"]


def test_a_sut_returning_stale_logits_fails_accuracy(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:StaleLogits")
    assert code == 1
    assert {"accuracy.top1_agreement", "accuracy.greedy_match"} <= set(failing(out))


def test_a_sut_ignoring_its_dram_budget_fails_the_memory_audit(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:IgnoresBudget")
    assert code == 1 and failing(out) == ["audit.memory"]
    assert "killed by the kernel for holding more than" in out or "not capped" in out  # the cgroup needs root


NOTHING_TIMED = "claims flash inference but 0.0 MiB read from storage during the timed run"


@pytest.mark.parametrize("sut, message", [
    ("PageCachedCopy", NOTHING_TIMED),  # its weights from a page-cached copy on tmpfs
    ("OverClaims", "MiB it claims to have read then (at least 90% must come from storage): reads it claims but"),
    # storage served more than it claims over the whole connection, but nothing during the timed run
    ("ReadsBeforeTheTimedRun", NOTHING_TIMED),
    ("DenseClaimingFlash", NOTHING_TIMED),  # every weight in DRAM
])
def test_a_sut_claiming_reads_storage_did_not_serve_in_the_timed_run_fails_the_storage_audit(validate, sut,
                                                                                             message):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:{sut}")
    assert code == 1 and failing(out) == ["audit.storage"]
    assert message in out


@pytest.mark.parametrize("mode, message", [
    ("crash", "exited (code 3) without answering 'prefill'; its stderr ends: simulated fatal error in the SUT"),
    ("hang", "did not answer 'prefill' within 3 s (hung?)"),
    ("malformed", "answered 'prefill' with a line that is not JSON"),
    ("wrong-shape", "'prefill': logits of shape [1, 100], expected [1, 259]"),
    ("nan", "'prefill': logits contain NaN or Inf"),
])
def test_a_sut_that_cannot_be_run_is_exit_2_with_what_it_did(validate, tmp_path, mode, message):
    code, out, err = validate("--sut-cmd", f"{sys.executable} tests/broken_protocol.py {mode}",
                              "--timeout", "3", "--json", str(tmp_path / "v.json"))
    assert code == 2
    assert "SUT COULD NOT BE RUN" in err and message in err
    assert json.loads((tmp_path / "v.json").read_text())["status"] == "could not be run"


def test_a_missing_sut_command_is_exit_2(validate):
    code, _, err = validate("--sut-cmd", "/nonexistent/sut")
    assert code == 2 and "cannot start it" in err


def test_logits_travel_as_base64_or_nested_lists():
    logits = torch.randn(3, 7)
    assert torch.equal(decode_logits(encode_logits(logits), (3, 7), "prefill"), logits)
    assert torch.equal(decode_logits({"shape": [3, 7], "values": logits.tolist()}, (3, 7), "prefill"), logits)
    with pytest.raises(SUTError, match="logits of shape \\[7\\], expected \\[3, 7\\]"):
        decode_logits(encode_logits(logits[0]), (3, 7), "prefill")


def test_the_shipped_conformance_cases_load_and_cover_both_architectures_and_tiers():
    cases = load_cases()
    assert {c.model for c in cases} == {"shakespeare-opt", "shakespeare-llama-relu"}
    assert {c.tolerance for c in cases} == {"exact", "approximate"} and all(c.tokens == 64 for c in cases)


def replays(result: dict, what: str) -> tuple[int, int]:
    """(replays before the timed run, replays during it), from the SUT's own counter `replayed_<what>`."""
    perf = result["cases"][0]["performance"]
    before, after = (perf[k][f"replayed_{what}"] for k in ("sut_reported_before", "sut_reported"))
    return before, after - before


@pytest.mark.parametrize("sut", ["--sut=tests.broken_suts:Memoizes", f"--sut-cmd={sys.executable} "
                                 "tests/memoizing_sut.py prefix"], ids=["in-process", "process"])
def test_a_memoizing_sut_is_valid_but_replays_nothing_in_the_timed_run(validate, tmp_path, sut):
    """It replays what it was asked before (the determinism audit's second prompt), but the timed run's tokens are
    new, so its memory buys it no speed there."""
    code, out, _ = validate(sut, "--json", str(tmp_path / "v.json"))
    assert code == 0, out
    result = json.loads((tmp_path / "v.json").read_text())
    assert replays(result, "prefills")[0] >= 1 and replays(result, "steps")[1] == 0


@pytest.mark.parametrize("sut", ["--sut=tests.broken_suts:ReplaysByPosition", f"--sut-cmd={sys.executable} "
                                 "tests/memoizing_sut.py position"], ids=["in-process", "process"])
def test_a_sut_replaying_the_accuracy_run_in_the_timed_run_fails_the_performance_accuracy_audit(validate, sut,
                                                                                               tmp_path):
    code, out, _ = validate(sut, "--json", str(tmp_path / "v.json"))
    assert code == 1 and failing(out) == ["audit.performance_accuracy"]
    assert replays(json.loads((tmp_path / "v.json").read_text()), "steps")[1] > 0


def test_the_performance_run_draws_held_out_tokens_clear_of_the_accuracy_runs():
    case = load_cases()[0]
    starts = {performance_offset(case, 65000, seed) for seed in range(200)}
    assert len(starts) > 150
    assert not any(case.offset - case.tokens < s < case.offset + case.tokens + case.greedy_prompt for s in starts)
    assert performance_offset(case, 65000, 3) == performance_offset(case, 65000, 3)


def test_an_exception_inside_an_in_process_sut_call_is_the_suts(validate):
    code, _, err = validate("--sut", "tests.broken_suts:RaisesInStep")
    assert code == 2 and "SUT COULD NOT BE RUN: the SUT raised RuntimeError in 'step': out of neurons" in err


def test_an_exception_in_the_harness_itself_is_a_bug_not_the_suts(monkeypatch, cases):
    from flashbench.harness import adapters, validate as validate_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a harness bug")

    monkeypatch.setattr(validate_module, "judge", broken)
    with pytest.raises(ZeroDivisionError, match="a harness bug"):
        validate_module.validate(adapters.ReferenceSUT, load_cases(cases, ["opt-exact"]), progress=lambda _: None,
                                 seed=1)


@pytest.mark.parametrize("key, value", [("tokens", 2), ("tokens", 0), ("greedy_tokens", 0), ("offset", -1),
                                        ("tokens", "64"), ("dram_budget", 0)])
def test_a_case_with_too_few_tokens_or_bad_counts_is_refused_when_it_loads(tmp_path, key, value):
    path = tmp_path / "cases.toml"
    fields = {"name": "x", "model": "shakespeare-opt", "tolerance": "exact", "dram_budget": 2.0} | {key: value}
    path.write_text("[[cases]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    with pytest.raises(ValueError, match=f"{path}: case #1"):
        load_cases(path)


@pytest.mark.parametrize("args, message", [
    (["--sut-cmd", ""], "--sut-cmd is empty: give the command that starts the SUT"),
    (["--sut-cmd", "  "], "--sut-cmd is empty"),
    ([], "give the SUT: --sut module:Class (in-process) or --sut-cmd COMMAND"),
    (["--sut", "a:B", "--sut-cmd", "x"], "give only one of --sut"),
    (["--sut", "flashbench.harness.adapters:ReferenceSUT", "--json", "/no/such/dir/v.json"],
     "--json /no/such/dir/v.json: no such folder /no/such/dir"),
])
def test_bad_validate_arguments_are_exit_2_saying_what_is_wrong(capsys, args, message):
    assert main(["validate", *args]) == 2
    assert message in capsys.readouterr().err
    assert not Path("/no/such/dir").exists()
