"""Records -> report: reports/<run-id>/report.md, a self-contained report.html, results.csv and plots.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered twice, as
Markdown and as HTML with the plots embedded, so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .agreement import APPROXIMATE, LOGIT_ULPS
from .records import RecordError, speedup_over_naive

MIB = 1024 * 1024
# The paper's own figures (OPT 6.7B, fp16, M1 Max, DRAM budget ~50%): Table 2 (I/O only) and Table 3.
PAPER_TABLE2 = {  # configuration -> (flash->DRAM GB per token, throughput GB/s, I/O ms per token)
    "naive": (13.4, 6.1, 2196), "hybrid": (6.7, 6.1, 1090), "hybrid+predictor": (0.9, 1.25, 738),
    "hybrid+predictor+windowing": (0.2, 1.25, 164), "hybrid+predictor+windowing+bundling": (0.2, 2.25, 87),
}
PAPER_TABLE3 = {  # (I/O, memory management, compute, total) ms per token, OPT 6.7B on the M1 Max CPU
    "naive": (2196, 0, 986, 3182), "all": (105, 58, 506, 669),
}
TABLE2_ROWS = list(PAPER_TABLE2)


# ---- blocks ------------------------------------------------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Pre:
    text: str


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            out.append("\n".join(["| " + " | ".join(cell(h) for h in b.headers) + " |",
                                  "|" + "---|" * len(b.headers)]
                                 + ["| " + " | ".join(cell(c) for c in r) + " |" for r in b.rows]))
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}]({b.path.name})\n\n*{b.caption}*")
        elif isinstance(b, Pre):
            out.append("```\n" + b.text + "\n```")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list, title: str) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(str(h))}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode()
            body.append(f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(b.caption)}</figcaption></figure>")
        elif isinstance(b, Pre):
            body.append(f"<pre>{e(b.text)}</pre>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}figcaption{font-style:italic;color:#555}pre{background:#f7f7f7;padding:1em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


# ---- loading -----------------------------------------------------------------------------------------------------


def load_run(run_dir: Path) -> tuple[dict, dict | None, dict[str, list[dict]], dict[str, dict], dict[str, list[dict]]]:
    """(run index, probe record, configuration records per model, model record per model, peers per model)."""
    index = json.loads((run_dir / "run.json").read_text())
    probe, configs, models, peers = None, {}, {}, {}
    for rel in index["records"]:
        path = run_dir / "records" / rel
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecordError(f"{path}: unreadable record ({e})") from e
        kind = rec.get("kind")
        if kind == "probe":
            probe = rec["probe"]
        elif kind == "model":
            models[rec["model"]] = rec
        elif kind == "configuration":
            configs.setdefault(rec["model"], []).append(rec)
        elif kind == "peer":
            peers.setdefault(rec["model"], []).append(rec)
    return index, probe, configs, models, peers


# ---- formatting helpers ------------------------------------------------------------------------------------------


def _get(d: dict | None, path: str):
    """d["a"]["b"] for path "a.b", or None where a SUT did not report it (only the reference engine reports its
    decode steps in detail)."""
    for key in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _mean_p90(m: dict, part: str) -> str:
    mean, p90 = _get(m, f"ms.{part}.mean"), _get(m, f"ms.{part}.p90")
    return "-" if mean is None else f"{mean:.2f}" + ("" if p90 is None else f" ({p90:.2f})")


def _dram_weights(r: dict) -> str:
    d = r.get("dram")
    if not d:
        return "-"
    cache = d.get("cache_held", d.get("cache_peak_used", d["cache"]))
    return _bytes(d["resident"] + cache + d["buffers"] + d["source"] + d.get("staging", 0))


def _f(x, fmt: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _verdict(rec: dict) -> str:
    if rec["status"] != "measured":
        return rec["status"]
    a = rec["agreement"]
    if "not_applicable" in a:
        return "n/a"
    failed = [c["metric"] for c in a["checks"] if not c["passed"]]
    return ("PASS" if a["passed"] else "FAIL: " + ", ".join(failed)) + f" ({a['tolerance']})"


def _by_name(records: list[dict]) -> dict[str, dict]:
    return {r["configuration"]: r for r in records}


def _all_name(records: list[dict]) -> str | None:
    return next((r["configuration"] for r in records if "all" in r["sections"]), None)


def _speedup(rec: dict, naive: dict | None) -> str:
    """The speedup over naive; "alternated" where it is of steps alternated with a naive SUT's."""
    ratio = speedup_over_naive(rec, naive)
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" + (" alternated" if rec.get("alternated_with_naive") else "")


# ---- sections ----------------------------------------------------------------------------------------------------


