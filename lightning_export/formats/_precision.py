"""Reduced precision (`--precision fp16|bf16`) and int8 quantization (`--quantize int8-dynamic`; `--quantize int8`,
static, is formats/_int8.py's `with_int8`, routed here).

Both are wrappers around a registered graph Format, so no format module and neither the pipeline nor the CLI
needs to know about them:

- `with_precision(fmt, "fp16")` returns a Format whose `write` exports the target with its floating parameters and
  buffers cast to float16 (swapped in for the export only, then the originals put back) and the floating example
  inputs cast too, so the program computes in float16 and takes and returns float16. Its `load` wraps the
  artifact's callable so that it is called like the fp32 module: floating inputs are cast to float16 on the way
  in, floating outputs back to the caller's dtype on the way out. Its atol/rtol are the precision's defaults
  (never tighter than the format's own): verification compares the artifact with the fp32 eager module.
- `with_quantization(fmt, "int8-dynamic")` (onnx only) writes the fp32 ONNX, then replaces it by
  onnxruntime.quantization.quantize_dynamic's int8 graph (int8 weights, activations quantized at run time),
  reports the fp32 size and the ratio, and verifies with the int8 default tolerance.

`apply_options(fmt, precision=..., quantize=...)` is the one call the pipeline makes per format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ExportError, UsageError
from . import ExportContext, Format, Written

# --precision values; fp32 is the default (no wrapper).
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
# int8: static, calibrated on --data (formats/_int8.py); int8-dynamic: onnx, activations quantized at run time.
QUANTIZATIONS = ("int8", "int8-dynamic")

# Default verification tolerances against the fp32 eager module, (atol, rtol); a format's own defaults win where
# looser. Measured with fixtures/targets.py (a conv net with BatchNorm, a 2-layer Transformer encoder, a 4x256 MLP;
# outputs up to ~2 in magnitude; example input + 20 random inputs, every graph format):
#   fp16 max abs drift 2e-4 (conv net) .. 2e-3 (Transformer)    unit roundoff 2^-11 = 4.9e-4
#   bf16               1e-3           .. 1.6e-2                 unit roundoff 2^-8  = 3.9e-3
#                      (3.5e-2 in ExecuTorch: XNNPACK takes no bf16, the portable kernels accumulate in bf16)
#   int8-dynamic ONNX  1.3e-3         .. 4e-2                   7-bit per-channel weights, 8-bit activations
# Each default is >= 2.5x the worst drift measured (5x for fp16 and int8), and still far below the O(1) errors
# of a wrong graph. A deeper or wider model accumulates more: --atol/--rtol override.
PRECISION_TOLERANCE = {"fp16": (1e-2, 1e-2), "bf16": (1e-1, 5e-2)}
QUANTIZE_TOLERANCE = {"int8-dynamic": (1e-1, 1e-1)}


def normalize_precision(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    key = PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise UsageError(f"--precision {value!r}: use one of {', '.join(PRECISIONS)}")
    return key


def normalize_quantize(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    if key not in QUANTIZATIONS:
        raise UsageError(f"--quantize {value!r}: use one of {', '.join(QUANTIZATIONS)}")
    return key


def torch_dtype(precision: str) -> Any:
    import torch

    return getattr(torch, PRECISIONS[precision])


def apply_options(fmt: Format, precision: str | None = None, quantize: str | None = None) -> Format:
    """The Format the pipeline uses for this run: unchanged without options; UsageError where they make no sense."""
    precision = normalize_precision(precision)
    quantize = normalize_quantize(quantize)
    if quantize and precision == "fp32":
        precision = None  # dynamic quantization starts from the fp32 graph: what fp32 asks for
    if quantize and precision:
        raise UsageError(
            f"--quantize {quantize} and --precision {precision} do not combine: quantization starts from the fp32 "
            "graph"
        )
    if precision:
        if fmt.kind != "graph":
            raise UsageError(
                f"--precision {precision} applies to graph formats; {fmt.name} stores the checkpoint's tensors as "
                "they are"
            )
        return with_fp32(fmt) if precision == "fp32" else with_precision(fmt, precision)
    if quantize == "int8":
        from ._int8 import with_int8

        return with_int8(fmt)
    if quantize:
        if fmt.name != "onnx":
            raise UsageError(f"--quantize {quantize} applies to --to onnx only, not {fmt.name}")
        return with_quantization(fmt, quantize)
    return fmt


# ----------------------------------------------------------------------------------------------------------------
# Reduced precision
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reduced(ctx: ExportContext, precision: str) -> Iterator[ExportContext]:
    """A context whose target computes in `precision`: floating parameters and buffers swapped for cast copies
    (tied weights stay tied), floating example inputs cast. The original tensors are put back afterwards, never
    re-cast, so other formats of the same run see the fp32 module bit for bit."""
    import torch
    from torch.utils._pytree import tree_map

    dtype = torch_dtype(precision)
    module = ctx.target
    cast: dict[int, Any] = {}  # id(original) -> replacement, so a tensor shared by two modules stays shared
    swapped: list[tuple[Any, str, str, Any]] = []  # (submodule, "_parameters"/"_buffers", name, original)

    def replacement(t: Any, is_param: bool) -> Any:
        if id(t) not in cast:
            data = t.detach().to(dtype)
            cast[id(t)] = torch.nn.Parameter(data, requires_grad=False) if is_param else data
        return cast[id(t)]

    try:
        for sub in module.modules():
            for slot, is_param in (("_parameters", True), ("_buffers", False)):
                store = getattr(sub, slot)
                for name, t in list(store.items()):
                    if t is not None and t.is_floating_point() and t.dtype != dtype:
                        swapped.append((sub, slot, name, t))
                        store[name] = replacement(t, is_param)

        def cast_input(x: Any) -> Any:
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        example = ctx.example
        if example is not None:
            example = dataclasses.replace(
                example, args=tree_map(cast_input, example.args), kwargs=tree_map(cast_input, example.kwargs)
            )
        new_ctx = dataclasses.replace(ctx, example=example)
        for key, value in vars(ctx).items():  # options set on the context beyond its declared fields
            if not hasattr(new_ctx, key):
                setattr(new_ctx, key, value)
        new_ctx.precision = precision
        yield new_ctx
    finally:
        for sub, slot, name, original in reversed(swapped):
            getattr(sub, slot)[name] = original


class CastInputs:
    """Calls a reduced-precision artifact like the fp32 module: floating inputs cast to the artifact's dtype, and
    floating outputs cast back to the dtype the caller's inputs had (float32 when the caller passed float32)."""

    def __init__(self, inner: Any, dtype: Any) -> None:
        self.inner = inner
        self.dtype = dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils._pytree import tree_leaves, tree_map

        given = {x.dtype for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.is_floating_point()}
        back = given.pop() if len(given) == 1 else torch.float32

        def cast_in(x: Any) -> Any:
            return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        def cast_out(x: Any) -> Any:
            return x.to(back) if isinstance(x, torch.Tensor) and x.dtype == self.dtype else x

        out = self.inner(*tree_map(cast_in, args), **tree_map(cast_in, kwargs))
        return tree_map(cast_out, out)


