"""The pipeline: load once, build once, reference outputs once, then write → verify → publish per format."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import outputs
from .bounded import short_repr
from .checkpoint import DEFAULT_MAX_GROWTH
from .errors import (
    CheckpointError,
    ExportError,
    LexportError,
    OutputError,
    UsageError,
    UserModuleError,
    VerificationError,
    describe_exception,
    export_failure,
)
from .report import ArtifactResult, Report, versions

DEFAULT_RANDOM_INPUTS = 5
MAX_RANDOM_INPUTS = 1000
MAX_SEED = 2**63 - 1
MIN_OPSET = 7


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
    dynamic_batch: bool = False
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
    torchscript_mode: str = "trace"
    # Deployment options, declared by the formats that honour them (formats/_precision.py, executorch).
    precision: str | None = None  # fp16 | bf16 for graph formats (fp32: unchanged)
    quantize: str | None = None  # int8-dynamic for onnx
    executorch_backend: str = "xnnpack"
    trust_checkpoint: bool = False
    allow_globals: tuple[str, ...] = ()
    strict_finite: bool = False
    meta_build: bool = True
    # No artifact may hold more than this many times the bytes the checkpoint's tensors occupy in the file
    # (a 4-byte storage viewed as 10**9 elements would otherwise publish 4 GB).
    max_growth: float = DEFAULT_MAX_GROWTH
    # sha256 of the whole checkpoint (mostly optimizer state): a full read, so the CLI asks for it with --json.
    hash_checkpoint: bool = True
    # Where to write the manifest (the --json record plus the options that shaped the bytes), atomically.
    manifest: Path | None = None


Step = Callable[[str], contextlib.AbstractContextManager[Any]]


@contextlib.contextmanager
def _no_status(label: str) -> Iterator[None]:
    yield


def export(checkpoint: str | os.PathLike[str], *, progress: Step | None = None, **options: Any) -> Report:
    """Export a Lightning checkpoint; returns the Report, raises a LexportError (with `.report`) on failure.

    Options are the fields of ExportOptions, e.g. ``export("m.ckpt", module="pkg:M", attr="model",
    formats=("onnx",))``.
    """
    return run(_options(checkpoint, options), progress=progress)


def _options(checkpoint: str | os.PathLike[str], options: dict[str, Any]) -> ExportOptions:
    if isinstance(options.get("formats"), str):
        options["formats"] = (options["formats"],)
    for key in ("formats", "inputs", "allow_globals", "input_names", "output_names"):
        if key in options:
            options[key] = tuple(options[key])
    if isinstance(options.get("init_args"), dict):
        options["init_args"] = tuple(options["init_args"].items())
    for key in ("config", "init_args_file", "example_inputs", "output", "output_dir", "manifest"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    try:
        return ExportOptions(checkpoint=Path(checkpoint), **options)
    except TypeError as e:
        raise UsageError(str(e)) from e


def run(
    opts: ExportOptions, *, progress: Step | None = None, existing: dict[Path, str | None] | None = None
) -> Report:
    """Export (or, with `existing` = {artifact: expected sha256 or None}, re-verify those artifacts) and return
    the Report; raises a LexportError with `.report` when anything failed."""
    report = Report(module=opts.module, attr=opts.attr, versions=versions())
    try:
        # SIGTERM becomes KeyboardInterrupt from the first step on (loading and building included), so every
        # `finally` removes its temp files and the CLI exits 130.
        with outputs.TerminateOnSignal():
            _run(opts, report, progress or _no_status, existing)
        _finish(report)
    except LexportError as e:
        e.report = report
        report.error = {"code": e.exit_code, "kind": e.kind, "message": str(e)}
        try:
            _write_manifest(opts, report)  # the record of a failed run is worth keeping too
        except LexportError as m:
            report.warnings.append(f"the manifest was not written: {m.message}")
        raise
    try:
        _write_manifest(opts, report)
    except LexportError as e:
        e.report = report
        report.error = {"code": e.exit_code, "kind": e.kind, "message": str(e)}
        raise
    return report


def verify(
    artifacts: Iterable[str | os.PathLike[str]] | dict[Any, str | None],
    checkpoint: str | os.PathLike[str],
    *,
    progress: Step | None = None,
    checkpoint_sha256: str | None = None,
    **options: Any,
) -> Report:
    """Re-verify existing artifacts against their checkpoint (the format comes from each file). With a dict,
    the values are the sha256 each file must still have (None: any); with `checkpoint_sha256`, the checkpoint
    must still be that file (a manifest's). Options as for `export`."""
    expected = dict(artifacts) if isinstance(artifacts, dict) else {a: None for a in artifacts}
    if checkpoint_sha256:
        options["hash_checkpoint"] = True
    opts = _options(checkpoint, options)
    report = run(opts, progress=progress, existing={Path(k): v for k, v in expected.items()})
    got = report.checkpoint.get("sha256")
    if checkpoint_sha256 and got != checkpoint_sha256:
        err = VerificationError(
            f"{checkpoint} is not the checkpoint the manifest records: sha256 {str(got)[:16]}… vs "
            f"{checkpoint_sha256[:16]}…"
        )
        err.report = report
        report.error = {"code": err.exit_code, "kind": err.kind, "message": str(err)}
        raise err
    return report


def _finish(report: Report) -> None:
    """Raise the error of the first failed artifact (its own code), or VerificationError (1)."""
    failed = [a for a in report.artifacts if not a.ok]
    if failed:
        first = failed[0]
        if first.error:
            err: LexportError = ExportError(first.error["message"])
            err.exit_code = first.error["code"]
            err.kind = first.error["kind"]
        else:
            failed_export = [a.format for a in failed if a.error]
            err = VerificationError(
                "verification failed for "
                + ", ".join(a.format for a in failed if a.error is None)
                + (f"; export failed for {', '.join(failed_export)}" if failed_export else ""),
            )
        raise err


MANIFEST_VERSION = 1
# Options recorded in a manifest: everything that shapes the artifacts' bytes or their verification.
_MANIFEST_OPTIONS = (
    "formats", "module", "attr", "config", "init_args", "init_args_file", "inputs", "example_inputs",
    "dynamic_batch", "opset", "input_names", "output_names", "torchscript_mode", "seed", "random_inputs", "atol",
    "rtol", "strict_finite", "trust_checkpoint", "allow_globals", "max_growth", "meta_build", "precision", "quantize", "executorch_backend",
)


def manifest_record(opts: ExportOptions, report: Report) -> dict[str, Any]:
    """The --json record plus the options; every path in it is relative to the manifest's directory, so the
    manifest and the files it names can move together (a later CI stage)."""
    from .checkpoint import file_sha256

    home = (opts.manifest or Path(".")).resolve().parent

    def rel(path: Any) -> str:
        return os.path.relpath(Path(path).resolve(), home)

    record: dict[str, Any] = {"manifest_version": MANIFEST_VERSION, **report.to_json()}
    record["checkpoint"] = {**record["checkpoint"], "path": rel(opts.checkpoint)}
    for a in record["artifacts"]:
        if a.get("path"):
            a["path"] = rel(a["path"])
        if a.get("companions"):
            a["companions"] = [rel(c) for c in a["companions"]]
    options: dict[str, Any] = {}
    for name in _MANIFEST_OPTIONS:
        value = getattr(opts, name)
        if name == "init_args":
            value = dict(value)
        elif isinstance(value, Path):
            value = rel(value)
        elif isinstance(value, tuple):
            value = list(value)
        options[name] = value
    for name in ("config", "init_args_file", "example_inputs"):
        path = getattr(opts, name)
        if path is not None and Path(path).is_file():
            options[f"{name}_sha256"] = file_sha256(Path(path))
    options["formats"] = [a.format for a in report.artifacts]
    record["options"] = options
    return record


def _write_manifest(opts: ExportOptions, report: Report) -> None:
    """Atomically, once the artifacts are published (or failed): the record of what was done."""
    if opts.manifest is None or not report.artifacts:
        return
    import json

    from .report import strict_json

    try:
        # default=str: YAML-typed --init-arg values (dates, bytes) are recorded as text
        text = json.dumps(strict_json(manifest_record(opts, report)), indent=2, allow_nan=False, default=str) + "\n"
    except (TypeError, ValueError) as e:
        raise OutputError(f"cannot write the manifest {opts.manifest}: {e}") from e
    outputs.write_text_atomically(opts.manifest, text, force=opts.force)


@contextlib.contextmanager
def _phase(error: type[LexportError], what: str) -> Iterator[None]:
    """Whatever goes wrong in a phase is that phase's error, with its exit code: a file that makes the loader run
    out of memory is a bad checkpoint (3), a user's module that raises or recurses while building is the module's
    (4). Never the internal-error exit (70)."""
    try:
        yield
    except LexportError:
        raise
    except RecursionError as e:
        raise error(f"{what}: nested too deeply (RecursionError)") from e
    except MemoryError as e:
        raise error(f"{what}: out of memory (MemoryError)") from e
    except Exception as e:
        raise error(f"{what} failed: {describe_exception(e)}") from e
    except SystemExit as e:  # a user's module that calls sys.exit() while importing or building
        raise error(f"{what}: the code called sys.exit({short_repr(e.code)})") from e


def check_ranges(opts: ExportOptions) -> None:
    """Numeric flags within the range they mean something in (exit 2), so nothing downstream overflows."""
    for flag, value in (("--atol", opts.atol), ("--rtol", opts.rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} {value} must be a finite number >= 0")
    if not 0 <= opts.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED} (2**63 - 1)")
    if not 0 <= opts.random_inputs <= MAX_RANDOM_INPUTS:
        raise UsageError(f"--random-inputs must be between 0 and {MAX_RANDOM_INPUTS}")
    if not (math.isfinite(opts.max_growth) and opts.max_growth >= 1):
        raise UsageError(f"--max-growth {opts.max_growth} must be a finite number >= 1")
    if opts.opset is not None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opts.opset <= newest:
            raise UsageError(f"--opset {opts.opset}: this onnx supports opsets {MIN_OPSET} to {newest}")


def _run(opts: ExportOptions, report: Report, step: Step, existing: dict[Path, str | None] | None = None) -> None:
    from .formats import detect_format, get_format, parse_format_list
    from .inputs import parse_input_spec

    # Everything a user can get wrong in flags fails before any slow work.
    check_ranges(opts)
    given = _read_supplied(opts)
    if existing is not None:
        if not existing:
            raise UsageError("nothing to verify: name an artifact")
        detected = [(detect_format(p), p) for p in existing]
        if len({f.name for f, _ in detected}) < len(detected):
            raise UsageError("one artifact per format: verify the others in another run")
        formats = [f for f, _ in detected]
    elif not opts.formats:
        raise UsageError("nothing to do: pass --to FORMAT (state-dict, safetensors, torchscript, onnx, ...)")
    else:
        formats = [get_format(name) for name in parse_format_list(opts.formats)]
        outputs.validate_output_flags(opts.output, [f.name for f in formats])
    formats = _with_deployment_options(formats, opts)
    specs = [parse_input_spec(s) for s in opts.inputs]
    if specs and opts.example_inputs:
        raise UsageError("pass either --input or --example-inputs, not both")
    if opts.torchscript_mode not in ("trace", "script"):
        raise UsageError(f"--torchscript-mode must be 'trace' or 'script', not {opts.torchscript_mode!r}")
    if opts.attr is not None and (not opts.attr or any(not p for p in opts.attr.split("."))):
        raise UsageError(f"--attr {opts.attr!r} is not a dotted path such as 'model' or 'encoder.blocks.0'")
    ckpt_path = opts.checkpoint
    if existing is not None:
        destinations = {f.name: p for f, p in detected}
    else:
        destinations = _destinations(opts, formats)
    if opts.manifest is not None:
        if any(outputs._same_file(opts.manifest, d) or opts.manifest.resolve() == d.resolve()
               for d in destinations.values()):
            raise UsageError(f"--manifest {opts.manifest} is also an artifact's path: give it another name")
        outputs.check_destination(opts.manifest, ckpt_path, force=opts.force)
    graph = [f for f in formats if f.kind == "graph"]
    opts = replace(opts, formats=tuple(f.name for f in formats))
    onnx_names = _onnx_names_given(opts, formats, existing is not None)
    # Weights formats never need the class: --config alone does not make lexport import anything for them.
    wants_module = opts.module or any(f.needs_module for f in formats)

    from .checkpoint import load_checkpoint

    with step("loading checkpoint"), _phase(CheckpointError, f"reading {ckpt_path}"):
        ckpt = load_checkpoint(
            ckpt_path,
            trust=opts.trust_checkpoint,
            allow_globals=opts.allow_globals,
            hash_file=opts.hash_checkpoint,
            max_growth=opts.max_growth,
        )
    from .checkpoint import _printable, unloaded_by_key

    unloaded = list(unloaded_by_key(ckpt.hparams))
    if unloaded:
        report.notes.append(
            f"hyper_parameters {_printable(', '.join(unloaded))[:300]} hold objects that were left unloaded "
            "(placeholders: nothing from the file ran); the weights do not need them"
        )
    report.checkpoint = {
        "path": str(ckpt_path),
        "sha256": None,
        "lightning_version": ckpt.lightning_version,
        "epoch": ckpt.epoch,
        "global_step": ckpt.global_step,
        "plain_state_dict": ckpt.plain,
        "tensors": len(ckpt.state_dict),
    }

    from .formats import ExportContext

    if wants_module:
        with step("building module"), _phase(UserModuleError, "building the module"):
            built = _build(opts, ckpt, report, given)
        target, state_dict = built.target, built.state_dict
        report.notes.extend(built.notes)
    else:
        from .model import strip_prefix

        target = None
        state_dict = strip_prefix(ckpt.state_dict, f"{opts.attr}." if opts.attr else "")
        if opts.attr and not state_dict:
            prefixes = sorted({k.split(".", 1)[0] for k in ckpt.state_dict})
            raise UserModuleError(
                f"--attr {opts.attr!r}: no tensors in the checkpoint start with {opts.attr + '.'!r}",
                hint=f"Top-level prefixes in the checkpoint: {', '.join(prefixes)}",
            )
    with _phase(CheckpointError, "checking the weights for NaN/Inf"):
        _check_finite_weights(state_dict, opts, report)

    example = None
    refs: _References | None = None
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    if graph:
        with step("running the module on the example inputs"), _phase(UserModuleError, "running the module"):
            example, source = _example_inputs(opts, specs, target, built.module)
            if opts.dynamic_batch and any(f.dynamic_batch for f in graph):
                from .inputs import batch_size

                if batch_size(example) == 1:
                    raise UsageError(
                        "--dynamic-batch needs example inputs with a batch of 2 or more: torch.export "
                        "specializes dimensions of size 1",
                        hint="Pass --input with a batch >= 2, e.g. --input float32[2,...].",
                    )
            refs = _References(target, example, opts)
            try:
                reference = refs.get(0)
            except UserModuleError as e:
                e.message += f"\n(the inputs are {source})"
                raise
            _check_finite_outputs(reference, opts, report)
        if any(f.name == "onnx" for f in graph):
            from .formats.onnx import io_names

            input_names, output_names = io_names(target, example, reference, *onnx_names)

    ctx = ExportContext(
        target=target,
        state_dict=state_dict,
        example=example,
        opset=opts.opset,
        dynamic_batch=opts.dynamic_batch,
        torchscript_mode=opts.torchscript_mode,
        executorch_backend=opts.executorch_backend,
        input_names=input_names,
        output_names=output_names,
    )
    if existing is None:
        for d in {dest.parent for dest in destinations.values()}:
            outputs.remove_stale_temp_dirs(d)
    for fmt in formats:
        result = ArtifactResult(format=fmt.name)
        report.artifacts.append(result)
        dest = destinations[fmt.name]
        with step(f"{'verifying' if existing is not None else 'exporting'} {fmt.name}") as shown:
            if existing is not None:
                _check_existing(fmt, ctx, dest, existing[dest], opts, refs, result)
            else:
                _export_one(fmt, ctx, dest, opts, refs, result)
            if shown is not None and not result.ok:
                shown.failed = True  # the status line ends in ✗
    _say_what_else_worked(report)
    if opts.hash_checkpoint:
        report.checkpoint["sha256"] = ckpt.sha256


def _onnx_names_given(opts: ExportOptions, formats: list[Any], verifying: bool) -> tuple[list[str], list[str]]:
    """--input-names/--output-names split at commas; names only ONNX has, checked before any slow work (their count
    once the example inputs and outputs are known)."""
    from .formats.onnx import parse_names

    given = parse_names(opts.input_names), parse_names(opts.output_names)
    if verifying:  # export-only: the names are in the graph already
        return [], []
    for flag, names in zip(("--input-names", "--output-names"), given):
        if names and not any(f.name == "onnx" for f in formats):
            raise UsageError(f"{flag} names an ONNX graph's {flag[2:-6]}s: it needs --to onnx")
        if any(not n for n in names):
            raise UsageError(f"{flag} {','.join(names)!r}: a name is empty", hint="Separate names with one comma.")
    return given


def _say_what_else_worked(report: Report) -> None:
    """A format that failed on data-dependent control flow: its error says what the other formats of this run did."""
    from .errors import DATA_DEPENDENT_HINT, DEBUG_HINT

    failed = [a for a in report.artifacts if a.error and DATA_DEPENDENT_HINT in a.error["message"]]
    others = [a for a in report.artifacts if a not in failed]
    if not failed or not others:
        return

    def outcome(a: ArtifactResult) -> str:
        if a.error:
            return "export failed"
        if a.verification is not None and not a.verification.passed:
            traced = a.exporter in ("torch.jit.trace", "torch.onnx.torchscript")
            return "failed verification" + (f" ({a.exporter} traced one branch)" if traced else "")
        return "verified" if a.verification is not None else "written, not verified"

    said = "In this run: " + "; ".join(f"{a.format} {outcome(a)}" for a in others) + "."
    for a in failed:
        a.error["message"] = a.error["message"].replace(DEBUG_HINT, f"{said}\n{DEBUG_HINT}")


@dataclass
class _Supplied:
    """What the user's flags say about the class and its arguments: --config, then --init-args, then --init-arg."""

    class_path: str | None
    args: dict[str, Any]


def _read_supplied(opts: ExportOptions) -> _Supplied:
    """Read every config and argument file up front (cheap; bounded YAML), so a bad one is exit 2 before any
    slow work, whatever the formats."""
    from .model import load_args_file

    class_path = opts.module
    args: dict[str, Any] = {}
    if opts.config:
        from .configs import read_model_section

        section = read_model_section(opts.config)
        class_path = class_path or section.class_path
        args.update(section.args)
    if opts.init_args_file:
        args.update(load_args_file(opts.init_args_file, flag="--init-args"))
    args.update(dict(opts.init_args))
    return _Supplied(class_path, args)


def _with_deployment_options(formats: list[Any], opts: ExportOptions) -> list[Any]:
    """Formats wrapped for --precision/--quantize (exit 2 where a format does not take them); executorch's
    backend and presence checked before any slow work."""
    from .formats._precision import apply_options

    formats = [apply_options(f, opts.precision, opts.quantize) for f in formats]
    if any(f.name == "executorch" for f in formats):
        from .formats import executorch

        if opts.executorch_backend.strip().lower() not in executorch.BACKENDS:
            raise UsageError(
                f"--executorch-backend {opts.executorch_backend!r}: use one of {', '.join(executorch.BACKENDS)}"
            )
        try:
            executorch._require_executorch()
        except ExportError as e:
            raise UsageError(e.message, hint=e.hint) from None
    for f in formats:  # a format's runtime that is not installed: a usage error, before any slow work
        if f.requires is not None:
            try:
                f.requires()
            except ExportError as e:
                raise UsageError(e.message, hint=e.hint) from None
    return formats


def _destinations(opts: ExportOptions, formats: list[Any]) -> dict[str, Path]:
    """Where each format goes; every refusal (exists without --force, is the input, not writable) at once."""
    if opts.output_dir is not None and not opts.output_dir.exists():
        try:
            opts.output_dir.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"cannot create --output-dir {opts.output_dir}: {e.strerror or e}") from e
    destinations = {
        f.name: outputs.output_path(opts.checkpoint, f.suffix, opts.output, opts.output_dir) for f in formats
    }
    refused = []
    for dest in destinations.values():
        try:
            outputs.check_destination(dest, opts.checkpoint, force=opts.force)
        except OutputError as e:
            refused.append(e)
    if len(refused) == 1:
        raise refused[0]
    if refused:
        raise OutputError("\n".join(e.message for e in refused), hint=refused[0].hint)
    return destinations


