"""The neuron cache against a plain model of its contents (a dict from neuron id to its vectors)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashbench.reference.cache import NeuronCache, RowMover, as_words

D_FFN, D_MODEL = 40, 3


def vectors_of(ids, gated=True):
    """Each neuron's vectors are a function of its id, so any misplaced row shows."""
    base = torch.as_tensor(np.asarray(ids), dtype=torch.float32)[:, None]
    names = ("gate", "up", "down") if gated else ("up", "down")
    return {name: base * 10 + j + torch.arange(D_MODEL) / 10 for j, name in enumerate(names)}


def check(cache: NeuronCache, model: set[int]):
    assert cache.n == len(model)
    ids = cache.cached_ids()
    assert ids.tolist() == sorted(model)
    assert (cache.ids[cache.slot_of[ids]] == ids).all()
    assert (cache.ids >= 0).sum() == len(model)  # every other slot free
    want = vectors_of(ids)
    rows, slots, bias = cache.rows_of(ids)
    for name in cache.vectors:
        assert torch.equal(rows[name][torch.from_numpy(slots)], want[name])
    assert torch.equal(bias[torch.from_numpy(slots)], torch.as_tensor(ids, dtype=torch.float32))


operations = st.lists(
    st.tuples(st.sampled_from(["insert", "delete"]), st.sets(st.integers(0, D_FFN - 1), max_size=12)), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(pinned=st.sets(st.integers(0, D_FFN - 1), max_size=5), ops=operations)
def test_random_inserts_and_deletes_keep_the_cache_equal_to_its_model(pinned, ops):
    cache = NeuronCache(D_FFN, D_MODEL, D_FFN, gated=True, bias=True)
    model: set[int] = set()
    ids = np.array(sorted(pinned), dtype=np.int64)
    cache.insert(ids, vectors_of(ids), torch.as_tensor(ids, dtype=torch.float32), pin=True)
    model |= pinned
    for op, chosen in ops:
        if op == "insert":
            new = np.array(sorted(set(chosen) - model), dtype=np.int64)
            np.testing.assert_array_equal(cache.missing(np.array(sorted(chosen), dtype=np.int64)), new)
            cache.insert(new, vectors_of(new), torch.as_tensor(new, dtype=torch.float32))
            model |= set(new.tolist())
        else:
            gone = np.array(sorted((set(chosen) & model) - pinned), dtype=np.int64)
            np.random.default_rng(len(gone)).shuffle(gone)  # order of deletion must not matter
            cache.delete(gone)
            model -= set(gone.tolist())
        check(cache, model)
        assert set(cache.ids[: cache.pinned].tolist()) == pinned


def test_a_full_cache_refuses_more():
    cache = NeuronCache(2, D_MODEL, D_FFN, gated=False, bias=False)
    cache.insert(np.array([1, 2]), vectors_of([1, 2], gated=False))
    with pytest.raises(RuntimeError, match="cache full"):
        cache.insert(np.array([3]), vectors_of([3], gated=False))


def test_pinned_neurons_cannot_be_deleted():
    cache = NeuronCache(4, D_MODEL, D_FFN, gated=False, bias=False)
    cache.insert(np.array([5]), vectors_of([5], gated=False), pin=True)
    with pytest.raises(RuntimeError, match="pinned"):
        cache.delete(np.array([5]))


def test_a_delete_moves_no_row_and_the_next_insert_fills_the_lowest_free_slots():
    cache = NeuronCache(8, D_MODEL, D_FFN, gated=False, bias=False)
    cache.insert(np.array([1, 2, 3, 4]), vectors_of([1, 2, 3, 4], gated=False))
    before = cache.rows["up"].clone()
    cache.delete(np.array([2, 1]))
    assert torch.equal(cache.rows["up"], before)  # not a byte moved
    assert cache.slot_of[[3, 4]].tolist() == [2, 3]
    assert cache.insert(np.array([9, 7, 8]), vectors_of([9, 7, 8], gated=False)).tolist() == [0, 1, 4]
    assert cache.cached_ids().tolist() == [3, 4, 7, 8, 9] and cache.n == 5
    rows, slots, _ = cache.rows_of(np.array([7, 8, 9]))
    assert torch.equal(rows["up"][torch.from_numpy(slots)], vectors_of([7, 8, 9], gated=False)["up"])


def test_rows_read_into_free_slots_are_inserted_where_they_lie():
    """The engine reads records straight into free slots (`planes`), then inserts them there: nothing is copied."""
    cache = NeuronCache(8, D_MODEL, D_FFN, gated=False, bias=False)
    cache.insert(np.array([1]), vectors_of([1], gated=False))
    slots = cache.free_slots(2, taken=np.array([1]))
    assert slots.tolist() == [2, 3]
    for name, rows in vectors_of([6, 5], gated=False).items():  # as a read into the planes would leave them
        cache.rows[name][torch.from_numpy(slots)] = rows
    cache.insert(np.array([6, 5]), [], slots=slots)
    rows, at, _ = cache.rows_of(np.array([5, 6]))
    assert at.tolist() == [3, 2]
    assert torch.equal(rows["down"][torch.from_numpy(at)], vectors_of([5, 6], gated=False)["down"])
    with pytest.raises(RuntimeError, match="free slots"):
        cache.insert(np.array([7]), [], slots=np.array([2]))  # taken


def test_the_cache_gives_its_own_rows_to_multiply_not_copies():
    cache = NeuronCache(8, D_MODEL, D_FFN, gated=False, bias=False)
    cache.insert(np.array([1, 2, 3]), vectors_of([1, 2, 3], gated=False))
    rows, _, _ = cache.rows_of(cache.cached_ids())
    assert rows["up"].data_ptr() == cache.rows["up"].data_ptr()


def test_the_regathering_cache_gives_each_neurons_row():
    from flashbench.reference.cache import RegatherCache

    cache = RegatherCache(8, D_MODEL, gated=True, bias=True)
    for ids in ([7, 2], [9, 1, 4]):
        ids = np.array(ids)
        cache.insert(ids, vectors_of(ids), torch.as_tensor(ids, dtype=torch.float32))
    cache.delete(np.array([2]))
    rows, at, bias = cache.rows_of(np.array([9, 1, 4]))
    for name, want in vectors_of([9, 1, 4]).items():
        assert torch.equal(rows[name][torch.from_numpy(at)], want)
    assert bias[torch.from_numpy(at)].tolist() == [9, 1, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 3, 4, 4096])
