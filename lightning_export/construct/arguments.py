"""Constructor arguments: what LightningModule.load_from_checkpoint would pass to cls(...), plus the user's."""

from __future__ import annotations

import inspect
from typing import Any

from ..bounded import MAX_DEPTH, TooDeep, short_repr
from ..errors import CheckpointError, UserModuleError
from ..safeload.placeholders import unloaded_arguments_error, unloaded_by_key, unloaded_in
from .configs import describes_object, instantiate_arguments

# Keys LightningCLI adds to hyper_parameters; naming a class in a checkpoint must never import it.
_CLI_KEYS = ("_class_path", "_instantiator")


def _checked_hparams(loaded: dict[str, Any]) -> dict[str, bool]:
    """name -> whether the checkpoint's value describes an object by class_path/_target_; a value nested too
    deeply to be a hyper-parameter is the file's fault (exit 3)."""
    try:  # one walk of them all first: without class_path/_target_ anywhere (the usual case), shared values cost once
        if not describes_object(list(loaded.values())):
            return dict.fromkeys(loaded, False)
    except TooDeep:
        pass  # found again below, with the key's name
    out = {}
    for k, v in loaded.items():
        try:
            out[k] = describes_object(v)
        except TooDeep:
            raise CheckpointError(
                f"the checkpoint's hyper_parameters[{short_repr(k)}] is nested more than {MAX_DEPTH} levels deep; "
                "lexport does not pass such a value to a constructor",
                hint=f"Pass {short_repr(k)} yourself with --init-arg or --init-args FILE.",
            ) from None
    return out


def constructor_arguments(
    cls: type,
    hparams: dict[str, Any],
    raw: dict[str, Any],
    supplied: dict[str, Any],
    *,
    trust: bool,
    explicit: tuple[str, ...] = (),
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """What LightningModule.load_from_checkpoint would pass to cls(...), plus the user's arguments.

    `explicit` are names the user typed (--init-arg): one the constructor does not take is an error, since it is
    almost always a typo; names from files (--config, --init-args) it does not take are only a warning.
    """
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    has_varkw = any(p.kind == p.VAR_KEYWORD for p in params)
    loaded = _saved_arguments(hparams, raw, names)
    # Only the values the constructor takes are looked at: the rest is dropped unread.
    described = _checked_hparams(
        {k: v for k, v in loaded.items() if k not in supplied and (has_varkw or k in names)}
    )
    if not trust:
        _refuse_class_paths([k for k, has in described.items() if has])
    kwargs = {**loaded, **supplied}
    if not has_varkw:
        _check_names(cls, names, supplied, explicit, warnings)
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    from_file = {k: v for k, v in kwargs.items() if k not in supplied}
    held = unloaded_by_key(from_file)
    if held:  # objects the safe loader left as placeholders: the user gives them, or allows their classes
        raise unloaded_arguments_error(cls.__name__, held, from_file)
    # Values that describe objects are built by their engine (jsonargparse for class_path, Hydra for _target_);
    # the rest is passed as loaded (shared references kept).
    kwargs = instantiate_arguments(cls, kwargs)
    missing = [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs
    ]
    if missing:
        raise _missing_error(cls, missing, raw.get("hyper_parameters"), [k for k in loaded if k not in names],
                             has_varkw)
    return kwargs


def _saved_arguments(hparams: dict[str, Any], raw: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The arguments the checkpoint saved, as load_from_checkpoint reads them (pre-1.0 keys and the argparse
    Namespace style included), without the keys LightningCLI adds."""
    loaded: dict[str, Any] = {}
    for old in ("hparams", "module_arguments"):  # Lightning's pre-1.0 keys
        if isinstance(raw.get(old), dict):
            loaded.update(raw[old])
    loaded.update(hparams)
    for key in _CLI_KEYS:
        loaded.pop(key, None)
    if raw.get("hparams_type") == "Namespace" or raw.get("hparams_name"):
        args_name = raw.get("hparams_name")
        if args_name and args_name in names:
            from argparse import Namespace

            value: Any = Namespace(**loaded) if raw.get("hparams_type") == "Namespace" else dict(loaded)
            loaded = {args_name: value}
    return loaded


def _refuse_class_paths(from_ckpt: list[str]) -> None:
    if from_ckpt:
        raise UserModuleError(
            f"the checkpoint's hyper_parameters describe {', '.join(from_ckpt)} by class_path; "
            "lexport does not import classes named inside a checkpoint",
            hint="Pass them yourself with --config config.yaml (LightningCLI's or Hydra's) or --init-args FILE, "
            "or --trust-checkpoint.",
        )


def _check_names(cls: type, names: list[str], supplied: dict[str, Any], explicit: tuple[str, ...],
                 warnings: list[str] | None) -> None:
    """A typed --init-arg the constructor does not take is an error (a typo, with the closest name); names from
    files it does not take are a warning."""
    unknown = [k for k in explicit if k not in names]
    if unknown:
        import difflib

        close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise UserModuleError(
            f"{cls.__name__}.__init__ takes no argument {said}",
            hint=f"Its arguments: {', '.join(names) or 'none'}",
        )
    ignored = sorted(k for k in supplied if k not in names and k not in explicit)
    if ignored and warnings is not None:
        warnings.append(f"{cls.__name__}.__init__ does not take {', '.join(ignored)}: ignored")


def _missing_error(cls: type, missing: list[str], whole: Any, foreign: list[str], has_varkw: bool) -> UserModuleError:
    """The error for required arguments nobody gave: the flags to pass, and whether the class looks wrong."""
    inside = unloaded_in(whole)
    if inside:  # hyper_parameters itself is an object (a Namespace) left unloaded
        return unloaded_arguments_error(cls.__name__, dict.fromkeys(missing, inside), dict.fromkeys(missing, whole))
    flags = " ".join(f"--init-arg {n}=VALUE" for n in missing)
    foreign = sorted(foreign)
    wrong_class = (
        f"\nThe checkpoint's hyper_parameters ({', '.join(foreign[:8])}) are not {cls.__name__}'s arguments: "
        "is --module the class this checkpoint was trained with?"
        if foreign and not has_varkw
        else ""
    )
    return UserModuleError(
        f"{cls.__name__}.__init__ needs {', '.join(repr(m) for m in missing)}, which the checkpoint's "
        "hyper_parameters do not hold",
        hint=(
            f"Pass them: {flags}  (values are YAML), or many at once with --init-args FILE; a submodule "
            "passed to __init__ is given as {class_path: pkg.mod.Class, init_args: {...}}." + wrong_class
        ),
    )
