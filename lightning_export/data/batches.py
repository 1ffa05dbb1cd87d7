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
from dataclasses import dataclass, field
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


def to_inputs(batch: Any, sig: Signature, pick: int | str | None = None) -> tuple[Inputs, Any, str]:
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
                  and not (k in LABEL_KEYS and (k in sig.optional or k not in sig.names))}
        if not kwargs:
            keys = ", ".join(map(str, list(batch)[:10]))
            raise UsageError(
                f"--data: the batches are dicts with keys {keys}, none of which forward takes "
                f"({', '.join(sig.names) or 'no named parameters'})",
                hint="Pick the element that is forward's input with --data-input KEY.",
            )
        left = [k for k in batch if k not in kwargs]
        rule = "each dict batch as keyword arguments" + (f" (left out: {', '.join(map(str, left))})" if left else "")
        return Inputs((), kwargs), _dict_labels(batch, set(kwargs)), rule
    raise UsageError(f"--data: a batch is a {type(batch).__name__}; expected a tensor, a tuple/list or a dict")


def _pick_several(batch: Any, pick: tuple[int | str, ...]) -> tuple[Inputs, Any, str]:
    """`--data-input input_ids,attention_mask`: those keys of a dict batch as keyword arguments (indices of a
    tuple/list batch as positional arguments)."""
    if isinstance(batch, dict):
        missing = [k for k in pick if k not in batch]
        if missing:
            raise UsageError(f"--data-input {','.join(map(str, pick))}: the batches are dicts with keys "
                             f"{', '.join(map(str, list(batch)[:10]))}")
        return (Inputs((), {k: batch[k] for k in pick}), _dict_labels(batch, set(pick)),
                f"keys {', '.join(map(str, pick))} of each dict as keyword arguments (--data-input)")
    if isinstance(batch, (tuple, list)) and all(isinstance(i, int) and -len(batch) <= i < len(batch) for i in pick):
        return (Inputs(tuple(batch[i] for i in pick), {}), None,
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
    `target_samples` samples (at most MAX_DEFAULT_BATCHES). Reads no further than it keeps."""
    if max_batches is not None and max_batches < 1:
        raise UsageError(f"--data-batches {max_batches}: give a number of batches >= 1 (2 or more to calibrate)")
    out: list[Any] = []
    samples = 0
    limit = max_batches if max_batches is not None else MAX_DEFAULT_BATCHES
    for batch in batches:
        out.append(batch)
        samples += (count or _raw_samples)(batch)
        if len(out) >= limit or (max_batches is None and samples >= target_samples):
            break
    return out


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
    pick: int | str | None = None,
    min_calibration_samples: int = MIN_CALIBRATION_SAMPLES,
) -> Prepared:
    """Map every batch with `to_inputs` (one rule for all: the first batch's) and split them.

    With `calibrate`, batches alternate: even positions calibrate, odd ones verify (an unshuffled validation set
    sorted by class gives both halves every class); at least 2 batches are needed. Without it every batch
    verifies. Warns when calibration sees fewer than `min_calibration_samples` samples, or verification fewer
    than 100. Raises UsageError for an empty list, a pick that does not fit, or a single batch to calibrate."""
    sig = forward_signature(module)
    if not raw:
        raise UsageError(f"--data: {source} gave no batches")
    mapped: list[Batch] = []
    rule = ""
    for i, batch in enumerate(raw):
        inputs, labels, r = to_inputs(batch, sig, pick)
        rule = rule or r
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        mapped.append(Batch(inputs, labels, batch_samples(inputs), i, mask))
    warnings: list[str] = []
    if calibrate:
        if len(mapped) < 2:
            raise UsageError(
                f"--data: {source} gave 1 batch; static int8 needs at least 2 (calibration and held-out "
                "verification never share a batch)",
                hint="Raise --data-batches, or save more batches in the file.",
            )
        calibration, verification = mapped[0::2], mapped[1::2]
    else:
        calibration, verification = [], mapped
    prepared = Prepared(calibration, verification, source, rule, warnings)
    if calibrate and prepared.calibration_samples < min_calibration_samples:
        warnings.append(
            f"calibration saw {prepared.calibration_samples} samples ({len(calibration)} batches); int8 ranges are "
            f"reliable from about {min_calibration_samples}: raise --data-batches or give more data"
        )
    if prepared.verification_samples < 100:
        warnings.append(
            f"verification on {prepared.verification_samples} held-out samples: an agreement rate from so few is "
            "coarse (each sample is more than 1%)"
        )
    return prepared


def rebatch(batches: list[Batch], size: int) -> list[Batch]:
    """The same samples in batches of exactly `size` (programs with static shapes, such as ExecuTorch's, take
    only the example's batch size); the remainder that does not fill a batch is dropped. Every tensor of a batch
    must have the batch dimension first."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if size < 1:
        raise ValueError(size)
    if not batches:
        return []
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
    all_labels = torch.cat(labels) if all(lab is not None for lab in labels) else None
    all_masks = torch.cat(masks) if all(isinstance(m, torch.Tensor) for m in masks) else None
    total = next((int(t.shape[0]) for t in joined if isinstance(t, torch.Tensor) and t.dim() >= 1), 0)
    out: list[Batch] = []
    for start in range(0, total - size + 1, size):
        leaves = [t[start:start + size] if isinstance(t, torch.Tensor) and t.dim() >= 1 else t for t in joined]
        args, kwargs = tree_unflatten(leaves, spec)
        lab = all_labels[start:start + size] if all_labels is not None else None
        mask = all_masks[start:start + size] if all_masks is not None else None
        out.append(Batch(Inputs(tuple(args), dict(kwargs)), lab, size, len(out), mask))
    return out
