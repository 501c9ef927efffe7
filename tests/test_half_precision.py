"""16-bit compute: the engine holds weights, neuron cache and KV cache in float16 or bfloat16 (the paper's setting),
and is exact against a dense engine computing in the same precision, within limits that scale with its rounding."""

import pytest
import torch

from flashbench import suite
from flashbench.harness.agreement import agreement, checks, exact_tier, logit_bound, logit_scale
from flashbench.reference import Engine, Transformer, row_kernels
from flashbench.reference.flash import FlashEngine, Techniques
from flashbench.reference.layout import convert
from flashbench.reference.sources import Oracle
from flashbench.suite.models.byte_tokenizer import BOS, encode
from tests.exactness import note

TOKENS = [BOS] + encode(suite.heldout_text(), bos=False)[:48]


def teacher_forced_logits(engine) -> torch.Tensor:
    return torch.cat([engine.prefill(TOKENS[:1])] + [engine.step(t)[None] for t in TOKENS[1:-1]])


@pytest.fixture(scope="module", params=suite.RELU_MODELS)
def model(request, tmp_path_factory):
    """A shipped model (stored in float16), its float16 flash directory and its dense runs in each precision."""
    path = suite.model_path(request.param)
    root = tmp_path_factory.mktemp(request.param)
    dense = {dt: teacher_forced_logits(Engine(Transformer.from_checkpoint(path, dtype=getattr(torch, dt))))
             for dt in ("float32", "float16", "bfloat16")}
    return {"path": path, "flash": convert(path, root / "fp16", "bundled", "float16"), "root": root, "dense": dense}


def verdict(dense: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype, meant_exact: bool = True) -> list[str]:
    """The teacher-forced checks of the exact tier at `dtype` that fail (logged where the engine is meant exact)."""
    eps = logit_bound(dtype, logit_scale(dense))
    a = agreement(dense, logits, TOKENS[1:], tie_margin=2 * eps)
    if meant_exact:
        note(a.max_abs_logit_diff, eps, dtype)
    return [c.metric for c in checks(a, None, exact_tier(eps)) if not c.passed]


@pytest.mark.exactness
@pytest.mark.parametrize("techniques", [
    Techniques(source="oracle", window=0, threads=4, compute_dtype="float16"),
    Techniques(source="oracle", window=4, threads=4, compute_dtype="float16"),
    Techniques.naive(threads=4, compute_dtype="float16"),
    Techniques.naive(threads=4, compute_dtype="float16", matvec="rows"),
], ids=["no-window", "window-4", "naive", "naive-rows"])
def test_float16_engine_is_exact_against_float16_dense_inference(model, techniques):
    engine = FlashEngine(model["flash"], techniques)
    logits = teacher_forced_logits(engine)
    engine.close()
    assert verdict(model["dense"]["float16"], logits, torch.float16) == []


@pytest.mark.exactness
@pytest.mark.parametrize("layout, techniques", [
    ("bundled", Techniques(source="oracle", window=4, threads=4, compute_dtype="bfloat16")),
    ("unbundled", Techniques(source="oracle", window=0, threads=4, compute_dtype="bfloat16")),
    ("unbundled", Techniques.naive(threads=4, compute_dtype="bfloat16")),
    ("bundled", Techniques(source="oracle", window=4, threads=4, compute_dtype="bfloat16", matvec="mv")),
    ("unbundled", Techniques(source="oracle", window=0, threads=4, compute_dtype="bfloat16", matvec="rows")),
], ids=["window-4", "no-window", "naive", "window-4-mv", "no-window-rows"])
def test_bfloat16_engine_is_exact_against_bfloat16_dense_inference(model, layout, techniques):
    """Rows multiplied from the neuron cache, where they landed in the read buffer (an unbundled layout's vectors
    each one contiguous matrix there), and from whole layer files; by F.linear, by torch.mv, or by the C "rows"
    kernel (the dense reference by F.linear either way)."""
    path = model["root"] / f"bf16-{layout}"
    flash = path if (path / "layout.json").is_file() else convert(model["path"], path, layout, "bfloat16")
    engine = FlashEngine(flash, techniques)
    logits = teacher_forced_logits(engine)
    engine.close()
    assert verdict(model["dense"]["bfloat16"], logits, torch.bfloat16) == []


