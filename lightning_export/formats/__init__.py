"""The registry of formats: adding one is one module here that calls `register`."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dynamic import DynamicSupport
from ..errors import UsageError


@dataclass
class ExportContext:
    """Everything a format needs; built once per run and shared by every format."""

    target: Any  # the nn.Module to export (eval mode)
    # Stripped checkpoint tensors. For a sharded folder a lazy mapping that reads a tensor when asked for it:
    # visit items() one at a time, and take shapes and dtypes from statedict.tensor_specs(), never dict(...).
    state_dict: Mapping[str, Any]
    example: Any  # inputs.Inputs or None
    opset: int | None = None
    dynamic: Any = None  # dynamic.Resolved: the dims --dynamic makes dynamic, with their bounds (None: static)
    torchscript_mode: str = "trace"
    executorch_backend: str = "xnnpack"
    # ONNX graph input/output names, one per tensor leaf of (args, kwargs) / of the output (empty: defaults).
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()


@dataclass
class Written:
    exporter: str
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # format facts for the report (ONNX opset, io names)


def storage_bytes(tensors: Iterable[Any]) -> tuple[int, int]:
    """(bytes, count) of the distinct storages behind `tensors`: what torch's zip writers store (a view writes
    its whole storage; tied weights are written once)."""
    seen: set[tuple[str, int]] = set()
    total = count = 0
    for t in tensors:
        count += 1
        try:
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):  # sparse and other storage-less
            key, size = ("", id(t)), t.numel() * t.element_size()
        if key[1] == 0:  # empty or meta storages all sit at address 0
            key = ("", id(t))
        if key not in seen:
            seen.add(key)
            total += size
    return total, count


def module_bytes(module: Any) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (tied weights once)."""
    return storage_bytes([*module.parameters(), *module.buffers()])[0]


def weights_estimate(ctx: ExportContext) -> int:
    """Bytes a torch.save of the state dict takes: its storages, plus zip headers, 64-byte alignment and pickle."""
    from ..statedict import tensor_specs

    nbytes, count = storage_bytes(tensor_specs(ctx.state_dict).values())
    return nbytes + 1024 * count + (64 << 10)


@dataclass(frozen=True)
class Format:
    name: str  # the --to name, also used in JSON
    suffix: str
    kind: str  # "weights" (bit-exact check) or "graph" (run and compare outputs)
    description: str
    write: Callable[[ExportContext, Path], Written]
    # write() gets a path inside a private temp dir; every file it leaves there is part of the artifact.
    load: Callable[[Path], Any]  # weights: a mapping name -> tensor; graph: a callable(*args, **kwargs)
    atol: float = 0.0
    rtol: float = 0.0
    needs_module: bool = True
    # What the format does with --dynamic (and --dynamic-batch); None: static shapes only, --dynamic is exit 2.
    dynamic: DynamicSupport | None = None
    # About how many bytes write() will put in its directory (companions included), checked against the free
    # space before writing: an over-estimate by a margin, never an under-estimate for ordinary modules.
    size_estimate: Callable[[ExportContext], int] = weights_estimate
    # Recognises an existing artifact of this format (`lexport verify`): from the first bytes and, for zip
    # files, the member names. More specific formats are asked first (see detect_format).
    sniff: Callable[[Sniffed], bool] | None = None
    sniff_order: int = 0  # lower is asked first
    # The run options (ExportOptions fields) this format reads from its ExportContext, copied there for it.
    options: tuple[str, ...] = ()
    # Checks this format's options before any slow work, called for every registered format with the run's options
    # and whether this run writes or verifies the format (an option of a format not asked for may be refused).
    check: Callable[[Any, bool], None] | None = None
    # What the format needs prepared once the module has run on the example: (ctx, the eager output, the run's
    # options) -> ExportContext fields to set (ONNX: the graph's input and output names).
    prepare: Callable[[ExportContext, Any, Any], dict[str, Any]] | None = None
    # The deployment flag an existing artifact was evidently made with (--precision fp16, ...), for a verify
    # that fails without it; None when it cannot tell.
    made_with: Callable[[Path], str | None] | None = None
    # The files published with an existing artifact (`lexport verify`): by default `<name>.*` beside it (ONNX
    # external data); an OpenVINO IR's weights are `<stem>.bin`.
    companions: Callable[[Path], list[Path]] | None = None

    def companion_files(self, path: Path) -> list[Path]:
        if self.companions is not None:
            return self.companions(path)
        return sorted(c for c in path.parent.glob(f"{path.name}.*") if c.is_file())


