"""The C down projection (reference/sparse_down.c): it sums only the active neurons' rows, and it sums them as
accurately as float32 accumulation and one rounding to the rows' dtype allow."""

import pytest
import torch

from flashbench.reference import flash, sparse_down

DTYPES = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of each 16-bit dtype


@pytest.fixture
def built():
    if why := sparse_down.unavailable():
        pytest.skip(why)


def activations(n: int, active: float, seed: int) -> torch.Tensor:
    """[2, n] ReLU-like activations: a fraction `active` of them nonzero."""
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(2, n, generator=g)
    return torch.where(torch.rand(2, n, generator=g) < active, h, torch.zeros(()))


def record_rows(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[n, d] rows strided as a bundled layout's records hold them (each row followed by another vector)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, d, generator=g).to(dtype)[:, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_rows_of_inactive_neurons_are_not_read(built, dtype):
    h, rows = activations(300, 0.3, 0).to(dtype), record_rows(300, 64, dtype, 1)
    poisoned = rows.clone()
    poisoned[h[0] == 0] = float("nan")  # any inactive row read would make its position's sums NaN
    out = sparse_down.down(h[:1], poisoned)
    assert torch.isfinite(out).all()
    active = h[0] != 0
    assert torch.equal(out, sparse_down.down(h[:1, active], rows[active]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_sums_are_float32_accumulation_rounded_once(built, dtype):
    """|out - exact| <= gamma_n * sum|h_i r_ij| (n float32 additions, u = 2^-24) + u_dtype * (|exact| + that)."""
    n = 3000
    h, rows = activations(n, 0.5, 2).to(dtype), record_rows(n, 256, dtype, 3)
    out = sparse_down.down(h, rows).double()
    exact = h.double() @ rows.double()
    magnitude = h.double().abs() @ rows.double().abs()
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    accumulated = gamma * magnitude
    assert ((out - exact).abs() <= accumulated + DTYPES[dtype] * (exact.abs() + accumulated)).all()


def test_the_engine_multiplies_16_bit_rows_with_torch_where_the_library_is_not_built(monkeypatch):
    h, rows = activations(200, 0.5, 4).to(torch.bfloat16), record_rows(200, 32, torch.bfloat16, 5)
    monkeypatch.setattr(sparse_down, "unavailable", lambda: "not built (this test)")
    by_torch = flash._down(h, rows)
    assert torch.equal(by_torch, torch.stack([torch.mv(rows.t(), row) for row in h]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_16_bit_value_is_read_exactly(built, dtype):
    values = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype)  # every bit pattern
    out = sparse_down.down(torch.ones(1, 1, dtype=dtype), values[None])[0]
    nan = torch.isnan(values)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan], values[~nan])  # -0 sums to +0, which compares equal
