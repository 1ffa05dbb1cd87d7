"""What a format is: the Format it registers (everything it can do, declared), the ExportContext it writes from,
the Written it returns, and the registry. Re-exported by formats/__init__.py, which is the interface."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..dynamic import DynamicSupport
from ..errors import ZIP_READ_ERRORS, UsageError

if TYPE_CHECKING:
    import torch

    from ..dynamic import Resolved
    from ..inputs import Inputs

T = TypeVar("T")

# --precision values a graph format can declare; fp32 is the default (computes in the module's own dtypes).
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class NoOptions:
    """The options of a format that has none."""


def option(default: Any, *, verify_takes: bool = False) -> Any:
    """A field of a format's options dataclass. Every option is recorded in the manifest; `verify_takes`: `lexport
    verify --manifest` takes it from there too (False: export-only, the artifact holds its effect already)."""
    return field(default=default, metadata={"verify_takes": verify_takes})


@dataclass(frozen=True)
class ExportContext:
    """Everything a format's writer gets: built once per run, with the format's own options set for each format."""

    target: torch.nn.Module | None  # the nn.Module to export (eval mode); None when only weights formats run
    # Stripped checkpoint tensors. For a sharded folder a lazy mapping that reads a tensor when asked for it:
    # visit items() one at a time, and take shapes and dtypes from statedict.tensor_specs(), never dict(...).
    state_dict: Mapping[str, torch.Tensor]
    example: Inputs | None  # the example inputs (graph formats), None for weights formats
    # The dims --dynamic (or --dynamic-batch) makes dynamic, resolved on the example, with their bounds; None: the
    # example's shapes. Set only when the format declares Format.dynamic.
    dynamic: Resolved | None = None
    # The format's own options: an instance of its Format.options dataclass (read with options_as).
    options: object = NoOptions()
    # --precision the artifact computes in (None: the module's own dtypes); set while a reduced copy is written.
    precision: str | None = None
    # --quantize with calibration: forward's inputs per calibration batch (never the batches that verify).
    calibration: tuple[Inputs, ...] = ()

    def options_as(self, kind: type[T]) -> T:
        """This format's options, typed; the defaults when the context carries none of this kind (a context made
        by a writer for an intermediate fp32 artifact)."""
        return self.options if isinstance(self.options, kind) else kind()

    def module(self) -> torch.nn.Module:
        """The module to export; graph formats are only asked to write when there is one."""
        if self.target is None:
            raise RuntimeError("a graph format was asked to write without a module")
        return self.target

    def inputs(self) -> Inputs:
        """The example inputs; graph formats are only asked to write when there are some."""
        if self.example is None:
            raise RuntimeError("a graph format was asked to write without example inputs")
        return self.example


@dataclass
class Written:
    exporter: str
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # format facts for the report (ONNX opset, io names)
    traced: bool = False  # recorded by tracing: the graph holds the example's branch and sizes


Writer = Callable[[ExportContext, Path], Written]


@dataclass(frozen=True)
class Quantization:
    """A --quantize value a format takes: its writer, whether it calibrates on --data batches (ctx.calibration),
    the default tolerances against the fp32 module, and the optional extra it needs (checked before slow work)."""

    write: Writer
    calibrated: bool
    atol: float
    rtol: float
    description: str
    require: Callable[[], object] | None = None
    # Whether its artifact can take the --dynamic dims (False: refused before slow work, exit 2).
    takes_dynamic: bool = True
    # At the peak the directory holds the fp32 artifact, a pre-processed copy and the quantized artifact.
    size_factor: int = 3


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
    """A format and everything it can do, declared: the pipeline asks it, never its name."""

    name: str  # the --to name, also used in JSON
    suffix: str
    kind: str  # "weights" (bit-exact check) or "graph" (run and compare outputs)
    description: str
    write: Writer
    # write() gets a path inside a private temp dir; every file it leaves there is part of the artifact.
    load: Callable[[Path], Any]  # weights: a mapping name -> tensor; graph: a callable(*args, **kwargs)
    atol: float = 0.0
    rtol: float = 0.0
    needs_module: bool = True
    # A graph format whose writer needs of the module only its structure (names, shapes, dtypes, ties, config) and
    # reads every tensor from ctx.state_dict (the checkpoint, memory-mapped or read one tensor at a time) when the
    # checkpoint holds it as the module has it. With --no-verify nothing runs the module: it is built with its
    # parameters left on the meta device, and the weights never sit in memory whole. (A weights format never needs
    # the module's weights: it writes and is verified from the checkpoint.)
    writes_from_checkpoint: bool = False
    # Its runtime is native code that can crash (SIGSEGV, SIGABRT) on a malformed file: verification loads and runs
    # the artifact in a child process, and a crash there is a failed verification (pipeline/isolated.py).
    isolate: bool = False
    # What the format does with --dynamic (and --dynamic-batch); None: static shapes only, --dynamic is exit 2 for a
    # graph format. A format that declares it is verified at other sizes of the dynamic dims.
    dynamic: DynamicSupport | None = None
    # About how many bytes write() will put in its directory (companions included), checked against the free
    # space before writing: an over-estimate by a margin, never an under-estimate for ordinary modules.
    size_estimate: Callable[[ExportContext], int] = weights_estimate
    # Recognises an existing artifact of this format (`lexport verify`): from the first bytes and, for zip
    # files, the member names. More specific formats are asked first (see detect_format).
    sniff: Callable[[Sniffed], bool] | None = None
    sniff_order: int = 0  # lower is asked first
    # The format's options: a frozen dataclass whose fields (made with `option`) are named like the run's options
    # (ExportOptions fields, CLI flags); the pipeline fills one per run and the writer reads it from
    # ctx.options_as(...). Every field is recorded in the manifest.
    options: type = NoOptions
    # Checks this format's options before any slow work, called for every registered format with its options
    # and whether this run writes or verifies the format (an option of a format not asked for may be refused).
    check: Callable[[Any, bool], None] | None = None
    # What the format needs prepared once the module has run on the example: (ctx, the eager output, its options)
    # -> its options completed (ONNX: the graph's input and output names).
    prepare: Callable[[ExportContext, Any, Any], Any] | None = None
    # --precision values it takes (fp32 among them for graph formats); a value it refuses for a reason of its own
    # says so through `refusals`.
    precisions: tuple[str, ...] = ()
    # --quantize values it takes and how it writes them.
    quantizations: Mapping[str, Quantization] = field(default_factory=dict)
    # Why it refuses a --precision or --quantize value (keyed by the value), when there is more to say than "no";
    # keyed "dynamic": why a graph format without `dynamic` takes static shapes only.
    refusals: Mapping[str, str] = field(default_factory=dict)
    # The deployment flag an existing artifact was evidently made with (--precision fp16, ...), for a verify
    # that fails without it; None when it cannot tell.
    made_with: Callable[[Path], str | None] | None = None
    # The files published with an existing artifact (`lexport verify`): by default `<name>.*` beside it (ONNX
    # external data); an OpenVINO IR's weights are `<stem>.bin`.
    companions: Callable[[Path], list[Path]] | None = None
    # The artifact is a folder (write() creates the directory at its path; published whole, --force replaces it).
    folder: bool = False
    # A format that exports one kind of submodule picks it: (the LightningModule, --attr) -> (the --attr to use, a
    # note), or raises UsageError naming the candidates. Called once the module is built.
    select: Callable[[Any, str | None], tuple[str | None, str | None]] | None = None
    # Other names --to takes for it (lower case): names people type for the same thing, never a guess at a typo
    # (a typo gets a suggestion, not a pick).
    aliases: tuple[str, ...] = ()

    # Where it stands in --help, the report and the README table (lower first; ties by name).
    rank: int = 1000

    def companion_files(self, path: Path) -> list[Path]:
        if self.companions is not None:
            return self.companions(path)
        return sorted(c for c in path.parent.glob(f"{path.name}.*") if c.is_file())

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def verify_option_names(self) -> frozenset[str]:
        """The options `lexport verify` takes (declared with option(..., verify_takes=True)); the others are
        export-only: the artifact holds their effect."""
        return frozenset(f.name for f in dataclasses.fields(self.options) if f.metadata.get("verify_takes"))


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


REGISTRY: dict[str, Format] = {}


SCALAR_OPTION_TYPES: tuple[type, ...] = (bool, int, float, str, Path)


def format_option_types(options: type) -> dict[str, object]:
    """The declared types of a format's options, each one lexport can convert from text: bool, int, float, str,
    Path, `X | None` of those, or `tuple[X, ...]` of those; TypeError (at register) for anything else."""
    import types
    import typing

    hints = typing.get_type_hints(options)
    for name, kind in hints.items():
        inner = kind
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(kind) if a is not type(None)]
            inner = rest[0] if len(rest) == 1 else None
        if typing.get_origin(inner) is tuple:
            items = typing.get_args(inner)
            inner = items[0] if len(items) == 2 and items[1] is Ellipsis else None
        if inner not in SCALAR_OPTION_TYPES:
            raise TypeError(f"option {name}: type {kind} is not one lexport converts (bool, int, float, str, Path, "
                            "X | None, tuple[X, ...])")
    return dict(hints)


def register(fmt: Format) -> Format:
    """Add a format to the registry (--to, lexport verify's detection, the manifest's options)."""
    import re

    if not dataclasses.is_dataclass(fmt.options):
        raise TypeError(f"{fmt.name}: Format.options must be a dataclass type")
    bad = [n for n in (fmt.name, *fmt.aliases) if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", n)]
    if bad or "." in fmt.name:  # --to lowercases what it is given; FORMAT.OPTION splits at the first dot
        raise ValueError(f"format {fmt.name!r}: a name is lower-case letters, digits, '-' and '_' (an alias may "
                         f"have '.'): {', '.join(bad) or fmt.name}")
    format_option_types(fmt.options)  # TypeError for a type --format-option cannot convert to
    taken = {n: f.name for f in REGISTRY.values() if f is not fmt for n in (f.name, *f.aliases)}
    clash = [n for n in (fmt.name, *fmt.aliases) if n in taken]
    if clash:  # a plugin never replaces a format, nor takes one of its names
        raise ValueError(f"the name {clash[0]!r} of format {fmt.name!r} is taken: it names the format "
                         f"{taken[clash[0]]!r}, registered first (built-in or another package's)")
    REGISTRY[fmt.name] = fmt
    return fmt


# Formats that failed to load from an installed package: (entry point, why), said when --to names a format that
# is not there or verify finds no format for a file.
PLUGIN_ERRORS: list[tuple[str, str]] = []
# Set to 0 to load no format from installed packages (only the built-in ones).
PLUGINS_ENV = "LEXPORT_PLUGINS"


def plugins_disabled() -> bool:
    import os

    return os.environ.get(PLUGINS_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def plugins_not_loaded() -> str:
    """Why a format of an installed package may be missing, for a hint ("" when nothing is amiss)."""
    if plugins_disabled():
        return f" {PLUGINS_ENV}=0 is set: no format of an installed package is loaded."
    return "".join(f" An installed package's format did not load ({ep}): {why}." for ep, why in PLUGIN_ERRORS)


def detect_format(path: Path) -> Format:
    """The format of an existing artifact, from its content (suffix only where content cannot tell)."""
    import os
    import stat
    import zipfile

    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            return _detect_folder(Path(path))
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
        with open(path, "rb") as f:
            head = f.read(64)
        names = None
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(path) as z:
                    names = tuple(z.namelist())  # zipfile read the whole directory already: bounded by the file
            except ZIP_READ_ERRORS:
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
        hint=f"Formats it reads: {', '.join(f.name for f in REGISTRY.values() if f.sniff)}.{plugins_not_loaded()}",
    )


def _detect_folder(path: Path) -> Format:
    seen = Sniffed(path, b"", 0, None)
    for fmt in REGISTRY.values():
        if fmt.folder and fmt.sniff is not None and fmt.sniff(seen):
            return fmt
    raise UsageError(f"{path} is a directory that is not an artifact lexport recognises",
                     hint=f"Folders it reads: {', '.join(f.name for f in REGISTRY.values() if f.folder) or 'none'}."
                          f"{plugins_not_loaded()}")


def require_installed(require: Callable[[], object]) -> None:
    """An optional extra's runtime check (`require` raises ExportError naming the pip line) as the usage error it is
    before any slow work (exit 2)."""
    from ..errors import ExportError

    try:
        require()
    except ExportError as e:
        raise UsageError(e.message, hint=e.hint) from None


def installed_check(require: Callable[[], object]) -> Callable[[Any, bool], None]:
    """A Format.check for a format whose only option is its optional extra being installed."""

    def check(options: Any, requested: bool) -> None:
        if requested:
            require_installed(require)

    return check


class _Aliases(Mapping[str, str]):
    """Every registered format's aliases -> its name, read from the registry (each Format declares its own)."""

    def _table(self) -> dict[str, str]:
        return {alias: fmt.name for fmt in REGISTRY.values() for alias in fmt.aliases}

    def __getitem__(self, key: str) -> str:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


ALIASES: Mapping[str, str] = _Aliases()


def parse_format_list(values: tuple[str, ...] | list[str]) -> list[str]:
    """`--to onnx --to pt2` and `--to onnx,pt2` alike; case-insensitive; duplicates dropped."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(get_format(n).name for n in names))


def get_format(name: str) -> Format:
    key = name.strip().lower()
    aliases = dict(ALIASES)
    key = aliases.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, [*REGISTRY, *aliases], n=1, cutoff=0.5)
    close = [aliases.get(c, c) for c in close]
    hint = f"Did you mean --to {close[0]}? " if close else ""
    raise UsageError(f"unknown format {name!r}", hint=f"{hint}Formats: {', '.join(REGISTRY)}.{plugins_not_loaded()}")
