"""compute_dtype = "auto": the 16-bit dtype this CPU multiplies fastest, measured when the scenario loads, named with
its rates in the records and the report."""

import pytest
import torch

from flashbench.harness import scenario as sc
from flashbench.harness.compute import (HALF, MIN_STREAM_BYTES, ComputeRates, last_level_cache_bytes, measure_rates,
                                        stream_bytes)

from flashbench.reference import row_kernels
from flashbench.reference.flash import COMPUTE_DTYPES
from flashbench.reference.model import MATVEC

from .tiny import scenario


def test_every_compute_dtype_has_a_measured_rate_and_auto_takes_the_faster_16_bit_one():
    rates = measure_rates((512, 256))
    assert set(rates.gb_per_s) == {"float32", "float16", "bfloat16"} and all(r > 0 for r in rates.gb_per_s.values())
    best = {d: max(rates.rate(d, kernel) for kernel in MATVEC) for d in HALF}
    assert best[rates.fastest_half()] == max(best.values())
    assert rates.stream_bytes == stream_bytes(torch.device("cpu"))  # said in the record: what the rates streamed
    assert all(cycled >= rates.stream_bytes for cycled in rates.cycled_bytes.values())  # no model given: past them


def test_the_products_cycle_through_twice_the_last_level_cache_and_at_least_256_mib(tmp_path):
    """One matrix, or a few, multiplied again and again stay in a large L3 (480 MiB on a virtual machine here), and
    the bound would be at the cache's rate, not DRAM's."""
    caches = tmp_path / "cache"
    for i, size in enumerate(["48K", "2048K", "491520K"]):
        (caches / f"index{i}").mkdir(parents=True)
        (caches / f"index{i}" / "size").write_text(size + "\n")
    assert last_level_cache_bytes(caches) == 480 << 20
    assert stream_bytes(torch.device("cpu"), caches) == 960 << 20
    (caches / "index2" / "size").write_text("32M\n")
    assert stream_bytes(torch.device("cpu"), caches) == MIN_STREAM_BYTES
    assert stream_bytes(torch.device("cpu"), tmp_path / "nowhere") == MIN_STREAM_BYTES  # the kernel says nothing


def test_a_model_smaller_than_the_caches_is_multiplied_from_its_own_bytes_not_past_them():
    rates = measure_rates((512, 256), model_elements=3 * 512 * 256 + 1)  # three matrices and a bit: four copies
    assert rates.cycled_bytes == {d: 4 * 512 * 256 * t.itemsize for d, t in COMPUTE_DTYPES.items()}
    assert rates.stream_bytes == stream_bytes(torch.device("cpu"))  # the bandwidth pass still streams past them


def test_each_kernel_has_a_measured_rate_for_every_dtype_it_runs_and_matvec_names_the_fastest():
    rates = measure_rates((512, 256))
    for dtype in rates.gb_per_s:
        assert rates.rate(dtype, "mv") > 0 and rates.rate(dtype, "linear") > 0
        runs_rows = dtype != "float32" and row_kernels.unavailable() is None  # 16-bit weights, the library built
        assert (rates.rate(dtype, "rows") > 0) == runs_rows
        assert rates.rate(dtype, rates.matvec(dtype)) == max(rates.rate(dtype, k) for k in MATVEC)


@pytest.mark.parametrize("fast", MATVEC)
def test_an_auto_matvec_scenario_runs_the_kernel_its_rates_chose_for_the_compute_dtype(tmp_path, monkeypatch, fast):
    mv = {"float32": 10.0, "float16": 5.0, "bfloat16": 20.0 if fast == "mv" else 8.0}
    linear = {"float32": 30.0, "float16": 15.0, "bfloat16": 20.0 if fast == "linear" else 8.0}
    rows = {"float16": 4.0, "bfloat16": 20.0 if fast == "rows" else 7.0}
    monkeypatch.setattr(sc, "measure_rates", lambda shape, device="cpu", **_: ComputeRates(
        shape, 2, mv, (), linear_gb_per_s=linear, rows_gb_per_s=rows))
    (tmp_path / "s.toml").write_text(scenario("auto", tokens=8, engine='compute_dtype = "bfloat16"\nmatvec = "auto"'))
    loaded = sc.load(str(tmp_path / "s.toml"))
    assert loaded.settings.matvec == fast == loaded.compute["matvec"]["bfloat16"]
    assert loaded.compute["resolved"] == {"compute_dtype": "bfloat16", "matvec": fast}  # what the report names


