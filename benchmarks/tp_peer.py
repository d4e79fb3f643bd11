"""Torch-Pruning (PyPI ``torch-pruning``) on SmolLM2: heads and MLP neurons, as in its LLM example.

    python -m benchmarks.tp_peer --ratio 0.2 --out DIR

Prunes query/kv heads (``prune_num_heads``) and MLP neurons with ``GroupMagnitudeImportance``
(L2); the residual stream is kept whole (embeddings, o_proj and down_proj outputs, lm_head
ignored) so that it prunes what presso's heads+mlp rows prune. The unit ratios are those
presso chose for the same parameter budget. Prints one JSON line: the exported ONNX path,
parameters and seconds, or the error. A stack dump goes to stderr if it runs too long.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time
from pathlib import Path

import torch


def prune(model, mlp_ratio: float, head_ratio: float):
    import torch_pruning as tp

    cfg = model.config
    num_heads, ignored = {}, [model.lm_head, model.model.embed_tokens]
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = num_heads[m.v_proj] = cfg.num_key_value_heads
            ignored.append(m.o_proj)
        if name.endswith("mlp"):
            ignored.append(m.down_proj)
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=torch.randint(3, 1000, (1, 32)), importance=tp.importance.GroupMagnitudeImportance(p=2),
        output_transform=lambda out: out.logits, pruning_ratio=mlp_ratio, ignored_layers=ignored,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio, round_to=8)
    for group in pruner.step(interactive=True):
        group.prune()
    for name, m in model.named_modules():  # as Torch-Pruning's LLM example does after pruning
        if name.endswith("self_attn"):
            m.num_key_value_groups = m.q_proj.out_features // m.k_proj.out_features
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mlp-ratio", type=float, required=True)
    parser.add_argument("--head-ratio", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.timeout - 20, exit=False, file=sys.stderr)
    torch.set_num_threads(args.threads)
    import presso
    from presso import models

    model, _ = models.load("smollm2-135m")
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        prune(model, args.mlp_ratio, args.head_ratio)
    except Exception as exc:  # noqa: BLE001 - reported as the peer's result
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:300]}"}))
        return
    seconds = time.perf_counter() - start
    after = sum(p.numel() for p in model.parameters())
    path = presso.compile(model, [], example_inputs=torch.randint(3, 1000, (1, 16))).export(args.out)
    print(json.dumps({"onnx": str(path), "params": after, "removed": 1 - after / before, "seconds": seconds}))


if __name__ == "__main__":
    main()
