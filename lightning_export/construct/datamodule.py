"""`--data config`: the user's LightningDataModule from the `data:` section of `--config`, and its batches.

Built by the engine that wrote the config, as the model is (construct/configs.py): a LightningCLI `data: {class_path,
init_args}` through jsonargparse (LightningCLI's own engine, driven by the class's signature and type hints), a
Hydra `data: {_target_: ...}` through Hydra's `instantiate` after OmegaConf resolves its interpolations.

Then lexport does what a Trainer does before validating: `prepare_data()`, `setup("fit")`, and takes batches from
`val_dataloader()`; a datamodule without one (not overridden, or returning nothing) gives `test_dataloader()` after
`setup("test")`, else `train_dataloader()`. Which one is recorded. Anything the user's code raises on the way is a
UserModuleError (exit 4) carrying its message.

The datamodule is the user's code and runs in lexport's process, as the model's does (a child process would import
torch and Lightning again and send every batch back: seconds per run). `exits_refused` turns the ways Python code
ends a process on purpose (`sys.exit`, `os._exit`) into exit 4 naming the call; code that kills the process another
way (`os.kill`, `os.abort`, a native crash) still ends it, as the README's Security section says.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError, UserModuleError

LOADERS = ("val_dataloader", "test_dataloader", "train_dataloader")
_STAGE = {"val_dataloader": "fit", "test_dataloader": "test", "train_dataloader": "fit"}


@dataclass
class DataSection:
    """The `data:` part of a config: the class it names (None when it names none), its init arguments, and the
    engine that builds it."""

    class_path: str | None
    args: dict[str, Any] = field(default_factory=dict)
    style: str = "lightning"  # "lightning" (jsonargparse) or "hydra"
    raw: dict[str, Any] = field(default_factory=dict)  # the section as written (Hydra: resolved)


@dataclass
class DataModuleBatches:
    batches: list[Any]
    loader: str  # "val_dataloader" / "test_dataloader" / "train_dataloader"
    class_name: str  # "pkg.module.DataModule"

    @property
    def source(self) -> str:
        return f"{self.loader}() of {self.class_name}"


class _ExitCalled(BaseException):
    """os._exit called by the user's code: a BaseException, so that its `except Exception` does not swallow it."""


@contextlib.contextmanager
def exits_refused(what: str) -> Iterator[None]:
    """While the user's datamodule runs: `os._exit(n)` (which skips every handler, so a CLI would end with exit n
    and nothing printed) raises UserModuleError instead, and `sys.exit(n)` too. Only in this process: a
    DataLoader worker forked meanwhile ends through the real `os._exit`, as multiprocessing needs."""
    real, pid = os._exit, os.getpid()

    def refused(code: int = 0) -> None:
        if os.getpid() != pid:
            real(code)
        raise _ExitCalled(f"os._exit({code!r})")

    os._exit = refused  # type: ignore[assignment]
    try:
        yield
    except (SystemExit, _ExitCalled) as e:
        call = f"sys.exit({e.code!r})" if isinstance(e, SystemExit) else str(e)
        raise UserModuleError(
            f"{what} called {call}: lexport stops here",
            hint="A datamodule must not end the process: raise an exception to report a problem.",
        ) from None
    finally:
        os._exit = real


def read_data_section(path: str | os.PathLike[str]) -> DataSection:
    """The `data:` section of a LightningCLI config.yaml or a Hydra config. UsageError (exit 2) when the config
    has none or it is malformed."""
    from .argfiles import load_args_file
    from .configs import HYDRA_KEYS, describes_hydra, lightning_class, resolve_hydra

    data = load_args_file(path, flag="--config")
    section = data.get("data")
    if section is None:
        raise UsageError(
            f"--data config: --config {path} has no 'data:' section",
            hint="Give the config.yaml LightningCLI saved for a run with a datamodule, or --data FILE.pt.",
        )
    if not isinstance(section, dict):
        raise UsageError(f"--config {path}: 'data:' must be a mapping")
    if "_target_" in section or describes_hydra(section):
        resolved = resolve_hydra(data, path, "data")
        target = resolved.get("_target_")
        args = {k: v for k, v in resolved.items() if k not in HYDRA_KEYS}
        return DataSection(str(target) if target else None, args, "hydra", resolved)
    if "class_path" in section:
        return DataSection(*lightning_class(section, path, "data"), "lightning", section)
    # LightningCLI with a fixed datamodule class saves `data:` as its init arguments only.
    return DataSection(None, dict(section), "lightning", section)


