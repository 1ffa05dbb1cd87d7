"""From a batch (of a `--data` file or a dataloader) to forward's arguments, and the split of the batches into
calibration and held-out verification.

The rule (documented in the README; `--data-input` overrides it):

1. A tensor is forward's one argument.
2. A tuple or list is Lightning's `(x, y)` convention: its first element is forward's input, unless forward takes
   exactly that many positional arguments (counting those without a default), in which case the elements are
   forward's positional arguments in order. When the first element is itself a dict, it is forward's keyword
   arguments; a tuple/list first element is forward's positional arguments.
3. A dict is forward's keyword arguments: the keys forward accepts (all of them when forward takes **kwargs);
   the others (labels, ids) are left out.
4. `pick` (an int index of a tuple/list, or a key of a dict: `--data-input 1`, `--data-input image`) names the
   element that is forward's input instead; it is mapped as a batch itself (a tensor is the one argument, a
   tuple/list the positional arguments, a dict the keyword arguments).

Labels are taken where Lightning's convention puts them, and only when they are integer class indices: the
element after the input of a tuple/list `(x, y)` (the one at index 1 when the input is element 0), or a dict's
`label`/`labels`/`y`/`target`/`targets` that forward does not take. Negative labels (-100, the usual ignore_index)
are not counted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UsageError
from ..inputs import Inputs

LABEL_KEYS = ("label", "labels", "y", "target", "targets")
# Default number of samples read with --data when --data-batches is not given: half calibrate, half verify.
DEFAULT_SAMPLES = 600
# Ultralytics and anomalib warn below this many calibration images; so does lexport.
MIN_CALIBRATION_SAMPLES = 300
# Upper bound on batches read without --data-batches (tiny batches of one sample): the read stays bounded.
MAX_DEFAULT_BATCHES = 1000
# A batch cut to the default's sample bound is split into batches of at most this many samples, so one huge batch
# still gives calibration and held-out batches.
CUT_BATCH_SAMPLES = DEFAULT_SAMPLES // 10
# A gate (--quantize int8, --precision fp16/bf16, --min-agreement) needs at least this many held-out samples that
# run: below 100 one disagreement is more than 1% and the default gate (0.99) cannot tell drift from chance.
MIN_GATE_SAMPLES = 100


@dataclass
class Batch:
    """One batch mapped to forward's arguments, its integer labels (None when it carries none) and how many
    samples it holds (dim 0 of its first tensor; 1 for a batch without a batch dimension)."""

    inputs: Inputs
    labels: Any = None
    samples: int = 1
    index: int = 0  # its position among the batches read
    mask: Any = None  # a dict batch's attention_mask (whether forward takes it or not): token-level agreement


@dataclass
class Prepared:
    """The batches read, mapped and split. `calibration` is empty when nothing needs calibrating; `verification`
    never shares a batch with it."""

    calibration: list[Batch]
    verification: list[Batch]
    source: str  # "file data.pt" / "val_dataloader() of pkg.DataModule"
    rule: str  # how a batch became forward's arguments, for the report
    warnings: list[str] = field(default_factory=list)

    @property
    def calibration_samples(self) -> int:
        return sum(b.samples for b in self.calibration)

    @property
    def verification_samples(self) -> int:
        return sum(b.samples for b in self.verification)

    @property
    def has_labels(self) -> bool:
        return bool(self.verification) and all(b.labels is not None for b in self.verification)

    def summary(self) -> dict[str, Any]:
        """For the JSON report and the manifest."""
        return {
            "source": self.source,
            "rule": self.rule,
            "calibration_batches": len(self.calibration),
            "calibration_samples": self.calibration_samples,
            "verification_batches": len(self.verification),
            "verification_samples": self.verification_samples,
            "labels": self.has_labels,
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------------------------------------ the rule
@dataclass(frozen=True)
class Signature:
    """What the rule needs to know of forward: positional parameters without a default, every parameter name,
    whether it takes *args / **kwargs."""

    required_positional: int
    names: tuple[str, ...]
    var_positional: bool
    var_keyword: bool
    optional: tuple[str, ...] = ()  # parameters with a default (a transformers model's labels=None)
    # The parameters the example inputs bind (the exported program's inputs); None when not known. An optional
    # parameter the example leaves out (a GPT-2 exported with input_ids only) is not fed from a dict batch.
    exported: tuple[str, ...] | None = None
    # Of those, the ones the example passes positionally, in order: a dict batch passes them the same way (an
    # exported program takes an input the way it was exported with).
    positional: tuple[str, ...] = ()


def forward_signature(module: Any) -> Signature:
    """The signature of module.forward (a plain callable's own signature when it has no forward)."""
    fn = getattr(module, "forward", module)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a C function or builtin: assume one argument
        return Signature(1, (), False, False)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    kinds = inspect.Parameter
    required = sum(
        1 for p in params
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD) and p.default is kinds.empty
    )
    return Signature(
        required_positional=required,
        names=tuple(p.name for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)),
        var_positional=any(p.kind == kinds.VAR_POSITIONAL for p in params),
        optional=tuple(p.name for p in params if p.default is not kinds.empty),
        var_keyword=any(p.kind == kinds.VAR_KEYWORD for p in params),
    )


