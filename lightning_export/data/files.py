"""`--data FILE.pt`: a list of batches saved with torch.save, loaded under the checkpoint loader's rules.

The file goes through `safeload.loader.load_verified`, the loader every checkpoint file goes through: a regular file
only (no FIFO, no device), its zip directory checked before torch reads it (records inside the file, no overlaps,
no zip bomb past the growth bound), weights_only unpickling (never retried without it), and then every tensor in
it is proven to lie inside its storage, the storages to be bounded by the file's size, and their bytes to match
the zip's CRC-32. Nothing here calls torch.load itself.

What the file must hold: a list (or tuple) of batches, each in forward's argument structure as for
`--example-inputs` (a tensor, a tuple/list of positional arguments, a dict of keyword arguments), or a
dataloader-style batch (`(x, y)`) that `batches.to_inputs` maps to forward's arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import Advice, CheckpointError, UsageError

FILE_HINT = (
    "Save a list of batches with torch.save, e.g. torch.save([x for x, _ in loader][:10], 'data.pt') or "
    "torch.save(list(loader)[:10], 'data.pt'): tensors, tuples/lists and dicts of tensors, plain numbers and strings."
)


def load_batches_file(path: str | os.PathLike[str], *, max_growth: float | None = None) -> list[Any]:
    """The batches of a `--data` file, in file order.

    Raises UsageError (exit 2) naming `--data PATH` when the file is missing, not a regular file, corrupt or
    crafted (records outside the file, tensors claiming more bytes than the file holds, a zip bomb), holds a
    global weights_only refuses (any class or function other than torch's tensor rebuilders), or does not hold a
    non-empty list of batches of tensors."""
    p = Path(path)
    return _as_batch_list(load_tensor_file(p, "--data", FILE_HINT, max_growth=max_growth), p)


def load_tensor_file(path: Path, flag: str, hint: str, *, max_growth: float | None = None) -> Any:
    """What a torch.save file of tensors in lists, tuples and dicts holds (`--data`, `--example-inputs`), loaded
    by the checkpoint loader under all its checks; every failure is a UsageError naming `flag PATH`."""
    from ..bounded import TooDeep
    from ..safeload.archive import DEFAULT_MAX_GROWTH
    from ..safeload.loader import load_verified
    from ..safeload.placeholders import unloaded_in
    from ..safeload.subject import Subject

    p = Path(path)
    growth = DEFAULT_MAX_GROWTH if max_growth is None else max_growth

    def select(obj: Any) -> tuple[Any, dict[str, Any]]:
        held = unloaded_in(obj)
        if held:
            # The checkpoint loader turns globals it may not import into inert placeholders (hparams often hold
            # them); data never needs one.
            raise UsageError(
                f"{flag} {p}: it names {', '.join(sorted(set(held))[:5])}, which weights_only loading does not "
                f"allow; a {flag} file holds only tensors, numbers and strings in lists, tuples and dicts",
                hint=hint,
            )
        try:
            tensors = _tensors(obj)
        except TooDeep as e:
            raise UsageError(f"{flag} {p}: {e}", hint=hint) from None
        return obj, tensors

    try:
        # The loader names the file as `flag PATH`, a torch.save file (never a checkpoint) in every message.
        return load_verified(p, select, trust=False, allow_globals=(), max_growth=growth, subject=Subject.flagged(flag))
    except CheckpointError as e:
        if e.advice is Advice.MAX_GROWTH:
            raise UsageError(e.message, advice=e.advice) from e
        # --allow-global and --trust-checkpoint are the checkpoint's flags: a data file never needs them.
        raise UsageError(e.message, hint=hint) from e


def _tensors(obj: Any) -> dict[str, Any]:
    """Every tensor reachable from `obj` (each container visited once, depth bounded), keyed for messages."""
    import torch

    from ..bounded import iter_containers

    found: dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        return {"batch": obj}
    for c in iter_containers(obj):
        items = c.items() if isinstance(c, dict) else enumerate(c)
        for k, v in items:
            if isinstance(v, torch.Tensor):
                found[f"tensor {len(found)} ({str(k)[:40]})"] = v
    return found


def _as_batch_list(obj: Any, path: Path) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        raise UsageError(
            f"--data {path} holds one tensor {list(obj.shape)}, not a list of batches",
            hint="Wrap it: torch.save([batch], path), or split a big tensor into batches: "
            "torch.save(list(x.split(64)), path).",
        )
    if not isinstance(obj, (list, tuple)):
        raise UsageError(f"--data {path} holds a {type(obj).__name__}, not a list of batches", hint=FILE_HINT)
    if not obj:
        raise UsageError(f"--data {path} holds an empty list: no batches", hint=FILE_HINT)
    for i, batch in enumerate(obj):
        if not _has_tensor(batch):
            raise UsageError(f"--data {path}: batch {i} holds no tensor ({type(batch).__name__})", hint=FILE_HINT)
    return list(obj)


def _has_tensor(batch: Any) -> bool:
    import torch

    from ..bounded import iter_containers

    if isinstance(batch, torch.Tensor):
        return True
    return any(
        isinstance(v, torch.Tensor)
        for c in iter_containers(batch)
        for v in (c.values() if isinstance(c, dict) else c)
    )
