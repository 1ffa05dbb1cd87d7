"""The options of a run: one frozen ExportOptions, its numeric ranges, and which options a manifest records."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from ..agreement import DEFAULT_MIN_AGREEMENT, check_min_agreement
from ..errors import UsageError
from ..formats import REGISTRY, format_option_types, get_format
from ..safeload.archive import DEFAULT_MAX_GROWTH

DEFAULT_RANDOM_INPUTS = 5
MAX_RANDOM_INPUTS = 1000
MAX_SEED = 2**63 - 1


# A format's own option as a run holds it: (format, option, value); the value is text from the command line or a
# typed value from the Python API, converted to the option's declared type when the run resolves it.
FormatOption = tuple[str, str, object]
# How export()/verify() take them: {format: {option: value}} or FormatOption triples.
FormatOptionsArg = Mapping[str, Mapping[str, object]] | Sequence[FormatOption]
# --init-arg values as export()/verify() take them: a dict, or (name, value) pairs (values as YAML types them).
InitArgsArg = Mapping[str, Any] | Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class ExportOptions:
    """Every option of a run; the CLI builds one of these and calls `run`."""

    checkpoint: Path
    formats: tuple[str, ...] = ("state-dict",)
    module: str | None = None
    attr: str | None = None
    config: Path | None = None
    init_args: tuple[tuple[str, Any], ...] = ()
    init_args_file: Path | None = None
    inputs: tuple[str, ...] = ()
    example_inputs: Path | None = None
    dynamic_batch: bool = False  # --dynamic 0
    # --dynamic SPEC values (dynamic.parse_dynamic): the dims of the inputs that take other sizes, with bounds.
    dynamic: tuple[str, ...] = ()
    output: Path | None = None
    output_dir: Path | None = None
    force: bool = False
    verify: bool = True
    keep_failed: bool = False
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0
    random_inputs: int = DEFAULT_RANDOM_INPUTS
    opset: int | None = None
    # ONNX graph names, one per input/output tensor (comma-separated values are split); empty: the defaults.
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    torchscript_mode: str | None = None  # torchscript: trace (its default) or script
    # Deployment options, declared by the formats that honour them (formats/_precision.py, executorch).
    precision: str | None = None  # fp32 | fp16 | bf16 for graph formats (none: the dtypes the module is built in)
    quantize: str | None = None  # int8 (static, calibrated on --data): onnx, executorch, openvino; int8-dynamic: onnx
    executorch_backend: str | None = None  # executorch: xnnpack (its default) or portable
    # Any format's own option by name, (format, option, value) (`--format-option onnx.opset=17`): how a format added
    # from outside gets its options without a flag of its own. A value is text from the command line (converted to
    # the option's declared type) or already typed from the Python API. Wins over the dedicated flag of the same
    # option.
    format_options: tuple[FormatOption, ...] = ()
    max_shard_size: str | None = None  # huggingface: transformers' notation (5GB = 5*10**9 bytes, 5GiB = 5*2**30)
    tokenizer: Path | None = None  # huggingface: a tokenizer.save_pretrained folder copied into the artifact
    trust_checkpoint: bool = False
    allow_globals: tuple[str, ...] = ()
    strict_finite: bool = False
    meta_build: bool = True
    # No artifact may hold more than this many times the bytes the checkpoint's tensors occupy in the file
    # (a 4-byte storage viewed as 10**9 elements would otherwise publish 4 GB).
    max_growth: float = DEFAULT_MAX_GROWTH
    # sha256 of the whole checkpoint (mostly optimizer state): a full read, so the CLI asks for it with --json.
    hash_checkpoint: bool = True
    # Real batches: a .pt file of batches, or "config" (the data: section of --config builds the
    # LightningDataModule). Calibration for --quantize int8, held-out verification with top-1 agreement for all.
    data: str | None = None
    data_batches: int | None = None  # batches read (default: about DEFAULT_SAMPLES samples)
    data_input: str | None = None  # the element (index) or key of a batch that is forward's input
    # Quantized and reduced-precision artifacts must pick the eager module's top-1 class on this share of the
    # held-out samples (exit 1 below it).
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    # The sha256 the --data file must still have (verify --manifest: the manifest's record); None: any.
    data_sha256: str | None = None
    # Where to write the manifest (the --json record plus the options that shaped the bytes), atomically.
    manifest: Path | None = None
    # Where each option came from ({file, profile, options: {flag: {value, source}}}: command line, a settings
    # file's [tool.lexport] or profile, or the default); recorded in the report and the manifest. None: not asked.
    settings: dict[str, Any] | None = None


# Options recorded in a manifest (everything that shapes the artifacts' bytes or their verification) -> whether
# `lexport verify --manifest` takes it from there (False: export-only, the artifact holds its effect already; or a
# trust flag, which a manifest never turns on: pipeline/manifest_input.py).
# Each format's own options are declared on its Format (formats.option) and added below.
RUN_MANIFEST_OPTIONS: dict[str, bool] = {
    "formats": False, "module": True, "attr": True, "config": True, "init_args": True, "init_args_file": True,
    "inputs": True, "example_inputs": True, "dynamic_batch": True, "dynamic": True, "seed": True,
    "random_inputs": True, "atol": True, "rtol": True, "strict_finite": False, "trust_checkpoint": False,
    "allow_globals": False, "max_growth": True, "meta_build": False, "precision": True, "quantize": True, "data": True,
    "data_batches": True, "data_input": True, "min_agreement": True, "format_options": True,
}


def manifest_options() -> dict[str, bool]:
    """The run's options and every registered format's own that has a run option of its name (the others are
    recorded under `format_options`), read when asked: a format registered later counts too."""
    return {  # a format's field never changes what the run's own option of that name means
        **{name: name in fmt.verify_option_names() for fmt in REGISTRY.values()
           for name in fmt.option_names() if hasattr(ExportOptions, name)},
        **RUN_MANIFEST_OPTIONS,
    }


def parse_format_option(text: str) -> tuple[str, str, str]:
    """`FORMAT.OPTION=VALUE` (`--format-option`) -> (format, option, value as text); the names are checked later,
    against the registry (resolve_format_options)."""
    name, eq, value = text.partition("=")
    fmt, dot, key = name.strip().partition(".")
    if not (eq and dot and fmt and key.strip()):
        raise UsageError(f"--format-option {text!r}: give FORMAT.OPTION=VALUE", hint="e.g. --format-option onnx.opset=17")
    return fmt.strip(), key.strip(), value.strip()


MAX_OPTION_INT = 2**63 - 1


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def convert_format_option(value: object, kind: object, label: str) -> object:
    """A format option's value to its declared type (format_option_types): text from the command line or a
    manifest, or a typed value from the Python API (passed through when it already has the type). `label` names
    where the value came from in the exit-2 message, up to the value (`--format-option onnx.opset=`, `--opset `)."""
    import types
    import typing

    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        empty = value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
        if empty and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # format_option_types allows one
        return convert_format_option(value, inner, label)
    if typing.get_origin(kind) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if items is None:
            raise UsageError(f"{label}{_short(value)}: give a comma-separated list")
        return tuple(convert_format_option(v.strip() if isinstance(v, str) else v, args[0], label)
                     for v in items if not (isinstance(v, str) and not v.strip()))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            word = value.strip().lower() if isinstance(value, str) else None
            if word in ("true", "1", "yes", "on"):
                return True
            if word in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(value)
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            number = int(value) if kind is int else float(value)
            if not math.isfinite(number) or abs(number) > MAX_OPTION_INT:
                raise ValueError(value)
            return number
        if kind is Path:
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(value)
            return Path(value)
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        names: dict[object, str] = {bool: "true or false", int: "an integer", float: "a finite number",
                                    Path: "a path", str: "a text"}
        raise UsageError(f"{label}{_short(value)}: give {names.get(kind, str(kind))}") from None
    raise UsageError(f"{label.rstrip(' =')}: options of type {kind} are not supported")


def resolve_format_options(opts: ExportOptions) -> dict[str, object]:
    """Every registered format's own options: from the run options of the same names (--opset, ...), then
    `format_options` over them (exit 2 naming the format's options for an unknown name or a value of the wrong
    type)."""
    given: dict[str, dict[str, object]] = {}
    for fmt_name, key, value in opts.format_options:
        canonical = get_format(fmt_name).name  # exit 2 with the known formats
        given.setdefault(canonical, {})[key] = value
    resolved: dict[str, object] = {}
    for fmt in REGISTRY.values():
        names = fmt.option_names()
        types = format_option_types(fmt.options)
        # A run option of the same name (--opset, ...) when given; None leaves the format's own default.
        values = {n: convert_format_option(getattr(opts, n), types[n], f"--{n.replace('_', '-')} ") for n in names
                  if getattr(opts, n, None) is not None}
        for key, value in given.get(fmt.name, {}).items():
            if key not in names:
                raise UsageError(f"--format-option {fmt.name}.{key}: {fmt.name} has no option {key!r}",
                                 hint=f"Its options: {', '.join(names)}." if names else f"{fmt.name} has no options.")
            values[key] = convert_format_option(value, types[key], f"--format-option {fmt.name}.{key}=")
        resolved[fmt.name] = fmt.options(**values)
    return resolved


PathArg = str | os.PathLike[str]


class VerifyKwargs(TypedDict, total=False):
    """The keyword arguments of verify(): the options that shape a verification (the module, the inputs, the
    tolerances, the data, the safety bounds), not the export-only ones (formats, output paths, exporter choices)."""

    module: str | None
    attr: str | None
    config: PathArg | None
    init_args: InitArgsArg
    init_args_file: PathArg | None
    inputs: Sequence[str]
    example_inputs: PathArg | None
    dynamic_batch: bool
    dynamic: Sequence[str]
    atol: float | None
    rtol: float | None
    seed: int
    random_inputs: int
    precision: str | None
    quantize: str | None
    format_options: FormatOptionsArg
    trust_checkpoint: bool
    allow_globals: Sequence[str]
    strict_finite: bool
    meta_build: bool
    max_growth: float
    hash_checkpoint: bool
    data: PathArg | None
    data_batches: int | None
    data_input: str | int | None
    min_agreement: float
    data_sha256: str | None
    settings: dict[str, Any] | None


class OptionsKwargs(VerifyKwargs, total=False):
    """The keyword arguments of export(): ExportOptions' fields (but the checkpoint), in the types a caller passes
    (sequences for tuples, str or PathLike for paths): verify()'s and the export-only ones; tests/test_api.py keeps
    them in step with ExportOptions."""

    formats: str | Sequence[str]
    output: PathArg | None
    output_dir: PathArg | None
    force: bool
    verify: bool
    keep_failed: bool
    opset: int | None
    input_names: Sequence[str]
    output_names: Sequence[str]
    torchscript_mode: str | None
    executorch_backend: str | None
    max_shard_size: str | None
    tokenizer: PathArg | None
    manifest: PathArg | None


VERIFY_OPTIONS = frozenset(VerifyKwargs.__annotations__)


def options_from(checkpoint: str | os.PathLike[str], options: Mapping[str, Any]) -> ExportOptions:
    """ExportOptions from the keyword arguments of export()/verify(): sequences as tuples, paths as Paths."""
    options = dict(options)
    if isinstance(options.get("formats"), str):
        options["formats"] = (options["formats"],)
    if isinstance(options.get("dynamic"), str):
        options["dynamic"] = (options["dynamic"],)
    for key in ("formats", "inputs", "allow_globals", "input_names", "output_names", "dynamic"):
        if key in options:
            options[key] = tuple(options[key])
    if "format_options" in options:
        options["format_options"] = format_option_triples(options["format_options"])
    if isinstance(options.get("init_args"), dict):
        options["init_args"] = tuple(options["init_args"].items())
    for key in ("config", "init_args_file", "example_inputs", "output", "output_dir", "manifest", "tokenizer"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    for key in ("data", "data_input"):  # a path or "config"; an index or a key
        if options.get(key) is not None:
            options[key] = str(options[key])
    try:
        return ExportOptions(checkpoint=Path(checkpoint), **options)
    except TypeError as e:
        raise UsageError(str(e)) from e


def format_option_triples(value: FormatOptionsArg | None) -> tuple[FormatOption, ...]:
    """export(format_options=...) as ExportOptions holds it: {format: {option: value}} or (format, option, value)
    triples."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        if not all(isinstance(own, Mapping) for own in value.values()):
            raise UsageError("format_options: give {format: {option: value}}")
        return tuple((str(f), str(k), v) for f, own in value.items() for k, v in own.items())
    if not (isinstance(value, (list, tuple)) and all(isinstance(t, (list, tuple)) and len(t) == 3 for t in value)):
        raise UsageError("format_options: give {format: {option: value}} or (format, option, value) triples")
    return tuple((str(t[0]), str(t[1]), t[2]) for t in value)


