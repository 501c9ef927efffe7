"""`flashbench validate`: the conformance suite run against a SUT, in two modes (as MLPerf does), with audits.

For each case (suite/conformance/cases.toml: a model, a DRAM budget, held-out text and a tolerance tier):
- accuracy: the SUT's teacher-forced logits and free-running greedy continuation against the dense reference,
  judged by the harness's agreement checks at the case's tier;
- performance: teacher-forced over *other* held-out tokens, from an offset drawn at random for the run (seeded;
  the seed is printed and recorded), each step timed by the harness; tokens/s, and the SUT's own breakdown if it
  gives one (reported, never judged). Nothing the SUT saw before comes again, so a SUT that remembers answers
  gets no speed from its memory (MLPerf's TEST04);
- audits: the same prompt twice gives the same logits; the performance run's own logits agree with dense inference
  on its tokens at the case's tier (MLPerf's TEST01: a SUT may not answer differently, or guess, when it is timed);
  the process's memory stays within the budget; a SUT that claims flash inference read from storage
  (/proc/PID/io) during the timed run at least what it says it read then.
A case is VALID when every sub-check passes. A SUT that cannot be run (crash, hang, broken protocol, an exception
in an in-process SUT's call) is exit 2; an exception in the harness's own code is a bug and shows its traceback.
"""

from __future__ import annotations

import os
import random
import secrets
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from flashbench import suite
from flashbench.reference import Engine, Transformer
from flashbench.reference.checkpoint import weight_files
from flashbench.reference.errors import FlashbenchError
from flashbench.reference.tokenizer import Tokenizer

from .agreement import (APPROXIMATE, Check, DenseReference, agreement, checks, dense_reference, exact_tier, greedy,
                        heldout_sequences, judge, teacher_forced)
from .peers import drop_page_cache
from .stats import spread
from .sut import Guarded, MemoryCap, ProcessWatch, SUTError, SystemUnderTest, reported

CASES = suite.SUITE_DIR / "conformance" / "cases.toml"  # the default conformance suite
DETERMINISM_TOLERANCE = 1e-6  # max |logit difference| between two runs of the same input
MEMORY_ALLOWANCE = 64 << 20  # data held beyond the budget: KV cache, activations, runtime buffers
# A flash SUT's timed run must have made the kernel read from storage at least this much of the bytes it says it read
# then: direct reads count exactly; the rest allows for reads a filesystem serves from its own metadata or merges.
STORAGE_FRACTION = 0.9


class CaseError(FlashbenchError):
    """A conformance cases file that cannot be used; the message names the file and the case."""


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # an embedded model's name or a checkpoint path
    tolerance: str  # "exact" or "approximate"
    dram_budget: float  # a fraction of the checkpoint's weight bytes
    tokens: int = 64  # held-out tokens, teacher-forced (accuracy, and again other ones for performance)
    offset: int = 0  # where the accuracy run's tokens start in the held-out text
    greedy_prompt: int = 16
    greedy_tokens: int = 16
    determinism_prompt: int = 16

    @property
    def checkpoint(self) -> Path:
        return Path(self.model) if Path(self.model).is_dir() else suite.model_path(self.model)


