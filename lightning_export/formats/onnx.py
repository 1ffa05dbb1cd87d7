"""`onnx`: torch.onnx's dynamo exporter first, the TorchScript-based one where it fails; run with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ExportError, describe_exception
from ..outputs import write_os_error
from . import ExportContext, Format, Written, register
from ._graph import dynamic_shapes_for, exporting, graph_estimate, tail

# protobuf's hard limit is 2 GiB; stay clear of it (graph + initializers).
EXTERNAL_DATA_ABOVE = 1_800_000_000


def _weights_bytes(module: Any) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _positional(ex: Any) -> tuple:
    """torch.onnx.export reads a trailing dict in `args` as keyword arguments; a `forward(batch: dict)` needs an
    empty kwargs dict after it so the dict stays the positional argument it is."""
    args = tuple(ex.args)
    return (*args, {}) if args and isinstance(args[-1], dict) and not ex.kwargs else args


def _dynamo(ctx: ExportContext, path: Path, external: bool) -> None:
    import torch

    ex = ctx.example
    dyn = dynamic_shapes_for(ctx.target, ex.args, ex.kwargs) if ctx.dynamic_batch else None
    program = torch.onnx.export(
        ctx.target,
        _positional(ex),
        kwargs=ex.kwargs or None,
        dynamo=True,
        external_data=external,
        opset_version=ctx.opset,
        dynamic_shapes=dyn,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("the dynamo exporter returned no program")
    program.save(str(path), external_data=external)


def _torchscript(ctx: ExportContext, path: Path) -> None:
    import torch

    ex = ctx.example
    n_inputs = len(ex.tensors())
    names = [f"input_{i}" for i in range(n_inputs)]
    args: tuple = (*ex.args, ex.kwargs) if ex.kwargs else _positional(ex)
    kwargs: dict[str, Any] = {}
    if ctx.opset is not None:
        kwargs["opset_version"] = ctx.opset
    if ctx.dynamic_batch:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
    torch.onnx.export(ctx.target, args, str(path), input_names=names, dynamo=False, **kwargs)


# The dynamo exporter writes opset >= 18 whatever is asked; older opsets come from the TorchScript-based one.
DYNAMO_MIN_OPSET = 18


def write(ctx: ExportContext, path: Path) -> Written:
    external = _weights_bytes(ctx.target) > EXTERNAL_DATA_ABOVE
    notes: list[str] = []
    errors: list[str] = []
    with exporting(ctx) as chatter:
        try:
            if ctx.opset is not None and ctx.opset < DYNAMO_MIN_OPSET:
                raise _Skip(f"opset {ctx.opset} < {DYNAMO_MIN_OPSET}")
            _dynamo(ctx, path, external)
            exporter = "torch.onnx.dynamo"
        except Exception as e:  # noqa: BLE001 - any dynamo failure: try the other exporter, keep the reason
            if write_os_error(e) is not None:  # a full disk or an I/O error: the other exporter fares no better
                raise
            errors.append(f"dynamo exporter: {describe_exception(e)}")
            for f in path.parent.iterdir():
                f.unlink()
            try:
                _torchscript(ctx, path)
                exporter = "torch.onnx.torchscript"
                reason = str(e) if isinstance(e, _Skip) else f"the dynamo exporter failed ({describe_exception(e)})"
                notes.append(f"{reason}; written by the TorchScript-based exporter")
            except Exception as e2:  # noqa: BLE001
                if write_os_error(e2) is not None:
                    raise
                errors.append(f"TorchScript-based exporter: {describe_exception(e2)}")
                detail = tail(chatter)
                raise ExportError(
                    "ONNX export failed with both exporters:\n  " + "\n  ".join(errors),
                    hint=(f"Exporter output:\n{detail}\n" if detail else "")
                    + "Set LEXPORT_DEBUG=1 for the full traceback.",
                ) from e2
    if external:
        notes.append("weights are over 1.8 GB: stored as ONNX external data beside the .onnx file")
    info = _describe(path)
    if ctx.opset is not None and info["opset"] != ctx.opset:
        raise ExportError(f"--opset {ctx.opset} was asked for, but {exporter} wrote opset {info['opset']}")
    return Written(exporter, notes, info)


class _Skip(Exception):
    """Not an error: the dynamo exporter cannot produce what was asked for."""


def _describe(path: Path) -> dict[str, Any]:
    """Opset and graph input/output names, for deployers who feed the model by name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "inputs": [i.name for i in model.graph.input],
        "outputs": [o.name for o in model.graph.output],
    }




class OrtRunner:
    """Calls an ONNX file like the module: flattens tensor inputs in order, returns the list of outputs."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        import torch
        from torch.utils._pytree import tree_flatten

        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if len(tensors) < len(self.names):
            raise RuntimeError(f"the ONNX graph takes {len(self.names)} inputs, {len(tensors)} were given")
        feed = {name: _to_numpy(t) for name, t in zip(self.names, tensors)}
        return [torch.from_numpy(o) if hasattr(o, "dtype") else o for o in self.session.run(None, feed)]


def _to_numpy(t: Any) -> Any:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        raise RuntimeError("onnxruntime's Python API cannot take bfloat16 inputs")
    return t.numpy()


def load(path: Path) -> Any:
    return OrtRunner(path)


def _sniff(s: Any) -> bool:
    """A ModelProto: its suffix, or its first field (ir_version, tag 0x08) and a parse of the header fields."""
    if s.zip_names is not None or not s.head[:1] == b"\x08":
        return False
    if s.path.suffix == ".onnx":
        return True
    import onnx

    try:
        model = onnx.load_model(str(s.path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model
        return False
    return bool(model.ir_version) and len(model.graph.node) > 0


register(
    Format(
        "onnx",
        ".onnx",
        "graph",
        "ONNX model for onnxruntime and other ONNX runtimes (one file under 2 GB)",
        write,
        load,
        atol=1e-4,
        rtol=1e-3,
        dynamic_batch=True,
        size_estimate=graph_estimate,
        sniff=_sniff,
    )
)
