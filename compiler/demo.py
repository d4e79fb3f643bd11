"""The demo: the embedded SmolLM2 compiled with int8, exported, evaluated, answering a prompt."""
from __future__ import annotations

import time
from pathlib import Path

import torch

import presso
from presso import eval as ev
from presso import models
from presso.cli import prompt_ids

PROMPT = "What is the capital of France? Answer in one sentence."


def run_demo(out: str | Path = "out/demo", windows: int = 8) -> dict:
    start = time.perf_counter()
    print("loading smollm2-135m (SmolLM2-135M-Instruct, embedded) ...", flush=True)
    model, tokenizer = models.load("smollm2-135m")
    example = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))  # a repeatable run
    print("compiling with quantize_dynamic_int8 ...", flush=True)
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=example)
    print(f"exporting to {out} (ONNX with KV cache) ...", flush=True)
    path = compiled.export(out, tokenizer=tokenizer)
    runtime_model = presso.runtime.load(path)
    print(f"perplexity on {windows} windows of 256 WikiText-2 test tokens ...", flush=True)
    ppl_fp32 = ev.perplexity(model, tokenizer, windows=windows)
    ppl_int8 = ev.perplexity(runtime_model, tokenizer, windows=windows)
    ids = prompt_ids(tokenizer, PROMPT)
    answer_ids = runtime_model.generate(ids, max_new_tokens=48, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(answer_ids[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print(compiled.report.to_markdown())
    result = {"artifact": str(path), "bytes_on_disk": compiled.report["bytes_on_disk"],
              "bytes_fp32": compiled.report["bytes_before"], "ppl_fp32": ppl_fp32, "ppl_int8": ppl_int8,
              "answer": answer, "seconds": time.perf_counter() - start}
    print(f"size: {result['bytes_fp32'] / 1e6:.1f} MB float32 weights -> "
          f"{result['bytes_on_disk'] / 1e6:.1f} MB ONNX on disk")
    print(f"perplexity: float32 eager {ppl_fp32:.2f} -> int8 ONNX Runtime {ppl_int8:.2f} "
          f"({100 * (ppl_int8 / ppl_fp32 - 1):+.1f}%)")
    print(f"prompt: {PROMPT}\nanswer (int8, ONNX Runtime, greedy): {answer}")
    print(f"done in {result['seconds']:.0f} s; try: presso run {out} --prompt \"...\"")
    return result
