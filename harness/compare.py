"""`flashbench compare`: a candidate run's records against a baseline's, with gates that say what regressed.

Figures are gated by what they can honestly be compared on:
- counters (bytes, reads and neurons per token) are deterministic for a scenario: exact gate, they must not grow;
- same-run ratios (speedup over naive, the reader's bandwidth as a fraction of fio's) were both measured on one
  machine in one run, so they travel between machines: a tolerance gate;
- raw times (tokens/s) are shown, but a rule on them is refused unless both runs come from the same machine.
Timed figures are gated on each model's geometric mean over its configurations: one configuration's timing in one
run is too noisy to gate alone (smoke runs of one commit here differ by up to 60% in single configurations; the
per-model mean of the speedup over naive fell by up to 21% and rose by up to 36%, hence the default tolerance of
30%). Every ratio column is candidate against baseline, oriented so that > 1 is better.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from flashbench.reference.errors import FlashbenchError

from .records import SCHEMA, speedup_over_naive
from .report import Table, load_run, to_markdown

COUNTER, RATIO, TIME = "counter", "same-run ratio", "raw time"


class CompareError(FlashbenchError):
    """Records that cannot be compared (unreadable, another schema or scenario, a raw-time rule across machines)."""


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    higher_is_better: bool
    label: str
    value: Callable[[dict, dict | None], float | None]  # (configuration record, the same run's naive record)


def _per_token(key: str):
    return lambda rec, naive: rec["metrics"].get("per_token", {}).get(key)


METRICS = {m.name: m for m in (
    Metric("bytes_per_token", COUNTER, False, "bytes/token", _per_token("bytes_read")),
    Metric("reads_per_token", COUNTER, False, "reads/token", _per_token("reads")),
    Metric("neurons_per_token", COUNTER, False, "neurons/token", _per_token("neurons")),
    Metric("speedup_over_naive", RATIO, True, "speedup over naive", speedup_over_naive),
    Metric("fio_fraction", RATIO, True, "fraction of fio",
           lambda rec, naive: (rec.get("fio_reference") or {}).get("ratio")),
    Metric("bound_ratio", RATIO, False, "latency / machine bound",
           lambda rec, naive: (rec.get("bound") or {}).get("ratio")),
    Metric("tokens_per_s", TIME, True, "tokens/s", lambda rec, naive: rec["metrics"]["tokens_per_s"]),
)}
VERDICTS = "verdicts"
# fio_fraction is left to ask for: on a virtual disk whose host caches files, fio itself swings 3x between runs
# (two fresh smoke probes here: 200 and 633 MiB/s at 64 KiB x 16), so the fraction is no gate there.
DEFAULT_RULES = "counters,verdicts,speedup_over_naive:30%"


@dataclass(frozen=True)
class Rule:
    metric: str  # a METRICS name, or VERDICTS
    tolerance: float = 0.0  # how much worse the candidate may be, as a fraction of the baseline

    def __str__(self) -> str:
        if self.metric == VERDICTS:
            return "verdicts: no check that passed may fail"
        kind = METRICS[self.metric].kind
        if kind == COUNTER:
            return f"{self.metric}: must not grow" + (f" by more than {self.tolerance:.0%}" if self.tolerance else "")
        worse = "fall" if METRICS[self.metric].higher_is_better else "grow"
        return f"{self.metric}: may {worse} by at most {self.tolerance:.0%}"


def parse_rules(text: str) -> list[Rule]:
    """"counters,verdicts,speedup_over_naive:15%" -> rules; "counters" is the three counters, "none" is no rule."""
    rules: list[Rule] = []
    for item in (s.strip() for s in text.split(",")):
        if not item or item == "none":
            continue
        name, _, tol = item.partition(":")
        try:
            tolerance = float(tol.rstrip("%")) / (100 if tol.endswith("%") else 1) if tol else None
        except ValueError:
            raise CompareError(f"--fail-on {item!r}: tolerance must be a number or a percentage, like 15%") from None
        names = [m.name for m in METRICS.values() if m.kind == COUNTER] if name == "counters" else [name]
        for n in names:
            if n == VERDICTS:
                if tolerance is not None:
                    raise CompareError(f"--fail-on {item!r}: verdicts take no tolerance")
                rules.append(Rule(VERDICTS))
            elif n in METRICS:
                default = 0.0 if METRICS[n].kind == COUNTER else 0.10
                rules.append(Rule(n, default if tolerance is None else tolerance))
            else:
                raise CompareError(f"--fail-on {item!r}: unknown metric {n!r}; known: counters, {VERDICTS}, "
                                   + ", ".join(METRICS))
    return rules


@dataclass
class RunRecords:
    path: Path
    index: dict
    probe: dict | None
    configurations: dict[tuple[str, str], dict]  # (model, configuration) -> record

    @property
    def label(self) -> str:
        return f"{self.index['run_id']} ({self.path})"

    def naive(self, model: str) -> dict | None:
        return self.configurations.get((model, "naive"))


def load(path: str | Path) -> RunRecords:
    """A finished run folder (or its run.json). An interrupted run has records but no run.json, and is refused."""
    path = Path(path)
    run_dir = path.parent if path.name == "run.json" else path
    index_path = run_dir / "run.json"
    if not index_path.is_file():
        raise CompareError(f"{run_dir}: no run.json: not a finished run folder (an interrupted run leaves whole "
                           "records but no run.json)")
    try:
        index, probe, configs, _, _ = load_run(run_dir)
    except json.JSONDecodeError as e:
        raise CompareError(f"{index_path}: not valid JSON ({e})") from e
    except (KeyError, ValueError) as e:
        raise CompareError(f"{run_dir}: {e}") from e
    if index.get("schema") != SCHEMA:
        raise CompareError(f"{index_path}: records of schema {index.get('schema', 'none (older than schema 1)')}; "
                           f"this flashbench reads schema {SCHEMA}: run the scenario again")
    by_key = {(model, r["configuration"]): r for model, recs in configs.items() for r in recs}
    return RunRecords(run_dir, index, probe, by_key)


def check_comparable(base: RunRecords, cand: RunRecords) -> None:
    """Same schema and the same scenario (its parsed contents, not its path): else a comparison would mislead."""
    a, b = base.index["scenario"], cand.index["scenario"]
    if a["name"] != b["name"] or a["raw"] != b["raw"]:
        keys = sorted({k for k in set(a["raw"]) | set(b["raw"]) if a["raw"].get(k) != b["raw"].get(k)})
        raise CompareError(f"{cand.label} ran scenario {b['name']!r}, {base.label} ran {a['name']!r}"
                           + (f" (they differ in: {', '.join(keys)})" if keys else "")
                           + ": records of different scenarios are not compared")


def machine_key(index: dict) -> tuple:
    m = index["machine"]
    s = m.get("storage", {})
    return (m.get("hostname"), m.get("cpu"), m.get("cores"), m.get("ram_bytes"), s.get("device"), s.get("filesystem"))


def describe_machine(index: dict) -> str:
    m = index["machine"]
    s = m.get("storage", {})
    where = f"{s.get('device', '?')} ({s.get('filesystem', '?')}{', in memory' if s.get('in_memory') else ''})"
    ram = (m.get("ram_bytes") or 0) / 2**30
    return f"{m.get('hostname')}: {m.get('cpu')}, {m.get('cores')} cores, {ram:.0f} GiB, {where}"


@dataclass
class Regression:
    model: str
    configuration: str
    metric: str
    message: str


@dataclass
class Comparison:
    baseline: str
    candidate: str
    same_machine: bool
    rules: list[str]
    rows: list[dict] = field(default_factory=list)  # per configuration
    means: list[dict] = field(default_factory=list)  # per model and timed metric: geometric means, what is gated
    regressions: list[Regression] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.regressions

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def _ratio(base: float | None, cand: float | None, higher_is_better: bool) -> float | None:
    """Candidate against baseline, > 1 better."""
    if base is None or cand is None:
        return None
    num, den = (cand, base) if higher_is_better else (base, cand)
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def _verdict(rec: dict) -> str:
    a = rec.get("agreement", {})
    return "n/a" if "not_applicable" in a or "passed" not in a else ("PASS" if a["passed"] else "FAIL")


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _counter_gate(rule: Rule, key: str, base: float | None, cand: float | None) -> str | None:
    if base is None and cand is None:  # a SUT that reports no counters: nothing to gate
        return None
    if base is None or cand is None:
        return f"{key}: {rule.metric} reported in {'the candidate' if base is None else 'the baseline'} only"
    if cand > base * (1 + rule.tolerance) * (1 + 1e-9):
        growth = f"+{cand / base - 1:.1%}" if base else "from zero"
        return (f"{key}: {rule.metric} grew from {base:,.1f} to {cand:,.1f} ({growth}); "
                f"counters are deterministic: {rule}")
    return None


def _timed_gate(rule: Rule, model: str, configurations: list[str], base: float, cand: float) -> str | None:
    higher_is_better = METRICS[rule.metric].higher_is_better
    worse = cand < base * (1 - rule.tolerance) if higher_is_better else cand > base * (1 + rule.tolerance)
    if worse:
        return (f"{model}: {rule.metric} (geometric mean over {len(configurations)} configurations) "
                f"{'fell' if higher_is_better else 'grew'} from {base:.3g} to {cand:.3g} ({cand / base - 1:+.1%}; "
                f"{rule})")
    return None


def _verdict_regression(key: str, base: dict, cand: dict) -> str | None:
    """The agreement checks that passed in the baseline and fail in the candidate (a check already failing in the
    baseline is a known finding, not a regression)."""
    if "checks" not in base.get("agreement", {}) or "checks" not in cand.get("agreement", {}):
        return None
    passed = {c["metric"] for c in base["agreement"]["checks"] if c["passed"]}
    broken = [c for c in cand["agreement"]["checks"] if not c["passed"] and c["metric"] in passed]
    if not broken:
        return None
    detail = "; ".join(f"{c['metric']} {c['value']:.4g} (limit {'<=' if c['at_most'] else '>='} {c['limit']:g})"
                       for c in broken)
    return (f"{key}: agreement with dense inference broke ({cand['agreement']['tolerance']} tolerance): {detail}; "
            "these checks passed in the baseline")


def compare(base: RunRecords, cand: RunRecords, rules: list[Rule]) -> Comparison:
    check_comparable(base, cand)
    same = machine_key(base.index) == machine_key(cand.index)
    timed = [r.metric for r in rules if r.metric in METRICS and METRICS[r.metric].kind == TIME]
    if timed and not same:
        raise CompareError(f"--fail-on {', '.join(timed)}: a raw time, and the runs come from different machines "
                           f"({describe_machine(base.index)} / {describe_machine(cand.index)}); gate the same-run "
                           "ratios (speedup_over_naive, fio_fraction, bound_ratio) instead")
    out = Comparison(str(base.path), str(cand.path), same, [str(r) for r in rules])
    engines: dict[tuple[str, str], list[str]] = {}  # (baseline's, candidate's) fio engine -> configurations
    alternated: list[str] = []  # configurations whose speedup over naive was alternated with naive in one run only
    for (model, name), b in base.configurations.items():
        key = f"{model}/{name}"
        c = cand.configurations.get((model, name))
        if c is None:
            out.regressions.append(Regression(model, name, "configuration", f"{key}: measured in the baseline, "
                                              "missing from the candidate"))
            continue
        if b["status"] != "measured" or c["status"] != "measured":
            if b["status"] == "measured":
                out.regressions.append(Regression(model, name, "status", f"{key}: {c['status']} in the candidate "
                                                  f"({c.get('error', 'no reason given')}), measured in the baseline"))
            elif c["status"] == "measured":
                out.notes.append(f"{key}: {b['status']} in the baseline, measured in the candidate")
            continue
        row = {"model": model, "configuration": name, "verdict": {"baseline": _verdict(b), "candidate": _verdict(c)},
               "metrics": {}}
        for metric in METRICS.values():
            bv, cv = metric.value(b, base.naive(model)), metric.value(c, cand.naive(model))
            row["metrics"][metric.name] = {"baseline": bv, "candidate": cv,
                                           "ratio": _ratio(bv, cv, metric.higher_is_better)}
        out.rows.append(row)
        refs = [(rec.get("fio_reference") or {}).get("ioengine") for rec in (b, c)]
        if all(refs) and refs[0] != refs[1]:
            engines.setdefault(tuple(refs), []).append(key)
        if bool(b.get("alternated_with_naive")) != bool(c.get("alternated_with_naive")):
            alternated.append(key)
        for rule in rules:
            if rule.metric == VERDICTS:
                message = _verdict_regression(key, b, c)
            elif METRICS[rule.metric].kind == COUNTER:
                v = row["metrics"][rule.metric]
                message = _counter_gate(rule, key, v["baseline"], v["candidate"])
            else:
                continue  # timed: gated per model below
            if message:
                out.regressions.append(Regression(model, name, rule.metric, message))
    _model_means(out, rules)
    for (was, now), keys in engines.items():  # the reference moved, not only the reads (psync's until 2026-12-05)
        out.notes.append(f"{len(keys)} configurations set beside another fio engine (baseline {was}, candidate {now}: "
                         f"{', '.join(keys)}): their fraction of fio and bound ratio moved with the reference too")
    if alternated:
        out.notes.append(f"{len(alternated)} configurations timed alternately with naive in one run only "
                         f"({', '.join(alternated)}): their speedup over naive is of the same moments in that run, "
                         "of two configurations' turns in the other")
    for run in (base, cand):
        if run.probe and run.probe.get("cached_from"):
            out.notes.append(f"{run.label}: its probe was cached from {run.probe['measured_at']}, so its fraction "
                             "of fio sets this run's reader beside an earlier fio: not a same-run ratio (a "
                             "scenario's [probe] fresh = true measures it in every run)")
    extra = sorted(set(cand.configurations) - set(base.configurations))
    if extra:
        out.notes.append("in the candidate only (not compared): " + ", ".join(f"{m}/{n}" for m, n in extra))
    return out


def _model_means(out: Comparison, rules: list[Rule]) -> None:
    """Each model's geometric mean of every timed metric over the configurations measured in both runs (naive
    left out of the speedup over itself), and the gates on them."""
    gated = {r.metric: r for r in rules if r.metric in METRICS and METRICS[r.metric].kind != COUNTER}
    for model in dict.fromkeys(r["model"] for r in out.rows):
        for metric in (m for m in METRICS.values() if m.kind != COUNTER):
            pairs = [(r["configuration"], r["metrics"][metric.name]) for r in out.rows if r["model"] == model
                     and not (metric.name == "speedup_over_naive" and r["configuration"] == "naive")]
            pairs = [(n, v) for n, v in pairs if v["baseline"] and v["candidate"]]
            if not pairs:
                continue
            names = [n for n, _ in pairs]
            base, cand = geomean([v["baseline"] for _, v in pairs]), geomean([v["candidate"] for _, v in pairs])
            out.means.append({"model": model, "metric": metric.name, "configurations": names, "baseline": base,
                              "candidate": cand, "ratio": _ratio(base, cand, metric.higher_is_better)})
            message = _timed_gate(gated[metric.name], model, names, base, cand) if metric.name in gated else None
            if message:
                out.regressions.append(Regression(model, "(geometric mean)", metric.name, message))


def _cell(ratio: float | None) -> str:
    return "-" if ratio is None else ("inf" if math.isinf(ratio) else f"{ratio:.2f}")


def table(result: Comparison) -> Table:
    names = list(METRICS)
    headers = ["configuration"] + [f"{METRICS[n].label} ({METRICS[n].kind})" for n in names] + ["agreement"]
    rows = []
    for r in result.rows:
        v = r["verdict"]
        verdict = v["candidate"] if v["baseline"] == v["candidate"] else f"{v['baseline']} -> {v['candidate']}"
        rows.append([f"{r['model']}/{r['configuration']}"] + [_cell(r["metrics"][n]["ratio"]) for n in names]
                    + [verdict])
    for model in dict.fromkeys(m["model"] for m in result.means):
        mean = {m["metric"]: m["ratio"] for m in result.means if m["model"] == model}
        rows.append([f"{model}: geometric mean"] + [_cell(mean.get(n)) if n in mean else "" for n in names] + [""])
    return Table(headers, rows)


def render(result: Comparison, base: RunRecords, cand: RunRecords) -> str:
    lines = [f"baseline:  {base.label}, commit {(base.index['git'].get('commit') or 'unknown')[:12]}, "
             f"{describe_machine(base.index)}",
             f"candidate: {cand.label}, commit {(cand.index['git'].get('commit') or 'unknown')[:12]}, "
             f"{describe_machine(cand.index)}",
             "same machine: " + ("yes" if result.same_machine else "no (raw times are shown, never gated)"),
             "rules: " + ("; ".join(result.rules) or "none"),
             "",
             "Candidate against baseline, each column oriented so that > 1 is better:",
             to_markdown([table(result)]).rstrip()]
    lines += [f"note: {n}" for n in result.notes]
    if result.regressions:
        lines += ["", f"REGRESSED: {len(result.regressions)} finding(s)"]
        lines += [f"  - {r.message}" for r in result.regressions]
    else:
        lines += ["", f"PASSED: no regression under {len(result.rules)} rule(s)"]
    return "\n".join(lines)