@pytest.mark.exactness
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_16_bit_tiers_still_catch_missing_neurons(model, dtype):
    """An engine that drops a third of each active set is far outside the 16-bit exact tiers."""
    flash = model["flash"] if dtype == "float16" else convert(model["path"], model["root"] / "bf16-drop", "bundled",
                                                                dtype)
    engine = FlashEngine(flash, Techniques(source="oracle", window=0, threads=4, compute_dtype=dtype))
    full = engine.shared.source
    dropping = Oracle(full.weights, full.biases, full.ids)
    dropping.sets = lambda layer, x: [ids[ids % 3 != 0] for ids in full.sets(layer, x)]
    engine.shared.source = dropping
    logits = teacher_forced_logits(engine)
    engine.close()
    failed = set(verdict(model["dense"][dtype], logits, getattr(torch, dtype), meant_exact=False))
    assert "max_abs_logit_diff" in failed and (dtype == "bfloat16" or "mean_kl" in failed)


def test_16_bit_engine_holds_weights_cache_and_kv_cache_in_16_bits(model):
    full, half = (FlashEngine(model["flash"], Techniques(source="oracle", window=4, threads=4, compute_dtype=dt))
                  for dt in ("float32", "float16"))
    for engine in (full, half):
        engine.close()
    assert half.dram.resident * 2 == full.dram.resident
    assert half.dram.cache * 2 == full.dram.cache and half.row_bytes * 2 == full.row_bytes
    assert half.cache.k.dtype == torch.float16 and half.dram.kv_cache * 2 == full.dram.kv_cache
    assert all(b.ffn.cache.rows["down"].dtype == torch.float16 for b in half.model.layers)


def test_the_exact_tier_widens_with_the_rounding_unit_only():
    fp32, fp16, bf16 = (logit_bound(dt, 32.0) for dt in (torch.float32, torch.float16, torch.bfloat16))
    assert fp32 < fp16 < bf16
    assert bf16 == 8 * fp16  # bfloat16's eps (2^-7) is 8x float16's (2^-10)


def test_the_main_job_judges_a_float16_run_against_a_float16_dense_reference(tmp_path):
    from flashbench.harness.adapters import EngineSUT
    from flashbench.harness.main_job import checkpoint_model
    from flashbench.harness.matrix import Configuration, Settings
    from flashbench.harness.measure import measure
    from flashbench.harness.scenario import ModelSpec

    spec = ModelSpec("shakespeare-opt", tokens=16, greedy_prompt=8, greedy_tokens=8, counts_tokens=2048)
    mut, info = checkpoint_model(spec, tmp_path, progress=lambda _: None, dtype=torch.float16)
    assert info["dense"]["dtype"] == "float16"
    settings = Settings(compute_dtype="float16", threads=4)
    engine = lambda: EngineSUT(mut, progress=lambda _: None)  # noqa: E731
    rec = measure(engine, mut, Configuration(frozenset({"hybrid"})), settings, None, dram_budget=1 << 30)
    assert rec["engine"]["compute_dtype"] == "float16"
    # the record says what multiplied the down projection: the C kernel where it is built
    assert rec["engine"]["down_kernel"].startswith("C" if row_kernels.unavailable() is None else "torch")
    assert rec["agreement"]["tolerance"] == "exact at float16" and rec["agreement"]["passed"], rec["agreement"]
    predicted = measure(engine, mut, Configuration(frozenset({"predictor", "windowing"})), settings, None, 1 << 30)
    assert predicted["status"] == "measured" and predicted["agreement"]["tolerance"] == "approximate"

