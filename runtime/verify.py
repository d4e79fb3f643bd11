"""The shipped file checked against the compiled model, before it is moved into place.

``export()`` writes what it ships through a second trace (the KV-cache decoder for causal
LMs), so checking the backend at compile time does not check the file. Here the staged file
is loaded in plain ONNX Runtime on the CPU and compared with the compiled model in torch:
on the example inputs, and for a KV-cache decoder on a prefill of the example tokens plus
one decode step against the cache that prefill returned.

Each comparison is held to ``EXPORT_TOLERANCE`` or, for a model with quantized activations,
to the model's own noise floor: how far its torch outputs move when the first float tensor
gets 1e-6 relative noise (see :func:`presso.numerics.perturbed`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from presso.errors import ExportError
from presso.graph import Graph
from presso.numerics import allowed_error, perturbed, rel_error

# the lowerings reproduce the torch reference's arithmetic; float32 rounding stays far below this
EXPORT_TOLERANCE = 1e-2


def verify_file(graph: Graph, file: Path, decoder: dict[str, Any] | None, tolerance: float = EXPORT_TOLERANCE
                ) -> dict[str, Any]:
    """Relative errors of the file against ``graph.module``; an ExportError above what is allowed."""
    from presso.runtime.ort_model import session

    ort_session = session(file, ["CPUExecutionProvider"], lean=True)  # the check needs no speed
    run = _decoder_runs(graph, ort_session, decoder) if decoder else _plain_runs(graph, ort_session)
    want = run("torch")
    got = run("onnxruntime")
    errors = {name: rel_error([got[name]], [want[name]]) for name in want}
    floors = dict.fromkeys(want, 0.0)
    if not all(err <= tolerance for err in errors.values()):  # only then is the noise floor worth a run
        with perturbed(graph.called_modules().values()) as noise:
            noisy = run("torch", noise.reset)
        floors = {name: rel_error([noisy[name]], [want[name]]) for name in want}
    checks = {name: {"rel_error": errors[name], "noise_floor": floors[name],
                     "allowed": allowed_error(tolerance, floors[name])} for name in want}
    bad = {n: c for n, c in checks.items() if not np.isfinite(c["rel_error"]) or c["rel_error"] > c["allowed"]}
    if bad:
        detail = ", ".join(f"{n} {c['rel_error']:.3g} (allowed {c['allowed']:.3g})" for n, c in bad.items())
        raise ExportError(f"the exported ONNX file disagrees with the compiled model: {detail}; nothing was written",
                          hint="a lowering is wrong for this model: report it; compile(..., backend='torch') "
                               "still runs the compressed model in PyTorch")
    return {"checked_on": list(checks), "rel_error": max(c["rel_error"] for c in checks.values()),
            "tolerance": max(c["allowed"] for c in checks.values()), "checks": checks}


def _plain_runs(graph: Graph, ort_session):
    names = [i.name for i in ort_session.get_inputs()]
    tensors = graph.example_inputs.tensors

    def run(backend: str, reset=None) -> dict[str, torch.Tensor]:
        if backend == "torch":
            if reset:
                reset()
            return {"example inputs": torch.cat([o.detach().reshape(-1).double() for o in graph.run()])}
        feed = {n: t.detach().cpu().numpy() for n, t in zip(graph.spec.input_names, tensors) if n in names}
        outs = ort_session.run(None, feed)
        return {"example inputs": torch.cat([torch.from_numpy(np.asarray(o)).reshape(-1).double() for o in outs])}
    return run


def _decoder_runs(graph: Graph, ort_session, layout_dict: dict[str, Any]):
    from presso.runtime.decoder import CacheLayout, DecoderWithCache, OrtDecoder

    layout = CacheLayout(**layout_dict)
    ids = next((t for t in graph.example_inputs.tensors if not t.is_floating_point() and t.dim() == 2), None)
    if ids is None:
        raise ExportError("cannot check a KV-cache export without token ids among the example inputs",
                          hint="give example_inputs as token ids (batch, sequence)")
    ids = ids.cpu().numpy()
    ort_decoder = OrtDecoder(ort_session, layout, {}, Path())
    reference = DecoderWithCache(graph.module, layout).eval()
    chosen: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def torch_step(new: np.ndarray, past: list[np.ndarray], reset) -> tuple[torch.Tensor, list[np.ndarray]]:
        if reset:
            reset()
        feed = ort_decoder.feed(new, past)
        logits, *present = reference(*(torch.from_numpy(feed[n]) for n in layout.input_names))
        return logits, [p.numpy() for p in present]

    def ort_step(new, past, _reset):
        logits, present = ort_decoder.step(new, past)
        return torch.from_numpy(logits), present

    def run(backend: str, reset=None) -> dict[str, torch.Tensor]:
        step = torch_step if backend == "torch" else ort_step
        prefill, past = step(ids, ort_decoder.empty_cache(ids.shape[0]), reset)
        # one next token for every run: the one the unperturbed torch model picks
        nxt = chosen.setdefault("next", prefill[:, -1].argmax(-1, keepdim=True).numpy())
        decode, _ = step(nxt, past, reset)
        return {"prefill": prefill, "decode step": decode}
    return run