def _header(index: dict, probe: dict | None) -> list:
    m, g = index["machine"], index["git"]
    storage = probe["storage"] if probe else {}
    sc = index["scenario"]
    blocks = [
        Heading(1, f"flashbench report: {index['run_id']}"),
        Para(f"Scenario {sc['name']} ({sc['path']}), {index['seconds']:.0f} s. "
             f"Commit {g.get('commit') or 'unknown'}{' (with uncommitted changes)' if g.get('dirty') else ''}."
             + (f" Measured for the scenario's \"auto\" settings when it loaded: {auto['why']}"
                + "".join(f"; {k} = {v}" for k, v in auto.get("resolved", {}).items()) + "."
                if (auto := sc.get("compute")) else "")),
        Table(["machine", ""], [
            ["CPU", f"{m['cpu']} ({m['cores']} cores)"], ["RAM", _bytes(m["ram_bytes"])],
            ["kernel", m["kernel"]], ["storage", f"{storage.get('device', '?')} ({storage.get('filesystem', '?')}, "
                                                 f"mounted at {storage.get('mount_point', '?')})"],
            ["packages", ", ".join(f"{k} {v}" for k, v in index["versions"].items() if v)],
        ]),
    ]
    return blocks


def _probe_section(probe: dict | None) -> list:
    blocks = [Heading(2, "Storage probe")]
    if probe is None:
        return blocks + [Para("No probe record in this run.")]
    p = probe
    source = "fio" if p["tool"] == "fio" else f"flashbench's own reader: fio was not usable ({p['fio_error']})"
    cached = f" Cached from {p['cached_from']} (measured {p['measured_at']})." if p.get("cached_from") else \
        f" Measured in this run ({p['measured_at']})."
    blocks.append(Para(f"Random reads with direct=1 on a {p['grid']['file_mib']} MiB file in {p['directory']}, "
                       f"{p['grid']['seconds']} s per point, by {source}.{cached} Bandwidth in MiB/s; in brackets the "
                       "I/Os in flight on average as fio measured them (IOPS x mean latency)."))
    if choice := p.get("reader_choice"):
        blocks.append(Para(f"The reader's backend (`reader = \"auto\"`): {choice['why']}."))
    threads = p["grid"]["threads"]
    for engine in p["grid"]["ioengines"]:
        pts = {(q["chunk_bytes"], q["threads"]): q for q in p["points"] if q["ioengine"] == engine
               and q["rw"] == "randread"}
        if not pts:
            continue
        label = "jobs" if engine == "psync" else "queue depth"
        rows = [[f"{c // 1024} KiB"] + [
            f"{pts[(c, t)]['bandwidth_bytes_s'] / MIB:.1f}" + (f" ({pts[(c, t)]['achieved_depth']:.1f})"
                                                             if pts[(c, t)]["achieved_depth"] else "")
            if (c, t) in pts else "-" for t in threads] for c in p["grid"]["chunk_bytes"]]
        blocks += [Para(f"{engine} ({label} across):"), Table(["chunk"] + [f"{label} {t}" for t in threads], rows)]
    for q in p["points"]:
        if q["rw"] == "read":
            blocks.append(Para(f"Sequential read, {q['chunk_bytes'] // 1024} KiB chunks, 1 job: "
                               f"{q['bandwidth_bytes_s'] / MIB:.1f} MiB/s."))
    for note in p.get("notes", []):
        blocks.append(Para(f"Note: {note}"))
    return blocks


def _table2(model: str, recs: dict[str, dict]) -> list:
    rows = []
    thresholded = "threshold" in recs  # a SiLU model: its sparse rows are measured with threshold on
    for name in TABLE2_ROWS:
        r = recs.get(f"threshold+{name}" if thresholded and name != "naive" else name)
        gb, gbs, ms = PAPER_TABLE2[name]
        flags = ["yes" if t in name.split("+") else "no" for t in ("hybrid", "predictor", "windowing", "bundling")]
        if r is None or r["status"] != "measured":
            rows.append(flags + ["not run"] * 3 + [f"{gb} GB", f"{gbs} GB/s", f"{ms} ms"])
            continue
        m = r["metrics"]
        bandwidth = _get(m, "read_bandwidth_bytes_s")
        rows.append(flags + [_bytes(_get(m, "per_token.bytes_read")), f"{_f(bandwidth and bandwidth / 1e9, '.3f')} GB/s",
                             f"{_f(_get(m, 'ms.io.mean'))} ms", f"{gb} GB", f"{gbs} GB/s", f"{ms} ms"])
    return [Heading(3, "Table 2 shape: I/O per technique (cumulative)"),
            Para("Ours on this machine beside the paper's (OPT 6.7B, M1 Max). Flash->DRAM is bytes actually read per "
                 "token (whole direct-I/O blocks), throughput is the effective read bandwidth, I/O is reader time per "
                 "token." + (" A SiLU model: each row but the first has threshold on too (its sparse techniques "
                             "need it)." if thresholded else "")),
            Table(["hybrid", "predictor", "windowing", "bundling", "flash->DRAM / token", "throughput", "I/O / token",
                   "paper flash->DRAM", "paper throughput", "paper I/O"], rows)]


