"""The preparation export and verify share: flags checked before slow work, then load, build, example inputs and
the eager reference outputs, once per run, into the ExportContext every format gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import inputs, outputs
from ..construct.argfiles import load_args_file
from ..construct.arguments import constructor_arguments
from ..construct.configs import read_model_section
from ..construct.importing import resolve_class
from ..construct.module import BuiltModule, build_module, load_parameters, seeded, select_attr
from ..construct.pretrained import is_peft, merged_copy, without_cache
from ..data.files import load_tensor_file
from ..dynamic import parse_dynamic, resolve
from ..errors import CheckpointError, UsageError, UserModuleError
from ..formats import REGISTRY, ExportContext, Format, check_quantize_request, for_run
from ..inputs import Inputs, InputSpec
from ..report import Report
from ..safeload.placeholders import UnloadedArgumentsError, unloaded_by_key
from ..sources import Checkpoint, load_checkpoint
from ..statedict import strip_prefix
from ..text import printable
from .data import HeldOut, read_held_out
from .finite import check_finite_outputs, check_finite_weights
from .options import ExportOptions, check_ranges, resolve_format_options
from .run import Step, phase


@dataclass
class Supplied:
    """What the user's flags say about the class and its arguments: --config, then --init-args, then --init-arg."""

    class_path: str | None
    args: dict[str, Any]


def read_supplied(opts: ExportOptions) -> Supplied:
    """Read every config and argument file up front (cheap; bounded YAML), so a bad one is exit 2 before any
    slow work, whatever the formats."""

    class_path = opts.module
    args: dict[str, Any] = {}
    if opts.config:

        section = read_model_section(opts.config)
        class_path = class_path or section.class_path
        args.update(section.args)
    if opts.init_args_file:
        args.update(load_args_file(opts.init_args_file, flag="--init-args"))
    args.update(dict(opts.init_args))
    return Supplied(class_path, args)


def _build(opts: ExportOptions, ckpt: Checkpoint, report: Report, given: Supplied,
           parameters: bool = True) -> BuiltModule:

    class_path, supplied = given.class_path, given.args
    if class_path is None:
        named = ckpt.hparams.get("_class_path")
        if named and opts.trust_checkpoint:
            class_path = str(named)
        else:

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
    cls = resolve_class(class_path)
    kwargs = constructor_arguments(
        cls,
        ckpt.hparams,
        ckpt.raw,
        supplied,
        trust=opts.trust_checkpoint,
        explicit=tuple(k for k, _ in opts.init_args),
        warnings=report.warnings,
    )
    with seeded(opts.seed):
        built = build_module(cls, kwargs, ckpt.raw, attr=opts.attr, meta=opts.meta_build, parameters=parameters)
    built.module.eval()
    return built


def _example_inputs(opts: ExportOptions, specs: list[InputSpec], target: Any,
                    lightning_module: Any) -> tuple[Inputs, str]:

    if specs:
        vocab = inputs.embedding_vocabulary(target) if target is not None else None
        return inputs.from_specs(specs, opts.seed, int_high=vocab), "from --input"
    if opts.example_inputs:
        value = load_tensor_file(opts.example_inputs, "--example-inputs", inputs.FILE_HINT, max_growth=opts.max_growth)
        return inputs.from_value(value), f"from --example-inputs {opts.example_inputs}"
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


