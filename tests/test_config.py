import json

import pytest

from flashbench.reference import CheckpointError, ModelConfig
from tests.conftest import tiny_config


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_config_survives_a_round_trip_through_hf_config_json(arch):
    config = tiny_config(arch)
    assert ModelConfig.from_hf(config.to_hf()) == config


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
