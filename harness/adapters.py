"""The SUTs flashbench ships: the reference flash engine as the technique matrix measures it (`EngineSUT`, every
technique a switch), as `flashbench validate` judges it (`ReferenceSUT`), and transformers (dense). The last two also
run as a process through the protocol: `python -m flashbench.harness.serve flashbench.harness.adapters:ReferenceSUT`."""

from __future__ import annotations

import inspect
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from flashbench.reference.flash import FlashEngine, TokenStats, Techniques, down_kernel
from flashbench.reference.layout import FlashLayout, LayoutError, checkpoint_hash, convert

from .matrix import Configuration, Settings, technique_names
from .measure import ModelUnderTest, token_metrics
from .records import portable_path
from .sut import SUTError, SystemUnderTest


def layout_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashbench" / "sut"


class EngineSUT(SystemUnderTest):
    """The reference flash engine with every technique of the table as a switch, on a model the harness prepared
    (its flash layouts, activation source and neuron counts: `ModelUnderTest`). In-process: `flashbench run` measures
    our engine through the SUT interface at no cost in speed. Its counters report, beside the protocol's totals, its
    decode steps in detail (`decode_steps`), the engine settings and layout it ran, and the DRAM it held."""

    def __init__(self, model: ModelUnderTest, progress=print):
        self.model, self.progress = model, progress
        self.engine: FlashEngine | None = None
        self.steps: list[TokenStats] = []  # every decode step since load
        self.passes: list[TokenStats] = []  # every pass, prefills included

    def hello(self) -> dict:
        return {"name": "flashbench reference engine", "flash": True, "techniques": list(technique_names())}

    def load(self, checkpoint: Path, dram_budget: int, tolerance: str, techniques: tuple[str, ...] = (),
             settings: dict | None = None) -> int:
        settings = dict(settings or {})
        within_budget = settings.pop("within_budget", False)
        run = Settings(**settings)
        config = Configuration(frozenset(techniques))
        self.techniques = config.engine_settings(run, self.model.source)
        m = self.model
        self.spec = config.layout(run)
        if m.gate_resident and "threshold" in techniques:  # the resident gate decides the set (the oracle)
            self.spec = replace(self.spec, gate_resident=True)
        layout = m.layout(self.spec, self.progress)
        source = m.new_source(self.techniques.overlap) if "predictor" in techniques else None
        self.engine = FlashEngine(layout, self.techniques, source=source,
                                  neuron_counts=m.neuron_counts, max_len=m.max_len,
                                  dram_budget=dram_budget if within_budget else None,
                                  resident=m.resident(layout, self.techniques.torch_dtype),
                                  thresholds=m.thresholds if "threshold" in techniques else None)
        return layout.config.vocab_size

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        logits = self.engine.prefill(tokens)
        self.passes.append(self.engine.history[-1])
        return logits

    def step(self, token: int) -> torch.Tensor:
        logits = self.engine.step(token)
        self.steps.append(self.engine.history[-1])
        self.passes.append(self.engine.history[-1])
        return logits

    def counters(self) -> dict:
        engine, passes = self.engine, self.passes
        tokens = sum(p.tokens for p in passes) or 1
        return {
            "bytes_read": sum(p.io.bytes_read for p in passes), "reads": sum(p.io.reads for p in passes),
            "neurons_loaded": sum(p.io.records for p in passes),
            "ms_per_token": {"io": sum(p.io_wait_s for p in passes) * 1e3 / tokens,
                             "memory": sum(p.memory_s for p in passes) * 1e3 / tokens,
                             "predictor": sum(p.predictor_s for p in passes) * 1e3 / tokens,
                             "compute": sum(p.compute_s for p in passes) * 1e3 / tokens},
            "decode_steps": token_metrics(self.steps) if self.steps else None,
            "engine": vars(self.techniques) | {"down_kernel": down_kernel(self.techniques)},
            "layout": vars(self.spec) | {"name": self.spec.name, "path": portable_path(engine.layout.path)},
            "dram": vars(engine.dram) | {"weights_total": engine.dram.weights_total,
                                         "cache_peak_used": engine.cache_peak_used(),
                                         "cache_held": engine.cache_held()},
        }

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class ReferenceSUT(SystemUnderTest):
    """The reference flash engine on a bundled fp16 flash directory (converted once per checkpoint and cached),
    with the oracle activation source, so it is exact and reads only the truly active neurons, and a window of 5
    tokens, within the DRAM budget. (Its predictor configurations are judged in the technique matrix.)"""

    techniques = Techniques(source="oracle", window=5, threads=8)

    def __init__(self):
        self.engine: FlashEngine | None = None
        self.totals = {"bytes_read": 0, "neurons_loaded": 0, "reads": 0, "tokens": 0}
        self.ms = {"io": 0.0, "memory": 0.0, "compute": 0.0}

    def hello(self) -> dict:
        return {"name": "flashbench reference engine (oracle source, window 5, bundled fp16)", "flash": True}

    def load(self, checkpoint: Path, dram_budget: int, tolerance: str) -> int:
        sha256 = checkpoint_hash(checkpoint)
        path = layout_cache() / sha256[:16] / "bundled-float16"
        try:
            layout = FlashLayout.open(path)
        except LayoutError:  # not converted yet, half-written, or of another format version
            shutil.rmtree(path, ignore_errors=True)
            layout = convert(checkpoint, path, "bundled", "float16", sha256=sha256)
        self.engine = FlashEngine(layout, self.techniques, dram_budget=dram_budget)
        return layout.config.vocab_size

    def _count(self, logits: torch.Tensor) -> torch.Tensor:
        stats = self.engine.history[-1]
        self.totals["bytes_read"] += stats.io.bytes_read
        self.totals["neurons_loaded"] += stats.io.records
        self.totals["reads"] += stats.io.reads
        self.totals["tokens"] += stats.tokens
        self.ms["io"] += stats.io_wait_s * 1e3
        self.ms["memory"] += stats.memory_s * 1e3
        self.ms["compute"] += stats.compute_s * 1e3
        return logits

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        return self._count(self.engine.prefill(tokens))

    def step(self, token: int) -> torch.Tensor:
        return self._count(self.engine.step(token))

    def counters(self) -> dict:
        per_token = {k: v / max(1, self.totals["tokens"]) for k, v in self.ms.items()}
        return {"bytes_read": self.totals["bytes_read"], "neurons_loaded": self.totals["neurons_loaded"],
                "reads": self.totals["reads"], "ms_per_token": per_token}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class TransformersSUT(SystemUnderTest):
    """transformers, dense and fp32, with its own KV cache: every weight in DRAM, no flash."""

    def __init__(self):
        try:  # start-up before 'hello' (PROTOCOL.md): the modelling code of the architectures flashbench reads
            import transformers
            import transformers.models.llama.modeling_llama  # noqa: F401
            import transformers.models.opt.modeling_opt  # noqa: F401
        except ImportError as e:
            raise SUTError("the transformers adapter needs transformers: pip install 'flashbench[peers]'") from e
        self.transformers = transformers
        self.model, self.past = None, None

    def hello(self) -> dict:
        return {"name": f"transformers {self.transformers.__version__} (dense, fp32)", "flash": False}

    def load(self, checkpoint: Path, dram_budget: int, tolerance: str) -> int:
        self.model = self.transformers.AutoModelForCausalLM.from_pretrained(
            str(checkpoint), local_files_only=True, dtype=torch.float32).eval()
        # transformers 5.x calls the KV cache `cache`; earlier versions `past_key_values`
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        return self.model.config.vocab_size

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> torch.Tensor:
        out = self.model(torch.tensor([tokens]), use_cache=True)
        self.past = out[self.cache_name]
        return out.logits[0].float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        out = self.model(torch.tensor([[token]]), use_cache=True, **{self.cache_name: self.past})
        self.past = out[self.cache_name]
        return out.logits[0, -1].float()
