"""`lexport verify ARTIFACT CKPT`: re-run the verification of existing artifacts, for a later CI stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from ..pipeline.options import MANIFEST_OPTIONS
from ..safeload.archive import DEFAULT_MAX_GROWTH
from . import options as o
from .common import Steps, execute
from .render import render_report

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(
    help="Re-verify existing artifacts against their checkpoint: weight formats bit for bit against the "
    "checkpoint's tensors, graph formats against the eager module on the same seeded inputs. The format comes from "
    "each file. Same exit codes (1 when an artifact differs), report and --json as an export. With --manifest, "
    "the artifacts, checkpoint and options come from the manifest an export wrote, and each artifact must still "
    "have the sha256 recorded there.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def verify(
    paths: Annotated[list[Path], typer.Argument(metavar="[ARTIFACT... CHECKPOINT]", help="Artifacts, then the checkpoint they came from (none with --manifest).", show_default=False)] = [],  # noqa: B006,E501
    manifest: Annotated[Path | None, typer.Option(metavar="FILE", help="A manifest written by lexport --manifest.")] = None,  # noqa: E501
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
    seed: Annotated[int | None, typer.Option(metavar="INT", help="Seed of the random verification inputs (default: the manifest's, else 0).")] = None,  # noqa: E501
    random_inputs: Annotated[int | None, typer.Option(metavar="N", min=0, help="Random inputs checked besides the example (default: the manifest's, else 5).")] = None,  # noqa: E501
    trust_checkpoint: o.TrustCheckpoint = False,
    allow_global: o.AllowGlobal = [],  # noqa: B006
    max_growth: Annotated[float | None, typer.Option("--max-growth", metavar="FACTOR", help=f"As for an export (default: the manifest's, else {DEFAULT_MAX_GROWTH:g}).")] = None,  # noqa: E501
    precision: o.Precision = None,
    quantize: o.Quantize = None,
    data: o.Data = None,
    data_batches: o.DataBatches = None,
    data_input: o.DataInput = None,
    min_agreement: o.MinAgreement = None,
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
) -> None:
    given = {
        "module": module, "attr": attr, "config": config, "init_args_file": init_args,
        "inputs": tuple(input_spec), "example_inputs": example_inputs, "dynamic_batch": dynamic_batch,
        "dynamic": tuple(dynamic),
        "atol": atol, "rtol": rtol, "seed": seed, "random_inputs": random_inputs,
        "trust_checkpoint": trust_checkpoint, "allow_globals": tuple(allow_global), "max_growth": max_growth,
        "precision": precision, "quantize": quantize, "data": data, "data_batches": data_batches,
        "data_input": data_input, "min_agreement": min_agreement,
    }

    def work(steps: Steps) -> Any:
        from ..build.argfiles import parse_init_arg
        from ..pipeline.verify import verify as verify_artifacts

        # Only what was typed; the manifest (if any) fills the rest, then ExportOptions' defaults.
        options = {k: v for k, v in given.items() if v is not None and v != () and v is not False}
        options["init_args"] = dict(parse_init_arg(item) for item in init_arg)
        options["hash_checkpoint"] = json_out  # a full read of the checkpoint: only for the JSON record
        artifacts, checkpoint, checkpoint_sha = _targets(paths, manifest, options)
        return verify_artifacts(artifacts, checkpoint, progress=steps.step, checkpoint_sha256=checkpoint_sha, **options)

    execute(work, json_out=json_out, quiet=quiet, render=render_report)


def _targets(paths: list[Path], manifest: Path | None, options: dict[str, Any]) -> tuple[Any, Path, str | None]:
    """(artifacts, checkpoint, the checkpoint's recorded sha256) from the arguments, or from the manifest (whose
    options fill `options` where the command line says nothing)."""
    if manifest is None:
        if len(paths) < 2:
            raise UsageError("lexport verify needs ARTIFACT... CHECKPOINT (or --manifest FILE)")
        return list(paths[:-1]), paths[-1], None
    if paths:
        raise UsageError("with --manifest, the artifacts and the checkpoint come from the manifest: name neither")
    record = read_manifest(manifest)
    base = manifest.parent
    recorded = record.get("options") or {}
    for key, value in recorded.items():
        if not MANIFEST_OPTIONS.get(key, False):
            continue  # export-only options, and the inputs' hashes
        if key == "init_args":
            options["init_args"] = {**(value or {}), **options.get("init_args", {})}
        elif key not in options and value is not None and value != [] and value is not False:
            if key in ("config", "init_args_file", "example_inputs") or (key == "data" and value != "config"):
                value = str(_locate(Path(value), base)) if key == "data" else _locate(Path(value), base)
                if key == "data" and isinstance(recorded.get("data_sha256"), str):
                    options["data_sha256"] = recorded["data_sha256"]  # the file must still be the one exported with
            options[key] = tuple(value) if isinstance(value, list) else value
    artifacts: dict[Path, str | None] = {}
    for a in record.get("artifacts") or []:
        if isinstance(a, dict) and a.get("path"):
            artifacts[_locate(Path(a["path"]), base)] = a.get("sha256")
    recorded_ckpt = (record.get("checkpoint") or {}).get("path")
    if not recorded_ckpt:
        raise UsageError(f"--manifest {manifest}: it records no checkpoint")
    checkpoint = Path(str(recorded_ckpt))
    if not artifacts:
        raise UsageError(f"--manifest {manifest}: it records no published artifact to verify")
    sha = (record.get("checkpoint") or {}).get("sha256")
    return artifacts, _locate(checkpoint, base), sha if isinstance(sha, str) else None


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > 64 << 20:
            raise UsageError(f"--manifest {path}: too big to be a manifest")
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--manifest {path}: file not found") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--manifest {path}: not a lexport manifest ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or "manifest_version" not in record:
        raise UsageError(f"--manifest {path}: not a lexport manifest (no manifest_version)")
    return record


def _locate(path: Path, base: Path) -> Path:
    """A recorded path: relative to the manifest's directory (as the manifest writes them), else beside the manifest
    (a later CI stage downloads them together). Never a file of the same name in the current directory: that would
    check another file than the one the manifest names."""
    if path.is_absolute():
        return path
    if (base / path).exists():
        return base / path
    beside = base / path.name
    return beside if beside.exists() else base / path
