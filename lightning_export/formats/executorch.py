"""`executorch`: torch.export → executorch.exir.to_edge_transform_and_lower → `.pte`, run by `executorch.runtime`.

The program is delegated to XNNPACK by default (CPU kernels for arm64 and x86-64 devices); `--executorch-backend
portable` lowers nothing and runs every op on ExecuTorch's portable kernels. Shapes are the example's (static), or
with `--dynamic` bounded: ExecuTorch plans memory for the largest size, so every dynamic dim needs a MAX (`DIM:MIN..MAX`),
else DEFAULT_MAX_FACTOR times the example's size; `info.dynamic_dims` says which.
executorch is an optional extra: `pip install lightning-export[executorch]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dynamic import dynamic_batch
from ..errors import ExportError, UsageError, describe_exception
from . import (
    PRECISIONS,
    DynamicSupport,
    ExportContext,
    Format,
    Quantization,
    Written,
    module_bytes,
    option,
    register,
    require_installed,
)
from ._containers import plain_outputs, report
from ._graph import captured_stdout, check_program_dims, dynamic_info, dynamic_shapes_for, exporting
from ._int8 import INT8_TOLERANCE, artifact_bytes, counted, int8_info, require_calibration, same_shapes, tensor_leaves

BACKENDS = ("xnnpack", "portable")
DEFAULT_BACKEND = "xnnpack"
# A dynamic dim without MAX is bounded at this many times the example's size (memory is planned for the bound).
DEFAULT_MAX_FACTOR = 4
SUPPORT = DynamicSupport(default_max_factor=DEFAULT_MAX_FACTOR)


@dataclass(frozen=True)
class ExecuTorchOptions:
    executorch_backend: str = option(DEFAULT_BACKEND)  # xnnpack | portable


INSTALL_HINT = "Install it with: pip install 'lightning-export[executorch]' (or pip install executorch)."


def _require_executorch() -> str:
    try:
        with captured_stdout(stderr=True):  # its import logs native-library probing (torchao) on fd 2
            import executorch.exir  # noqa: F401
            from executorch import version
    except ImportError as e:
        raise ExportError(
            f"--to executorch needs the executorch package, which is not installed ({e.msg})", hint=INSTALL_HINT
        ) from e
    return str(getattr(version, "__version__", "?"))


def backend_of(ctx: ExportContext) -> str:
    backend = ctx.options_as(ExecuTorchOptions).executorch_backend.strip().lower()
    if backend not in BACKENDS:
        raise UsageError(f"--executorch-backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def write(ctx: ExportContext, path: Path) -> Written:
    import torch

    backend = backend_of(ctx)
    et_version = _require_executorch()
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    partitioners: list[Any] = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners = [XnnpackPartitioner()]
    ex = ctx.inputs()
    with exporting(ctx):
        with plain_outputs(ctx.target) as converted:
            dynamic = SUPPORT.applied(ctx.dynamic)
            program = torch.export.export(ctx.module(), ex.args, ex.kwargs or None,
                                          dynamic_shapes=dynamic_shapes_for(ctx, dynamic), strict=False)
        check_program_dims(program, dynamic, "executorch")
        edge = to_edge_transform_and_lower(
            program, partitioner=partitioners, compile_config=EdgeCompileConfig(_check_ir_validity=False)
        )
        delegated, total = _delegation(edge)
        et_program = edge.to_executorch()
        with open(path, "wb") as f:
            et_program.write_to_file(f)
    notes, containers = report(converted)
    if backend == "xnnpack" and total and delegated < total:
        notes.append(f"{total - delegated} of {total} ops are not delegated to XNNPACK and run on portable kernels")
    info = {
        "backend": backend,
        "executorch": et_version,
        "ops_delegated": delegated,
        "ops_total": total,
        "input_shapes": [list(t.shape) for t in ex.tensors()],
        "shapes": "static (the example's); ExecuTorch programs here take exactly these shapes" if dynamic is None
        else "the --dynamic dims up to their MAX (memory planned for it), the others static",
        **({"dynamic_dims": dynamic_info(dynamic)} if dynamic is not None else {}),
        **containers,
    }
    return Written(f"executorch.exir ({backend})", notes, info)


def _delegation(edge: Any) -> tuple[int, int]:
    """(ops inside delegate blocks, ops in the graph before lowering) — how much of the graph the backend took."""
    gm = edge.exported_program().graph_module
    lowered = [m for name, m in gm.named_children() if name.startswith("lowered_module")]
    remaining = sum(
        1 for n in gm.graph.nodes if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)
        and not str(n.target).startswith("<built-in function getitem")
    )
    inside = 0
    for m in lowered:
        original = getattr(m, "original_module", None)
        if original is not None:
            inside += sum(1 for n in original.graph.nodes if n.op == "call_function")
    return inside, inside + remaining


class ExecuTorchRunner:
    """Calls a .pte like the module: tensor leaves of (args, kwargs) in order, returns the list of outputs."""

    def __init__(self, path: Path) -> None:
        _require_executorch()
        from executorch.runtime import Runtime

        with captured_stdout(stderr=True):  # the runtime logs CPU probing on fds 1 and 2
            runtime = Runtime.get()
            self.program = runtime.load_program(str(path))
            self.method = self.program.load_method("forward")
        meta = self.method.metadata
        self.input_meta = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        import torch
        from torch.utils._pytree import tree_leaves

        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.input_meta):
            raise RuntimeError(f"the program takes {len(self.input_meta)} inputs, {len(tensors)} were given")
        feed = []
        for i, (t, m) in enumerate(zip(tensors, self.input_meta)):
            want = list(m.sizes())  # the largest shape memory was planned for (the shape, for a static program)
            if t.dim() != len(want) or any(a > b for a, b in zip(t.shape, want)):
                # The runtime would read past the buffer; say it instead.
                raise RuntimeError(f"input {i} has shape {list(t.shape)}, the program takes at most {want}")
            feed.append(t.detach().contiguous())
        return list(self.method.execute(feed))


def check(opts: ExecuTorchOptions, requested: bool) -> None:
    """The backend, and that executorch is installed, before any slow work (exit 2)."""
    if not requested:
        return
    if opts.executorch_backend.strip().lower() not in BACKENDS:
        raise UsageError(f"--executorch-backend {opts.executorch_backend!r}: use one of {', '.join(BACKENDS)}")
    require_installed(_require_executorch)


def load(path: Path) -> Any:
    return ExecuTorchRunner(path)


def size_estimate(ctx: ExportContext) -> int:
    """Weights (constant segment, or packed inside the XNNPACK blob) plus the flatbuffer program: a few kB."""
    return module_bytes(ctx.target) + module_bytes(ctx.target) // 10 + (1 << 20)


def write_int8(ctx: ExportContext, path: Path) -> Written:
    """Static int8 ExecuTorch program (.pte) of ctx.target, XNNPACK-delegated, calibrated on ctx.calibration. The
    program takes the example's shapes; calibration batches may have other batch sizes."""
    calibration = ctx.calibration
    require_calibration(calibration)
    import torch

    et_version = _require_executorch()
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

    module = ctx.module()
    ex = ctx.inputs()
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
            batch = dynamic_batch(module, ex)
            if batch is not None and not all(same_shapes(b, ex) for b in calibration):
                dynamic = dynamic_shapes_for(ctx, batch)
            captured = torch.export.export(module, ex.args, ex.kwargs or None, dynamic_shapes=dynamic,
                                           strict=False).module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            prepared = prepare_pt2e(captured, quantizer)
            for b in counted(calibration, "calibrating executorch int8"):
                prepared(*b.args, **b.kwargs)
            converted = convert_pt2e(prepared)
            qprogram = torch.export.export(converted, ex.args, ex.kwargs or None, strict=False)
            edge = to_edge_transform_and_lower(
                qprogram, partitioner=[XnnpackPartitioner()],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
            delegated, total = _delegation(edge)
            et_program = edge.to_executorch()
            with open(path, "wb") as f:
                et_program.write_to_file(f)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"static int8 ExecuTorch export failed: {describe_exception(e)}") from e
    int8_bytes = artifact_bytes(path)
    info = int8_info(
        "torchao PT2E + executorch XNNPACKQuantizer (symmetric int8, per-channel weights; prepare_pt2e, "
        "calibration, convert_pt2e), lowered to XNNPACK", calibration, fp32_bytes, int8_bytes,
        backend="xnnpack", executorch=et_version, ops_delegated=delegated, ops_total=total,
        input_shapes=[list(t.shape) for t in tensor_leaves(ex)],
    )
    notes = [f"static int8: {int8_bytes:,} bytes, {info['size_ratio']:.2f}x the fp32 program ({fp32_bytes:,} "
             f"bytes), calibrated on {info['calibration_samples']} samples"]
    if total and delegated < total:
        notes.append(f"{total - delegated} of {total} ops are not delegated to XNNPACK and run on portable kernels")
    return Written("torch.export + PT2E (XNNPACKQuantizer) + executorch.exir (xnnpack)", notes, info)


register(
    Format(
        "executorch",
        ".pte",
        "graph",
        "ExecuTorch program (.pte) for on-device runtimes, XNNPACK-delegated by default",
        write,
        load,
        aliases=("pte", "et"),
        rank=60,
        atol=1e-5,
        rtol=1e-5,
        isolate=True,  # ExecuTorch crashed on 6 of 500 bit-flipped files (make fuzz)
        dynamic=SUPPORT,
        size_estimate=size_estimate,
        sniff=lambda s: s.zip_names is None and s.head[4:6] == b"ET",  # the flatbuffer's file identifier
        options=ExecuTorchOptions,
        precisions=PRECISIONS,
        quantizations={"int8": Quantization(write_int8, calibrated=True, atol=INT8_TOLERANCE[0], rtol=INT8_TOLERANCE[1],
                                            description="static int8 (calibrated on --data)",
                                            # Measured: PT2E's converted program, lowered to XNNPACK, planned a batch
                                            # of 15 where --dynamic 0 asked for 32 (verification caught it at 17).
                                            takes_dynamic=False)},
        check=check,
    )
)
