"""The independent check of the dense path: transformers on the same checkpoint, fully offline."""

import pytest
import torch

from flashbench import suite
from flashbench.harness.hf_check import compare_with_transformers
from flashbench.reference.tokenizer import encode
from tests.exactness import note

pytest.importorskip("transformers")
pytestmark = pytest.mark.exactness
PROMPT = encode(suite.heldout_text())[:128]


def test_random_checkpoints_match_transformers(tiny_checkpoint):
    check = compare_with_transformers(tiny_checkpoint, PROMPT, decode_steps=32)
    note(check.max_abs_diff, check.tolerance, torch.float32)
    assert check.passed, check


@pytest.mark.parametrize("name", suite.EMBEDDED_MODELS)
def test_embedded_models_match_transformers(name):
    check = compare_with_transformers(suite.model_path(name), PROMPT, decode_steps=32)
    assert check.prefill_tokens == 128 and check.decode_steps == 32
    note(check.max_abs_diff, check.tolerance, torch.float32)
    assert check.passed, check
