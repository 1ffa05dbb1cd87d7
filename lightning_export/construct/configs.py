"""Constructor arguments from configs, instantiated by the engine that wrote them.

- LightningCLI configs (`class_path`/`init_args`, `dict_kwargs`, callables such as `OptimizerCallable`) go through
  jsonargparse, LightningCLI's own engine, driven by the class's signature and type hints: an `OptimizerCallable`
  becomes a callable, an `nn.Module` an instance, exactly as `LightningCLI` would build them.
- Hydra configs (`_target_`, `_partial_`, `${...}` interpolations; e.g. `.hydra/config.yaml` of a run) go through
  Hydra's own `instantiate` and OmegaConf's resolver, imported only when such a config is given.

Only values that describe objects are handed to an engine; plain values are passed as they are. Text is parsed
with lexport's bounded YAML loader first (aliases, depth), so neither engine sees a "billion laughs".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..bounded import MAX_DEPTH, TooDeep, iter_containers
from ..errors import UsageError, UserModuleError
from ..userpath import ensure_cwd_importable
from .argfiles import load_args_file

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


@dataclass
class ModelSection:
    """The `model:` part of a config: the class it names (None when it names none) and its init arguments."""

    class_path: str | None
    args: dict[str, Any] = field(default_factory=dict)
    style: str = "lightning"  # "lightning" (LightningCLI/jsonargparse) or "hydra"


def _has_key(value: Any, *keys: str) -> bool:
    """Whether a mapping anywhere in `value` has one of `keys`. Linear in the number of distinct containers;
    raises TooDeep past MAX_DEPTH levels."""
    return any(isinstance(c, dict) and any(k in c for k in keys) for c in iter_containers(value))


def describes_object(value: Any) -> bool:
    """Whether `value` holds a `class_path` (LightningCLI) or `_target_` (Hydra) mapping anywhere."""
    return _has_key(value, "class_path", "_target_")


def read_model_section(path: str | os.PathLike[str]) -> ModelSection:
    """The `model:` section of a LightningCLI config.yaml or of a Hydra config (`.hydra/config.yaml`)."""
    data = load_args_file(path, flag="--config")
    model = data.get("model")
    if model is None:
        raise UsageError(
            f"--config {path}: no 'model:' section (give the config.yaml LightningCLI saved, or a Hydra run's "
            ".hydra/config.yaml)"
        )
    if not isinstance(model, dict):
        raise UsageError(f"--config {path}: 'model:' must be a mapping")
    try:
        hydra = describes_hydra(data)
    except TooDeep:
        raise UsageError(f"--config {path}: nested more than {MAX_DEPTH} levels deep") from None
    if "_target_" in model or hydra:
        model = resolve_hydra(data, path)
        target = model.get("_target_")
        args = {k: v for k, v in model.items() if k not in HYDRA_KEYS}
        return ModelSection(str(target) if target else None, args, "hydra")
    if "class_path" in model:
        return ModelSection(*lightning_class(model, path))
    return ModelSection(None, dict(model))


def lightning_class(node: dict[str, Any], path: Any, key: str = "model") -> tuple[str, dict[str, Any]]:
    """(class_path, init_args with dict_kwargs) of a LightningCLI `class_path:` node (`model:`, `data:`)."""
    init_args = node.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise UsageError(f"--config {path}: {key}.init_args must be a mapping")
    dict_kwargs = node.get("dict_kwargs") or {}
    if not isinstance(dict_kwargs, dict):
        raise UsageError(f"--config {path}: {key}.dict_kwargs must be a mapping")
    return str(node["class_path"]), {**init_args, **dict_kwargs}


def describes_hydra(value: Any) -> bool:
    return _has_key(value, "_target_")


def resolve_hydra(data: dict[str, Any], path: Any, key: str = "model") -> dict[str, Any]:
    """The `model:` (or `key:`) node with its `${...}` interpolations resolved by OmegaConf, as Hydra would when it
    instantiates it (against the whole config; other nodes, such as `${hydra:runtime.output_dir}` paths that only
    resolve inside a Hydra run, are left alone)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        raise UsageError(
            f"--config {path} is a Hydra config (it has _target_), and hydra-core is not installed here",
            hint="pip install hydra-core (the project that wrote it uses it).",
        ) from None
    try:
        return OmegaConf.to_container(OmegaConf.create(data)[key], resolve=True)  # type: ignore[return-value]
    except Exception as e:  # noqa: BLE001 - OmegaConf's errors name the interpolation that failed
        where = "" if key == "model" else f"{key}: "
        raise UsageError(f"--config {path}: {where}{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


def instantiate_arguments(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every argument that describes an object built by its engine; the rest unchanged."""
    lightning = {k: v for k, v in values.items() if _describes_lightning(k, v)}
    hydra = {k: v for k, v in values.items() if k not in lightning and _describes(k, v, describes_hydra)}
    out = dict(values)
    if lightning:
        out.update(_jsonargparse(cls, lightning))
    for k, v in hydra.items():
        out[k] = _hydra_instantiate(k, v)
    return out


def _describes(name: str, value: Any, test: Any) -> bool:
    try:
        return test(value)
    except TooDeep:
        raise UsageError(f"init argument {name!r} is nested more than {MAX_DEPTH} levels deep") from None


def _describes_lightning(name: str, value: Any) -> bool:
    return _describes(name, value, lambda v: _has_key(v, "class_path"))


def _jsonargparse(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Build `values` as LightningCLI does: jsonargparse parses them against cls.__init__'s signature and
    instantiates nested classes; callables (OptimizerCallable) become callables, not instances."""
    import warnings

    ensure_cwd_importable()
    try:
        from jsonargparse import ArgumentParser
    except ImportError:  # a dependency of lexport; only a broken environment gets here
        raise UsageError("jsonargparse is not installed: pip install 'jsonargparse[signatures]'") from None
    import inspect

    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]  # type: ignore[misc]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = ArgumentParser(exit_on_error=False)
            parser.add_method_arguments(
                cls, "__init__", "model", fail_untyped=False, sub_configs=True,
                skip={n for n in names if n not in values},
            )
            cfg = parser.parse_object({"model": values})
            build = getattr(parser, "instantiate", None) or parser.instantiate_classes
            init = build(cfg)
    except Exception as e:  # noqa: BLE001 - jsonargparse's messages say which value and why
        text = " ".join(str(e).split())[:600]
        raise UserModuleError(
            f"building {', '.join(values)} for {cls.__name__} from their class_path failed: {text}",
            hint="Check the class_path and init_args against the classes (as LightningCLI would).",
        ) from None
    model = init.get("model") if hasattr(init, "get") else init.model
    built = vars(model) if not isinstance(model, dict) else model
    return {k: built[k] for k in values if k in built}


def _hydra_instantiate(name: str, value: Any) -> Any:
    try:
        from hydra.utils import instantiate
    except ImportError:
        raise UsageError(
            f"init argument {name!r} is a Hydra config (_target_), and hydra-core is not installed here",
            hint="pip install hydra-core (the project that wrote it uses it).",
        ) from None
    ensure_cwd_importable()
    try:
        return instantiate(value)
    except Exception as e:  # noqa: BLE001 - Hydra wraps the real error; its message names the target
        raise UserModuleError(f"building {name!r} with Hydra's instantiate failed: {' '.join(str(e).split())[:600]}"
                              ) from None