@dataclass(frozen=True)
class Sniffed:
    """What detect_format reads of a file once, for every format's sniff."""

    path: Path
    head: bytes  # the first 64 bytes
    size: int
    zip_names: tuple[str, ...] | None  # member names when the file is a zip, else None

    def has_member(self, suffix: str) -> bool:
        return any(n.endswith(suffix) for n in self.zip_names or ())

    def has_dir(self, part: str) -> bool:
        return any(part in n for n in self.zip_names or ())


def detect_format(path: Path) -> Format:
    """The format of an existing artifact, from its content (suffix only where content cannot tell)."""
    import os
    import stat
    import zipfile

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
        with open(path, "rb") as f:
            head = f.read(64)
        names = None
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(path) as z:
                    names = tuple(z.namelist())  # zipfile read the whole directory already: bounded by the file
            except (zipfile.BadZipFile, OSError, ValueError):
                names = None
    except FileNotFoundError:
        raise UsageError(f"artifact not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    seen = Sniffed(Path(path), head, st.st_size, names)
    for fmt in sorted(REGISTRY.values(), key=lambda f: f.sniff_order):
        if fmt.sniff is not None and fmt.sniff(seen):
            return fmt
    raise UsageError(
        f"{path} is not an artifact lexport recognises",
        hint=f"Formats it reads: {', '.join(f.name for f in REGISTRY.values() if f.sniff)}.",
    )


REGISTRY: dict[str, Format] = {}


def require_installed(require: Callable[[], Any]) -> None:
    """An optional extra's runtime check (`require` raises ExportError naming the pip line) as the usage error it is
    before any slow work (exit 2)."""
    from ..errors import ExportError

    try:
        require()
    except ExportError as e:
        raise UsageError(e.message, hint=e.hint) from None


def installed_check(require: Callable[[], Any]) -> Callable[[Any, bool], None]:
    """A Format.check for a format whose only option is its optional extra being installed."""

    def check(opts: Any, requested: bool) -> None:
        if requested:
            require_installed(require)

    return check


def register(fmt: Format) -> Format:
    REGISTRY[fmt.name] = fmt
    return fmt


def _load_all() -> None:
    # Registration order is the order of --help and of the README table.
    import importlib

    for name in ("state_dict", "safetensors", "torchscript", "onnx", "exported_program", "executorch", "aoti",
                 "openvino", "tflite"):
        importlib.import_module(f"{__name__}.{name}")


_load_all()

FORMAT_NAMES = tuple(REGISTRY)


# Names people type for the same thing; never a guess at a typo (a typo gets a suggestion, not a pick).
ALIASES = {
    "pt": "state-dict",
    "state_dict": "state-dict",
    "statedict": "state-dict",
    "st": "safetensors",
    "ts": "torchscript",
    "jit": "torchscript",
    "pt2": "exported-program",
    "exported_program": "exported-program",
    "exportedprogram": "exported-program",
    "torch.export": "exported-program",
    "pte": "executorch",
    "et": "executorch",
    "aotinductor": "aoti",
    "ov": "openvino",
    "openvino-ir": "openvino",
    "litert": "tflite",
}


def parse_format_list(values: tuple[str, ...] | list[str]) -> list[str]:
    """`--to onnx --to pt2` and `--to onnx,pt2` alike; case-insensitive; duplicates dropped."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(get_format(n).name for n in names))


def get_format(name: str) -> Format:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, [*REGISTRY, *ALIASES], n=1, cutoff=0.5)
    close = [ALIASES.get(c, c) for c in close]
    hint = f"Did you mean --to {close[0]}? " if close else ""
    raise UsageError(f"unknown format {name!r}", hint=f"{hint}Formats: {', '.join(REGISTRY)}")
