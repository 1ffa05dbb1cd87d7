"""Static int8 (`--quantize int8`): weights and activations in int8, activation ranges calibrated on real batches.

One writer per format, each `write_*_int8(module, example, calibration, path) -> Written`:

- `module`: the eager nn.Module in eval mode (the fp32 target);
- `example`: inputs.Inputs, the arguments the program is exported with (its shapes are the artifact's static
  shapes for ExecuTorch; ONNX and OpenVINO keep the batch dimension dynamic);
- `calibration`: a list of inputs.Inputs (forward's arguments per batch, `data.batches.Batch.inputs`), the
  batches whose activations set the int8 ranges; never the batches that verify the artifact;
- `path`: where the artifact goes (its directory is private to the writer: the OpenVINO `.bin` companion lands
  beside it, work files are made and removed in a subdirectory).

Each returns a `Written` whose `info` holds `quantize: "int8"`, the quantizer used, `calibration_batches`,
`calibration_samples`, `fp32_bytes` (the same format exported in fp32 from the same module, measured), `bytes`
and `size_ratio`. Failures are ExportError (exit 5); a missing optional package names its extra.

- onnx: the fp32 ONNX (formats.onnx.write, dynamic batch), onnxruntime's `quant_pre_process` (shape inference,
  BatchNorm folding), then `quantize_static` in QDQ format, per-channel int8 weights (7-bit, as the dynamic
  quantizer: x86 CPUs without VNNI saturate u8 x s8 products with full 8-bit weights), uint8 activations
  calibrated with MinMax.
- executorch: torch.export, PT2E with the XNNPACK quantizer (symmetric, per-channel weights; `prepare_pt2e`,
  calibration, `convert_pt2e`), then torch.export again and lowering to XNNPACK, which runs the int8 kernels.
- openvino: `ov.convert_model`, then NNCF's `quantize` with an `nncf.Dataset` of the calibration batches (every
  batch used), saved with `compress_to_fp16=False`.

Verification runs each artifact with its format's own loader (`load_int8(format_name, path)` is that loader:
onnxruntime InferenceSession, executorch.runtime, OpenVINO Core compiled for CPU with f32 inference precision, so
the int8 program is not also run in bf16 on CPUs with AMX).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ExportError, UsageError, describe_exception
from . import ExportContext, Written, require_installed

INT8_FORMATS = ("onnx", "executorch", "openvino")
OPENVINO_HINT = "Install it with: pip install 'lightning-export[openvino]' (or pip install openvino nncf)."


def _samples(calibration: list[Any]) -> int:
    from torch.utils._pytree import tree_leaves

    total = 0
    for inputs in calibration:
        first = next((t for t in tree_leaves((inputs.args, inputs.kwargs)) if hasattr(t, "dim") and t.dim() >= 1),
                     None)
        total += int(first.shape[0]) if first is not None else 1
    return total


def _tensor_leaves(inputs: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves((inputs.args, inputs.kwargs)) if isinstance(t, torch.Tensor)]


def _sizes(path: Path) -> int:
    """Bytes of the artifact: the file and its companions (everything the writer left beside it)."""
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())


def _info(quantizer: str, calibration: list[Any], fp32_bytes: int, int8_bytes: int, **extra: Any) -> dict[str, Any]:
    return {
        "quantize": "int8",
        "quantizer": quantizer,
        "weights_dtype": "int8",
        "activations_dtype": "int8 (calibrated)",
        "calibration_batches": len(calibration),
        "calibration_samples": _samples(calibration),
        "fp32_bytes": fp32_bytes,
        "bytes": int8_bytes,
        "size_ratio": round(int8_bytes / fp32_bytes, 4) if fp32_bytes else None,
        **extra,
    }


def _check(calibration: list[Any]) -> None:
    if not calibration:
        raise UsageError("--quantize int8 needs calibration batches: pass --data (a .pt file of batches, or config)")


class _WorkDir:
    """A subdirectory of the artifact's directory for intermediate files, removed afterwards."""

    def __init__(self, path: Path) -> None:
        self.dir = path.parent / ".int8-work"

    def __enter__(self) -> Path:
        self.dir.mkdir()
        return self.dir

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# ONNX: onnxruntime quantize_static (QDQ)
# ----------------------------------------------------------------------------------------------------------------


