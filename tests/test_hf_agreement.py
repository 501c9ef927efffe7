"""The independent check of the dense path: transformers on the same checkpoint, fully offline."""

import pytest

from flashbench import suite
from flashbench.harness.hf_check import compare_with_transformers
from flashbench.reference.tokenizer import encode

pytest.importorskip("transformers")
PROMPT = encode(suite.heldout_text())[:128]


def test_random_checkpoints_match_transformers(tiny_checkpoint):
    check = compare_with_transformers(tiny_checkpoint, PROMPT, decode_steps=32)
    assert check.max_abs_diff <= 1e-4, check


@pytest.mark.parametrize("name", suite.EMBEDDED_MODELS)
def test_embedded_models_match_transformers(name):
    check = compare_with_transformers(suite.model_path(name), PROMPT, decode_steps=32)
    assert check.prefill_tokens == 128 and check.decode_steps == 32
    assert check.max_abs_diff <= 1e-4, check