def precision_info(ctx: ExportContext, precision: str) -> dict[str, Any]:
    """For the JSON `info`: what computes in which dtype, and the weight bytes before and after."""
    import torch

    dtype = torch_dtype(precision)
    seen: set[int] = set()
    fp32_bytes = reduced_bytes = 0
    for t in [*ctx.target.parameters(), *ctx.target.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        fp32_bytes += t.numel() * (4 if t.is_floating_point() else t.element_size())
        reduced_bytes += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    floating_inputs = [
        x for x in (ctx.example.tensors() if ctx.example is not None else []) if isinstance(x, torch.Tensor)
    ]
    return {
        "precision": precision,
        "weights_dtype": PRECISIONS[precision],
        "inputs_dtype": PRECISIONS[precision] if any(x.is_floating_point() for x in floating_inputs) else None,
        "outputs_dtype": PRECISIONS[precision],
        "io_note": "floating inputs and outputs of the artifact are in "
        f"{PRECISIONS[precision]}; lexport casts fp32 inputs in and outputs back when verifying",
        "weights_bytes_fp32": fp32_bytes,
        "weights_bytes": reduced_bytes,
    }


def with_fp32(fmt: Format) -> Format:
    """--precision fp32 is never a silent no-op: floating parameters and buffers in another dtype (a module whose
    constructor makes fp16 tensors) compute in float32, and the note says what was cast, or that nothing was."""

    def write(ctx: ExportContext, path: Path) -> Written:
        import torch

        others = sorted({str(t.dtype).removeprefix("torch.") for t in [*ctx.target.parameters(), *ctx.target.buffers()]
                         if t.is_floating_point() and t.dtype != torch.float32})
        with reduced(ctx, "fp32") as rctx:
            written = fmt.write(rctx, path)
        written.notes.append(f"--precision fp32: parameters and buffers in {', '.join(others)} compute in float32"
                             if others else "--precision fp32: the module computes in float32 already; nothing cast")
        written.info["precision"] = "fp32"
        return written

    def load(path: Path) -> Any:
        import torch

        return CastInputs(fmt.load(path), torch.float32)

    return dataclasses.replace(fmt, write=write, load=load)


def with_precision(fmt: Format, precision: str) -> Format:
    dtype_name = PRECISIONS[precision]
    atol, rtol = PRECISION_TOLERANCE[precision]

    def write(ctx: ExportContext, path: Path) -> Written:
        with reduced(ctx, precision) as rctx:
            written = fmt.write(rctx, path)
        written.info.update(precision_info(ctx, precision))
        return written

    def load(path: Path) -> Any:
        return CastInputs(fmt.load(path), torch_dtype(precision))

    return dataclasses.replace(
        fmt,
        write=write,
        load=load,
        atol=max(fmt.atol, atol),
        rtol=max(fmt.rtol, rtol),
        description=f"{fmt.description}, {dtype_name}",
    )


# ----------------------------------------------------------------------------------------------------------------
# int8 dynamic quantization (ONNX)
# ----------------------------------------------------------------------------------------------------------------


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


def with_quantization(fmt: Format, quantize: str) -> Format:
    atol, rtol = QUANTIZE_TOLERANCE[quantize]

    def write(ctx: ExportContext, path: Path) -> Written:
        written = fmt.write(ctx, path)
        from ._graph import exporting

        with exporting(ctx):  # quiet: the quantizer logs on stdout/stderr
            written.info.update(quantize_onnx_dynamic(path))
        written.exporter = f"{written.exporter} + onnxruntime.quantization"
        written.notes.append(
            f"int8 dynamic quantization: {written.info['bytes']:,} bytes, {written.info['size_ratio']:.2f}x the "
            f"fp32 ONNX ({written.info['fp32_bytes']:,} bytes)"
        )
        return written

    extra: dict[str, Any] = {}
    inner_estimate = getattr(fmt, "size_estimate", None)
    if inner_estimate is not None:
        # At the peak the directory holds the fp32 graph, its pre-processed copy and the int8 graph.
        extra["size_estimate"] = lambda ctx: 3 * inner_estimate(ctx)
    return dataclasses.replace(
        fmt,
        write=write,
        atol=max(fmt.atol, atol),
        rtol=max(fmt.rtol, rtol),
        description=f"{fmt.description}, int8 dynamic quantization",
        **extra,
    )
