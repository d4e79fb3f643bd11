"""The CLI on a small local causal LM (random weights, the embedded tokenizer)."""
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


def presso_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "presso.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_folder(smollm2, tmp_path_factory):
    import transformers as tf

    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                            architectures=["LlamaForCausalLM"])
    folder = tmp_path_factory.mktemp("tiny-llm")
    tf.LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_compile_eval_run(tiny_folder, tmp_path):
    out = tmp_path / "out"
    done = presso_cli("compile", "--model", str(tiny_folder), "--pass", "quantize_dynamic_int8", "skip=lm_head",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "presso report" in done.stdout and "quantize_dynamic_int8" in done.stdout
    assert {"model.onnx", "manifest.json", "report.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    done = presso_cli("eval", str(out), "--windows", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "perplexity" in done.stdout and "MB on disk" in done.stdout
    done = presso_cli("run", str(out), "--prompt", "Hello", "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["compile", "--model", "gpt-17", "--out", "{tmp}/a"], "error: unknown model 'gpt-17'"),
    (["compile", "--model", "{tiny}", "--pass", "quantise", "--out", "{tmp}/b"], "error: unknown pass 'quantise'"),
    (["compile", "--model", "{tiny}", "--pass", "quantize_dynamic_int8", "bits=4", "--out", "{tmp}/c"],
     "error: unknown option(s) 'bits'"),
    (["compile", "--model", "{tiny}", "--pass", "quantize_dynamic_int8", "activations", "--out", "{tmp}/d"],
     "is not key=value"),
    (["compile", "--model", "{tiny}", "--out", "{tmp}/file/out"], "error: cannot write to"),
    (["eval", "{tmp}/nothing"], "error: unknown model"),
    (["run", "{tmp}/nothing", "--prompt", "hi"], "error: no ONNX model at"),
])
def test_errors_are_one_line_with_hint_and_exit_non_zero(args, message, tiny_folder, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    args = [a.format(tmp=tmp_path, tiny=tiny_folder) for a in args]
    done = presso_cli(*args, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert any(line.startswith(message) or message in line for line in lines if line.startswith("error:")), done.stderr
    assert "Traceback" not in done.stderr and lines[-1].startswith("hint:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half-written
