import subprocess
import sys

import pytest

from presso.cli import main


def test_passes_lists_builtins_with_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "quantize_dynamic_int8  [presso (built-in)]" in out and "skip: tuple" in out


def test_unknown_command_exits_non_zero():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code != 0


@pytest.mark.integration
def test_console_script_demo(tmp_path):
    done = subprocess.run([sys.executable, "-m", "presso.cli", "demo", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "presso report" in done.stdout and "ONNX Runtime int8 logits vs the float model" in done.stdout
    assert (tmp_path / "demo" / "model.onnx").exists() and (tmp_path / "demo" / "manifest.json").exists()
