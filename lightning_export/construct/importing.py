"""Importing the user's LightningModule class: `pkg.mod:Class`, `pkg.mod.Class` or `path/to/file.py:Class`."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError, UserModuleError
from ..userpath import ensure_cwd_importable


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


def lightning_base(cls: Any, name: str = "LightningModule") -> type | None:
    """The LightningModule (or `name`: LightningDataModule) class in cls's MRO (lightning.pytorch or
    pytorch_lightning), found without importing Lightning: the user's module has imported whichever one it uses."""
    if not inspect.isclass(cls):
        return None
    for c in cls.__mro__:
        if c.__name__ == name and c.__module__.split(".")[0] in {"pytorch_lightning", "lightning"}:
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
