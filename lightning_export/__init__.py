"""lexport: export a PyTorch Lightning checkpoint to a deployment artifact and verify it computes the same."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ imports them when first used
    from .callback import LexportCallback
    from .errors import LexportError
    from .pipeline.export import export, run
    from .pipeline.options import ExportOptions
    from .pipeline.verify import verify
    from .report import Report

__all__ = ["export", "run", "verify", "ExportOptions", "Report", "LexportError", "LexportCallback", "__version__"]


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
