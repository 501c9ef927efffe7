"""fio's report is read defensively, and the sweep puts our reader beside fio on the same file."""

import shutil

import pytest

from flashbench.harness import fio
from flashbench.harness.cli import main
from flashbench.harness.sweep import KIB, sweep

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
    assert (tmp_path / "sweep-8MiB.bin").stat().st_size == 8 << 20


def test_reader_sweep_cli_prints_one_line_per_point(tmp_path, capsys):
    args = ["reader-sweep", str(tmp_path), "--record-kib", "4,8", "--threads", "1,2", "--seconds", "0.2",
            "--repeats", "1", "--file-mib", "4", "--no-fio", "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    assert capsys.readouterr().out.count("KiB ") == 4
    assert (tmp_path / "s.json").is_file()
