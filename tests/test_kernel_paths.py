"""`make test` runs the exactness tests under every CPU kernel path the machine offers (tests/kernel_paths.py)."""

import re
from pathlib import Path

from tests import kernel_paths


def test_every_module_with_exactness_tests_runs_on_every_kernel_path():
    marked = {p.name for p in Path(__file__).parent.glob("test_*.py")
              if re.search(r"pytest\.mark\.exactness\b", p.read_text()) and p.name != Path(__file__).name}
    assert marked and marked <= set(kernel_paths.MODULES)


def test_a_path_holds_torch_to_its_capability():
    env = kernel_paths.clean_env() | kernel_paths.PATHS["default"]
    assert kernel_paths.reported_capability(env) == "DEFAULT"