def _table3(model: str, recs: dict[str, dict], all_name: str | None) -> list:
    rows = []
    for label, name, paper in (("naive", "naive", PAPER_TABLE3["naive"]), ("all techniques", all_name, PAPER_TABLE3["all"])):
        r = recs.get(name) if name else None
        p = f"{paper[0]} / {paper[1]} / {paper[2]} = {paper[3]}"
        if r is None or r["status"] != "measured":
            rows.append([label, "not run", "-", p])
            continue
        m = r["metrics"]
        parts = [_get(m, f"ms.{k}.mean") for k in ("io", "memory", "compute", "predictor", "total")]
        split = ("-" if None in parts else
                 f"{parts[0]:.2f} / {parts[1]:.2f} / {parts[2] + parts[3]:.2f} = {parts[4]:.2f}")
        rows.append([label, split, _speedup(r, recs.get("naive")), p])
    return [Heading(3, "Table 3 shape: per-token latency, I/O / memory management / compute = total (ms)"),
            Para("Compute includes the predictor. I/O is the time the step waited for reads: with overlap, reads "
                 "that ran behind compute are not in it (the matrix table's hidden I/O). Paper: OPT 6.7B on the M1 "
                 "Max CPU, 4.76x."),
            Table(["configuration", "ours (ms)", "ours speedup", "paper (ms)"], rows)]


def _bound_table(recs: list[dict]) -> list:
    """Each configuration's step against the machine's bound (harness/compute.py): a roofline for flash inference."""
    bounded = [r for r in recs if r["status"] == "measured" and r.get("bound")]
    if not bounded:
        return []
    first = bounded[0]["bound"]  # the run's rates, the same in every record of the model
    copies = any(r["bound"].get("copy_ms") for r in bounded)  # a GPU engine: reads cross to the device
    rows = [[r["configuration"], f"{b['measured_ms']:.2f}", f"{b['io_ms']:.2f}"]
            + [f"{b['copy_ms']:.2f}"] * copies + [f"{b['compute_ms']:.2f}", f"{b['ms']:.2f}", f"{b['ratio']:.2f}x",
                                                  _f(_get(r["metrics"], "ms.io_cpu.mean"))]
            for r in bounded for b in [r["bound"]]]
    return [Heading(3, "Latency against the machine's bound"),
            Para("The bound of a decode step is its bytes read per token at fio's bandwidth for its mean read size "
                 "and reads in flight (the faster of fio's psync jobs and io_uring queue there), plus the weight "
                 "bytes it multiplies per token (attention, LM head, the FFN rows of the neurons in its products) at "
                 "this CPU's matrix-vector rate in its compute dtype "
                 f"({first['mv_bytes_s'] / 1e9:.1f} GB/s by {first.get('matvec', 'mv')}, the faster kernel, "
                 "measured at the model's FFN shape in this run"
                 + (f"; memory bandwidth {read / 1e9:.1f} GB/s" if (read := first.get("read_bytes_s")) else "")
                 + "): without overlap the engine reads, then computes, so the two add; with overlap the reads may "
                 "run beside the compute, so the larger of the two is the bound. Measured on the harness's clock; the ratio is how far the "
                 "configuration is from what this machine could do (`flashbench compare --fail-on bound_ratio:10%` "
                 "gates on it). The bound counts no CPU for the reads; the last column is what they took (the "
                 "reading threads' CPU time per token, interrupts aside): with overlap on a machine with few cores "
                 "the products lose time to it (on a 2-core VM about twice this, docs/results.md)."),
            Table(["configuration", "measured ms", "I/O bound ms"] + ["copy to device ms"] * copies
                  + ["compute bound ms", "bound ms", "measured / bound", "reads' CPU ms"], rows),
            *_under_bound(bounded)]


def _under_bound(bounded: list[dict]) -> list:
    """A step faster than its bound did not beat the machine: the bound's reads are at fio's random-read bandwidth
    from the probe, and a disk whose speed drifts (a virtual disk) may read faster by the time a configuration runs,
    or reads more in order than fio's may be served faster."""
    under = [f"{r['configuration']} ({r['bound']['ratio']:.2f}x)" for r in bounded if r["bound"]["ratio"] < 1]
    if not under:
        return []
    return [Para(f"Under 1x: {', '.join(under)}. These steps took less than their bound, whose reads are at "
                 "fio's random-read bandwidth as the probe measured it at the start of the run: the disk read faster "
                 "when they ran (a virtual disk's speed drifts), or their reads, more in order than fio's, were "
                 "served faster. The probe is stale or unlike these reads, the device was not beaten; compare such "
                 "a ratio with configurations measured near it, or rerun the probe.")]


