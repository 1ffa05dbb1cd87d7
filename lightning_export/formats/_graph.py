"""What every graph format shares: inference mode while exporting, quiet exporters, dynamic shapes."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

from ..construct.importing import lightning_base
from ..errors import UsageError
from ._base import ExportContext, storage_bytes


@contextlib.contextmanager
def captured_stdout(stderr: bool = False) -> Iterator[list[str]]:
    """Send fd 1 (Python prints and C++ writes alike) to a temp file; the text lands in the yielded list.

    Exporters print progress on stdout, and stdout belongs to --json. With `stderr`, fd 2 too: for native
    libraries that log on import (torchao, cpuinfo) while lexport's own messages are not being written.
    """
    out: list[str] = []
    fds = (1, 2) if stderr else (1,)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    with tempfile.TemporaryFile(mode="w+b") as tmp, open(os.devnull, "w") as devnull:
        for fd in fds:
            os.dup2(tmp.fileno(), fd)
        try:
            with contextlib.redirect_stdout(devnull):
                yield out
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip(fds, saved):
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


@contextlib.contextmanager
def exporting(ctx: ExportContext) -> Iterator[list[str]]:
    """Eval mode, no_grad, no MHA fast path, Lightning's trainer check off, exporter chatter captured."""
    import torch

    module = ctx.module()
    was_training = module.training
    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # The fused transformer fast path (aten::_transformer_encoder_layer_fwd) cannot be exported by the
    # TorchScript-based ONNX exporter; the unfused path computes the same thing.
    torch.backends.mha.set_fastpath_enabled(False)
    # Tracing a LightningModule touches its `trainer` property, which raises without a Trainer; this is
    # the switch Lightning's own to_torchscript uses.
    lm_cls = lightning_base(type(module))
    scripting = getattr(lm_cls, "_jit_is_scripting", None) if lm_cls else None
    if lm_cls is not None:
        lm_cls._jit_is_scripting = True  # type: ignore[attr-defined]
    err = io.StringIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_torch_logs(), captured_stdout() as chatter:
            warnings.simplefilter("ignore")
            # torch.export prints whole FX graphs to sys.stderr when it fails; keep them for the error text.
            with contextlib.redirect_stderr(err):
                yield chatter
            chatter.append(err.getvalue())
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if lm_cls is not None:
            lm_cls._jit_is_scripting = scripting  # type: ignore[attr-defined]
        module.train(was_training)


