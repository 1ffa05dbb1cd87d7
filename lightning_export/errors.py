"""Typed errors; each carries the exit code the CLI returns for it."""

from __future__ import annotations

import enum
import struct
import zipfile
import zlib
from typing import Any


class Advice(enum.Enum):
    """Advice an error carries as data: what kind of failure it is, so the pipeline adds what it knows (the
    submodules to export instead, what the run's other formats did) without reading the message. The value is the
    text said to the user."""

    DATA_DEPENDENT_BRANCH = "data-dependent-branch"
    DATA_DEPENDENT_SIZE = "data-dependent-size"
    TRACE_OUTPUT = "trace-output"
    MAX_GROWTH = "max-growth"

    @property
    def text(self) -> str:
        return ADVICE_TEXT[self]


# What Python's zipfile raises on a malformed archive, besides BadZipFile: a flipped bit in a header can ask for an
# unsupported version or compression (NotImplementedError), an encrypted member (RuntimeError), a short read.
ZIP_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError,
    struct.error, zlib.error, KeyError,
)


class LexportError(Exception):
    """Base of every error lexport reports to a user. Never shown with a traceback.

    What it says: `message`, then `hint` (what to do), the `advice` text, what the pipeline learnt since (`said`),
    and with `debug` the LEXPORT_DEBUG line; `full_hint()` joins them."""

    exit_code = 70
    kind = "internal"

    def __init__(self, message: str, *, hint: str | None = None, advice: Advice | None = None,
                 debug: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.advice = advice
        self.debug = debug
        self.said: list[str] = []  # context the pipeline adds after the fact
        self.report: Any = None  # the partial report.Report, attached by export() (errors sit below report)

    def full_hint(self) -> str:
        parts = [self.hint, self.advice.text if self.advice else None, *self.said, DEBUG_HINT if self.debug else None]
        return "\n".join(p for p in parts if p)

    def __str__(self) -> str:
        hint = self.full_hint()
        return self.message if not hint else f"{self.message}\n{hint}"


class VerificationError(LexportError):
    exit_code = 1
    kind = "verification"


class UsageError(LexportError):
    exit_code = 2
    kind = "usage"


class CheckpointError(LexportError):
    exit_code = 3
    kind = "checkpoint"


class UserModuleError(LexportError):
    exit_code = 4
    kind = "module"


class ExportError(LexportError):
    exit_code = 5
    kind = "export"


class OutputError(LexportError):
    exit_code = 6
    kind = "output"


EXIT_CODES: dict[int, str] = {
    0: "ok: every artifact written and verified",
    1: "verification failed: an artifact does not compute what the module computes",
    2: "usage: bad flag, malformed --input, unknown format",
    3: "checkpoint: missing, unreadable, corrupt, or needs --allow-global/--trust-checkpoint",
    4: "user module: import, class, construction, --attr, state-dict mismatch, forward failed",
    5: "export failed",
    6: "output: exists without --force, would overwrite the input, not writable, disk full",
    70: "internal error in lexport (a bug: please report it with LEXPORT_DEBUG=1 output)",
}


def describe_exception(e: BaseException, limit: int = 400) -> str:
    """`Type: first line` of the root cause: exporters wrap the real reason in generic 'step 1/3' errors."""
    import re

    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # A first line ending in ':' introduces the reason on the next lines: keep a few of them.
    first = " ".join(lines[:4] if lines and lines[0].endswith(":") else lines[:1])[:limit]
    return f"{type(root).__name__}: {first}" if first else type(root).__name__


DEBUG_HINT = "Set LEXPORT_DEBUG=1 for the full traceback."
# Said when a format fails on Python control flow that depends on tensor values; observed on torch 2.13 with
# `if x.sum() > 0:` in forward (fixtures.modules.DataDependentBranch).
DATA_DEPENDENT_HINT = (
    "forward branches on a tensor's value, which torch.export cannot capture: exported-program, executorch, aoti "
    "and onnx's dynamo exporter all refuse it. --to torchscript --torchscript-mode script compiles both branches; "
    "tracing (torchscript's default, onnx's TorchScript-based fallback) records only the branch the example takes, "
    "which verification then reports. Or write the branch with torch.where or torch.cond."
)


# Said when torch.export refuses code that branches or loops on a size that depends on tensor values (a boolean
# mask, nonzero, NMS-style filtering: torch calls the size an unbacked "size-like" symbol); observed on torch 2.13
# with fixtures.real_projects.TinyDetector. Unlike a branch on a value, torch.where/torch.cond do not help here.
DATA_DEPENDENT_SIZE_HINT = (
    "forward makes tensors whose size depends on the values (a boolean mask, nonzero, NMS-style filtering) and "
    "then branches or loops on that size: torch.export cannot capture it (exported-program, executorch, aoti and "
    "onnx's dynamo exporter refuse it), and tracing (torchscript, onnx's TorchScript-based fallback) fixes the "
    "sizes and loop counts of the example input, which verification then reports. What works: export the part "
    "before the post-processing (the backbone and heads, whose outputs have fixed sizes) with --attr, and run the "
    "thresholding and NMS in the runtime; or, if forward is in TorchScript's Python subset, --to torchscript "
    "--torchscript-mode script keeps the loop."
)
# Said when torch.jit.trace refuses forward's output (observed on torch 2.13: a list of dicts of tensors, as
# torchvision's detectors return, even with strict=False).
TRACE_OUTPUT_HINT = (
    "torch.jit.trace returns only tensors, and tuples, lists or dicts of tensors: forward returns something else "
    "(a list of dicts, as detectors do, or values that are not tensors). exported-program and onnx take nested "
    "outputs; --torchscript-mode script does too when forward is in TorchScript's Python subset; or export a "
    "submodule that returns tensors with --attr."
)


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _is_library(filename: str) -> bool:
    """Frames of torch, Lightning, lexport, the standard library: not where the user can change anything."""
    import os
    import sysconfig

    if filename.startswith("<") or any(p in filename for p in ("site-packages", "dist-packages")):
        return True
    here = os.path.dirname(os.path.abspath(__file__))
    stdlib = sysconfig.get_paths().get("stdlib") or "\0"
    return filename.startswith((here, stdlib))


def source_pointers(e: BaseException, limit: int = 2) -> list[str]:
    """The user's file and line (and the code there) that torch's error points at: the `File "...", line N` lines
    of its message (torch.export and TorchScript print them), else the innermost traceback frame outside torch,
    Lightning and lexport."""
    import re
    import traceback

    found: list[str] = []
    for exc in _chain(e):
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()
        for i, line in enumerate(lines):
            m = re.match(r'\s*File "(.+?)", line (\d+)(?:, in (\S+))?', line)
            if m and not _is_library(m.group(1)):
                code = lines[i + 1].strip() if i + 1 < len(lines) else ""
                where = f"{m.group(1)}:{m.group(2)}" + (f" in {m.group(3)}" if m.group(3) else "")
                found.append(f"{where}: {code}" if code else where)
    if not found:
        for exc in _chain(e):
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_library(f.filename)]
            if frames:
                f = frames[-1]
                found.append(f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}".rstrip(": "))
                break
    return list(dict.fromkeys(found))[:limit]


