"""One artifact checked against the eager module: the same check after an export and in `lexport verify`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..agreement import gate, measure
from ..compare import HeldOutCheck, Verification, compare_outputs, compare_tensor_maps
from ..errors import UsageError, describe_exception
from ..formats import ExportContext, Format
from ..inputs import batch_size
from .data import HeldOut
from .isolated import run_artifact
from .options import ExportOptions, is_gated
from .prepare import References


def failed(problem: str) -> Verification:
    """A verification that failed before any output was compared."""
    return Verification(False, 0, math.nan, math.nan, None, None, problems=[problem])


def check_artifact(fmt: Format, path: Path, ctx: ExportContext, opts: ExportOptions,
                   refs: References | None) -> Verification:
    """Load the artifact with its own runtime and compare: weights bit for bit, graphs on every reference input
    and, with --data, on the held-out batches too (top-1 agreement, gated for quantized and reduced precision)."""
    if fmt.kind == "weights" or refs is None:  # references are computed whenever a graph format runs
        try:
            loaded = fmt.load(path)
        except Exception as e:  # noqa: BLE001 - an artifact its own runtime cannot load has failed verification
            return failed(f"{fmt.name} runtime cannot load the artifact: {describe_exception(e)}")
        return compare_tensor_maps(ctx.state_dict, loaded)
    atol = opts.atol if opts.atol is not None else fmt.atol
    rtol = opts.rtol if opts.rtol is not None else fmt.rtol
    # A format that declares Format.dynamic is checked at other sizes of the --dynamic dims, within the bounds it
    # exported (its default MAX where it plans memory ahead, its smallest size).
    dynamic = fmt.dynamic.applied(refs.dynamic) if fmt.dynamic is not None else None
    try:
        runs = refs.runs(dynamic)
    except UsageError as e:  # the module fails at a size within a format's default bound
        return failed(e.message)
    any_batch = dynamic is not None and any(d.dim == 0 and d.max is None for d in dynamic.dims)
    program_batch = None if any_batch else batch_size(ctx.inputs())
    if refs.held_out is not None:
        _require_held_out(fmt, opts, refs.held_out, program_batch)
    held = _held_out_runs(refs.held_out, program_batch)
    everything = runs + [h[:3] for h in held]
    # In a child process when the runtime can crash natively on a malformed file (Format.isolate).
    ran = run_artifact(fmt, path, [data for _, data, _ in everything])
    if ran.crashed:
        return failed(ran.crashed)
    if ran.load_error is not None:
        return failed(f"{fmt.name} runtime cannot load the artifact: {ran.load_error}")
    expected, actual, labels, problems = [], [], [], []
    for (label, data, ref), (out, error) in zip(everything, ran.results):
        if error is not None:
            problems.append(f"{label} ({data.describe()}): the artifact failed: {error}")
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
    if held and not problems and refs.held_out is not None:
        _agreement(v, fmt, opts, refs.held_out, expected[len(runs):], actual[len(runs):], [r[3] for r in held],
                   [r[4] for r in held])
        read, ran_samples = refs.held_out.prepared.verification_samples, refs.held_out.ran(program_batch)
        if v.agreement is not None:
            v.agreement.samples_read = read
        if ran_samples < read:
            v.agreement_text = (f"{v.agreement_text} ({ran_samples} of the {read} held-out samples ran: re-batched to the "
                                f"example's batch size {program_batch}, the rest fill no batch)")
    return v


def _require_held_out(fmt: Format, opts: ExportOptions, held_out: HeldOut, program_batch: int | None) -> None:
    """With --data, held-out samples must run in this artifact: none at all, or fewer than a gate needs, is exit
    2 naming what was read and what ran (a gate that did not run is never a pass)."""
    from ..data.batches import MIN_GATE_SAMPLES
    from ..errors import UsageError

    read = held_out.prepared.verification_samples
    ran = held_out.ran(program_batch)
    need = MIN_GATE_SAMPLES if is_gated(opts) else 1
    if ran >= need:
        return
    why = (f"re-batched to the example's batch size {program_batch} (the shape {fmt.name} was exported for), "
           f"{ran} fill whole batches" if program_batch is not None and ran < read else f"{ran} ran")
    gate = f"; the agreement gate needs at least {need}" if need > 1 else ""
    raise UsageError(
        f"--data: {held_out.prepared.source} gave {read} held-out samples in {len(held_out.prepared.verification)} "
        f"batches; {why}{gate}: {fmt.name} cannot be verified on them",
        hint="Give more data (--data-batches, or batches of the example's batch size), or export with "
        "--dynamic-batch where the format supports it.",
    )


def _held_out_runs(held_out: HeldOut | None, batch: int | None) -> list[tuple[str, Any, Any, Any, Any]]:
    """(label, inputs, eager outputs, labels, attention mask) per held-out --data batch, at the program's batch
    size."""
    if held_out is None:
        return []
    batches, eager = held_out.runs(batch)
    return [(f"held-out batch {i}", b.inputs, ref, b.labels, b.mask) for i, (b, ref) in enumerate(zip(batches, eager))]


def _agreement(v: Verification, fmt: Format, opts: ExportOptions, held_out: HeldOut, expected: list[Any],
               actual: list[Any], labels: list[Any], masks: list[Any] | None = None) -> None:
    """Top-1 agreement (and accuracies) on the held-out batches into the verification; below --min-agreement a
    quantized or reduced-precision artifact fails with the figures."""
    result = measure(expected, actual, labels if all(x is not None for x in labels) else None, masks)
    gated = is_gated(opts)
    v.agreement = HeldOutCheck(result, gated, opts.min_agreement if gated else None, held_out.record.get("source"))
    if gated:
        problem = gate(result, opts.min_agreement, what=f"{fmt.name} {opts.quantize or opts.precision}")
        if problem is not None:
            v.problems.append(problem)
            v.gate_problem = problem
            v.passed = False
    v.agreement_text = result.describe()
