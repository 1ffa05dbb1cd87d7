"""`lexport CKPT --to FORMAT`: parse flags → ExportOptions → pipeline.export.run → render. No torch at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import EXIT_CODES
from ..formats import REGISTRY
from ..safeload.archive import DEFAULT_MAX_GROWTH
from ..version import __version__
from . import options as o
from .common import Steps, execute
from .render import render_report

_FORMATS_HELP = "; ".join(f"{f.name} ({f.suffix})" for f in REGISTRY.values())
_EXIT_HELP = "\n\n".join(f"{code}  {text}" for code, text in EXIT_CODES.items())

EPILOG = f"""Examples:

  lexport run.ckpt --module pkg.models:MyModule --attr model --to onnx

  lexport run.ckpt --to safetensors --attr model   (no user code imported)

  lexport run.ckpt --config lightning_logs/version_0/config.yaml --to exported-program --dynamic-batch

  lexport run.ckpt --module pkg:TextModel --to onnx,openvino --dynamic 0,1:1..512   (batch and length)

  lexport run.ckpt --module pkg:Net --to onnx,executorch,openvino --quantize int8 --data batches.pt

  lexport run.ckpt --config config.yaml --to onnx --quantize int8 --data config

Exit codes:

{_EXIT_HELP}

Set LEXPORT_DEBUG=1 for full tracebacks."""

app = typer.Typer(add_completion=True, pretty_exceptions_enable=False, rich_markup_mode=None)


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
    module: o.Module = None,
    attr: o.Attr = None,
    config: o.Config = None,
    init_arg: o.InitArg = [],
    init_args: o.InitArgs = None,
    input_spec: o.InputSpecs = [],
    example_inputs: o.ExampleInputs = None,
    dynamic_batch: o.DynamicBatch = False,
    dynamic: o.Dynamic = [],  # noqa: B006
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Output file (one format only).")] = None,
    output_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Output directory; files are named <checkpoint stem><suffix>. Default: beside the checkpoint.")] = None,  # noqa: E501
    force: o.Force = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify every artifact against the eager module.")] = True,  # noqa: E501
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep an artifact that failed verification, as NAME.FAILED.<suffix>.")] = False,  # noqa: E501
    atol: o.Atol = None,
    rtol: o.Rtol = None,
    seed: o.Seed = 0,
    random_inputs: o.RandomInputs = 5,
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset version (default: the dynamo exporter's; below 18 the TorchScript-based exporter writes it).")] = None,
    input_names: o.InputNames = [],  # noqa: B006
    output_names: o.OutputNames = [],  # noqa: B006
    torchscript_mode: Annotated[str, typer.Option(metavar="MODE", help="trace or script.")] = "trace",
    precision: o.Precision = None,
    quantize: o.Quantize = None,
    data: o.Data = None,
    data_batches: o.DataBatches = None,
    data_input: o.DataInput = None,
    min_agreement: o.MinAgreement = None,
    executorch_backend: Annotated[str, typer.Option(metavar="BACKEND", help="executorch: xnnpack (delegated, default) or portable (no delegate).")] = "xnnpack",  # noqa: E501
    max_shard_size: Annotated[str | None, typer.Option(metavar="SIZE", help="huggingface: shard the weights past SIZE (200KB = 200,000 bytes, 5GiB = 5*2^30; default 50GB, as save_pretrained).")] = None,  # noqa: E501
    tokenizer: Annotated[Path | None, typer.Option(metavar="DIR", help="huggingface: a tokenizer saved with save_pretrained, checked (AutoTokenizer loads it) and copied into the folder.")] = None,  # noqa: E501
    trust_checkpoint: o.TrustCheckpoint = False,
    allow_global: o.AllowGlobal = [],
    max_growth: o.MaxGrowth = DEFAULT_MAX_GROWTH,
    strict_finite: o.StrictFinite = False,
    manifest: Annotated[Path | None, typer.Option(metavar="FILE", help="Also write the --json record plus every option that shaped the bytes to FILE, atomically (for lexport verify --manifest and as a build artifact).")] = None,  # noqa: E501
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,  # noqa: E501
) -> None:
    def options() -> Any:
        from ..build.argfiles import parse_init_arg
        from ..pipeline.options import ExportOptions

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
            dynamic=tuple(dynamic),
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
            input_names=tuple(input_names),
            output_names=tuple(output_names),
            torchscript_mode=torchscript_mode,
            precision=precision,
            quantize=quantize,
            data=data,
            data_batches=data_batches,
            data_input=data_input,
            **({"min_agreement": min_agreement} if min_agreement is not None else {}),
            executorch_backend=executorch_backend,
            max_shard_size=max_shard_size,
            tokenizer=tokenizer,
            trust_checkpoint=trust_checkpoint,
            allow_globals=tuple(allow_global),
            strict_finite=strict_finite,
            max_growth=max_growth,
            hash_checkpoint=json_out or manifest is not None,
            manifest=manifest,
        )

    def export(steps: Steps) -> Any:
        from ..pipeline.export import run

        return run(options(), progress=steps.step)

    execute(export, json_out=json_out, quiet=quiet, render=render_report)


