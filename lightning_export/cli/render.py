"""Human output of an export report: the artifact table, the per-output table, notes and warnings (stderr)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ..text import fmt_bytes


def _fmt_diff(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def render_report(stderr: Console, report: Any) -> None:
    if not report.artifacts:
        return
    table = Table(title="lexport", title_justify="left")
    for col in ("format", "path", "size", "exporter", "max abs diff", "verdict"):
        table.add_column(col)
    for a in report.artifacts:
        v = a.verification
        if a.error:
            verdict = f"[red]✗ {a.error.kind} error[/red]"
        elif v is None:
            verdict = "[yellow]not verified[/yellow]"
        elif v.passed:
            verdict = f"[green]✓ {v.inputs_checked} inputs[/green]" if v.atol is not None else "[green]✓ bit-exact[/green]"
        else:
            verdict = "[red]✗ FAILED[/red]"
        table.add_row(
            a.format,
            a.path or "[dim](not written)[/dim]",
            fmt_bytes(a.bytes) + _reduction(a.info),
            a.exporter or "-",
            _fmt_diff(v.max_abs_diff) if v and v.atol is not None else "-",
            verdict,
        )
    stderr.print(table)
    details = Table(title="outputs", title_justify="left")
    for col in ("format", "output", "shape", "max abs diff", "max rel diff", "atol / rtol", "verdict"):
        details.add_column(col)
    rows = 0
    for a in report.artifacts:
        v = a.verification
        if v is None:
            continue
        for o in v.outputs:
            rows += 1
            details.add_row(
                a.format,
                o.name,
                str(list(o.shape)),
                _fmt_diff(o.max_abs_diff),
                _fmt_diff(o.max_rel_diff),
                f"{v.atol:g} / {v.rtol:g}",
                "[green]✓[/green]" if o.passed else f"[red]✗[/red] {o.problem or ''}",
            )
    if rows:
        stderr.print(details)
    for a in report.artifacts:
        if a.error:
            stderr.print(f"[red]{a.format}[/red]: {a.error}", markup=True, highlight=False)
        if a.verification:
            if a.verification.agreement_text:
                stderr.print(f"{a.format}: {a.verification.agreement_text}", markup=False, highlight=False)
            for p in a.verification.problems:
                stderr.print(f"[red]{a.format}[/red]: {p}")
        for n in a.notes:
            stderr.print(f"[dim]{a.format}: {n}[/dim]")
    for n in report.notes:
        stderr.print(f"[dim]note: {n}[/dim]")
    for w in report.warnings:
        stderr.print(f"[yellow]warning[/yellow]: {w}")


def _reduction(info: dict[str, Any]) -> str:
    """` (0.27× fp32)` for an int8 artifact (whole files), ` (weights 0.50× fp32)` for fp16/bf16."""
    if info.get("size_ratio"):
        return f" ({info['size_ratio']:.2f}× fp32)"
    full, reduced = info.get("weights_bytes_fp32"), info.get("weights_bytes")
    if full and reduced and reduced != full:
        return f" (weights {reduced / full:.2f}× fp32)"
    return ""