def test_rows_moved_as_words_arrive_bit_for_bit(dtype, width):
    """Evictions move rows as the widest integer words a row divides into: the same bytes, whatever the width."""
    matrix = torch.randn(5, width).to(dtype)
    before = matrix.clone()
    words = as_words(matrix)
    assert words.data_ptr() == matrix.data_ptr() and words.element_size() * words.shape[1] == width * dtype.itemsize
    words.index_copy_(0, torch.tensor([0, 3]), words.index_select(0, torch.tensor([4, 1])))
    assert torch.equal(matrix[[0, 3]].view(torch.uint8), before[[4, 1]].view(torch.uint8))
    assert torch.equal(matrix[[1, 2, 4]], before[[1, 2, 4]])


@pytest.mark.parametrize("staging_rows", [0.5, 2, 100])
def test_the_row_mover_copies_any_rows_whatever_its_staging_holds(staging_rows):
    """Rows larger than the staging buffer, rows in several chunks of it, or all at once: the same rows arrive."""
    src, dst = torch.randn(9, 6).to(torch.bfloat16), torch.zeros(7, 6, dtype=torch.bfloat16)
    mover = RowMover(nbytes=int(staging_rows * 6 * 2))
    mover.copy(dst, np.array([6, 0, 3, 2, 5]), src, np.array([1, 8, 4, 0, 7]))
    assert torch.equal(dst[[6, 0, 3, 2, 5]], src[[1, 8, 4, 0, 7]])
    assert not dst[[1, 4]].any()
