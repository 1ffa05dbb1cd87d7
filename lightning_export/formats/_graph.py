"""What every graph format shares: inference mode while exporting, quiet exporters, dynamic batch specs."""

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

from ..build.importing import lightning_base
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

    module = ctx.target
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
        lm_cls._jit_is_scripting = True
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
            lm_cls._jit_is_scripting = scripting
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


def dynamic_shapes_for(module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """dim 0 of every input tensor of rank >= 1 dynamic, keyed by forward's parameter names."""
    import torch
    import torch.utils._pytree
    from torch.export import Dim
    from torch.utils._pytree import tree_map

    tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    sizes = {x.shape[0] for x in tensors if x.dim() >= 1}
    # One shared, named dim when every input has the same batch (ONNX then calls the axis "batch").
    batch = Dim("batch") if len(sizes) == 1 else Dim.DYNAMIC

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() >= 1 else None

    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: tree_map(spec, value) for name, value in bound.arguments.items()}


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