def check_ranges(opts: ExportOptions) -> None:
    """Numeric flags within the range they mean something in (exit 2), so nothing downstream overflows."""
    for flag, value in (("--atol", opts.atol), ("--rtol", opts.rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} {value} must be a finite number >= 0")
    if not 0 <= opts.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED} (2**63 - 1)")
    if not 0 <= opts.random_inputs <= MAX_RANDOM_INPUTS:
        raise UsageError(f"--random-inputs must be between 0 and {MAX_RANDOM_INPUTS}")
    check_min_agreement(opts.min_agreement)
    if opts.data_batches is not None and opts.data_batches < 1:
        raise UsageError(f"--data-batches {opts.data_batches}: give a number of batches >= 1")
    if not (math.isfinite(opts.max_growth) and opts.max_growth >= 1):
        raise UsageError(f"--max-growth {opts.max_growth} must be a finite number >= 1")


# Artifacts gated on top-1 agreement over the held-out --data batches (their elementwise drift is expected).
GATED_QUANTIZE = ("int8", "int8-dynamic")
GATED_PRECISION = ("fp16", "bf16")


def is_gated(opts: ExportOptions) -> bool:
    """Quantized and reduced-precision artifacts are judged by the decisions they make (--min-agreement)."""
    return (opts.quantize or "").lower() in GATED_QUANTIZE or (opts.precision or "").lower() in GATED_PRECISION