def bound_names(module: Any, example: Inputs) -> tuple[str, ...] | None:
    """The names of forward's parameters that the example inputs bind, the positional ones first (None when the
    signature cannot say)."""
    try:
        signature = inspect.signature(getattr(module, "forward", module))
        bound = signature.bind_partial(*example.args, **example.kwargs)
    except (TypeError, ValueError):
        return None
    if any(signature.parameters[n].kind == inspect.Parameter.VAR_KEYWORD for n in bound.arguments):
        return None  # **kwargs binds keys the signature does not name: nothing to compare with
    return tuple(bound.arguments)


def parse_pick(value: str | int | None) -> int | str | tuple[int | str, ...] | None:
    """`--data-input` as given on the command line: an integer index, or a dict key; several, comma-separated
    (`input_ids,attention_mask`), pick several elements: a dict's keys as keyword arguments, a tuple's indices as
    positional arguments."""
    if value is None or isinstance(value, int):
        return value
    if "," in value:
        parts = tuple(parse_pick(p) for p in value.split(",") if p.strip())
        if len(parts) > 1:
            return parts  # type: ignore[return-value]
        value = str(parts[0]) if parts else ""
    text = value.strip()
    if not text:
        raise UsageError("--data-input is empty: give the index of the batch element (0, 1, ...) or the dict key")
    try:
        return int(text)
    except ValueError:
        return text