class References:
    """Input sets for verification and the eager outputs on each, computed once and shared by all formats."""

    def __init__(self, target: Any, example: Inputs, opts: ExportOptions) -> None:

        self.target = target
        self.seed = opts.seed
        self.sets = [example] + [inputs.random_like(example, opts.seed + i) for i in range(1, opts.random_inputs + 1)]
        self.labels = ["example input"] + [f"random input {i}" for i in range(1, opts.random_inputs + 1)]
        self.dynamic: Any = None  # dynamic.Resolved with --dynamic: verification derives the other sizes from it
        self._cache: dict[Any, Any] = {}
        self.held_out: HeldOut | None = None  # pipeline.data.HeldOut with --data: real batches, checked with agreement

    def get(self, i: int) -> Any:
        if i not in self._cache:
            self._cache[i] = inputs.detached(inputs.run_forward(self.target, self.sets[i]))
        return self._cache[i]

    def runs(self, dynamic: Any = None) -> list[tuple[str, Any, Any]]:
        """(label, inputs, eager outputs): the example, the random inputs and, for `dynamic` (a dynamic.Resolved,
        bounded as the format needs), random inputs at the other sizes of its dims."""
        out = [(label, data, self.get(i)) for i, (label, data) in enumerate(zip(self.labels, self.sets))]
        return out + (self.dynamic_runs(dynamic) if dynamic is not None else [])

    def dynamic_runs(self, dynamic: Any) -> list[tuple[str, Any, Any]]:
        out = []
        for n, (label, sizes) in enumerate(dynamic.runs()):
            key = ("dynamic", label)
            if key not in self._cache:
                data = inputs.random_like(self.sets[0], self.seed + 1000 + n, sizes=sizes)
                try:
                    ref = inputs.detached(inputs.run_forward(self.target, data))
                except inputs.ForwardFailed as e:
                    raise UsageError(
                        f"{dynamic.spec.flags()}: the module itself fails at {label} (the example has "
                        f"{_example_sizes(dynamic)}): {e.reason[:400]}",
                        hint=f"Export with the dims forward takes at any size only: {dynamic.without_run(sizes)} (or "
                        "bound them with DIM:MIN..MAX).",
                    ) from e
                self._cache[key] = (data, ref)
            data, ref = self._cache[key]
            out.append((label, data, ref))
        return out


def _example_sizes(dynamic: Any) -> str:
    return ", ".join(f"{d.label()} = {d.size}" for d in dynamic.dims)


def check_flags(opts: ExportOptions) -> Supplied:
    """Everything a user can get wrong in the run's own flags, before any slow work: ranges, config and argument
    files (read up front: cheap, bounded YAML)."""
    check_ranges(opts)
    return read_supplied(opts)


def with_format_options(formats: list[Format], opts: ExportOptions) -> list[Format]:
    """Formats wrapped for --precision/--quantize (exit 2 where a format does not take them), then every format's
    own options checked (an option of a format this run does not write may be refused)."""
    check_quantize_request(formats, opts.quantize, has_data=opts.data is not None,
                           dynamic=bool(opts.dynamic or opts.dynamic_batch))
    formats = [for_run(f, opts.precision, opts.quantize) for f in formats]
    check_dynamic_formats(formats, opts)
    asked = {f.name for f in formats}
    for name, own in resolve_format_options(opts).items():
        fmt = REGISTRY[name]
        if fmt.check is not None:
            fmt.check(own, name in asked)
    return formats


def check_dynamic_formats(formats: list[Format], opts: ExportOptions) -> None:
    """--dynamic parsed (exit 2 when malformed) and refused for a graph format that takes static shapes only (no
    Format.dynamic; its refusals["dynamic"] says why)."""
    spec = parse_dynamic(opts.dynamic, opts.dynamic_batch)
    if spec is None:
        return
    static = [f for f in formats if f.kind == "graph" and f.dynamic is None]
    if static:
        flag = "--dynamic" if opts.dynamic else "--dynamic-batch"
        names = ", ".join(f.name for f in static)
        why = "; ".join(f.refusals["dynamic"] for f in static if "dynamic" in f.refusals)
        raise UsageError(
            f"{flag}: {names} takes static shapes only" + (f" ({why})" if why else ""),
            hint=f"Export {names} in a run of its own without {flag}, at the shape it will be fed.",
        )


def check_input_flags(opts: ExportOptions) -> list[InputSpec]:
    """--input specs parsed, --input and --example-inputs exclusive, --attr a dotted path."""
    specs = [inputs.parse_input_spec(s) for s in opts.inputs]
    if specs and opts.example_inputs:
        raise UsageError("pass either --input or --example-inputs, not both")
    if opts.attr is not None and (not opts.attr or any(not p for p in opts.attr.split("."))):
        raise UsageError(f"--attr {opts.attr!r} is not a dotted path such as 'model' or 'encoder.blocks.0'")
    return specs


def check_manifest_path(opts: ExportOptions, destinations: Mapping[str, Path]) -> None:
    if opts.manifest is None:
        return
    if any(outputs.same_file(opts.manifest, d) or opts.manifest.resolve() == d.resolve()
           for d in destinations.values()):
        raise UsageError(f"--manifest {opts.manifest} is also an artifact's path: give it another name")
    outputs.check_destination(opts.manifest, opts.checkpoint, force=opts.force)


