"""`--dynamic SPEC`: which dims of which inputs take other sizes. Parsed once (no torch here), resolved against the
example inputs, handed to every format's writer and to verification, which derives the other sizes it checks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import UsageError

SYNTAX = "DIMS for every input (--dynamic 0,1) or NAME=DIMS for one (--dynamic input_ids=0,1); DIM or DIM:MIN..MAX"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
_DIM = re.compile(r"^(\d{1,2})(?::(\d{1,9})?\.\.(\d{1,9})?)?$")


@dataclass(frozen=True)
class DimRange:
    dim: int
    min: int | None = None
    max: int | None = None

    def text(self) -> str:
        if self.min is None and self.max is None:
            return str(self.dim)
        return f"{self.dim}:{'' if self.min is None else self.min}..{'' if self.max is None else self.max}"


@dataclass(frozen=True)
class DynamicEntry:
    name: str | None  # None: every input
    dims: tuple[DimRange, ...]

    def text(self) -> str:
        dims = ",".join(d.text() for d in self.dims)
        return f"{self.name}={dims}" if self.name else dims


@dataclass(frozen=True)
class DynamicSpec:
    entries: tuple[DynamicEntry, ...]

    def flags(self) -> str:
        return " ".join(f"--dynamic {e.text()}" for e in self.entries if e.dims) or "no --dynamic"


@dataclass(frozen=True)
class DynamicSupport:
    """What a format does with --dynamic (Format.dynamic; None there: static shapes only, --dynamic is exit 2)."""

    # True: the dims are dynamic in the artifact (the exporter's dynamic_shapes / dynamic_axes); False: the artifact
    # is captured at the example's shapes (a trace) and only verification says whether it takes others.
    exported: bool = True
    # Formats that plan memory ahead need an upper bound per dynamic dim: the given MAX, else this many times the
    # example's size.
    default_max_factor: int | None = None
    # The smallest size the artifact takes in a dynamic dim (AOTInductor's compiled code assumes >= 2).
    min_size: int = 1

    def applied(self, dynamic: Resolved | None) -> Resolved | None:
        """`dynamic` with this format's bounds: a MAX where it needs one, its smallest size."""
        if dynamic is None:
            return None
        return dynamic.bounded(self.default_max_factor).floored(self.min_size)


def parse_dynamic(values: Sequence[str], dynamic_batch: bool = False) -> DynamicSpec | None:
    """`--dynamic` values (and `--dynamic-batch`, which means `--dynamic 0`) into one spec; a malformed one is exit 2."""
    entries = [DynamicEntry(None, (DimRange(0),))] if dynamic_batch else []
    for value in values:
        text = str(value).strip()
        name, sep, dims_text = text.rpartition("=")
        if sep and not _NAME.match(name.strip()):
            raise UsageError(f"--dynamic {text[:80]!r}: {name.strip()[:60]!r} is not an input name", hint=SYNTAX)
        dims = []
        for part in dims_text.split(","):
            m = _DIM.match(part.strip())
            if not m:
                raise UsageError(f"--dynamic {text[:80]!r}: {part.strip()[:40]!r} is not a dim", hint=SYNTAX)
            dim = int(m.group(1))
            lo = int(m.group(2)) if m.group(2) else None
            hi = int(m.group(3)) if m.group(3) else None
            if lo is not None and hi is not None and lo > hi:
                raise UsageError(f"--dynamic {text[:80]!r}: dim {dim}'s range {lo}..{hi} is empty (MIN > MAX)")
            if hi is not None and hi < 1:
                raise UsageError(f"--dynamic {text[:80]!r}: dim {dim}'s MAX must be >= 1")
            dims.append(DimRange(dim, lo, hi))
        entries.append(DynamicEntry(name.strip() if sep else None, tuple(dims)))
    return DynamicSpec(tuple(entries)) if entries else None


@dataclass(frozen=True)
class DynamicDim:
    """One dynamic dim of one input tensor of the example."""

    leaf: int  # position among the example's tensor leaves (flattened args, then kwargs)
    input: str  # x, batch['input_ids'], xs[0]
    dim: int
    size: int  # the example's
    min: int | None
    max: int | None
    entry: int  # the spec entry that asked for it
    max_default: bool = False  # max set by the format's default, not by the flag

    def label(self) -> str:
        return f"{self.input} dim {self.dim}"


