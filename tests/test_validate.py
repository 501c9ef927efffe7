"""`flashbench validate`: the shipped SUTs come out VALID, each deliberately broken SUT is caught by the check
meant for it (tests/broken_suts.py, tests/broken_protocol.py), and a SUT that cannot be run is exit 2 with a message naming what it did."""

import json
import sys
from pathlib import Path

import pytest
import torch

from flashbench.harness.cli import main
from flashbench.harness.sut import SUTError, decode_logits, encode_logits
from flashbench.harness.validate import load_cases

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
        code = main(["validate", "--cases", str(cases), *args] + (["--case", case] if case else []))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def failing(out: str) -> list[str]:
    return [line.split(":")[0].strip().removeprefix("FAIL ") for line in out.splitlines()
            if line.strip().startswith("FAIL ")]


def test_reference_in_process_is_valid_on_every_case(validate, tmp_path):
    code, out, _ = validate("--sut", "flashbench.harness.adapters:ReferenceSUT", "--json",
                            str(tmp_path / "v.json"), case=None)
    assert code == 0, out
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["status"] == "valid" and len(result["cases"]) == 3
    names = {c["name"] for c in result["cases"][0]["subchecks"]}
    assert {"accuracy.max_abs_logit_diff", "audit.determinism", "audit.performance_matches_accuracy",
            "audit.memory", "audit.storage"} <= names
    assert result["cases"][0]["performance"]["sut_reported"]["bytes_read"] > 0


def test_reference_through_the_protocol_is_valid(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} flashbench.harness.adapters:ReferenceSUT",
                            case="llama-exact")
    assert code == 0, out
    assert "PASS audit.storage" in out and "VALID: 1 case(s), 9 sub-checks, all passed" in out


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
    assert not [f for f in failing(out) if f.startswith("audit.")]


def test_a_sut_returning_stale_logits_fails_accuracy(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:StaleLogits")
    assert code == 1
    assert {"accuracy.top1_agreement", "accuracy.greedy_match"} <= set(failing(out))


def test_a_sut_ignoring_its_dram_budget_fails_the_memory_audit(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:IgnoresBudget")
    assert code == 1 and failing(out) == ["audit.memory"]
    assert "killed by the kernel for holding more than" in out or "not capped" in out  # the cgroup needs root


def test_a_sut_serving_weights_from_a_page_cached_copy_fails_the_storage_audit(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:PageCachedCopy")
    assert code == 1
    assert failing(out) == ["audit.storage"]
    assert "MiB it claims to have read (at least 90%)" in out


def test_a_dense_sut_claiming_flash_fails_the_storage_audit(validate):
    code, out, _ = validate("--sut-cmd", f"{SERVE} tests.broken_suts:DenseClaimingFlash")
    assert code == 1 and failing(out) == ["audit.storage"]
    assert "claims flash inference but" in out


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