def _onnx_input_names(path: Path) -> tuple[list[str], list[str] | None]:
    """(graph input names, every module input's name when the exporter dropped unused ones, else None)."""
    import json

    import onnx

    from .onnx import INPUTS_METADATA

    model = onnx.load(str(path), load_external_data=False)
    names = [i.name for i in model.graph.input]
    recorded = next((p.value for p in model.metadata_props if p.key == INPUTS_METADATA), None)
    return names, ([str(n) for n in json.loads(recorded)] if recorded else None)


def _onnx_feed(inputs: Any, names: list[str], all_names: list[str] | None) -> dict[str, Any]:
    tensors = _tensor_leaves(inputs)
    if all_names is not None and len(tensors) == len(all_names):
        given = dict(zip(all_names, tensors))
        tensors = [given[n] for n in names if n in given]
    if len(tensors) != len(names):
        raise ExportError(f"a calibration batch has {len(tensors)} tensors; the ONNX graph takes {len(names)} inputs "
                          f"({', '.join(names)})")
    return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors)}


def write_onnx_int8(module: Any, example: Any, calibration: list[Any], path: Path, *,
                    opset: int | None = None, input_names: tuple[str, ...] = (),
                    output_names: tuple[str, ...] = ()) -> Written:
    """Static int8 ONNX (QDQ) of `module`, calibrated on `calibration`; see the module docstring."""
    _check(calibration)
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
    from ..dynamic import dynamic_batch
    from ._graph import exporting
    from .onnx import write as write_fp32

    # The graph's names are the run's (--input-names/--output-names, else the defaults the fp32 ONNX gets).
    ctx = ExportContext(target=module, state_dict={}, example=example, opset=opset,
                        dynamic=dynamic_batch(module, example), input_names=tuple(input_names), output_names=tuple(output_names))
    path = Path(path)
    with _WorkDir(path) as work:
        fp32 = work / "fp32" / "model.onnx"
        fp32.parent.mkdir()
        written = write_fp32(ctx, fp32)
        fp32_bytes = _sizes(fp32)
        names, all_names = _onnx_input_names(fp32)
        feeds = [_onnx_feed(b, names, all_names) for b in calibration]

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.it: Iterator[dict[str, Any]] = iter(feeds)

            def get_next(self) -> dict[str, Any] | None:
                return next(self.it, None)

            def rewind(self) -> None:
                self.it = iter(feeds)

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
    int8_bytes = _sizes(path)
    info = _info(
        "onnxruntime.quantization.quantize_static (QDQ; per-channel int8 weights, 7-bit; uint8 activations, "
        "MinMax calibration)", calibration, fp32_bytes, int8_bytes, opset=written.info.get("opset"),
        inputs=written.info.get("inputs"), outputs=written.info.get("outputs"),
    )
    notes.append(f"static int8: {int8_bytes:,} bytes, {info['size_ratio']:.2f}x the fp32 ONNX ({fp32_bytes:,} "
                 f"bytes), calibrated on {info['calibration_samples']} samples")
    return Written(f"{written.exporter} + onnxruntime.quantization.quantize_static", notes, info)


# ----------------------------------------------------------------------------------------------------------------
# ExecuTorch: PT2E with the XNNPACK quantizer, lowered to XNNPACK
# ----------------------------------------------------------------------------------------------------------------


def _same_shapes(a: Any, b: Any) -> bool:
    ta, tb = _tensor_leaves(a), _tensor_leaves(b)
    return len(ta) == len(tb) and all(tuple(x.shape) == tuple(y.shape) for x, y in zip(ta, tb))


