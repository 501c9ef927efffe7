"""Nothing lost: interrupted runs keep their records and resume, concurrent runs do not corrupt each other, and
the parsers of untrusted input (layout.json, the SUT protocol) fail only with their own clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashbench import suite
from flashbench.harness.sut import SUTError, decode_logits, parse_answer
from flashbench.reference.layout import FlashLayout, LayoutError, convert

from .tiny import scenario

SCENARIO = scenario("interrupt-me", tokens=12, model='techniques = ["hybrid", "predictor"]\npeers = []')
CONFIGS = ["naive", "hybrid", "predictor", "hybrid+predictor"]


@pytest.fixture
def place(tmp_path, cache_home):
    (tmp_path / "s.toml").write_text(SCENARIO)
    env = os.environ | {"XDG_CACHE_HOME": cache_home(tmp_path), "PYTHONUNBUFFERED": "1"}
    return {"root": tmp_path, "env": env}


def default_sigint() -> None:
    """SIGINT as a terminal delivers it: a job started in the background of a script inherits SIGINT ignored (POSIX),
    and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def flashbench_run(place, run_id: str, *extra: str, **popen) -> subprocess.Popen:
    root = place["root"]
    return subprocess.Popen(
        [sys.executable, "-m", "flashbench.harness.cli", "run", "--scenario", str(root / "s.toml"), "--reports",
         str(root / "reports"), "--work", str(root / "work"), "--run-id", run_id, *extra],
        env=place["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
        **popen)


def interrupt_after_first_configuration(proc: subprocess.Popen, records: Path, sig: int) -> None:
    deadline = time.time() + 240
    while not (records / "shakespeare-opt" / "naive.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGKILL, id="SIGKILL"), pytest.param(signal.SIGINT, id="SIGINT")])
def test_an_interrupted_run_keeps_its_records_and_resume_finishes_only_the_rest(place, sig):
    run_dir = place["root"] / "reports" / "r"
    proc = flashbench_run(place, "r")
    interrupt_after_first_configuration(proc, run_dir / "records", sig)
    out, err = proc.communicate()
    assert not (run_dir / "run.json").exists(), f"the run finished before it was interrupted:\n{out}\n{err}"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "--run-id r --resume" in err
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "records" / "shakespeare-opt").glob("*.json")}
    assert "naive.json" in before and all(json.loads(p.read_text()) for p in (run_dir / "records").rglob("*.json"))

    resumed = flashbench_run(place, "r", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    index = json.loads((run_dir / "run.json").read_text())
    assert sorted(index["kept_from_interrupted_run"]) == sorted(
        ["probe.json"] + [f"shakespeare-opt/{n}" for n in before])
    assert {f"shakespeare-opt/{c}.json" for c in CONFIGS} <= set(index["records"])
    for name, mtime in before.items():  # not measured again
        assert (run_dir / "records" / "shakespeare-opt" / name).stat().st_mtime_ns == mtime
    assert "naive: kept" in out and (run_dir / "report.md").is_file()


def test_two_runs_given_one_run_id_do_not_both_write(place):
    first, second = flashbench_run(place, "same"), flashbench_run(place, "same")
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
    assert sorted(code for _, _, code in results) == [0, 2]
    refused = next(err for _, err, code in results if code == 2)
    assert "already exists; choose another --run-id" in refused
    index = json.loads((place["root"] / "reports" / "same" / "run.json").read_text())
    assert len(index["records"]) == 2 + len(CONFIGS)


def test_two_runs_into_one_reports_folder_at_once_both_finish_whole(place):
    runs = [flashbench_run(place, "a"), flashbench_run(place, "b")]
    outputs = [p.communicate(timeout=400) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], outputs
    assert any("waiting for another run using" in out for out, _ in outputs)  # one work folder: one at a time
    for run_id in ("a", "b"):
        run_dir = place["root"] / "reports" / run_id
        index = json.loads((run_dir / "run.json").read_text())
        assert all(json.loads((run_dir / "records" / rel).read_text())["run_id"] == run_id for rel in index["records"])


def test_resume_refuses_a_finished_run_and_records_of_another_scenario_or_commit(place):
    reports = place["root"] / "reports"

    def resume(run_id: str, record: dict | None) -> subprocess.CompletedProcess:
        if record is not None:
            (reports / run_id / "records").mkdir(parents=True, exist_ok=True)
            (reports / run_id / "records" / "probe.json").write_text(json.dumps(record))
        proc = flashbench_run(place, run_id, "--resume")
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    (reports / "done").mkdir(parents=True)
    (reports / "done" / "run.json").write_text("{}")
    out = resume("done", None)
    assert out.returncode == 2 and "a finished run (it has run.json): nothing to resume" in out.stderr
    out = resume("other", {"schema": 1, "scenario": {"raw": {"name": "else"}, "path": "x"}})
    assert out.returncode == 2 and "probe.json: a record of another scenario" in out.stderr
    out = resume("old", {"schema": 1, "scenario": {"raw": tomllib.loads(SCENARIO), "path": "x"},
                         "git": {"commit": "0" * 40}})
    assert out.returncode == 2 and f"measured at commit {'0' * 40}, this checkout is at" in out.stderr


# ---- fuzzing the parsers of untrusted input ------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "flash"
    convert(suite.model_path("shakespeare-opt"), out, "bundled", "float16")
    return out


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_layout_json_is_refused_with_a_layout_error_or_opens(layout_dir, data, tmp_path_factory):
    meta = json.loads((layout_dir / "layout.json").read_text())
    where = data.draw(st.sampled_from(list(paths(meta))[1:]))
    node = meta
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = data.draw(JSON)
    copy = tmp_path_factory.mktemp("mutant")
    for f in layout_dir.iterdir():
        (copy / f.name).symlink_to(f)
    (copy / "layout.json").unlink()
    (copy / "layout.json").write_text(json.dumps(meta))
    try:
        FlashLayout.open(copy, verify=False)
    except LayoutError as e:
        assert str(copy / "layout.json") in str(e) or str(copy) in str(e)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_layout_json_of_random_bytes_is_refused_with_a_layout_error(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("bytes")
    (d / "layout.json").write_bytes(raw)
    with pytest.raises(LayoutError, match="layout.json"):
        FlashLayout.open(d)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200) | JSON.map(json.dumps))
