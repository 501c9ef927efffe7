import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashbench.harness.cli import build_parser, main

FLASHBENCH = str(Path(sys.executable).parent / "flashbench")


def test_help_lists_every_subcommand():
    out = subprocess.run([FLASHBENCH, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("run", "report", "probe", "model", "generate", "convert", "models", "check-dense"):
        assert command in out


@pytest.mark.parametrize("command", ["run", "report", "probe", "generate", "convert", "models", "check-dense"])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    assert "usage: flashbench " + command in capsys.readouterr().out


def test_bad_usage_exits_2():
    assert subprocess.run([FLASHBENCH, "generate", "--tokens", "many"], capture_output=True).returncode == 2


def test_missing_checkpoint_exits_2_naming_it(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such checkpoint directory" in capsys.readouterr().err


def test_corrupt_checkpoint_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{")
    assert main(["generate", str(tmp_path)]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err


def test_generate_prints_text_and_timings_and_writes_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert main(["generate", str(tiny_checkpoint), "--tokens", "8", "--per-token", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "token    7:" in printed and "decode steps" in printed
    rec = json.loads(out.read_text())
    assert len(rec["tokens"]) == 8 and len(rec["token_ms"]) == 7


def test_a_prompt_longer_than_the_context_exits_2_saying_so(tiny_checkpoint, capsys):
    assert main(["generate", str(tiny_checkpoint), "--prompt", "x" * 300, "--tokens", "2"]) == 2
    assert "its context holds 256 positions" in capsys.readouterr().err


def test_check_dense_passes_on_a_good_checkpoint(tiny_checkpoint, capsys):
    pytest.importorskip("transformers")
    assert main(["check-dense", str(tiny_checkpoint), "--prefill", "16", "--steps", "4"]) == 0
    assert capsys.readouterr().out.startswith("PASS")


def test_check_dense_fails_with_exit_1_when_over_tolerance(tiny_checkpoint, capsys):
    pytest.importorskip("transformers")
    assert main(["check-dense", str(tiny_checkpoint), "--prefill", "16", "--steps", "4", "--tolerance", "0"]) == 1
    assert capsys.readouterr().out.startswith("FAIL")


def test_parser_defaults_to_the_embedded_model():
    assert build_parser().parse_args(["generate"]).model == "shakespeare-opt"


def test_convert_writes_a_flash_directory(tiny_checkpoint, tmp_path, capsys):
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "flash"), "--layout", "unbundled", "--dtype", "int8"]) == 0
    assert (tmp_path / "flash" / "layout.json").is_file()
    assert "layer 2/2" in capsys.readouterr().out


def test_convert_of_a_truncated_checkpoint_exits_2_and_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    (ck / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes()[:5000])
    assert main(["convert", str(ck), str(tmp_path / "flash")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_probe_cli_prints_the_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["probe", str(tmp_path), "--chunk-kib", "4", "--threads", "1", "--ioengines", "psync", "--seconds", "0.2",
            "--file-mib", "4", "--json", str(tmp_path / "p.json")]
    assert main(args) == 0
    assert "randread psync" in capsys.readouterr().out and (tmp_path / "p.json").is_file()


def test_report_of_a_folder_without_run_json_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_every_command_reports_one_p90(tmp_path, capsys):
    """generate's p90, a record's and validate's are one definition (numpy's linear interpolation)."""
    import numpy as np

    from flashbench.harness.measure import token_metrics
    from flashbench.harness.stats import spread
    from flashbench.reference.flash import TokenStats

    assert main(["generate", "--tokens", "12", "--json", str(tmp_path / "g.json")]) == 0
    rec = json.loads((tmp_path / "g.json").read_text())
    assert rec["token_ms_p90"] == pytest.approx(float(np.percentile(rec["token_ms"], 90)))
    ms = [float(x) for x in range(1, 11)]
    steps = [TokenStats(tokens=1, total_s=x / 1e3) for x in ms]
    assert token_metrics(steps)["ms"]["total"]["p90"] == pytest.approx(spread(ms)["p90"]) == pytest.approx(9.1)


def test_the_suites_own_errors_are_one_family():
    from flashbench.harness.cli.common import UsageError
    from flashbench.harness.compare import CompareError
    from flashbench.harness.records import RecordError
    from flashbench.harness.scenario import ScenarioError
    from flashbench.harness.sut import SUTError
    from flashbench.harness.validate import CaseError
    from flashbench.reference import BudgetError, CheckpointError, FlashbenchError, LayoutError

    for error in (UsageError, CompareError, RecordError, ScenarioError, SUTError, CaseError, BudgetError,
                  CheckpointError, LayoutError):
        assert issubclass(error, FlashbenchError), error


def test_a_bug_is_not_bad_input_it_shows_its_traceback_and_exit_3(monkeypatch, capsys):
    from flashbench import suite

    def broken(name):
        raise ValueError("a bug in the suite")

    monkeypatch.setattr(suite, "model_path", broken)
    assert main(["models"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: a bug in the suite" in err
    assert "internal error (a bug)" in err


def test_every_command_is_a_module_of_its_own():
    from flashbench.harness import cli

    names = {c.__name__.rsplit(".", 1)[-1].replace("_", "-") for c in cli.COMMANDS}
    parser_names = set(build_parser()._subparsers._group_actions[0].choices)
    assert names == parser_names