def torch_suggestion(e: BaseException) -> str | None:
    """torch's own advice in its message ("consider using ...", "Suggested fixes: ..."), when it gives one."""
    import re

    for exc in _chain(e):
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
        for i, line in enumerate(lines):
            if re.match(r"(consider|suggested fix|suggestion|hint:|try |to fix|did you mean|you may want)", line, re.I):
                if line.endswith(":") and i + 1 < len(lines):
                    line = f"{line} {lines[i + 1]}"
                return line[:300]
    return None


def is_data_dependent(e: BaseException) -> bool:
    return any("DataDependent" in type(x).__name__ or "data-dependent" in str(x) for x in _chain(e))


def is_data_dependent_size(e: BaseException) -> bool:
    """A data-dependent guard on a tensor's size (boolean mask, nonzero): torch lists the size-like symbols it
    involves ("Size-like symbols: u4"); a branch on a value (`if x.sum() > 0`) has none."""
    import re

    return is_data_dependent(e) and any(re.search(r"Size-like symbols: (?!none)\w", str(x)) for x in _chain(e))


GROWTH_HINT = "Raise the limit with --max-growth N if this is intended."

ADVICE_TEXT = {
    Advice.DATA_DEPENDENT_BRANCH: DATA_DEPENDENT_HINT,
    Advice.DATA_DEPENDENT_SIZE: DATA_DEPENDENT_SIZE_HINT,
    Advice.TRACE_OUTPUT: TRACE_OUTPUT_HINT,
    Advice.MAX_GROWTH: GROWTH_HINT,
}


def data_dependent_advice(e: BaseException) -> Advice | None:
    """The advice for a data-dependent failure: sizes or branches; None for other failures."""
    if not is_data_dependent(e):
        return None
    return Advice.DATA_DEPENDENT_SIZE if is_data_dependent_size(e) else Advice.DATA_DEPENDENT_BRANCH


def export_failure(what: str, e: BaseException, *, detail: str | None = None) -> ExportError:
    """An export that torch refused: its reason in one line, the user's source line and torch's suggestion when it
    gives them, what to try for data-dependent control flow, and the LEXPORT_DEBUG hint."""
    lines = [f"{what}: {describe_exception(e)}"]
    lines += [f"  at {p}" for p in source_pointers(e)]
    # For data-dependent guards torch suggests its own internal APIs (guard_or_false): the hint below fits users.
    suggestion = None if is_data_dependent(e) else torch_suggestion(e)
    if suggestion:
        lines.append(f"  torch suggests: {suggestion}")
    return ExportError("\n".join(lines), hint=detail, advice=data_dependent_advice(e), debug=True)


def lightning_package() -> str:
    """`lightning.pytorch` when the unified `lightning` package is installed, else `pytorch_lightning` when that is:
    the prefix for the Lightning commands a hint names. Found without importing Lightning."""
    import importlib.util

    for name, prefix in (("lightning", "lightning.pytorch"), ("pytorch_lightning", "pytorch_lightning")):
        try:
            if importlib.util.find_spec(name) is not None:
                return prefix
        except (ImportError, ValueError):
            continue
    return "lightning.pytorch"


def error_json(e: BaseException, *, code: int | None = None) -> dict[str, Any]:
    """The one JSON shape of an error, {"code", "kind", "message"}: a LexportError's own; an interruption's
    (130); anything else is a bug in lexport (70)."""
    if isinstance(e, LexportError):
        out: dict[str, Any] = {"code": e.exit_code if code is None else code, "kind": e.kind, "message": str(e)}
        if e.advice is not None:
            out["advice"] = e.advice.value
        return out
    if isinstance(e, KeyboardInterrupt):
        return {"code": 130, "kind": "interrupted", "message": "interrupted (SIGINT or SIGTERM)"}
    return {"code": 70, "kind": "internal", "message": f"{type(e).__name__}: {str(e)[:500]}"}
