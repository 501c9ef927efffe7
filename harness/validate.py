"""`flashbench validate`: the conformance suite run against a SUT, in two modes (as MLPerf does), with audits.

For each case (suite/conformance/cases.toml: a model, a DRAM budget, held-out text and a tolerance tier):
- accuracy: the SUT's teacher-forced logits and free-running greedy continuation against the dense reference,
  judged by the harness's agreement checks at the case's tier;
- performance: the same text again, each step timed by the harness; tokens/s, and the SUT's own breakdown if it
  gives one (reported, never judged);
- audits: the same prompt twice gives the same logits; the performance run's logits are the accuracy run's; the
  process's peak memory growth stays within the budget; a SUT that claims flash inference read from storage
  (/proc/PID/io) at least what it says it read.
A case is VALID when every sub-check passes. A SUT that cannot be run (crash, hang, broken protocol) is exit 2.
"""

from __future__ import annotations

import os
import statistics
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from flashbench import suite
from flashbench.reference import Engine, Transformer
from flashbench.reference.checkpoint import weight_files
from flashbench.reference.tokenizer import BOS, encode

from .agreement import APPROXIMATE, EXACT, agreement, checks, greedy_tokens, matched_prefix, teacher_forced
from .peers import drop_page_cache
from .sut import MemoryCap, ProcessWatch, SUTError, SystemUnderTest

CASES = suite.SUITE_DIR / "conformance" / "cases.toml"  # the default conformance suite
DETERMINISM_TOLERANCE = 1e-6  # max |logit difference| between two runs of the same input
MEMORY_ALLOWANCE = 64 << 20  # peak RSS growth allowed beyond the budget: KV cache, activations, runtime buffers
STORAGE_FRACTION = 0.9  # a flash SUT must have read from storage at least this much of the bytes it claims


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # an embedded model's name or a checkpoint path
    tolerance: str  # "exact" or "approximate"
    dram_budget: float  # a fraction of the checkpoint's weight bytes
    tokens: int = 64  # held-out tokens, teacher-forced
    offset: int = 0  # where they start in the held-out text
    greedy_prompt: int = 16
    greedy_tokens: int = 16
    determinism_prompt: int = 16

    @property
    def checkpoint(self) -> Path:
        return Path(self.model) if Path(self.model).is_dir() else suite.model_path(self.model)


def load_cases(path: Path = CASES, names: list[str] | None = None) -> list[Case]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the conformance cases ({e})") from e
    known = {f.name for f in fields(Case)}
    cases = []
    for i, table in enumerate(raw.get("cases", [])):
        if set(table) - known or table.get("tolerance") not in ("exact", "approximate"):
            raise ValueError(f"{path}: case #{i + 1}: keys must be among {sorted(known)} and tolerance exact or "
                             f"approximate, got {table}")
        cases.append(Case(**table))
    if names:
        unknown = set(names) - {c.name for c in cases}
        if unknown:
            raise ValueError(f"{path}: no case named {', '.join(sorted(unknown))} "
                             f"(cases: {', '.join(c.name for c in cases)})")
        cases = [c for c in cases if c.name in names]
    return cases


@dataclass
class SubCheck:
    name: str
    passed: bool
    detail: str


@dataclass
class DenseRun:
    tokens: list[int]
    logits: torch.Tensor
    prompt: list[int]
    continuation: list[int]
    tokens_per_s: float  # dense inference in this process, timed as the SUT's performance run is: the reference


def dense_run(case: Case) -> DenseRun:
    ids = encode(suite.heldout_text(), bos=False)[case.offset :]
    tokens = [BOS] + ids[: case.tokens - 1]
    prompt = [BOS] + ids[case.tokens : case.tokens + case.greedy_prompt - 1]
    engine = Engine(Transformer.from_checkpoint(case.checkpoint))
    seconds: list[float] = []
    logits = teacher_forced(engine, tokens, step_seconds=seconds)
    return DenseRun(tokens, logits, prompt, greedy_tokens(engine, prompt, case.greedy_tokens),
                    len(seconds) / sum(seconds))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_case(sut: SystemUnderTest, case: Case, dense: DenseRun, cache_dropped: bool,
             cap: MemoryCap | None = None) -> dict:
    budget = int(case.dram_budget * sum(f.stat().st_size for f in weight_files(case.checkpoint)))
    hello = sut.hello()
    if cap is not None:
        cap.cap(budget + MEMORY_ALLOWANCE)
    try:
        return _measure_case(sut, case, dense, cache_dropped, budget, hello, cap)
    except SUTError as e:
        if cap is None or not cap.oom_kills():
            raise
        memory = SubCheck("audit.memory", False, f"killed by the kernel for holding more than its memory at hello "
                          f"+ DRAM budget {_mib(budget)} + allowance {_mib(MEMORY_ALLOWANCE)} (memory cgroup "
                          f"{cap.group}, limit {_mib(cap.limit)}): {e}")
        return {"case": asdict(case), "sut": hello, "dram_budget_bytes": budget, "tolerance": case.tolerance,
                "valid": False, "subchecks": [asdict(memory)], "accuracy": None, "performance": None,
                "process": {"memory_cap": str(cap.group), "limit": cap.limit}}


