import pytest

from flashbench.reference import Engine, Sampling, Transformer, generate


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine(Transformer.from_checkpoint(tiny_checkpoint), max_len=128)


def test_greedy_generation_is_deterministic(engine):
    a = generate(engine, [257, 72, 105], 20)
    b = generate(engine, [257, 72, 105], 20)
    assert a.tokens == b.tokens and len(a.tokens) == 20


def test_greedy_picks_the_argmax_of_each_step(engine):
    out = generate(engine, [257, 65], 5)
    logits = engine.prefill([257, 65])[-1]
    for token in out.tokens:
        assert token == int(logits.argmax())
        logits = engine.step(token)


def test_seeded_sampling_repeats_with_the_seed_and_varies_without_it(engine):
    s = lambda seed: generate(engine, [257, 65], 30, Sampling(temperature=1.0, seed=seed)).tokens  # noqa: E731
    assert s(7) == s(7)
    assert s(7) != s(8)


def test_top_k_of_one_is_greedy(engine):
    greedy = generate(engine, [257, 66], 15).tokens
    assert generate(engine, [257, 66], 15, Sampling(temperature=0.7, top_k=1, seed=3)).tokens == greedy


def test_each_decode_step_is_timed(engine):
    out = generate(engine, [257, 67], 10)
    assert len(out.token_seconds) == 9  # the first new token comes from the prefill
    assert all(t > 0 for t in out.token_seconds) and out.prefill_seconds > 0


def test_generation_stops_at_the_cache_limit(engine):
    out = generate(engine, [257] + [65] * 120, 50)
    assert len(out.prompt) + len(out.tokens) == 128


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)
