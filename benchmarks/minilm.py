"""Every quantization recipe on the embedded all-MiniLM-L6-v2: sentence-embedding fidelity.

    python -m benchmarks.minilm [--sentences 512] [--out FILE]

Embeddings are mean-pooled and normalized (as sentence-transformers does); the cosine
similarity of each sentence's embedding to the float model's, over WikiText-2 test
sentences, is reported as mean and minimum. Each compiled model runs in ONNX Runtime.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

import presso
from presso import eval as ev
from presso import models

BATCH = 32


def sentences(split: str, n: int) -> list[str]:
    lines = [ln.strip() for ln in ev.wikitext2(split).splitlines()]
    text = " ".join(ln for ln in lines if ln and not ln.startswith("="))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 <= len(s.strip()) <= 400]
    return found[:n]


def batches(tokenizer, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    return out


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def recipes() -> list[tuple[str, list]]:
    mp = presso.make_pass
    return [("quantize_dynamic_int8", [mp("quantize_dynamic_int8")]),
            ("quantize_static_int8 (mse)",
             [mp("smooth_quant", search=True), mp("quantize_static_int8", observer="mse")]),
            ("quantize_weights int8 per-channel", [mp("quantize_weights", bits=8, group_size=-1)]),
            ("quantize_weights int4 g64 RTN", [mp("quantize_weights", group_size=64)]),
            ("quantize_weights int4 g64 GPTQ", [mp("quantize_weights", group_size=64, method="gptq")]),
            ("quantize_weights int4 g64 AWQ", [mp("quantize_weights", group_size=64, method="awq")]),
            ("quantize_weights int4 g64 GPTQ + int8 embeddings",
             [mp("quantize_weights", group_size=64, method="gptq", embeddings="int8")])]


def low_rank_recipes() -> list[tuple[str, list]]:
    mp = presso.make_pass
    return [("share_attention_heads kv_heads=6 adjacent mean", [mp("share_attention_heads", kv_heads=6)]),
            ("share_attention_heads kv_heads=6 similarity lstsq",
             [mp("share_attention_heads", kv_heads=6, grouping="similarity", merge="lstsq")]),
            ("share_attention_heads kv_heads=2 similarity lstsq",
             [mp("share_attention_heads", kv_heads=2, grouping="similarity", merge="lstsq")]),
            ("split_low_rank whiten 10%", [mp("split_low_rank", ratio=0.1)]),
            ("split_low_rank whiten 20%", [mp("split_low_rank", ratio=0.2)]),
            ("split_low_rank svd 20%", [mp("split_low_rank", ratio=0.2, method="svd")]),
            # the linears are 47% of MiniLM's parameters: 9.4% of the model is what whiten 20% removes
            ("prune_structured heads+mlp, as many params as whiten 20%, + recover",
             [mp("prune_structured", params_ratio=0.094, target=("heads", "mlp"), recover=True)])]


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load("minilm-l6")
    test = batches(tokenizer, sentences("test", args.sentences))
    calibration = batches(tokenizer, sentences("valid", 128))
    reference = torch.cat([embed(model, b) for b in test])
    rows = []
    for label, passes in (low_rank_recipes() if args.group == "low-rank" else recipes()):
        start = time.perf_counter()
        # verify=False: the cosine below is the measure; the torch/ORT gap is reported per row
        compiled = presso.compile(model, passes, example_inputs=test[0], calibration=calibration,
                                  backend="onnxruntime", verify=False)
        seconds = time.perf_counter() - start
        got = torch.cat([embed(compiled, b) for b in test])
        cosine = (got * reference).sum(-1)
        rows.append(dict(label=label, mean=float(cosine.mean()), min=float(cosine.min()), seconds=seconds,
                         mb=compiled.report["bytes_after"] / 1e6, mb_before=compiled.report["bytes_before"] / 1e6,
                         params=compiled.report["params_after"] / compiled.report["params_before"],
                         gap=compiled.report["backend_rel_error"]))
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], n: int) -> str:
    lines = [f"| recipe (all-MiniLM-L6-v2, {n} sentences, ONNX Runtime) | weights (MB) | params kept | cosine mean "
             "| cosine min | ORT vs torch reference (rel. error) | compress (s) |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| fp32 | {rows[0]['mb_before']:.1f} | 100% | 1.0000 | 1.0000 | | |"]
    lines += [f"| {r['label']} | {r['mb']:.1f} | {100 * r['params']:.0f}% | {r['mean']:.4f} | {r['min']:.4f} "
              f"| {r['gap']:.1e} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group", default="quantization", choices=["quantization", "low-rank"])
    parser.add_argument("--out")
    args = parser.parse_args()
    text = table(run(args), args.sentences)
    print(text)
    if args.out:
        Path(args.out).write_text(f"<!-- generated by python -m benchmarks.minilm -->\n\n{text}\n")


if __name__ == "__main__":
    main()
