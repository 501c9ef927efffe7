"""The main job: a scenario's probe, models and technique matrix, one canonical JSON record per configuration.

reports/<run-id>/
  run.json                       the index: scenario, machine, versions, git commit, timings, the record list
  records/probe.json             the storage probe (fio, or the labelled fallback)
  records/<model>/model.json     the model: checkpoint, activation source, dense reference speed, trace profile
  records/<model>/<config>.json  one per configuration of the matrix
  records/<model>/peer-<peer>.json  each peer (llama.cpp, our mmap emulation, accelerate, AirLLM), or why not run
Every record carries the machine, versions, git commit, scenario, seeds and every parameter. Records are
written atomically, so an interrupted run leaves whole records and no run.json; `flashbench run --resume` keeps
them and measures the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from flashbench import suite
from flashbench.reference import Engine, Transformer
from flashbench.reference.activations import (COACTIVATION_TOKENS, COUNTS_FILE, active_sample, activation_counts,
                                              counts_provenance, dead_neuron_pruning, load_counts, thresholds_key)
from flashbench.reference.checkpoint import expected_shapes, stored_dtype, weight_files
from flashbench.reference.config import ModelConfig
from flashbench.reference.device import exact_float32, resolve
from flashbench.reference.errors import CheckpointError
from flashbench.reference.flash import COMPUTE_DTYPES, BudgetError, FlashEngine, Techniques
from flashbench.reference.layout import FFNGeometry, record_vectors
from flashbench.reference.predictor import Predictor, lookahead_path
from flashbench.reference.storage import storage_of
from flashbench.reference.threshold import CALIBRATION_TOKENS, threshold_at, unthresholded
from flashbench.reference.tokenizer import Tokenizer

from .agreement import dense_reference, heldout_sequences
from .adapters import EngineSUT
from .compute import measure_rates, weight_elements
from .matrix import LayoutSpec, Settings, describe, effective, matrix, ordered, technique_names
from .measure import ModelUnderTest, measure, return_freed_memory
from .peers import measure_peer
from .probe import Probe, probe, table
from .records import SCHEMA, RecordError, git_commit, machine_info, portable_path, versions, write_json_atomic
from .scenario import ModelSpec, Scenario
from .texts import Text, TextError, heldout_text, training_text
from .sut import Guarded, SUTError, SystemUnderTest
from .sweep import choose_reader


def checkpoint_model(spec: ModelSpec, work: Path, progress=print, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", threshold: float = Settings.threshold) -> tuple[ModelUnderTest, dict]:
    """An HF checkpoint, embedded or the user's, with its own tokenizer and the spec's texts: the dense reference
    (computing in `dtype` on `device`, as the engine does), its activation source (`activation_source`), hot and
    dead neurons.
    A SiLU FFN has none of its own: its thresholds are calibrated to the target sparsity `threshold`, and the
    activation source, hot and dead neurons are those of the thresholded model (the threshold technique's)."""
    path, config = suite.model_path(spec.name), model_config(spec)
    tokenizer = Tokenizer.load(path, config)
    mut = ModelUnderTest(
        name=path.name, checkpoint=path, work=work / path.name, source="all", source_label="all neurons",
        new_source=lambda _lookahead: None, neuron_counts=np.zeros((config.n_layers, config.d_ffn), np.int64),
        tokens=[], whole_read_tokens=spec.whole_read_tokens, dense_ffn=dense_ffn(config),
    )
    model, streamed, close = dense_model(spec, mut, dtype, device, progress)
    try:
        return _checkpoint_model(spec, mut, model, tokenizer, streamed, dtype, device, threshold, progress)
    finally:
        close()


def dense_ffn(config: ModelConfig) -> bool:
    """A SiLU FFN: no activation exactly zero, so its sparse configurations need the threshold technique."""
    return not config.sparse


def _checkpoint_model(spec: ModelSpec, mut: ModelUnderTest, model: Transformer, tokenizer: Tokenizer,
                      streamed: str | None, dtype: torch.dtype, device: str, threshold: float,
                      progress) -> tuple[ModelUnderTest, dict]:
    path = mut.checkpoint
    heldout = heldout_text(spec.heldout_text)
    ids = heldout.tokens(tokenizer)
    if len(ids) < spec.tokens + spec.greedy_prompt:
        raise TextError(f"{heldout.label}: {len(ids):,} tokens with {path.name}'s tokenizer, fewer than the "
                        f"{spec.tokens + spec.greedy_prompt} the scenario judges on (tokens + greedy_prompt)")
    tokens, prompt = heldout_sequences(ids, tokenizer.bos, spec.tokens, spec.greedy_prompt)
    progress(f"  tokenizer {tokenizer.describe()}; held-out text {heldout.label}: {len(ids):,} tokens")
    progress(f"  dense reference ({str(dtype).removeprefix('torch.')} on {device}): {len(tokens)} held-out tokens "
             f"teacher-forced, greedy {spec.greedy_tokens} tokens")
    exact_float32(resolve(device))
    if not streamed:
        model.to(device)  # the reference runs where the engine does (a streamed model is already there)
    dense = Engine(model, max_len=max(len(tokens), len(prompt) + spec.greedy_tokens))
    reference = dense_reference(dense, tokens, prompt, spec.greedy_tokens, dtype)
    if not streamed:
        model.to("cpu")  # activation counts and a predictor's training run on the host
    texts = {"heldout": {"text": heldout.label, "tokens": len(ids)}}
    mut = replace(mut, tokens=tokens, reference=reference)
    info = {"checkpoint": portable_path(path), "config": model.config.as_dict(), "tokenizer": tokenizer.describe(),
            "texts": texts,
            "dense": {"tokens_per_s": reference.tokens_per_s, "teacher_forced_tokens": len(tokens),
                      "greedy_prompt_tokens": len(prompt), "greedy_tokens": len(reference.continuation.tokens),
                      "logit_bound": reference.logit_bound,
                      "dtype": str(dtype).removeprefix("torch."), "device": device, "streamed": streamed,
                      "weights_bytes": sum(p.nbytes for p in model.parameters())}}
    train = training_text(spec.train_text)
    train_ids = train.tokens(tokenizer, spec.counts_tokens)
    texts["train"] = {"text": train.label, "tokens": len(train_ids)}
    if not mut.dense_ffn:
        return _sparse_sources(spec, mut, model, tokenizer, train, train_ids, ids, info, progress)
    if spec.techniques is not None and "threshold" not in spec.techniques:  # None: every row that applies
        progress(f"  {model.config.activation} FFN: no activation is exactly zero, and the threshold technique is "
                 "not in this model's matrix: its sparse configurations do not apply")
        return mut, info | {"activation_source": None, "pruning": None}
    calibration = train_ids[:CALIBRATION_TOKENS]
    progress(f"  {model.config.activation} FFN: no activation is exactly zero; thresholds for a target sparsity of "
             f"{threshold:.0%} (the threshold technique) calibrated on {len(calibration):,} training tokens")
    try:  # what the sparse techniques use comes from the thresholded model
        thresholds = threshold_at(model, calibration, threshold, tokenizer.bos)
        info |= {"threshold": {"target_sparsity": threshold, "thresholds": thresholds, "text": train.label,
                               "calibration_tokens": len(calibration), "calibration": thresholds_key(model)}}
        # With the oracle source the gate rows stay in DRAM and decide the set; with a predictor they are read with
        # up and down for each predicted neuron
        mut = replace(mut, thresholds=thresholds, gate_resident=spec.source == "oracle")
        return _sparse_sources(spec, mut, model, tokenizer, train, train_ids, ids, info, progress)
    finally:
        unthresholded(model)


def _sparse_sources(spec: ModelSpec, mut: ModelUnderTest, model: Transformer, tokenizer: Tokenizer, train: Text,
                    train_ids: list[int], ids: list[int], info: dict, progress) -> tuple[ModelUnderTest, dict]:
    """The activation counts (hot and dead neurons) and activation source of `model`'s sparse FFN."""
    path, texts = mut.checkpoint, info["texts"]
    provenance = counts_provenance(path, model, train_ids, tokenizer.bos)
    counts = load_counts(path / COUNTS_FILE, provenance)
    shipped = counts is not None
    progress(f"  activation counts on {len(train_ids):,} training tokens ({train.label}): hot neurons for the "
             f"hybrid, dead ones for pruning" + (f"; shipped in {COUNTS_FILE}, made from this checkpoint and these "
                                                 "tokens" if shipped else ""))
    if not shipped:
        counts, _ = activation_counts(model, train_ids, model.config.max_positions, tokenizer.bos)
    kept, pruning = dead_neuron_pruning(counts, train.label, len(train_ids))
    active = None
    if spec.techniques is None or "placement" in spec.techniques:
        sample = train_ids[:COACTIVATION_TOKENS]
        progress(f"  activations on {len(sample):,} training tokens: the placed layout's co-activation order")
        active = active_sample(model, sample, model.config.max_positions, tokenizer.bos)
        texts["train"]["coactivation_tokens"] = len(sample)
    source, label, new_source = activation_source(spec, path, model, tokenizer, train, ids, mut.work, progress)
    texts["train"]["predictor_tokens"] = spec.predictor_tokens if source == "predictor" else None
    mut = replace(mut, source=source, source_label=label, new_source=new_source, neuron_counts=counts, kept=kept,
                  pruning=pruning, active=active, active_tokens=len(train_ids[:COACTIVATION_TOKENS]))
    return mut, info | {"activation_source": label, "pruning": pruning,
                        "counts": {"text": train.label, "tokens": len(train_ids), "shipped": shipped}}


def available_memory() -> int:
    """Bytes of memory a new allocation can have without swapping: MemAvailable (free memory and page cache the
    kernel can drop)."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def dense_model(spec: ModelSpec, mut: ModelUnderTest, dtype: torch.dtype, device: str,
                progress) -> tuple[Transformer, str | None, Callable[[], None]]:
    """The dense model that the reference, the activation counts and a predictor's training run on, with what says
    how it runs (None: all in DRAM) and what closes it. Where the spec asks for it (dense = "streamed"), or where
    the weights would take more than half the available memory ("auto"), it is the naive flash engine's model over a
    layout in the checkpoint's own dtype: every neuron of every layer read from flash per pass, the same sums as
    dense inference, with only the resident weights and one layer's FFN in memory."""
    config = ModelConfig.load(mut.checkpoint)
    need = sum(math.prod(s) for s in expected_shapes(config).values()) * dtype.itemsize
    available = available_memory()
    if spec.dense == "memory" or (spec.dense == "auto" and need <= available // 2):
        return Transformer.from_checkpoint(mut.checkpoint, dtype=dtype), None, lambda: None
    spec_of = LayoutSpec("unbundled", stored_dtype(mut.checkpoint, config))
    layout = mut.layout(spec_of, progress)
    engine = FlashEngine(layout, Techniques.naive(compute_dtype=str(dtype).removeprefix("torch."), device=device))
    how = (f"streamed: the naive flash engine over the {spec_of.name} layout (every neuron read per pass, layer by "
           f"layer), as {need / 2**30:.1f} GiB of weights " + ("were asked to stream" if spec.dense == "streamed"
                                                                  else f"exceed half the {available / 2**30:.1f} GiB "
                                                                       "available"))
    progress(f"  dense model {how}")
    return engine.model, how, engine.close


def activation_source(spec: ModelSpec, path: Path, model: Transformer, tokenizer: Tokenizer, train: Text,
                      heldout_ids: list[int], work: Path, progress) -> tuple[str, str, Callable]:
    """(source name, label, a function making a fresh source, with its lookahead or not) for the "predictor"
    technique: the oracle where the spec asks for it (exact sparsity, read from flash), else the model's predictor:
    shipped beside the checkpoint, cached under `work` by an earlier run, or trained now (and cached). Where the
    model's matrix has the overlap technique, the same goes for the lookahead predictor. A thresholded model's
    predictor is one trained at its thresholds: a shipped one made at others is not used."""
    if spec.source == "oracle":
        if thresholds_key(model) is not None:
            how = "the thresholded SiLU of the gate rows, kept in DRAM (CATS); records hold up and down only"
        else:
            how = f"computed from the {'gate' if model.config.gated else 'up'} rows read from flash"
        return "oracle", f"oracle (the exact active set, {how}; lookahead: the next layer's rows on this layer's " \
                         "input)", lambda _lookahead: None
    shipped = path / "predictor"
    overlap = "overlap" in (spec.techniques or technique_names())
    cached = None  # where this checkpoint's predictors are cached under `work`

    def cache() -> tuple[Path, list[int], str | None]:  # (where, training tokens, thresholds key)
        nonlocal cached
        if cached is None:
            train_ids = train.tokens(tokenizer, spec.predictor_tokens)
            provenance = counts_provenance(path, model, train_ids, tokenizer.bos)
            key = hashlib.sha256(f"{provenance}:{spec.seed}".encode())
            cached = (work / f"predictor-{key.hexdigest()[:16]}", train_ids, provenance.get("thresholds"))
        return cached

    if shipped.with_suffix(".json").is_file() and shipped_thresholds(shipped) == thresholds_key(model):
        where = shipped
    else:
        where, train_ids, thresholds = cache()
        if not where.with_suffix(".json").is_file():
            train_and_cache_predictor(model, train_ids, heldout_ids, tokenizer.bos, train.label, where, spec.seed,
                                      progress, thresholds)
    ahead = lookahead_path(where)
    if overlap and not ahead.with_suffix(".json").is_file():
        cached_where, train_ids, thresholds = cache()
        ahead = lookahead_path(cached_where)
        if not ahead.with_suffix(".json").is_file():
            train_and_cache_predictor(model, train_ids, heldout_ids, tokenizer.bos, train.label, ahead, spec.seed,
                                      progress, thresholds, lookahead=True)
    predictor = Predictor.load(where)
    label = (f"predictor (rank {predictor.module.rank}, threshold {predictor.threshold}, "
             f"{where.with_suffix('.safetensors').name}" + (f"; lookahead {ahead.with_suffix('.safetensors').name}"
                                                            if overlap else "") + ")")
    return "predictor", label, lambda lookahead: Predictor.load(where, lookahead=ahead if lookahead else None)


def shipped_thresholds(predictor: Path) -> str | None:
    """The thresholds a predictor was trained at (None: an unthresholded model's)."""
    return (json.loads(predictor.with_suffix(".json").read_text()).get("metrics") or {}).get("thresholds")


def train_and_cache_predictor(model: Transformer, train_ids: list[int], heldout_ids: list[int], bos: int | None,
                              text: str, where: Path, seed: int, progress, thresholds: str | None = None,
                              lookahead: bool = False) -> None:
    """Train the model's predictors, or its lookahead predictors (with progress and an estimate of the time left),
    and cache them at `where`, atomically: the JSON half, which `Predictor.load` needs, is renamed into place last."""
    from flashbench.reference.predictor import train_predictor

    c = model.config
    need = len(train_ids) * c.n_layers * (c.d_model * 4 + c.d_ffn)  # every layer's FFN inputs and active sets
    what = "lookahead predictor (for overlap)" if lookahead else "predictor"
    progress(f"  no {what} for this checkpoint: training one per layer on {len(train_ids):,} tokens of {text} "
             f"(the scenario's predictor_tokens), holding {need / 2**30:.2f} GiB of activations; at paper scale on "
             f"two cores this takes hours: bound it with predictor_tokens, or measure exact sparsity with "
             f"source = \"oracle\"")
    available = available_memory()
    if need > available // 2:
        raise BudgetError(f"training the predictor on {len(train_ids):,} tokens needs {need / 2**30:.1f} GiB of "
                          f"activations, more than half the {available / 2**30:.1f} GiB available: lower "
                          "predictor_tokens or use source = \"oracle\"")
    t0, layers = time.perf_counter(), itertools.count(1)
    layers_trained = c.n_layers - 1 if lookahead else c.n_layers

    def layer_done(line: str) -> None:  # train_predictor reports each layer once, in order
        done = next(layers)
        left = (time.perf_counter() - t0) / done * (layers_trained - done)
        progress(f"{line} ({done}/{layers_trained}; about {left / 60:.1f} min left)")

    predictor = train_predictor(model, train_ids, heldout_ids, bos, seed=seed, progress=layer_done,
                                lookahead=lookahead)
    predictor.metrics["text"] = text
    if thresholds is not None:
        predictor.metrics["thresholds"] = thresholds  # the thresholded SiLU it predicts
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".predictor-", dir=where.parent))
    try:
        predictor.save(tmp / "p")
        os.replace(tmp / "p.safetensors", where.with_suffix(".safetensors"))
        os.replace(tmp / "p.json", where.with_suffix(".json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    recall = np.mean([m["recall"] for m in predictor.metrics["heldout_layers"]])
    progress(f"  {what} trained in {(time.perf_counter() - t0) / 60:.1f} min: mean held-out recall {recall:.1%}; "
             f"cached as {where}")


def synthetic_model(spec: ModelSpec, work: Path, progress=print, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", threshold: float = Settings.threshold) -> tuple[ModelUnderTest, dict]:
    """A paper-scale random-weight model (written once per shape and seed, then reused) replaying a trace; the
    trace's first `tokens` sets are replayed, the next `counts_tokens` choose hot and dead neurons. It has no dense
    reference, so `dtype` and `device` play no part here, and its FFN is ReLU, so `threshold` none."""
    from flashbench.reference.sources import Trace as TraceSource
    from flashbench.suite import traces
    from flashbench.suite.models import byte_tokenizer
    from flashbench.suite.synthetic import shape_config, weight_bytes, write_synthetic

    shape = spec.name.removeprefix("synthetic:")
    config = shape_config(shape)
    root = work / f"synthetic-{shape}-seed{spec.seed}"
    checkpoint = root / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        progress(f"  writing {shape} random weights (seed {spec.seed}, {weight_bytes(config) / 2**30:.2f} GiB fp16) "
                 f"to {checkpoint}")
        write_synthetic(shape, checkpoint, spec.seed)
    profile = traces.profile_named(spec.profile or traces.PAPER_OPT_6_7B.name)
    progress(f"  trace: profile {profile.name}, {spec.tokens} replayed + {spec.counts_tokens} counting tokens")
    trace = traces.generate(profile, config.n_layers, config.d_ffn, spec.tokens + spec.counts_tokens, spec.seed)
    trace.save(root / f"trace-{profile.name}-seed{spec.seed}")
    replay, counting = trace.sets[: spec.tokens], trace.sets[spec.tokens :]
    ahead = traces.lookahead(replay, config.d_ffn, spec.seed)
    counts = np.zeros((config.n_layers, config.d_ffn), dtype=np.int64)
    for sets in counting:
        for layer, ids in enumerate(sets):
            counts[layer, ids] += 1
    active = None
    if spec.techniques is None or "placement" in spec.techniques:  # the placed layout's co-activation order
        sample = counting[:COACTIVATION_TOKENS]
        active = [np.zeros((len(sample), config.d_ffn), dtype=bool) for _ in range(config.n_layers)]
        for t, sets in enumerate(sample):
            for layer, ids in enumerate(sets):
                active[layer][t, ids] = True
        active = [np.packbits(a, axis=0) for a in active]
    kept, pruning = dead_neuron_pruning(counts, "the trace's counting tokens", len(counting))
    achieved = (np.mean([l["predicted_achieved"] for l in trace.layers]), np.mean([l["new_achieved"] for l in trace.layers]))
    label = (f"trace, profile {profile.name} ({profile.description}); achieved {achieved[0]:.1%} predicted and "
             f"{achieved[1]:.2%} new per token at window {profile.window}, seed {spec.seed}; lookahead guesses "
             f"{traces.LOOKAHEAD_SIZE}x each set, ranked as shakespeare-opt's lookahead predictor ranks (set and "
             f"others {traces.LOOKAHEAD_SEPARATION} standard deviations apart)")
    tokenizer = byte_tokenizer.tokenizer()  # the random model's ids are bytes by construction (`write_synthetic`)
    ids = tokenizer.encode(suite.heldout_text(), bos=False)
    mut = ModelUnderTest(
        name=f"synthetic-{shape}", checkpoint=checkpoint, work=root, source="trace", source_label=label,
        new_source=lambda overlap: TraceSource(replay, ahead if overlap else None), neuron_counts=counts,
        tokens=heldout_sequences(ids, tokenizer.bos, spec.tokens)[0],
        no_reference=("synthetic random weights replaying a trace: the trace is not the model's own active set, "
                      "so its outputs are not comparable with dense inference; agreement is judged on the embedded "
                      "models"),
        kept=kept, pruning=pruning, whole_read_tokens=spec.whole_read_tokens, active=active,
        active_tokens=len(counting[:COACTIVATION_TOKENS]),
    )
    info = {"checkpoint": portable_path(checkpoint), "shape": shape, "config": config.as_dict(),
            "activation_source": label,
            "trace": {"profile": vars(profile), "layers": trace.layers, "seed": spec.seed},
            "pruning": pruning, "weights_bytes_fp16": weight_bytes(config)}
    return mut, info


def largest_record(scenario: Scenario) -> int:
    """Bytes of the largest bundled record among the scenario's models, in its storage dtype (what `reader = "auto"`
    measures the reader with)."""
    dtype = scenario.settings.storage_dtype
    return max(FFNGeometry("bundled", dtype, c.d_model, c.d_ffn, record_vectors(c)).record_bytes
               for c in map(model_config, scenario.models))


def model_config(spec: ModelSpec) -> ModelConfig:
    """The model's configuration, before anything is prepared."""
    if spec.name.startswith("synthetic:"):
        from flashbench.suite.synthetic import shape_config

        return shape_config(spec.name.removeprefix("synthetic:"))
    path = suite.model_path(spec.name)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no such checkpoint (embedded models: {', '.join(suite.EMBEDDED_MODELS)})")
    return ModelConfig.load(path)


def model_name(spec: ModelSpec) -> str:
    """The name its records are filed under (as `checkpoint_model` and `synthetic_model` name it)."""
    if spec.name.startswith("synthetic:"):
        return "synthetic-" + spec.name.removeprefix("synthetic:")
    return suite.model_path(spec.name).name


def whole_records(records_dir: Path, scenario: Scenario) -> dict[str, dict]:
    """The records an interrupted run left, by relative path. Records are written atomically, so each file is
    whole; a temp file a killed write left behind is removed. Records of another scenario, schema or commit are an
    error: one run's records come from one version of the code."""
    commit = git_commit()["commit"]
    finished = {}
    for path in sorted(records_dir.rglob("*")):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink()
        elif path.suffix == ".json":
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise RecordError(f"{path}: unreadable record ({e}); remove it to measure it again") from e
            if rec.get("schema") != SCHEMA or rec.get("scenario", {}).get("raw") != scenario.raw:
                raise RecordError(f"{path}: a record of another scenario or schema: resume with the scenario the "
                                 f"run started with ({rec.get('scenario', {}).get('path')})")
            computed = rec.get("settings", {}).get("compute_dtype", scenario.settings.compute_dtype)
            if computed != scenario.settings.compute_dtype:
                raise RecordError(f"{path}: computed in {computed}, and compute_dtype \"auto\" chose "
                                  f"{scenario.settings.compute_dtype} for this run: resuming would mix two precisions "
                                  "in one run; start a new run instead")
            kernel = rec.get("settings", {}).get("matvec", "linear")
            if kernel != scenario.settings.matvec:
                raise RecordError(f"{path}: multiplied by {kernel}, and matvec \"auto\" chose "
                                  f"{scenario.settings.matvec} for this run: resuming would mix two kernels in one "
                                  "run; start a new run instead")
            if rec.get("git", {}).get("commit") != commit:
                raise RecordError(f"{path}: measured at commit {rec.get('git', {}).get('commit')}, this checkout is "
                                 f"at {commit}: resuming would mix two versions of the code in one run; start a "
                                 "new run instead")
            finished[str(path.relative_to(records_dir))] = rec
    return finished


@contextmanager
def work_lock(work: Path, progress):
    """One run at a time per work directory: runs sharing it would convert the same layouts at once and disturb
    each other's timings. A second run waits for the first."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another run using {work} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_scenario(scenario: Scenario, out_dir: Path, work: Path, fresh_probe: bool = False,
                 progress=print, resume: bool = False, sut: Callable[[], SystemUnderTest] | None = None) -> dict:
    """Measure the scenario into out_dir/records, then write out_dir/run.json. `resume` keeps the records an
    interrupted run of the same scenario finished, and measures only the rest. `sut` makes the engine to measure
    (a fresh one per configuration; default: the reference engine, `EngineSUT`): the matrix is then over the
    techniques it declares in hello, and the peers are left out (they are measured beside our engine)."""
    started = time.time()
    if progress is print:
        def progress(line: str) -> None:  # every line with the run's elapsed time
            elapsed = int(time.time() - started)
            print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {line}", flush=True)

    with work_lock(work, progress):
        return _run(scenario, out_dir, work, fresh_probe, progress, resume, started, sut)


def declared_techniques(make_sut: Callable[[], SystemUnderTest]) -> tuple[dict, tuple[str, ...]]:
    """A SUT's hello, and the techniques of the table it can switch (asked once, of a SUT made for the purpose)."""
    sut = make_sut()
    try:
        hello = Guarded(sut).hello()
    finally:
        sut.close()
    names = hello.get("techniques", [])
    unknown = set(names) - set(technique_names())
    if unknown:
        raise SUTError(f"{hello['name']} declares techniques the table does not have: {sorted(unknown)} (known: "
                       f"{', '.join(technique_names())})")
    return hello, ordered(names)


def _run(scenario: Scenario, out_dir: Path, work: Path, fresh_probe: bool, progress, resume: bool,
         started: float, sut: Callable[[], SystemUnderTest] | None) -> dict:
    where = storage_of(work)
    storage = asdict(where) | {"in_memory": where.in_memory, "directory": portable_path(work.resolve())}
    header = {"schema": SCHEMA, "run_id": out_dir.name,
              "scenario": {"name": scenario.name, "path": portable_path(scenario.path), "raw": scenario.raw,
                           "compute": scenario.compute},
              "machine": machine_info() | {"storage": storage}, "versions": versions(), "git": git_commit()}
    records_dir = out_dir / "records"
    written: list[str] = []
    exact_failures: list[str] = []  # exact configurations that disagree with dense: a correctness bug

    finished = whole_records(records_dir, scenario) if resume else {}
    if resume:
        progress(f"[resume] {len(finished)} whole records kept from the interrupted run in {records_dir}")

    def write(rel: str, data: dict) -> None:
        write_json_atomic(records_dir / rel, header | data)
        written.append(rel)

    def resumed(rel: str) -> dict | None:
        """A record the interrupted run finished, now part of this run's index."""
        if rel in finished:
            written.append(rel)
        return finished.get(rel)

    def check_exact(rel: str, rec: dict) -> None:
        if rec.get("exact") and rec.get("agreement", {}).get("passed") is False:
            exact_failures.append(rel.removesuffix(".json"))

    if rec := resumed("probe.json"):
        storage_probe = Probe.from_dict(rec["probe"])
        reader = rec["probe"].get("reader_choice")
        progress("[probe] kept from the interrupted run")
    else:
        progress(f"[probe] fio over {len(scenario.probe.chunk_bytes)} chunk sizes x {len(scenario.probe.threads)} "
                 f"parallelisms x {len(scenario.probe.ioengines)} engines in {work}")
        storage_probe = probe(work, scenario.probe, fresh=fresh_probe or scenario.fresh_probe, progress=progress)
        progress(table(storage_probe))
        reader = None
        if scenario.settings.reader == "auto":
            progress("[reader] reader = \"auto\": threads against io_uring on the probe's file")
            reader = choose_reader(work, scenario.probe.file_mib << 20, largest_record(scenario),
                                   scenario.settings.threads, seconds=scenario.probe.seconds)
            progress(f"[reader] {reader['why']}")
        write("probe.json", {"kind": "probe", "probe": storage_probe.as_dict() | {
            "directory": portable_path(storage_probe.directory),
            "cached_from": storage_probe.cached_from and portable_path(storage_probe.cached_from),
            "reader_choice": reader}})
    if scenario.settings.reader == "auto":  # every configuration of the run reads with the backend chosen
        scenario = replace(scenario, settings=replace(scenario.settings, reader=reader["chosen"]))

    outside = None
    if sut is not None:
        outside, declared = declared_techniques(sut)
        progress(f"[sut] {outside['name']}: switches {', '.join(declared) or 'no technique'}; its matrix is measured, "
                 "without the peers")
    for i, spec in enumerate(scenario.models, 1):
        dense = dense_ffn(model_config(spec))
        if spec.techniques is None:  # every row of the table that applies to this FFN
            spec = replace(spec, techniques=technique_names(dense))
        if outside is not None:
            # the scenario's techniques the SUT declares, less those whose prerequisites it does not
            live, _ = effective({t for t in spec.techniques if t in declared}, dense)
            spec = replace(spec, techniques=ordered(live), peers=())
        name, configs = model_name(spec), matrix(spec.techniques, dense)
        rels = ([f"{name}/model.json"] + [f"{name}/{c.name}.json" for c in configs]
                + [f"{name}/peer-{p}.json" for p in spec.peers])
        if all(rel in finished for rel in rels):
            for rel in rels:
                check_exact(rel, resumed(rel))
            progress(f"[model {i}/{len(scenario.models)}] {spec.name}: all {len(rels)} records kept")
            continue
        progress(f"[model {i}/{len(scenario.models)}] {spec.name}")
        prepare = synthetic_model if spec.name.startswith("synthetic:") else checkpoint_model
        model, info = prepare(spec, work, progress, COMPUTE_DTYPES[scenario.settings.compute_dtype],
                              scenario.settings.device, scenario.settings.threshold)
        config = ModelConfig.load(model.checkpoint)
        model = replace(model, rates=measure_rates((config.d_ffn, config.d_model), device=scenario.settings.device,
                                                   model_elements=weight_elements(config)))
        rates = "; ".join(f"{d} {model.rates.rates_line(d)}" for d in model.rates.gb_per_s)
        progress(f"  matrix-vector rates at {config.d_ffn}x{config.d_model}: {rates}")
        info = info | {"compute_rates": model.rates.as_dict()}
        weights = sum(f.stat().st_size for f in weight_files(model.checkpoint))
        budget = int(spec.dram_budget * weights)
        if spec.engine_within_budget:
            progress(f"  the engine within the DRAM budget: {budget:,} bytes ({spec.dram_budget:.0%} of the "
                     f"checkpoint)")
        make_sut = sut or (lambda: EngineSUT(model, progress))
        if not resumed(f"{name}/model.json"):
            write(f"{name}/model.json", {"kind": "model", "model": name, "spec": asdict(spec), "techniques": describe(
                spec.techniques, scenario.settings, model.source, model.dense_ffn)} | info)
        for j, config in enumerate(configs, 1):
            rel = f"{name}/{config.name}.json"
            if rec := resumed(rel):
                progress(f"  [{j:2d}/{len(configs)}] {config.name}: kept")
            else:
                rec = measure(make_sut, model, config, scenario.settings, storage_probe, budget,
                              spec.engine_within_budget, spec.alternate_with_naive)
                rec = {"kind": "configuration", "spec": asdict(spec), "settings": asdict(scenario.settings),
                       "seeds": {"model": spec.seed}} | rec
                write(rel, rec)
                progress(f"  [{j:2d}/{len(configs)}] {_summary(rec)}")
            check_exact(rel, rec)
        model.release()
        return_freed_memory()  # the peers run in processes of their own, capped: what we freed is theirs to use
        for peer in spec.peers:
            if resumed(f"{name}/peer-{peer}.json"):
                progress(f"  peer {peer}: kept")
                continue
            progress(f"  peer {peer}: {spec.peer_tokens} tokens, DRAM budget {budget:,} bytes "
                     f"({spec.dram_budget:.0%} of the checkpoint)")
            result = measure_peer(peer, model.checkpoint, budget, model.tokens[:8], spec.peer_tokens,
                                  work=model.work, origin=model.checkpoint_sha256,
                                  dtype=scenario.settings.storage_dtype, reference=model.reference, progress=progress,
                                  timeout_s=600 + 60 * weights / 2**30)  # a peer that copies 13 GB first needs long
            write(f"{name}/peer-{peer}.json", {"kind": "peer", "model": name, "spec": asdict(spec)}
                  | asdict(result) | {"model_file": result.model_file and portable_path(Path(result.model_file))})
            progress(f"  peer {peer}: " + (f"{result.tokens_per_s:.3g} tokens/s" if result.status == "measured"
                                           else f"not run: {result.reason}"))

    index = header | {"kind": "run", "started": started, "seconds": time.time() - started, "records": written,
                      "kept_from_interrupted_run": sorted(set(finished) & set(written)),
                      "exact_failures": exact_failures}
    write_json_atomic(out_dir / "run.json", index)
    return index


def _summary(rec: dict) -> str:
    if rec["status"] != "measured":
        return f"{rec['configuration']:58s} {rec['status']}: {rec.get('error', '')}"
    m = rec["metrics"]
    a = rec["agreement"]
    verdict = "n/a" if "not_applicable" in a else ("PASS" if a["passed"] else "FAIL") + f" ({a['tolerance']})"
    io = m.get("ms", {}).get("io", {}).get("mean")
    read = m.get("per_token", {}).get("bytes_read")
    alternated = rec.get("alternated_with_naive")
    return (f"{rec['configuration']:58s} {m['tokens_per_s']:7.3g} tok/s  "
            + (f"{alternated['speedup_over_naive']:.2f}x naive alternated  " if alternated else "")
            + (f"io {io:6.2f} ms  " if io is not None else "") + (f"{read / 1024:8.1f} KiB/tok  " if read is not None
                                                                    else "") + verdict)

