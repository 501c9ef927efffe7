"""Agreement with dense inference, and its verdicts against exact and approximate tolerances."""

import torch

from flashbench.harness.agreement import APPROXIMATE, EXACT, agreement, checks, matched_prefix

TARGETS = [1, 2, 3, 0]


def test_identical_logits_pass_the_exact_tolerance():
    logits = torch.randn(4, 5)
    a = agreement(logits, logits.clone(), TARGETS)
    assert all(c.passed for c in checks(a, 8, 8, EXACT))


def test_any_greedy_difference_fails_exact_but_not_approximate():
    logits = torch.randn(4, 5)
    a = agreement(logits, logits.clone(), TARGETS)
    failed = [c.metric for c in checks(a, 7, 8, EXACT) if not c.passed]
    assert failed == ["greedy_match"]
    assert all(c.passed for c in checks(a, 7, 8, APPROXIMATE))


def test_a_flipped_argmax_lowers_top1_and_fails_exact():
    dense = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    a = agreement(dense, torch.tensor([[1.0, 2.0], [0.0, 3.0]]), [0, 1])
    assert a.top1_agreement == 0.5 and a.max_abs_logit_diff == 1.0
    assert {c.metric for c in checks(a, 2, 2, EXACT) if not c.passed} == {
        "max_abs_logit_diff", "mean_kl", "top1_agreement", "perplexity_ratio"}


def test_matched_prefix_counts_tokens_before_the_first_difference():
    assert matched_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert matched_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert matched_prefix([1], [2]) == 0
