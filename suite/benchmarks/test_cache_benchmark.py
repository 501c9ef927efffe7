"""The neuron cache at OPT 6.7B's width: one token's insert and delete (the paper's 2.4% new neurons per token,
into a window holding 10% of the layer), for the preallocated cache and the regather ablation."""

import numpy as np
import pytest
import torch

from flashbench.reference.cache import NeuronCache, RegatherCache

D_MODEL, D_FFN = 4096, 16384
HELD, DELTA = D_FFN // 10, int(D_FFN * 0.024)


def filled(memory: str):
    cache = (NeuronCache(HELD + DELTA, D_MODEL, D_FFN, gated=False, bias=True) if memory == "preallocated"
             else RegatherCache(HELD + DELTA, D_MODEL, gated=False, bias=True))
    ids = np.random.default_rng(0).permutation(D_FFN)
    held, fresh = np.sort(ids[:HELD]), ids[HELD : HELD + DELTA]
    cache.insert(held, {"up": torch.randn(HELD, D_MODEL), "down": torch.randn(HELD, D_MODEL)}, torch.randn(HELD))
    rows = {"up": torch.randn(DELTA, D_MODEL), "down": torch.randn(DELTA, D_MODEL)}
    return cache, held, fresh, rows


@pytest.mark.parametrize("memory", ["preallocated", "regather"])
def test_cache_insert_and_delete_one_token(benchmark, memory):
    cache, held, fresh, rows = filled(memory)
    bias = torch.randn(DELTA)
    leaving = np.random.default_rng(1).choice(held, DELTA, replace=False)  # the window's oldest token's neurons

    def token():  # the delta comes in, as many old neurons leave, then they swap back: the size stays put
        cache.insert(fresh, rows, bias)
        cache.delete(leaving)
        cache.insert(leaving, rows, bias)
        cache.delete(fresh)

    benchmark(token)
    assert cache.n == HELD and set(cache.cached_ids()) == set(held)
