"""Peer quantizers, each run on the same fp32 ONNX graph (or eager model) and calibration data.

A peer that is not installed, or fails on this model, becomes a row saying so instead of
stopping the run.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from presso.runtime.decoder import OrtDecoder


def calibration_feeds(decoder: OrtDecoder, batches: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """One session feed per calibration sequence (empty cache), for ONNX-level calibrators."""
    rows = [b[None] for batch in batches for b in batch.numpy()]
    return [decoder.feed(r, decoder.empty_cache(1)) for r in rows]


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def ort_quantize_dynamic(fp32: Path, out: Path, feeds) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8)


def ort_quantize_static(fp32: Path, out: Path, feeds) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(fp32), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    # flushes every 7 runs; a count that divides the feeds exactly ends on an empty
                    # flush, which onnxruntime 1.31 rejects ("No data is collected")
                    extra_options={"CalibMaxIntermediateOutputs": 7})


def ort_matmul_nbits(config: Callable) -> Callable:
    def quantize(fp32: Path, out: Path, feeds) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=config())
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return quantize


def ort_rtn(group: int) -> Callable:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return ort_matmul_nbits(lambda: DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=True))


def ort_hqq(group: int) -> Callable:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    return ort_matmul_nbits(lambda: HQQWeightOnlyQuantConfig(block_size=group, bits=4))


def untie_transposed_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give a MatMul that reads ``Transpose(initializer)`` (a tied lm_head) its own transposed copy.

    NNCF's ONNX backend only compresses MatMuls whose weight is an initializer; the function
    is unchanged, the file grows by the copy.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits and len(node.input) == 1:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(array.transpose(perm)), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def nncf_int4(group: int) -> Callable:
    def quantize(fp32: Path, out: Path, feeds) -> None:
        import nncf

        compressed = nncf.compress_weights(
            untie_transposed_weights(onnx.load(str(fp32))), mode=nncf.CompressWeightsMode.INT4_SYM,
            group_size=group, ratio=1.0,
            awq=True, scale_estimation=True, dataset=nncf.Dataset(feeds))
        onnx.save(compressed, str(out))
    return quantize


ONNX_PEERS = {
    "ORT quantize_dynamic int8": ort_quantize_dynamic,
    "ORT quantize_static int8 QDQ (MinMax, per-channel)": ort_quantize_static,
}


def onnx_int4_peers(group: int) -> dict[str, Callable]:
    return {f"ORT MatMulNBits RTN int4 sym g{group}": ort_rtn(group),
            f"ORT MatMulNBits HQQ int4 g{group}": ort_hqq(group),
            f"NNCF compress_weights INT4_SYM g{group} AWQ+scale estimation": nncf_int4(group)}


def run_onnx_peer(label: str, quantize: Callable, fp32: Path, workdir: Path, feeds) -> tuple[Path | None, float, str]:
    out = workdir / (label.split(" (")[0].replace(" ", "_") + ".onnx")
    start = time.perf_counter()
    try:
        quantize(fp32, out, feeds)
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc).strip()[:160]}"
    return out, time.perf_counter() - start, ""


# --- eager peers (PyTorch CPU) ---------------------------------------------------------------

def torch_dynamic_int8(model):
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def torchao_config(name: str):
    def quantize(model):
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        config = {"int8_dynamic": Int8DynamicActivationInt8WeightConfig, "int8_weight_only": Int8WeightOnlyConfig}[name]
        quantize_(model, config())
        return model
    return quantize


EAGER_PEERS = {
    "torch quantize_dynamic int8 (eager)": torch_dynamic_int8,
    "torchao Int8DynamicActivationInt8Weight (eager)": torchao_config("int8_dynamic"),
    "torchao Int8WeightOnly (eager)": torchao_config("int8_weight_only"),
}


def run_eager_peer(label: str, quantize: Callable, model) -> tuple[torch.nn.Module | None, float, float, str]:
    """(model, seconds, MB as saved by torch.save, error)."""
    start = time.perf_counter()
    try:
        quantized = quantize(copy.deepcopy(model)).eval()
    except Exception as exc:  # noqa: BLE001
        return None, time.perf_counter() - start, 0.0, f"{type(exc).__name__}: {str(exc).strip()[:160]}"
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        try:
            torch.save(quantized.state_dict(), path)
            mb = os.path.getsize(path) / 1e6
        except Exception:  # noqa: BLE001 - some tensor subclasses do not serialize
            mb = float("nan")
    return quantized, seconds, mb, ""
