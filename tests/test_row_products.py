"""The FFN's up products over a layer's rows (flash._times_rows): in 16 bits on the CPU they run at a shape rounded up
to ROW_BUCKET rows where the rows' buffer goes on after them, and the spare rows, whatever they hold, change nothing."""

import pytest
import torch

from flashbench.reference.flash import ROW_BUCKET, _times_rows

D = 256


def plane(rows: int, dtype: torch.dtype) -> torch.Tensor:
    """A neuron cache's matrix: `rows` rows of which the engine uses the first ones; the rest are NaN, so any of
    them that reached a used column would show."""
    g = torch.Generator().manual_seed(0)
    out = torch.full((rows, D), float("nan"), dtype=dtype)
    out[: rows // 2] = torch.randn(rows // 2, D, generator=g).to(dtype)
    return out


def product_shapes(xs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The product, and the row counts (columns of the result) of the matrix products torch ran for it."""
    with torch.profiler.profile(record_shapes=True) as prof:
        out = _times_rows(xs, rows)
    return out, [e.input_shapes[1][1] for e in prof.events() if e.name == "aten::mm"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 37, ROW_BUCKET, 3 * ROW_BUCKET + 5])
def test_a_16_bit_product_over_cached_rows_runs_at_a_whole_number_of_row_buckets(dtype, n):
    cache = plane(8 * ROW_BUCKET, dtype)
    xs = torch.randn(3, D).to(dtype)
    out, shapes = product_shapes(xs, cache[:n])
    assert shapes == [-(-n // ROW_BUCKET) * ROW_BUCKET]
    assert out.shape == (3, n)
    torch.testing.assert_close(out, xs @ cache[:n].clone().t())  # the NaN rows after them left no mark


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_at_the_end_of_their_buffer_are_multiplied_at_their_own_shape(dtype):
    buffer = torch.randn(2 * ROW_BUCKET, D).to(dtype)
    rows = buffer[-(ROW_BUCKET + 5):]  # nothing after them to round up into
    xs = torch.randn(1, D).to(dtype)
    out, shapes = product_shapes(xs, rows)
    assert shapes == [ROW_BUCKET + 5]
    assert torch.equal(out, xs @ rows.t())


def test_a_float32_product_keeps_its_shape():
    """MKL's float32 products give other bits at other shapes, and build nothing per shape: no rounding up."""
    cache = plane(8 * ROW_BUCKET, torch.float32)
    out, shapes = product_shapes(torch.randn(1, D), cache[:37])
    assert shapes == [37]
