"""Importing the user's LightningModule, building it from a checkpoint, selecting --attr, stripping the prefix."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bounded import MAX_DEPTH, TooDeep, load_yaml, short_repr
from .errors import UsageError, UserModuleError
from .statedict import strip_prefix
from .userpath import ensure_cwd_importable

# Keys LightningCLI adds to hyper_parameters; naming a class in a checkpoint must never import it.
_CLI_KEYS = ("_class_path", "_instantiator")


# ---------------------------------------------------------------------------------------------- importing
def import_object(spec: str, *, what: str = "--module") -> Any:
    """Resolve `pkg.mod:Class`, `pkg.mod.Class` or `path/to/file.py:Class`."""
    ensure_cwd_importable()
    if ":" in spec:
        mod_part, _, attr = spec.rpartition(":")
    else:
        mod_part, _, attr = spec.rpartition(".")
    if not mod_part or not attr:
        raise UsageError(
            f"{what} {spec!r} must name a class: 'pkg.module:Class', 'pkg.module.Class' or 'path/to/file.py:Class'"
        )
    if mod_part.endswith(".py") or os.sep in mod_part or "/" in mod_part:
        module = _import_file(Path(mod_part), what)
    else:
        module = _import_module(mod_part, what)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_"))
            raise UserModuleError(
                f"{what} {spec!r}: module {module.__name__!r} has no attribute {attr!r}",
                hint=f"Classes it defines or imports: {', '.join(names) or 'none'}",
            )
        obj = getattr(obj, part)
    return obj


def _import_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserModuleError(f"{what}: file not found: {path}")
    path = path.resolve()
    # Siblings of the file must be importable, as when running it as a script.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserModuleError(f"{what}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise UserModuleError(f"{what}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            tried = "\n  ".join(p or "(current directory)" for p in sys.path[:12])
            raise UserModuleError(
                f"{what}: no module named {missing!r} (while importing {name!r})",
                hint=f"Run lexport from the directory that contains it, or set PYTHONPATH. Searched:\n  {tried}",
            ) from e
        raise UserModuleError(
            f"{what}: importing {name!r} failed: it imports {missing!r}, which is not installed",
            hint="Install the dependencies of your module in this environment.",
        ) from e
    except Exception as e:
        raise UserModuleError(f"{what}: importing {name!r} failed: {type(e).__name__}: {e}") from e


def lightning_base(cls: Any) -> type | None:
    """The LightningModule class in cls's MRO (lightning.pytorch or pytorch_lightning), found without importing
    Lightning: the user's module has imported whichever one it uses."""
    if not inspect.isclass(cls):
        return None
    for c in cls.__mro__:
        if c.__name__ == "LightningModule" and c.__module__.split(".")[0] in {"pytorch_lightning", "lightning"}:
            return c
    return None


def is_lightning_module_class(cls: Any) -> bool:
    return lightning_base(cls) is not None


def resolve_class(spec: str) -> type:
    cls = import_object(spec)
    if not is_lightning_module_class(cls):
        kind = cls.__name__ if inspect.isclass(cls) else type(cls).__name__
        raise UserModuleError(
            f"--module {spec!r} is {kind!r}, which is not a LightningModule subclass "
            "(from lightning.pytorch or pytorch_lightning)",
            hint="Pass the LightningModule class that was trained, and select the network inside it with --attr.",
        )
    return cls


# ------------------------------------------------------------------------------------------- init arguments
def _has_class_path(value: Any) -> bool:
    """Whether value describes an object (class_path or _target_); raises TooDeep past MAX_DEPTH levels."""
    from .configs import describes_object

    return describes_object(value)


def _checked_hparams(loaded: dict[str, Any]) -> dict[str, bool]:
    """name -> whether the checkpoint's value describes an object by class_path/_target_; a value nested too
    deeply to be a hyper-parameter is the file's fault (exit 3)."""
    from .errors import CheckpointError

    try:  # one walk of them all first: without class_path/_target_ anywhere (the usual case), shared values cost once
        if not _has_class_path(list(loaded.values())):
            return dict.fromkeys(loaded, False)
    except TooDeep:
        pass  # found again below, with the key's name
    out = {}
    for k, v in loaded.items():
        try:
            out[k] = _has_class_path(v)
        except TooDeep:
            raise CheckpointError(
                f"the checkpoint's hyper_parameters[{short_repr(k)}] is nested more than {MAX_DEPTH} levels deep; "
                "lexport does not pass such a value to a constructor",
                hint=f"Pass {short_repr(k)} yourself with --init-arg or --init-args FILE.",
            ) from None
    return out


def _fmt_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())


def _short(v: Any) -> str:
    return short_repr(v, limit=40)


