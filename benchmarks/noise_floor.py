"""How noisy the export check's noise floor is: SmolLM2 int8, the file against torch on random inputs.

    python -m benchmarks.noise_floor [--inputs 24] [--seeds 4]

Compiles and exports SmolLM2 with ``quantize_dynamic_int8`` once, then for each random 16-token
input prints the file's error against the compiled model (prefill and one decode step, as
``runtime/verify.py`` checks them) and the floor each perturbation seed gives; last, the largest
ratio of error to floor for one seed and for the largest of ``numerics.FLOOR_SEEDS`` seeds.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

import presso
from presso import models
from presso.numerics import FLOOR_SEEDS, modules_issuing_ops, perturbed, rel_error
from presso.runtime import verify
from presso.runtime.export import lowering_graph
from presso.runtime.ort_model import session


def ids(seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = models.load("smollm2-135m")
    compiled = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=ids(1))
    path = compiled.export(tempfile.mkdtemp(), tokenizer=tokenizer)
    layout = json.loads((path.parent / "manifest.json").read_text())["decoder"]
    graph, ort = lowering_graph(compiled.graph), session(path, ["CPUExecutionProvider"], lean=True)
    worst_one = worst_max = 0.0
    for trial in range(args.inputs):
        runs = verify._DecoderRuns(layout, ids(100 + trial).numpy())
        want, got = runs.torch(graph), runs.onnxruntime(ort)
        issuing = modules_issuing_ops(graph.module, lambda runs=runs: runs.torch(graph))
        floors = {name: [] for name in want}
        for seed in range(args.seeds):
            with perturbed(issuing, seed=seed) as noise:
                noisy = runs.torch(graph, noise.reset)
            for name in want:
                floors[name].append(rel_error([noisy[name]], [want[name]]))
        for name in want:
            err = rel_error([got[name]], [want[name]])
            worst_one = max(worst_one, err / floors[name][0])
            worst_max = max(worst_max, err / max(floors[name][:FLOOR_SEEDS]))
            print(f"input {trial} {name}: error {err:.4f}, floors " + " ".join(f"{f:.4f}" for f in floors[name]))
    print(f"largest error / floor: one seed {worst_one:.2f}x, the largest of {FLOOR_SEEDS} seeds {worst_max:.2f}x")


if __name__ == "__main__":
    main()
