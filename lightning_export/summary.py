"""A run's report as GitHub-flavoured markdown, for $GITHUB_STEP_SUMMARY (or --summary FILE.md): the artifacts
table, agreement and accuracy with --data, the int8 size ratio, and for a failure its message and hint. Every text
that came from outside (paths, keys, messages) is escaped: it cannot add links, HTML, rows or headings."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from .errors import LexportError, error_json
from .text import fmt_bytes

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|~:.-])")  # ':' and '.': no autolinks (http://, www.)
MAX_CELL = 300  # characters of one table cell; a path or message longer is cut (the JSON report has it whole)
MAX_BLOCK = 4000


def escape(text: Any, limit: int = MAX_CELL) -> str:
    """One line of inert text: HTML entities for <, >, &; a backslash before every markdown punctuation mark;
    line breaks as spaces."""
    s = str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    s = " ".join(s.splitlines())
    return _MARKDOWN.sub(r"\\\1", html.escape(s, quote=False))


def fenced(text: str, limit: int = MAX_BLOCK) -> str:
    """A code block whose fence is longer than any run of backticks inside: nothing in it is markdown or HTML."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


@dataclass(frozen=True)
class Failure:
    """Why a run failed, as the summary shows it: the exit code, the kind, the message and what to do, apart."""

    code: int
    kind: str
    message: str
    hint: str | None = None

    @classmethod
    def of(cls, e: BaseException) -> Failure:
        """A LexportError's own fields (its message, then its hint, advice and what the pipeline added); an
        interruption or a bug in lexport as its JSON error says it."""
        if isinstance(e, LexportError):
            return cls(e.exit_code, e.kind, e.message, e.full_hint() or None)
        error = error_json(e)
        return cls(error["code"], error["kind"], error["message"])


def _verdict(a: dict[str, Any]) -> str:
    v = a.get("verification")
    if a.get("error"):
        return f"❌ {escape(a['error'].get('kind'))} error"
    if not v:
        return "⚠️ not verified"
    if v.get("passed"):
        return f"✅ {v.get('inputs_checked')} inputs" if v.get("atol") is not None else "✅ bit-exact"
    return "❌ FAILED"


def _size(a: dict[str, Any]) -> str:
    info = a.get("info") or {}
    ratio = info.get("size_ratio")
    return fmt_bytes(a.get("bytes")) + (f" ({ratio:.2f}× fp32)" if isinstance(ratio, (int, float)) else "")


def _diff(a: dict[str, Any]) -> str:
    v = a.get("verification") or {}
    x = v.get("max_abs_diff")
    return f"{x:.2e}" if isinstance(x, (int, float)) and v.get("atol") is not None else "-"


def _pct(x: Any) -> str:
    return f"{x:.2%}" if isinstance(x, (int, float)) else "-"


def markdown(record: dict[str, Any], error: Failure | None = None, *, title: str = "lexport") -> str:
    """The summary of one run: `record` is the report's JSON (or {} when the run ended before it had one),
    `error` why it failed, when it did."""
    ok = error is None and record.get("ok", False)
    artifacts = record.get("artifacts") or []
    head = (f"✅ {len(artifacts)} artifact{'s' * (len(artifacts) != 1)} written and verified" if ok else
            f"❌ failed: {escape(error.kind if error else 'verification')} (exit {error.code if error else 1})")
    lines = [f"### {escape(title)}: {head}", ""]
    checkpoint = record.get("checkpoint") or {}
    facts = [f"checkpoint {escape(checkpoint['path'])}" if checkpoint.get("path") else None,
             f"module {escape(record['module'])}" if record.get("module") else None,
             f"attr {escape(record['attr'])}" if record.get("attr") else None]
    if any(facts):
        lines += [" · ".join(f for f in facts if f), ""]
    if artifacts:
        lines += ["| format | file | size | exporter | max abs diff | verdict |", "|---|---|---|---|---|---|"]
        for a in artifacts:
            lines.append(f"| {escape(a.get('format'))} | {escape(a['path']) if a.get('path') else '(not written)'} | {_size(a)} | "
                         f"{escape(a.get('exporter') or '-')} | {_diff(a)} | {_verdict(a)} |")
        lines.append("")
    agreed: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (a, g) for a in artifacts if (g := (a.get("verification") or {}).get("agreement"))]
    if agreed:
        data = record.get("data") or {}
        source = f" on {escape(data.get('source') or data.get('path'))}" if data.get("source") or data.get("path") \
            else ""
        lines += [f"Top-1 agreement with the eager module{source}:", "",
                  "| format | samples | agreement | accuracy | eager accuracy |", "|---|---|---|---|---|"]
        for a, g in agreed:
            lines.append(f"| {escape(a.get('format'))} | {g.get('samples', '-')} | {_pct(g.get('agreement'))} | "
                         f"{_pct(g.get('artifact_accuracy'))} | {_pct(g.get('eager_accuracy'))} |")
        lines.append("")
    if error is not None:
        lines += ["**Error**", "", fenced(error.message), ""]
        if error.hint:
            lines += ["**What to do**", "", fenced(error.hint), ""]
    for w in (record.get("warnings") or [])[:20]:
        lines.append(f"- ⚠️ {escape(w)}")
    if record.get("warnings"):
        lines.append("")
    return "\n".join(lines) + "\n"
