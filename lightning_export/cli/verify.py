"""`lexport verify ARTIFACT CKPT`: re-run the verification of existing artifacts, for a later CI stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..safeload.archive import DEFAULT_MAX_GROWTH
from . import options as o
from .common import Steps, execute
from .render import render_report

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")


@app.command(
    help="Re-verify existing artifacts against their checkpoint: weight formats bit for bit against the "
    "checkpoint's tensors, graph formats against the eager module on the same seeded inputs. The format comes from "
    "each file. Same exit codes (1 when an artifact differs), report and --json as an export. With --manifest, "
    "the artifacts, checkpoint and options come from the manifest an export wrote, and each artifact must still "
    "have the sha256 and format recorded there. A manifest is untrusted: its paths stay inside its folder "
    "(--allow-outside) and it runs no code (--trust-manifest).",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def verify(
    paths: Annotated[list[Path], typer.Argument(metavar="[ARTIFACT... CHECKPOINT]", help="Artifacts, then the checkpoint they came from (with --manifest: no artifact; the checkpoint, to use instead of the manifest's path).", show_default=False)] = [],  # noqa: B006,E501
    manifest: Annotated[Path | None, typer.Option(metavar="FILE", rich_help_panel=o.INPUTS, help="A manifest written by lexport --manifest: the artifacts, the checkpoint (unless named) and the options come from it. Untrusted: its paths must stay inside its folder, and it may name no code to run.")] = None,  # noqa: E501
    module: o.Module = None,
    attr: o.Attr = None,
    config: o.Config = None,
    init_arg: o.InitArg = [],  # noqa: B006
    init_args: o.InitArgs = None,
    input_spec: o.InputSpecs = [],  # noqa: B006
    example_inputs: o.ExampleInputs = None,
    dynamic_batch: o.DynamicBatch = False,
    dynamic: o.Dynamic = [],  # noqa: B006
    atol: o.Atol = None,
    rtol: o.Rtol = None,
    seed: Annotated[int | None, typer.Option(metavar="INT", help="Seed of the random verification inputs (default: the manifest's, else 0).", rich_help_panel=o.VERIFICATION)] = None,  # noqa: E501
    random_inputs: Annotated[int | None, typer.Option(metavar="N", min=0, help="Random inputs checked besides the example (default: the manifest's, else 5).", rich_help_panel=o.VERIFICATION)] = None,  # noqa: E501
    precision: o.Precision = None,
    quantize: o.Quantize = None,
    data: o.Data = None,
    data_batches: o.DataBatches = None,
    data_input: o.DataInput = None,
    min_agreement: o.MinAgreement = None,
    trust_checkpoint: o.TrustCheckpoint = False,
    format_option: o.FormatOption = [],  # noqa: B006
    allow_global: o.AllowGlobal = [],  # noqa: B006
    max_growth: Annotated[float | None, typer.Option("--max-growth", metavar="FACTOR", help=f"As for an export (default: the manifest's, else {DEFAULT_MAX_GROWTH:g}).", rich_help_panel=o.SAFETY)] = None,  # noqa: E501
    allow_outside: Annotated[bool, typer.Option("--allow-outside", rich_help_panel=o.SAFETY, help="With --manifest: its paths may leave its folder (absolute, '..', symlinks out). Only for a manifest you trust.")] = False,  # noqa: E501
    trust_manifest: Annotated[bool, typer.Option("--trust-manifest", rich_help_panel=o.SAFETY, help="With --manifest: it is your own; honour its module file paths, the classes its config and init arguments name, and paths outside its folder. Never turns on --trust-checkpoint or --allow-global.")] = False,  # noqa: E501
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
) -> None:
    given: dict[str, Any] = {
        "module": module, "attr": attr, "config": config, "init_args_file": init_args,
        "inputs": tuple(input_spec), "example_inputs": example_inputs, "dynamic_batch": dynamic_batch,
        "dynamic": tuple(dynamic),
        "atol": atol, "rtol": rtol, "seed": seed, "random_inputs": random_inputs,
        "trust_checkpoint": trust_checkpoint, "allow_globals": tuple(allow_global), "max_growth": max_growth,
        "precision": precision, "quantize": quantize, "data": data, "data_batches": data_batches,
        "data_input": data_input, "min_agreement": min_agreement,
    }

    def work(steps: Steps) -> Any:
        from ..construct.argfiles import parse_init_arg
        from ..pipeline.verify import verify as verify_artifacts

        # Only what was typed; the manifest (if any) fills the rest, then ExportOptions' defaults.
        options = {k: v for k, v in given.items() if v is not None and v != () and v is not False}
        options["init_args"] = dict(parse_init_arg(item) for item in init_arg)
        options["hash_checkpoint"] = json_out  # a full read of the checkpoint: only for the JSON record
        if format_option:
            from ..pipeline.options import parse_format_option

            options["format_options"] = tuple(parse_format_option(item) for item in format_option)
        if manifest is not None:
            if len(paths) > 1:
                raise UsageError("with --manifest, the artifacts come from the manifest: name at most the checkpoint")
            return verify_artifacts(None, paths[0] if paths else None, manifest=manifest, allow_outside=allow_outside,
                                    trust_manifest=trust_manifest, progress=steps.step, **options)
        if allow_outside or trust_manifest:
            raise UsageError("--allow-outside and --trust-manifest apply to --manifest only")
        if len(paths) < 2:
            raise UsageError("lexport verify needs ARTIFACT... CHECKPOINT (or --manifest FILE)")
        return verify_artifacts(paths[:-1], paths[-1], progress=steps.step, **options)

    execute(work, json_out=json_out, quiet=quiet, render=render_report)
