"""`lexport config`: the export options' effective defaults (settings file, profile) and where each comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from . import options as o
from .common import Steps, execute

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(
    help="Print every export option's value when `lexport CKPT` runs here: from [tool.lexport] of the nearest "
    "pyproject.toml (or --settings FILE), its --profile, or the default; and where each comes from.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def config(
    settings: Annotated[Path | None, typer.Option("--settings", metavar="FILE", help="The settings file (default: the nearest pyproject.toml with [tool.lexport]).")] = None,  # noqa: E501
    profile: Annotated[str | None, typer.Option("--profile", metavar="NAME", help="Also apply [tool.lexport.profiles.NAME].")] = None,  # noqa: E501
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
) -> None:
    def work(steps: Steps) -> Any:
        return SettingsReport(show_settings(settings, profile))

    execute(work, json_out=json_out, quiet=quiet, render=render_settings)


def show_settings(settings: Path | None, profile: str | None) -> dict[str, Any]:
    """The record `lexport CKPT` would make with no flags but these (the report's `settings`)."""
    import typer.main

    from .export import app as export_app
    from .export import lexport
    from .settings import effective

    command = typer.main.get_command(export_app)
    ctx = command.make_context("lexport", ["CHECKPOINT"], resilient_parsing=True)
    return effective(ctx, lexport, ctx.params, settings, profile).record()


class SettingsReport:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "settings": self.record}


def render_settings(stderr: Any, report: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    record = report.record
    title = f"settings: {record['file'] or 'none found'}" + (f", profile {record['profile']}" if record["profile"]
                                                            else "")
    table = Table(title=Text(title), title_justify="left")
    for col in ("option", "value", "source"):
        table.add_column(col)
    for flag, item in record["options"].items():
        value = item["value"]
        shown = ",".join(map(str, value)) if isinstance(value, list) else "-" if value is None else str(value)
        table.add_row(Text(f"--{flag}"), Text(shown), Text(item["source"]),  # values are text, never markup
                      style=None if item["source"] == "default" else "bold")
    stderr.print(table)
