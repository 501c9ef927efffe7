"""The technique table, and the matrix of configurations a run measures, built from it.

A technique is one row of TECHNIQUES: its name (spelled so in scenarios, records and reports), what it needs to have
any effect, whether it is lossy (judged at the approximate tier), what it switches on the engine (fields of
`Techniques`) and what it switches in the flash layout (fields of `LayoutSpec`). Everything else (the scenario
loader, the matrix, the engine settings, the layout spec, the reports) reads the table, so adding a technique is a
row here plus the engine code behind its switch. A switch goes from TOML to the engine in one step:
`techniques = [..., "windowing"]` -> the row "windowing" -> `Techniques.window = Settings.window`.

The matrix holds the naive baseline (every technique off); each technique on its own (with the techniques it needs
switched on too, and named); the cumulative order of the table (the paper's, continued with memory management,
overlap, quantization, pruning and placement); all combined; and all but one for each technique. The same set
reached from two sections is measured once and listed in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from flashbench.reference.device import NAME as DEVICE_NAME
from flashbench.reference.flash import COMPUTE_DTYPES, Techniques
from flashbench.reference.layout import DTYPES
from flashbench.reference.model import MATVEC, check_matvec
from flashbench.reference import uring
from flashbench.reference.reader import BACKENDS
from flashbench.reference.threshold import check_target

from .agreement import APPROXIMATE, Tolerance


@dataclass(frozen=True)
class Settings:
    """What every configuration of a run shares (the scenario's [engine] table); a technique's setting applies where
    the technique is on."""

    window: int = 5  # k, with windowing
    hybrid: float = 0.25  # fraction of each layer's neurons kept resident, with the hybrid
    threshold: float = 0.5  # target sparsity of a SiLU FFN's thresholded activations, with threshold
    threads: int = 16  # reads in flight (reader threads, or the io_uring ring's depth)
    # How the reader issues them: "threads" (preadv) or "io_uring" (from C; `make` builds it); "auto": the faster of
    # the two on the run's storage, measured after the probe (harness/sweep.py, `choose_reader`)
    reader: str = "threads"
    storage_dtype: str = "float16"  # how the FFN weights are stored without quantization (int8 with it)
    # The precision the engine (and the dense reference it is judged against) holds weights and computes in.
    compute_dtype: str = "float32"
    device: str = "cpu"  # where the engine computes: "cpu", or "cuda" (weights, caches and compute on the GPU)
    # How one position's products with a weight matrix run: "linear" (F.linear), "mv" (torch.mv) or, for 16-bit
    # compute on the CPU, "rows" (the C kernel of row_kernels.c), kernels whose speed depends on the CPU and the
    # dtype; "auto": the fastest for the compute dtype, measured when the scenario loads (harness/compute.py)
    matvec: str = "linear"
    gap_bytes: int = 0  # the reader merges reads this close, reading the bytes between (sparse configurations)
    # Configurations that need every neuron not kept resident (the hybrid alone) merge reads up to this far apart
    # (runs of cold records straight into their rows, the hot neurons' bytes between them into a sink). With 5% hot
    # (the paper's) the cold runs are long and merging costs more than it saves: 0; with 25% (the default scenario's)
    # they are about 4 records long and merging up to 64 KiB pays (docs/results.md, 2026-12-03). Over a placed layout
    # (hot records first) the hybrid alone reads each file from its first cold record, as naive does: no gaps.
    whole_gap_bytes: int = 0
    approximate: Tolerance = APPROXIMATE

    def __post_init__(self):
        counts = {"window": 0, "threads": 1, "gap_bytes": 0, "whole_gap_bytes": 0}
        for name, least in counts.items():
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if isinstance(self.hybrid, bool) or not isinstance(self.hybrid, (int, float)) or not 0 <= self.hybrid <= 1:
            raise ValueError(f"hybrid must be a fraction in [0, 1], got {self.hybrid!r}")
        storage = [d for d in DTYPES if d != "int8"]  # int8 is quantization's
        if self.storage_dtype not in storage:
            raise ValueError(f"storage_dtype must be one of {', '.join(storage)} (int8 comes with the quantization "
                             f"technique), got {self.storage_dtype!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.matvec not in MATVEC:
            raise ValueError(f"matvec must be one of {', '.join(MATVEC)} (or \"auto\" in a scenario), got "
                             f"{self.matvec!r}")
        check_matvec(self.matvec, self.compute_dtype, self.device)
        if self.reader not in (*BACKENDS, "auto"):
            raise ValueError(f"reader must be one of {', '.join(BACKENDS)} or auto, got {self.reader!r}")
        if self.reader == "io_uring" and (why := uring.unavailable()):
            raise ValueError(f"reader \"io_uring\" cannot be used here: {why}")
        if not isinstance(self.device, str) or not DEVICE_NAME.fullmatch(self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        check_target(self.threshold)
        if not isinstance(self.approximate, Tolerance):
            raise ValueError(f"approximate must be a table of limits, got {self.approximate!r}")


@dataclass(frozen=True)
class LayoutSpec:
    """The flash layout a configuration reads."""

    layout: str = "unbundled"
    storage_dtype: str = "float16"
    pruned: bool = False
    placed: bool = False  # each layer's records hot first (by activation count), then by co-activation
    hot: float = 0.0  # placed: the fraction of neurons stored first as the hot block (the run's hybrid fraction)
    gate_resident: bool = False  # a gated FFN's gate matrices in DRAM, its records up and down only

    @property
    def name(self) -> str:
        return f"{self.layout}-{self.storage_dtype}" + ("-pruned" if self.pruned else "") + (
            "-placed" if self.placed else "") + ("-gate-resident" if self.gate_resident else "")


@dataclass(frozen=True)
class Technique:
    """One row of the technique table."""

    name: str
    summary: str
    needs: tuple[str, ...] = ()  # techniques without which this one has no effect
    lossy: bool = False  # its configurations are judged at the approximate tier
    # It relies on the FFN's exact zeros: those of a ReLU FFN, or of a SiLU FFN with the threshold technique on (a
    # SiLU FFN's every neuron is active each token). What needs such a technique relies on them too.
    sparse: bool = False
    dense_ffn_only: bool = False  # it applies to SiLU FFNs only (a ReLU FFN is sparse already)
    # The `Techniques` fields it sets when on, from the run's settings and the model's activation source (the
    # trained predictor, or a trace for synthetic models).
    engine: Callable[[Settings, str], dict] = lambda settings, source: {}
    layout: dict = field(default_factory=dict)  # the `LayoutSpec` fields it sets when on


TECHNIQUES: tuple[Technique, ...] = (
    # First: on a SiLU FFN, every sparse technique needs it (`matrix(dense_ffn=True)`), so the cumulative order
    # starts from it; a ReLU model's matrix leaves it out.
    Technique("threshold", "zero each SiLU activation of magnitude at most a per-layer threshold (CATS), calibrated "
              "on the counting text to a target sparsity, so that a SiLU FFN is sparse", lossy=True,
              dense_ffn_only=True, engine=lambda s, _: {"threshold": s.threshold}),
    Technique("hybrid", "keep each layer's most often active neurons resident", sparse=True,
              engine=lambda s, _: {"hybrid": s.hybrid}),
    Technique("predictor", "read only the neurons a low-rank predictor expects active", lossy=True, sparse=True,
              engine=lambda s, source: {"source": source, "gap_bytes": s.gap_bytes}),
    Technique("windowing", "keep the neurons of the last k tokens cached and read only the delta",
              needs=("predictor",), engine=lambda s, _: {"window": s.window}),
    Technique("bundling", "store each neuron's rows together, so one read fetches all of them",
              needs=("predictor",), layout={"layout": "bundled"}),  # the naive baseline reads whole files anyway
    Technique("memory", "the neuron cache's preallocated matrix instead of gathering the matrices per token",
              needs=("predictor", "windowing"), engine=lambda s, _: {"memory": "preallocated"}),
    # It needs nothing: with every neuron read (naive, or the hybrid's cold part) the next layer's needs are known
    # exactly, and the read ahead is the whole next layer (double buffering).
    Technique("overlap", "read the next layer's guessed needs (the source's lookahead) while this layer computes; "
              "read only the misses after", engine=lambda s, _: {"overlap": True}),
    Technique("quantization", "store the FFN weights in int8 with per-neuron scales", lossy=True,
              layout={"storage_dtype": "int8"}),
    Technique("pruning", "leave out of the layout the neurons never active on the counting text", lossy=True,
              sparse=True,
              layout={"pruned": True}),
    # Without the hybrid nothing is read apart from the rest, so the order of the records changes nothing.
    Technique("placement", "store each layer's hot neurons first, as one block, and the rest so that neurons active "
              "together on the counting text lie together: predicted sets coalesce into fewer, longer reads",
              needs=("hybrid",), layout={"placed": True}),
)


SPARSIFIER = "threshold"  # what makes a SiLU FFN sparse: on such a model every sparse technique needs it


def technique_names(dense_ffn: bool | None = None) -> tuple[str, ...]:
    """The table's techniques, in its order (the cumulative order); with `dense_ffn` given, those that apply to a
    SiLU (True) or ReLU (False) FFN."""
    return tuple(t.name for t in TECHNIQUES if dense_ffn is None or dense_ffn or not t.dense_ffn_only)


def technique(name: str) -> Technique:
    for t in TECHNIQUES:
        if t.name == name:
            return t
    raise ValueError(f"unknown technique {name!r}; known: {', '.join(technique_names())}")


def describe(names: tuple[str, ...], settings: Settings, source: str, dense_ffn: bool = False) -> list[dict]:
    """The table's rows for `names`, as records carry them: what each needs (on this model's FFN) and switches, with
    this run's settings."""
    sparsify = dense_ffn and SPARSIFIER in names
    return [{"name": t.name, "summary": t.summary, "needs": list(needs(t.name, sparsify)), "lossy": t.lossy,
             "sparse": t.sparse, "dense_ffn_only": t.dense_ffn_only, "engine": t.engine(settings, source),
             "layout": t.layout} for t in map(technique, ordered(names))]


