"""fio's report is read defensively, and the sweep puts our reader beside fio on the same file."""

import shutil

import pytest

from flashbench.harness import fio
from flashbench.harness.cli import main
from flashbench.reference.reader import ReadStats
from flashbench.harness.sweep import (KIB, CReferenceError, bracketed_fractions, build_c_reference, choose_reader,
                                      format_point, measure_c_reference, sweep)

REPORT = '{"jobs": [{"read": {"bw_bytes": 1048576, "iops": 32.0, "runtime": 2000, "clat_ns": {"percentile": {"50.000000": 1000, "99.000000": 9000}}}}]}'


def test_fio_json_is_found_after_warnings():
    assert fio.parse_fio_json("fio: note: something\n" + REPORT)["jobs"][0]["read"]["bw_bytes"] == 1048576


def test_garbage_instead_of_fio_json_is_an_error():
    with pytest.raises(fio.FioError, match="no JSON report"):
        fio.parse_fio_json("Segmentation fault {oops")


def test_missing_fio_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(fio.FioError, match="fio is not installed"):
        fio.randread(tmp_path / "f", 4096, 1)


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio not installed")
def test_sweep_measures_reader_and_fio_on_the_same_file(tmp_path):
    points = sweep(tmp_path, [16 * KIB], [2], seconds=0.3, repeats=1, file_bytes=8 << 20, progress=None)
    (p,) = points
    assert p.reader_direct and p.reader_bytes_s > 0 and p.fio_bytes_s > 0 and p.fio_error is None
    assert p.fraction_of_fio > 0 and p.batch == 256
    assert (tmp_path / "sweep-8MiB.bin").stat().st_size == 8 << 20


def test_the_backends_take_turns_going_first_round_by_round(tmp_path, monkeypatch):
    from flashbench.harness import sweep as sweeping

    order = []

    def measured(geometry, path, threads, seconds, batch, seed, backend):
        order.append((seed, backend))
        return ReadStats(records=1, reads=1, bytes_read=1 << 20, seconds=1.0), 1

    monkeypatch.setattr(sweeping, "measure_reader", measured)
    points = sweep(tmp_path, [16 * KIB], [2], seconds=0.1, repeats=3, file_bytes=8 << 20, with_fio=False,
                   progress=None, backends=("threads", "io_uring"))
    assert order == [(0, "threads"), (0, "io_uring"), (1, "io_uring"), (1, "threads"), (2, "threads"),
                     (2, "io_uring")]
    assert [p.reader for p in points] == ["threads", "io_uring"] and points[0].reader_bytes_s == 1 << 20


def test_each_reader_run_is_judged_against_the_faster_fio_engine_around_it(tmp_path, monkeypatch):
    from flashbench.harness import sweep as sweeping

    # Before the first round, between the rounds and after: io_uring faster, then psync, then io_uring again.
    rates = iter([800.0, 1000.0, 1200.0, 1000.0, 800.0, 1000.0])
    engines = []

    def fio_run(path, block_bytes, reads, seconds, ioengine):
        engines.append(ioengine)
        return fio.FioResult(block_bytes, 1, ioengine, reads, next(rates), 1.0, 1.0, None, None, None)

    monkeypatch.setattr(fio, "in_flight", fio_run)
    measured = ReadStats(reads=1, bytes_read=440, seconds=1.0)
    monkeypatch.setattr(sweeping, "measure_reader", lambda *a, **k: (measured, 1))
    points = sweep(tmp_path, [16 * KIB], [2], seconds=0.1, repeats=2, file_bytes=8 << 20, progress=None,
                   backends=("threads", "io_uring"))
    assert engines == ["psync", "io_uring"] * 3
    for p in points:  # 440 over the mean of the faster runs around it, 1000 and 1200, then 1200 and 1000
        assert p.fraction_of_fio == pytest.approx(0.4) and p.fio_bytes_s == 1000.0 and p.fio_ioengine == "io_uring"
    assert "fio (io_uring)" in format_point(points[0])


def test_each_reader_run_is_judged_against_the_fio_runs_around_it():
    # fio drifts 400 -> 200 MiB/s; the reader ran at 300 then 150: both runs at 100% of the device around them
    assert bracketed_fractions([300.0, 150.0], [400.0, 200.0, 100.0]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="2 reader runs need 3 fio runs"):
        bracketed_fractions([300.0, 150.0], [400.0, 200.0])


def test_reader_sweep_refuses_a_batch_larger_than_the_file(tmp_path, capsys):
    args = ["reader-sweep", str(tmp_path), "--record-kib", "64", "--file-mib", "1", "--batch", "17", "--no-fio"]
    assert main(args) == 2
    assert "a 1 MiB file holds 16 records of 64 KiB" in capsys.readouterr().err


def test_reader_sweep_cli_prints_one_line_per_point(tmp_path, capsys):
    args = ["reader-sweep", str(tmp_path), "--record-kib", "4,8", "--threads", "1,2", "--seconds", "0.2",
            "--repeats", "1", "--file-mib", "4", "--no-fio", "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    assert capsys.readouterr().out.count("KiB ") == 4
    assert (tmp_path / "s.json").is_file()


@pytest.mark.skipif(shutil.which("fio") is None or shutil.which("cc") is None, reason="fio or cc not installed")
def test_the_c_reference_makes_the_same_calls_between_the_same_fio_runs(tmp_path):
    (p,) = sweep(tmp_path, [16 * KIB], [2], seconds=0.3, repeats=2, file_bytes=8 << 20, batch=64, c_reference=True,
                 progress=None)
    assert p.c_error is None and p.c_bytes_s > 0 and p.c_fraction_of_fio > 0
    assert "C, same calls" in format_point(p)


def test_without_a_c_compiler_the_sweep_says_so_and_still_measures_the_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    (p,) = sweep(tmp_path, [16 * KIB], [2], seconds=0.2, repeats=1, file_bytes=8 << 20, with_fio=False,
                 c_reference=True, progress=None)
    assert p.reader_bytes_s > 0 and p.c_bytes_s is None
    assert "no C compiler" in p.c_error and "no C compiler" in format_point(p)


@pytest.mark.skipif(shutil.which("cc") is None, reason="cc not installed")
def test_the_c_reference_names_a_file_it_cannot_read_directly(tmp_path):
    exe = build_c_reference(tmp_path)
    with pytest.raises(CReferenceError, match="missing.bin: cannot open with O_DIRECT"):
        measure_c_reference(exe, tmp_path / "missing.bin", 16 * KIB, 2, 0.1, 4, seed=0)


def test_reader_auto_takes_threads_where_io_uring_cannot_run_and_says_why(tmp_path, monkeypatch):
    from flashbench.reference import uring

    monkeypatch.setattr(uring, "unavailable", lambda: "not built here")
    choice = choose_reader(tmp_path, 8 << 20, 16384, threads=2, seconds=0.05)
    assert choice["chosen"] == "threads" and "not built here" in choice["why"] and choice["bytes_s"] == {}