def _build(opts: ExportOptions, ckpt: Any, report: Report, given: _Supplied) -> Any:
    from . import model

    class_path, supplied = given.class_path, given.args
    if class_path is None:
        named = ckpt.hparams.get("_class_path")
        if named and opts.trust_checkpoint:
            class_path = str(named)
        else:
            from .formats import REGISTRY

            needs = ", ".join(f"--to {n}" for n in opts.formats if REGISTRY[n].needs_module)
            named_text = str(named) if isinstance(named, str) else None
            if named_text:
                mod, _, cls_name = named_text.rpartition(".")
                hint = (f"The checkpoint records its class: pass --module {mod}:{cls_name} (lexport never imports a "
                        "class named inside a checkpoint on its own).")
            else:
                hint = "Pass --module pkg.module:YourLightningModule."
            said = (f"--config {opts.config} names no class (LightningCLI(Model, ...) saves model: without "
                    "class_path), and " if opts.config else "")
            raise UsageError(f"{said}{needs} needs the LightningModule class", hint=hint)
    report.module = class_path
    cls = model.resolve_class(class_path)
    kwargs = model.constructor_arguments(
        cls,
        ckpt.hparams,
        ckpt.raw,
        supplied,
        trust=opts.trust_checkpoint,
        explicit=tuple(k for k, _ in opts.init_args),
        warnings=report.warnings,
    )
    built = model.build_module(cls, kwargs, ckpt.raw, attr=opts.attr, meta=opts.meta_build)
    built.module.eval()
    return built