@dataclass
class Prepared:
    """What every format of the run shares: the checkpoint, the context, the reference outputs."""

    ckpt: Checkpoint
    ctx: ExportContext  # shared by every format; context_for sets a format's own options on it
    refs: References | None
    options: dict[str, object] = field(default_factory=dict)  # format name -> its options

    def context_for(self, fmt: Format) -> ExportContext:
        return replace(self.ctx, options=self.options.get(fmt.name, fmt.options()))


def prepare(opts: ExportOptions, report: Report, step: Step, formats: list[Format], given: Supplied,
            specs: list[InputSpec]) -> Prepared:
    """Load once, build once (when a format needs the module), check the weights, run the module on the example
    inputs and keep its outputs: the ExportContext every format of the run gets."""
    with step("loading checkpoint"), phase(CheckpointError, f"reading {opts.checkpoint}"):
        ckpt = load_checkpoint(opts.checkpoint, trust=opts.trust_checkpoint, allow_globals=opts.allow_globals,
                               hash_file=opts.hash_checkpoint, max_growth=opts.max_growth)
    _describe_checkpoint(ckpt, report)
    built = None
    structure = structure_is_enough(opts, formats)
    # Weights formats never need the class: --config alone does not make lexport import anything for them.
    if opts.module or any(f.needs_module for f in formats):
        with step("building module"), phase(UserModuleError, "building the module"):
            built = _build_unless_only_weights(opts, ckpt, report, given, formats, parameters=not structure)
    if built is not None:
        _select_for_formats(built, opts, formats, report)
        if built.parameters_on_meta and _needs_parameters(built.target):
            with step("loading the weights into the module"), phase(UserModuleError, "building the module"):
                load_parameters(built)
        target, state_dict = built.target, built.state_dict
        report.notes.extend(built.notes)
        cache_note = without_cache(target)
        if cache_note and any(f.kind == "graph" for f in formats):
            report.notes.append(cache_note)
    else:
        target, state_dict = None, _weights_under_attr(ckpt, opts.attr)
    with phase(CheckpointError, "checking the weights for NaN/Inf"):
        check_finite_weights(state_dict, opts, report)
    ctx = ExportContext(target=target, state_dict=state_dict, example=None)
    own = resolve_format_options(opts)
    # Parameters left on meta: nothing runs the module (no verification; the writers read the checkpoint).
    graph = [f for f in formats if f.kind == "graph"] if built is None or not built.parameters_on_meta else []
    refs = None
    if graph:
        ctx, refs = _references(opts, report, step, graph, specs, ctx, built.module if built else None, own)
    if opts.data is not None and refs is not None:
        with step("reading --data"), phase(UserModuleError, f"reading --data {opts.data}"):
            refs.held_out = read_held_out(opts, ctx.target, report, example=refs.sets[0])
        ctx = replace(ctx, calibration=tuple(b.inputs for b in refs.held_out.prepared.calibration))
    elif opts.data is not None:
        report.notes.append("--data is not used: weights formats are checked bit for bit against the checkpoint")
    return Prepared(ckpt, ctx, refs, own)


def structure_is_enough(opts: ExportOptions, formats: list[Format]) -> bool:
    """Whether the run needs of the module only its structure: every format writes (and, for a weights format,
    verifies) from the checkpoint's tensors, and nothing runs the module (--no-verify for a graph format, no
    --data, --dynamic, --precision or --quantize). The module is then built with its parameters on meta."""
    if not opts.meta_build or opts.data is not None or opts.dynamic or opts.dynamic_batch:
        return False
    if opts.precision or opts.quantize:
        return False
    return all(f.kind == "weights" or (f.writes_from_checkpoint and not opts.verify) for f in formats)


def _needs_parameters(target: Any) -> bool:
    """A module whose export needs its parameters' values although its formats read the checkpoint: a peft adapter,
    merged into a copy of the base weights."""
    return is_peft(target) or any(is_peft(m) for m in target.modules())