def _matrix_table(recs: list[dict]) -> Table:
    naive = _by_name(recs).get("naive")
    rows = []
    for r in recs:
        if r["status"] != "measured":
            rows.append([r["configuration"], ", ".join(r["sections"])] + ["-"] * 14 + [_verdict(r)])
            continue
        m, ref = r["metrics"], r.get("fio_reference")
        ratio = (f"{ref['ratio']:.2f} (fio {ref.get('ioengine', 'psync')} {ref['chunk_bytes'] // 1024} KiB "
                 f"x{ref['threads']})"
                 if ref and ref.get("ratio") is not None else "-")
        bandwidth = _get(m, "read_bandwidth_bytes_s")
        rows.append([
            r["configuration"], ", ".join(r["sections"]), f"{m['tokens_per_s']:.3g}", _speedup(r, naive),
            _mean_p90(m, "io"), _f(_get(m, "ms.io_hidden.mean")), _read_ahead(m), _mean_p90(m, "memory"),
            _mean_p90(m, "predictor"), _mean_p90(m, "compute"), _bytes(_get(m, "per_token.bytes_read")), _f(_get(m, "per_token.reads"), ".1f"),
            _f(_get(m, "per_token.neurons"), ".1f"), _f(bandwidth and bandwidth / MIB, ".1f"), ratio,
            _dram_weights(r), _verdict(r),
        ])
    return Table(["configuration", "sections", "tokens/s", "vs naive", "I/O ms mean (p90)", "I/O hidden ms",
                  "read ahead used / read", "memory ms", "predictor ms",
                  "compute ms", "read / token", "reads / token", "neurons / token", "read MiB/s", "vs fio",
                  "DRAM (weights)", "agreement"], rows)


def _read_ahead(metrics: dict) -> str:
    """Neurons per token the overlap read ahead, and how many of them the layer then needed."""
    read = _get(metrics, "per_token.neurons_read_ahead")
    if not read:
        return "-"
    return f"{_get(metrics, 'per_token.neurons_read_ahead_used'):.0f} / {read:.0f}"


def _agreement_table(recs: list[dict]) -> list:
    rows = []
    for r in recs:
        a = r.get("agreement") or {}
        if r["status"] != "measured" or "not_applicable" in a:
            continue
        c = {x["metric"]: x for x in a["checks"]}
        cell = lambda k, fmt: f"{format(c[k]['value'], fmt)}{'' if c[k]['passed'] else ' !'}"  # noqa: E731
        rows.append([r["configuration"], a["tolerance"], cell("max_abs_logit_diff", ".3g"), cell("mean_kl", ".3g"),
                     cell("top1_agreement", ".2%"), cell("perplexity_ratio", ".4f"),
                     f"{a['greedy_matched_tokens']}/{a['greedy_tokens']}"
                     f"{' tie' if a.get('greedy_parted_at_tie') else ''}"
                     f"{'' if c['greedy_match']['passed'] else ' !'}",
                     "PASS" if a["passed"] else "FAIL"])
    if not rows:
        reasons = {r["agreement"]["not_applicable"] for r in recs if "not_applicable" in r.get("agreement", {})}
        return [Para("Agreement: not applicable. " + " ".join(sorted(reasons)))]
    bounds = sorted({(r["agreement"]["tolerance"], r["agreement"].get("logit_bound")) for r in recs
                     if "checks" in r.get("agreement", {}) and r["agreement"]["tolerance"] != "approximate"})
    at = "; ".join(f"{t}: eps = {b:.3g}" for t, b in bounds if b is not None)
    return [Heading(3, "Agreement with dense inference"),
            Para(f"Teacher-forced over held-out text, plus a free-running greedy continuation. '!' marks a check "
                 f"outside its tolerance. Exact configurations (every needed weight read at the checkpoint's "
                 f"precision; only the order of sums differs from dense) are held to one bound eps on every logit: "
                 f"{LOGIT_ULPS[torch.float32]} units in the last place of the logit scale (the power of two at or "
                 f"above the largest dense logit) in float32, {LOGIT_ULPS[torch.float16]} in float16 and bfloat16, "
                 f"where the engine and its dense reference both compute in that precision ({at or 'none here'}). "
                 f"The other exact limits follow from eps: perplexity ratio <= exp(2 eps), KL <= eps^2/2, and top-1 "
                 f"and greedy choices identical except at ties, where dense's best leads the engine's choice by at "
                 f"most 2 eps (a greedy run that parts at a tie matches in full; 'tie' below). Approximate ones (a "
                 f"predictor, int8, pruning, a threshold, judged against the unthresholded dense model): KL <= "
                 f"{APPROXIMATE.max_mean_kl:g}, top-1 >= "
                 f"{APPROXIMATE.min_top1_agreement:.0%}, perplexity ratio <= {APPROXIMATE.max_perplexity_ratio:g}, "
                 f"greedy match >= {APPROXIMATE.min_greedy_match:.0%} of the continuation, max |logit diff| <= "
                 f"{APPROXIMATE.max_abs_logit_diff:g} (each check's limit is in the record)."),
            Table(["configuration", "tolerance", "max |logit diff|", "mean KL", "top-1", "perplexity ratio",
                   "greedy match", "verdict"], rows)]