def _example_inputs(opts: ExportOptions, specs: list[Any], target: Any, lightning_module: Any) -> tuple[Any, str]:
    from . import inputs

    if specs:
        vocab = inputs.embedding_vocabulary(target) if target is not None else None
        return inputs.from_specs(specs, opts.seed, int_high=vocab), "from --input"
    if opts.example_inputs:
        return inputs.from_file(opts.example_inputs), f"from --example-inputs {opts.example_inputs}"
    own = getattr(target, "example_input_array", None)
    example = inputs.from_module(target, lightning_module)
    if example is not None:
        whose = "the selected submodule's" if own is not None or target is lightning_module else "the LightningModule's"
        return example, f"{whose} example_input_array"
    raise UsageError(
        f"no example inputs for {type(target).__name__}.forward: it has no example_input_array",
        hint="Pass one --input DTYPE[D0,D1,...] per forward argument, e.g. --input float32[2,10], "
        "or --example-inputs FILE (.pt).",
    )


class _References:
    """Input sets for verification and the eager outputs on each, computed once and shared by all formats."""

    def __init__(self, target: Any, example: Any, opts: ExportOptions) -> None:
        from . import inputs

        self.target = target
        self.sets = [example] + [inputs.random_like(example, opts.seed + i) for i in range(1, opts.random_inputs + 1)]
        self.labels = ["example input"] + [f"random input {i}" for i in range(1, opts.random_inputs + 1)]
        self.dynamic_set: Any = None
        b = inputs.batch_size(example)
        if opts.dynamic_batch and b is not None:
            self.dynamic_set = inputs.random_like(example, opts.seed + 1000, batch=b + 1)
        self._cache: dict[int, Any] = {}

    def get(self, i: int) -> Any:
        from .inputs import run_forward

        if i not in self._cache:
            data = self.sets[i] if i >= 0 else self.dynamic_set
            self._cache[i] = _detach(run_forward(self.target, data))
        return self._cache[i]

    def runs(self, dynamic: bool) -> list[tuple[str, Any, Any]]:
        out = [(label, data, self.get(i)) for i, (label, data) in enumerate(zip(self.labels, self.sets))]
        if dynamic and self.dynamic_set is not None:
            out.append((f"batch of {self.dynamic_set.tensors()[0].shape[0]}", self.dynamic_set, self.get(-1)))
        return out


