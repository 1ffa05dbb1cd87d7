"""`lexport CKPT --to FORMAT`: parse flags → ExportOptions → core.run → render. No torch at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import __version__
from ..checkpoint import DEFAULT_MAX_GROWTH
from ..errors import EXIT_CODES
from ..formats import REGISTRY
from .common import Steps, execute
from .render import render_report

_FORMATS_HELP = "; ".join(f"{f.name} ({f.suffix})" for f in REGISTRY.values())
_EXIT_HELP = "\n\n".join(f"{code}  {text}" for code, text in EXIT_CODES.items())

EPILOG = f"""Examples:

  lexport run.ckpt --module pkg.models:MyModule --attr model --to onnx

  lexport run.ckpt --to safetensors --attr model   (no user code imported)

  lexport run.ckpt --config lightning_logs/version_0/config.yaml --to exported-program --dynamic-batch

Exit codes:

{_EXIT_HELP}

Set LEXPORT_DEBUG=1 for full tracebacks."""

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        print(f"lexport {__version__}")
        raise typer.Exit(0)


@app.command(
    help="Export a PyTorch Lightning checkpoint to a deployment artifact and verify that it computes what the "
    f"module computes. Formats: {_FORMATS_HELP}.",
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def lexport(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Lightning .ckpt file, or a file holding a plain state dict.", show_default=False)],
    to: Annotated[list[str], typer.Option("--to", "-t", metavar="FORMAT", help=f"Format to write (repeatable, or comma-separated): {', '.join(REGISTRY)}.")] = [],  # noqa: B006
    module: Annotated[str | None, typer.Option("--module", "-m", metavar="CLASS", help="LightningModule class: pkg.mod:Class, pkg.mod.Class or path/to/file.py:Class. Optional for state-dict and safetensors.")] = None,  # noqa: E501
    attr: Annotated[str | None, typer.Option("--attr", "-a", metavar="PATH", help="Dotted path of the submodule to export (model, encoder, heads.cls). Default: the whole LightningModule.")] = None,  # noqa: E501
    config: Annotated[Path | None, typer.Option(metavar="FILE", help="LightningCLI config.yaml: its model: section gives the class and init args.")] = None,  # noqa: E501
    init_arg: Annotated[list[str], typer.Option("--init-arg", metavar="KEY=VALUE", help="KEY=VALUE constructor argument (VALUE is YAML); repeatable; overrides the checkpoint's hyper_parameters.")] = [],  # noqa: B006,E501
    init_args: Annotated[Path | None, typer.Option("--init-args", metavar="FILE", help="YAML/JSON file of constructor arguments; {class_path, init_args} values are instantiated.")] = None,  # noqa: E501
    input_spec: Annotated[list[str], typer.Option("--input", metavar="DTYPE[DIMS]", help="DTYPE[D0,D1,...] per forward argument, e.g. float32[2,10]; repeatable. Default: example_input_array.")] = [],  # noqa: B006,E501
    example_inputs: Annotated[Path | None, typer.Option(metavar="FILE", help=".pt file with a tensor, a tuple of args (nesting allowed) or a dict of kwargs.")] = None,  # noqa: E501
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make dim 0 of every input dynamic (onnx, exported-program); verified at another batch size.")] = False,  # noqa: E501
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Output file (one format only).")] = None,
    output_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Output directory; files are named <checkpoint stem><suffix>. Default: beside the checkpoint.")] = None,  # noqa: E501
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace existing outputs.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify every artifact against the eager module.")] = True,  # noqa: E501
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep an artifact that failed verification, as NAME.FAILED.<suffix>.")] = False,  # noqa: E501
    atol: Annotated[float | None, typer.Option(metavar="FLOAT", help="Absolute tolerance (default per format: torchscript and exported-program 1e-5, onnx 1e-4).")] = None,  # noqa: E501
    rtol: Annotated[float | None, typer.Option(metavar="FLOAT", help="Relative tolerance (default per format: torchscript and exported-program 1e-5, onnx 1e-3).")] = None,  # noqa: E501
    seed: Annotated[int, typer.Option(metavar="INT", help="Seed of the random verification inputs.")] = 0,
    random_inputs: Annotated[int, typer.Option(metavar="N", help="Random inputs checked besides the example.", min=0)] = 5,
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset version (default: the dynamo exporter's; below 18 the TorchScript-based exporter writes it).")] = None,
    torchscript_mode: Annotated[str, typer.Option(metavar="MODE", help="trace or script.")] = "trace",
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle the checkpoint fully. This RUNS CODE FROM THE FILE: only for files you trust.")] = False,  # noqa: E501
    allow_global: Annotated[list[str], typer.Option("--allow-global", metavar="NAME", help="Allow one class in the checkpoint (pkg.mod.Name) for the safe loader; repeatable.")] = [],  # noqa: B006,E501
    max_growth: Annotated[float, typer.Option("--max-growth", metavar="FACTOR", help="Refuse a checkpoint whose tensors (or zip records) would take more than FACTOR times the bytes they occupy in the file, plus 64 MiB: views, stride tricks, zip bombs.")] = DEFAULT_MAX_GROWTH,  # noqa: E501
    strict_finite: Annotated[bool, typer.Option("--strict-finite", help="NaN/Inf in weights or example outputs is an error (exit 4), not a warning.")] = False,  # noqa: E501
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout and nothing else there.")] = False,  # noqa: E501
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,  # noqa: E501
) -> None:
    def options() -> Any:
        from ..core import ExportOptions
        from ..model import parse_init_arg

        return ExportOptions(
            checkpoint=checkpoint,
            formats=tuple(to),
            module=module,
            attr=attr,
            config=config,
            init_args=tuple(parse_init_arg(item) for item in init_arg),
            init_args_file=init_args,
            inputs=tuple(input_spec),
            example_inputs=example_inputs,
            dynamic_batch=dynamic_batch,
            output=output,
            output_dir=output_dir,
            force=force,
            verify=verify,
            keep_failed=keep_failed,
            atol=atol,
            rtol=rtol,
            seed=seed,
            random_inputs=random_inputs,
            opset=opset,
            torchscript_mode=torchscript_mode,
            trust_checkpoint=trust_checkpoint,
            allow_globals=tuple(allow_global),
            strict_finite=strict_finite,
            max_growth=max_growth,
            hash_checkpoint=json_out,
        )

    def export(steps: Steps) -> Any:
        from ..core import run

        return run(options(), progress=steps.step)

    execute(export, json_out=json_out, quiet=quiet, render=render_report)