def _all_but_one(recs: list[dict]) -> list:
    by = _by_name(recs)
    all_name = _all_name(recs)
    full = by.get(all_name) if all_name else None
    if not full or full["status"] != "measured":
        return []
    rows = []
    for r in recs:
        for s in r["sections"]:
            if s.startswith("all-but:") and r["status"] == "measured":
                t = s.split(":", 1)[1]
                m = r["metrics"]
                rows.append([t, r["configuration"], f"{m['tokens_per_s']:.3g}",
                             f"{full['metrics']['tokens_per_s'] / m['tokens_per_s']:.2f}x",
                             _bytes(_get(m, "per_token.bytes_read")), ", ".join(r["inactive"]) or "-"])
    return [Heading(3, "All but one: what each technique contributes"),
            Para(f"All combined: {full['metrics']['tokens_per_s']:.3g} tokens/s. 'all / this' above 1 means the left-out "
                 "technique helps."),
            Table(["left out", "configuration", "tokens/s", "all / this", "read / token", "inactive without it"], rows)]


# ---- plots -------------------------------------------------------------------------------------------------------


def _plots(probe: dict | None, configs: dict[str, list[dict]], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    if probe:
        fig, ax = plt.subplots(figsize=(8, 5))
        for engine, style in (("psync", "-o"), ("io_uring", "--s")):
            for t in probe["grid"]["threads"]:
                pts = sorted((q["chunk_bytes"], q["bandwidth_bytes_s"]) for q in probe["points"]
                             if q["ioengine"] == engine and q["threads"] == t and q["rw"] == "randread")
                if pts:
                    ax.plot([c / 1024 for c, _ in pts], [b / MIB for _, b in pts], style,
                            label=f"{probe['tool']} {engine} x{t}", alpha=0.8)
        for model, recs in configs.items():
            ours = [(r["metrics"]["mean_read_bytes"], r["metrics"]["read_bandwidth_bytes_s"]) for r in recs
                    if r["status"] == "measured" and _get(r, "metrics.mean_read_bytes")]
            if ours:
                ax.scatter([c / 1024 for c, _ in ours], [b / MIB for _, b in ours], marker="x", s=40, zorder=5,
                           label=f"our reader ({model}, x{recs[0]['engine']['threads']} threads)")
        ax.set(xscale="log", yscale="log", xlabel="chunk size (KiB)", ylabel="bandwidth (MiB/s)",
               title="Random-read bandwidth against chunk size")
        ax.legend(fontsize=7, ncol=2)
        paths["bandwidth"] = _save(fig, out / "bandwidth.png")
    for model, recs in configs.items():
        measured = [r for r in recs if r["status"] == "measured" and _get(r, "metrics.ms.total") is not None]
        if not measured:  # none measured, or from a SUT that does not report its time by part
            continue
        names = [r["configuration"] for r in measured]
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
        left = [0.0] * len(names)
        for part in ("io", "memory", "predictor", "compute"):
            vals = [r["metrics"]["ms"][part]["mean"] for r in measured]
            ax.barh(names, vals, left=left, label=part)
            left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set(xlabel="ms per token (mean)", title=f"{model}: per-token latency by part")
        ax.legend(fontsize=8)
        paths[f"latency-{model}"] = _save(fig, out / f"latency-{model}.png")
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
        ax.barh(names, [r["metrics"]["per_token"]["bytes_read"] / 1024 for r in measured], label="read (whole blocks)")
        ax.barh(names, [r["metrics"]["per_token"]["bytes_requested"] / 1024 for r in measured], label="records' own bytes")
        ax.invert_yaxis()
        ax.set(xscale="log", xlabel="KiB per token", title=f"{model}: bytes read from flash per token")
        ax.legend(fontsize=8)
        paths[f"bytes-{model}"] = _save(fig, out / f"bytes-{model}.png")
        bounded = [r for r in measured if r.get("bound")]
        if bounded:
            names = [r["configuration"] for r in bounded]
            fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.5))
            y = list(range(len(names)))
            io, compute = [r["bound"]["io_ms"] for r in bounded], [r["bound"]["compute_ms"] for r in bounded]
            ax.barh([i - 0.2 for i in y], io, height=0.4, label="bound: reads at fio's bandwidth")
            after = [0.0 if "overlap" in r["techniques_on"] else b for r, b in zip(bounded, io)]  # beside, not after
            ax.barh([i - 0.2 for i in y], compute, height=0.4, left=after, alpha=0.7,
                    label="bound: products at the mv rate (from 0 where reads overlap them)")
            ax.barh([i + 0.2 for i in y], [r["bound"]["measured_ms"] for r in bounded], height=0.4,
                    label="measured (harness clock)")
            ax.set_yticks(y, names)
            ax.invert_yaxis()
            ax.set(xlabel="ms per decode step", title=f"{model}: each step against the machine's bound")
            ax.legend(fontsize=8, loc="best")
            paths[f"bound-{model}"] = _save(fig, out / f"bound-{model}.png")
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}; nothing written", str(path)) from e
    finally:
        Path(tmp).unlink(missing_ok=True)
        import matplotlib.pyplot as plt

        plt.close(fig)  # pyplot keeps every figure until it is closed
    return path


