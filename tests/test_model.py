import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flashbench.reference import Transformer, row_kernels
from flashbench.reference.model import project


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return Transformer.from_checkpoint(tiny_checkpoint)


def test_incremental_decoding_through_the_kv_cache_equals_one_full_pass(models):
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = models(tokens)[0]
        cache = models.new_cache(64)
        steps = [models(tokens[:, :10], cache)[0]]
        steps += [models(tokens[:, i : i + 1], cache)[0] for i in range(10, 40)]
    assert (torch.cat(steps) - full).abs().max() < 1e-5
    assert cache.length == 40


def test_prefill_in_chunks_equals_one_prefill(models):
    tokens = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = models(tokens)[0]
        cache = models.new_cache(64)
        chunks = [models(tokens[:, a : a + 16], cache)[0] for a in range(0, 48, 16)]
    assert (torch.cat(chunks) - full).abs().max() < 1e-5


def test_sequence_longer_than_the_cache_is_refused(models):
    cache = models.new_cache(8)
    with pytest.raises(ValueError, match="exceeds the limit of 8"):
        models(torch.zeros(1, 9, dtype=torch.long), cache)


def test_a_batch_gives_the_same_logits_as_its_rows_one_by_one(models):
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        batch = models(tokens)
        rows = torch.stack([models(tokens[i : i + 1])[0] for i in range(3)])
    assert (batch - rows).abs().max() < 1e-5


@pytest.mark.parametrize("shape", ["opt-1.3b", "llama-2-7b"])
def test_a_model_for_assignment_has_its_weights_on_meta_and_imports_no_symbolic_shapes(shape):
    """Some operations on torch's meta device import sympy and some 800 other modules (about 70 MiB): a flash
    engine under a DRAM cap must not carry them. Checked in a fresh interpreter (other tests import them)."""
    code = f"""
import sys
from flashbench.reference.model import Transformer, rope_tables
from flashbench.suite.synthetic import shape_config
config = shape_config({shape!r})
model = Transformer.for_assignment(config)
assert all(p.is_meta for p in model.parameters())
if config.arch != "opt":
    assert model.rope_cos.equal(rope_tables(config)[0]) and model.rope_sin.equal(rope_tables(config)[1])
print("sympy" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def products(model: Transformer, tokens: torch.Tensor, cache) -> set[str]:
    """The names of the matrix products torch ran for one forward pass."""
    with torch.profiler.profile() as prof, torch.inference_mode():
        model(tokens, cache)
    return {e.name for e in prof.events()} & {"aten::mm", "aten::addmm", "aten::mv", "aten::addmv"}


def prefill_and_step_products(checkpoint, dtype: torch.dtype, matvec: str) -> tuple[set[str], set[str]]:
    """Torch's matrix products for a four-position prefill, then for one decode step, of a model set to `matvec`."""
    model = Transformer.from_checkpoint(checkpoint, dtype=dtype)
    model.use_matvec(matvec)
    tokens = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(16)
    return products(model, tokens[:, :4], cache), products(model, tokens[:, 4:], cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_set_to_mv_multiplies_one_position_by_matrix_vector_products(tiny_checkpoint, dtype):
    prefill, step = prefill_and_step_products(tiny_checkpoint, dtype, "mv")
    assert prefill and prefill <= {"aten::mm", "aten::addmm"}  # several positions: F.linear
    assert step and step <= {"aten::mv", "aten::addmv"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_set_to_rows_multiplies_one_16_bit_position_by_the_c_kernel(tiny_checkpoint, dtype):
    if why := row_kernels.unavailable():
        pytest.skip(why)
    prefill, step = prefill_and_step_products(tiny_checkpoint, dtype, "rows")
    assert prefill and prefill <= {"aten::mm", "aten::addmm"}  # several positions: F.linear
    assert step == set()  # every product of one position by the C kernel, none by torch


@pytest.mark.parametrize("bias", [False, True])
def test_the_rows_kernel_is_the_c_up_product_over_every_row(bias):
    if why := row_kernels.unavailable():
        pytest.skip(why)
    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(40, 24, generator=g).bfloat16(), torch.randn(1, 1, 24, generator=g).bfloat16()
    b = torch.randn(40, generator=g).bfloat16() if bias else None
    y = project(x, w, b, "rows")
    assert y.shape == (1, 1, 40) and torch.equal(y.view(-1), row_kernels.up(x.view(-1), w, None, b))


def test_the_rows_kernel_leaves_float32_weights_to_f_linear():
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(40, 24, generator=g), torch.randn(1, 1, 24, generator=g)
    assert torch.equal(project(x, w, None, "rows"), F.linear(x, w))


def test_mv_and_linear_give_the_same_logits_within_float32_rounding(models):
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    logits = {}
    for matvec in ("linear", "mv"):
        models.use_matvec(matvec)
        cache = models.new_cache(32)
        with torch.inference_mode():
            logits[matvec] = torch.cat([models(tokens[:, :8], cache)[0]] + [models(tokens[:, i:i + 1], cache)[0]
                                                                           for i in range(8, 24)])
    models.use_matvec("linear")
    assert (logits["mv"] - logits["linear"]).abs().max() < 1e-5
