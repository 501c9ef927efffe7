"""The suite's own errors: input it cannot use (a checkpoint, a layout, a budget, a scenario, records, a SUT). The
command line prints their message and exits 2; any other exception is a bug and shows its traceback.

Each is also a ValueError (a value the caller gave cannot be used), so library callers may catch either."""


class FlashbenchError(ValueError):
    """Input the user can fix; the message names the file or setting and the problem."""


class CheckpointError(FlashbenchError):
    """A checkpoint folder that cannot be used: a missing or malformed config.json, weights, predictor or counts."""


class LayoutError(FlashbenchError):
    """A flash directory that cannot be used, or cannot be written where asked."""


class BudgetError(FlashbenchError):
    """A configuration that cannot fit its DRAM budget; the message gives the numbers."""