def write_executorch_int8(module: Any, example: Any, calibration: list[Any], path: Path) -> Written:
    """Static int8 ExecuTorch program (.pte) of `module`, XNNPACK-delegated, calibrated on `calibration`. The
    program takes the example's shapes; calibration batches may have other batch sizes."""
    _check(calibration)
    import torch

    from ._graph import dynamic_shapes_for, exporting
    from .executorch import delegation_counts, require_executorch

    et_version = require_executorch()
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise ExportError(f"static int8 for executorch needs executorch's XNNPACK quantizer and torchao ({e})") from e

    ctx = ExportContext(target=module, state_dict={}, example=example)
    ex = example
    path = Path(path)
    fp32_bytes = 0
    with exporting(ctx):
        try:
            # The fp32 program of the same module, for the size ratio.
            program = torch.export.export(module, ex.args, ex.kwargs or None, strict=False)
            fp32_edge = to_edge_transform_and_lower(
                program, partitioner=[XnnpackPartitioner()],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
            fp32_bytes = len(fp32_edge.to_executorch().buffer)
            del fp32_edge
            # Captured with a dynamic batch when calibration batches differ from the example's shapes: the
            # captured module enforces its shapes.
            dynamic = None
            if not all(_same_shapes(b, ex) for b in calibration):
                dynamic = dynamic_shapes_for(module, ex.args, ex.kwargs)
            captured = torch.export.export(module, ex.args, ex.kwargs or None, dynamic_shapes=dynamic,
                                           strict=False).module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(captured, quantizer)
            for b in calibration:
                prepared(*b.args, **b.kwargs)
            converted = convert_pt2e(prepared)
            qprogram = torch.export.export(converted, ex.args, ex.kwargs or None, strict=False)
            edge = to_edge_transform_and_lower(
                qprogram, partitioner=[XnnpackPartitioner()],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
            delegated, total = delegation_counts(edge)
            et_program = edge.to_executorch()
            with open(path, "wb") as f:
                et_program.write_to_file(f)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"static int8 ExecuTorch export failed: {describe_exception(e)}") from e
    int8_bytes = _sizes(path)
    info = _info(
        "torchao PT2E + executorch XNNPACKQuantizer (symmetric int8, per-channel weights; prepare_pt2e, "
        "calibration, convert_pt2e), lowered to XNNPACK", calibration, fp32_bytes, int8_bytes,
        backend="xnnpack", executorch=et_version, ops_delegated=delegated, ops_total=total,
        input_shapes=[list(t.shape) for t in _tensor_leaves(ex)],
    )
    notes = [f"static int8: {int8_bytes:,} bytes, {info['size_ratio']:.2f}x the fp32 program ({fp32_bytes:,} "
             f"bytes), calibrated on {info['calibration_samples']} samples"]
    if total and delegated < total:
        notes.append(f"{total - delegated} of {total} ops are not delegated to XNNPACK and run on portable kernels")
    return Written("torch.export + PT2E (XNNPACKQuantizer) + executorch.exir (xnnpack)", notes, info)


# ----------------------------------------------------------------------------------------------------------------
# OpenVINO: NNCF quantize
# ----------------------------------------------------------------------------------------------------------------


def require_openvino() -> tuple[str, str]:
    """(openvino version, nncf version); ExportError naming the extra when either is missing."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise ExportError(f"static int8 for openvino needs openvino and nncf ({e})", hint=OPENVINO_HINT) from e
    return str(ov.__version__), str(nncf.__version__)


def _ov_example(example: Any) -> Any:
    tensors = _tensor_leaves(example)
    if example.kwargs or len(tensors) != len(example.args):
        raise ExportError("static int8 for openvino takes modules whose forward takes tensors as positional "
                          "arguments (keyword or nested inputs are not supported here yet)")
    return tuple(example.args) if len(example.args) > 1 else example.args[0]


def write_openvino_int8(module: Any, example: Any, calibration: list[Any], path: Path) -> Written:
    """Static int8 OpenVINO IR (`path` .xml + its .bin beside it) of `module`, quantized by NNCF on
    `calibration` (every batch)."""
    _check(calibration)
    ov_version, nncf_version = require_openvino()
    import nncf
    import openvino as ov

    from ._graph import exporting

    ctx = ExportContext(target=module, state_dict={}, example=example)
    path = Path(path)
    feeds = [tuple(t.detach().cpu().contiguous().numpy() for t in _tensor_leaves(b)) for b in calibration]
    with exporting(ctx), _WorkDir(path) as work:
        try:
            ov_model = ov.convert_model(module, example_input=_ov_example(example))
            fp32 = work / "fp32.xml"
            ov.save_model(ov_model, str(fp32), compress_to_fp16=False)
            fp32_bytes = fp32.stat().st_size + fp32.with_suffix(".bin").stat().st_size
            quantized = nncf.quantize(ov_model, nncf.Dataset(feeds), subset_size=len(feeds))
            ov.save_model(quantized, str(path), compress_to_fp16=False)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"static int8 OpenVINO export failed: {describe_exception(e)}") from e
    int8_bytes = _sizes(path)
    info = _info(
        "nncf.quantize (OpenVINO IR; symmetric int8 weights per channel, int8 activations)", calibration,
        fp32_bytes, int8_bytes, openvino=ov_version, nncf=nncf_version,
    )
    notes = [f"static int8: {int8_bytes:,} bytes (.xml + .bin), {info['size_ratio']:.2f}x the fp32 IR "
             f"({fp32_bytes:,} bytes), calibrated on {info['calibration_samples']} samples"]
    return Written("openvino.convert_model + nncf.quantize", notes, info)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------

WRITERS = {
    "onnx": write_onnx_int8,
    "executorch": write_executorch_int8,
    "openvino": write_openvino_int8,
}
SUFFIXES = {"onnx": ".onnx", "executorch": ".pte", "openvino": ".xml"}


def _refuse(format_name: str) -> UsageError:
    if format_name == "tflite":
        return UsageError(
            "--quantize int8 is not supported for tflite: litert-torch's quantizer path (PT2E with its own "
            "quantizer, calibrated and converted before lowering) is not wired into lexport",
            hint=f"--quantize int8 applies to {', '.join(INT8_FORMATS)}; export tflite without --quantize (fp32: "
            "LiteRT's CPU kernels compute in float32).",
        )
    return UsageError(
        f"--quantize int8 applies to {', '.join(INT8_FORMATS)}, not {format_name}",
        hint="Weights formats (state-dict, safetensors) store the checkpoint's tensors as they are; the other graph "
        "formats have no static int8 writer here.",
    )


def write_int8(format_name: str, module: Any, example: Any, calibration: list[Any], path: Path,
               **options: Any) -> Written:
    """The static int8 writer of `format_name` (`options`: the format's own, e.g. ONNX's opset and names);
    UsageError for a format without one."""
    writer = WRITERS.get(format_name)
    if writer is None:
        raise _refuse(format_name)
    return writer(module, example, calibration, Path(path), **options)


def load_int8(format_name: str, path: Path) -> Any:
    """A callable running the artifact in its own runtime, called like the module: the format's own loader (an
    int8 program loads as its fp32 one does; OpenVINO compiled for CPU with f32 inference precision)."""
    from . import REGISTRY

    if format_name not in WRITERS:
        raise UsageError(f"no int8 runner for {format_name}")
    return REGISTRY[format_name].load(Path(path))


# ----------------------------------------------------------------------------------------------------------------
# As a Format wrapper (how --precision and --quantize int8-dynamic reach the pipeline)
# ----------------------------------------------------------------------------------------------------------------

# Output tolerances are not the gate for static int8: agreement is (agreement.py). Measured on the fixture conv net
# (fixtures/int8_data.py, logits up to 22, 1000 held-out samples): mean abs drift 0.03-0.05, max abs drift 3.7
# (onnx, executorch) and 0.47 (openvino), while top-1 agreement stays >= 99.7%. An elementwise bound tight enough
# to mean anything would fail good artifacts; this one only catches a graph that is wrong everywhere.
INT8_TOLERANCE = (5.0, 0.5)


def check_int8_request(format_names: list[str], has_data: bool) -> None:
    """UsageError (exit 2) for `--quantize int8` without `--data`, or with a format that has no int8 writer."""
    if not has_data:
        raise UsageError(
            "--quantize int8 is static quantization: its activation ranges are calibrated on real batches; pass "
            "--data FILE.pt (a list of batches) or --data config (the data: section of --config)",
            hint="--quantize int8-dynamic (onnx) needs no data.",
        )
    for name in format_names:
        if name not in WRITERS:
            raise _refuse(name)
    if "openvino" in format_names:
        require_installed(require_openvino)  # nncf, OpenVINO's quantizer: exit 2 before any slow work


def with_int8(fmt: Any) -> Any:
    """`fmt` writing static int8: `write(ctx, path)` calls the format's int8 writer with ctx.target, ctx.example
    and `ctx.calibration` (a list of inputs.Inputs the pipeline sets on the context); `load` stays the format's
    own (its runtime)."""
    import dataclasses

    if fmt.name not in WRITERS:
        raise _refuse(fmt.name)

    def write(ctx: ExportContext, path: Path) -> Written:
        options = ({"opset": ctx.opset, "input_names": ctx.input_names, "output_names": ctx.output_names}
                   if fmt.name == "onnx" else {})
        return write_int8(fmt.name, ctx.target, ctx.example, list(getattr(ctx, "calibration", None) or []), path,
                          **options)

    extra: dict[str, Any] = {}
    inner_estimate = getattr(fmt, "size_estimate", None)
    if inner_estimate is not None:
        # At the peak the directory holds the fp32 artifact, a pre-processed copy and the int8 artifact.
        extra["size_estimate"] = lambda ctx: 3 * inner_estimate(ctx)
    atol, rtol = INT8_TOLERANCE
    return dataclasses.replace(
        fmt, write=write, atol=max(fmt.atol, atol), rtol=max(fmt.rtol, rtol),
        description=f"{fmt.description}, static int8 (calibrated on --data)", **extra,
    )
