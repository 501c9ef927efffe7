"""Scenarios: what a run measures, as a TOML file in suite/scenarios/ (or any path).

    name = "default"
    description = "..."
    [engine]              # the technique settings every configuration shares
    window = 5            # k, for configurations with windowing
    hybrid = 0.25         # fraction of each layer's neurons kept resident, for configurations with the hybrid
    threads = 16          # reader threads
    storage_dtype = "float16"  # how FFN weights are stored where quantization is off (int8 where it is on)
    compute_dtype = "float32"  # precision of the engine and its dense reference ("float16": the paper's 16-bit)
    gap_bytes = 0         # merge reads this close (sparse configurations)
    whole_gap_bytes = 1048576  # ... and in configurations that need every non-resident neuron
    [engine.approximate]  # optional: limits of the approximate tier to replace (max_mean_kl, min_top1_agreement,
    max_mean_kl = 0.05    # max_perplexity_ratio, min_greedy_match, max_abs_logit_diff)
    [probe]
    chunk_kib = [4, 16, 64, 256, 1024]
    threads = [1, 4, 16, 32]
    ioengines = ["psync", "io_uring"]
    seconds = 1.0
    file_mib = 1024
    fresh = false         # true: measure in every run instead of using the cached curve
    [[models]]
    name = "shakespeare-opt"  # an embedded model, a checkpoint path, or "synthetic:SHAPE"
    tokens = 256              # held-out tokens, teacher-forced
    greedy_prompt = 32        # free-running greedy continuation: prompt and new tokens
    greedy_tokens = 64
    counts_tokens = 131072    # training tokens whose activations choose hot (hybrid) and dead (pruning) neurons
    whole_read_tokens = 8     # optional: fewer tokens for configurations that read every neuron (naive, hybrid)
    profile = "paper-opt-6.7b"  # synthetic models: the trace profile ("embedded-<model>" scales a measured one)
    peers = ["mmap", "accelerate"]  # peers measured on the same checkpoint, capped at the DRAM budget
    peer_tokens = 8
    dram_budget = 0.5         # fraction of the checkpoint's weight bytes
    engine_within_budget = false  # true: our engine is held to the budget too (a configuration that cannot fit
                                  # is recorded as such); false: the budget caps the peers, our use is reported
    techniques = ["hybrid", "predictor", ...]  # default: every technique of the table (harness/matrix.py)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from flashbench import suite
from flashbench.reference.activations import COUNTS_TOKENS
from flashbench.reference.errors import FlashbenchError

from .agreement import approximate_tier
from .matrix import Settings, technique_names
from .peers import PEERS
from .probe import KIB, ProbeGrid

SCENARIOS_DIR = suite.SUITE_DIR / "scenarios"


class ScenarioError(FlashbenchError):
    """A scenario file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tokens: int = 256
    greedy_prompt: int = 32
    greedy_tokens: int = 64
    counts_tokens: int = COUNTS_TOKENS
    techniques: tuple[str, ...] = field(default_factory=technique_names)  # default: every row of the table
    whole_read_tokens: int | None = None  # fewer tokens for configurations reading every neuron (default: tokens)
    profile: str | None = None  # synthetic models: the trace profile
    seed: int = 0
    peers: tuple[str, ...] = ("mmap", "accelerate")
    peer_tokens: int = 8
    dram_budget: float = 0.5  # the peers' DRAM budget for weights, as a fraction of the checkpoint's weight bytes
    engine_within_budget: bool = False  # our engine is held to the same budget

    def __post_init__(self):
        for name in ("tokens", "greedy_prompt", "greedy_tokens", "counts_tokens", "seed", "peer_tokens",
                     "whole_read_tokens"):
            value = getattr(self, name)
            if not (value is None and name == "whole_read_tokens") and (type(value) is not int or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.dram_budget, bool) or not isinstance(self.dram_budget, (int, float)) or \
                self.dram_budget <= 0:
            raise ValueError(f"dram_budget must be a positive fraction of the weights, got {self.dram_budget!r}")
        if not isinstance(self.engine_within_budget, bool):
            raise ValueError(f"engine_within_budget must be true or false, got {self.engine_within_budget!r}")
        if not all(isinstance(t, str) for t in self.techniques + self.peers):
            raise ValueError("techniques and peers must be lists of names")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: str
    settings: Settings
    probe: ProbeGrid
    models: tuple[ModelSpec, ...]
    raw: dict = field(default_factory=dict)  # the file as read, for the records
    fresh_probe: bool = False  # measure the probe in every run: fio fractions become same-run ratios


def scenario_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    return p if p.suffix == ".toml" or p.exists() else SCENARIOS_DIR / f"{name_or_path}.toml"


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml"))


RENAMED = {"dtype": "storage_dtype"}  # keys an older scenario may still use


def _build(cls, table: dict, where: str, **converters):
    known = {f.name for f in fields(cls)}
    extra = set(table) - known
    if extra:
        renamed = "".join(f"; {k!r} is now {RENAMED[k]!r}" for k in sorted(extra) if k in RENAMED)
        raise ScenarioError(f"{where}: unknown key(s) {sorted(extra)}{renamed}; known: {sorted(known)}")
    try:
        return cls(**{k: converters[k](v) if k in converters else v for k, v in table.items()})
    except (TypeError, ValueError) as e:
        raise ScenarioError(f"{where}: {e}") from e


def load(name_or_path: str) -> Scenario:
    path = scenario_path(name_or_path)
    if not path.is_file():
        raise ScenarioError(f"{path}: no such scenario (available: {', '.join(available())})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: not valid TOML ({e})") from e
    extra = set(raw) - {"name", "description", "engine", "probe", "models"}
    if extra:
        raise ScenarioError(f"{path}: unknown key(s) {sorted(extra)}")
    where = f"{path} [engine]"
    settings = _build(Settings, raw.get("engine", {}), where, approximate=lambda v: approximate_tier(v, where))
    probe_table = dict(raw.get("probe", {}))
    fresh_probe = probe_table.pop("fresh", False)
    if not isinstance(fresh_probe, bool):
        raise ScenarioError(f"{path} [probe]: fresh must be true or false, got {fresh_probe!r}")
    if "chunk_kib" in probe_table:
        probe_table["chunk_bytes"] = [int(k * KIB) for k in probe_table.pop("chunk_kib")]
    probe = _build(ProbeGrid, probe_table, f"{path} [probe]", chunk_bytes=tuple, threads=tuple, ioengines=tuple)
    models = tuple(_build(ModelSpec, m, f"{path} [[models]] #{i + 1}", techniques=tuple, peers=tuple)
                   for i, m in enumerate(raw.get("models", [])))
    if not models:
        raise ScenarioError(f"{path}: no [[models]]")
    for m in models:
        unknown = set(m.techniques) - set(technique_names())
        if unknown:
            raise ScenarioError(f"{path}: model {m.name!r}: unknown techniques {sorted(unknown)}")
        too_few = [k for k in ("tokens", "whole_read_tokens") if getattr(m, k) is not None and getattr(m, k) < 3]
        if too_few:
            raise ScenarioError(f"{path}: model {m.name!r}: {too_few[0]} must be at least 3 (a one-token prefill, "
                                "then at least one timed decode step)")
        if set(m.peers) - set(PEERS):
            raise ScenarioError(f"{path}: model {m.name!r}: unknown peers {sorted(set(m.peers) - set(PEERS))}")
    return Scenario(raw.get("name", path.stem), raw.get("description", ""), str(path), settings, probe, models, raw,
                    fresh_probe)
