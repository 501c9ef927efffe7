"""The technique matrix: which configurations a run measures, and what each one's switches are.

A configuration is the set of techniques switched on. The matrix holds the naive baseline; each technique on its
own (with the techniques it needs switched on too, and named); the paper's cumulative order (hybrid, +predictor,
+windowing, +bundling), continued with memory management, quantization and pruning; all combined; and all but one
for each technique. The same set reached from two sections is measured once and listed in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashbench.reference.flash import COMPUTE_DTYPES, Techniques

from .agreement import APPROXIMATE, Tolerance

TECHNIQUES = ("hybrid", "predictor", "windowing", "bundling", "memory", "quantization", "pruning")
# What a technique needs to have any effect: a window and a neuron cache hold predicted sets; bundling changes
# only sparse reads (the naive baseline reads whole files either way).
NEEDS = {"windowing": ("predictor",), "bundling": ("predictor",), "memory": ("predictor", "windowing")}
LOSSY = {"predictor", "quantization", "pruning"}


@dataclass(frozen=True)
class Settings:
    """What every configuration of a run shares; a technique's setting applies where the technique is on."""

    window: int = 5  # k, with windowing
    hybrid: float = 0.25  # fraction of each layer's neurons kept resident, with the hybrid
    threads: int = 16  # reader threads
    dtype: str = "float16"  # FFN storage dtype without quantization (int8 with it)
    # The precision the engine (and the dense reference it is judged against) holds weights and computes in.
    compute_dtype: str = "float32"
    gap_bytes: int = 0  # the reader merges reads this close, reading the bytes between (sparse configurations)
    # Configurations that need every neuron not kept resident (the hybrid alone): one long read past a hot neuron's
    # bytes costs less than two reads, so these merge reads up to this far apart.
    whole_gap_bytes: int = 1 << 20
    approximate: Tolerance = APPROXIMATE

    @property
    def dtype_of_compute(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")


@dataclass(frozen=True)
class Configuration:
    on: frozenset[str]
    sections: tuple[str, ...] = ()  # e.g. "naive", "alone:windowing", "cumulative:3", "all", "all-but:memory"
    prerequisites: tuple[str, ...] = ()  # switched on only because a technique of this configuration needs them
    inactive: tuple[str, ...] = ()  # asked for, but without effect here (what they need is off)

    @property
    def name(self) -> str:
        return "+".join(t for t in TECHNIQUES if t in self.on) or "naive"

    @property
    def exact(self) -> bool:
        """Every needed weight read at the checkpoint's precision: only the order of sums may differ from dense."""
        return not (self.on & LOSSY)

    def engine_settings(self, settings: Settings, source: str) -> Techniques:
        """`source` stands for the predictor technique: the trained predictor, or a trace for synthetic models."""
        sparse = "predictor" in self.on
        return Techniques(
            source=source if sparse else "all",
            window=settings.window if "windowing" in self.on else 0,
            hybrid=settings.hybrid if "hybrid" in self.on else 0.0,
            memory="preallocated" if "memory" in self.on else "regather",
            threads=settings.threads,
            gap_bytes=settings.gap_bytes if sparse else settings.whole_gap_bytes,
            compute_dtype=settings.compute_dtype,
        )

    def layout(self, dtype: str = "float16") -> "LayoutSpec":
        return LayoutSpec("bundled" if "bundling" in self.on else "unbundled",
                          "int8" if "quantization" in self.on else dtype, "pruning" in self.on)


@dataclass(frozen=True)
class LayoutSpec:
    layout: str
    dtype: str
    pruned: bool

    @property
    def name(self) -> str:
        return f"{self.layout}-{self.dtype}" + ("-pruned" if self.pruned else "")


def _closure(on: set[str]) -> set[str]:
    """`on` plus everything its techniques need."""
    out = set(on)
    while True:
        more = {n for t in out for n in NEEDS.get(t, ())} - out
        if not more:
            return out
        out |= more


def _effective(on: set[str]) -> tuple[set[str], set[str]]:
    """(techniques with an effect, techniques without one because what they need is off)."""
    live = set(on)
    while dead := {t for t in live if not set(NEEDS.get(t, ())) <= live}:
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
        order = lambda ts: tuple(t for t in TECHNIQUES if t in ts)  # noqa: E731
        return [Configuration(on, tuple(e["sections"]), order(e["prerequisites"]), order(e["inactive"]))
                for on, e in self.found.items()]


def matrix(techniques: tuple[str, ...] = TECHNIQUES) -> list[Configuration]:
    """Every configuration of the matrix over `techniques` (a subset of TECHNIQUES, in any order), naive first."""
    unknown = set(techniques) - set(TECHNIQUES)
    if unknown:
        raise ValueError(f"unknown techniques {sorted(unknown)}; known: {', '.join(TECHNIQUES)}")
    techniques = tuple(t for t in TECHNIQUES if t in techniques)
    for t in techniques:
        missing = set(NEEDS.get(t, ())) - set(techniques)
        if missing:
            raise ValueError(f"technique {t!r} needs {sorted(missing)} in the matrix too")
    b = _Builder()
    b.add(set(), "naive")
    for t in techniques:
        on = _closure({t})
        b.add(on, f"alone:{t}", prerequisites=on - {t})
    for i in range(1, len(techniques) + 1):
        b.add(set(techniques[:i]), f"cumulative:{i}")
    b.add(set(techniques), "all")
    for t in techniques:
        live, inactive = _effective(set(techniques) - {t})
        b.add(live, f"all-but:{t}", inactive=inactive)
    return b.build()
