"""``CompiledModel.export``: ONNX file (+ external data), ``manifest.json`` and ``report.md``, atomically.

Causal LMs are exported with KV-cache inputs and outputs (see ``presso.runtime.decoder``).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from presso.graph import Graph
from presso.lazy import held_on_disk
from presso.plugins.registry import get_registry
from presso.runtime.artifact import MANIFEST, model_path, staged, write_json
from presso.runtime.decoder import CacheLayout, is_causal_lm, trace_decoder
from presso.runtime.genai import GENAI_CONFIG, genai_config
from presso.runtime.onnx_export import write_onnx, write_program
from presso.runtime.precision import lowering_graph, precision_report
from presso.runtime.verify import FileCheck

# a compiled model this large waits on disk while ONNX Runtime checks its file (peak memory: the
# larger of the two, not their sum); a smaller one stays, as the round trip would cost more time
HOLD_ON_DISK_BYTES = 1 << 30


def export_artifact(compiled, path: str | os.PathLike, tokenizer: Any = None, kv_cache: bool = True,
                    fuse: bool = True) -> Path:
    """Returns the path of the written ONNX file."""
    from tqdm.auto import tqdm

    target = model_path(path)
    with staged(target.parent) as stage, tqdm(total=2, desc="export", leave=False) as bar:
        lowered = lowering_graph(compiled.graph)  # float32 float parts for a half-precision model
        extra = write_model(lowered, stage / target.name, kv_cache, fuse)
        # the file that ships, checked against what it was traced from before anything is moved in;
        # the float32 view is dropped before ONNX Runtime loads the file (the peak of a large export)
        check = FileCheck(stage / target.name, extra.get("decoder"))
        check.expect(lowered)
        extra["precision"] = compiled.report["precision"] = precision_report(compiled.graph, lowered)
        del lowered
        compiled.graph.invalidate()  # a trace would hold the weights too
        with held_on_disk(compiled.graph.module, stage, min_bytes=HOLD_ON_DISK_BYTES):
            check.run_file()  # ONNX Runtime's copy of the file, while the model waits on disk
        extra["export_check"] = check.verify(lambda: lowering_graph(compiled.graph))
        compiled.report["export_check"] = extra["export_check"]
        bar.update()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(stage))
        if "fusions" in extra:
            compiled.report["fusions"] = extra["fusions"]
        if "decoder" in extra and "not_fused" not in extra["fusions"]:
            config = genai_config(compiled.graph.module, CacheLayout(**extra["decoder"]), target.name)
            write_json(stage / GENAI_CONFIG, config)
        size = sum(f.stat().st_size for f in stage.iterdir() if f.name.startswith(target.name))
        compiled.report["bytes_on_disk"] = size
        (stage / "report.md").write_text(compiled.report.to_markdown())
        write_json(stage / MANIFEST, dict(compiled.manifest, model_file=target.name, bytes_on_disk=size, **extra))
        bar.update()
    return target


def write_model(graph: Graph, file: Path, kv_cache: bool, fuse: bool = True) -> dict[str, Any]:
    """Write the ONNX model; returns what the manifest must add (the cache layout, if any)."""
    lowerings = get_registry().onnx_lowerings
    if not (kv_cache and graph.spec.hf and is_causal_lm(graph.module)):
        write_onnx(graph, file, lowerings)
        return {}
    program, layout, details = trace_decoder(graph.module, fuse)
    write_program(program, layout.input_names, ["logits"] + layout.present_names, file, lowerings,
                  model_name=type(graph.module).__name__)
    return {"decoder": layout.to_dict(), "fusions": fusion_counts(file) | details}


def fusion_counts(file: Path) -> dict[str, Any]:
    """How many of ONNX Runtime's fused operators the file holds, by type."""
    import onnx

    model = onnx.load(str(file), load_external_data=False)
    fused = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
             "MatMulNBits", "GatherBlockQuantized", "QuickGelu")
    counts = Counter(n.op_type for n in model.graph.node if n.op_type in fused)
    return {"operators": dict(sorted(counts.items())), "nodes": len(model.graph.node)}
