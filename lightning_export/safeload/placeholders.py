"""Placeholders: the inert objects the weights_only unpickler builds for globals it would refuse.

hyper_parameters often hold objects: save_hyperparameters(logger=False) pickles the `net` module and Hydra's
partial optimizers, forecasting libraries pickle metrics and numpy arrays. The weights never need them, so the
weights_only unpickler itself builds an inert placeholder for each such global instead of refusing the file.

Why this runs no code from the file. torch's weights_only unpickler calls only torch's own allowlisted functions
(tensor and storage rebuilders, dtypes, OrderedDict, ...) and the objects passed in safe_globals. lexport passes,
for every global name torch would refuse, a fresh subclass of Unloaded keyed by that name (torch accepts
(object, "module.Name") pairs): the name is a string, nothing is imported or looked up. Unloaded's __new__,
__init__ and __setstate__ ignore their arguments, so calling it (REDUCE), creating it (NEWOBJ) or building it
(BUILD) does nothing. Tensors still come only through torch's rebuild functions, and the state dict must hold
nothing but torch.Tensor values (a placeholder is not one). A file that names anything from a module whose objects
run code (os, subprocess, builtins.eval, ...) is refused as before and never loaded with placeholders, so its
refusal still says what it is. tests/test_security.py runs such pickles and checks that no marker file appears."""

from __future__ import annotations

from typing import Any

from ..errors import UserModuleError
from ..text import printable
from .policy import allow_global_flag, hint_refusal


class Unloaded:
    """An object of the checkpoint that the safe loader did not load; `name` is the global the pickle named.
    What the pickle passed to it (arguments, state) is kept as data, never used: so the names of objects nested
    inside it (a module's submodules) can be listed."""

    __slots__ = ("args", "state")
    name = "?"
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> Unloaded:
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.what} (not loaded)>"

    @property
    def what(self) -> str:
        """The name for messages: escaped (a name from a file carries no terminal control sequences)."""
        return "numpy.ndarray" if self.name.endswith("multiarray._reconstruct") else printable(self.name)


def placeholder(name: str) -> type[Unloaded]:
    return type(name.rpartition(".")[2] or name, (Unloaded,), {"__slots__": (), "name": name})


class _WalkBudget(Exception):
    pass


def unloaded_in(value: Any, budget: list[int] | None = None) -> list[str]:
    """The global names of every placeholder inside `value` (a hyper-parameter), nested ones included, sorted.
    Containers, objects' attributes (an OrderedDict's __dict__, a tensor's, an allowed class's) and placeholders'
    kept arguments are looked into; each object once, so one walk is bounded by what the file holds. `budget`
    (a one-item list) is shared by several walks and raises _WalkBudget when spent."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if budget is not None:  # every step counts, repeats included: they are the work a shared object makes
            budget[0] -= 1
            if budget[0] < 0:
                raise _WalkBudget
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, Unloaded):
            found.add(v.name)
            stack.extend((v.args, v.state))
            continue
        if isinstance(v, type):
            if issubclass(v, Unloaded):  # a class passed as data (ndarray, Adam)
                found.add(v.name)
            continue
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        attrs = getattr(v, "__dict__", None)  # Namespace, OrderedDict and tensor attributes, allowed classes
        if isinstance(attrs, dict):
            stack.extend(attrs.values())
    return sorted(found)


# Walks of hyper_parameters one key at a time may meet the same shared objects once per key; together they stop
# here (a few seconds), and the keys not walked by then count as holding the objects found in the whole.
WALK_BUDGET = 4_000_000


def unloaded_by_key(mapping: dict[str, Any]) -> dict[str, list[str]]:
    """key -> the placeholders inside mapping[key], for the keys that hold any. One walk of the whole first: a
    mapping without placeholders (the usual case) costs that walk only, whatever its keys share."""
    everything = unloaded_in(mapping)
    if not everything:
        return {}
    budget, out = [WALK_BUDGET], {}
    for k, v in mapping.items():
        try:
            names = unloaded_in(v, budget)
        except _WalkBudget:
            names = everything  # not walked to the end: assume the worst, it is only ever refused for that
        if names:
            out[k] = names
    return out


class UnloadedArgumentsError(UserModuleError):
    """The module cannot be built: constructor arguments are objects the safe loader left unloaded. Weights formats
    do not need the module, so an export of only those goes on without it (`arguments`: the names)."""

    def __init__(self, message: str, *, hint: str | None = None, arguments: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint=hint)
        self.arguments = arguments


def unloaded_arguments_error(cls_name: str, held: dict[str, list[str]], values: dict[str, Any]
                             ) -> UnloadedArgumentsError:
    """The error for constructor arguments that the checkpoint holds only as placeholders: which, and where to give
    them; and, when every object inside them is a class that may be allowed, the one --allow-global line that loads
    them all (nested objects included), so one round is enough."""
    names = sorted({n for v in held.values() for n in v})
    what = ", ".join(f"{printable(k)}: a {values[k].what}" if isinstance(values.get(k), Unloaded)
                     else f"{printable(k)}: holds objects" for k in held)
    args = printable(", ".join(held))  # keys come from the file too
    first = printable(next(iter(held)))
    hint = (
        "Give them yourself: --config FILE (the run's LightningCLI config.yaml or Hydra .hydra/config.yaml), "
        f"--init-args FILE, or --init-arg {first}=VALUE (a submodule as {{class_path: pkg.mod.Class, init_args: ...}})."
    )
    refused = [printable(n) for n in names if hint_refusal(n)]
    if refused:
        hint += (f"\n{', '.join(refused)} cannot be allowed (only classes can), so --allow-global cannot load "
                 f"{'it' if len(refused) == 1 else 'them'}; --trust-checkpoint can (full unpickling: runs code from "
                 "the file).")
    else:
        hint += ("\nOr load the real objects, if you trust these classes (only they are unpickled):\n"
                 f"{allow_global_flag(names)}")
    return UnloadedArgumentsError(
        f"{cls_name}.__init__ needs {args}, which the checkpoint's hyper_parameters hold as objects that lexport did "
        f"not load ({what}): loading them would run code from the file",
        hint=hint,
        arguments=tuple(printable(k) for k in held),
    )
