"""The independent check of the dense path: transformers on the same checkpoint, fully offline."""

import pytest
import torch

from flashbench import suite
from flashbench.harness.hf_check import compare_with_transformers
from flashbench.reference import ModelConfig
from flashbench.reference.tokenizer import Tokenizer
from flashbench.suite.models.byte_tokenizer import encode
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


def test_every_model_family_matches_transformers(family_checkpoint):
    """OPT, Llama (ReLU and SiLU, with biases), Mistral (sliding window) and Qwen2 (q/k/v biases, tied, rope
    theta 1e6) as transformers' own classes make them, on text their own tokenizer makes."""
    config = ModelConfig.load(family_checkpoint)
    prompt = Tokenizer.load(family_checkpoint, config).encode(suite.heldout_text())[:128]
    check = compare_with_transformers(family_checkpoint, prompt, decode_steps=32)
    note(check.max_abs_diff, check.tolerance, torch.float32)
    assert check.passed, check