def _select_for_formats(built: BuiltModule, opts: ExportOptions, formats: list[Format], report: Report) -> None:
    """A format that exports one kind of submodule (huggingface: a PreTrainedModel) picks it when --attr does not,
    or refuses the one --attr selects (exit 2)."""
    for fmt in formats:
        if fmt.select is None:
            continue
        attr, note = fmt.select(built.module, opts.attr)
        if attr and attr != built.attr:
            built.target = select_attr(built.module, attr)
            built.state_dict = strip_prefix(built.state_dict, f"{attr}.")
            built.attr = attr
        if note:
            report.notes.append(note)


def _build_unless_only_weights(opts: ExportOptions, ckpt: Checkpoint, report: Report, given: Supplied,
                               formats: list[Format], parameters: bool = True) -> BuiltModule | None:
    """The built module; None when every format is a weights format and the constructor needs arguments the safe
    loader left unloaded: the weights never needed the constructor, so they are exported as without --module."""
    try:
        return _build(opts, ckpt, report, given, parameters)
    except UnloadedArgumentsError as e:
        if any(f.needs_module for f in formats):
            raise
        report.notes.append(
            f"--module {report.module or opts.module}: the module was not built, because __init__ needs "
            f"{', '.join(e.arguments)}, which the checkpoint holds as objects left unloaded (placeholders); "
            f"{', '.join(f.name for f in formats)} needs only the weights, taken as without --module"
        )
        return None


def _describe_checkpoint(ckpt: Checkpoint, report: Report) -> None:
    unloaded = list(unloaded_by_key(ckpt.hparams))
    if unloaded:
        report.notes.append(
            f"hyper_parameters {printable(', '.join(unloaded))[:300]} hold objects that were left unloaded "
            "(placeholders: nothing from the file ran); the weights do not need them"
        )
    report.checkpoint = {
        "path": str(ckpt.path),
        "sha256": None,
        "lightning_version": ckpt.lightning_version,
        "epoch": ckpt.epoch,
        "global_step": ckpt.global_step,
        "plain_state_dict": ckpt.plain,
        "tensors": len(ckpt.state_dict),
    }


def _weights_under_attr(ckpt: Checkpoint, attr: str | None) -> Mapping[str, Any]:
    state_dict = strip_prefix(ckpt.state_dict, f"{attr}." if attr else "")
    if attr and not state_dict:
        prefixes = sorted({k.split(".", 1)[0] for k in ckpt.state_dict})
        raise UserModuleError(
            f"--attr {attr!r}: no tensors in the checkpoint start with {attr + '.'!r}",
            hint=f"Top-level prefixes in the checkpoint: {', '.join(prefixes)}",
        )
    return state_dict


def _references(opts: ExportOptions, report: Report, step: Step, graph: list[Format], specs: list[InputSpec],
                ctx: ExportContext, lightning_module: Any, own: dict[str, object]) -> tuple[ExportContext, References]:
    """The example inputs (into the context), the eager outputs on them and on the random inputs, and what each
    graph format needs prepared from them (ONNX names, into its options)."""
    with step("running the module on the example inputs"), phase(UserModuleError, "running the module"):
        example, source = _example_inputs(opts, specs, ctx.target, lightning_module)
        ctx = replace(ctx, example=example)
        spec = parse_dynamic(opts.dynamic, opts.dynamic_batch)
        if spec is not None and any(f.dynamic is not None for f in graph):
            ctx = replace(ctx, dynamic=resolve(spec, ctx.target, example))
        refs = References(ctx.target, example, opts)
        refs.dynamic = ctx.dynamic
        try:
            reference = refs.get(0)
        except inputs.ForwardFailed as e:
            raise e.with_source(source) from e.__cause__
        check_finite_outputs(reference, opts, report)
        # A peft adapter is deployed merged: the formats export a merged copy, checked against the unmerged module
        # (refs keeps it).
        merged, note = merged_copy(ctx.target)
        if note:
            ctx = replace(ctx, target=merged)
            report.notes.append(note)
    if ctx.dynamic is not None:
        with step("running the module at other sizes of the --dynamic dims"):
            refs.dynamic_runs(ctx.dynamic)  # a module that takes no other size is exit 2 before any export
    for fmt in {f.name: f for f in graph}.values():
        if fmt.prepare is not None:
            own[fmt.name] = fmt.prepare(replace(ctx, options=own[fmt.name]), reference, own[fmt.name])
    return ctx, refs
