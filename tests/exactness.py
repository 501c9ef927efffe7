"""The exact tiers' logit bound for tests that compare an engine's logits with dense inference's, and a log of how
close each comparison came to it (tests/kernel_paths.py reads it to say what each CPU kernel path used)."""

import json
import os

import torch

from flashbench.harness.agreement import logit_bound, logit_scale

LOG = "FLASHBENCH_EXACTNESS_LOG"  # a JSON-lines file to append each comparison to, where set


def note(diff: float, bound: float, dtype: torch.dtype) -> None:
    """Log one comparison: its max |logit difference| and the bound it was held to."""
    if os.environ.get(LOG):
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(os.environ[LOG], "a") as f:
            f.write(json.dumps({"test": test, "dtype": str(dtype).removeprefix("torch."), "max_abs_logit_diff": diff,
                                "logit_bound": bound}) + "\n")


def within_exact_bound(logits: torch.Tensor, dense: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Every logit within eps of dense's: K units in the last place of the dense logits' scale (agreement.py)."""
    diff, bound = float((logits - dense).abs().max()), logit_bound(dtype, logit_scale(dense))
    note(diff, bound, dtype)
    return diff <= bound
