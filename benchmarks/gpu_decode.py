"""The decode half of ``python -m benchmarks.gpu``: a Llama-shaped decoder with random weights
and a static KV cache, one token per step, each step captured in a CUDA graph on every side;
its linears are ``nn.Linear`` (bf16) or presso's Triton modules, eager and through
``torch.compile``."""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

LLAMA_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
LLAMA3_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=32)
SMOLLM2 = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, layers=30)


class Block(nn.Module):
    """``packed``: q/k/v as one linear and gate/up as another (one launch each, outputs split); the
    quantized down projections then gate their input as they load or quantize it (``gated_down``).
    With ``fused_norms`` (presso's kernels) the residual add and the RMS norm before q/k/v and
    before gate/up run in those linears' launches, which return the sum as the next residual.

    The residual stream is ``h + delta``: a block takes the previous block's down projection as
    ``delta`` (None in the first) and returns its own, so that the add can join the next norm."""

    def __init__(self, hidden, intermediate, heads, kv_heads, max_len, batch=1, packed=True):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.packed = heads, kv_heads, hidden // heads, packed
        widths = [hidden, kv_heads * self.hd, kv_heads * self.hd]
        if packed:
            self.qkv = nn.Linear(hidden, sum(widths), bias=False)
            self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(hidden, w, bias=False) for w in widths)
            self.gate = nn.Linear(hidden, intermediate, bias=False)
            self.up = nn.Linear(hidden, intermediate, bias=False)
        self.widths, self.gated_down, self.fused_norms = widths, False, False
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.register_buffer("keys", torch.zeros(batch, kv_heads, max_len, self.hd))
        self.register_buffer("values", torch.zeros(batch, kv_heads, max_len, self.hd))

    def _qkv(self, h, delta):
        if self.fused_norms:
            if delta is None:
                return self.qkv(h, norm=self.norm1), h
            return self.qkv(delta, norm=self.norm1, residual=h)
        h = h if delta is None else h + delta
        x = self.norm1(h)
        return (self.qkv(x) if self.packed else torch.cat([self.q(x), self.k(x), self.v(x)], -1)), h

    def _mlp(self, h, o):
        if self.fused_norms:
            both, h = self.gate_up(o, norm=self.norm2, residual=h)
            return h, self.down(both, gated=True)
        h = h + o
        x = self.norm2(h)
        if self.gated_down:  # presso's down projections gate [gate | up] as they load or quantize it
            return h, self.down(self.gate_up(x), gated=True)
        gate, up = self.gate_up(x).chunk(2, -1) if self.packed else (self.gate(x), self.up(x))
        return h, self.down(F.silu(gate) * up)

    def forward(self, h, pos, mask, cos, sin, delta=None):
        b = h.shape[0]
        qkv, h = self._qkv(h, delta)
        q, k, v = qkv.split(self.widths, -1)
        q = q.view(b, 1, self.heads, self.hd).transpose(1, 2)
        k = k.view(b, 1, self.kv_heads, self.hd).transpose(1, 2)
        v = v.view(b, 1, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.keys.index_copy_(2, pos, k)
        self.values.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, self.keys, self.values, attn_mask=mask,
                                           enable_gqa=self.kv_heads != self.heads)
        return self._mlp(h, self.o(a.transpose(1, 2).reshape(b, 1, -1)))


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
    return t * cos + rotated * sin


class Decoder(nn.Module):
    """One token per call at position ``pos`` (a device tensor), KV cache in place: graph-capturable."""

    def __init__(self, hidden, intermediate, heads, kv_heads, vocab, layers, max_len=2048, batch=1, packed=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, intermediate, heads, kv_heads, max_len, batch, packed)
                                    for _ in range(layers))
        self.norm, self.lm_head = nn.RMSNorm(hidden), nn.Linear(hidden, vocab, bias=False)
        self.fused_head = False
        hd = hidden // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.outer(torch.arange(max_len).float(), inv).repeat(1, 2)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.register_buffer("positions", torch.arange(max_len))

    def forward(self, token, pos):
        mask = (self.positions <= pos)[None, None, None, :]
        cos, sin = self.cos[pos].to(self.embed.weight.dtype), self.sin[pos].to(self.embed.weight.dtype)
        h, delta = self.embed(token).view(token.shape[0], 1, -1), None
        for block in self.blocks:
            h, delta = block(h, pos, mask, cos, sin, delta)
        if self.fused_head:  # the last add and the final norm in the head's launches
            return self.lm_head(delta, norm=self.norm, residual=h)[0]
        return self.lm_head(self.norm(h + delta))