def _detach(value: Any) -> Any:
    from torch.utils._pytree import tree_map

    def clone(x: Any) -> Any:
        return x.detach().clone() if hasattr(x, "detach") else x

    return tree_map(clone, value)


def _export_one(fmt: Any, ctx: Any, dest: Path, opts: ExportOptions, refs: Any, result: ArtifactResult) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from .checkpoint import file_sha256

    started = time.perf_counter()
    staging = None
    try:
        # The format's own estimate (graph formats: weights + program + margin) must fit before anything is
        # written; a disk that fills anyway (another process) is caught below, whichever writer hits it.
        try:
            needed = fmt.size_estimate(ctx)
        except Exception:  # noqa: BLE001 - an estimate is advice; a failing one must not stop the export
            needed = 0
        outputs.check_free_space(dest.parent, needed, dest.name)
        staging = outputs.stage(dest, needed)
        try:
            written = fmt.write(ctx, staging.path)
        except LexportError:
            raise
        except Exception as e:
            io_error = outputs.write_os_error(e)
            if io_error is not None:
                raise outputs.write_failure(io_error, dest, needed) from e
            if isinstance(e, RuntimeError) and "unexpected pos" in str(e):  # torch's zip writer: a short write
                raise OutputError(
                    f"cannot write {dest.name} in {dest.parent}: the writer could not write all bytes "
                    "(disk full or an I/O error)"
                ) from e
            raise export_failure(f"{fmt.name} export failed", e) from e
        result.exporter = written.exporter
        result.notes.extend(written.notes)
        result.info.update(written.info)
        if not dest.name.endswith(fmt.suffix):
            result.notes.append(f"{dest.name} does not end with {fmt.suffix}, the usual suffix of {fmt.name}")
        # fsync and hashing wait on the disk, verification on the CPU: overlap them (both release the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(_fsync_and_hash, staging, file_sha256)
            if opts.verify:
                from .formats._graph import quiet_torch_logs

                with quiet_torch_logs():
                    result.verification = _verify(fmt, staging.path, ctx, opts, refs)
            result.bytes, result.sha256 = synced.result()
        passed = result.verification is None or result.verification.passed
        if passed:
            # Exclusive unless --force: a file another run published meanwhile is never replaced (exit 6).
            published = staging.publish(force=opts.force)
        elif opts.keep_failed:
            # A leftover .FAILED artifact of an earlier run is replaced, as it always was.
            published = staging.publish(outputs.failed_name(dest, fmt.suffix), force=True)
            result.notes.append("kept although verification failed (--keep-failed)")
        else:
            published = []
        if published:
            result.path = str(published[0])
            result.companions = [str(p) for p in published[1:]]
        if not opts.verify:
            result.notes.append("not verified (--no-verify)")
    except LexportError as e:
        result.error = {"code": e.exit_code, "kind": e.kind, "message": str(e)}
    finally:
        if staging is not None:
            staging.discard()
        result.seconds = time.perf_counter() - started


