"""ONNX quantized by onnxruntime: static int8 (`--quantize int8`, QDQ, calibrated on --data) and dynamic int8
(`--quantize int8-dynamic`, activations quantized at run time). The onnx format declares both.

- static: the fp32 ONNX (dynamic batch), onnxruntime's `quant_pre_process` (shape inference, BatchNorm folding),
  then `quantize_static` in QDQ format, per-channel int8 weights (7-bit, as the dynamic quantizer: x86 CPUs
  without VNNI saturate u8 x s8 products with full 8-bit weights), uint8 activations calibrated with MinMax.
- dynamic: the fp32 ONNX replaced by quantize_dynamic's int8 graph (int8 weights, activations quantized at run
  time); the report gets the fp32 size and the ratio.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dynamic import dynamic_batch
from ..errors import ExportError, describe_exception
from ._base import ExportContext, Writer, Written
from ._graph import exporting
from ._int8 import WorkDir, artifact_bytes, counted, int8_info, require_calibration, tensor_leaves

if TYPE_CHECKING:
    from ..inputs import Inputs

# The module's input names, recorded in the ONNX metadata when the exporter dropped unused inputs.
INPUTS_METADATA = "lexport.input_names"
# Default tolerances of --quantize int8-dynamic against the fp32 module (measured: see _precision.py).
DYNAMIC_TOLERANCE = (1e-1, 1e-1)


def _input_names(path: Path) -> tuple[list[str], list[str] | None]:
    """(graph input names, every module input's name when the exporter dropped unused ones, else None)."""
    import json

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = [i.name for i in model.graph.input]
    recorded = next((p.value for p in model.metadata_props if p.key == INPUTS_METADATA), None)
    return names, ([str(n) for n in json.loads(recorded)] if recorded else None)


def _feed(inputs: Inputs, names: list[str], all_names: list[str] | None) -> dict[str, Any]:
    tensors = tensor_leaves(inputs)
    if all_names is not None and len(tensors) == len(all_names):
        given = dict(zip(all_names, tensors))
        tensors = [given[n] for n in names if n in given]
    if len(tensors) != len(names):
        raise ExportError(f"a calibration batch has {len(tensors)} tensors; the ONNX graph takes {len(names)} inputs "
                          f"({', '.join(names)})")
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors)}


def write_static_int8(fp32_write: Writer, ctx: ExportContext, path: Path) -> Written:
    """Static int8 ONNX (QDQ) of ctx.target, calibrated on ctx.calibration; see the module docstring."""
    calibration = ctx.calibration
    require_calibration(calibration)
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:  # pragma: no cover - onnxruntime ships it
        raise ExportError(f"onnxruntime.quantization is not available: {e}") from e
    # The graph's names are the run's (--input-names/--output-names, else the defaults the fp32 ONNX gets); its
    # batch dimension is dynamic (with the run's --dynamic dims, if any), so calibration batches of any size go through.
    ctx = dataclasses.replace(ctx, dynamic=ctx.dynamic or dynamic_batch(ctx.module(), ctx.inputs()))
    with WorkDir(path) as work:
        fp32 = work / "fp32" / "model.onnx"
        fp32.parent.mkdir()
        written = fp32_write(ctx, fp32)
        fp32_bytes = artifact_bytes(fp32)
        names, all_names = _input_names(fp32)
        feeds = [_feed(b, names, all_names) for b in calibration]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it: Iterator[dict[str, Any]] = counted(feeds, "calibrating onnx int8")

            def get_next(self) -> dict[str, Any] | None:
                return next(self.it, None)

            def rewind(self) -> None:
                self.it = counted(feeds, "calibrating onnx int8")

        prepared = work / "prepared.onnx"
        notes = list(written.notes)
        try:
            with exporting(ctx):
                # Shape inference and graph optimisation (BatchNorm folded into Conv) first, as onnxruntime
                # recommends before quantizing.
                quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001 - pre-processing is an optimisation; quantize the graph as it is
            notes.append(f"onnxruntime's pre-processing failed ({describe_exception(e)}); quantized the graph as "
                         "exported")
            prepared = fp32
        try:
            with exporting(ctx):
                quantize_static(
                    str(prepared),
                    str(path),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=False,
                    # Calibration data are not kept: the whole set goes through in one pass.
                    extra_options={"CalibMovingAverage": False},
                )
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime quantize_static failed: {describe_exception(e)}") from e
    int8_bytes = artifact_bytes(path)
    info = int8_info(
        "onnxruntime.quantization.quantize_static (QDQ; per-channel int8 weights, 7-bit; uint8 activations, "
        "MinMax calibration)", calibration, fp32_bytes, int8_bytes, opset=written.info.get("opset"),
        inputs=written.info.get("inputs"), outputs=written.info.get("outputs"),
    )
    notes.append(f"static int8: {int8_bytes:,} bytes, {info['size_ratio']:.2f}x the fp32 ONNX ({fp32_bytes:,} "
                 f"bytes), calibrated on {info['calibration_samples']} samples")
    return Written(f"{written.exporter} + onnxruntime.quantization.quantize_static", notes, info,
                   traced=written.traced)