def ordered(names) -> tuple[str, ...]:
    """`names` in the table's order."""
    return tuple(t for t in technique_names() if t in names)


@dataclass(frozen=True)
class Configuration:
    on: frozenset[str]
    sections: tuple[str, ...] = ()  # e.g. "naive", "alone:windowing", "cumulative:3", "all", "all-but:memory"
    prerequisites: tuple[str, ...] = ()  # switched on only because a technique of this configuration needs them
    inactive: tuple[str, ...] = ()  # asked for, but without effect here (what they need is off)

    @property
    def name(self) -> str:
        return "+".join(ordered(self.on)) or "naive"

    @property
    def exact(self) -> bool:
        """No lossy technique: every needed weight read at the checkpoint's precision, only the order of sums may
        differ from dense."""
        return not any(technique(t).lossy for t in self.on)

    @property
    def sparse(self) -> bool:
        """It relies on the FFN's exact zeros (a ReLU FFN, or a thresholded SiLU one) through one of its techniques
        (`on` holds what they need, so a technique needing a sparse one is caught with it)."""
        return any(technique(t).sparse for t in self.on)

    def not_applicable(self, dense_ffn: bool) -> str | None:
        """Why this configuration does not apply to a model with a SiLU (`dense_ffn`) or ReLU FFN, or None."""
        if dense_ffn and self.sparse and SPARSIFIER not in self.on:
            return (f"SiLU FFN: no activation is exactly zero, so reading only the active neurons needs "
                    f"{SPARSIFIER!r} on")
        only = [t for t in ordered(self.on) if technique(t).dense_ffn_only]
        if not dense_ffn and only:
            return f"ReLU FFN: its zeros are exact already; {', '.join(only)} applies to SiLU FFNs"
        return None

    def engine_settings(self, settings: Settings, source: str) -> Techniques:
        """The engine's switches: every technique off (the naive baseline), then each one on as its row says."""
        switches = {"source": "all", "window": 0, "hybrid": 0.0, "memory": "regather", "threads": settings.threads,
                    "reader": settings.reader,
                    "gap_bytes": settings.whole_gap_bytes, "compute_dtype": settings.compute_dtype,
                    "device": settings.device, "matvec": settings.matvec}
        for name in ordered(self.on):
            switches |= technique(name).engine(settings, source)
        return Techniques(**switches)

    def layout(self, settings: Settings = Settings()) -> LayoutSpec:
        spec = LayoutSpec(storage_dtype=settings.storage_dtype)
        for name in ordered(self.on):
            spec = replace(spec, **technique(name).layout)
        return replace(spec, hot=settings.hybrid) if spec.placed else spec


