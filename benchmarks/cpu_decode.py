"""CPU decoding of SmolLM2: presso's exports, fused and unfused, against the onnxruntime-genai
model builder's, each run by its own generator, in one run.

    python -m benchmarks.cpu_decode [--threads 2] [--rounds 3] [--windows 64]
        [--rows fp32,int8,w8a8,int4,int4-rtn] [--builder int4-32,int4-64,int4-32-rtn,int4-32-k_quant,int8]

For every artifact: size on disk, node count, perplexity by the shared protocol (WikiText-2
test, ``--windows`` windows of 256 tokens, the file run in ONNX Runtime), prefill of a
128-token prompt, decode ms/token after 128 and after 1,024 tokens of context, export or build
time. presso's files run in ``presso.runtime.load(...)``; the builder's in onnxruntime-genai's
generator (and presso's fused folders there too, as a cross-check). Rounds are interleaved
(every artifact once per round) and medians reported.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import presso
from presso import eval as ev
from presso import models
from presso.recipes import load_recipe

PROMPT, LONG, DECODE = 128, 1024, 32


def presso_rows(model, tokenizer, which: list[str], workdir: Path) -> list[dict]:
    calibration = ev.calibration_batches(tokenizer, n=128, seq_len=256, batch_size=8)
    recipes = {
        "fp32": lambda: [],
        "int8": lambda: [presso.make_pass("quantize_dynamic_int8")],
        "w8a8": lambda: load_recipe("w8a8").make_passes(),
        "int4": lambda: load_recipe("int4").make_passes(),  # AWQ+GPTQ g64, int8 embeddings and scales
        "int4-rtn": lambda: [presso.make_pass("quantize_weights", bits=4, group_size=32, method="rtn",
                                              embeddings="int8")],
    }
    rows = []
    for name in which:
        passes = recipes[name]()
        needs = any("calibration" in p.requires for p in passes)
        start = time.perf_counter()
        compiled = presso.compile(model, passes, example_inputs=torch.randint(3, 1000, (1, 16)),
                                  calibration=calibration if needs else None)
        print(f"compiled presso {name} in {time.perf_counter() - start:.0f} s", flush=True)
        for fuse in (True, False):
            start = time.perf_counter()
            path = compiled.export(workdir / f"{name}-{'fused' if fuse else 'unfused'}", tokenizer=tokenizer,
                                   fuse=fuse)
            rows.append(dict(label=f"presso {name} {'fused' if fuse else 'unfused'}", path=path,
                             seconds=time.perf_counter() - start, runner=PressoRunner(path)))
    return rows


def builder_rows(hf_folder: Path, which: list[str], workdir: Path) -> list[dict]:
    """``int4-32``, ``int4-64-k_quant``, ``int8``: precision, then block size and algo_config."""
    rows = []
    for name in which:
        precision, *rest = name.split("-")
        options = [f"block_size={rest[0]}"] if rest else []
        options += [f"algo_config={rest[1]}"] if len(rest) > 1 else []
        out = workdir / f"builder-{name}"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(workdir / "builder-cache")]
        cmd += ["--extra_options", *options] if options else []
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        rows.append(dict(label=f"onnxruntime-genai builder {name}", path=out / "model.onnx",
                         seconds=time.perf_counter() - start, runner=GenaiRunner(out)))
    return rows


class PressoRunner:
    def __init__(self, path: Path):
        self.decoder = presso.runtime.load(path, providers=["CPUExecutionProvider"], threads=THREADS)

    def logits_model(self):
        return self.decoder

    def latency(self, prompt: np.ndarray) -> tuple[float, float]:
        """As ``generate`` runs: the cache in place for fused decoders, copied for the others."""
        run = self.decoder.start(prompt.shape[0], prompt.shape[1] + DECODE + 1)
        start = time.perf_counter()
        logits = run.step(prompt)
        prefill = time.perf_counter() - start
        token, steps = logits[:, -1:].argmax(-1), []
        for _ in range(DECODE):
            start = time.perf_counter()
            logits = run.step(token)
            steps.append(time.perf_counter() - start)
            token = logits[:, -1:].argmax(-1)
        return prefill * 1e3, statistics.median(steps[2:]) * 1e3


class GenaiRunner:
    """A folder with ``genai_config.json``, in onnxruntime-genai's generator (timings) and in a
    plain ONNX Runtime session (perplexity: logits of whole windows)."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og, self.folder = og, folder
        config = og.Config(str(folder))
        config.clear_providers()
        self.model = og.Model(config)
        self.spec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]

    def logits_model(self):
        return _SessionLogits(self.folder / self.spec["filename"], self.spec)

    def latency(self, prompt: np.ndarray) -> tuple[float, float]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=prompt.shape[1] + DECODE + 1, do_sample=False)
        generator = self.og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt.astype(np.int32))
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(DECODE):
            start = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - start)
        return prefill * 1e3, statistics.median(steps[2:]) * 1e3