def test_a_protocol_answer_line_is_parsed_or_refused_with_a_sut_error(line):
    try:
        answer = parse_answer(line, 7, "step")
    except SUTError:
        return
    assert answer["id"] == 7 and answer["ok"] is True


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_logits_on_the_wire_are_decoded_or_refused_with_a_sut_error(obj):
    try:
        logits = decode_logits(obj, (2, 3), "prefill")
    except SUTError:
        return
    assert logits.shape == (2, 3)


# ---- a full disk and a read-only one -------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere), and a read-only one."""
    mounts = {}
    for name, options in (("full", "size=1m"), ("readonly", "ro,size=1m")):
        point = tmp_path / name
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounts[name] = point
    yield mounts
    for point in mounts.values():
        subprocess.run(["umount", str(point)], capture_output=True)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flashbench.harness.cli", *map(str, args)], capture_output=True,
                          text=True)


@pytest.mark.parametrize("where, problem", [("full", "No space left on device"),
                                            ("readonly", "Read-only file system")])
def test_converting_onto_a_full_or_read_only_filesystem_is_exit_2_and_leaves_nothing(small_fs, where, problem):
    out = small_fs[where] / "flash"
    result = cli("convert", "shakespeare-opt", out)
    assert result.returncode == 2 and problem in result.stderr and str(out) in result.stderr
    assert list(small_fs[where].iterdir()) == []


def test_writing_a_report_onto_a_full_filesystem_is_exit_2_and_leaves_no_partial_report(small_fs):
    run = small_fs["full"] / "run"
    baseline = suite.SUITE_DIR / "baselines" / "smoke"
    (run / "records").mkdir(parents=True)
    (run / "run.json").write_bytes((baseline / "run.json").read_bytes())
    for rec in (baseline / "records").rglob("*.json"):
        (run / "records" / rec.relative_to(baseline / "records")).parent.mkdir(exist_ok=True)
        (run / "records" / rec.relative_to(baseline / "records")).write_bytes(rec.read_bytes())
    with open(small_fs["full"] / "filler", "wb") as f:  # fill what is left
        try:
            f.write(b"\0" * (2 << 20))
        except OSError:
            pass
    result = cli("report", run)
    assert result.returncode == 2 and "No space left on device" in result.stderr and str(run) in result.stderr
    assert not list(run.glob("report.*")) and not list(run.glob(".*.tmp")) and not list(run.glob(".*.png"))


HEAP_SCRIPT = """
import torch
from flashbench.harness.measure import return_freed_memory

def rss():
    return next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmRSS"))

big = torch.empty(24 << 20, dtype=torch.uint8)
del big  # freed, it raises glibc's mmap threshold past the blocks below: they come from the heap
blocks, pins = [], []
for _ in range(40):  # 320 MiB of blocks, each held in place by a small allocation after it
    blocks.append(torch.ones(8 << 20, dtype=torch.uint8))
    pins.append(torch.ones(64 << 10, dtype=torch.uint8))
del blocks
before = rss()
print(return_freed_memory(), before - rss())
"""


def test_the_heap_a_closed_sut_freed_goes_back_to_the_system():
    """glibc keeps freed blocks below its mmap threshold in its arenas; the harness trims them after each SUT, so a
    long run does not hold what it freed when the peers start (the paper scenario's harness held 13 GB). In a fresh
    process, whose heap holds nothing else."""
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True, check=True).stdout
    trimmed, returned = out.split()
    if trimmed == "False":
        pytest.skip("not glibc: no malloc_trim")
    assert int(returned) > 200 << 20
