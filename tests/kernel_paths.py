"""Run the exactness tests (`pytest -m exactness`) again under every CPU kernel path this machine offers, and say how
close each path's logits came to the exact tiers' bound.

    python tests/kernel_paths.py [--native-log FILE] [pytest arguments...]

A kernel path is what torch's CPU code is allowed to use: ATen's own vectorised kernels (ATEN_CPU_CAPABILITY), and
the libraries beneath it, oneDNN (ONEDNN_MAX_CPU_ISA: 16-bit matrix products) and MKL (MKL_ENABLE_INSTRUCTIONS:
float32 ones). Another CPU runs another path, so a verdict that holds on one path only would not hold on the next
machine. A path is offered where torch, asked for it, reports it (asked for more than the CPU has, torch falls back
to the best it has). The number of threads is a path too: a product split across threads may sum in another order.
`make test` runs the whole suite on the native path first (all limits unset, one thread per pytest worker), logging
to --native-log, then this: the other paths side by side on one thread each, then the native path on all threads,
alone. Exit 1 if the exactness tests fail on any path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG = "FLASHBENCH_EXACTNESS_LOG"  # tests/exactness.py appends each comparison here
PATHS = {  # name -> the environment that holds torch to it
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "sve256": {"ATEN_CPU_CAPABILITY": "sve256"},  # aarch64 with 256-bit SVE
}
LIMITS = tuple(sorted({k for env in PATHS.values() for k in env}))
# The modules holding exactness tests: collecting only these saves each path the others' imports.
MODULES = ("test_hf_agreement.py", "test_half_precision.py", "test_pruning.py", "test_validate.py", "test_silu.py",
           "test_run_model.py", "test_peers.py", "test_placement.py", "test_threshold.py")


def reported_capability(env: dict[str, str]) -> str:
    """What torch says its CPU capability is under `env`."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LIMITS + ("OMP_NUM_THREADS",)}


def offered() -> dict[str, dict[str, str]]:
    """The paths this machine offers, by torch's own report."""
    return {name: limits for name, limits in PATHS.items()
            if reported_capability(clean_env() | limits).lower() == limits["ATEN_CPU_CAPABILITY"]}


def summary(log: Path) -> str:
    """The largest |logit difference| per dtype in a log, and its fraction of the bound it was held to."""
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if not rows:
        return "no comparisons logged"
    parts = []
    for dtype in sorted({r["dtype"] for r in rows}):
        worst = max((r for r in rows if r["dtype"] == dtype), key=lambda r: r["max_abs_logit_diff"] / r["logit_bound"])
        parts.append(f"{dtype}: max |logit diff| {worst['max_abs_logit_diff']:.3g} = "
                     f"{worst['max_abs_logit_diff'] / worst['logit_bound']:.0%} of eps {worst['logit_bound']:.3g} "
                     f"({worst['test'].split('::')[-1]})")
    return f"{len(rows)} comparisons; " + "; ".join(parts)


def main(argv: list[str]) -> int:
    native_log = None
    if argv[:1] == ["--native-log"]:
        native_log, argv = Path(argv[1]), argv[2:]
    paths = offered()
    native = reported_capability(clean_env())
    print(f"kernel paths: native ({native}) and {', '.join(paths) or 'no other'}; exactness tests under each",
          flush=True)
    lines = [f"  native ({native}, no limits, one thread a worker): " +
             (summary(native_log) if native_log else "not logged")]
    failed = []
    pytest = [sys.executable, "-m", "pytest", "-q", "-m", "exactness", "-p", "no:cacheprovider",
              *(argv or [f"tests/{m}" for m in MODULES])]
    with tempfile.TemporaryDirectory() as tmp:

        def start(name: str, env: dict[str, str]) -> tuple[subprocess.Popen, object]:
            out = open(f"{tmp}/{name}.out", "w+")
            held = [f"{k}={v}" for k, v in env.items() if k in LIMITS + ("OMP_NUM_THREADS",)]
            print(f"== {name}: {' '.join(held) or 'no limits'}", flush=True)
            return subprocess.Popen(pytest, cwd=REPO, env=env | {LOG: f"{tmp}/{name}.jsonl"}, stdout=out,
                                    stderr=subprocess.STDOUT), out

        def finish(name: str, proc: subprocess.Popen, out) -> None:
            code = proc.wait()
            out.seek(0)
            print(f"== {name}:\n{out.read().rstrip()}", flush=True)
            out.close()
            if code != 0:
                failed.append(name)
            lines.append(f"  {name}: {'FAILED' if code else 'passed'}; {summary(Path(tmp) / f'{name}.jsonl')}")

        # The other paths at once, one thread each: on a 2-core machine that takes half the time of one after another.
        runs = {name: start(name, clean_env() | limits | {"OMP_NUM_THREADS": "1"}) for name, limits in paths.items()}
        for name, (proc, out) in runs.items():
            finish(name, proc, out)
        if (os.cpu_count() or 1) > 1:  # then the native path on all threads, alone (beside the others' they crawl)
            finish("native, all threads", *start("native, all threads", clean_env()))
    print("kernel paths:\n" + "\n".join(lines))
    if failed:
        print(f"FAIL: the exactness tests fail on kernel path(s) {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