@dataclass(frozen=True)
class Resolved:
    """The spec applied to the example inputs: every (input, dim) that is dynamic, with its bounds."""

    spec: DynamicSpec
    dims: tuple[DynamicDim, ...]

    def of_leaf(self, leaf: int) -> list[DynamicDim]:
        return [d for d in self.dims if d.leaf == leaf]

    def bounded(self, factor: int | None) -> Resolved:
        """Every dim with an upper bound: its MAX, else `factor` times the example's size (formats that plan
        memory ahead)."""
        if factor is None:
            return self
        return replace(self, dims=tuple(d if d.max is not None else replace(d, max=factor * d.size, max_default=True)
                                        for d in self.dims))

    def floored(self, min_size: int) -> Resolved:
        """Every dim's MIN at least `min_size`."""
        if min_size <= 1:
            return self
        return replace(self, dims=tuple(d if (d.min or 0) >= min_size else replace(d, min=min_size)
                                        for d in self.dims))

    def groups(self) -> list[list[DynamicDim]]:
        """Dims that vary together: the same dim index and the same example size (input_ids and attention_mask
        share their length); each group is checked alone and all groups together."""
        out: dict[tuple[int, int], list[DynamicDim]] = {}
        for d in self.dims:
            out.setdefault((d.dim, d.size), []).append(d)
        return list(out.values())

    def runs(self) -> list[tuple[str, dict[int, dict[int, int]]]]:
        """(label, {leaf: {dim: size}}) for every other size verification checks: each group smaller and larger
        than the example (within its bounds) alone, then all groups at once."""
        groups = self.groups()
        picks = [_other_sizes(g) for g in groups]
        out: list[tuple[str, dict[int, dict[int, int]]]] = []
        for g, sizes in zip(groups, picks):
            for s in sizes:
                out.append(_run([(g, s)]))
        if len(groups) > 1:
            for i in range(2):
                chosen = [(g, sizes[min(i, len(sizes) - 1)]) for g, sizes in zip(groups, picks) if sizes]
                if len(chosen) > 1:
                    out.append(_run(chosen))
        return list({label: (label, sizes) for label, sizes in out}.values())

    def flag_with(self, target: DynamicDim, dim: DimRange | None) -> str:
        """The run's --dynamic flags with `target`'s dim (in every input it was asked for) replaced by `dim`
        (None: dropped)."""
        return self.flags_with({target.dim: dim}, {d.entry for d in self.dims if d.dim == target.dim})

    def flags_with(self, dims: dict[int, DimRange | None], entries: set[int]) -> str:
        out = []
        for n, e in enumerate(self.spec.entries):
            if n in entries:
                e = DynamicEntry(e.name, tuple(x for x in ((dims.get(x.dim, x) if x.dim in dims else x)
                                                          for x in e.dims) if x is not None))
            out.append(e)
        return DynamicSpec(tuple(out)).flags()

    def without_run(self, sizes: dict[int, dict[int, int]]) -> str:
        """The flags with the dims a failing run changed dropped: what to export with instead."""
        changed = {dim for leaf in sizes.values() for dim in leaf}
        return self.flags_with(dict.fromkeys(changed), {d.entry for d in self.dims if d.dim in changed})


