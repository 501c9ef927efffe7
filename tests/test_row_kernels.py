"""The C products over rows by slot (reference/row_kernels.c): the down projection sums only the active neurons'
rows; both sum as accurately as float32 accumulation and one rounding to the rows' dtype allow, and a row's part in
a sum does not depend on where it lies."""

import numpy as np
import pytest
import torch

from flashbench.reference import flash, row_kernels

DTYPES = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of each 16-bit dtype


@pytest.fixture
def built():
    if why := row_kernels.unavailable():
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
    out = row_kernels.down(h[:1], poisoned)
    assert torch.isfinite(out).all()
    active = h[0] != 0
    assert torch.equal(out, row_kernels.down(h[:1, active], rows[active]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_sums_are_float32_accumulation_rounded_once(built, dtype):
    """|out - exact| <= gamma_n * sum|h_i r_ij| (n float32 additions, u = 2^-24) + u_dtype * (|exact| + that)."""
    n = 3000
    h, rows = activations(n, 0.5, 2).to(dtype), record_rows(n, 256, dtype, 3)
    out = row_kernels.down(h, rows).double()
    exact = h.double() @ rows.double()
    magnitude = h.double().abs() @ rows.double().abs()
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    accumulated = gamma * magnitude
    assert ((out - exact).abs() <= accumulated + DTYPES[dtype] * (exact.abs() + accumulated)).all()


def test_the_engine_multiplies_16_bit_rows_with_torch_where_the_library_is_not_built(monkeypatch):
    h, rows = activations(200, 0.5, 4).to(torch.bfloat16), record_rows(200, 32, torch.bfloat16, 5)
    monkeypatch.setattr(row_kernels, "unavailable", lambda: "not built (this test)")
    by_torch = flash._down(h, rows)
    assert torch.equal(by_torch, torch.stack([torch.mv(rows.t(), row) for row in h]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_16_bit_value_is_read_exactly(built, dtype):
    values = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype)  # every bit pattern
    out = row_kernels.down(torch.ones(1, 1, dtype=dtype), values[None])[0]
    nan = torch.isnan(values)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan], values[~nan])  # -0 sums to +0, which compares equal


def slots_of(n: int, capacity: int, seed: int) -> np.ndarray:
    """n distinct slots of a cache of `capacity` rows, in no order."""
    return np.random.default_rng(seed).choice(capacity, n, replace=False).astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [4096, 67])  # whole lanes, and a remainder
def test_each_rows_sum_is_float32_accumulation_rounded_once(built, dtype, d):
    """|out - exact| <= gamma_d * sum|x_j r_ij| + u_dtype * (|exact| + that), for rows listed in any order."""
    g = torch.Generator().manual_seed(6)
    rows, x = torch.randn(300, d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    slots = slots_of(203, 300, 7)  # not a multiple of the rows the kernel takes at a time
    out = row_kernels.up(x, rows, slots).double()
    picked = rows[torch.from_numpy(slots)].double()
    exact, magnitude = picked @ x.double(), picked.abs() @ x.double().abs()
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    accumulated = gamma * magnitude
    assert ((out - exact).abs() <= accumulated + DTYPES[dtype] * (exact.abs() + accumulated)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_with_no_slots_every_row_is_multiplied_in_order(built, dtype):
    """The "rows" matvec kernel: a whole matrix (here strided as records hold rows), as if every slot were listed."""
    rows = record_rows(1000, 96, dtype, 16)
    x = torch.randn(96, generator=torch.Generator().manual_seed(17)).to(dtype)
    assert torch.equal(row_kernels.up(x, rows), row_kernels.up(x, rows, np.arange(1000, dtype=np.int64)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bias_is_added_to_each_rows_sum(built, dtype):
    """Small integers: every product, sum and rounding is exact, so the result is the exact x . r + b."""
    g = torch.Generator().manual_seed(18)
    rows, x = torch.randint(-3, 4, (50, 40), generator=g), torch.randint(-3, 4, (40,), generator=g)
    bias = torch.randint(-20, 21, (50,), generator=g)
    out = row_kernels.up(x.to(dtype), rows.to(dtype), None, bias.to(dtype))
    assert torch.equal(out, (rows @ x + bias).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_listed_rows_bias_is_its_slots_added_before_the_one_rounding(built, dtype):
    """The neuron cache's biases lie by slot as its rows do. A row's sum big + 1 lies on a tie of the dtype (its
    last place is 2 there): rounded first, it goes to even (big), and + 0.75 stays big; with the bias added before the
    one rounding, big + 1.75 rounds to big + 2, as F.linear's sum and bias do."""
    big = {torch.bfloat16: 256.0, torch.float16: 2048.0}[dtype]
    rows, x = torch.zeros(4, 32, dtype=dtype), torch.zeros(32, dtype=dtype)
    rows[3, 0], rows[3, 1], rows[0, 0], x[0], x[1] = big, 1.0, 1.0, 1.0, 1.0
    bias = torch.tensor([5.0, 0.0, 0.0, 0.75], dtype=dtype)
    slots = np.array([3, 0, 3], dtype=np.int64)
    assert row_kernels.up(x, rows, slots, bias).tolist() == [big + 2, 6.0, big + 2]
    rounded_twice = row_kernels.up(x, rows, slots) + bias[torch.from_numpy(slots)]
    assert rounded_twice.tolist() == [big, 6.0, big]


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_sum_is_the_same_bits_wherever_it_lies_and_on_one_thread_or_two(built, dtype):
    """Reads land in whatever slots are free, so the same neurons lie elsewhere in another run (with or without
    overlap): their sums must not change by a bit."""
    g = torch.Generator().manual_seed(8)
    rows, x = torch.randn(200, 4096, generator=g).to(dtype), torch.randn(4096, generator=g).to(dtype)
    slots = slots_of(150, 200, 9)
    elsewhere = torch.zeros(500, 4096, dtype=dtype)
    moved = slots_of(150, 500, 10)
    elsewhere[torch.from_numpy(moved)] = rows[torch.from_numpy(slots)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = row_kernels.up(x, rows, slots)
        torch.set_num_threads(1)
        one = row_kernels.up(x, elsewhere, moved)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_down_projection_is_the_same_bits_on_one_thread_or_two(built, dtype):
    h, rows = activations(700, 0.5, 14).to(dtype), record_rows(700, 1000, dtype, 15)  # columns: not whole lines
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = row_kernels.down(h, rows)
        torch.set_num_threads(1)
        one = row_kernels.down(h, rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_down_by_slot_sums_the_listed_rows_in_the_lists_order(built, dtype):
    h, rows = activations(250, 0.4, 11).to(dtype), record_rows(400, 96, dtype, 12)
    slots = slots_of(250, 400, 13)
    poisoned = rows.clone()
    unlisted = np.setdiff1d(np.arange(400), slots)
    poisoned[torch.from_numpy(unlisted)] = float("nan")  # rows not listed must not be read
    out = row_kernels.down(h, poisoned, slots)
    assert torch.equal(out, row_kernels.down(h, rows[torch.from_numpy(slots)].contiguous()))