def needs(name: str, dense_ffn: bool = False) -> tuple[str, ...]:
    """What technique `name` needs on a model with a SiLU (`dense_ffn`) or ReLU FFN: its row's needs, and on a SiLU
    FFN the sparsifier for every sparse technique."""
    t = technique(name)
    return t.needs + ((SPARSIFIER,) if dense_ffn and t.sparse else ())


def _closure(on: set[str], dense_ffn: bool = False) -> set[str]:
    """`on` plus everything its techniques need."""
    out = set(on)
    while more := {n for t in out for n in needs(t, dense_ffn)} - out:
        out |= more
    return out


def effective(on: set[str], dense_ffn: bool = False) -> tuple[set[str], set[str]]:
    """(techniques with an effect, techniques without one because what they need is off)."""
    live = set(on)
    while dead := {t for t in live if not set(needs(t, dense_ffn)) <= live}:
        live -= dead
    return live, set(on) - live


@dataclass
class _Builder:
    found: dict[frozenset, dict] = field(default_factory=dict)

    def add(self, on: set[str], section: str, prerequisites: set[str] = frozenset(), inactive: set[str] = frozenset()):
        entry = self.found.setdefault(frozenset(on), {"sections": [], "prerequisites": set(), "inactive": set()})
        entry["sections"].append(section)
        entry["prerequisites"] |= prerequisites
        entry["inactive"] |= inactive

    def build(self) -> list[Configuration]:
        return [Configuration(on, tuple(e["sections"]), ordered(e["prerequisites"]), ordered(e["inactive"]))
                for on, e in self.found.items()]


