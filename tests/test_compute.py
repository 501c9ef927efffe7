"""compute_dtype = "auto": the 16-bit dtype this CPU multiplies fastest, measured when the scenario loads, named with
its rates in the records and the report."""

import pytest

from flashbench.harness import scenario as sc
from flashbench.harness.compute import HALF, ComputeRates, measure_rates

from .tiny import scenario


def test_every_compute_dtype_has_a_measured_rate_and_auto_takes_the_faster_16_bit_one():
    rates = measure_rates((512, 256))
    assert set(rates.gb_per_s) == {"float32", "float16", "bfloat16"} and all(r > 0 for r in rates.gb_per_s.values())
    assert rates.gb_per_s[rates.fastest_half()] == max(rates.gb_per_s[d] for d in HALF)


@pytest.mark.parametrize("fast", HALF)
def test_an_auto_scenario_computes_in_the_dtype_its_rates_chose_and_says_why(tmp_path, monkeypatch, fast):
    rates = {"float32": 10.0} | {d: (20.0 if d == fast else 5.0) for d in HALF}
    monkeypatch.setattr(sc, "measure_rates", lambda shape: ComputeRates(shape, 2, rates, ("avx512_bf16",)))
    (tmp_path / "s.toml").write_text(scenario("auto", tokens=8, engine='compute_dtype = "auto"'))
    loaded = sc.load(str(tmp_path / "s.toml"))
    assert loaded.settings.compute_dtype == fast == loaded.compute["chosen"]
    assert loaded.compute["shape"] == (1024, 256)  # the embedded OPT model's FFN: d_ffn x d_model
    assert loaded.compute["why"].startswith(f"{fast}: the faster 16-bit matrix-vector product here")


def test_resuming_records_computed_in_another_dtype_than_auto_now_chose_is_refused(tmp_path):
    import json
    from dataclasses import replace

    from flashbench.harness.main_job import whole_records
    from flashbench.harness.records import SCHEMA, RecordError

    (tmp_path / "s.toml").write_text(scenario("auto", tokens=8))
    now = sc.load(str(tmp_path / "s.toml"))
    now = replace(now, settings=replace(now.settings, compute_dtype="bfloat16"))
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "naive.json").write_text(json.dumps(
        {"schema": SCHEMA, "scenario": {"raw": now.raw}, "settings": {"compute_dtype": "float16"}}))
    with pytest.raises(RecordError, match="computed in float16, and compute_dtype \"auto\" chose bfloat16"):
        whole_records(tmp_path / "records", now)
