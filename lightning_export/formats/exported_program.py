"""`exported-program`: torch.export.export + torch.export.save (.pt2), TorchScript's successor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import PRECISIONS, DynamicSupport, ExportContext, Format, Written, register
from ._containers import plain_outputs, report
from ._graph import check_program_dims, dynamic_info, dynamic_shapes_for, exporting, graph_estimate, rnn_loops
from ._io import sink


def write(ctx: ExportContext, path: Path) -> Written:
    import torch

    ex = ctx.inputs()
    with exporting(ctx), plain_outputs(ctx.target) as converted, rnn_loops(ctx.dynamic):
        program = torch.export.export(ctx.module(), ex.args, ex.kwargs or None, dynamic_shapes=dynamic_shapes_for(ctx),
                                      strict=False)
        check_program_dims(program, ctx.dynamic, "exported-program")
        # Through a Python file that never fails a write: torch's writer aborts the process when one does.
        with sink(path) as f:
            torch.export.save(program, f)  # type: ignore[arg-type]  # a file-like Sink
    notes, info = report(converted)
    if ctx.dynamic is not None:
        info["dynamic_dims"] = dynamic_info(ctx.dynamic)
    return Written("torch.export", notes, info)


def load_program(path: Path) -> Any:
    """torch.export.load with nothing in the archive unpickled beyond tensors and containers: every pickle record is
    read weights-only first (a record naming anything else is refused, see safeload.pt2) and torch's own loads are
    forced weights-only."""
    import torch

    from ..safeload.pt2 import check_pickles, weights_only_forced

    check_pickles(path)
    with weights_only_forced():
        return torch.export.load(str(path))


def made_with(path: Path) -> str | None:
    """--precision fp16/bf16 when the program takes float16/bfloat16 inputs; None when unsure."""
    import torch

    try:
        program = load_program(path)
    except Exception:  # noqa: BLE001 - only a hint: a file that cannot be read has failed verification already
        return None
    types = {getattr(n.meta.get("val"), "dtype", None) for n in program.graph.nodes if n.op == "placeholder"}
    found = [name for t, name in {torch.float16: "fp16", torch.bfloat16: "bf16"}.items() if t in types]
    return f"--precision {found[0]}" if found else None


def load(path: Path) -> Any:
    return load_program(path).module()


register(
    Format(
        "exported-program",
        ".pt2",
        "graph",
        "torch.export program (.pt2) for torch.export.load, AOTInductor, ExecuTorch",
        write,
        load,
        aliases=("pt2", "exported_program", "exportedprogram", "torch.export"),
        rank=50,
        atol=1e-5,
        rtol=1e-5,
        dynamic=DynamicSupport(),
        precisions=PRECISIONS,
        size_estimate=graph_estimate,
        # A torch.export archive (models/*.json); AOTInductor packages (aotinductor/) are claimed first.
        sniff=lambda s: s.has_member("archive_format") and s.has_dir("/models/") and not s.has_dir("aotinductor"),
        sniff_order=50,
        made_with=made_with,
    )
)
