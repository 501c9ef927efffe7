import json

import pytest

from flashbench.reference import CheckpointError, ModelConfig
from tests.conftest import tiny_config


FAMILY_CONFIGS = {
    "llama-silu": dict(activation="silu", attention_bias="all", rope_theta=500000.0),
    "mistral": dict(model_type="mistral", activation="silu", sliding_window=200, max_positions=200),
    "qwen2": dict(model_type="qwen2", activation="silu", attention_bias="qkv", rope_theta=1e6, tie_embeddings=True),
}


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_config_survives_a_round_trip_through_hf_config_json(arch):
    config = tiny_config(arch)
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_each_llama_family_survives_a_round_trip_through_hf_config_json(family):
    config = tiny_config("llama", **FAMILY_CONFIGS[family])
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_transformers_5_rope_parameters_give_the_rope_theta():
    hf = tiny_config("llama").to_hf()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert ModelConfig.from_hf(hf).rope_theta == 1e6


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE type 'llama3' is not supported"),
    ({"head_dim": 32}, "head_dim 32 != hidden_size / num_attention_heads"),
    ({"mlp_bias": True}, "FFN biases"),
])
def test_llama_features_the_suite_does_not_compute_are_refused_saying_which(change, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf(tiny_config("llama").to_hf() | change)


def test_unsupported_model_type_is_refused_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'gpt2'"):
        ModelConfig.load(tmp_path)


def test_missing_config_json_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.load(tmp_path)


def test_malformed_config_json_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelConfig.load(tmp_path)


def test_missing_required_key_is_named(tmp_path):
    hf = tiny_config("opt").to_hf()
    del hf["ffn_dim"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="missing required key 'ffn_dim'"):
        ModelConfig.load(tmp_path)


def test_heads_that_do_not_divide_the_hidden_size_are_refused():
    hf = tiny_config("llama").to_hf() | {"num_attention_heads": 5}
    with pytest.raises(CheckpointError, match="not divisible"):
        ModelConfig.from_hf(hf)


def test_a_list_of_eos_ids_ends_generation_at_the_first():
    assert ModelConfig.from_hf(tiny_config("llama").to_hf() | {"eos_token_id": [7, 9]}).eos_token_id == 7
