"""`onnx`: torch.onnx's dynamo exporter first, the TorchScript-based one where it fails; run with onnxruntime."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import (
    ExportError,
    UsageError,
    data_dependent_advice,
    describe_exception,
    is_data_dependent,
    is_data_dependent_size,
    source_pointers,
)
from ..outputs import write_os_error
from . import PRECISIONS, DynamicSupport, ExportContext, Format, Quantization, Written, module_bytes, option, register
from ._graph import (
    DimSpecialized,
    check_program_dims,
    dynamic_info,
    dynamic_shapes_for,
    exporting,
    graph_estimate,
    rnn_loops,
    tail,
)
from ._int8 import INT8_TOLERANCE
from ._onnx_quantize import DYNAMIC_TOLERANCE, INPUTS_METADATA, write_dynamic_int8, write_static_int8


@dataclass(frozen=True)
class OnnxOptions:
    """--opset; the graph's input and output names, one per tensor leaf of (args, kwargs) / of the output (empty:
    the defaults; `prepare` fills them in once the example has run)."""

    opset: int | None = option(None)
    input_names: tuple[str, ...] = option(())
    output_names: tuple[str, ...] = option(())


# protobuf's hard limit is 2 GiB; stay clear of it (graph + initializers).
EXTERNAL_DATA_ABOVE = 1_800_000_000


def _positional(ex: Any) -> tuple:
    """torch.onnx.export reads a trailing dict in `args` as keyword arguments; a `forward(batch: dict)` needs an
    empty kwargs dict after it so the dict stays the positional argument it is."""
    args = tuple(ex.args)
    return (*args, {}) if args and isinstance(args[-1], dict) and not ex.kwargs else args


def _leaf_names(value: Any, prefix: str) -> list[str]:
    """`prefix` for a tensor, `prefix_key` / `prefix_0` for the tensors inside dicts, lists and tuples (the dynamo
    exporter's own convention, e.g. `batch_x` for batch["x"]); non-tensor leaves are no graph inputs/outputs."""
    import torch

    if isinstance(value, torch.Tensor):
        return [prefix]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _leaf_names(v, f"{prefix}_{k}")]
    if isinstance(value, (tuple, list)):
        return [n for i, v in enumerate(value) for n in _leaf_names(v, f"{prefix}_{i}")]
    return []


def _unique(names: list[str]) -> list[str]:
    """Flattened names can collide (`a_b` from a["b"] and from a parameter `a_b`): number the later ones."""
    seen: set[str] = set()
    out = []
    for n in names:
        name, i = n, 1
        while name in seen:
            name, i = f"{n}_{i}", i + 1
        seen.add(name)
        out.append(name)
    return out


def default_input_names(module: Any, example: Any) -> list[str]:
    """One name per input tensor, in the graph's order: forward's parameter names, flattened."""
    import inspect

    try:
        bound = inspect.signature(module.forward).bind(*example.args, **example.kwargs).arguments
    except (TypeError, ValueError):  # no readable signature: positions
        bound = {f"input_{i}": a for i, a in enumerate(example.args)} | dict(example.kwargs)
    return _unique([n for name, value in bound.items() for n in _leaf_names(value, name)])


def default_output_names(output: Any) -> list[str]:
    """`output` for one tensor, `output_0`.. for a tuple or list, the keys for a dict (flattened below)."""
    if isinstance(output, dict):
        return _unique([n for k, v in output.items() for n in _leaf_names(v, str(k))])
    return _unique(_leaf_names(output, "output") if not isinstance(output, (tuple, list)) or len(output) != 1
                   else _leaf_names(output[0], "output"))


def parse_names(values: tuple[str, ...] | list[str]) -> list[str]:
    """`--input-names a,b` and `--input-names a --input-names b` alike."""
    return [n.strip() for v in values for n in str(v).split(",")]