def _measure_case(sut: SystemUnderTest, case: Case, dense: DenseRun, cache_dropped: bool, budget: int, hello: dict,
                  cap: MemoryCap | None) -> dict:
    tol = EXACT if case.tolerance == "exact" else APPROXIMATE
    watch = ProcessWatch(sut.pid)
    before = watch.usage()
    peak_reset = watch.reset_peak()
    sut.load(case.checkpoint, budget, case.tolerance)
    samples = [watch.usage()]  # memory held, sampled between phases (never inside the timed steps)
    claimed_at_load, read_at_load = sut.counters().get("bytes_read"), samples[0].read_bytes

    # accuracy
    logits = teacher_forced(sut, dense.tokens)
    continuation = greedy_tokens(sut, dense.prompt, case.greedy_tokens)
    agree = agreement(dense.logits, logits, dense.tokens[1:])
    match = matched_prefix(dense.continuation, continuation)
    subchecks = [SubCheck(f"accuracy.{c.metric}", c.passed,
                          f"{c.value:.4g} {'<=' if c.at_most else '>='} {c.limit:g}")
                 for c in checks(agree, match, len(dense.continuation), tol)]

    samples.append(watch.usage())

    # audits: the same prompt twice, then the performance run against the accuracy run
    prompt = dense.tokens[: case.determinism_prompt]
    first, second = sut.prefill(prompt), sut.prefill(prompt)
    diff = float((first - second).abs().max())
    subchecks.append(SubCheck("audit.determinism", diff <= DETERMINISM_TOLERANCE,
                              f"the same {len(prompt)}-token prompt twice: max |logit difference| {diff:.3g} "
                              f"(<= {DETERMINISM_TOLERANCE:g})"))
    samples.append(watch.usage())
    seconds: list[float] = []  # the harness's clock around every decode step
    timed_logits = teacher_forced(sut, dense.tokens, step_seconds=seconds)
    diff = float((timed_logits - logits).abs().max())
    subchecks.append(SubCheck("audit.performance_matches_accuracy", diff <= DETERMINISM_TOLERANCE,
                              f"every position of the performance run against the accuracy run: max |logit "
                              f"difference| {diff:.3g} (<= {DETERMINISM_TOLERANCE:g})"))
    claims = sut.counters()
    after = watch.usage()
    samples.append(after)
    # Storage: from the end of load on, so that loading resident weights and paging in code do not count.
    claimed = (claims["bytes_read"] - (claimed_at_load or 0)) if isinstance(claims.get("bytes_read"), (int, float)) \
        else None
    storage_read = after.read_bytes - read_at_load
    subchecks.append(_memory_check(before, samples, budget, peak_reset, cap))
    subchecks.append(_storage_check(hello, claimed, storage_read, cache_dropped))

    ms = sorted(s * 1e3 for s in seconds)
    return {
        "case": asdict(case), "sut": hello, "dram_budget_bytes": budget, "tolerance": case.tolerance,
        "valid": all(c.passed for c in subchecks), "subchecks": [asdict(c) for c in subchecks],
        "accuracy": asdict(agree) | {"greedy_matched_tokens": match, "greedy_tokens": len(dense.continuation)},
        "performance": {"tokens": len(seconds), "tokens_per_s": len(seconds) / sum(seconds),
                        "ms_per_token": {"mean": statistics.fmean(ms), "p50": ms[len(ms) // 2],
                                         "p90": ms[int(0.9 * (len(ms) - 1))]},
                        "sut_reported": claims, "dense_reference_tokens_per_s": dense.tokens_per_s},
        "process": {"held_before_load": before.held, "held_peak_sampled": max(u.held for u in samples),
                    "rss_before_load": before.rss, "peak_rss": after.peak_rss, "peak_reset": peak_reset,
                    "storage_read_bytes_decoding": storage_read, "claimed_bytes_read_decoding": claimed,
                    "page_cache_dropped": cache_dropped},
    }


def _memory_check(before, samples, budget: int, peak_reset: bool, cap: MemoryCap | None) -> SubCheck:
    """Judged on the data the process holds (anonymous memory and mapped data files, so mmapped weights count),
    sampled after load and after each phase; the RSS peak, code pages included, is given beside it. A SUT
    process also runs capped by a memory cgroup where the platform allows: over the cap, the kernel kills it."""
    growth = max(u.held for u in samples) - before.held
    rss = samples[-1].peak_rss - before.rss
    how = "" if peak_reset else ", the process's lifetime peak: the kernel would not reset it"
    capped = ("in-process: not capped" if cap is None else f"capped by {cap.group}" if cap.group
              else f"not capped: {cap.reason}")
    return SubCheck("audit.memory", growth <= budget + MEMORY_ALLOWANCE,
                    f"data held from load on, sampled after each phase: {_mib(growth)} <= DRAM budget {_mib(budget)}"
                    f" + allowance {_mib(MEMORY_ALLOWANCE)} (KV cache, activations, runtime); peak RSS growth, "
                    f"code included: {_mib(rss)}{how}; {capped}")


def _storage_check(hello: dict, claimed: float | None, storage_read: int, cache_dropped: bool) -> SubCheck:
    where = f"{_mib(storage_read)} read from storage while decoding (/proc/PID/io)"
    if not cache_dropped:
        where += "; the page cache was not dropped before the SUT started (in-process, or not root)"
    if not hello["flash"]:
        return SubCheck("audit.storage", True, f"claims dense inference (no flash): {where}")
    if storage_read <= 0:
        return SubCheck("audit.storage", False, f"claims flash inference but {where}: its weights came from DRAM or "
                        "the page cache, not from storage")
    if claimed is None:
        return SubCheck("audit.storage", True, f"claims flash inference, reports no bytes_read; {where}")
    return SubCheck("audit.storage", storage_read >= STORAGE_FRACTION * claimed,
                    f"{where} against the {_mib(claimed)} it claims to have read (at least "
                    f"{STORAGE_FRACTION:.0%}): reads it claims but storage never served came from memory")


def validate(make_sut: Callable[[], SystemUnderTest], cases: list[Case], progress=print) -> dict:
    """Every case with a fresh SUT. SUTError propagates: the SUT could not be run."""
    results = []
    for case in cases:
        progress(f"case {case.name}: dense reference on {case.model}")
        dense = dense_run(case)
        # A SUT process starts after the page cache is dropped, so its reads of the model come from storage; an
        # in-process SUT shares the harness's mapped code, which a drop would make it page in again as its own.
        cache_dropped = drop_page_cache()
        sut = make_sut()
        in_process = sut.pid == os.getpid()
        cap = None if in_process else MemoryCap(sut.pid)
        try:
            progress(f"case {case.name}: accuracy, audits and performance of the SUT")
            results.append(run_case(sut, case, dense, cache_dropped and not in_process, cap))
        except SUTError:
            raise
        except Exception as e:  # an in-process SUT's own failure: it could not be run
            raise SUTError(f"the SUT raised {type(e).__name__}: {e}") from e
        finally:
            sut.close()
            if cap is not None:
                cap.remove()
        progress(summary(results[-1]))
    return {"valid": all(r["valid"] for r in results), "cases": results}


def summary(result: dict) -> str:
    case, perf = result["case"], result["performance"]
    lines = [f"case {case['name']} ({case['model']}, {case['tolerance']} tolerance, DRAM budget "
             f"{_mib(result['dram_budget_bytes'])}): {'VALID' if result['valid'] else 'INVALID'}"]
    lines += [f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in result["subchecks"]]
    if perf is None:
        return "\n".join(lines + ["  performance: not measured (the SUT was killed)"])
    own = perf["sut_reported"].get("ms_per_token")
    lines.append(f"  performance: {perf['tokens_per_s']:.3g} tokens/s over {perf['tokens']} decode steps "
                 f"(ms per token p50 {perf['ms_per_token']['p50']:.2f}, p90 {perf['ms_per_token']['p90']:.2f}); "
                 f"dense inference in the harness, same tokens: {perf['dense_reference_tokens_per_s']:.3g} tokens/s"
                 + (f"; the SUT's breakdown: " + ", ".join(f"{k} {v:.2f}" for k, v in own.items()) if own else ""))
    return "\n".join(lines)
