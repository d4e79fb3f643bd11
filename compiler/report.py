"""What a compilation cost and saved: sizes, parameters, per-pass time, stats and drift."""
from __future__ import annotations

from typing import Any

from torch import nn


def count_params(model: nn.Module) -> int:
    """Weights, counted once even when tied; packed presso modules report their logical count."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if hasattr(module, "logical_params"):  # packed weights stored as buffers
            total += module.logical_params()
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def count_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, tied tensors once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class Report(dict):
    """A dict (JSON-ready) with :meth:`to_markdown`."""

    def to_markdown(self) -> str:
        lines = [f"# presso report: {self.get('model', '?')}", "",
                 f"backend: `{self.get('backend')}`", "",
                 "| | before | after | ratio |", "|---|---:|---:|---:|"]
        for key, label in (("params", "parameters"), ("bytes", "bytes (weights in memory)")):
            b, a = self[f"{key}_before"], self[f"{key}_after"]
            lines.append(f"| {label} | {b:,} | {a:,} | {a / b if b else 0:.3f} |")
        if self.get("bytes_on_disk"):
            lines.append(f"| bytes on disk (ONNX) | | {self['bytes_on_disk']:,} | |")
        lines += ["", "| pass | seconds | parameters after | bytes after | rel. error (step) "
                  "| rel. error (total) | stats |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for p in self.get("passes", []):
            stats = ", ".join(f"{k}={_short(v)}" for k, v in p["stats"].items())
            lines.append(f"| {p['name']} | {p['seconds']:.2f} | {p.get('params_after', 0):,} "
                         f"| {p.get('bytes_after', 0):,} "
                         f"| {p['rel_error_step']:.2e} | "
                         f"{p['rel_error_total']:.2e} | {stats} |")
        lines += ["", f"output relative error vs the original: {self.get('rel_error', 0.0):.3e} "
                      f"(max abs {self.get('max_abs_error', 0.0):.3e}) on the example inputs"]
        if "backend_rel_error" in self:
            lines.append(f"backend vs torch reference: relative error {self['backend_rel_error']:.3e}")
        if "export_check" in self:
            check = self["export_check"]
            lines.append(f"exported ONNX file vs the compiled model, in ONNX Runtime: relative error "
                         f"{check['rel_error']:.3e} (tolerance {check['tolerance']:g}) on "
                         f"{', '.join(check['checked_on'])}")
        if "fusions" in self:
            lines.append(_fusions_line(self["fusions"]))
        return "\n".join(lines) + "\n"


def _fusions_line(fusions: dict[str, Any]) -> str:
    if "not_fused" in fusions:
        return f"ONNX graph: {fusions['nodes']} nodes, not fused: {fusions['not_fused']}"
    ops = ", ".join(f"{n} x{c}" for n, c in fusions["operators"].items())
    packed = ", ".join(f"{k} x{v}" for k, v in fusions.get("packed", {}).items())
    return f"ONNX graph: {fusions['nodes']} nodes; fused operators: {ops}; packed matmuls: {packed or 'none'}"


def _short(value: Any) -> str:
    if isinstance(value, dict) and len(value) > 3:
        return f"{{{len(value)} entries}}"
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} items]" if len(value) > 3 else str(list(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

