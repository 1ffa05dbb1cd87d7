"""Human output of an export report: the artifact table, the per-output table, notes and warnings (stderr).

Everything a report holds may come from the user's files (output keys, class names, paths, hparams, an exporter's
message): it is printed as `Text`, never parsed as rich markup; only lexport's own styling is markup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..text import fmt_bytes

if TYPE_CHECKING:
    from ..report import Report


def plain(value: object, style: str = "") -> Text:
    """Untrusted text as it is: `[/x]` or `[bold]` in it are characters, not markup."""
    return Text(str(value), style=style)


def line(*parts: tuple[object, str] | object) -> Text:
    """A line of (text, style) and plain parts, none of them parsed as markup."""
    out = Text()
    for part in parts:
        if isinstance(part, tuple):
            out.append(str(part[0]), style=part[1])
        else:
            out.append(str(part))
    return out


def _fmt_diff(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def render_report(stderr: Console, report: Report) -> None:
    if not report.artifacts:
        return
    table = Table(title="lexport", title_justify="left")
    for col in ("format", "path", "size", "exporter", "max abs diff", "verdict"):
        table.add_column(col)
    for a in report.artifacts:
        v = a.verification
        if a.error:
            verdict = plain(f"✗ {a.error.kind} error", "red")
        elif v is None:
            verdict = plain("not verified", "yellow")
        elif v.passed:
            verdict = plain(f"✓ {v.inputs_checked} inputs" if v.atol is not None else "✓ bit-exact", "green")
        else:
            verdict = plain("✗ FAILED", "red")
        table.add_row(
            plain(a.format),
            plain(a.path) if a.path else plain("(not written)", "dim"),
            plain(fmt_bytes(a.bytes) + _reduction(a.info)),
            plain(a.exporter or "-"),
            plain(_fmt_diff(v.max_abs_diff) if v and v.atol is not None else "-"),
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
                plain(a.format),
                plain(o.name),
                plain(list(o.shape)),
                plain(_fmt_diff(o.max_abs_diff)),
                plain(_fmt_diff(o.max_rel_diff)),
                plain(f"{v.atol:g} / {v.rtol:g}"),
                plain("✓", "green") if o.passed else line(("✗", "red"), f" {o.problem or ''}"),
            )
    if rows:
        stderr.print(details)
    for a in report.artifacts:
        if a.error:
            stderr.print(line((a.format, "red"), f": {a.error}"), highlight=False)
        if a.verification:
            if a.verification.agreement_text:
                stderr.print(plain(f"{a.format}: {a.verification.agreement_text}"), highlight=False)
            for p in a.verification.problems:
                stderr.print(line((a.format, "red"), f": {p}"), highlight=False)
        for n in a.notes:
            stderr.print(plain(f"{a.format}: {n}", "dim"), highlight=False)
    for n in report.notes:
        stderr.print(plain(f"note: {n}", "dim"), highlight=False)
    for w in report.warnings:
        stderr.print(line(("warning", "yellow"), f": {w}"), highlight=False)


def _reduction(info: dict[str, Any]) -> str:
    """` (0.27× fp32)` for an int8 artifact (whole files), ` (weights 0.50× fp32)` for fp16/bf16."""
    if info.get("size_ratio"):
        return f" ({info['size_ratio']:.2f}× fp32)"
    full, reduced = info.get("weights_bytes_fp32"), info.get("weights_bytes")
    if full and reduced and reduced != full:
        return f" (weights {reduced / full:.2f}× fp32)"
    return ""
