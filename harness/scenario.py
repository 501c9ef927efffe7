"""Scenarios: what a run measures, as a TOML file in suite/scenarios/ (or any path).

    name = "default"
    description = "..."
    [engine]              # the technique settings every configuration shares
    window = 5            # k, for configurations with windowing
    hybrid = 0.25         # fraction of each layer's neurons kept resident, for configurations with the hybrid
    threads = 16          # reads in flight
    reader = "threads"    # how they are issued: "threads", "io_uring", or "auto" (the faster here, measured after
                          # the probe with one layer's delta of the largest model's records)
    storage_dtype = "float16"  # how FFN weights are stored where quantization is off (int8 where it is on);
                               # "checkpoint": as the models' checkpoints store them (so naive reads are exact);
                               # "compute": in the compute dtype (after "auto" chose it), so rows are multiplied
                               # where they land, with no conversion per token
    compute_dtype = "float32"  # precision of the engine and its dense reference ("float16": the paper's 16-bit;
                               # "auto": the 16-bit dtype this CPU multiplies fastest, measured when it loads)
    device = "cpu"        # where the engine and its dense reference compute: "cpu", or "cuda" (a GPU)
    gap_bytes = 0         # merge reads this close (sparse configurations)
    whole_gap_bytes = 0   # ... and in configurations that need every non-resident neuron
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
    alternate_with_naive = false  # true: each configuration that reads every neuron (without overlap) is timed
                                  # beside a naive SUT, their steps alternating token by token (its ratio to naive
                                  # of the same moments)
    profile = "paper-opt-6.7b"  # synthetic models: the trace profile ("embedded-<model>" scales a measured one)
    peers = ["llama.cpp", "mmap", "accelerate", "airllm"]  # peers on the same checkpoint, capped at the DRAM budget
    peer_tokens = 8
    dram_budget = 0.5         # fraction of the checkpoint's weight bytes
    engine_within_budget = false  # true: our engine is held to the budget too (a configuration that cannot fit
                                  # is recorded as such); false: the budget caps the peers, our use is reported
    techniques = ["hybrid", "predictor", ...]  # default: every technique of the table (harness/matrix.py)
    heldout_text = "my.txt"   # optional: held-out text file (default: suite/data/heldout.txt), beside this file
    train_text = "train.txt"  # optional: text to count neurons and train a predictor on (default: training plays)
    source = "predictor"      # or "oracle": exact sparsity, where the model has no predictor and none should be
                              # trained (one is trained, and cached under --work, where none is beside the model)
    predictor_tokens = 131072 # at most this many training tokens when a predictor is trained
    dense = "auto"            # the dense reference all in DRAM ("memory"), streamed from flash layer by layer
                              # ("streamed"), or streamed where the weights would take half the available memory
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from flashbench import suite
from flashbench.reference.activations import COUNTS_TOKENS
from flashbench.reference.checkpoint import stored_dtype
from flashbench.reference.config import ModelConfig
from flashbench.reference.device import DeviceError, resolve
from flashbench.reference.errors import FlashbenchError

from .agreement import approximate_tier
from .compute import measure_rates, weight_elements
from .matrix import Settings, technique_names
from .peers import PEERS
from .probe import KIB, ProbeGrid
from .texts import read_text

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
    # default (None): every row of the table that applies to the model's FFN (`threshold` to SiLU ones only)
    techniques: tuple[str, ...] | None = None
    whole_read_tokens: int | None = None  # fewer tokens for configurations reading every neuron (default: tokens)
    # Those configurations (without overlap) timed beside a naive SUT loaded with each, token by token: their speedup
    # over naive is of the same minutes of a disk whose speed drifts (harness/measure.py)
    alternate_with_naive: bool = False
    profile: str | None = None  # synthetic models: the trace profile
    seed: int = 0
    peers: tuple[str, ...] = ("llama.cpp", "mmap", "accelerate", "airllm")
    peer_tokens: int = 8
    dram_budget: float = 0.5  # the peers' DRAM budget for weights, as a fraction of the checkpoint's weight bytes
    engine_within_budget: bool = False  # our engine is held to the same budget
    heldout_text: str | None = None  # a text file for agreement, perplexity and the timed tokens (default: the
    # suite's held-out plays); relative to the scenario's folder
    train_text: str | None = None  # a text file to count hot and dead neurons and train a predictor on (default:
    # the embedded models' training plays)
    source: str = "predictor"  # what stands for the predictor technique: the model's predictor, or "oracle"
    predictor_tokens: int = COUNTS_TOKENS  # at most this many training tokens when a predictor must be trained
    # The dense model (reference, counts, predictor training): "memory" (all weights in DRAM), "streamed" (the naive
    # flash engine, layer by layer from a layout in the checkpoint's dtype) or "auto" (streamed where the weights
    # would take more than half the available memory)
    dense: str = "auto"

    def __post_init__(self):
        for name in ("tokens", "greedy_prompt", "greedy_tokens", "counts_tokens", "seed", "peer_tokens",
                     "whole_read_tokens", "predictor_tokens"):
            value = getattr(self, name)
            if not (value is None and name == "whole_read_tokens") and (type(value) is not int or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.dram_budget, bool) or not isinstance(self.dram_budget, (int, float)) or \
                self.dram_budget <= 0:
            raise ValueError(f"dram_budget must be a positive fraction of the weights, got {self.dram_budget!r}")
        for name in ("engine_within_budget", "alternate_with_naive"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not all(isinstance(t, str) for t in (self.techniques or ()) + self.peers):
            raise ValueError("techniques and peers must be lists of names")
        if self.dense not in ("auto", "memory", "streamed"):
            raise ValueError(f"dense must be \"auto\", \"memory\" or \"streamed\", got {self.dense!r}")
        if self.source not in ("predictor", "oracle"):
            raise ValueError(f"source must be \"predictor\" or \"oracle\", got {self.source!r}")
        for name in ("heldout_text", "train_text"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be the path of a text file, got {getattr(self, name)!r}")


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
    compute: dict | None = None  # compute_dtype = "auto": the rates measured and the dtype they chose


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
    models_named = [m.get("name") for m in raw.get("models", []) if isinstance(m, dict)]
    settings, compute = _settings(raw.get("engine", {}), where, models_named)
    probe_table = dict(raw.get("probe", {}))
    fresh_probe = probe_table.pop("fresh", False)
    if not isinstance(fresh_probe, bool):
        raise ScenarioError(f"{path} [probe]: fresh must be true or false, got {fresh_probe!r}")
    if "chunk_kib" in probe_table:
        probe_table["chunk_bytes"] = [int(k * KIB) for k in probe_table.pop("chunk_kib")]
    probe = _build(ProbeGrid, probe_table, f"{path} [probe]", chunk_bytes=tuple, threads=tuple, ioengines=tuple)

    def relative(text):  # a text file named in the scenario is found beside it
        return str(path.parent / text) if isinstance(text, str) else text

    models = tuple(_build(ModelSpec, m, f"{path} [[models]] #{i + 1}", techniques=tuple, peers=tuple,
                          heldout_text=relative, train_text=relative)
                   for i, m in enumerate(raw.get("models", [])))
    if not models:
        raise ScenarioError(f"{path}: no [[models]]")
    _check_texts(models)
    for m in models:
        unknown = set(m.techniques or ()) - set(technique_names())
        if unknown:
            raise ScenarioError(f"{path}: model {m.name!r}: unknown techniques {sorted(unknown)}")
        too_few = [k for k in ("tokens", "whole_read_tokens") if getattr(m, k) is not None and getattr(m, k) < 3]
        if too_few:
            raise ScenarioError(f"{path}: model {m.name!r}: {too_few[0]} must be at least 3 (a one-token prefill, "
                                "then at least one timed decode step)")
        if set(m.peers) - set(PEERS):
            raise ScenarioError(f"{path}: model {m.name!r}: unknown peers {sorted(set(m.peers) - set(PEERS))}")
    return Scenario(raw.get("name", path.stem), raw.get("description", ""), str(path), settings, probe, models, raw,
                    fresh_probe, compute)


def for_model(scenario: Scenario, checkpoint: str, **given: str | None) -> Scenario:
    """`scenario` with its first [[models]] table applied to the checkpoint folder `checkpoint` (a user's model),
    and the keys `given` (heldout_text, train_text, source) where not None: `flashbench run --model`. The records'
    raw scenario says so, so a resumed run must be given the same model."""
    if not (Path(checkpoint) / "config.json").is_file():
        raise ScenarioError(f"{checkpoint}: no config.json: --model needs a Hugging Face checkpoint folder "
                            "(config.json, *.safetensors and the tokenizer files)")
    table = dict(scenario.raw["models"][0]) | {"name": str(Path(checkpoint).resolve())}
    for key in ("heldout_text", "train_text"):  # as load() reads them: beside the scenario, unless given here
        if isinstance(table.get(key), str):
            table[key] = str(Path(scenario.path).parent / table[key])
        if given.get(key) is not None:
            table[key] = str(Path(given[key]).resolve())
    table |= {k: v for k, v in given.items() if v is not None and not k.endswith("_text")}
    where = f"{scenario.path} [[models]] #1 for --model {checkpoint}"
    model = _build(ModelSpec, table, where, techniques=tuple, peers=tuple)
    _check_texts((model,))
    settings, compute = _settings(scenario.raw.get("engine", {}), f"{scenario.path} [engine]", [table["name"]])
    return replace(scenario, settings=settings, models=(model,), raw=scenario.raw | {"models": [table]},
                   compute=compute)


def _check_texts(models) -> None:
    """Every text file a model names can be read as text, before anything runs (TextError names the file)."""
    for m in models:
        for text in (m.heldout_text, m.train_text):
            if text is not None:
                read_text(text)


def _settings(engine: dict, where: str, models: list) -> tuple[Settings, dict | None]:
    """The [engine] table, and what compute_dtype or matvec = "auto" measured. storage_dtype = "checkpoint" becomes
    the dtype the models store their FFN weights in (so the layouts hold them exactly), which must then be one dtype
    for all of them; compute_dtype = "auto" the 16-bit dtype this CPU multiplies fastest at the largest model's FFN
    shape (harness/compute.py), matvec = "auto" the faster kernel for the compute dtype there; storage_dtype =
    "compute" then the compute dtype, so that no read is converted (the dense reference rounds the checkpoint's
    weights to the compute dtype too, so naive reads stay exact)."""
    engine, compute = dict(engine), None
    if isinstance(engine.get("device"), str):
        try:
            resolve(engine["device"])  # a GPU this machine lacks stops the run before anything runs
        except DeviceError as e:
            raise ScenarioError(f"{where}: {e}") from e
    names = [name for name in models if isinstance(name, str)]
    if engine.get("storage_dtype") == "checkpoint":
        dtypes = {name: _stored_dtype(name) for name in names}
        if len(set(dtypes.values())) != 1:
            raise ScenarioError(f"{where}: storage_dtype = \"checkpoint\" needs models stored in one dtype; "
                                f"they store theirs as {dtypes}")
        engine["storage_dtype"] = dtypes.popitem()[1]
    if "auto" in (engine.get("compute_dtype"), engine.get("matvec")) and names:
        largest = max(map(_model_config, names), key=lambda c: c.d_ffn * c.d_model)
        compute = measure_rates((largest.d_ffn, largest.d_model), device=engine.get("device", "cpu"),
                                model_elements=weight_elements(largest)).as_dict()
        if engine.get("compute_dtype") == "auto":
            engine["compute_dtype"] = compute["chosen"]
        if engine.get("matvec") == "auto":
            engine["matvec"] = compute["matvec"][engine.get("compute_dtype", Settings.compute_dtype)]
        compute["resolved"] = {k: engine[k] for k in ("compute_dtype", "matvec") if k in engine}
    if engine.get("storage_dtype") == "compute":
        engine["storage_dtype"] = engine.get("compute_dtype", Settings.compute_dtype)
    return _build(Settings, engine, where, approximate=lambda v: approximate_tier(v, where)), compute


def _model_config(name: str) -> ModelConfig:
    if name.startswith("synthetic:"):
        from flashbench.suite.synthetic import shape_config

        try:
            return shape_config(name.removeprefix("synthetic:"))
        except FlashbenchError as e:
            raise ScenarioError(str(e)) from e
    return ModelConfig.load(suite.model_path(name))


def _stored_dtype(name: str) -> str:
    if name.startswith("synthetic:"):
        return "float16"  # written so by `write_synthetic`
    return stored_dtype(suite.model_path(name), _model_config(name))