def _check_existing(
    fmt: Any, ctx: Any, path: Path, expected_sha: str | None, opts: ExportOptions, refs: Any, result: ArtifactResult
) -> None:
    """`lexport verify`: the same verification as after an export, on a file that exists; with a manifest, the
    file must also still have the sha256 recorded there."""
    from .checkpoint import file_sha256
    from .formats._graph import quiet_torch_logs
    from .verify import Verification

    started = time.perf_counter()
    result.path = str(path)
    try:
        companions = fmt.companion_files(path)
        result.companions = [str(c) for c in companions]
        result.bytes = sum(f.stat().st_size for f in [path, *companions])
        result.sha256 = file_sha256(path)
        if expected_sha is not None and result.sha256 != expected_sha:
            # Checked before the artifact is loaded: a changed file (an AOTInductor package holds a shared library)
            # is never run.
            result.verification = Verification(False, 0, math.nan, math.nan, None, None, problems=[
                f"sha256 {result.sha256[:16]}… differs from the manifest's {expected_sha[:16]}…: the file changed"
            ])
            return
        with quiet_torch_logs():
            result.verification = _verify(fmt, path, ctx, opts, refs)
        if not result.verification.passed and not (opts.precision or opts.quantize):
            flag = _made_with(fmt.name, path)
            if flag:
                result.verification.problems.append(
                    f"{path.name} looks exported with {flag}: verify it with that flag (a manifest records it)"
                )
    except OSError as e:
        result.error = {"code": 2, "kind": "usage", "message": f"cannot read {path}: {e.strerror or e}"}
    finally:
        result.seconds = time.perf_counter() - started


