"""One artifact checked against the eager module: the same check after an export and in `lexport verify`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..agreement import gate, measure
from ..compare import Verification, compare_outputs, compare_tensor_maps
from ..errors import UsageError, describe_exception
from ..inputs import batch_size
from .options import ExportOptions

# Artifacts gated on top-1 agreement over the held-out --data batches (their elementwise drift is expected).
GATED_QUANTIZE = ("int8", "int8-dynamic")
GATED_PRECISION = ("fp16", "bf16")


def failed(problem: str) -> Verification:
    """A verification that failed before any output was compared."""
    return Verification(False, 0, math.nan, math.nan, None, None, problems=[problem])


def is_gated(opts: ExportOptions) -> bool:
    """Quantized and reduced-precision artifacts are judged by the decisions they make (--min-agreement)."""
    return (opts.quantize or "").lower() in GATED_QUANTIZE or (opts.precision or "").lower() in GATED_PRECISION


def check_artifact(fmt: Any, path: Path, ctx: Any, opts: ExportOptions, refs: Any) -> Verification:
    """Load the artifact with its own runtime and compare: weights bit for bit, graphs on every reference input
    and, with --data, on the held-out batches too (top-1 agreement, gated for quantized and reduced precision)."""
    try:
        loaded = fmt.load(path)
    except Exception as e:  # noqa: BLE001 - an artifact its own runtime cannot load has failed verification
        return failed(f"{fmt.name} runtime cannot load the artifact: {describe_exception(e)}")
    if fmt.kind == "weights":
        return compare_tensor_maps(ctx.state_dict, loaded)
    atol = opts.atol if opts.atol is not None else fmt.atol
    rtol = opts.rtol if opts.rtol is not None else fmt.rtol
    dynamic = fmt.dynamic.applied(refs.dynamic) if getattr(fmt, "dynamic", None) is not None else None
    try:
        runs = refs.runs(dynamic)
    except UsageError as e:  # the module fails at a size within a format's default bound
        return failed(e.message)
    any_batch = dynamic is not None and any(d.dim == 0 and d.max is None for d in dynamic.dims)
    held = _held_out_runs(refs.held_out, None if any_batch else batch_size(ctx.example))
    expected, actual, labels, problems = [], [], [], []
    for label, data, ref in runs + [h[:3] for h in held]:
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
    v.inputs_checked = len(runs) + len(held)
    if dynamic is not None:
        v.shapes_checked = [{"run": label, "shapes": [list(t.shape) for t in data.tensors()]}
                            for label, data, _ in runs + [h[:3] for h in held]]
    v.passed = v.passed and not problems
    if held and not problems:
        _agreement(v, fmt, opts, refs.held_out, expected[len(runs):], actual[len(runs):], [r[3] for r in held])
    return v


def _held_out_runs(held_out: Any, batch: int | None) -> list[tuple[str, Any, Any, Any]]:
    """(label, inputs, eager outputs, labels) per held-out --data batch, at the program's batch size."""
    if held_out is None:
        return []
    batches, eager = held_out.runs(batch)
    return [(f"held-out batch {i}", b.inputs, ref, b.labels) for i, (b, ref) in enumerate(zip(batches, eager))]


def _agreement(v: Verification, fmt: Any, opts: ExportOptions, held_out: Any, expected: list[Any],
               actual: list[Any], labels: list[Any]) -> None:
    """Top-1 agreement (and accuracies) on the held-out batches into the verification; below --min-agreement a
    quantized or reduced-precision artifact fails with the figures."""
    result = measure(expected, actual, labels if all(x is not None for x in labels) else None)
    gated = is_gated(opts)
    v.agreement = {**result.to_json(), "min_agreement": opts.min_agreement if gated else None, "gated": gated,
                   "source": held_out.record.get("source")}
    if gated:
        problem = gate(result, opts.min_agreement, what=f"{fmt.name} {opts.quantize or opts.precision}")
        if problem is not None:
            v.problems.append(problem)
            v.passed = False
    v.agreement_text = result.describe()