def build_datamodule(section: DataSection, *, class_spec: str | None = None) -> Any:
    """An instance of the section's LightningDataModule. `class_spec` (pkg.module:Class) names the class when the
    section does not (LightningCLI with a fixed datamodule class). UsageError when no class is named;
    UserModuleError (exit 4) when the class cannot be imported, is not a LightningDataModule, or its constructor
    raises."""
    from .importing import import_object, lightning_base

    spec = class_spec or section.class_path
    if not spec:
        raise UsageError(
            "--data config: the config's data: section names no class (LightningCLI saves it so when the "
            "datamodule class is fixed in the script)",
            hint="Add the class to the data: section (data: {class_path: pkg.module.DataModule, init_args: {...}}), "
            "or save the batches to a file and pass --data FILE.pt.",
        )
    cls = import_object(spec, what="data: class_path")
    if lightning_base(cls, "LightningDataModule") is None:
        kind = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise UserModuleError(
            f"data: {spec!r} is {kind!r}, which is not a LightningDataModule subclass "
            "(from lightning.pytorch or pytorch_lightning)"
        )
    if section.style == "hydra":
        return _hydra(section, cls, spec)
    return _jsonargparse(cls, section.args, spec)


def _jsonargparse(cls: type, values: dict[str, Any], spec: str) -> Any:
    """As LightningCLI builds `data:`: jsonargparse parses init_args against the class's signature and builds the
    instance (nested class_path values included)."""
    import warnings

    from jsonargparse import ArgumentParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = ArgumentParser(exit_on_error=False)
            parser.add_class_arguments(cls, "data", fail_untyped=False, sub_configs=True)
            cfg = parser.parse_object({"data": values})
    except Exception as e:  # noqa: BLE001 - jsonargparse's messages say which value and why
        raise UserModuleError(
            f"data: {spec}: its init_args do not fit the class: {' '.join(str(e).split())[:600]}",
            hint="Check the data: section against the datamodule's __init__ (as LightningCLI would).",
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            init = parser.instantiate_classes(cfg)
    except Exception as e:  # noqa: BLE001 - the user's constructor (or a nested class's) raised
        raise UserModuleError(f"data: building {spec} failed: {_root(e)}") from e
    return init["data"] if hasattr(init, "__getitem__") else init.data


def _hydra(section: DataSection, cls: type, spec: str) -> Any:
    try:
        from hydra.utils import instantiate
    except ImportError:
        raise UsageError(
            "--data config: the data: section is a Hydra config (_target_), and hydra-core is not installed here",
            hint="pip install hydra-core (the project that wrote it uses it).",
        ) from None
    try:
        return instantiate(section.raw)
    except Exception as e:  # noqa: BLE001 - Hydra wraps the real error; its message names the target
        raise UserModuleError(f"data: building {spec} with Hydra's instantiate failed: {_root(e)}") from e


def _root(e: BaseException) -> str:
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return f"{type(root).__name__}: {' '.join(str(root).split())[:600]}"


def _overridden(dm: Any, name: str) -> bool:
    """Whether the datamodule (its class, not Lightning's DataHooks default, which raises; or the instance, as
    LightningDataModule.from_datasets assigns its loaders) defines `name`."""
    if callable(vars(dm).get(name)):
        return True
    for c in type(dm).__mro__:
        if name in vars(c):
            return c.__module__.split(".")[0] not in {"pytorch_lightning", "lightning", "lightning_fabric"}
    return False


def _call(dm: Any, what: str, *args: Any) -> Any:
    try:
        return getattr(dm, what)(*args)
    except Exception as e:  # noqa: BLE001 - the user's code: exit 4 with its message
        arg = f"{args[0]!r}" if args else ""
        raise UserModuleError(f"{type(dm).__name__}.{what}({arg}) raised {_root(e)}") from e


def take_batches(
    dm: Any,
    *,
    max_batches: int | None = None,
    target_samples: int | None = None,
) -> DataModuleBatches:
    """prepare_data(), setup(stage), then batches of the first of val/test/train_dataloader() the datamodule
    defines and that gives any, bounded as `batches.take` bounds them. UserModuleError (exit 4) carrying the
    message when the user's code raises; UsageError when no loader gives a batch."""
    from ..data.batches import DEFAULT_SAMPLES, take

    cls_name = f"{type(dm).__module__}.{type(dm).__qualname__}"
    if _overridden(dm, "prepare_data"):
        _call(dm, "prepare_data")
    done: set[str] = set()
    tried: list[str] = []
    for loader_name in LOADERS:
        if not _overridden(dm, loader_name):
            continue
        stage = _STAGE[loader_name]
        if stage not in done:
            _call(dm, "setup", stage)
            done.add(stage)
        loader = _call(dm, loader_name)
        if isinstance(loader, (list, tuple)):  # several validation loaders: the first
            loader = loader[0] if loader else None
        elif isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if loader is None:
            tried.append(f"{loader_name}() returned nothing")
            continue
        try:
            got = take(loader, max_batches=max_batches,
                       target_samples=DEFAULT_SAMPLES if target_samples is None else target_samples)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's dataset raised while iterating
            raise UserModuleError(f"{type(dm).__name__}.{loader_name}() raised while iterating: {_root(e)}") from e
        if got:
            return DataModuleBatches(got, loader_name, cls_name)
        tried.append(f"{loader_name}() gave no batch")
    what = "; ".join(tried) or "it defines none of val_dataloader, test_dataloader, train_dataloader"
    raise UsageError(f"--data config: {cls_name} gives no batches: {what}")