def _made_with(format_name: str, path: Path) -> str | None:
    """The deployment flag an artifact was evidently exported with (its graph takes float16/bfloat16 inputs, or
    holds onnxruntime's integer quantization ops), for a verify that was not given it; None when unsure."""
    try:
        if format_name == "onnx":
            import onnx

            graph = onnx.load(str(path), load_external_data=False).graph
            if {n.op_type for n in graph.node} & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}:
                return "--quantize int8-dynamic"
            types = {i.type.tensor_type.elem_type for i in graph.input}
            dtypes = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
        elif format_name == "exported-program":
            import torch

            program = torch.export.load(str(path))
            types = {getattr(n.meta.get("val"), "dtype", None) for n in program.graph.nodes if n.op == "placeholder"}
            dtypes = {torch.float16: "fp16", torch.bfloat16: "bf16"}
        else:
            return None
    except Exception:  # noqa: BLE001 - only a hint: a file that cannot be read has failed verification already
        return None
    found = [name for t, name in dtypes.items() if t in types]
    return f"--precision {found[0]}" if found else None


def _fsync_and_hash(staging: Any, file_sha256: Any) -> tuple[int, str]:
    staging.fsync()  # a delayed ENOSPC/EIO (delayed allocation, NFS) surfaces here as OutputError
    files = staging.files()
    try:
        return sum(f.stat().st_size for f in files), file_sha256(files[0])
    except OSError as e:
        raise outputs.write_failure(e, staging.final, staging.needed) from e


