"""`flashbench hardware`: runs of one scenario on different machines merged into one comparison report.

One row per machine (CPU, cores, RAM, storage device, filesystem), the probes' bandwidth curves overlaid, per-token
latency per configuration side by side, and geometric means of normalised ratios. Runs of different scenarios or
schemas are refused, never merged. A run whose storage is in memory (tmpfs) is labelled so wherever it appears:
its "flash" reads came from DRAM.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .compare import METRICS, CompareError, RunRecords, check_comparable, geomean, load
from .records import write_text_atomic
from .report import MIB, Figure, Heading, Para, Table, _bytes, _save, to_html, to_markdown


def storage_label(index: dict) -> str:
    s = index["machine"].get("storage", {})
    label = f"{s.get('device', '?')} ({s.get('filesystem', '?')})"
    return label + ": in memory, not a storage device" if s.get("in_memory") else label


def run_label(run: RunRecords) -> str:
    s = run.index["machine"].get("storage", {})
    return f"{run.index['run_id']}{' [in memory]' if s.get('in_memory') else ''}"


def _probe_points(run: RunRecords) -> dict[tuple, float]:
    p = run.probe or {"points": []}
    return {(q["ioengine"], q["chunk_bytes"], q["threads"]): q["bandwidth_bytes_s"] for q in p["points"]
            if q["rw"] == "randread"}


def frame(runs: list[RunRecords]) -> pd.DataFrame:
    """One row per (run, model, configuration) measured in every run."""
    common = set.intersection(*({k for k, r in run.configurations.items() if r["status"] == "measured"}
                                for run in runs))
    keys = [k for k in runs[0].configurations if k in common]  # the matrix's order
    rows = []
    for run in runs:
        for model, name in keys:
            rec = run.configurations[(model, name)]
            row = {"run": run_label(run), "model": model, "configuration": name,
                   "ms_per_token": rec["metrics"]["ms"]["total"]["mean"],
                   "io_ms": rec["metrics"]["ms"]["io"]["mean"]}
            row |= {n: m.value(rec, run.naive(model)) for n, m in METRICS.items()}
            rows.append(row)
    return pd.DataFrame(rows)


def _normalised(runs: list[RunRecords], df: pd.DataFrame) -> Table:
    """Each machine against the first: geometric means over the configurations (and probe points) all runs share."""
    first = runs[0]
    base_points = _probe_points(first)
    rows = []
    for run in runs:
        ours = df[df.run == run_label(run)].set_index(["model", "configuration"])
        theirs = df[df.run == run_label(first)].set_index(["model", "configuration"])
        tok = geomean(list(ours.tokens_per_s / theirs.tokens_per_s))
        speed = geomean(list(ours.drop(index="naive", level="configuration", errors="ignore").speedup_over_naive))
        points = _probe_points(run)
        bw = geomean([points[k] / base_points[k] for k in points.keys() & base_points.keys()])
        rows.append([run_label(run), f"{tok:.3g}" if tok else "-", f"{speed:.3g}" if speed else "-",
                     f"{bw:.3g}" if bw else "-", str(len(ours))])
    return Table(["run", "tokens/s against the first run", "speedup over naive (same run)",
                  "probe bandwidth against the first run", "configurations"], rows)


def _machines(runs: list[RunRecords]) -> Table:
    rows = []
    for run in runs:
        m, p = run.index["machine"], run.probe or {}
        tool = p.get("tool", "-") + ("" if p.get("tool") == "fio" else f" ({p.get('fio_error')})")
        rows.append([run_label(run), m.get("hostname"), str(m.get("cpu")), str(m.get("cores")),
                     _bytes(m.get("ram_bytes")), storage_label(run.index), tool,
                     (run.index["git"].get("commit") or "unknown")[:12]])
    return Table(["run", "host", "CPU", "cores", "RAM", "storage", "probe tool", "commit"], rows)


def _plots(runs: list[RunRecords], df: pd.DataFrame, out: Path) -> list[Figure]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        points = _probe_points(run)
        for j, t in enumerate(sorted({k[2] for k in points if k[0] == "psync"})):
            pts = sorted((c, bw) for (e, c, th), bw in points.items() if e == "psync" and th == t)
            ax.plot([c / 1024 for c, _ in pts], [bw / MIB for _, bw in pts], color=f"C{i}",
                    linestyle=("-", "--", ":", "-.")[j % 4], marker="o", label=f"{run_label(run)} x{t}")
    ax.set(xscale="log", yscale="log", xlabel="chunk size (KiB)", ylabel="bandwidth (MiB/s)",
           title="Random-read bandwidth (psync, threads) per machine")
    chunks = sorted({k[1] // 1024 for run in runs for k in _probe_points(run)})
    ax.set_xticks(chunks, [str(c) for c in chunks], minor=False)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7, ncol=2)
    figures.append(Figure(_save(fig, out / "bandwidth.png"), "Each run's probe: random-read bandwidth per chunk size "
                          "and thread count (colour: run; line style: threads)."))
    for model, part in df.groupby("model", sort=False):
        names = list(dict.fromkeys(part.configuration))
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) * len(runs) + 1.5))
        height = 0.8 / len(runs)
        for i, run in enumerate(runs):
            mine = part[part.run == run_label(run)].set_index("configuration").loc[names]
            y = [k + i * height for k in range(len(names))]
            ax.barh(y, mine.ms_per_token, height=height, color=f"C{i}", alpha=0.5, label=f"{run_label(run)} total")
            ax.barh(y, mine.io_ms, height=height, color=f"C{i}", label=f"{run_label(run)} I/O")
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(names))], names)
        ax.invert_yaxis()
        ax.set(xlabel="ms per token (mean)", title=f"{model}: per-token latency per machine")
        ax.legend(fontsize=7)
        figures.append(Figure(_save(fig, out / f"latency-{model}.png"),
                              f"{model}: mean ms per token per configuration; the dark part is I/O."))
    return figures


def build(runs: list[RunRecords], out: Path) -> tuple[list, pd.DataFrame]:
    for run in runs[1:]:
        check_comparable(runs[0], run)
    labels = [run_label(r) for r in runs]
    if len(set(labels)) < len(labels):
        raise CompareError(f"runs with the same id ({', '.join(labels)}): run them with different --run-id")
    df = frame(runs)
    if df.empty:
        raise CompareError("the runs have no measured configuration in common")
    sc = runs[0].index["scenario"]
    blocks = [Heading(1, f"flashbench hardware comparison: scenario {sc['name']}"),
              Para(f"{len(runs)} runs of scenario {sc['name']}. Ratios are against the first run "
                   f"({run_label(runs[0])}); speedup over naive is measured within each run. A storage marked "
                   "'in memory' served its reads from DRAM: its I/O figures do not describe a storage device."),
              Heading(2, "Machines"), _machines(runs),
              Heading(2, "Geometric means of normalised ratios"), _normalised(runs, df)]
    blocks += [Heading(2, "Plots")] + _plots(runs, df, out)
    blocks.append(Heading(2, "Per configuration"))
    for model, part in df.groupby("model", sort=False):
        wide = part.pivot(index="configuration", columns="run", values="tokens_per_s")
        wide = wide[[run_label(r) for r in runs]].loc[list(dict.fromkeys(part.configuration))]
        blocks += [Heading(3, f"{model}: tokens/s"),
                   Table(["configuration"] + list(wide.columns),
                         [[name] + [f"{v:.3g}" for v in row] for name, row in wide.iterrows()])]
    return blocks, df


def write_hardware_report(run_dirs: list[str | Path], out: Path) -> list[Path]:
    if len(run_dirs) < 2:
        raise CompareError("a hardware comparison needs at least two runs")
    runs = [load(p) for p in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    blocks, df = build(runs, out)
    title = f"flashbench hardware comparison ({len(runs)} runs)"
    return [write_text_atomic(out / "report.md", to_markdown(blocks)),
            write_text_atomic(out / "report.html", to_html(blocks, title)),
            write_text_atomic(out / "comparison.csv", df.to_csv(index=False))]
