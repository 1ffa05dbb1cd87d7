"""`torchscript`: torch.jit.trace (default) or torch.jit.script. Deprecated upstream; `exported-program` succeeds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Advice, ExportError, UsageError, describe_exception, export_failure
from . import PRECISIONS, DynamicSupport, ExportContext, Format, Written, option, register
from ._graph import dynamic_info, exporting, graph_estimate
from ._io import save_isolated

MODES = ("trace", "script")


@dataclass(frozen=True)
class TorchScriptOptions:
    torchscript_mode: str = option("trace")  # trace | script


NOTE = "TorchScript is deprecated in torch >= 2.10; exported-program (.pt2) is its successor"


def write(ctx: ExportContext, path: Path) -> Written:
    import torch

    mode = ctx.options_as(TorchScriptOptions).torchscript_mode
    with exporting(ctx):
        if mode == "script":
            scripted = torch.jit.script(ctx.target)
            exporter = "torch.jit.script"
        else:
            ex = ctx.inputs()
            try:
                scripted = torch.jit.trace(
                    ctx.module(),
                    example_inputs=ex.args if ex.args else None,
                    example_kwarg_inputs=ex.kwargs or None,
                    check_trace=False,  # lexport's own verification runs on more inputs than the trace check
                    strict=False,  # allow list and dict outputs
                )
            except RuntimeError as e:
                if "can be output from traced functions" not in str(e):
                    raise
                plain = export_failure("torchscript export failed", e)  # the user's source line
                raise ExportError(
                    "torchscript export failed: torch.jit.trace cannot return forward's output "
                    f"({describe_exception(e)})",
                    hint=plain.hint,
                    advice=Advice.TRACE_OUTPUT,
                    debug=True,
                ) from e
            exporter = "torch.jit.trace"
        # torch.jit.save aborts the process when a write fails: it runs in a child process (see _io).
        save_isolated(lambda p: torch.jit.save(scripted, p), path)
    info: dict[str, Any] = {}
    if ctx.dynamic is not None:
        info = {"shapes": "captured at the example's shapes; verified at other sizes of the --dynamic dims",
                "dynamic_dims": dynamic_info(ctx.dynamic)}
    return Written(exporter, [NOTE], info, traced=mode != "script")


def check(opts: TorchScriptOptions, requested: bool) -> None:
    if opts.torchscript_mode not in MODES:
        raise UsageError(f"--torchscript-mode must be 'trace' or 'script', not {opts.torchscript_mode!r}")


def load(path: Path) -> Any:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")


register(
    Format(
        "torchscript",
        ".torchscript.pt",
        "graph",
        "TorchScript file for torch.jit.load / libtorch C++ (trace, or --torchscript-mode script)",
        write,
        load,
        aliases=("ts", "jit"),
        rank=30,
        atol=1e-5,
        rtol=1e-5,
        dynamic=DynamicSupport(exported=False),  # a trace takes other sizes where its ops do: verification says
        size_estimate=graph_estimate,
        sniff=lambda s: s.has_dir("/code/") and s.has_member("/constants.pkl"),
        options=TorchScriptOptions,
        precisions=PRECISIONS,
        check=check,
    )
)