def to_inputs(batch: Any, sig: Signature, pick: int | str | tuple[int | str, ...] | None = None) -> tuple[Inputs, Any, str]:
    """(forward's arguments, integer labels or None, the rule used in words). Raises UsageError when `pick` does
    not exist in the batch or the batch holds nothing forward can take."""
    import torch

    if isinstance(batch, torch.Tensor):
        if pick is not None:
            raise UsageError(f"--data-input {pick!r}: the batches are single tensors; there is nothing to pick")
        return Inputs((batch,), {}), None, "each batch is a tensor: forward's one argument"
    if isinstance(batch, (tuple, list)):
        kind = type(batch).__name__
        if pick is not None:
            if not isinstance(pick, int) or not -len(batch) <= pick < len(batch):
                raise UsageError(
                    f"--data-input {pick!r}: the batches are {kind}s of {len(batch)} elements; give an index "
                    f"0..{len(batch) - 1}"
                )
            i = pick % len(batch)
            labels = _int_labels(batch[1]) if i == 0 and len(batch) > 1 else None
            return _element(batch[i], sig), labels, f"element {i} of each {kind} batch (--data-input)"
        n = len(batch)
        if n > 1 and sig.required_positional == n:
            return (
                Inputs(tuple(batch), {}),
                None,
                f"each batch is a {kind} of {n}: forward takes {n} positional arguments, so all of them",
            )
        if not n:
            raise UsageError(f"--data: a batch is an empty {kind}: nothing to give forward")
        labels = _int_labels(batch[1]) if n > 1 else None
        return (
            _element(batch[0], sig),
            labels,
            f"element 0 of each {kind} batch of {n} (Lightning's (x, y)); --data-input picks another",
        )
    if isinstance(pick, tuple):
        return _pick_several(batch, pick)
    if isinstance(batch, dict):
        if pick is not None:
            if pick not in batch:
                keys = ", ".join(map(str, list(batch)[:10]))
                raise UsageError(f"--data-input {pick!r}: the batches are dicts with keys {keys}")
            return _element(batch[pick], sig), _dict_labels(batch, {pick}), f"key {pick!r} of each dict (--data-input)"
        # A label key is never an input when forward's parameter of that name is optional (transformers models take
        # labels=None and would compute a loss): the labels of a tokenized batch are the batch's, not forward's.
        kwargs = {k: v for k, v in batch.items() if (sig.var_keyword or k in sig.names)
                  and not (k in LABEL_KEYS and (k in sig.optional or k not in sig.names))
                  and not (sig.exported is not None and k in sig.optional and k not in sig.exported)}
        if not kwargs:
            keys = ", ".join(map(str, list(batch)[:10]))
            raise UsageError(
                f"--data: the batches are dicts with keys {keys}, none of which forward takes "
                f"({', '.join(sig.names) or 'no named parameters'})",
                hint="Pick the element that is forward's input with --data-input KEY.",
            )
        left = [k for k in batch if k not in kwargs]
        rule = "each dict batch as keyword arguments" + (f" (left out: {', '.join(map(str, left))})" if left else "")
        unexported = [k for k in left if sig.exported is not None and k in sig.optional and k not in LABEL_KEYS]
        if unexported:
            rule += f"; {', '.join(map(str, unexported))} not among the exported inputs ({', '.join(sig.exported or ())})"
        used = set(kwargs)
        if sig.positional and all(n in kwargs for n in sig.positional):
            args = tuple(kwargs.pop(n) for n in sig.positional)
            return Inputs(args, kwargs), _dict_labels(batch, used), rule
        return Inputs((), kwargs), _dict_labels(batch, used), rule
    raise UsageError(f"--data: a batch is a {type(batch).__name__}; expected a tensor, a tuple/list or a dict")


def _pick_several(batch: Any, pick: tuple[int | str, ...]) -> tuple[Inputs, Any, str]:
    """`--data-input input_ids,attention_mask`: those keys of a dict batch as keyword arguments (indices of a
    tuple/list batch as positional arguments)."""
    if isinstance(batch, dict):
        missing = [k for k in pick if k not in batch]
        if missing:
            raise UsageError(f"--data-input {','.join(map(str, pick))}: the batches are dicts with keys "
                             f"{', '.join(map(str, list(batch)[:10]))}")
        return (Inputs((), {str(k): batch[k] for k in pick}), _dict_labels(batch, set(pick)),
                f"keys {', '.join(map(str, pick))} of each dict as keyword arguments (--data-input)")
    if isinstance(batch, (tuple, list)) and all(isinstance(i, int) and -len(batch) <= i < len(batch) for i in pick):
        return (Inputs(tuple(batch[int(i)] for i in pick), {}), None,
                f"elements {', '.join(map(str, pick))} of each {type(batch).__name__} as positional arguments "
                "(--data-input)")
    raise UsageError(f"--data-input {','.join(map(str, pick))}: the batches are {type(batch).__name__}s; give keys "
                     "of dict batches or indices of tuple batches")


def _element(value: Any, sig: Signature) -> Inputs:
    if isinstance(value, dict):
        return Inputs((), dict(value))
    if isinstance(value, (tuple, list)):
        return Inputs(tuple(value), {})
    return Inputs((value,), {})


