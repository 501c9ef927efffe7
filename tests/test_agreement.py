"""Agreement with dense inference, and the error model its tiers come from: every limit of an exact tier follows from
its logit bound eps, none is tighter than eps implies, and engines that are wrong are still caught."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashbench.harness.agreement import (APPROXIMATE, LOGIT_ULPS, Check, Greedy, agreement, approximate_tier, checks,
                                          exact_tier, greedy_match, logit_bound, logit_scale, matched_prefix)

TARGETS = [1, 2, 3, 0]
EPS = logit_bound(torch.float32, 32.0)


def test_the_exact_tier_derives_every_limit_from_its_logit_bound():
    tol = exact_tier(EPS)
    assert tol.exact and tol.max_abs_logit_diff == EPS
    assert tol.max_mean_kl == EPS**2 / 2  # Hoeffding's lemma for d in [-eps, eps]
    assert tol.max_perplexity_ratio == math.exp(2 * EPS)  # each log-probability moves by at most 2 eps
    assert tol.min_top1_agreement == 1.0 and tol.min_greedy_match == 1.0  # ties aside


def test_the_logit_bound_is_a_fixed_number_of_units_in_the_last_place_of_the_logit_scale():
    assert logit_scale(torch.tensor([[20.3, -3.0]])) == 32.0 and logit_scale(torch.tensor([[-0.2]])) == 1.0
    assert logit_scale(torch.tensor([[16.0]])) == 16.0
    for dtype, ulps in LOGIT_ULPS.items():
        assert logit_bound(dtype, 32.0) == ulps * torch.finfo(dtype).eps * 32.0
    assert logit_bound(torch.float32, 32.0) < logit_bound(torch.float16, 32.0) < logit_bound(torch.bfloat16, 32.0)
    with pytest.raises(ValueError, match="no error model"):
        logit_bound(torch.float64, 1.0)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.sampled_from([1.0, 4.0, 32.0]),
       dtype=st.sampled_from(list(LOGIT_ULPS)), ties=st.booleans())
def test_an_engine_within_the_logit_bound_passes_every_exact_check(seed, scale, dtype, ties):
    """No limit is tighter than the logit bound implies: any logits within eps of dense pass every check of the
    exact tier, near-ties included (they are made here on purpose when `ties`)."""
    g = torch.Generator().manual_seed(seed)
    eps = logit_bound(dtype, scale)
    dense = (torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1) * scale
    if ties:  # the runner-up within 2 eps of the best at every position: the perturbation may flip them
        top = dense.argmax(-1)
        runner = (top + 1) % dense.shape[1]
        below = torch.rand(6, generator=g, dtype=torch.float64) * eps
        dense[torch.arange(6), runner] = dense[torch.arange(6), top] - below
    engine = dense + (torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1) * 0.999 * eps
    targets = torch.randint(0, 9, (6,), generator=g).tolist()
    a = agreement(dense, engine, targets, tie_margin=2 * eps)
    # a greedy continuation that parts from dense's where dense's own logits show a tie
    continuation = Greedy(dense.argmax(-1).tolist(), dense)
    got = engine.argmax(-1).tolist()
    got = got[: matched_prefix(continuation.tokens, got) + 1]  # free-running: after parting, anything may follow
    g_match = greedy_match(continuation, got + [0] * (6 - len(got)), tie_margin=2 * eps)
    failed = [c.metric for c in checks(a, g_match, exact_tier(eps)) if not c.passed]
    assert failed == []


def test_the_kl_limit_is_reached_by_a_perturbation_within_the_bound():
    """No looser than needed: logits moved by +-eps on two equally likely tokens come within 1% of eps^2 / 2."""
    dense = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    engine = dense + torch.tensor([[EPS, -EPS]], dtype=torch.float64)
    kl = agreement(dense, engine, [0]).mean_kl
    assert 0.99 * EPS**2 / 2 <= kl <= EPS**2 / 2


def test_identical_logits_pass_the_exact_tier():
    logits = torch.randn(4, 5)
    a = agreement(logits, logits.clone(), TARGETS)
    g = greedy_match(Greedy([1, 2], logits[:2]), [1, 2])
    assert all(c.passed for c in checks(a, g, exact_tier(EPS)))


def test_a_decisive_greedy_difference_fails_exact_but_not_approximate():
    dense = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    g = greedy_match(Greedy([1, 2], dense), [1, 0], tie_margin=2 * EPS)
    assert g.matched == 1 and not g.parted_at_tie and g.value == 0.5
    a = agreement(dense, dense.clone(), [1, 2])
    assert [c.metric for c in checks(a, g, exact_tier(EPS)) if not c.passed] == ["greedy_match"]
    assert all(c.passed for c in checks(a, g, APPROXIMATE))


def test_a_greedy_run_parting_at_a_tie_matches_in_full():
    dense = torch.tensor([[0.0, 5.0, 5.0 - EPS]])
    g = greedy_match(Greedy([1], dense), [2], tie_margin=2 * EPS)
    assert g.matched == 0 and g.parted_at_tie and g.value == 1.0


def test_a_flipped_argmax_is_a_tie_only_within_the_tie_margin():
    dense = torch.tensor([[2.0, 2.0 - 1e-5], [0.0, 3.0]])
    flipped = torch.tensor([[2.0 - 1e-5, 2.0], [0.0, 3.0]])
    assert agreement(dense, flipped, [0, 1], tie_margin=2 * EPS).top1_agreement == 1.0
    assert agreement(dense, flipped, [0, 1], tie_margin=2 * EPS).top1_ties == 1
    assert agreement(dense, flipped, [0, 1], tie_margin=0.0).top1_agreement == 0.5


def test_a_wrong_engine_fails_every_exact_check_it_moves():
    dense = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    a = agreement(dense, torch.tensor([[1.0, 2.0], [0.0, 3.0]]), [0, 1], tie_margin=2 * EPS)
    assert a.top1_agreement == 0.5 and a.max_abs_logit_diff == 1.0
    g = greedy_match(Greedy([0, 1], dense), [0, 1])
    assert {c.metric for c in checks(a, g, exact_tier(EPS)) if not c.passed} == {
        "max_abs_logit_diff", "mean_kl", "top1_agreement", "perplexity_ratio"}


def test_matched_prefix_counts_tokens_before_the_first_difference():
    assert matched_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert matched_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert matched_prefix([1], [2]) == 0


@pytest.mark.parametrize("value, limit, shown", [
    (1.00000017, 1.000001, "1 + 1.7e-07 <= 1 + 1e-06"),
    (1.00000017, math.exp(2 * EPS), "1 + 1.7e-07 <= 1 + 0.00024"),
    (0.9988, math.exp(2 * EPS), "1 - 0.0012 <= 1 + 0.00024"),
    (0.97, 0.95, "0.97 >= 0.95"),
    (0.9512, 0.95, "0.9512 >= 0.95"),
    (2.1e-05, EPS, "2.1e-05 <= 0.000122"),
    (0.5, 0.5, "0.5 <= 0.5"),
])
def test_a_check_shows_value_and_limit_with_enough_digits_to_see_the_margin(value, limit, shown):
    assert Check("x", value, limit, ">=" not in shown).describe() == shown


def test_an_approximate_table_replaces_only_known_limits():
    assert approximate_tier({"max_mean_kl": 0.1}, "s.toml").max_mean_kl == 0.1
    assert approximate_tier({}, "s.toml") == APPROXIMATE
    for bad, message in (({"max_kl": 0.1}, "unknown limit"), ({"max_mean_kl": "low"}, "non-negative numbers"),
                         (0.05, "a table of limits")):
        with pytest.raises(ValueError, match=f"s.toml: .*{message}"):
            approximate_tier(bad, "s.toml")
