"""Models larger than memory: random-weight Llama shapes compiled from safetensors folders.

    python -m benchmarks.scale --shape 3b --root /data/presso-scale [--method rtn|gptq]
        [--calibration 16 --seq-len 256] [--whole] [--no-export] [--device cuda]
        [--processes 2 --logits FILE]

Writes the folder once (bf16 shards of at most 2 GB, tensor by tensor, never the whole model
in memory), then runs each measurement in a child process so its peak memory is its own:
``presso.compile(folder, [quantize_weights int4 ...])`` plus ``export()`` (the file is
checked against the compiled model). ``--whole`` also measures the path that loads the
model into memory first (``from_pretrained``, then ``compile(model)``). The weights are
random: their accuracy means nothing, their memory and time do. ``--processes N`` runs the
compile under ``torchrun`` (one GPU a process with ``--device cuda``, gloo on CPUs), and
``--logits`` saves the compiled model's outputs on a fixed input, to compare the runs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # the published configs' shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
SHARD_BYTES = 2 << 30


def config_for(shape: str, layers: int | None = None):
    import transformers

    dims = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    return transformers.LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                                    bos_token_id=1, eos_token_id=2, dtype="bfloat16",
                                    architectures=["LlamaForCausalLM"], **dims)


def write_random(shape: str, folder: Path, layers: int | None = None) -> Path:
    """The folder of a random bf16 model of ``shape`` (written once, reused after)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = config_for(shape, layers)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    skeleton.tie_weights()  # a tied head is stored once, as the embedding
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for name, p in skeleton.named_parameters():  # tied weights are listed once
        t = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = sum(p.numel() * 2 for p in skeleton.parameters())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return folder


def measure(folder: str, method: str, calibration: int, seq_len: int, whole: bool, export: bool,
            device: str, skip: tuple[str, ...] = (), logits: str | None = None) -> dict | None:
    """One compile (+ export) in this process; peak host memory from the kernel's count. Under
    torchrun, rank 0 exports and returns the measures (GPU peaks of every rank), the others None."""
    import presso
    from presso import distributed

    torch.set_num_threads(torch.get_num_threads())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 128000, (min(8, calibration - i), seq_len), generator=gen)
               for i in range(0, calibration, 8)] if method != "rtn" else None
    example = torch.randint(3, 128000, (1, 16), generator=gen)
    # random weights drift far more than trained ones (their accuracy means nothing): no drift bound
    p = presso.make_pass("quantize_weights", bits=4, group_size=128, method=method, tolerance=10.0,
                          skip=skip)
    start = time.perf_counter()
    model = folder
    if whole:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    loaded = time.perf_counter() - start
    with distributed.process_group():  # under torchrun (--processes): the ranks share the calibration
        compiled = presso.compile(model, [p], example_inputs=example, calibration=batches, device=device)
        out = _measured(compiled, example, start, loaded, export, logits)
        gpu_peaks = distributed.gather_objects(torch.cuda.max_memory_allocated() / 1e9
                                               if torch.cuda.is_available() else 0.0)
    if not distributed.is_main():
        return None
    if torch.cuda.is_available():
        out["gpu_peak_gb"] = max(gpu_peaks)
        out["gpu_peak_gb_per_rank"] = [round(g, 2) for g in gpu_peaks]
    return out


def _measured(compiled, example, start: float, loaded: float, export: bool, logits: str | None) -> dict:
    from presso import distributed

    export = export and distributed.is_main()
    compile_s = time.perf_counter() - start - loaded
    out = {"load_s": loaded, "compile_s": compile_s, "peak_after_compile_gb": _peak_gb()}
    stats = compiled.report["passes"][0]["stats"]
    out["quantize_s"] = stats.get("quantize_seconds")
    if stats.get("block_seconds"):
        out["median_block_s"] = sorted(stats["block_seconds"])[len(stats["block_seconds"]) // 2]
    if export:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="presso-scale-") as tmp:
            path = compiled.export(Path(tmp) / "model")
            out["export_s"] = time.perf_counter() - start
            out["disk_gb"] = sum(f.stat().st_size for f in path.parent.iterdir()) / 1e9
        out["export_check"] = compiled.report["export_check"]["rel_error"]
    out["peak_gb"] = _peak_gb()
    out["processes"] = distributed.world_size()
    if logits and distributed.is_main():  # the artifact's outputs on a fixed input, to compare runs
        torch.save(compiled(example).logits.float().cpu(), logits)
    return out


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--root", default="/tmp/presso-scale")
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--whole", action="store_true", help="also measure loading the model into memory first")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (time per block)")
    parser.add_argument("--skip", default="", help="comma-separated module patterns kept in float (lm_head)")
    parser.add_argument("--processes", type=int, default=1, help="calibrate in this many processes (torchrun), "
                        "one GPU each with --device cuda")
    parser.add_argument("--logits", default=None, help="save the compiled model's logits on a fixed input here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one measurement, as a child process
        out = measure(args.child, args.method, args.calibration, args.seq_len, args.whole, not args.no_export,
                      args.device, tuple(filter(None, args.skip.split(","))), args.logits)
        if out is not None:
            print(json.dumps(out))
        return
    start = time.perf_counter()
    name = f"llama-{args.shape}" + (f"-{args.layers}layers" if args.layers else "")
    folder = write_random(args.shape, Path(args.root) / name, args.layers)
    print(f"folder {folder} ready in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for whole in ([False, True] if args.whole else [False]):
        launch = [sys.executable] if args.processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}"]
        cmd = [*launch, "-m", "benchmarks.scale", "--child", str(folder), "--method", args.method,
               "--calibration", str(args.calibration), "--seq-len", str(args.seq_len), "--device", args.device,
               "--skip", args.skip] + (["--logits", args.logits] if args.logits else [])
        cmd += (["--whole"] if whole else []) + (["--no-export"] if args.no_export else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:])
            rows.append({"path": "whole" if whole else "from disk", "error": done.stderr.strip().splitlines()[-1]})
            continue
        rows.append({"path": "whole model in memory" if whole else "from disk, block by block",
                     **json.loads(done.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.shape} ({args.method}, {args.device} x {args.processes}, {torch.get_num_threads()} threads):")
    for r in rows:
        print(" | ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
