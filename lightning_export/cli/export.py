"""`lexport CKPT --to FORMAT`: parse flags → ExportOptions → pipeline.export.run → render. No torch at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..errors import EXIT_CODES
from ..formats import REGISTRY
from ..safeload.archive import DEFAULT_MAX_GROWTH
from ..version import __version__
from . import options as o
from .common import Steps, execute
from .render import render_report

# Registered names and suffixes are a plugin's text, not markup: escaped, as the help is rich markup.
_FORMATS_HELP = escape("; ".join(f"{f.name} ({f.suffix})" for f in REGISTRY.values()))
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

app = typer.Typer(add_completion=True, pretty_exceptions_enable=False, rich_markup_mode="rich")


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
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Lightning .ckpt file, or a file holding a plain state dict.", show_default=False)],
    module: o.Module = None,
    attr: o.Attr = None,
    config: o.Config = None,
    init_arg: o.InitArg = [],
    init_args: o.InitArgs = None,
    input_spec: o.InputSpecs = [],
    example_inputs: o.ExampleInputs = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify every artifact against the eager module.", rich_help_panel=o.VERIFICATION)] = True,  # noqa: E501
    dynamic_batch: o.DynamicBatch = False,
    dynamic: o.Dynamic = [],  # noqa: B006
    atol: o.Atol = None,
    rtol: o.Rtol = None,
    seed: o.Seed = 0,
    random_inputs: o.RandomInputs = 5,
    strict_finite: o.StrictFinite = False,
    to: Annotated[list[str], typer.Option("--to", "-t", metavar="FORMAT", help=f"Format to write (repeatable, or comma-separated): {escape(', '.join(REGISTRY))}.", rich_help_panel=o.OUTPUT)] = [],  # noqa: B006
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Output file (one format only).", rich_help_panel=o.OUTPUT)] = None,
    output_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Output directory; files are named <checkpoint stem><suffix>. Default: beside the checkpoint.", rich_help_panel=o.OUTPUT)] = None,  # noqa: E501
    force: o.Force = False,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep an artifact that failed verification, as NAME.FAILED.<suffix>.", rich_help_panel=o.OUTPUT)] = False,  # noqa: E501
    manifest: Annotated[Path | None, typer.Option(metavar="FILE", help="Also write the --json record plus every option that shaped the bytes to FILE, atomically (for lexport verify --manifest and as a build artifact).", rich_help_panel=o.OUTPUT)] = None,  # noqa: E501
    precision: o.Precision = None,
    quantize: o.Quantize = None,
    data: o.Data = None,
    data_batches: o.DataBatches = None,
    data_input: o.DataInput = None,
    min_agreement: o.MinAgreement = None,
    trust_checkpoint: o.TrustCheckpoint = False,
    allow_global: o.AllowGlobal = [],
    max_growth: o.MaxGrowth = DEFAULT_MAX_GROWTH,
    format_option: o.FormatOption = [],  # noqa: B006
    opset: Annotated[int | None, typer.Option(metavar="N", help="onnx: opset version (default: the dynamo exporter's; below 18 the TorchScript-based exporter writes it).", rich_help_panel=o.FORMAT_OPTIONS)] = None,
    input_names: o.InputNames = [],  # noqa: B006
    output_names: o.OutputNames = [],  # noqa: B006
    torchscript_mode: Annotated[str | None, typer.Option(metavar="MODE", help="torchscript: trace (default) or script.", rich_help_panel=o.FORMAT_OPTIONS)] = None,  # noqa: E501
    executorch_backend: Annotated[str | None, typer.Option(metavar="BACKEND", help="executorch: xnnpack (delegated, default) or portable (no delegate).", rich_help_panel=o.FORMAT_OPTIONS)] = None,  # noqa: E501
    max_shard_size: Annotated[str | None, typer.Option(metavar="SIZE", help="huggingface: shard the weights past SIZE (200KB = 200,000 bytes, 5GiB = 5*2^30; default 50GB, as save_pretrained).", rich_help_panel=o.FORMAT_OPTIONS)] = None,  # noqa: E501
    tokenizer: Annotated[Path | None, typer.Option(metavar="DIR", help="huggingface: a tokenizer saved with save_pretrained, checked (AutoTokenizer loads it) and copied into the folder.", rich_help_panel=o.FORMAT_OPTIONS)] = None,  # noqa: E501
    settings: Annotated[Path | None, typer.Option("--settings", metavar="FILE", help="Read defaults from FILE (\\[tool.lexport] of a pyproject.toml, or a TOML file of keys). Default: the nearest pyproject.toml with \\[tool.lexport], from the current directory up.", rich_help_panel=o.REPORT)] = None,  # noqa: E501
    profile: Annotated[str | None, typer.Option("--profile", metavar="NAME", help="Also apply \\[tool.lexport.profiles.NAME] of the settings.", rich_help_panel=o.REPORT)] = None,  # noqa: E501
    summary: Annotated[Path | None, typer.Option("--summary", metavar="FILE.md", help="Append a markdown report (artifacts, sizes, drift, agreement; a failure's message and hint) to FILE.md. Default: $GITHUB_STEP_SUMMARY when it is set (GitHub Actions shows it on the run's page).", rich_help_panel=o.REPORT)] = None,  # noqa: E501
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.", rich_help_panel=o.REPORT)] = False,  # noqa: E501
) -> None:
    def options(eff: Any) -> Any:
        from ..construct.argfiles import parse_init_arg
        from ..pipeline.options import ExportOptions, parse_format_option

        v = eff.values
        return ExportOptions(
            checkpoint=v["checkpoint"],
            formats=tuple(v["to"]),
            module=v["module"],
            attr=v["attr"],
            config=v["config"],
            init_args=tuple(parse_init_arg(item) for item in v["init_arg"]),
            init_args_file=v["init_args"],
            inputs=tuple(v["input_spec"]),
            example_inputs=v["example_inputs"],
            dynamic_batch=v["dynamic_batch"],
            dynamic=tuple(v["dynamic"]),
            output=v["output"],
            output_dir=v["output_dir"],
            force=v["force"],
            verify=v["verify"],
            keep_failed=v["keep_failed"],
            atol=v["atol"],
            rtol=v["rtol"],
            seed=v["seed"],
            random_inputs=v["random_inputs"],
            opset=v["opset"],
            input_names=tuple(v["input_names"]),
            output_names=tuple(v["output_names"]),
            torchscript_mode=v["torchscript_mode"],
            precision=v["precision"],
            quantize=v["quantize"],
            data=v["data"],
            data_batches=v["data_batches"],
            data_input=v["data_input"],
            format_options=tuple(parse_format_option(item) for item in v["format_option"]),
            min_agreement=v["min_agreement"] if v["min_agreement"] is not None else ExportOptions.min_agreement,
            executorch_backend=v["executorch_backend"],
            max_shard_size=v["max_shard_size"],
            tokenizer=v["tokenizer"],
            trust_checkpoint=v["trust_checkpoint"],
            allow_globals=tuple(v["allow_global"]),
            strict_finite=v["strict_finite"],
            max_growth=v["max_growth"],
            hash_checkpoint=json_out or v["manifest"] is not None,
            manifest=v["manifest"],
            settings=eff.record(),
        )

    def export(steps: Steps) -> Any:
        from ..pipeline.export import run
        from .settings import effective

        eff = effective(ctx, lexport, ctx.params, settings, profile)
        return run(options(eff), progress=steps.step)

    execute(export, json_out=json_out, quiet=quiet, render=render_report,
            after=lambda report, error: append_summary(summary, report, error))


def append_summary(path: Path | None, report: Any, error: BaseException | None) -> None:
    """The run's markdown summary appended to --summary FILE, else to $GITHUB_STEP_SUMMARY when set; a file that
    cannot be written is a warning (the artifacts are published already; the exit code stays the run's)."""
    import os

    from ..summary import Failure, markdown
    from .common import console

    target = path or (Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY") else None)
    if target is None:
        return
    text = markdown(report.to_json() if report is not None else {}, None if error is None else Failure.of(error))
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        stderr = console()
        stderr.print("[yellow]warning[/yellow]: ", end="")
        stderr.print(f"the summary was not written to {target}: {e.strerror or e}", markup=False, highlight=False)


