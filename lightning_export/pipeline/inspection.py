"""`lexport inspect`: what a checkpoint holds, read from its metadata, without importing any user code.

The checkpoint is opened by the same safe loader as an export (weights_only; tensors memory-mapped, so tensor
data is not read; a sharded folder's tensors are described by its metadata and never read). The state dict is summarized as a tree of submodule paths, the candidates for `--attr`; the rest
of the file (optimizer states, callbacks, loops) is measured by the bytes of the tensors it holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bounded import iter_containers, short_repr

# hparams values shown as they are when they are plain data of at most this many leaves; else their type.
_MAX_PLAIN_LEAVES = 64
_PLAIN = (type(None), bool, int, float, str)


@dataclass
class Node:
    """A prefix of state-dict keys: `model`, `model.encoder`, `model.encoder.0`."""

    path: str
    tensors: int = 0
    elements: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)

    def add(self, t: Any) -> None:
        self.tensors += 1
        self.elements += t.numel()
        self.bytes += t.numel() * t.element_size()
        dtype = str(t.dtype).removeprefix("torch.")
        self.dtypes[dtype] = self.dtypes.get(dtype, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tensors": self.tensors,
            "elements": self.elements,
            "bytes": self.bytes,
            "dtypes": dict(sorted(self.dtypes.items())),
        }


def submodule_tree(state_dict: Mapping[str, Any]) -> list[Node]:
    """One Node per key prefix that names a submodule (every key minus its last part, and their parents), in
    key order; the candidates for --attr."""
    nodes: dict[str, Node] = {}
    for key, t in state_dict.items():
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            nodes.setdefault(prefix, Node(prefix)).add(t)
    return list(nodes.values())


class _NotPlain(Exception):
    pass


def plain_value(value: Any) -> tuple[bool, Any]:
    """(True, a JSON-ready copy) when `value` is plain data (JSON types, no shared or recursive containers) of
    at most _MAX_PLAIN_LEAVES items; else (False, its type name). Bounded whatever the value's shape."""
    budget = [_MAX_PLAIN_LEAVES]
    seen: set[int] = set()

    def conv(v: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0 or depth > 8:
            raise _NotPlain
        if isinstance(v, _PLAIN):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            return v[:500] if isinstance(v, str) else v
        if not isinstance(v, (dict, list, tuple)) or id(v) in seen:
            raise _NotPlain
        seen.add(id(v))
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise _NotPlain
            return {k: conv(x, depth + 1) for k, x in v.items()}
        return [conv(x, depth + 1) for x in v]

    try:
        return True, conv(value, 0)
    except _NotPlain:
        return False, _type_name(value)


def _type_name(value: Any) -> str:
    from ..safeload.placeholders import Unloaded

    if isinstance(value, Unloaded):
        return f"{value.what} (not loaded)"
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def _tensor_bytes(value: Any) -> tuple[int, int]:
    """(tensors, bytes of their distinct storages) reachable from value; each container is visited once."""
    import torch

    storages: dict[int, int] = {}
    count = 0
    try:
        containers = list(iter_containers(value))
    except ValueError:  # nested too deeply to be a checkpoint entry: counted as holding no tensors
        containers = []
    leaves = [value] + [v for c in containers for v in (c.values() if isinstance(c, dict) else c)]
    for v in leaves:
        if isinstance(v, torch.Tensor):
            count += 1
            s = v.untyped_storage()
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    return count, sum(storages.values())


def inspect_checkpoint(
    path: str | Path, *, trust: bool = False, allow_globals: tuple[str, ...] = (), max_growth: float | None = None
) -> dict[str, Any]:
    """The JSON-ready summary of a checkpoint (max_growth: the loader's bound, None for its default). Raises the
    loader's CheckpointError/UsageError."""
    from ..sources import load_checkpoint
    from ..statedict import tensor_specs

    path = Path(path)
    kwargs: dict[str, Any] = {"trust": trust, "allow_globals": allow_globals, "hash_file": False}
    if max_growth is not None:
        kwargs["max_growth"] = max_growth
    ckpt = load_checkpoint(path, **kwargs)
    # Shapes and dtypes only: memory-mapped tensors of a file, the metadata's entries of a sharded folder (whose
    # tensors are read only when asked for, and never are here).
    specs = tensor_specs(ckpt.state_dict)
    tree = submodule_tree(specs)
    total = Node("")
    for t in specs.values():
        total.add(t)

    hparams: dict[str, Any] = {}
    objects: dict[str, str] = {}
    for name, value in ckpt.hparams.items():
        if name in ("_class_path", "_instantiator"):
            continue
        plain, shown = plain_value(value)
        (hparams if plain else objects)[name] = shown
    class_path = ckpt.hparams.get("_class_path")
    class_path = class_path if isinstance(class_path, str) else None

    other: dict[str, Any] = {}
    if not ckpt.plain:
        for key, value in ckpt.raw.items():
            if key in ("state_dict", "hyper_parameters"):
                continue
            count, nbytes = _tensor_bytes(value)
            if count:
                other[str(key)] = {"tensors": count, "bytes": nbytes}
    other.update(ckpt.skipped())  # a sharded folder: its unread entries (optimizer states)

    top = [n for n in tree if "." not in n.path]
    candidate = max(top, key=lambda n: n.elements).path if top else None
    return {
        "path": str(path),
        "file_bytes": ckpt.file_bytes,
        "plain_state_dict": ckpt.plain,
        "lightning_version": ckpt.lightning_version,
        "epoch": ckpt.epoch,
        "global_step": ckpt.global_step,
        "class_path": class_path,
        "hparams": hparams,
        "hparams_objects": objects,
        "weights": total.to_json() | {"path": None},
        "submodules": [n.to_json() for n in tree],
        "not_weights": other,
        "suggestion": suggest_command(path, class_path, candidate),
    }


def suggest_command(path: Path, class_path: str | None, attr: str | None) -> str:
    import shlex

    module = class_path.rsplit(".", 1) if class_path else None
    module_flag = f"--module {module[0]}:{module[1]}" if module and len(module) == 2 else "--module pkg.mod:YourModule"
    attr_flag = f" --attr {attr}" if attr else ""
    return f"lexport {shlex.quote(str(path))} {module_flag}{attr_flag} --to onnx"


def describe(summary: dict[str, Any]) -> list[str]:
    """Short human lines for the parts of the summary that are not tables."""
    lines = []
    v = summary["lightning_version"]
    lines.append(
        f"{summary['path']}: "
        + ("a plain state dict" if summary["plain_state_dict"] else f"Lightning {v or '(version not recorded)'}")
        + (f", epoch {summary['epoch']}" if summary["epoch"] is not None else "")
        + (f", global_step {summary['global_step']}" if summary["global_step"] is not None else "")
    )
    if summary["class_path"]:
        lines.append(f"class recorded by LightningCLI: {summary['class_path']} (never imported by lexport)")
    for name, value in summary["hparams"].items():
        lines.append(f"hparam {name} = {short_repr(value, 100)}")
    for name, typename in summary["hparams_objects"].items():
        lines.append(f"hparam {name}: a {typename} object")
    return lines
