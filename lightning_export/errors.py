"""Typed errors; each carries the exit code the CLI returns for it."""

from __future__ import annotations


class LexportError(Exception):
    """Base of every error lexport reports to a user. Never shown with a traceback."""

    exit_code = 70
    kind = "internal"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.report = None  # the partial Report, attached by export()

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


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


class InternalError(LexportError):
    exit_code = 70
    kind = "internal"


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
