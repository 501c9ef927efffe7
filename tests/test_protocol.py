"""suite/conformance/PROTOCOL.md is what an outsider builds a SUT from: its table, its order of requests and its
limits must be what the harness does, and the example SUT must answer what the table says."""

import json
import re
import subprocess
import sys

import pytest
import torch

from flashbench import suite
from flashbench.harness.adapters import ReferenceSUT
from flashbench.harness.agreement import APPROXIMATE, LOGIT_ULPS, logit_bound
from flashbench.harness.validate import load_cases, validate
from flashbench.suite.models.byte_tokenizer import BOS

PROTOCOL = (suite.SUITE_DIR / "conformance" / "PROTOCOL.md").read_text()
EXAMPLE = suite.SUITE_DIR / "conformance" / "example_sut.py"


def table_rows(first_header: str) -> list[list[str]]:
    """The rows of the markdown table whose first header cell is `first_header`, as lists of cells."""
    lines = PROTOCOL.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def documented_ops() -> dict[str, list[str]]:
    """op -> the answer fields the table requires (none where it says they are optional)."""
    ops = {}
    for op, _request, answer in table_rows("op"):
        ops[op.strip("`")] = [] if "optional" in answer else re.findall(r"^`(\w+)`|\| `(\w+)`", "| " + answer)
        ops[op.strip("`")] = [a or b for a, b in ops[op.strip("`")]]
    return ops


def test_the_example_sut_answers_every_documented_op_with_the_documented_fields():
    ops = documented_ops()
    assert list(ops) == ["hello", "load", "prefill", "step", "counters", "close"]
    requests = [{"op": "hello", "protocol": 1},
                {"op": "load", "checkpoint": str(suite.model_path("shakespeare-opt")), "dram_budget": 1 << 30,
                 "tolerance": "exact"},
                {"op": "prefill", "tokens": [BOS, 65, 66]}, {"op": "step", "token": 67}, {"op": "counters"},
                {"op": "close"}]
    lines = "".join(json.dumps({"id": i} | r) + "\n" for i, r in enumerate(requests, 1))
    out = subprocess.run([sys.executable, str(EXAMPLE)], input=lines, capture_output=True, text=True, timeout=300)
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and len(answers) == len(requests), out.stderr
    for request, answer in zip(requests, answers):
        assert answer["ok"] is True and answer["id"] == requests.index(request) + 1
        assert set(ops[request["op"]]) <= set(answer), (request["op"], answer.keys())
    assert answers[2]["logits"]["shape"] == [3, 259] and answers[3]["logits"]["shape"] == [259]


def test_the_documented_limits_are_the_harness_limits():
    rows = {cells[0].split()[0].strip("`"): cells for cells in table_rows("check")}
    number = lambda cell: float(re.search(r"[\d.]+", cell.replace("%", "")).group())  # noqa: E731
    assert number(rows["max_abs_logit_diff"][2]) == APPROXIMATE.max_abs_logit_diff
    assert number(rows["mean_kl"][2]) == APPROXIMATE.max_mean_kl
    assert number(rows["top1_agreement"][2]) / 100 == APPROXIMATE.min_top1_agreement
    assert number(rows["perplexity_ratio"][2]) == APPROXIMATE.max_perplexity_ratio
    assert number(rows["greedy_match"][2]) / 100 == APPROXIMATE.min_greedy_match
    assert f"eps = {LOGIT_ULPS[torch.float32]} x 2^-23 x L" in PROTOCOL
    assert f"eps = {logit_bound(torch.float32, 32):.1e}".replace("e-0", "e-") in PROTOCOL


class Recording(ReferenceSUT):
    """The reference SUT, noting each request as PROTOCOL.md names it."""

    log: list[str] = []

    def hello(self):
        self.log.append("hello")
        return super().hello()

    def load(self, checkpoint, dram_budget, tolerance):
        self.log.append("load")
        return super().load(checkpoint, dram_budget, tolerance)

    def prefill(self, tokens):
        self.log.append(f"prefill {len(tokens)}" + (" bos" if tokens[0] == BOS else ""))
        return super().prefill(tokens)

    def step(self, token):
        self.log.append("step")
        return super().step(token)

    def counters(self):
        self.log.append("counters")
        return super().counters()

    def close(self):
        self.log.append("close")
        super().close()


def test_a_case_sends_the_documented_requests_in_the_documented_order(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    case = load_cases(names=["opt-exact"])[0]
    Recording.log = []
    validate(Recording, [case], progress=lambda _: None, seed=0)
    T = case.tokens
    expected = (["hello", "load", "counters", "prefill 1 bos"] + ["step"] * (T - 2)
                + [f"prefill {case.greedy_prompt} bos"] + ["step"] * (case.greedy_tokens - 1)
                + [f"prefill {case.determinism_prompt} bos"] * 2 + ["counters", "prefill 1 bos"] + ["step"] * (T - 2)
                + ["counters", "close"])
    assert Recording.log == expected


@pytest.mark.parametrize("question", [
    "model.safetensors", "257", "cumulative since `load`", "is a mean", "three times in a case",
    "anywhere but the checkpoint folder", "+ `dram_budget` +\n  64 MiB",
])
def test_the_protocol_answers_what_an_outsider_asked(question):
    assert question in PROTOCOL
