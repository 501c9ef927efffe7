import subprocess
import sys


def test_packages_import_from_outside_the_repository(tmp_path):
    code = "import flashbench.reference, flashbench.harness, flashbench.suite; print(flashbench.suite.EMBEDDED_MODELS)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "shakespeare-opt" in out.stdout


def test_nothing_generic_is_importable_at_top_level(tmp_path):
    for name in ("reference", "harness", "suite"):
        probe = f"import importlib.util; print(importlib.util.find_spec({name!r}) is None)"
        out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "True", name