# ---- the report --------------------------------------------------------------------------------------------------


def _texts(model: dict) -> str:
    """Which tokenizer and texts the model was judged and trained on, and how many of their tokens."""
    texts = model.get("texts")
    if not texts:
        return ""
    roles = {"heldout": "held-out", "train": "training"}
    used = [f"{roles.get(role, role)} text {t['text']} ({t['tokens']:,} tokens)" for role, t in texts.items()]
    return f"Tokenizer: {model.get('tokenizer')}; " + "; ".join(used) + ". "


def _thresholds(info: dict | None) -> str:
    """A SiLU model's calibrated thresholds, as the threshold technique applies them."""
    if not info:
        return ""
    return (f"SiLU FFN: the threshold technique zeroes |SiLU(gate x)| <= t, per layer t = "
            f"{', '.join(f'{t:.4g}' for t in info['thresholds'])}, calibrated to a target sparsity of "
            f"{info['target_sparsity']:.0%} on {info['calibration_tokens']:,} tokens of {info['text']}; the engine "
            "reads each set neuron's gate, up and down rows and applies t to the gate it read. ")


def build(run_dir: Path) -> tuple[list, pd.DataFrame, str]:
    index, probe, configs, models, peers = load_run(run_dir)
    plots = _plots(probe, configs, run_dir)
    blocks = _header(index, probe)
    blocks += _summary(configs, peers)
    blocks += _probe_section(probe)
    if "bandwidth" in plots:
        blocks.append(Figure(plots["bandwidth"], "fio's random-read bandwidth per chunk size and parallelism (lines) "
                             "and our reader's effective bandwidth in each configuration (crosses)."))
    for model, recs in configs.items():
        d = models.get(model, {})
        by = _by_name(recs)
        engine = next((r["sut"]["name"] for r in recs if r.get("sut")), "flashbench reference engine")
        blocks += [Heading(2, f"Model {model}"),
                   Para(f"Engine measured: {engine}, timed by the harness at every decode step (the latency parts "
                        "are the engine's own report). "
                        + _texts(d)
                        + f"Activation source for the predictor technique: {d.get('activation_source') or 'none'}. "
                        + _thresholds(d.get("threshold"))
                        + f"Settings: {json.dumps(recs[0]['settings'])}. "
                        + (f"Dense inference ({d['dense'].get('streamed') or 'all weights in DRAM'}) on the same "
                           f"tokens: {d['dense']['tokens_per_s']:.3g} tokens/s. " if d.get("dense") else "")
                        + _budget(recs, peers.get(model, [])) + _prerequisites(recs))]
        blocks += _techniques_table(d.get("techniques"))
        blocks += _table2(model, by) + _table3(model, by, _all_name(recs)) + _bound_table(recs)
        blocks += [Heading(3, "Technique matrix"),
                   Para("Per decode step: tokens/s and its ratio to the naive run of this invocation ('alternated': "
                        "to a naive SUT loaded beside the configuration, their decode steps alternating token by "
                        "token, so that the disk's drift between the two runs does not enter it); latency parts, "
                        "mean (p90), in ms (I/O: the reading the step waited for; hidden: the overlap's reads ahead "
                        "that ran behind compute; read ahead: the neurons the overlap read ahead per token and how "
                        "many of them the layer then needed); bytes and read operations per token (exact counters, "
                        "reads ahead included); effective read "
                        "bandwidth and its ratio to the probe's at the nearest chunk size and thread count; DRAM held "
                        f"for weights (resident, held in the compute dtype "
                        f"({recs[0]['settings'].get('compute_dtype', 'float32')}), + the neuron caches (all of them "
                        f"where a DRAM budget sized them: they are written through when the engine is built; else the "
                        f"rows in use at the peak) + read and staging buffers + predictor; KV cache apart)."),
                   _matrix_table(recs)]
        blocks += _agreement_table(recs) + _all_but_one(recs) + _peers_section(recs, peers.get(model, []))
        for key, caption in ((f"latency-{model}", "per-token latency by part, per configuration"),
                             (f"bytes-{model}", "bytes read per token (whole blocks) and the records' own bytes"),
                             (f"bound-{model}", "each decode step against the machine's bound (reads, then "
                                                "products; with overlap, the larger of the two), a roofline for flash "
                                                "inference")):
            if key in plots:
                blocks.append(Figure(plots[key], f"{model}: {caption}."))
    frame = pd.json_normalize([r for recs in configs.values() for r in recs], sep=".")
    keep = [c for c in frame.columns if not c.startswith(("machine.", "versions.", "scenario.raw", "spec."))]
    return blocks, frame[keep] if len(frame) else frame, f"flashbench report {index['run_id']}"


