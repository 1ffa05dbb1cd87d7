"""lexport: export a PyTorch Lightning checkpoint to a deployment artifact and verify it computes the same."""

from __future__ import annotations

from typing import Any

from .version import __version__

__all__ = ["export", "verify", "ExportOptions", "Report", "LexportError", "LexportCallback", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (and `lexport --help`) must not import torch.
    if name in ("export", "run"):
        from .pipeline import export

        return getattr(export, name)
    if name == "verify":
        from .pipeline.verify import verify

        return verify
    if name == "ExportOptions":
        from .pipeline.options import ExportOptions

        return ExportOptions
    if name == "Report":
        from .report import Report

        return Report
    if name in ("LexportCallback", "LexportCallbackError"):  # imports Lightning (the base class)
        from . import callback

        return getattr(callback, name)
    if name == "LexportError":
        from .errors import LexportError

        return LexportError
    raise AttributeError(f"module 'lightning_export' has no attribute {name!r}")