def parse_init_arg(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise UsageError(f"--init-arg {short_repr(item)} must look like KEY=VALUE, e.g. --init-arg hidden_size=64")
    try:
        value = load_yaml(raw, what=f"--init-arg {key}") if raw.strip() else raw
    except UsageError as e:
        if "not valid YAML" not in e.message:
            raise
        value = raw  # not YAML: the text itself, as a string
    return key, value


MAX_ARGS_FILE_BYTES = 16 << 20  # a config or init-args file; anything bigger is not one


def load_args_file(path: str | os.PathLike[str], *, flag: str) -> dict[str, Any]:
    import stat

    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{flag} {p}: not a regular file")
        if st.st_size > MAX_ARGS_FILE_BYTES:
            raise UsageError(f"{flag} {p}: {st.st_size:,} bytes is too big for a configuration file")
        raw = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {p}: cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {p}: not a text file (YAML or JSON)") from None
    data = load_yaml(text, what=f"{flag} {p}")  # YAML is a superset of JSON
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {p}: expected a mapping of argument names to values, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------- building
@dataclass
class BuiltModule:
    module: Any  # the whole LightningModule
    target: Any  # the selected submodule (or the module itself)
    attr: str | None
    state_dict: Mapping[str, Any]  # the checkpoint's tensors under the attr's prefix, prefix stripped (lazy for a folder)
    notes: list[str] = field(default_factory=list)
    built_on_meta: bool = False


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
    sig = inspect.signature(cls.__init__)
    params = list(sig.parameters.values())[1:]
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    has_varkw = any(p.kind == p.VAR_KEYWORD for p in params)

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
    # Only the values the constructor takes are looked at: the rest is dropped unread.
    described = _checked_hparams(
        {k: v for k, v in loaded.items() if k not in supplied and (has_varkw or k in names)}
    )
    if not trust:
        from_ckpt = [k for k, has in described.items() if has]
        if from_ckpt:
            raise UserModuleError(
                f"the checkpoint's hyper_parameters describe {', '.join(from_ckpt)} by class_path; "
                "lexport does not import classes named inside a checkpoint",
                hint="Pass them yourself with --config config.yaml (LightningCLI's or Hydra's) or --init-args FILE, "
                "or --trust-checkpoint.",
            )
    if not has_varkw:
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
    kwargs = {**loaded, **supplied}
    if not has_varkw:
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    from .safeload.placeholders import unloaded_arguments_error, unloaded_by_key, unloaded_in

    from_file = {k: v for k, v in kwargs.items() if k not in supplied}
    held = unloaded_by_key(from_file)
    if held:  # objects the safe loader left as placeholders: the user gives them, or allows their classes
        raise unloaded_arguments_error(cls.__name__, held, from_file)
    # Values that describe objects are built by their engine (jsonargparse for class_path, Hydra for _target_);
    # the rest is passed as loaded (shared references kept).
    from .configs import instantiate_arguments

    kwargs = instantiate_arguments(cls, kwargs)
    missing = [
        p.name
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs
    ]
    whole = raw.get("hyper_parameters")
    inside = unloaded_in(whole) if missing else []
    if inside:  # hyper_parameters itself is an object (a Namespace) left unloaded
        raise unloaded_arguments_error(cls.__name__, dict.fromkeys(missing, inside), dict.fromkeys(missing, whole))
    if missing:
        flags = " ".join(f"--init-arg {n}=VALUE" for n in missing)
        foreign = sorted(k for k in loaded if k not in names)
        wrong_class = (
            f"\nThe checkpoint's hyper_parameters ({', '.join(foreign[:8])}) are not {cls.__name__}'s arguments: "
            "is --module the class this checkpoint was trained with?"
            if foreign and not has_varkw
            else ""
        )
        raise UserModuleError(
            f"{cls.__name__}.__init__ needs {', '.join(repr(m) for m in missing)}, which the checkpoint's "
            "hyper_parameters do not hold",
            hint=(
                f"Pass them: {flags}  (values are YAML), or many at once with --init-args FILE; a submodule "
                "passed to __init__ is given as {class_path: pkg.mod.Class, init_args: {...}}." + wrong_class
            ),
        )
    return kwargs


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device while building; buffers and other tensors stay real.

    Parameters are the bulk and come from the checkpoint anyway; buffers (often non-persistent, e.g. caches)
    must keep the values __init__ computes. Same idea as accelerate's init_empty_weights(include_buffers=False).
    """
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: Any) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        # Already-meta parameters (tied weights assigned twice) keep their identity.
        if type(p) is nn.Parameter and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    obj = cls(**kwargs)
    obj.configure_model()  # a no-op unless overridden, as in load_from_checkpoint
    return obj


def build_module(
    cls: type,
    kwargs: dict[str, Any],
    checkpoint_raw: dict[str, Any],
    *,
    attr: str | None,
    meta: bool = True,
) -> BuiltModule:
    """Build like load_from_checkpoint: cls(**kwargs), configure_model(), on_load_checkpoint(), strict load."""
    notes: list[str] = []
    built_on_meta = False
    obj = None
    if meta:
        try:
            with _parameters_on_meta():
                obj = _construct(cls, kwargs)
            built_on_meta = True
        except Exception as e:  # noqa: BLE001 - any failure on meta: retry with a normal build
            notes.append(f"built normally: the module cannot be built on the meta device ({type(e).__name__}: {e})")
            obj = None
    if obj is None:
        try:
            obj = _construct(cls, kwargs)
        except Exception as e:
            raise UserModuleError(
                f"building {cls.__name__}({_fmt_kwargs(kwargs)}) failed: {type(e).__name__}: {e}",
                hint="Check the hyper_parameters against the class, or supply arguments with --init-arg KEY=VALUE.",
            ) from e
    try:
        obj.on_load_checkpoint(checkpoint_raw)
    except Exception as e:
        raise UserModuleError(f"{cls.__name__}.on_load_checkpoint failed: {type(e).__name__}: {e}") from e
    full_sd = checkpoint_raw["state_dict"]
    load_strict(obj, full_sd, what=cls.__name__)
    leftovers = [n for n, t in [*obj.named_parameters(), *obj.named_buffers()] if t.device.type == "meta"]
    if leftovers:
        raise UserModuleError(f"after loading, these tensors have no values: {', '.join(leftovers[:10])}")
    target = select_attr(obj, attr)
    prefix = f"{attr}." if attr else ""
    sd = strip_prefix(full_sd, prefix)
    if attr:
        load_strict(target, sd, what=f"{cls.__name__}.{attr}", check_only=True)
    return BuiltModule(obj, target, attr, sd, notes, built_on_meta)


def load_strict(module: Any, state_dict: dict[str, Any], *, what: str, check_only: bool = False) -> None:
    """Strict loading that collects every missing, unexpected and mis-shaped key before failing once."""
    from .statedict import tensor_specs

    expected = module.state_dict(keep_vars=True)
    specs = tensor_specs(state_dict)  # shapes without reading a lazily read folder's tensors
    missing = [k for k in expected if k not in specs]
    unexpected = [k for k in specs if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(specs[k].shape)} vs module {tuple(expected[k].shape)}"
        for k in expected
        if k in specs and tuple(specs[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatch:\n    " + "\n    ".join(mismatched[:20]))
        if missing:
            parts.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
        if unexpected:
            parts.append(f"in the checkpoint but not in the module ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        overlap = len(set(expected) & set(state_dict))
        hint = (
            "The checkpoint and the module have no tensor name in common: is --module the class this "
            "checkpoint was trained with?"
            if overlap == 0
            else "Are the init arguments the ones it was trained with? Pass them with --init-arg KEY=VALUE."
        )
        raise UserModuleError(f"the checkpoint does not fit {what}:\n  " + "\n  ".join(parts), hint=hint)
    if check_only:
        return
    try:
        if specs is state_dict:
            module.load_state_dict(state_dict, strict=True, assign=True)
        else:
            _load_in_groups(module, state_dict, specs)
    except Exception as e:
        raise UserModuleError(f"loading the checkpoint into {what} failed: {e}") from e


_GROUP_BYTES = 64 << 20


def _load_in_groups(module: Any, state_dict: Mapping[str, Any], specs: Mapping[str, Any]) -> None:
    """Assign a lazily read state dict (a sharded folder) a group of tensors at a time, about _GROUP_BYTES each
    (a larger tensor alone): module.load_state_dict would first copy the whole mapping into a dict. The keys were
    checked strictly already; each group is loaded with assign=True through the module's own load_state_dict, so
    its hooks run as usual."""
    group: dict[str, Any] = {}
    size = 0
    for key, spec in specs.items():
        nbytes = spec.numel() * spec.element_size()
        if group and size + nbytes > _GROUP_BYTES:
            module.load_state_dict(group, strict=False, assign=True)
            group, size = {}, 0
        group[key] = state_dict[key]
        size += nbytes
    if group:
        module.load_state_dict(group, strict=False, assign=True)


def select_attr(module: Any, attr: str | None) -> Any:
    from torch import nn

    if not attr:
        return module
    obj = module
    walked = []
    for part in attr.split("."):
        children = _child_names(obj)
        nxt = None
        if isinstance(obj, nn.Module) and part in obj._modules:
            nxt = obj._modules[part]
        else:
            try:  # a property of the user's class runs here (LightningModule.trainer raises when detached)
                nxt = getattr(obj, part, None)
            except Exception as e:
                raise UserModuleError(
                    f"--attr {attr!r}: reading {part!r} of {'.'.join(walked) or type(module).__name__} failed: "
                    f"{type(e).__name__}: {' '.join(str(e).split())[:200]}",
                    hint=f"--attr selects a submodule. Submodules there: {', '.join(children) or 'none'}",
                ) from e
        if nxt is None:
            where = ".".join(walked) or type(module).__name__
            raise UserModuleError(
                f"--attr {attr!r}: {where} has no submodule {part!r}",
                hint=f"Its submodules: {', '.join(children) or 'none'}",
            )
        walked.append(part)
        obj = nxt
    if not isinstance(obj, nn.Module):
        parent = module if len(walked) == 1 else select_attr(module, ".".join(walked[:-1]))
        raise UserModuleError(
            f"--attr {attr!r} is a {type(obj).__name__}, not an nn.Module",
            hint=f"Submodules there: {', '.join(_child_names(parent)) or 'none'}",
        )
    return obj


def _child_names(obj: Any) -> list[str]:
    from torch import nn

    if not isinstance(obj, nn.Module):
        return []
    return [f"{n} ({type(m).__name__})" for n, m in obj.named_children()]