def io_names(
    module: Any, example: Any, output: Any, input_names: list[str], output_names: list[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The graph's input and output names: the defaults, or the user's when they fit (else a UsageError)."""
    names = []
    for flag, given, default, what in (
        ("--input-names", input_names, default_input_names(module, example), "input tensors"),
        ("--output-names", output_names, default_output_names(output), "output tensors"),
    ):
        if not given:
            names.append(tuple(default))
            continue
        defaults = f"The defaults would be: {flag} {','.join(default)}" if default else "The graph has none."
        if len(given) != len(default):
            raise UsageError(
                f"{flag} gives {len(given)} name{'s' if len(given) != 1 else ''}; the graph has {len(default)} "
                f"{what}: one name each, in order",
                hint=defaults,
            )
        if any(not n for n in given):
            raise UsageError(f"{flag}: empty name in {','.join(given)!r}", hint=defaults)
        dup = sorted({n for n in given if given.count(n) > 1})
        if dup:
            raise UsageError(f"{flag}: {', '.join(dup)} given twice: names must be unique", hint=defaults)
        names.append(tuple(given))
    clash = set(names[0]) & set(names[1])
    if clash and not (input_names or output_names):
        return names[0], ()  # a parameter called `output`: the exporter names the outputs
    if clash:
        raise UsageError(f"{', '.join(sorted(clash))}: both an input and an output name; ONNX graph names must be "
                         "distinct")
    return names[0], names[1]


def _dynamo(ctx: ExportContext, path: Path, external: bool) -> None:
    import torch

    ex = ctx.inputs()
    opts = ctx.options_as(OnnxOptions)
    dyn = dynamic_shapes_for(ctx)
    if dyn is not None:
        _check_bounds(ctx, dyn)
    program = torch.onnx.export(
        ctx.module(),
        _positional(ex),
        kwargs=ex.kwargs or None,
        dynamo=True,
        external_data=external,
        opset_version=opts.opset,
        dynamic_shapes=dyn,
        input_names=list(opts.input_names) or None,
        output_names=list(opts.output_names) or None,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("the dynamo exporter returned no program")
    if getattr(program, "exported_program", None) is not None:
        check_program_dims(program.exported_program, ctx.dynamic, "onnx")
    program.save(str(path), external_data=external)


def _check_bounds(ctx: ExportContext, dyn: Any) -> None:
    """The bounds forward's code puts on the --dynamic dims, from torch.export's own program: the ONNX exporter's
    program has them relaxed (a table of 64 positions would give a graph that fails at 65). A dim torch.export
    fixes is left to the ONNX exporter, which keeps some that torch.export unrolls (nn.GRU's length)."""
    import torch

    ex = ctx.inputs()
    try:
        with rnn_loops(ctx.dynamic):  # as torch.onnx exports them
            program = torch.export.export(ctx.module(), ex.args, ex.kwargs or None, dynamic_shapes=dyn, strict=False)
    except Exception:  # noqa: BLE001 - the ONNX exporter reports its own failure (and falls back)
        return
    try:
        check_program_dims(program, ctx.dynamic, "onnx")
    except DimSpecialized:
        pass


def _torchscript(ctx: ExportContext, path: Path) -> None:
    import torch

    ex = ctx.inputs()
    opts = ctx.options_as(OnnxOptions)
    names = list(opts.input_names) or default_input_names(ctx.target, ex)
    args: tuple[Any, ...] = (*ex.args, ex.kwargs) if ex.kwargs else _positional(ex)
    kwargs: dict[str, Any] = {}
    if opts.opset is not None:
        kwargs["opset_version"] = opts.opset
    if ctx.dynamic is not None:
        kwargs["dynamic_axes"] = dynamic_axes(ctx.dynamic, names)
    if opts.output_names:
        kwargs["output_names"] = list(opts.output_names)
    torch.onnx.export(ctx.module(), args, str(path), input_names=names, dynamo=False, **kwargs)


def dynamic_axes(dynamic: Any, names: list[str]) -> dict[str, dict[int, str]]:
    """The TorchScript-based exporter's dynamic_axes: per input name, its --dynamic dims, named like the dynamo
    exporter's named batch ("batch" for dim 0, else dim<N>, shared by the inputs whose dims vary together)."""
    axes: dict[str, dict[int, str]] = {}
    groups = dynamic.groups()
    for group in groups:
        same_dim = [x for x in groups if x[0].dim == group[0].dim]
        axis = "batch" if group[0].dim == 0 else f"dim{group[0].dim}"
        if len(same_dim) > 1:
            axis += f"_{same_dim.index(group)}"
        for d in group:
            if d.leaf < len(names):
                axes.setdefault(names[d.leaf], {})[d.dim] = axis
    return axes


# The dynamo exporter writes opset >= 18 whatever is asked; older opsets come from the TorchScript-based one.
DYNAMO_MIN_OPSET = 18


def write(ctx: ExportContext, path: Path) -> Written:
    opts = ctx.options_as(OnnxOptions)
    external = module_bytes(ctx.target) > EXTERNAL_DATA_ABOVE
    notes: list[str] = []
    errors: list[str] = []
    traced = None  # "sizes" / "branch": the dynamo exporter refused data-dependent code, the fallback traced it
    by_trace = False  # written by the TorchScript-based exporter, which traces
    with exporting(ctx) as chatter:
        try:
            if opts.opset is not None and opts.opset < DYNAMO_MIN_OPSET:
                raise _Skip(f"opset {opts.opset} < {DYNAMO_MIN_OPSET}")
            _dynamo(ctx, path, external)
            exporter = "torch.onnx.dynamo"
        except Exception as e:  # noqa: BLE001 - any dynamo failure: try the other exporter, keep the reason
            if isinstance(e, UsageError) and not isinstance(e, DimSpecialized):
                raise  # a bound in forward's code (check_program_dims): a trace would break past it too
            if write_os_error(e) is not None:  # a full disk or an I/O error: the other exporter fares no better
                raise
            errors.append(f"dynamo exporter: {describe_exception(e)}")
            errors += [f"  at {p}" for p in source_pointers(e)]
            for f in path.parent.iterdir():
                f.unlink()
            try:
                _torchscript(ctx, path)
                exporter = "torch.onnx.torchscript"
                by_trace = True
                reason = str(e) if isinstance(e, _Skip) else f"the dynamo exporter failed ({describe_exception(e)})"
                notes.append(f"{reason}; written by the TorchScript-based exporter")
                if is_data_dependent(e):  # the graph holds the example's sizes or branch: what verification sees
                    traced = "sizes" if is_data_dependent_size(e) else "branch"
                if is_data_dependent_size(e):
                    notes.append("forward makes tensors whose size depends on the values (a boolean mask, nonzero, "
                                 "NMS-style filtering): the TorchScript-based exporter traces, so the graph holds "
                                 "the sizes and loop counts of the example input")
                elif is_data_dependent(e):
                    notes.append("forward branches on a tensor's value: the TorchScript-based exporter traces, so the "
                                 "graph holds only the branch the example input takes")
            except Exception as e2:  # noqa: BLE001
                if write_os_error(e2) is not None:
                    raise
                errors.append(f"TorchScript-based exporter: {describe_exception(e2)}")
                errors += [f"  at {p}" for p in source_pointers(e2) if f"  at {p}" not in errors]
                detail = tail(chatter)
                hints = [f"Exporter output:\n{detail}"] if detail else []
                raise ExportError(
                    "ONNX export failed with both exporters:\n  " + "\n  ".join(errors),
                    hint="\n".join(hints) or None,
                    advice=data_dependent_advice(e) or data_dependent_advice(e2),
                    debug=True,
                ) from e2
    if external:
        notes.append("weights are over 1.8 GB: stored as ONNX external data beside the .onnx file")
    info = _describe(path)
    if ctx.dynamic is not None:
        info["dynamic_dims"] = dynamic_info(ctx.dynamic)
    names = list(opts.input_names) or default_input_names(ctx.target, ctx.example)
    if info["inputs"] != names:
        # The TorchScript-based exporter drops inputs the graph does not use: record every tensor's name, so a
        # runner (OrtRunner, a deployer) knows which of the module's inputs each graph input is.
        _record_input_names(path, names)
        unused = [n for n in names if n not in info["inputs"]]
        if unused:
            notes.append(f"inputs the graph does not use were dropped by {exporter}: {', '.join(unused)}")
    if opts.opset is not None and info["opset"] != opts.opset:
        raise ExportError(f"--opset {opts.opset} was asked for, but {exporter} wrote opset {info['opset']}")
    if _has_bfloat16(ctx.target):
        _check_cpu_kernels(path)
    if traced:
        info["traced_data_dependent"] = traced  # the pipeline's advice when verification then fails
    return Written(exporter, notes, info, traced=by_trace)


def _has_bfloat16(module: Any) -> bool:
    import torch

    return any(t.dtype == torch.bfloat16 for t in [*module.parameters(), *module.buffers()])


def _check_cpu_kernels(path: Path) -> None:
    """onnxruntime has no CPU kernels for bfloat16 Add, MatMul, Gemm, Conv...: a bf16 graph it cannot even load is
    an export that cannot run here (exit 5), with the runtime's reason and what runs instead."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        text = " ".join(str(e).split())
        if "NOT_IMPLEMENTED" not in text and "bfloat16" not in text:
            return  # not about bfloat16: verification reports it as usual
        # onnxruntime's text after the code: "Could not find an implementation for Gemm(13) ..." (no CPU kernel),
        # or "Type 'tensor(bfloat16)' of input parameter (x) of operator (Conv) ... is invalid" (ONNX's own op
        # schema has no bfloat16 for that op)
        reason = re.split(r"(?:NOT_IMPLEMENTED|INVALID_GRAPH) : ", text)[-1]
        reason = reason.split("failed:", 1)[-1].strip()
        raise ExportError(
            f"onnxruntime cannot run this bfloat16 graph on the CPU: {reason}",
            hint="Use --precision fp16 for onnx (onnxruntime runs float16 on the CPU), or keep --precision bf16 "
                 "with --to exported-program, executorch or aoti, which run bfloat16 on the CPU.",
        ) from e


class _Skip(Exception):
    """Not an error: the dynamo exporter cannot produce what was asked for."""


# Metadata key holding the names of all of forward's input tensors, in order, when the graph takes fewer of them.


def _record_input_names(path: Path, names: list[str]) -> None:
    import json

    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external data stays where it is
    entry = model.metadata_props.add()
    entry.key, entry.value = INPUTS_METADATA, json.dumps(names)
    onnx.save(model, str(path))


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
        opts.log_severity_level = 4  # its errors are reported by lexport (the failed input), not on stderr
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        recorded = self.session.get_modelmeta().custom_metadata_map.get(INPUTS_METADATA)
        self.all_names: list[str] | None = None
        if recorded:
            import json

            self.all_names = [str(n) for n in json.loads(recorded)]

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        import torch
        from torch.utils._pytree import tree_flatten

        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if self.all_names is not None and len(tensors) == len(self.all_names):
            # Some inputs were dropped at export: feed the others by name.
            given = dict(zip(self.all_names, tensors))
            if all(n in given for n in self.names):
                tensors = [given[n] for n in self.names]
        # Otherwise both exporters keep the graph inputs in the order of the flattened (args, kwargs), whatever
        # their names; a count that differs would shift every later input: refuse it.
        if len(tensors) != len(self.names):
            raise RuntimeError(
                f"the ONNX graph takes {len(self.names)} inputs ({', '.join(self.names)}), {len(tensors)} tensors "
                "were given"
            )
        feed = {name: _to_numpy(t) for name, t in zip(self.names, tensors)}
        return [torch.from_numpy(o) if hasattr(o, "dtype") else o for o in self.session.run(None, feed)]


def _to_numpy(t: Any) -> Any:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        raise RuntimeError("onnxruntime's Python API cannot take bfloat16 inputs")
    return t.numpy()


MIN_OPSET = 7


def check(opts: OnnxOptions, requested: bool) -> None:
    """--opset within what this onnx supports; --input-names/--output-names only with --to onnx, no empty name
    (their count is checked once the example inputs and outputs are known, in prepare)."""
    if opts.opset is not None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opts.opset <= newest:
            raise UsageError(f"--opset {opts.opset}: this onnx supports opsets {MIN_OPSET} to {newest}")
    for flag, names in (("--input-names", parse_names(opts.input_names)),
                        ("--output-names", parse_names(opts.output_names))):
        if names and not requested:
            raise UsageError(f"{flag} names an ONNX graph's {flag[2:-6]}s: it needs --to onnx")
        if any(not n for n in names):
            raise UsageError(f"{flag} {','.join(names)!r}: a name is empty", hint="Separate names with one comma.")


def prepare(ctx: ExportContext, output: Any, opts: OnnxOptions) -> OnnxOptions:
    names = io_names(ctx.target, ctx.example, output, parse_names(opts.input_names), parse_names(opts.output_names))
    return replace(opts, input_names=names[0], output_names=names[1])


def made_with(path: Path) -> str | None:
    """--quantize int8-dynamic when the graph holds onnxruntime's integer ops, --precision fp16/bf16 when it takes
    float16/bfloat16 inputs; None when unsure."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - only a hint: a file that cannot be read has failed verification already
        return None
    if {n.op_type for n in graph.node} & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}:
        return "--quantize int8-dynamic"
    types = {i.type.tensor_type.elem_type for i in graph.input}
    found = [name for t, name in {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.items()
             if t in types]
    return f"--precision {found[0]}" if found else None


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
        dynamic=DynamicSupport(),
        size_estimate=graph_estimate,
        sniff=_sniff,
        options=OnnxOptions,
        rank=40,
        check=check,
        prepare=prepare,
        precisions=PRECISIONS,
        quantizations={
            "int8": Quantization(functools.partial(write_static_int8, write), calibrated=True, atol=INT8_TOLERANCE[0],
                                 rtol=INT8_TOLERANCE[1], description="static int8 (calibrated on --data)"),
            "int8-dynamic": Quantization(functools.partial(write_dynamic_int8, write), calibrated=False,
                                         atol=DYNAMIC_TOLERANCE[0], rtol=DYNAMIC_TOLERANCE[1],
                                         description="int8 dynamic quantization"),
        },
        made_with=made_with,
    )
)