def _other_sizes(group: list[DynamicDim]) -> list[int]:
    d = group[0]
    # torch.export's dims start at 2 (sizes 0 and 1 are specialized), its batch at 1: smaller sizes are not claimed.
    lo = max(1 if d.dim == 0 else 2, *(x.min or 1 for x in group))
    hi = min((x.max for x in group if x.max is not None), default=None)
    smaller = max(lo, d.size // 2)
    larger = 2 * d.size + 1 if hi is None else min(hi, 2 * d.size + 1)
    return [s for s in dict.fromkeys((smaller, larger)) if s != d.size]


def _run(chosen: list[tuple[list[DynamicDim], int]]) -> tuple[str, dict[int, dict[int, int]]]:
    sizes: dict[int, dict[int, int]] = {}
    parts = []
    for group, size in chosen:
        for d in group:
            sizes.setdefault(d.leaf, {})[d.dim] = size
        names = "/".join(dict.fromkeys(d.input for d in group))
        parts.append(f"{names} dim {group[0].dim} = {size}")
    return ", ".join(parts), sizes


def leaf_names(module: Any, args: tuple, kwargs: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(display name, the names NAME= may use) of every tensor leaf, in tree_flatten's order: forward's parameter
    name, and the keys of the dicts on the way (batch['input_ids'] answers to batch and input_ids)."""
    import inspect

    import torch

    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        params = []
    out: list[tuple[str, tuple[str, ...]]] = []

    def walk(value: Any, shown: str, names: tuple[str, ...]) -> None:
        if isinstance(value, torch.Tensor):
            out.append((shown, names))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{shown}[{k!r}]", (*names, str(k)))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{shown}[{i}]", names)

    for i, a in enumerate(args):
        name = params[i] if i < len(params) and params[i] not in ("args", "kwargs") else f"args[{i}]"
        walk(a, name, (name,))
    for k, v in kwargs.items():
        walk(v, str(k), (str(k),))
    return out


def resolve(spec: DynamicSpec, module: Any, example: Any) -> Resolved:
    """The spec on the example: unknown names, dims past an input's rank, example sizes outside the bounds or of 1
    (torch.export specializes them) are exit 2, naming the input and the dim."""
    tensors = example.tensors()
    names = leaf_names(module, tuple(example.args), dict(example.kwargs))
    if len(names) != len(tensors):
        names = [(f"input {i}", (f"input {i}",)) for i in range(len(tensors))]
    chosen: dict[tuple[int, int], DynamicDim] = {}
    for n, entry in enumerate(spec.entries):
        leaves = [i for i, (_, aliases) in enumerate(names) if entry.name is None or entry.name in aliases]
        if not leaves:
            known = ", ".join(dict.fromkeys(a for _, aliases in names for a in aliases)) or "none"
            raise UsageError(f"--dynamic {entry.text()}: no input is called {entry.name!r}",
                             hint=f"Input names (forward's parameters and dict keys): {known}.")
        for r in entry.dims:
            fits = [i for i in leaves if tensors[i].dim() > r.dim]
            if not fits or (entry.name is not None and len(fits) < len(leaves)):
                rank = ", ".join(f"{names[i][0]} has {tensors[i].dim()}" for i in leaves if i not in fits)
                raise UsageError(f"--dynamic {entry.text()}: dim {r.dim} is out of range ({rank} dims)",
                                 hint="Dims count from 0: --dynamic 0 is the batch.")
            for i in fits:
                size = int(tensors[i].shape[r.dim])
                chosen[(i, r.dim)] = DynamicDim(i, names[i][0], r.dim, size, r.min, r.max, n)
    for d in chosen.values():
        _check_example_size(d, spec, tuple(int(x) for x in tensors[d.leaf].shape), str(tensors[d.leaf].dtype))
    return Resolved(spec, tuple(sorted(chosen.values(), key=lambda d: (d.leaf, d.dim))))


def _check_example_size(d: DynamicDim, spec: DynamicSpec, shape: tuple[int, ...], dtype: str) -> None:
    if d.size < 2:
        what = "a batch of 2 or more" if d.dim == 0 else f"a size of 2 or more in dim {d.dim}"
        wanted = ",".join(str(2 if i == d.dim else n) for i, n in enumerate(shape))
        raise UsageError(
            f"{spec.flags()}: {d.label()} is {d.size} in the example inputs; dynamic dims need {what}: torch.export "
            "specializes dimensions of size 0 and 1",
            hint=f"Give example inputs with that dim >= 2, e.g. --input {dtype.removeprefix('torch.')}[{wanted}] "
            "(or --example-inputs FILE).",
        )
    if (d.min is not None and d.size < d.min) or (d.max is not None and d.size > d.max):
        raise UsageError(f"{spec.flags()}: {d.label()} is {d.size} in the example inputs, outside its range "
                         f"{d.min if d.min is not None else ''}..{d.max if d.max is not None else ''}",
                         hint="The example must be one of the sizes the artifact takes.")


def dynamic_batch(module: Any, example: Any) -> Resolved | None:
    """Dim 0 of every input dynamic (for graphs fed batches of any size, e.g. calibration); None where it cannot be
    (a batch of 1 in the example, an input of rank 0 only)."""
    try:
        return resolve(DynamicSpec((DynamicEntry(None, (DimRange(0),)),)), module, example)
    except UsageError:
        return None
