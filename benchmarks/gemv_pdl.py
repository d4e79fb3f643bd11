"""The batch-1 int4 GEMV with and without programmatic dependent launch (PDL), on a CUDA GPU.

    PYTHONPATH=. python3 benchmarks/gemv_pdl.py      # about a minute

Symmetric int4, group 128, bf16 activations, the four large shapes of ``benchmarks.gpu``, timed
the same way (one call per weight copy in one CUDA graph, copies together past L2). Two settings:

- back to back: GEMV after GEMV, as q/k/v or gate/up projections run in a decoder;
- after another kernel: a small torch kernel before each call, as a norm or an activation
  precedes most projections. That kernel does not trigger dependents, so PDL can overlap the
  GEMV only with its own zeroing kernel there.

``PRESSO_PDL=0`` turns dependent launch off (same kernels, same configuration). Errors are
against float64 products of the dequantized weights.
"""
import os
import sys

import torch

from benchmarks.gpu import ROTATE_BYTES, graph_us, int4_operands
from presso.runtime.nbits import dequantize_packed
from presso.runtime.triton import gemv_words as gw

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]


def weight_copies(n: int, k: int) -> list[dict]:
    sets = []
    for _ in range(max(2, -(-ROTATE_BYTES // (n * k * 2)))):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        (codes, scales, zeros), packed = int4_operands(w)
        one = dict(w=w, words=gw.prepare_words(codes, scales.to(torch.bfloat16), zeros))
        if not sets:
            one["dequantized"] = dequantize_packed(packed.packed.cpu(), packed.group_scales().cpu(), None, k, 4
                                                   ).to("cuda", torch.float64)
        sets.append(one)
    return sets


def timings(n: int, k: int) -> dict:
    sets = weight_copies(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    other = torch.randn(4096, device="cuda")
    int4 = [lambda s=s: gw.gemv_words(x, *s["words"], k, 4) for s in sets]
    bf16 = [lambda s=s: torch.nn.functional.linear(x, s["w"]) for s in sets]

    def after_other(calls):
        return [lambda c=c: (other.mul_(1.0), c()) for c in calls]

    row = {"bf16": graph_us(bf16), "bf16 after": graph_us(after_other(bf16))}
    ref = (x.double() @ sets[0]["dequantized"].t()).reshape(-1)
    for pdl in ("0", "1"):
        os.environ["PRESSO_PDL"] = pdl
        row[f"pdl{pdl}"] = graph_us(int4)
        row[f"pdl{pdl} after"] = graph_us(after_other(int4))
        got = gw.gemv_words(x, *sets[0]["words"], k, 4).double().reshape(-1)
        row[f"err{pdl}"] = ((got - ref).norm() / ref.norm()).item()
    print(n, k, {key: round(v, 4) for key, v in row.items()}, gw._gemv_words_kernel.best_config, flush=True)
    return row


def main() -> int:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    lines = ["| N x K | setting | cuBLAS bf16 | int4, PDL off | int4, PDL on | rel. error off / on |",
             "|---|---|---:|---:|---:|---:|"]
    for n, k in SHAPES:
        r = timings(n, k)
        for label, suffix in (("back to back", ""), ("after another kernel", " after")):
            b, off, on = r["bf16" + suffix], r["pdl0" + suffix], r["pdl1" + suffix]
            lines.append(f"| {n}x{k} | {label} | {b:.2f} | {off:.2f} ({b / off:.2f}x) | {on:.2f} ({b / on:.2f}x) "
                         f"| {r['err0']:.1e} / {r['err1']:.1e} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