def load_cases(path: Path = CASES, names: list[str] | None = None) -> list[Case]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CaseError(f"{path}: cannot read the conformance cases ({e})") from e
    known = {f.name for f in fields(Case)}
    cases = []
    for i, table in enumerate(raw.get("cases", [])):
        where = f"{path}: case #{i + 1}"
        if set(table) - known or table.get("tolerance") not in ("exact", "approximate"):
            raise CaseError(f"{where}: keys must be among {sorted(known)} and tolerance exact or approximate, "
                             f"got {table}")
        try:
            case = Case(**table)
        except TypeError as e:
            raise CaseError(f"{where}: {e}") from e
        counts = {k: getattr(case, k) for k in ("tokens", "offset", "greedy_prompt", "greedy_tokens",
                                                "determinism_prompt")}
        if any(type(v) is not int for v in counts.values()) or not isinstance(case.dram_budget, (int, float)):
            raise CaseError(f"{where}: token counts must be integers and dram_budget a number, got {table}")
        if case.tokens < 3 or case.offset < 0 or min(case.greedy_prompt, case.greedy_tokens,
                                                     case.determinism_prompt) < 1 or case.dram_budget <= 0:
            raise CaseError(f"{where}: tokens must be at least 3 (a one-token prefill, then at least one timed "
                             f"decode step), offset >= 0, the greedy and determinism counts >= 1 and dram_budget > 0; "
                             f"got {table}")
        cases.append(case)
    if names:
        unknown = set(names) - {c.name for c in cases}
        if unknown:
            raise CaseError(f"{path}: no case named {', '.join(sorted(unknown))} "
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
    """The harness's dense inference for one case: the accuracy run's reference, and the performance run's tokens
    with their dense logits (for the TEST01 audit)."""

    accuracy: DenseReference
    performance_offset: int
    performance_tokens: list[int]
    performance_logits: torch.Tensor


def performance_offset(case: Case, heldout: int, seed: int) -> int:
    """Where the performance run's tokens start: drawn from `seed` and the case's name, clear of the accuracy run's
    tokens and the greedy prompt."""
    rng = random.Random(f"{seed}:{case.name}")
    used = range(case.offset - case.tokens, case.offset + case.tokens + case.greedy_prompt)
    while (start := rng.randrange(0, heldout - case.tokens)) in used:
        pass
    return start


def dense_run(case: Case, seed: int) -> DenseRun:
    model = Transformer.from_checkpoint(case.checkpoint)
    tokenizer = Tokenizer.load(case.checkpoint, model.config)
    ids = tokenizer.encode(suite.heldout_text(), bos=False)
    tokens, prompt = heldout_sequences(ids, tokenizer.bos, case.tokens, case.greedy_prompt, case.offset)
    engine = Engine(model)
    reference = dense_reference(engine, tokens, prompt, case.greedy_tokens, torch.float32)
    start = performance_offset(case, len(ids), seed)
    timed = heldout_sequences(ids, tokenizer.bos, case.tokens, offset=start)[0]
    return DenseRun(reference, start, timed, teacher_forced(engine, timed))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def run_case(sut: SystemUnderTest, case: Case, dense: DenseRun, cache_dropped: bool,
             cap: MemoryCap | None = None) -> dict:
    budget = int(case.dram_budget * sum(f.stat().st_size for f in weight_files(case.checkpoint)))
    calls = Guarded(sut)
    hello = calls.hello()
    if cap is not None:
        cap.cap(budget + MEMORY_ALLOWANCE)
    try:
        return _measure_case(calls, sut.pid, case, dense, cache_dropped, budget, hello, cap)
    except SUTError as e:
        if cap is None or not cap.oom_kills():
            raise
        memory = SubCheck("audit.memory", False, f"killed by the kernel for holding more than its memory at hello "
                          f"+ DRAM budget {_mib(budget)} + allowance {_mib(MEMORY_ALLOWANCE)} (memory cgroup "
                          f"{cap.group}, limit {_mib(cap.limit)}): {e}")
        return {"case": asdict(case), "sut": hello, "dram_budget_bytes": budget, "tolerance": case.tolerance,
                "valid": False, "subchecks": [asdict(memory)], "accuracy": None, "performance": None,
                "process": {"memory_cap": str(cap.group), "limit": cap.limit}}


def _measure_case(sut: Guarded, pid: int, case: Case, dense: DenseRun, cache_dropped: bool, budget: int,
                  hello: dict, cap: MemoryCap | None) -> dict:
    ref = dense.accuracy
    approximate = None if case.tolerance == "exact" else APPROXIMATE
    watch = ProcessWatch(pid)
    before = watch.usage()
    peak_reset = watch.reset_peak()
    sut.load(hello, case.checkpoint, budget, case.tolerance)
    samples = [watch.usage()]  # memory held, sampled between phases (never inside the timed steps)
    sut.counters()

    # accuracy
    logits = teacher_forced(sut, ref.tokens)
    continuation = greedy(sut, ref.prompt, case.greedy_tokens).tokens
    verdict = judge(ref, logits, continuation, approximate)
    subchecks = [SubCheck(f"accuracy.{c.metric}", c.passed, c.describe()) for c in verdict.checks]
    samples.append(watch.usage())

    # determinism: the same prompt twice
    prompt = ref.tokens[: case.determinism_prompt]
    first, second = sut.prefill(prompt), sut.prefill(prompt)
    diff = float((first - second).abs().max())
    subchecks.append(SubCheck("audit.determinism", diff <= DETERMINISM_TOLERANCE,
                              f"the same {len(prompt)}-token prompt twice: max |logit difference| {diff:.3g} "
                              f"(<= {DETERMINISM_TOLERANCE:g})"))
    samples.append(watch.usage())

    # performance: tokens the SUT has not seen, every decode step timed by the harness
    claims_before, read_before = sut.counters(), watch.usage().read_bytes
    seconds: list[float] = []
    timed_logits = teacher_forced(sut, dense.performance_tokens, step_seconds=seconds)
    after = watch.usage()
    claims = sut.counters()
    samples.append(after)
    subchecks.append(_performance_accuracy_check(dense, timed_logits, ref.tie_margin,
                                                 approximate or exact_tier(ref.logit_bound), verdict.tier))
    subchecks.append(_memory_check(before, samples, budget, peak_reset, cap))
    claimed = reported(claims, "bytes_read")
    if claimed is not None:
        claimed -= reported(claims_before, "bytes_read") or 0
    storage_read = after.read_bytes - read_before
    subchecks.append(_storage_check(hello, claimed, storage_read, cache_dropped))

    return {
        "case": asdict(case), "sut": hello, "dram_budget_bytes": budget, "tolerance": case.tolerance,
        "valid": all(c.passed for c in subchecks), "subchecks": [asdict(c) for c in subchecks],
        "accuracy": asdict(verdict.agreement) | verdict.as_dict(),
        "performance": {"offset": dense.performance_offset, "tokens": len(seconds),
                        "tokens_per_s": len(seconds) / sum(seconds), "ms_per_token": spread([s * 1e3 for s in seconds]),
                        "sut_reported_before": claims_before, "sut_reported": claims,
                        "dense_reference_tokens_per_s": ref.tokens_per_s},
        "process": {"held_before_load": before.held, "held_peak_sampled": max(u.held for u in samples),
                    "rss_before_load": before.rss, "peak_rss": after.peak_rss, "peak_reset": peak_reset,
                    "storage_read_bytes_timed": storage_read, "claimed_bytes_read_timed": claimed,
                    "page_cache_dropped": cache_dropped},
    }


def _performance_accuracy_check(dense: DenseRun, logits: torch.Tensor, tie_margin: float, tol, tier: str) -> SubCheck:
    """TEST01: the timed run's own answers, at every position, against dense inference on its tokens, by the
    teacher-forced checks of the case's tier."""
    a = agreement(dense.performance_logits, logits, dense.performance_tokens[1:], tie_margin)
    failed = [c for c in checks(a, None, tol) if not c.passed]
    shown = failed or [Check("max_abs_logit_diff", a.max_abs_logit_diff, tol.max_abs_logit_diff, True)]
    return SubCheck("audit.performance_accuracy", not failed,
                    f"the timed run's {a.tokens} positions (held-out tokens from offset {dense.performance_offset}) "
                    f"against dense inference on them, {tier} tier: "
                    + "; ".join(f"{c.metric} {c.describe()}" for c in shown))


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
    where = f"{_mib(storage_read)} read from storage during the timed run (/proc/PID/io)"
    if not cache_dropped:
        where += "; the page cache was not dropped before the SUT started (in-process, or not root)"
    if not hello["flash"]:
        return SubCheck("audit.storage", True, f"claims dense inference (no flash): {where}")
    if storage_read <= 0:
        return SubCheck("audit.storage", False, f"claims flash inference but {where}: its weights came from DRAM or "
                        "the page cache, not from storage")
    if claimed is None:
        return SubCheck("audit.storage", True, f"claims flash inference, reports no bytes_read; {where}")
    passed = storage_read >= STORAGE_FRACTION * claimed
    verdict = ("storage served what it claims" if passed else
               "reads it claims but storage never served came from memory")
    return SubCheck("audit.storage", passed, f"{where} against the {_mib(claimed)} it claims to have read then "
                    f"(at least {STORAGE_FRACTION:.0%} must come from storage): {verdict}")


def validate(make_sut: Callable[[], SystemUnderTest], cases: list[Case], progress=print,
             seed: int | None = None) -> dict:
    """Every case with a fresh SUT. SUTError propagates: the SUT could not be run. `seed` draws the performance
    runs' tokens (default: a fresh one, recorded)."""
    seed = secrets.randbits(32) if seed is None else seed
    progress(f"performance runs on held-out tokens drawn with seed {seed} (--seed {seed} repeats them)")
    results = []
    for case in cases:
        progress(f"case {case.name}: dense reference on {case.model}")
        dense = dense_run(case, seed)
        # A SUT process starts after the page cache is dropped, so its reads of the model come from storage; an
        # in-process SUT shares the harness's mapped code, which a drop would make it page in again as its own.
        cache_dropped = drop_page_cache()
        try:
            sut = make_sut()
        except SUTError:
            raise
        except Exception as e:  # the SUT's own constructor
            raise SUTError(f"the SUT raised {type(e).__name__} when it was made: {e}") from e
        in_process = sut.pid == os.getpid()
        cap = None if in_process else MemoryCap(sut.pid)
        try:
            progress(f"case {case.name}: accuracy, audits and performance of the SUT")
            results.append(run_case(sut, case, dense, cache_dropped and not in_process, cap))
        finally:
            sut.close()
            if cap is not None:
                cap.remove()
        progress(summary(results[-1]))
    return {"valid": all(r["valid"] for r in results), "seed": seed, "cases": results}


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
                 f"dense inference in the harness: {perf['dense_reference_tokens_per_s']:.3g} tokens/s"
                 + ("; the SUT's breakdown: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, (int, float)) else
                                                            f"{k} {v!r:.40}" for k, v in own.items())
                    if isinstance(own, dict) else ""))
    return "\n".join(lines)
