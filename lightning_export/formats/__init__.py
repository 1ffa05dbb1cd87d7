"""The registry of formats: adding one is one module here that calls `register`."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError


@dataclass
class ExportContext:
    """Everything a format needs; built once per run and shared by every format."""

    target: Any  # the nn.Module to export (eval mode)
    state_dict: dict[str, Any]  # stripped checkpoint tensors
    example: Any  # inputs.Inputs or None
    opset: int | None = None
    dynamic_batch: bool = False
    torchscript_mode: str = "trace"


@dataclass
class Written:
    exporter: str
    files: list[Path]  # the main file first, then companions (e.g. ONNX external data)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Format:
    name: str  # the --to name, also used in JSON
    suffix: str
    kind: str  # "weights" (bit-exact check) or "graph" (run and compare outputs)
    description: str
    write: Callable[[ExportContext, Path], Written]
    load: Callable[[Path], Any]  # weights: a mapping name -> tensor; graph: a callable(*args, **kwargs)
    atol: float = 0.0
    rtol: float = 0.0
    needs_module: bool = True


REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    REGISTRY[fmt.name] = fmt
    return fmt


def _load_all() -> None:
    from . import exported_program, onnx, safetensors, state_dict, torchscript  # noqa: F401


_load_all()

FORMAT_NAMES = tuple(REGISTRY)


def get_format(name: str) -> Format:
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=1, cutoff=0.5)
    hint = f"Did you mean --to {close[0]}? " if close else ""
    raise UsageError(f"unknown format {name!r}", hint=f"{hint}Formats: {', '.join(REGISTRY)}")