def _int_labels(value: Any) -> Any:
    """`value` when it looks like class indices (an integer tensor of rank >= 1), else None."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim() >= 1 and not value.dtype.is_floating_point \
            and not value.dtype.is_complex and value.dtype != torch.bool:
        return value
    return None


def _dict_labels(batch: dict[Any, Any], used: set[Any]) -> Any:
    for key in LABEL_KEYS:
        if key in batch and key not in used:
            labels = _int_labels(batch[key])
            if labels is not None:
                return labels
    return None


def batch_samples(inputs: Inputs) -> int:
    """Dim 0 of the first tensor of rank >= 1 (1 when there is none)."""
    for t in inputs.tensors():
        if t.dim() >= 1:
            return int(t.shape[0])
    return 1


# ------------------------------------------------------------------------------------------ reading, split
def take(
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    target_samples: int = DEFAULT_SAMPLES,
    count: Callable[[Any], int] | None = None,
) -> list[Any]:
    """The first batches of `batches`: `max_batches` of them (`--data-batches N`) when given, else as many as make
    `target_samples` samples (at most MAX_DEFAULT_BATCHES): the default bounds samples, so a batch that would pass
    the bound is cut to it (and split into batches of CUT_BATCH_SAMPLES). Reads no further than it keeps."""
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"--data-batches {max_batches}: give a number of batches >= 1 (2 or more to calibrate)")
    out: list[Any] = []
    samples = 0
    limit = max_batches if max_batches is not None else MAX_DEFAULT_BATCHES
    for batch in batches:
        n = (count or _raw_samples)(batch)
        if max_batches is None and samples + n > target_samples and n > 1:
            out.extend(_cut(batch, n, max(1, target_samples - samples)))
            break
        out.append(batch)
        samples += n
        if len(out) >= limit or (max_batches is None and samples >= target_samples):
            break
    return out


def _cut(batch: Any, n: int, keep: int) -> list[Any]:
    """The first `keep` samples of a batch of `n`, in batches of at most CUT_BATCH_SAMPLES: every tensor whose
    first dimension is `n` is sliced, everything else is kept as it is. A batch whose tensors cannot be reached
    (a class the tree utilities do not open) is kept whole rather than repeated."""
    import torch
    from torch.utils._pytree import tree_leaves, tree_map

    def sliceable(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() >= 1 and int(t.shape[0]) == n

    if not any(sliceable(t) for t in tree_leaves(batch)):
        return [batch]

    def part(start: int, stop: int) -> Any:
        return tree_map(lambda t: t[start:stop] if sliceable(t) else t, batch)

    keep = min(keep, n)
    return [part(i, min(i + CUT_BATCH_SAMPLES, keep)) for i in range(0, keep, CUT_BATCH_SAMPLES)]


def _raw_samples(batch: Any) -> int:
    import torch
    from torch.utils._pytree import tree_leaves

    for t in tree_leaves(batch):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


def prepare(
    raw: list[Any],
    module: Any,
    *,
    source: str,
    calibrate: bool,
    pick: int | str | tuple[int | str, ...] | None = None,
    min_calibration_samples: int = MIN_CALIBRATION_SAMPLES,
    min_verification_samples: int = 1,
    exported: tuple[str, ...] | list[str] | None = None,
    positional: int = 0,
) -> Prepared:
    """Map every batch with `to_inputs` (one rule for all: the first batch's) and split them.

    With `calibrate`, batches alternate: even positions calibrate, odd ones verify (an unshuffled validation set
    sorted by class gives both halves every class); at least 2 batches are needed. Without it every batch
    verifies. Batches of 0 samples are left out (said in the warnings). Warns when calibration sees fewer than
    `min_calibration_samples` samples, or verification fewer than 100, and when held-out batches hold NaN or Inf.
    Raises UsageError naming what was read for an empty list, a batch that gives forward no tensor, a pick that
    does not fit, too few usable batches to calibrate, NaN/Inf or several shapes in calibration batches, and
    fewer than `min_verification_samples` held-out samples (a gate that would not run)."""
    sig = forward_signature(module)
    if exported is not None:
        sig = replace(sig, exported=tuple(exported), positional=tuple(exported[:positional]))
    if not raw:
        raise UsageError(f"--data: {source} gave no batches")
    mapped: list[Batch] = []
    rule = ""
    empty: list[Batch] = []
    for i, batch in enumerate(raw):
        inputs, labels, r = to_inputs(batch, sig, pick)
        if not inputs.tensors():
            raise UsageError(
                f"--data: batch {i} of {source} gives forward no tensor ({_kinds(inputs)}): nothing can run on it",
                hint="Give batches of tensors (a tensor, or tuples/lists/dicts of tensors); --data-input picks the "
                "element that is forward's input.",
            )
        rule = rule or r
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        b = Batch(inputs, labels, batch_samples(inputs), i, mask)
        (mapped if b.samples else empty).append(b)
    warnings: list[str] = []
    if empty:
        warnings.append(f"{len(empty)} of the {len(raw)} batches read hold 0 samples and were left out")
    if not mapped:
        raise UsageError(f"--data: {source} gave {len(raw)} batches, all of 0 samples: nothing to run",
                         hint="Give batches whose first dimension (the batch) is at least 1.")
    if calibrate:
        if len(mapped) < 2:
            raise UsageError(
                f"--data: {source} gave {_read(raw, mapped)}; static int8 needs at least 2 batches of 1 sample or "
                "more (calibration and held-out verification never share a batch)",
                hint="Raise --data-batches, or save more batches in the file.",
            )
        calibration, verification = mapped[0::2], mapped[1::2]
        _check_calibration(calibration, source)
    else:
        calibration, verification = [], mapped
    prepared = Prepared(calibration, verification, source, rule, warnings)
    if prepared.verification_samples < min_verification_samples:
        raise UsageError(
            f"--data: {source} gave {_read(raw, mapped)}: {prepared.verification_samples} held-out samples "
            f"({len(verification)} batches) verify, and the agreement gate needs at least "
            f"{min_verification_samples}: it would not run",
            hint="Raise --data-batches or give more data (with --quantize int8 half the batches calibrate).",
        )
    _warn(prepared, min_calibration_samples)
    return prepared


def _read(raw: list[Any], mapped: list[Batch]) -> str:
    """What was read, in words: "2 batches (2 samples)", "3 batches (1 of 0 samples, left out)"."""
    samples = sum(b.samples for b in mapped)
    left = len(raw) - len(mapped)
    return (f"{len(raw)} batch{'es' if len(raw) != 1 else ''} ({samples} samples"
            + (f"; {left} of 0 samples, left out)" if left else ")"))


def _kinds(inputs: Inputs) -> str:
    values = [*inputs.args, *inputs.kwargs.values()]
    return ", ".join(sorted({type(v).__name__ for v in values})) or "nothing"


def _shape_key(inputs: Inputs) -> tuple[Any, ...]:
    """The shapes of a batch's tensors without the batch dimension, and their dtypes: batches with the same key
    can be concatenated."""
    return tuple((tuple(t.shape[1:]), str(t.dtype)) for t in inputs.tensors())


def _describe_key(key: tuple[Any, ...]) -> str:
    return ", ".join("x".join(map(str, shape)) or "scalar" for shape, _ in key)


def non_finite(b: Batch) -> bool:
    """Whether a batch's floating tensors hold NaN or Inf."""
    import torch

    return any(t.dtype.is_floating_point and not bool(torch.isfinite(t).all()) for t in b.inputs.tensors())


def _check_calibration(calibration: list[Batch], source: str) -> None:
    bad = [b.index for b in calibration if non_finite(b)]
    if bad:
        raise UsageError(
            f"--data: calibration batch{'es' if len(bad) > 1 else ''} {_indices(bad)} of {source} hold NaN or Inf: "
            "int8 ranges cannot be calibrated on non-finite values",
            hint="Clean the data (torch.nan_to_num, or drop those samples), or check the preprocessing that made it.",
        )
    keys: dict[tuple[Any, ...], list[int]] = {}
    for b in calibration:
        keys.setdefault(_shape_key(b.inputs), []).append(b.index)
    if len(keys) > 1:
        shapes = "; ".join(f"{_describe_key(k)}: batches {_indices(v)}" for k, v in keys.items())
        raise UsageError(
            f"--data: the calibration batches of {source} have {len(keys)} shapes ({shapes}); int8 calibrates a "
            "graph of one shape",
            hint="Give batches of the shape the model is exported with (its example input's).",
        )


def _indices(values: list[int]) -> str:
    return ", ".join(map(str, values[:8])) + (f" (and {len(values) - 8} more)" if len(values) > 8 else "")


def _warn(prepared: Prepared, min_calibration_samples: int) -> None:
    warnings = prepared.warnings
    if prepared.calibration and prepared.calibration_samples < min_calibration_samples:
        warnings.append(
            f"calibration saw {prepared.calibration_samples} samples ({len(prepared.calibration)} batches); int8 "
            f"ranges are reliable from about {min_calibration_samples}: raise --data-batches or give more data"
        )
    if prepared.verification_samples < 100:
        warnings.append(
            f"verification on {prepared.verification_samples} held-out samples: an agreement rate from so few is "
            "coarse (each sample is more than 1%)"
        )
    bad = [b for b in prepared.verification if non_finite(b)]
    if bad:
        samples = sum(b.samples for b in bad)
        warnings.append(
            f"held-out batch{'es' if len(bad) > 1 else ''} {_indices([b.index for b in bad])} hold NaN or Inf "
            f"({samples} of {prepared.verification_samples} samples): the module's and the artifact's outputs on "
            "them are not finite, so agreement on them says nothing"
        )


def rebatch(batches: list[Batch], size: int) -> list[Batch]:
    """The same samples in batches of exactly `size` (programs with static shapes, such as ExecuTorch's, take
    only the example's batch size), batches of each shape apart (a file of 16x16 and 20x20 images gives batches of
    each); the remainder of each shape that does not fill a batch is dropped. Every tensor of a batch must have the
    batch dimension first."""
    if size < 1:
        raise ValueError(size)
    groups: dict[tuple[Any, ...], list[Batch]] = {}
    for b in batches:
        groups.setdefault(_shape_key(b.inputs), []).append(b)
    out: list[Batch] = []
    for group in groups.values():
        out.extend(_rebatch_one_shape(group, size, len(out)))
    return out


def _rebatch_one_shape(batches: list[Batch], size: int, first_index: int) -> list[Batch]:
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    _, spec = tree_flatten((batches[0].inputs.args, batches[0].inputs.kwargs))
    columns: list[list[Any]] = []
    labels: list[Any] = []
    masks: list[Any] = []
    for b in batches:
        leaves, s = tree_flatten((b.inputs.args, b.inputs.kwargs))
        if s != spec:
            raise UsageError("--data: batches differ in structure; they cannot be re-batched")
        if not columns:
            columns = [[] for _ in leaves]
        for col, leaf in zip(columns, leaves):
            col.append(leaf)
        labels.append(b.labels)
        masks.append(b.mask)
    joined = [torch.cat(col) if isinstance(col[0], torch.Tensor) and col[0].dim() >= 1 else col[0]
              for col in columns]
    all_labels = None
    if all(lab is not None for lab in labels) and len({tuple(lab.shape[1:]) for lab in labels}) == 1:
        all_labels = torch.cat(labels)
    all_masks = None
    if all(isinstance(m, torch.Tensor) for m in masks) and len({tuple(m.shape[1:]) for m in masks}) == 1:
        all_masks = torch.cat(masks)
    total = next((int(t.shape[0]) for t in joined if isinstance(t, torch.Tensor) and t.dim() >= 1), 0)
    out: list[Batch] = []
    for start in range(0, total - size + 1, size):
        leaves = [t[start:start + size] if isinstance(t, torch.Tensor) and t.dim() >= 1 else t for t in joined]
        args, kwargs = tree_unflatten(leaves, spec)
        lab = all_labels[start:start + size] if all_labels is not None else None
        mask = all_masks[start:start + size] if all_masks is not None else None
        out.append(Batch(Inputs(tuple(args), dict(kwargs)), lab, size, first_index + len(out), mask))
    return out