def matrix(techniques: tuple[str, ...] | None = None, dense_ffn: bool = False) -> list[Configuration]:
    """Every configuration of the matrix over `techniques` (names of the table, in any order; default: all that
    apply to the FFN), naive first. On a SiLU FFN (`dense_ffn`) every sparse technique needs the sparsifier, where
    the matrix has it (without it, they are there to be recorded as not applicable)."""
    techniques = technique_names(dense_ffn) if techniques is None else techniques
    dense_ffn = dense_ffn and SPARSIFIER in techniques
    unknown = set(techniques) - set(technique_names())
    if unknown:
        raise ValueError(f"unknown techniques {sorted(unknown)}; known: {', '.join(technique_names())}")
    techniques = ordered(techniques)
    for t in techniques:
        missing = set(needs(t, dense_ffn)) - set(techniques)
        if missing:
            raise ValueError(f"technique {t!r} needs {sorted(missing)} in the matrix too")
    b = _Builder()
    b.add(set(), "naive")
    for t in techniques:
        on = _closure({t}, dense_ffn)
        b.add(on, f"alone:{t}", prerequisites=on - {t})
    for i in range(1, len(techniques) + 1):
        b.add(set(techniques[:i]), f"cumulative:{i}")
    b.add(set(techniques), "all")
    for t in techniques:
        live, inactive = effective(set(techniques) - {t}, dense_ffn)
        b.add(live, f"all-but:{t}", inactive=inactive)
    return b.build()

