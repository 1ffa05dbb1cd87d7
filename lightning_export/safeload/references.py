"""Functions a checkpoint may refer to but never call while loading (policy.REFERENCE_FUNCTIONS: torchmetrics'
reducers, which a pickled Metric keeps in its state).

torch's weights_only unpickler lets the file call whatever it admits (REDUCE), with arguments the file chooses. A
Metric's pickle only refers to its reducers; so the unpickler gets, under each such name, a stand-in that refuses
to be called (the load fails, as for any other refused call). Once the file is loaded, every stand-in inside the
result (dict values, list items, objects' attributes: where a Metric keeps them) is replaced by the real function,
so the objects compare and behave as torchmetrics built them."""

from __future__ import annotations

import pickle
from typing import Any

from .placeholders import WALK_BUDGET
from .policy import REFERENCE_FUNCTIONS, qualname


class ReferenceCalled(pickle.UnpicklingError):
    """The file called a function it may only refer to; `name` is the function (safeload.messages reads it)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the file calls {name} while loading; a checkpoint only refers to it (torchmetrics keeps "
                         "it in a Metric's state), so lexport does not call it")
        self.name = name


class ReferenceOnly:
    """Stands for `function` while unpickling: referring to it is fine, calling it is refused."""

    __slots__ = ("function", "name")

    def __init__(self, function: Any, name: str) -> None:
        self.function, self.name = function, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ReferenceCalled(self.name)

    def __repr__(self) -> str:
        return f"<reference to {self.name}>"


def reference_only(obj: Any, name: str) -> ReferenceOnly | None:
    """A stand-in for an allowed object that may only be referred to, else None."""
    return ReferenceOnly(obj, name) if callable(obj) and (name in REFERENCE_FUNCTIONS or qualname(obj) in
                                                          REFERENCE_FUNCTIONS) else None


def restore_references(value: Any) -> Any:
    """`value` with every ReferenceOnly inside it replaced by its function, in place (each object visited once,
    at most WALK_BUDGET steps). Immutable containers (tuples) are rebuilt where their holder can take a new one."""
    if isinstance(value, ReferenceOnly):
        return value.function
    seen: set[int] = set()
    stack = [value]
    budget = WALK_BUDGET
    while stack and budget > 0:
        v = stack.pop()
        budget -= 1
        if id(v) in seen or isinstance(v, (str, bytes, int, float, type(None))):
            continue
        seen.add(id(v))
        holder = v if isinstance(v, (dict, list)) else getattr(v, "__dict__", None)
        if isinstance(holder, dict):
            for k, item in list(holder.items()):
                holder[k] = _restored(item)
                stack.append(holder[k])
        elif isinstance(holder, list):
            for i, item in enumerate(holder):
                holder[i] = _restored(item)
                stack.append(holder[i])
        if isinstance(v, dict) and isinstance(getattr(v, "__dict__", None), dict):
            stack.append(v.__dict__)
        elif isinstance(v, (tuple, set, frozenset)):
            stack.extend(v)
    return value


def _restored(item: Any) -> Any:
    if isinstance(item, ReferenceOnly):
        return item.function
    if isinstance(item, tuple) and any(isinstance(x, ReferenceOnly) for x in item) and type(item) is tuple:
        return tuple(x.function if isinstance(x, ReferenceOnly) else x for x in item)
    return item
