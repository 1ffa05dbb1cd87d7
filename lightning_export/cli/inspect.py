"""`lexport inspect CKPT`: what a checkpoint holds (no user code imported, tensor data not read)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..safeload.archive import DEFAULT_MAX_GROWTH
from ..text import fmt_bytes
from . import options as o
from .common import Steps, execute

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


class Inspection:
    """The result of `inspect`, shaped like an export Report for `execute`: to_json() is the --json output."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, **self.summary}


@app.command(
    help="Show what a checkpoint holds: Lightning version, epoch, step, hparams, the submodules of its state dict "
    "(candidates for --attr) and the bytes that are not weights. Imports no user code; reads metadata, not tensor "
    "data.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def inspect(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Lightning .ckpt file, or a file holding a plain state dict.", show_default=False)],  # noqa: E501
    depth: Annotated[int, typer.Option(metavar="N", min=1, max=64, help="Submodule levels shown in the table (--json has all).")] = 2,  # noqa: E501
    allow_global: o.AllowGlobal = [],  # noqa: B006
    trust_checkpoint: o.TrustCheckpoint = False,
    max_growth: o.MaxGrowth = DEFAULT_MAX_GROWTH,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")] = False,  # noqa: E501
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")] = False,
) -> None:
    def work(steps: Steps) -> Inspection:
        from ..pipeline.inspection import inspect_checkpoint

        with steps.step("reading checkpoint metadata"):
            return Inspection(inspect_checkpoint(checkpoint, allow_globals=tuple(allow_global),
                                                 trust=trust_checkpoint, max_growth=max_growth))

    def render(stderr: Console, result: Inspection) -> None:
        _render(stderr, result.summary, depth)

    execute(work, json_out=json_out, quiet=quiet, render=render)


def _render(stderr: Console, s: dict[str, Any], depth: int) -> None:
    from ..pipeline.inspection import describe

    for line in describe(s):
        stderr.print(line, markup=False, highlight=False)
    table = Table(title="state dict (candidates for --attr)", title_justify="left")
    for col in ("path", "tensors", "elements", "size", "dtypes"):
        table.add_column(col, justify="right" if col in ("tensors", "elements", "size") else "left")
    w = s["weights"]
    table.add_row(*map(Text, ("(all)", str(w["tensors"]), f"{w['elements']:,}", fmt_bytes(w["bytes"]),
                              _dtypes(w["dtypes"]))))
    hidden = 0
    for n in s["submodules"]:
        if n["path"].count(".") >= depth:
            hidden += 1
            continue
        # Key names come from the checkpoint: Text, never markup.
        table.add_row(*map(Text, (n["path"], str(n["tensors"]), f"{n['elements']:,}", fmt_bytes(n["bytes"]),
                                  _dtypes(n["dtypes"]))))
    stderr.print(table)
    if hidden:
        stderr.print(f"[dim]{hidden} deeper submodules not shown (--depth N, or --json for all)[/dim]")
    if s["not_weights"]:
        parts = ", ".join(f"{k} {fmt_bytes(v['bytes'])}" for k, v in s["not_weights"].items())
        stderr.print(f"not weights (never read by an export): {parts}", markup=False)
    stderr.print(f"suggested: {s['suggestion']}", markup=False, highlight=False)


def _dtypes(d: dict[str, int]) -> str:
    return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in d.items())