class _SessionLogits:
    def __init__(self, file: Path, spec: dict):
        from presso.runtime.ort_model import session

        self.session, self.spec = session(file, ["CPUExecutionProvider"], threads=THREADS), spec

    def __call__(self, input_ids: torch.Tensor, **unused):
        from transformers.modeling_outputs import CausalLMOutput

        ids = input_ids.numpy().astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        empty = np.zeros((ids.shape[0], self.spec["num_key_value_heads"], 0, self.spec["head_size"]), np.float32)
        names = {i.name for i in self.session.get_inputs()}
        for i in range(self.spec["num_hidden_layers"]):
            for kind in ("key", "value"):
                feed[self.spec["inputs"][f"past_{kind}_names"] % i] = empty
        if "position_ids" in names:
            feed["position_ids"] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        logits = self.session.run([self.spec["outputs"]["logits"]], feed)[0]
        return CausalLMOutput(logits=torch.from_numpy(logits))


def describe(row: dict) -> None:
    path: Path = row["path"]
    row["mb"] = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name)) / 1e6
    row["nodes"] = len(onnx.load(str(path), load_external_data=False).graph.node)


def table(rows: list[dict], fp32: float) -> str:
    lines = ["| artifact | size (MB) | nodes | perplexity | Δ vs fp32 | prefill 128 (ms) | decode @128 (ms/token) "
             "| decode @1024 (ms/token) | export / build (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = 100 * (r["ppl"] / fp32 - 1)
        lines.append(f"| {r['label']} | {r['mb']:.1f} | {r['nodes']} | {r['ppl']:.2f} | {delta:+.1f}% "
                     f"| {r['prefill']:.0f} | {r['decode']:.1f} | {r['decode_long']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


THREADS = 2


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--rows", default="fp32,int8,w8a8,int4,int4-rtn")
    parser.add_argument("--builder", default="int4-32,int4-64,int4-32-rtn,int4-32-k_quant,int8")
    args = parser.parse_args()
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    workdir = Path(tempfile.mkdtemp(prefix="presso-cpu-decode-"))
    model.save_pretrained(workdir / "hf")
    tokenizer.save_pretrained(workdir / "hf")
    rows = presso_rows(model, tokenizer, args.rows.split(","), workdir)
    rows += builder_rows(workdir / "hf", [b for b in args.builder.split(",") if b], workdir)
    fp32 = ev.perplexity(model, tokenizer, windows=args.windows)
    ids = ev.token_ids(tokenizer, ev.wikitext2("test"), LONG).numpy()[None]
    for row in rows:
        describe(row)
        row["ppl"] = ev.perplexity(row["runner"].logits_model(), tokenizer, windows=args.windows)
        print(row["label"], f"{row['ppl']:.2f}", flush=True)
    timings = {r["label"]: [] for r in rows}
    for _ in range(args.rounds):  # interleaved: every artifact once per round
        for row in rows:
            prefill, decode = row["runner"].latency(ids[:, :PROMPT])
            _, decode_long = row["runner"].latency(ids[:, :LONG])
            timings[row["label"]].append((prefill, decode, decode_long))
    for row in rows:
        row["prefill"], row["decode"], row["decode_long"] = (statistics.median(t) for t in zip(*timings[row["label"]]))
    print(f"\nfp32 perplexity {fp32:.2f} ({args.windows} windows of 256 tokens); medians of {args.rounds} "
          f"interleaved rounds, {args.threads} threads\n\n{table(rows, fp32)}\n\nMachine: {platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}, onnxruntime "
          f"{__import__('onnxruntime').__version__}, onnxruntime-genai {__import__('onnxruntime_genai').__version__}")


if __name__ == "__main__":
    main()
