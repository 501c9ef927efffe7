"""The device switch: one engine on the CPU or a CUDA GPU. Everywhere: device names are checked and a GPU the machine
lacks is refused with the reason, before anything runs. With a GPU (tests marked `gpu`, skipped without one): the
engine on the device is exact against dense inference on the same device, its copies are timed and counted."""

import itertools

import pytest
import torch

from flashbench import suite
from flashbench.harness.cli import main
from flashbench.harness.matrix import Settings
from flashbench.reference import Engine, Transformer
from flashbench.reference.device import DeviceError, Transfer, resolve
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import convert
from flashbench.suite.models.byte_tokenizer import encode
from tests.exactness import within_exact_bound

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason=f"no CUDA GPU here (torch {torch.__version__}): the GPU path is "
                                               "tested on a machine with one (`pytest tests/test_device.py`)")
PROMPT = encode(suite.heldout_text())[:64]


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", ""])
def test_a_device_that_is_not_cpu_or_cuda_is_refused(name):
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        Techniques(device=name)
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        Settings(device=name)


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_without_a_gpu_cuda_is_refused_with_the_reason(tmp_path):
    flash = convert(suite.model_path("shakespeare-opt"), tmp_path / "f", "bundled", "float32")
    with pytest.raises(DeviceError, match="no CUDA GPU here"):
        FlashEngine(flash, Techniques.naive(device="cuda"))


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_the_gpu_scenario_without_a_gpu_stops_before_it_starts(tmp_path, capsys):
    assert main(["run", "--scenario", "gpu", "--reports", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    assert "device 'cuda': no CUDA GPU here" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/records"))


def test_on_the_cpu_the_transfer_is_the_identity():
    transfer = Transfer(resolve("cpu"))
    rows = {"up": torch.ones(2, 3)}
    assert transfer.to_device(rows)["up"] is rows["up"] and transfer.seconds() == 0.0


# ---- on a GPU ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def on_gpu(tmp_path_factory):
    """The embedded OPT: its dense reference on the GPU (float32, TF32 off), and a float32 flash layout."""
    path = suite.model_path("shakespeare-opt")
    device = resolve("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    dense = Engine(Transformer.from_checkpoint(path, device=device))
    logits = [dense.prefill(PROMPT)[-1]]
    tokens = []
    for _ in range(8):
        tokens.append(int(logits[-1].argmax()))
        logits.append(dense.step(tokens[-1]))
    flash = convert(path, tmp_path_factory.mktemp("gpu") / "bundled", "bundled", "float32")
    return {"flash": flash, "tokens": tokens, "logits": torch.stack(logits)}


@needs_gpu
@pytest.mark.parametrize("window, memory", list(itertools.product([0, 4], ["preallocated", "regather"])))
def test_the_engine_on_a_gpu_is_exact_against_dense_inference_on_the_gpu(on_gpu, window, memory):
    techniques = Techniques(source="oracle", window=window, memory=memory, device="cuda")
    with FlashEngine(on_gpu["flash"], techniques) as engine:
        got = torch.stack([engine.prefill(PROMPT)[-1]] + [engine.step(t) for t in on_gpu["tokens"]])
        assert engine.model.embed.weight.device.type == "cuda"
        assert all(s.memory_s > 0 for s in engine.history)  # the copies to the device are counted
    assert got.device.type == "cpu" and within_exact_bound(got, on_gpu["logits"])


@needs_gpu
def test_naive_reads_on_a_gpu_copy_every_layer_and_stay_exact(on_gpu):
    with FlashEngine(on_gpu["flash"], Techniques.naive(device="cuda")) as engine:
        got = torch.stack([engine.prefill(PROMPT)[-1]] + [engine.step(t) for t in on_gpu["tokens"]])
        assert engine.history[-1].io.bytes_read >= sum(
            engine.layout.geometry_of(i).file_bytes for i in range(engine.layout.config.n_layers))
    assert within_exact_bound(got, on_gpu["logits"])
