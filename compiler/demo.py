"""The built-in demo: compile a small random-init Llama with int8, export it, run it in ONNX Runtime."""
from __future__ import annotations

import time
from pathlib import Path

import torch

import presso
from presso.numerics import max_abs_error, rel_error


def demo_model() -> torch.nn.Module:
    """A 4-layer Llama with grouped-query attention (random weights, ~7M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _median_ms(fn, *args, repeats: int = 10) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def run_demo(out: str | Path = "out/demo") -> dict:
    model = demo_model()
    ids = torch.randint(3, 2048, (1, 64))
    print(f"compiling {type(model).__name__} with quantize_dynamic_int8 for ONNX Runtime ...")
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=ids, backend="onnxruntime")
    path = compiled.export(out)
    loaded = presso.runtime.load(path)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    got = loaded(ids).logits
    float_model = presso.compile(model, [], example_inputs=ids, backend="onnxruntime")
    print(compiled.report.to_markdown())
    result = {
        "artifact": str(path),
        "rel_error_vs_float": rel_error([got], [reference]),
        "max_abs_error_vs_float": max_abs_error([got], [reference]),
        "ort_float_ms": _median_ms(float_model, ids),
        "ort_int8_ms": _median_ms(loaded, ids),
    }
    print(f"exported to {path} ({compiled.report['bytes_on_disk']:,} bytes on disk)")
    print(f"ONNX Runtime int8 logits vs the float model: relative error {result['rel_error_vs_float']:.3e}, "
          f"max abs {result['max_abs_error_vs_float']:.3e}")
    print(f"ONNX Runtime forward of 64 tokens (median of 10): float {result['ort_float_ms']:.1f} ms, "
          f"int8 {result['ort_int8_ms']:.1f} ms")
    return result