@pytest.mark.parametrize("fast", HALF)
def test_an_auto_scenario_computes_in_the_dtype_its_rates_chose_and_says_why(tmp_path, monkeypatch, fast):
    rates = {"float32": 10.0} | {d: (20.0 if d == fast else 5.0) for d in HALF}
    monkeypatch.setattr(sc, "measure_rates", lambda shape, device="cpu", **_: ComputeRates(shape, 2, rates, ("avx512_bf16",)))
    (tmp_path / "s.toml").write_text(scenario("auto", tokens=8, engine='compute_dtype = "auto"'))
    loaded = sc.load(str(tmp_path / "s.toml"))
    assert loaded.settings.compute_dtype == fast == loaded.compute["chosen"]
    assert loaded.compute["shape"] == (1024, 256)  # the embedded OPT model's FFN: d_ffn x d_model
    assert loaded.compute["why"].startswith(f"{fast}: the faster 16-bit matrix-vector product here")


@pytest.mark.parametrize("setting, recorded, chosen, message", [
    ("compute_dtype", "float16", "bfloat16", "computed in float16, and compute_dtype \"auto\" chose bfloat16"),
    ("matvec", "linear", "mv", "multiplied by linear, and matvec \"auto\" chose mv"),
])
def test_resuming_records_made_otherwise_than_auto_now_chose_is_refused(tmp_path, setting, recorded, chosen, message):
    import json
    from dataclasses import asdict, replace

    from flashbench.harness.main_job import whole_records
    from flashbench.harness.records import SCHEMA, RecordError

    (tmp_path / "s.toml").write_text(scenario("auto", tokens=8))
    now = sc.load(str(tmp_path / "s.toml"))
    now = replace(now, settings=replace(now.settings, **{setting: chosen}))
    settings = {k: v for k, v in asdict(now.settings).items() if k != "approximate"} | {setting: recorded}
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "naive.json").write_text(json.dumps(
        {"schema": SCHEMA, "scenario": {"raw": now.raw}, "settings": settings}))
    with pytest.raises(RecordError, match=message):
        whole_records(tmp_path / "records", now)


def test_the_bound_adds_the_reads_at_fios_bandwidth_and_the_products_at_the_matrix_vector_rate():
    from flashbench.harness.compute import latency_bound
    from flashbench.reference import ModelConfig

    config = ModelConfig(arch="opt", vocab_size=100, d_model=10, n_layers=2, n_heads=2, n_kv_heads=2, d_ffn=40,
                         max_positions=16)
    rates = ComputeRates((40, 10), 2, {"float32": 1.0, "float16": 2.0, "bfloat16": 0.5}, ())  # GB/s
    metrics = {"per_token": {"bytes_read": 2e6, "neurons_multiplied": 50}, "harness_ms": {"mean": 6.0}}
    bound = latency_bound(metrics, {"bandwidth_bytes_s": 1e9}, rates, "float16", config)
    multiplied = (2 * (4 * 10 * 10) + 100 * 10 + 50 * 2 * 10) * 2  # attention, LM head, FFN rows; 2 bytes each
    assert bound["io_ms"] == pytest.approx(2.0) and bound["compute_ms"] == pytest.approx(multiplied / 2e9 * 1e3)
    assert bound["ratio"] == pytest.approx(6.0 / (2.0 + multiplied / 2e6))
    assert latency_bound(metrics, None, rates, "float16", config) is None  # it reads, but no probe point to bound
    beside = latency_bound(metrics, {"bandwidth_bytes_s": 1e9}, rates, "float16", config, overlap=True)
    assert beside["ms"] == pytest.approx(max(bound["io_ms"], bound["compute_ms"]))  # reads run beside the products


def test_the_engine_counts_the_neurons_it_multiplies(tiny_checkpoint, tmp_path):
    """The compute bound's counter: every stored neuron in a naive pass, the loaded ones without a window."""
    from flashbench.reference.flash import FlashEngine, Techniques
    from flashbench.reference.layout import convert

    layout = convert(tiny_checkpoint, tmp_path / "flash", "bundled", "float32")
    c = layout.config
    with FlashEngine(layout, Techniques.naive(threads=2)) as naive:
        naive.prefill([1, 2, 3])
        assert naive.history[-1].multiplied == c.n_layers * c.d_ffn
    with FlashEngine(layout, Techniques(source="oracle", threads=2)) as sparse:
        sparse.prefill([1, 2, 3])
        step = sparse.history[-1]
        assert 0 < step.multiplied == step.io.records < c.n_layers * c.d_ffn
