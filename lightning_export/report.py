"""The result of a run, as data: what the CLI renders as a table or JSON and what export() returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .compare import Verification
from .errors import LexportError, error_json


@dataclass
class ArtifactResult:
    format: str
    path: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    exporter: str | None = None
    verification: Verification | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    error: LexportError | None = None  # why this format failed (JSON: {"code", "kind", "message"})
    companions: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    traced: bool = False  # its writer traced (formats.Written.traced): verification sees the example's branch/sizes

    @property
    def ok(self) -> bool:
        return self.error is None and (self.verification is None or self.verification.passed)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "path": self.path,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "exporter": self.exporter,
            "verification": self.verification.to_json() if self.verification else None,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }
        if self.companions:
            out["companions"] = self.companions
        if self.info:
            out["info"] = self.info
        if self.error:
            out["error"] = error_json(self.error)
        return out


@dataclass
class Report:
    checkpoint: dict[str, Any] = field(default_factory=dict)
    module: str | None = None
    attr: str | None = None
    artifacts: list[ArtifactResult] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: LexportError | None = None  # why the run failed
    data: dict[str, Any] | None = None  # --data: the source and the batches used (pipeline.data.read_data)
    settings: dict[str, Any] | None = None  # the effective options and their sources (cli.settings), when known

    @property
    def ok(self) -> bool:
        return self.error is None and all(a.ok for a in self.artifacts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "checkpoint": self.checkpoint,
            "module": self.module,
            "attr": self.attr,
            "artifacts": [a.to_json() for a in self.artifacts],
            "versions": self.versions,
            "notes": self.notes,
            "warnings": self.warnings,
        }
        if self.data is not None:
            out["data"] = self.data
        if self.settings is not None:
            out["settings"] = self.settings
        if self.error:
            out["error"] = error_json(self.error)
        return out


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float as None: JSON that every parser accepts (no NaN/Infinity)."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from .version import __version__

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "lexport": __version__,
        "torch": v("torch"),
        "onnx": v("onnx"),
        "onnxruntime": v("onnxruntime"),
        "lightning": v("pytorch-lightning") or v("lightning"),
    }
