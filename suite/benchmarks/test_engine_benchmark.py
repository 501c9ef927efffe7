"""The flash engine on the embedded OPT model (predictor, window 5, bundled fp16 layout): one sparse FFN step of
one layer, and one whole token."""

import numpy as np
import pytest
import torch

from flashbench import suite
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.predictor import Predictor
from flashbench.suite.models.byte_tokenizer import BOS, encode

TECHNIQUES = Techniques(source="predictor", window=5, threads=16)


@pytest.fixture
def engine(opt_layout):
    predictor = Predictor.load(suite.model_path("shakespeare-opt") / "predictor")
    engine = FlashEngine(opt_layout, TECHNIQUES, source=predictor)
    yield engine
    engine.close()


def test_sparse_ffn_step(benchmark, engine):
    """Layer 0's FFN for one token: predict, read the delta, update the cache, multiply."""
    ffn = engine.model.layers[0].ffn
    xs = iter(torch.randn(10_000, 1, 1, engine.layout.config.d_model))
    with torch.inference_mode():
        out = benchmark(lambda: ffn(next(xs)))
    assert out.shape == (1, 1, engine.layout.config.d_model) and torch.isfinite(out).all()


def test_engine_token(benchmark, engine):
    """One decode step of the whole model over held-out text, starting a new sequence when the context is full."""
    ids = encode(suite.heldout_text(), bos=False)
    tokens = iter(ids)
    engine.prefill([BOS])

    def token():
        if engine.cache.length >= engine.max_len:
            engine.prefill([BOS])
        return engine.step(next(tokens))

    logits = benchmark(token)
    assert logits.shape == (engine.layout.config.vocab_size,) and np.isfinite(logits.numpy()).all()