def _verify(fmt: Any, path: Path, ctx: Any, opts: ExportOptions, refs: Any) -> Any:
    from .verify import Verification, compare_outputs, compare_tensor_maps

    try:
        loaded = fmt.load(path)
    except Exception as e:  # noqa: BLE001 - an artifact its own runtime cannot load has failed verification
        return Verification(False, 0, float("nan"), float("nan"), None, None, problems=[
            f"{fmt.name} runtime cannot load the artifact: {describe_exception(e)}"
        ])
    if fmt.kind == "weights":
        return compare_tensor_maps(ctx.state_dict, loaded)
    atol = opts.atol if opts.atol is not None else fmt.atol
    rtol = opts.rtol if opts.rtol is not None else fmt.rtol
    runs = refs.runs(dynamic=opts.dynamic_batch and fmt.dynamic_batch)
    expected, actual, labels, problems = [], [], [], []
    for label, data, ref in runs:
        try:
            out = loaded(*data.args, **data.kwargs)
        except Exception as e:  # noqa: BLE001 - the artifact fails where the module does not
            problems.append(f"{label} ({data.describe()}): the artifact failed: {describe_exception(e)}")
            continue
        expected.append(ref)
        actual.append(out)
        labels.append(label)
    v = compare_outputs(expected, actual, atol=atol, rtol=rtol, labels=labels)
    v.problems[:0] = problems
    v.inputs_checked = len(runs)
    v.passed = v.passed and not problems
    return v




