"""One artifact checked against the eager module: the same check after an export and in `lexport verify`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..compare import Verification, compare_outputs, compare_tensor_maps
from ..errors import describe_exception
from .options import ExportOptions


def failed(problem: str) -> Verification:
    """A verification that failed before any output was compared."""
    return Verification(False, 0, math.nan, math.nan, None, None, problems=[problem])


def check_artifact(fmt: Any, path: Path, ctx: Any, opts: ExportOptions, refs: Any) -> Verification:
    """Load the artifact with its own runtime and compare: weights bit for bit, graphs on every reference input."""
    try:
        loaded = fmt.load(path)
    except Exception as e:  # noqa: BLE001 - an artifact its own runtime cannot load has failed verification
        return failed(f"{fmt.name} runtime cannot load the artifact: {describe_exception(e)}")
    if fmt.kind == "weights":
        return compare_tensor_maps(ctx.state_dict, loaded)
    atol = opts.atol if opts.atol is not None else fmt.atol
    rtol = opts.rtol if opts.rtol is not None else fmt.rtol
    runs = refs.runs(dynamic=opts.dynamic_batch and fmt.dynamic_batch)
    expected, actual, labels, problems = [], [], [], []
    for label, data, ref in runs:
        try:
            out = loaded(*data.args, **data.kwargs)
        except Exception as e:  # noqa: BLE001 - the artifact fails where the module does not
            problems.append(f"{label} ({data.describe()}): the artifact failed: {describe_exception(e)}")
            continue
        expected.append(ref)
        actual.append(out)
        labels.append(label)
    v = compare_outputs(expected, actual, atol=atol, rtol=rtol, labels=labels)
    v.problems[:0] = problems
    v.inputs_checked = len(runs)
    v.passed = v.passed and not problems
    return v