@contextlib.contextmanager
def quiet_torch_logs() -> Iterator[None]:
    """torch's exporters log warnings and whole FX graphs on stderr when they fail; the error says enough."""
    import logging

    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith(("torch.", "onnxscript")))]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def dynamic_shapes_for(ctx: ExportContext, dynamic: Any = None) -> dict[str, Any] | None:
    """torch.export's dynamic_shapes for --dynamic (None without it), keyed by forward's parameter names.

    Dims are Dim.AUTO: torch.export finds the dims the model ties together (input_ids and attention_mask share their
    length) and may specialize one, which check_program_dims then reports. Dim 0 of every input, unbounded and of
    one size and one range, is the named Dim "batch" (ONNX names the axis after it), from 1 (or its MIN). `dynamic` overrides ctx.dynamic (bounds).
    """
    import torch
    from torch.export import Dim
    from torch.utils._pytree import tree_map

    dynamic = dynamic if dynamic is not None else ctx.dynamic
    if dynamic is None:
        return None
    ex = ctx.inputs()
    position = {id(t): i for i, t in enumerate(ex.tensors())}
    batch = [d for d in dynamic.dims if d.dim == 0]
    ranked = [t for t in ex.tensors() if t.dim() >= 1]
    named_batch = (len(batch) == len(ranked) and len({d.size for d in batch}) == 1
                   and len({(d.min, d.max) for d in batch}) == 1)
    # A named Dim may start at 1 (Dim.AUTO's range starts at 2, which AOTInductor's input checks enforce).
    shared = Dim("batch", min=batch[0].min if batch[0].min is not None else 1, max=batch[0].max) if named_batch \
        else None

    def hint(d: Any) -> Any:
        if d.dim == 0 and shared is not None:
            return shared
        if d.min is None and d.max is None:
            return Dim.AUTO
        return Dim.AUTO(min=d.min, max=d.max)

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or id(x) not in position:
            return None
        dims = {d.dim: hint(d) for d in dynamic.of_leaf(position[id(x)])}
        return dims or None

    bound = inspect.signature(ctx.module().forward).bind(*ex.args, **ex.kwargs)
    return {name: tree_map(spec, value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def rnn_loops(dynamic: Any) -> Iterator[None]:
    """nn.GRU and nn.LSTM as a while_loop instead of unrolled over the example's length, when --dynamic is given:
    torch.export otherwise fixes their sequence length (torch.onnx does the same for its own export)."""
    try:
        from torch.export._patches import register_gru_while_loop_decomposition, register_lstm_while_loop_decomposition
    except ImportError:  # an older torch: the dim is reported as fixed
        dynamic = None
    if dynamic is None:
        yield
        return
    import torch

    ops = (torch.ops.aten.lstm.input, torch.ops.aten.gru.input)

    def forget() -> None:  # an op dispatched before (the eager reference runs) cached its kernel: drop it
        for op in ops:
            getattr(op, "_dispatch_cache", {}).clear()

    with register_lstm_while_loop_decomposition(), register_gru_while_loop_decomposition():
        forget()
        try:
            yield
        finally:
            forget()
    forget()


class DimSpecialized(UsageError):
    """torch.export fixed a dim --dynamic asked for (a trace-based exporter may still keep it dynamic)."""


def check_program_dims(program: Any, dynamic: Any, what: str, also: str | None = None) -> None:
    """Every dim --dynamic asked for is dynamic in the exported program, over the whole range asked for: a dim the
    code fixes (a reshape to a literal, an RNN unrolled over its length) or bounds (a position table of 64 rows
    indexed by x.size(1)) is a usage error naming the flag that works, never an artifact that breaks elsewhere."""
    if dynamic is None:
        return
    from torch.export.graph_signature import InputKind

    specs = program.graph_signature.input_specs
    user = [s.arg.name for s in specs if s.kind == InputKind.USER_INPUT and hasattr(s.arg, "name")]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    # One per tensor leaf of (args, kwargs), in order (non-tensor user inputs have no shape).
    shapes = [v.shape for v in (nodes[n].meta.get("val") for n in user if n in nodes) if hasattr(v, "shape")]
    for d in dynamic.dims:
        if d.leaf >= len(shapes) or d.dim >= len(shapes[d.leaf]):
            continue
        size = shapes[d.leaf][d.dim]
        expr = getattr(getattr(size, "node", None), "expr", None)
        bounds = program.range_constraints.get(expr)
        upper = _finite(getattr(bounds, "upper", None))
        if getattr(expr, "is_number", False) or (upper is not None and upper == _finite(bounds.lower)):
            size = int(expr) if getattr(expr, "is_number", False) else upper  # type: ignore[arg-type]
        if isinstance(size, int):  # specialized (a SymInt may hold a constant, or a range of one value)
            raise DimSpecialized(
                f"{what}: {d.label()} cannot be dynamic: torch.export fixed it to {size} (forward's code needs that "
                "size: a reshape or view to a literal, a table of that many rows, an RNN that torch.export unrolls "
                "over the sequence)",
                hint=f"Export with that dim static: {dynamic.flag_with(d, None)}" + (f"; {also}" if also else ""),
            )
        if upper is None:
            continue
        if d.max is None or upper < d.max:
            from ..dynamic import DimRange

            asked = f"up to {d.max}" if d.max is not None else "without an upper bound"
            raise UsageError(
                f"{what}: {d.label()} was asked dynamic {asked}, but forward only works up to {upper} (torch.export "
                f"found the bound in its code: e.g. a table of {upper} rows indexed by the size)",
                hint=f"Pass the bound: {dynamic.flag_with(d, DimRange(d.dim, d.min if d.min is not None else 1, upper))}",
            )


def _finite(x: Any) -> int | None:
    """A sympy bound as an int; None for infinity (int_oo has no int())."""
    if x is None or getattr(x, "is_finite", True) is False:
        return None
    try:
        value = int(x)
    except Exception:  # noqa: BLE001 - sympy's infinities raise AttributeError, TypeError...
        return None
    return value if abs(value) < (1 << 62) else None


def dynamic_info(dynamic: Any) -> list[dict[str, Any]]:
    """The dynamic dims for an artifact's `info`: input, dim, the example's size, bounds and where MAX came from."""
    if dynamic is None:
        return []
    return [{"input": d.input, "dim": d.dim, "example": d.size, "min": d.min, "max": d.max,
             **({"max_from": "default"} if d.max_default else {})} for d in dynamic.dims]


def graph_estimate(ctx: ExportContext) -> int:
    """A graph format embeds the module's parameters and buffers (the state dict's tensors, and non-persistent
    buffers too) plus the program: code or graph per tensor and per op, zip headers. Measured on torch 2.13:
    weights + 2-15 kB for small modules; the margin here is 1% + 4 kB per tensor + 1 MB."""
    from ..statedict import tensor_specs

    tensors: list[Any] = list(tensor_specs(ctx.state_dict).values())
    nbytes, count = storage_bytes(tensors)
    if ctx.target is not None:
        mod_bytes, mod_count = storage_bytes([*ctx.target.parameters(), *ctx.target.buffers()])
        nbytes, count = max(nbytes, mod_bytes), max(count, mod_count)
    return nbytes + nbytes // 100 + 4096 * count + (1 << 20)


def tail(chatter: list[str], lines: int = 8) -> str:
    text = "".join(chatter).strip().splitlines()
    return "\n".join(text[-lines:])


def submodule_flags(module: Any, attr: str | None, depth: int = 2, limit: int = 6) -> list[str]:
    """`--attr NAME (Class)` for the submodules holding parameters, two levels deep: the parts a user can export
    instead of the whole (a detector's backbone and heads, without the post-processing)."""
    out: list[str] = []

    def walk(m: Any, prefix: str, level: int) -> None:
        for name, child in m.named_children():
            if len(out) >= limit or next(child.parameters(), None) is None:
                continue
            out.append(f"--attr {prefix}{name} ({type(child).__name__})")
            if level > 1:
                walk(child, f"{prefix}{name}.", level - 1)

    if module is not None and hasattr(module, "named_children"):
        walk(module, f"{attr}." if attr else "", depth)
    return out