def quantized(decoder: Decoder, kind: str, batch: int = 1) -> Decoder:
    """Every linear replaced the way presso's passes and the Triton backend would; the norms move
    into the linears where their kernels take them in: W8A8 at any batch, int4 at batch 1
    (above, the int4 kernels would run them in torch: a launch more than inductor's fused norm)."""
    from presso.runtime.int8 import DynamicInt8Linear
    from presso.runtime.nbits import WeightOnlyLinear
    from presso.runtime.quant import WeightFormat
    from presso.runtime.triton.modules import to_triton

    for path, module in list(decoder.named_modules()):
        if isinstance(module, nn.Linear):
            w = module.weight.detach().float()
            new = (WeightOnlyLinear.quantize(w, None, WeightFormat(4, 128, True)) if kind == "int4"
                   else DynamicInt8Linear.from_weight(w, None, per_token=True))
            decoder.set_submodule(path, new)
    to_triton(decoder)
    fused = kind == "w8a8" or batch == 1
    for block in decoder.blocks:
        block.gated_down = block.packed
        block.fused_norms = block.packed and fused
    decoder.fused_head = fused
    return decoder.cuda()


@torch.no_grad()
def decode_ms(decoder: Decoder, context: int, batch: int = 1, steps: int = 100, compiled: bool = False) -> float:
    """Median ms per step (``batch`` tokens) of a CUDA-graph-captured decode step at ``context`` tokens of cache.

    ``compiled``: each block goes through ``torch.compile`` first (the quantized linears are
    opaque custom ops there), so norms, rotary and SiLU fuse on every side alike; the blocks
    share one compiled graph, so a 32-layer model compiles once.
    """
    token = torch.full((batch, 1), 7, device="cuda")
    pos = torch.tensor([context], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: autotuning and lazy casts happen outside the capture
            decoder(token, pos)
        if compiled:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            for block in decoder.blocks:  # should the blocks not share one graph, each still compiles
                block.compile(dynamic=False)
            for _ in range(3):
                decoder(token, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoder(token, pos)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


MODELS = {
    "8b": ("Llama-3-8B-shaped (32 layers)", LLAMA3_8B, (1, 16), True),
    "smollm2": ("SmolLM2-135M-shaped (30 layers)", SMOLLM2, (1,), True),
    "smollm2-unpacked": ("SmolLM2-135M-shaped, q/k/v and gate/up unpacked", SMOLLM2, (1,), False),
    "7b": ("Llama-7B-shaped (8 layers)", {**LLAMA_7B, "layers": 8}, (1,), True),
}


def build(shape: dict, context: int, batch: int, packed: bool, kind: str) -> Decoder:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no float32 copy of an 8B model on the way
    try:
        with torch.device("cuda"):
            decoder = Decoder(**shape, max_len=context + 16, batch=batch, packed=packed)
    finally:
        torch.set_default_dtype(default)
    for p in decoder.parameters():
        p.data.normal_(0, 0.02)
    return decoder if kind == "bf16" else quantized(decoder, kind, batch)


def decode_rows(models: str, context: int, kinds=("bf16", "int4", "w8a8")) -> list[dict]:
    rows = []
    for key in models.split(","):
        name, shape, batches, packed = MODELS[key]
        for batch in batches:
            base = {}  # bf16 ms per mode
            for kind in kinds:
                decoder = build(shape, context, batch, packed, kind)
                for compiled in (False, True):
                    row = dict(model=name, batch=batch, kind=kind, compiled=compiled)
                    try:
                        ms = decode_ms(decoder, context, batch, compiled=compiled)
                    except Exception as exc:  # a compile failure is a row, not the end of the run
                        rows.append(row | dict(error=str(exc).splitlines()[0][:120]))
                        print(rows[-1], flush=True)
                        continue
                    base[compiled] = base.get(compiled, ms)
                    rows.append(row | dict(ms=ms, tokens_per_s=batch * 1e3 / ms, speedup=base[compiled] / ms))
                    print(rows[-1], flush=True)
                del decoder
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    return rows


def decode_table(rows: list[dict], context: int) -> str:
    lines = [f"| model (random weights, {context} tokens of context, CUDA graphs) | batch | step | weights "
             "| ms/step | tokens/s | vs bf16 |", "|---|---:|---|---|---:|---:|---:|"]
    names = {"bf16": "bf16 (cuBLAS)", "int4": "presso int4 g128 (Triton)", "w8a8": "presso W8A8 (Triton)"}
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], r["compiled"])):
        mode = "torch.compile" if r["compiled"] else "eager"
        cells = (f"failed: {r['error']} | | |" if "error" in r else
                 f"{r['ms']:.3f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x |")
        lines.append(f"| {r['model']} | {r['batch']} | {mode} | {names[r['kind']]} | {cells}")
    return "\n".join(lines)