def _techniques_table(rows: list[dict] | None) -> list:
    """The technique table's rows this model's matrix was built from (in the model record)."""
    if not rows:
        return []
    switches = lambda d: ", ".join(f"{k} = {v}" for k, v in d.items()) or "-"  # noqa: E731
    return [Heading(3, "Techniques"),
            Table(["technique", "what it does", "needs", "judged", "switches on the engine", "in the layout"],
                  [[t["name"], t["summary"], ", ".join(t["needs"]) or "-", "approximate" if t["lossy"] else "exact",
                    switches(t["engine"]), switches(t["layout"])] for t in rows])]


def _budget(recs: list[dict], peers: list[dict]) -> str:
    ours = {r["dram_budget"] for r in recs if r.get("dram_budget")}
    if len(ours) == 1:
        return (f"DRAM budget for weights, held by our engine (a configuration that cannot fit says so) and by the "
                f"peers: {_bytes(ours.pop())}. ")
    budgets = {p["dram_budget_bytes"] for p in peers if p.get("dram_budget_bytes")}
    return (f"DRAM budget (the peers' cap; our engine's use is in the DRAM column): {_bytes(budgets.pop())}. "
            if len(budgets) == 1 else "")


def _prerequisites(recs: list[dict]) -> str:
    notes = [f"{r['configuration']} has {', '.join(r['prerequisites'])} on because "
             f"{r['sections'][0].split(':', 1)[1]} needs it" for r in recs if r["prerequisites"]]
    return ("Prerequisites: " + "; ".join(notes) + ".") if notes else ""


def _peer_ratio(ours: dict | None, peer: dict | None) -> str:
    """Our configuration's tokens/s over the peer's; "not run" where the peer did not run."""
    if not peer:
        return "-"
    if peer["status"] != "measured" or not peer["tokens_per_s"]:
        return "not run"
    if not ours or ours["status"] != "measured":
        return "-"
    return f"{ours['metrics']['tokens_per_s'] / peer['tokens_per_s']:.2f}x"


def _peer_name(peer: str) -> str:
    return "mmap (ours)" if peer == "mmap" else peer  # the emulation is labelled as ours in every table


def _per_token(p: dict, key: str, fmt) -> str:
    return fmt(p[key] / p["tokens"]) if p.get(key) is not None and p.get("tokens") else "-"


