"""The regression benchmarks stay runnable: each runs once (timing disabled) against a scratch data folder. The
reader's benchmark is left to `make bench`: its data file alone is 256 MiB."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "suite" / "benchmarks"


def test_cache_and_engine_benchmarks_run(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(BENCHMARKS / "test_cache_benchmark.py"), str(BENCHMARKS / "test_engine_benchmark.py")],
        env=os.environ | {"FLASHBENCH_BENCH_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout
    assert (tmp_path / "shakespeare-opt-bundled-float16" / "layout.json").is_file()  # the data went where told
