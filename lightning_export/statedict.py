"""State dicts as lexport handles them: a dict of (memory-mapped) tensors, or a LazyTensors mapping whose tensors
are read when asked for (a sharded folder). Both are recognised by type, never by the methods they happen to have."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any


class LazyTensors(MutableMapping):
    """A state dict whose tensors are read when asked for. Keys, shapes and dtypes are known without reading:
    `specs()` gives meta tensors; `renamed()` a view under other keys; iterating `items()` holds one tensor at a
    time. Subclasses: one per source that reads lazily."""

    def specs(self) -> dict[str, Any]:
        raise NotImplementedError

    def renamed(self, names: dict[str, str]) -> LazyTensors:
        """A view with keys `new` for each `new -> old` of `names` (old: a key of this mapping)."""
        raise NotImplementedError


def is_lazy(state_dict: Any) -> bool:
    return isinstance(state_dict, LazyTensors)


def tensor_specs(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """key -> something with the tensor's shape, dtype, numel() and element_size(), without reading any data: the
    tensors themselves for a loaded state dict, meta tensors for one read lazily (a sharded folder)."""
    return state_dict.specs() if isinstance(state_dict, LazyTensors) else state_dict


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """The entries under `prefix`, prefix removed. A lazily read state dict (a sharded folder) gives a lazy view:
    no tensor is read here."""
    if isinstance(state_dict, LazyTensors):
        return state_dict.renamed({k[len(prefix):]: k for k in state_dict if k.startswith(prefix)})
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
