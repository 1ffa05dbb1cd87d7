"""What every checkpoint source opens into: the Checkpoint the pipeline sees, and the helpers to make one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import CheckpointError
from ..hashing import Hasher
from ..safeload.archive import DEFAULT_MAX_GROWTH
from ..safeload.placeholders import Unloaded, unloaded_in
from ..safeload.policy import allow_global_flag
from ..text import printable


@dataclass(frozen=True)
class OpenOptions:
    """How a source opens a checkpoint: the loader's trust, --allow-global, the growth bound, and whether the
    checkpoint's sha256 is taken in the background from the start."""

    trust: bool = False
    allow_globals: tuple[str, ...] = ()
    max_growth: float = DEFAULT_MAX_GROWTH
    hash_file: bool = True


class Source(Protocol):
    """One kind of checkpoint (a module in sources/): `detect` says whether a path is one, without reading it
    beyond a directory listing; `open` reads it into a Checkpoint (CheckpointError for anything wrong)."""

    def detect(self, path: Path) -> bool: ...

    def open(self, path: Path, options: OpenOptions) -> Checkpoint: ...


@dataclass
class Checkpoint:
    path: Path
    raw: dict[str, Any]  # the whole loaded object (tensors are memory-mapped, never copied)
    # A dict of (memory-mapped) tensors for a file; for a sharded folder a statedict.LazyTensors, which reads a
    # tensor when asked for it: use tensor_specs() for shapes and dtypes, items() to visit tensors one at a time.
    state_dict: Mapping[str, Any]
    plain: bool  # True when the file is a bare state dict, not a Lightning checkpoint
    hparams: dict[str, Any] = field(default_factory=dict)
    sha: Hasher | None = None  # how its sha256 is taken: a folder's differs from a file's
    file_bytes: int = 0  # the bytes of the files that hold it (a folder's: the files lexport reads)
    # Top-level entries left unread (a sharded folder's optimizer states) -> their tensors and bytes; for inspect.
    skipped: Callable[[], dict[str, dict[str, int]]] = dict

    # Metadata goes into the JSON report: only plain values of the expected type, whatever the file holds.
    @property
    def lightning_version(self) -> str | None:
        for key in ("pytorch-lightning_version", "lightning_version"):
            value = self.raw.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    @property
    def epoch(self) -> int | None:
        return _plain_int(self.raw.get("epoch"))

    @property
    def global_step(self) -> int | None:
        return _plain_int(self.raw.get("global_step"))

    @property
    def sha256(self) -> str:
        return (self.sha or Hasher(self.path)).result()


def _plain_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_tensor_mapping(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def hparams_dict(value: Any) -> dict[str, Any]:
    """hyper_parameters as a dict of str keys: a dict, or a Namespace-like object (allowed with --allow-global);
    anything else (None, a tensor or list in a damaged file) gives no hyper-parameters."""
    import torch

    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(k, str)}
    if value is not None and not isinstance(value, (torch.Tensor, list, tuple, str, bytes, int, float)):
        try:
            return {k: v for k, v in vars(value).items() if isinstance(k, str)}
        except TypeError:
            return {}
    return {}


def as_checkpoint(path: Path, obj: Any, hasher: Hasher | None, *, file_bytes: int = 0) -> Checkpoint:
    """The Checkpoint of a loaded object: a Lightning checkpoint (a dict with a state_dict of tensors) or a bare
    state dict; CheckpointError for anything else."""
    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
        if isinstance(sd, dict) and not sd:
            raise CheckpointError(f"{path}: its 'state_dict' entry is empty (no tensors to export)")
        if not is_tensor_mapping(sd):
            names = unloaded_in(sd) if isinstance(sd, (Unloaded, dict)) else []
            flag = allow_global_flag(names)
            raise CheckpointError(
                f"{path}: its 'state_dict' entry does not hold tensors"
                + (f" (it holds objects that were not loaded: {printable(', '.join(names))})" if names else ""),
                hint=f"If you know these classes, allow them:\n{flag}" if flag else None,
            )
        hparams = hparams_dict(obj.get("hyper_parameters"))
        return Checkpoint(path, obj, dict(sd), plain=False, hparams=hparams, sha=hasher, file_bytes=file_bytes)
    if is_tensor_mapping(obj):
        return Checkpoint(path, {"state_dict": obj}, dict(obj), plain=True, sha=hasher, file_bytes=file_bytes)
    what = type(obj).__name__
    if isinstance(obj, dict):
        keys = printable(", ".join(map(str, list(obj)[:8]))) or "nothing"
        raise CheckpointError(
            f"{path} holds a {what} without a 'state_dict' entry and is not a state dict of tensors (keys: {keys})"
        )
    raise CheckpointError(f"{path} holds a {what}, not a Lightning checkpoint or a state dict of tensors")