def quantize_onnx_dynamic(path: Path) -> dict[str, Any]:
    """Replace the fp32 ONNX at `path` (one file, or with its .data) by its int8 dynamically quantized graph.

    Weights of MatMul/Gemm/Conv become int8 (7-bit range, per output channel); activations are quantized at run
    time (DynamicQuantizeLinear). Returns the sizes for the report."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:  # pragma: no cover - onnxruntime ships it
        raise ExportError(f"onnxruntime.quantization is not available: {e}") from e

    files = sorted(path.parent.iterdir())
    fp32_bytes = sum(f.stat().st_size for f in files)
    work = path.parent / ".quantize"
    work.mkdir()
    try:
        source = work / "fp32.onnx"
        os.replace(path, source)
        for f in files:  # external data, if any, travels with the graph
            if f != path:
                os.replace(f, work / f.name)
        prepared = work / "prepared.onnx"
        try:
            # Shape inference and graph optimisation first, as onnxruntime recommends: more ops get quantized.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the graph as it is
            prepared = source
        quantize_dynamic(
            str(prepared),
            str(path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            # 7-bit weights: x86 CPUs without VNNI (AVX2) multiply u8 activations by s8 weights with a saturating
            # 16-bit add; with full 8-bit weights a 2-layer Transformer drifted 0.45 here, with 7 bits 0.04.
            reduce_range=True,
            # Only MatMuls with a constant (weight) operand: attention's activation x activation MatMuls stay
            # float32 (quantizing them adds error and saves no bytes).
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=False,
        )
    finally:
        for f in sorted(work.iterdir()):
            f.unlink()
        work.rmdir()
    int8_bytes = sum(f.stat().st_size for f in path.parent.iterdir())
    return {
        "quantize": "int8-dynamic",
        "weights_dtype": "int8 (MatMul/Gemm/Conv weights; other tensors float32)",
        "inputs_dtype": "float32",
        "outputs_dtype": "float32",
        "quantizer": "onnxruntime.quantization.quantize_dynamic (QInt8 per-channel 7-bit weights, uint8 activations "
        "quantized at run time)",
        "fp32_bytes": fp32_bytes,
        "bytes": int8_bytes,
        "size_ratio": round(int8_bytes / fp32_bytes, 4) if fp32_bytes else None,
    }


def write_dynamic_int8(fp32_write: Writer, ctx: ExportContext, path: Path) -> Written:
    """The fp32 ONNX, then replaced by its int8 dynamically quantized graph."""
    written = fp32_write(ctx, path)
    with exporting(ctx):  # quiet: the quantizer logs on stdout/stderr
        written.info.update(quantize_onnx_dynamic(path))
    written.exporter = f"{written.exporter} + onnxruntime.quantization"
    written.notes.append(
        f"int8 dynamic quantization: {written.info['bytes']:,} bytes, {written.info['size_ratio']:.2f}x the "
        f"fp32 ONNX ({written.info['fp32_bytes']:,} bytes)"
    )
    return written