def _check_finite_weights(state_dict: Mapping[str, Any], opts: ExportOptions, report: Report) -> None:
    from .checkpoint import tensor_specs

    bad = []
    for name, spec in tensor_specs(state_dict).items():
        if spec.dtype.is_floating_point and spec.numel():
            t = state_dict[name]  # one at a time: a sharded folder's tensors are read when asked for
            if not _all_finite(t):
                bad.append(name)
            del t
    if bad:
        msg = f"non-finite values (NaN or Inf) in the weights: {', '.join(bad[:10])}"
        if opts.strict_finite:
            raise UserModuleError(msg, hint="Drop --strict-finite to export anyway.")
        report.warnings.append(msg)


def _all_finite(t: Any, chunk: int = 1 << 22) -> bool:
    """Chunked; a sum is non-finite whenever any element is NaN or Inf, so the exact check runs only then."""
    import torch

    flat = t.detach().reshape(-1)
    fast = t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        if fast:
            total = part.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            if bool(torch.isfinite(total)):
                continue
        if not bool(torch.isfinite(part).all()):
            return False
    return True


def _check_finite_outputs(value: Any, opts: ExportOptions, report: Report) -> None:
    import torch

    from .verify import flatten_outputs

    bad = [
        name
        for name, t in flatten_outputs(value)
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and not bool(torch.isfinite(t).all())
    ]
    if bad:
        msg = f"the module's outputs on the example inputs are not finite: {', '.join(bad)}"
        if opts.strict_finite:
            raise UserModuleError(msg, hint="Drop --strict-finite to export anyway.")
        report.warnings.append(msg)


