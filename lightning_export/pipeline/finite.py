"""NaN and Inf in the weights and in the module's outputs: a warning, or an error with --strict-finite."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..compare import flatten_outputs
from ..errors import UserModuleError
from ..report import Report
from ..statedict import tensor_specs
from .options import ExportOptions


def check_finite_weights(state_dict: Mapping[str, Any], opts: ExportOptions, report: Report) -> None:
    bad = []
    for name, spec in tensor_specs(state_dict).items():
        if spec.dtype.is_floating_point and spec.numel():
            t = state_dict[name]  # one at a time: a sharded folder's tensors are read when asked for
            if not _all_finite(t):
                bad.append(name)
            del t
    if bad:
        msg = f"non-finite values (NaN or Inf) in the weights: {', '.join(bad[:10])}"
        if opts.strict_finite:
            raise UserModuleError(msg, hint="Drop --strict-finite to export anyway.")
        report.warnings.append(msg)


def _all_finite(t: Any, chunk: int = 1 << 22) -> bool:
    """Chunked; a sum is non-finite whenever any element is NaN or Inf, so the exact check runs only then."""
    import torch

    flat = t.detach().reshape(-1)
    fast = t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        if fast:
            total = part.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            if bool(torch.isfinite(total)):
                continue
        if not bool(torch.isfinite(part).all()):
            return False
    return True


def check_finite_outputs(value: Any, opts: ExportOptions, report: Report) -> None:
    import torch

    bad = [
        name
        for name, t in flatten_outputs(value)
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and not bool(torch.isfinite(t).all())
    ]
    if bad:
        msg = f"the module's outputs on the example inputs are not finite: {', '.join(bad)}"
        if opts.strict_finite:
            raise UserModuleError(msg, hint="Drop --strict-finite to export anyway.")
        report.warnings.append(msg)
