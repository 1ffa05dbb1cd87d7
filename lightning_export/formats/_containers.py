"""Outputs torch.export cannot save, exported as plain containers of the same leaves.

torch.export.save (and the AOTInductor package, which stores the same output spec) writes the output's pytree
spec by type name: a namedtuple needs a registered serialization name (one defined inside a function, as
pytorch-forecasting's, cannot even be imported back), and dataclasses or dict subclasses (Hugging Face's
ModelOutput is an OrderedDict subclass) that were never registered are not pytree nodes at all. While a
torch.export-based format exports, forward's result is rebuilt as plain tuples (namedtuples) and dicts (dict
subclasses, dataclasses: their fields) holding the same leaves in the same order; containers torch.export can
save are kept as they are. Verification compares leaves in order, so it checks the same tensors."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from typing import Any

_PLAIN = (tuple, list, dict, OrderedDict, defaultdict)


@dataclasses.dataclass(frozen=True)
class Converted:
    """One container of forward's output rebuilt as a plain one."""

    where: str  # output, output[0], output['x']
    type: str  # module.qualname
    kind: str  # namedtuple, dataclass, dict subclass
    plain: str  # tuple or dict
    fields: tuple[str, ...]
    importable: bool = True  # whether module.qualname names this type (not for one made inside a function)

    def describe(self) -> str:
        local = "" if self.importable else " defined inside a function"
        what = f"{self.where} is a {self.kind}{local} ({self.type.rsplit('.', 1)[-1]})"
        return f"{what}, saved as a plain {self.plain} of its fields {', '.join(self.fields)}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"fields": list(self.fields)}


def _serializable(t: type) -> bool:
    """Whether torch's pytree can serialize a node of type t: registered with a serialized type name."""
    from torch.utils import _pytree as pytree

    node = pytree.SUPPORTED_SERIALIZED_TYPES.get(t)
    none = getattr(pytree, "NO_SERIALIZED_TYPE_NAME_FOUND", None)
    return node is not None and getattr(node, "serialized_type_name", none) != none


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _importable(t: type) -> bool:
    """Whether the type is what its module.qualname names (a namedtuple made inside a function is not)."""
    import sys

    obj: Any = sys.modules.get(t.__module__)
    for part in t.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is t


def to_plain(value: Any, found: list[Converted], where: str = "output") -> Any:
    """`value` with every container torch.export cannot save rebuilt as a plain tuple or dict of the same leaves,
    in order (the same object when nothing inside it needed it); each rebuilt container is added to `found`."""
    from torch.utils._pytree import is_namedtuple_instance

    t = type(value)
    if t in _PLAIN or not isinstance(value, (tuple, list, dict)) and not _is_dataclass_instance(value):
        if isinstance(value, dict):
            items = {k: to_plain(v, found, f"{where}[{k!r}]") for k, v in value.items()}
            if all(items[k] is value[k] for k in value):
                return value
            return defaultdict(value.default_factory, items) if isinstance(value, defaultdict) else t(items)
        if isinstance(value, (tuple, list)):
            items_l = [to_plain(v, found, f"{where}[{i}]") for i, v in enumerate(value)]
            return value if all(a is b for a, b in zip(items_l, value)) else t(items_l)
        return value
    if _serializable(t):
        return value  # torch.export saves it by its registered name
    if isinstance(value, tuple) and is_namedtuple_instance(value):
        fields = tuple(value._fields)  # type: ignore[attr-defined]
        found.append(Converted(where, _type_name(t), "namedtuple", "tuple", fields, _importable(t)))
        return tuple(to_plain(v, found, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        found.append(Converted(where, _type_name(t), "dict subclass", "dict", tuple(map(str, value))))
        return {k: to_plain(v, found, f"{where}[{k!r}]") for k, v in value.items()}
    if _is_dataclass_instance(value):
        names = tuple(f.name for f in dataclasses.fields(value))
        found.append(Converted(where, _type_name(t), "dataclass", "dict", names))
        return {n: to_plain(getattr(value, n), found, f"{where}[{n!r}]") for n in names}
    if isinstance(value, (tuple, list)):  # another tuple/list subclass torch cannot name
        found.append(Converted(where, _type_name(t), f"{'tuple' if isinstance(value, tuple) else 'list'} subclass",
                               "tuple" if isinstance(value, tuple) else "list", ()))
        return (tuple if isinstance(value, tuple) else list)(
            to_plain(v, found, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


@contextlib.contextmanager
def plain_outputs(module: Any) -> Iterator[list[Converted]]:
    """While exporting, module's forward returns plain containers (see to_plain); yields what was rebuilt (filled
    once forward has run, each container once). The instance's own forward attribute is restored afterwards."""
    found: list[Converted] = []
    original = module.forward
    had_own = "forward" in vars(module)
    saved = vars(module).get("forward")

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        seen: list[Converted] = []
        out = to_plain(original(*args, **kwargs), seen)
        found.extend(c for c in seen if c not in found)
        return out

    module.forward = forward
    try:
        yield found
    finally:
        if had_own:
            module.forward = saved
        else:
            del module.forward


def report(found: list[Converted]) -> tuple[list[str], dict[str, Any]]:
    """The report's note and info for what was rebuilt (nothing when nothing was)."""
    if not found:
        return [], {}
    note = ("torch.export cannot save forward's output containers: " + "; ".join(c.describe() for c in found)
            + " (same tensors, same order)")
    return [note], {"output_containers": [c.to_json() for c in found]}
