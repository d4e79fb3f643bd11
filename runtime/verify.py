"""The shipped file checked against the compiled model, before it is moved into place.

``export()`` writes what it ships through a second trace (the KV-cache decoder for causal
LMs), so checking the backend at compile time does not check the file. Here the staged file
is loaded in plain ONNX Runtime on the CPU and compared with the compiled model in torch:
on the example inputs, and for a KV-cache decoder on a prefill of the example tokens plus
one decode step against the cache that prefill returned.

Each comparison is held to ``EXPORT_TOLERANCE`` or, for a model with quantized activations,
to the model's own noise floor: the most its torch outputs move, over a few seeds, when every
module's output gets 1e-6 relative noise (see :func:`presso.numerics.noise_floors`).
"""
from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from presso.errors import ExportError
from presso.graph import Graph
from presso.lazy import return_freed_memory
from presso.numerics import allowed_error, modules_issuing_ops, noise_floors, rel_error

# the lowerings reproduce the torch reference's arithmetic; float32 rounding stays far below this
EXPORT_TOLERANCE = 1e-2


def verify_file(graph: Graph, file: Path, decoder: dict[str, Any] | None, tolerance: float = EXPORT_TOLERANCE
                ) -> dict[str, Any]:
    """Relative errors of the file against ``graph.module``; an ExportError above what is allowed."""
    check = FileCheck(file, decoder, tolerance)
    check.expect(graph)
    return check.verify(lambda: graph)


class FileCheck:
    """The check in two steps, so that what only the torch side needs (a float32 view of a
    half-precision model) is freed before ONNX Runtime loads the file: :meth:`expect` runs the
    model, :meth:`verify` runs the file and compares."""

    def __init__(self, file: Path, decoder: dict[str, Any] | None, tolerance: float = EXPORT_TOLERANCE):
        self.file, self.tolerance = file, tolerance
        self.runs = _DecoderRuns(decoder) if decoder else _PlainRuns()
        self.want: dict[str, torch.Tensor] = {}

    def expect(self, graph: Graph) -> None:
        self.want = self.runs.torch(graph)

    def run_file(self) -> None:
        """The file's side, in ONNX Runtime (the model itself is not needed for this)."""
        from presso.runtime.ort_model import session

        self.got = self.runs.onnxruntime(session(self.file, ["CPUExecutionProvider"], lean=True))
        self.runs.release()  # the session's copy of the weights goes before the model comes back
        gc.collect()
        return_freed_memory()

    def verify(self, rebuild: Callable[[], Graph]) -> dict[str, Any]:
        """Compare (running the file first if :meth:`run_file` was not called); ``rebuild()`` gives
        the model again, asked for only when a noise floor is needed."""
        if not hasattr(self, "got"):
            self.run_file()
        want, got = self.want, self.got
        errors = {name: rel_error([got[name]], [want[name]]) for name in want}
        floors = dict.fromkeys(want, 0.0)
        if not all(err <= self.tolerance for err in errors.values()):  # only then is a noise floor worth a run
            model = rebuild()  # the modules that compute, from one eager run (a trace costs seconds)
            issuing = modules_issuing_ops(model.module, lambda: self.runs.torch(model))

            def measure(reset):
                noisy = self.runs.torch(model, reset)
                return {name: rel_error([noisy[name]], [want[name]]) for name in want}

            floors = noise_floors(issuing, measure)
        checks = {name: {"rel_error": errors[name], "noise_floor": floors[name],
                         "allowed": allowed_error(self.tolerance, floors[name])} for name in want}
        bad = {n: c for n, c in checks.items() if not np.isfinite(c["rel_error"]) or c["rel_error"] > c["allowed"]}
        if bad:
            detail = ", ".join(f"{n} {c['rel_error']:.3g} (allowed {c['allowed']:.3g})" for n, c in bad.items())
            raise ExportError(f"the exported ONNX file disagrees with the compiled model: {detail}; nothing was "
                              "written", hint="a lowering is wrong for this model: report it; compile(..., "
                                              "backend='torch') still runs the compressed model in PyTorch")
        return {"checked_on": list(checks), "rel_error": max(c["rel_error"] for c in checks.values()),
                "tolerance": max(c["allowed"] for c in checks.values()), "checks": checks}


class _PlainRuns:
    """The example inputs, once through the model and once through the file."""

    def release(self) -> None:
        pass

    def torch(self, graph: Graph, reset=None) -> dict[str, torch.Tensor]:
        if reset:
            reset()
        self.inputs = dict(zip(graph.spec.input_names, graph.example_inputs.tensors))
        return {"example inputs": torch.cat([o.detach().reshape(-1).double() for o in graph.run()])}

    def onnxruntime(self, ort_session) -> dict[str, torch.Tensor]:
        names = {i.name for i in ort_session.get_inputs()}
        feed = {n: t.detach().cpu().numpy() for n, t in self.inputs.items() if n in names}
        outs = ort_session.run(None, feed)
        return {"example inputs": torch.cat([torch.from_numpy(np.asarray(o)).reshape(-1).double() for o in outs])}


class _DecoderRuns:
    """A prefill of the example tokens, then one decode step against the cache it returned; the
    decode token is the one the unperturbed torch model picks, for every run."""

    def __init__(self, layout_dict: dict[str, Any], ids: np.ndarray | None = None):
        from presso.runtime.decoder import CacheLayout, OrtDecoder

        self.layout = CacheLayout(**layout_dict)
        self.decoder = OrtDecoder(None, self.layout, {}, Path())  # feeds and caches; a session to run
        self.given = ids  # token ids to check on instead of the example inputs' (benchmarks.noise_floor)
        self.ids: np.ndarray | None = None
        self.next: np.ndarray | None = None

    def _ids(self, graph: Graph) -> np.ndarray:
        if self.given is not None:
            return self.given
        ids = next((t for t in graph.example_inputs.tensors if not t.is_floating_point() and t.dim() == 2), None)
        if ids is None:
            raise ExportError("cannot check a KV-cache export without token ids among the example inputs",
                              hint="give example_inputs as token ids (batch, sequence)")
        return ids.cpu().numpy()

    @torch.no_grad()
    def torch(self, graph: Graph, reset=None) -> dict[str, torch.Tensor]:
        from presso.runtime.decoder import DecoderWithCache

        self.ids = self._ids(graph)
        reference = DecoderWithCache(graph.module, self.layout).eval()

        def step(new, past):
            if reset:
                reset()
            feed = self.decoder.feed(new, past)
            logits, *present = reference(*(torch.from_numpy(feed[n]) for n in self.layout.input_names))
            return logits, [p.numpy() for p in present]

        return self._two_steps(step)

    def release(self) -> None:
        self.decoder.session = None

    def onnxruntime(self, ort_session) -> dict[str, torch.Tensor]:
        self.decoder.session = ort_session

        def step(new, past):
            logits, present = self.decoder.step(new, past)
            return torch.from_numpy(logits), present

        return self._two_steps(step)

    def _two_steps(self, step) -> dict[str, torch.Tensor]:
        prefill, past = step(self.ids, self.decoder.empty_cache(self.ids.shape[0]))
        if self.next is None:
            self.next = prefill[:, -1].argmax(-1, keepdim=True).numpy()
        decode, _ = step(self.next, past)
        return {"prefill": prefill, "decode step": decode}
