"""Which of a manifest's options could make lexport run code, and the rule for each: a manifest may name the
LightningModule class only as a module of the environment (never a `.py` file, never a module found inside the
manifest's folder); it may not name any other class (class_path, _target_) in its config or init arguments, use
interpolations in its config (`${oc.env:...}` reads the environment), or have a datamodule built from its config.
The caller lifts these with --trust-manifest, or by passing the option on the command line."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from ..bounded import TooDeep, iter_containers
from ..construct.argfiles import load_args_file
from ..construct.configs import describes_object
from ..errors import UsageError
from ..userpath import ensure_cwd_importable

TRUST = "--trust-manifest"


def check_code_options(taken: dict[str, Any], merged: dict[str, Any], *, folder: Path, where: str,
                       trust: bool) -> None:
    """Refuse (exit 2) what the manifest's options `taken` would make lexport import or instantiate, unless
    `trust`; `merged` holds every option of the run (the caller's included)."""
    if trust:
        return
    if "module" in taken:
        check_module_spec(str(taken["module"]), folder, where, "options.module", flag="--module")
    if "init_args" in taken and _describes(taken["init_args"]):
        raise _untrusted(where, "options.init_args names classes (class_path or _target_), which lexport would "
                         "instantiate", "pass the arguments yourself with --init-arg or --init-args FILE")
    if "init_args_file" in taken:
        args = load_args_file(taken["init_args_file"], flag="--init-args")
        if _describes(args):
            raise _untrusted(where, f"options.init_args_file {taken['init_args_file']} names classes (class_path "
                             "or _target_), which lexport would instantiate", "pass --init-args FILE yourself")
    if "config" in taken:
        _check_config(Path(taken["config"]), merged, folder, where)


def _check_config(config: Path, merged: dict[str, Any], folder: Path, where: str) -> None:
    if merged.get("data") == "config":
        raise _untrusted(where, f"options.data builds the datamodule of the manifest's config {config}, which runs "
                         "its code", "pass --config FILE (and --data config) yourself")
    data = load_args_file(config, flag="--config")
    model = data.get("model")
    if not isinstance(model, dict):
        return  # the config step says what is wrong with it
    own = model.get("class_path", model.get("_target_"))
    if own is not None and not merged.get("module"):
        check_module_spec(str(own), folder, where, f"the model class of options.config {config}", flag="--config")
    rest = {k: v for k, v in model.items() if k not in ("class_path", "_target_")}
    if _describes(rest):
        raise _untrusted(where, f"options.config {config} names classes in model: besides the model's own "
                         "(class_path or _target_), which lexport would instantiate", "pass --config FILE yourself")
    if _interpolates(model):
        raise _untrusted(where, f"options.config {config} has ${{...}} interpolations in model: (they may read "
                         "environment variables)", "pass --config FILE yourself")


def check_module_spec(spec: str, folder: Path, where: str, what: str, *, flag: str) -> None:
    """A class named by a manifest: a module of the environment, found without running any code, outside the
    manifest's folder; never a file path."""
    mod_part = spec.rpartition(":")[0] if ":" in spec else spec.rpartition(".")[0]
    if mod_part.endswith(".py") or "/" in mod_part or os.sep in mod_part:
        raise _untrusted(where, f"{what} {spec!r} is a file path, and a manifest never makes lexport import a file",
                         f"pass {flag} yourself if you trust it")
    found = _location_inside(mod_part, folder)
    if found:
        raise _untrusted(where, f"{what} {spec!r} would be imported from {found}, inside the manifest's folder",
                         f"pass {flag} yourself if you trust it, or install the package that defines the class")


def _location_inside(module: str, folder: Path) -> str | None:
    """Where the top-level package of `module` would be imported from, when that is inside `folder`. find_spec of a
    top-level name runs no code of the package; a module already imported is the environment's."""
    top = module.split(".")[0]
    if not top or top in sys.modules:
        return None
    ensure_cwd_importable()  # as the import will
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None  # the import fails later, saying so (exit 4)
    real_folder = os.path.realpath(folder).rstrip(os.sep) + os.sep
    for place in [spec.origin, *(spec.submodule_search_locations or [])]:
        if place and os.path.isabs(place) and (os.path.realpath(place) + os.sep).startswith(real_folder):
            return place
    return None


def _describes(value: Any) -> bool:
    try:
        return describes_object(value)
    except TooDeep:
        return True  # too deep to tell: not honoured from a manifest


def _interpolates(value: Any) -> bool:
    try:
        return any(isinstance(x, str) and "${" in x for c in iter_containers(value)
                   for x in (c.values() if isinstance(c, dict) else c))
    except TooDeep:
        return True


def _untrusted(where: str, what: str, instead: str) -> UsageError:
    return UsageError(f"{where}: {what}; a manifest is not trusted to run code",
                      hint=f"Instead, {instead}; or pass {TRUST} if the manifest is your own.")