def _peers_section(recs: list[dict], peers: list[dict]) -> list:
    if not peers:
        return []
    by = _by_name(recs)
    full, naive = by.get(_all_name(recs) or ""), by.get("naive")
    rows, notes = [], []
    for p in peers:
        if p["status"] != "measured":
            rows.append([_peer_name(p["peer"]), p.get("tool") or "-", "not run", "-", "-", "-", "-", "-", "-", "-",
                         "-", _bytes(p["dram_budget_bytes"]), "-"])
            notes.append(f"{_peer_name(p['peer'])} not run: {p['reason']}")
            continue
        ms = sum(p["token_ms"]) / len(p["token_ms"]) if p["token_ms"] else None
        rows.append([_peer_name(p["peer"]), p.get("tool") or "-", "speed only" if p.get("speed_only") else "measured",
                     _f(p.get("threads"), "d"), _f(p["tokens_per_s"], ".3g"), _f(ms, ".1f"), _peer_ratio(full, p),
                     _peer_ratio(naive, p), _per_token(p, "read_bytes", _bytes),
                     _per_token(p, "major_faults", lambda x: f"{x:,.0f}"), _bytes(p.get("peak_bytes")),
                     _bytes(p["dram_budget_bytes"]), _bytes(p.get("limit_bytes"))])
        if p.get("speed_only"):
            notes.append(f"{_peer_name(p['peer'])}: {p['speed_only']}")
        if c := p.get("dense_check"):
            notes.append(f"{_peer_name(p['peer'])}'s teacher-forced logits against dense inference ({c['reference_dtype']}), "
                         f"{c['tokens']} tokens, its KV cache in {c['kv_cache']}: max |logit difference| "
                         f"{c['max_abs_logit_diff']:.3g}, top-1 agreement {c['top1_agreement']:.1%}, KL "
                         f"{c['mean_kl']:.3g} nats, perplexity ratio {c['perplexity_ratio']:.5f}")
    blocks = [
        Heading(3, "Peers on the same checkpoint"),
        Para("Each peer decodes greedily from the same prompt in a memory cgroup capped at the DRAM budget, the "
             "page cache dropped first, each decode step timed with the same clock; read and major faults per "
             "token are the peer process's own (/proc/self/io, getrusage). 'all / peer' and 'naive / peer' are "
             "our all-combined and naive configurations' tokens/s over the peer's. llama.cpp runs a GGUF of "
             "the checkpoint at the storage precision, memory-mapped; mmap (ours) is our dense engine over the "
             "memory-mapped weights, an emulation of llama.cpp's approach; accelerate is transformers with "
             "disk offload; AirLLM streams one layer at a time. The cgroup limit is the peer's anonymous memory "
             "after a warm-up pass + the budget + 32 MiB for temporaries (weights accelerate keeps as tensors "
             "may count twice: in its favour); a model smaller than the slack (the embedded ones) is not "
             "constrained by it and its peers run from DRAM."),
        Table(["peer", "tool", "status", "threads", "tokens/s", "ms / token", "all / peer", "naive / peer",
              "read / token", "major faults / token", "peak memory", "DRAM budget", "cgroup limit"], rows),
    ]
    if notes:
        blocks.append(Para("; ".join(notes) + "."))
    return blocks


def _mmap_peer(peer: dict[str, dict]) -> dict | None:
    """The mmap peer the summary compares with: llama.cpp where it ran, else our emulation."""
    real = peer.get("llama.cpp")
    return real if real and real["status"] == "measured" else peer.get("mmap")


def _summary(configs: dict[str, list[dict]], peers: dict[str, list[dict]]) -> list:
    rows = []
    for model, recs in configs.items():
        by = _by_name(recs)
        naive, full = by.get("naive"), by.get(_all_name(recs) or "")
        peer = {p["peer"]: p for p in peers.get(model, [])}
        mmap = _mmap_peer(peer)
        measured = [r for r in recs if r["status"] == "measured"]
        best = max(measured, key=lambda r: r["metrics"]["tokens_per_s"], default=None)
        verdicts = [r["agreement"] for r in measured if "passed" in r["agreement"]]
        exact_fail = [r["configuration"] for r in measured if r["exact"] and r["agreement"].get("passed") is False]
        rows.append([
            model, _f(naive and naive.get("metrics", {}).get("tokens_per_s"), ".3g"),
            _f(full and full.get("metrics", {}).get("tokens_per_s"), ".3g"), _speedup(full, naive) if full else "-",
            _peer_ratio(full, mmap) + (f" ({_peer_name(mmap['peer'])})" if mmap else ""),
            _peer_ratio(full, peer.get("accelerate")),
            f"{best['configuration']} ({best['metrics']['tokens_per_s']:.3g})" if best else "-",
            f"{sum(v['passed'] for v in verdicts)}/{len(verdicts)}" if verdicts else "n/a",
            ", ".join(exact_fail) or "none",
        ])
    return [Heading(2, "Summary"),
            Table(["model", "naive tokens/s", "all combined tokens/s", "all / naive", "all / mmap peer", "all / accelerate",
                   "fastest (tokens/s)",
                   "agreement passed", "exact configurations failing"], rows)]


def write_report(run_dir: Path) -> list[Path]:
    from .records import write_text_atomic

    blocks, frame, title = build(run_dir)
    written = [write_text_atomic(run_dir / "report.md", to_markdown(blocks)),
               write_text_atomic(run_dir / "report.html", to_html(blocks, title)),
               write_text_atomic(run_dir / "results.csv", frame.to_csv(index=False))]
    return written
