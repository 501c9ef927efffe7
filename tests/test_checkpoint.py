import pytest
import torch
from safetensors.torch import load_file, save_file

from flashbench.reference import CheckpointError, Transformer
from flashbench.reference.checkpoint import all_finite, save_checkpoint
from tests.conftest import random_model, tiny_config


def test_saved_checkpoint_uses_transformers_names(tiny_checkpoint):
    names = load_file(str(tiny_checkpoint / "model.safetensors")).keys()
    assert any(n.startswith(("model.decoder.layers.0.fc1", "model.layers.0.mlp.gate_proj")) for n in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weights_load_back_exactly_from_every_storage_dtype(tmp_path, dtype):
    model = random_model(tiny_config("llama"))
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict(), dtype=dtype)
    loaded = Transformer.from_checkpoint(tmp_path / "ck")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(dtype).float()), name


def _corrupt(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.fixture
def checkpoint(tmp_path):
    model = random_model(tiny_config("opt"))
    return save_checkpoint(tmp_path / "ck", model.config, model.state_dict())


def test_missing_tensor_is_named(checkpoint):
    _corrupt(checkpoint, lambda t: t.pop("model.decoder.layers.1.fc2.weight"))
    with pytest.raises(CheckpointError, match="missing 1 tensors, e.g. model.decoder.layers.1.fc2.weight"):
        Transformer.from_checkpoint(checkpoint)


def test_wrong_shape_is_named_with_file_and_tensor(checkpoint):
    _corrupt(checkpoint, lambda t: t.update({"model.decoder.layers.0.fc1.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.decoder\.layers\.0\.fc1\.weight' has shape \(3, 3\)"):
        Transformer.from_checkpoint(checkpoint)


def test_nan_weights_are_refused(checkpoint):
    def poison(t):
        t["model.decoder.layers.0.fc1.weight"][5, 5] = float("nan")
    _corrupt(checkpoint, poison)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        Transformer.from_checkpoint(checkpoint)


def test_truncated_safetensors_file_is_refused(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        Transformer.from_checkpoint(checkpoint)


def test_unexpected_tensor_is_refused(checkpoint):
    _corrupt(checkpoint, lambda t: t.update({"model.decoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.decoder.extra.weight'"):
        Transformer.from_checkpoint(checkpoint)


def test_an_activation_other_than_relu_or_silu_is_refused_naming_the_key(tmp_path):
    model = random_model(tiny_config("llama"))
    save_checkpoint(tmp_path / "ck", tiny_config("llama", activation="gelu"), model.state_dict())
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act 'gelu' is not supported \(supported: relu, "):
        Transformer.from_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_one_nan_or_inf_anywhere_makes_a_tensor_not_finite(dtype, value):
    tensor = torch.randn(256, 512).to(dtype)  # past torch's grain size: the reduction may run in chunks
    assert all_finite(tensor) and all_finite(torch.empty(0, 48, dtype=dtype))
    for at in [(0, 0), (130, 257), (255, 511)]:
        poisoned = tensor.clone()
        poisoned[at] = value
        assert not all_finite(poisoned)
