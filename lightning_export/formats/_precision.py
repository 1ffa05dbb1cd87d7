"""Reduced precision (`--precision fp32|fp16|bf16`) and quantization (`--quantize`), as wrappers around a
registered Format, driven by what the format declares (`precisions`, `quantizations`, `refusals`):

- `with_precision(fmt, "fp16")` returns a Format whose `write` exports the target with its floating parameters and
  buffers cast to float16 (swapped in for the export only, then the originals put back) and the floating example
  inputs cast too, so the program computes in float16 and takes and returns float16. Its `load` wraps the
  artifact's callable so that it is called like the fp32 module: floating inputs are cast to float16 on the way
  in, floating outputs back to the caller's dtype on the way out. Its atol/rtol are the precision's defaults
  (never tighter than the format's own): verification compares the artifact with the fp32 eager module.
- `with_quantization(fmt, name, q)` writes with the format's declared quantized writer, reports its sizes, and
  verifies with the quantization's default tolerances (static int8 is gated on top-1 agreement instead).

`for_run(fmt, precision=..., quantize=...)` is the one call the pipeline makes per format.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ._base import PRECISIONS, REGISTRY, ExportContext, Format, Quantization, Written, require_installed

# --precision values and the torch dtype each computes in; fp32 is the default (no wrapper).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

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


def normalize_precision(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    key = PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise UsageError(f"--precision {value!r}: use one of {', '.join(PRECISIONS)}")
    return key


def quantizations() -> list[str]:
    """Every --quantize value some registered format takes."""
    return list(dict.fromkeys(q for f in REGISTRY.values() for q in f.quantizations))


def normalize_quantize(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    if key not in quantizations():
        raise UsageError(f"--quantize {value!r}: use one of {', '.join(quantizations())}")
    return key


def torch_dtype(precision: str) -> Any:
    import torch

    return getattr(torch, DTYPES[precision])


def for_run(fmt: Format, precision: str | None = None, quantize: str | None = None) -> Format:
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
        if precision not in fmt.precisions:
            raise _refused(fmt, "--precision", precision)
        return with_fp32(fmt) if precision == "fp32" else with_precision(fmt, precision)
    if quantize:
        q = fmt.quantizations.get(quantize)
        if q is None:
            raise _refused(fmt, "--quantize", quantize)
        return with_quantization(fmt, quantize, q)
    return fmt


def _refused(fmt: Format, flag: str, value: str) -> UsageError:
    """A --precision or --quantize value the format does not take: its own reason when it declares one."""
    if value in fmt.refusals:
        message = fmt.refusals[value]
    elif fmt.kind == "weights":
        message = f"{flag} {value} applies to graph formats; {fmt.name} stores the checkpoint's tensors as they are"
    else:
        message = f"{flag} {value} is not supported for {fmt.name}"
    takers = [f.name for f in REGISTRY.values()
              if (value in f.precisions if flag == "--precision" else value in f.quantizations)]
    return UsageError(message, hint=f"{flag} {value} applies to {', '.join(takers)}." if takers else None)


def _takers(*, calibrated: bool) -> list[tuple[str, list[str]]]:
    """(--quantize value, the formats that take it) for the values that are (or are not) calibrated on --data."""
    out: dict[str, list[str]] = {}
    for fmt in REGISTRY.values():
        for value, q in fmt.quantizations.items():
            if q.calibrated == calibrated:
                out.setdefault(value, []).append(fmt.name)
    return list(out.items())


def check_quantize_request(formats: list[Format], quantize: str | None, has_data: bool, dynamic: bool = False) -> None:
    """UsageError (exit 2) before any slow work: a calibrated --quantize without --data, a format that does not take
    the value (or not with --dynamic), or a quantizer's optional extra that is not installed."""
    quantize = normalize_quantize(quantize)
    if quantize is None:
        return
    for fmt in formats:
        q = fmt.quantizations.get(quantize)
        if q is None:
            raise _refused(fmt, "--quantize", quantize)
        if q.calibrated and not has_data:
            uncalibrated = [f"--quantize {value} ({', '.join(names)})" for value, names in _takers(calibrated=False)]
            raise UsageError(
                f"--quantize {quantize} is static quantization: its activation ranges are calibrated on real "
                "batches; pass --data FILE.pt (a list of batches) or --data config (the data: section of --config)",
                hint=f"{' and '.join(uncalibrated)} needs no data." if uncalibrated else None,
            )
        if dynamic and not q.takes_dynamic:
            raise UsageError(
                f"--quantize {quantize} --to {fmt.name} writes a program for the example's shapes; it does not take "
                "--dynamic",
                hint="Export the int8 program without --dynamic, or the float32 one (no --quantize) with --dynamic.",
            )
        if q.require is not None:
            require_installed(q.require)


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
    module = ctx.module()
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
        yield dataclasses.replace(ctx, example=example, precision=precision)
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
    for t in [*ctx.module().parameters(), *ctx.module().buffers()]:
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
        "weights_dtype": DTYPES[precision],
        "inputs_dtype": DTYPES[precision] if any(x.is_floating_point() for x in floating_inputs) else None,
        "outputs_dtype": DTYPES[precision],
        "io_note": "floating inputs and outputs of the artifact are in "
        f"{DTYPES[precision]}; lexport casts fp32 inputs in and outputs back when verifying",
        "weights_bytes_fp32": fp32_bytes,
        "weights_bytes": reduced_bytes,
    }


def with_fp32(fmt: Format) -> Format:
    """--precision fp32 is never a silent no-op: floating parameters and buffers in another dtype (a module whose
    constructor makes fp16 tensors) compute in float32, and the note says what was cast, or that nothing was."""

    def write(ctx: ExportContext, path: Path) -> Written:
        import torch

        others = sorted({str(t.dtype).removeprefix("torch.") for t in [*ctx.module().parameters(), *ctx.module().buffers()]
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
    dtype_name = DTYPES[precision]
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




def with_quantization(fmt: Format, name: str, q: Quantization) -> Format:
    """`fmt` writing with its declared quantized writer; `load` stays the format's own (its runtime)."""
    inner_estimate = fmt.size_estimate
    return dataclasses.replace(
        fmt,
        write=q.write,
        atol=max(fmt.atol, q.atol),
        rtol=max(fmt.rtol, q.rtol),
        description=f"{fmt.description}, {q.description}",
        size_estimate=lambda ctx: q.size_factor * inner_estimate(ctx),
    )
