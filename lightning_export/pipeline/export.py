"""`lexport CKPT --to FORMAT`: prepare once, then write → verify → publish each format."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import outputs
from ..errors import (
    DATA_DEPENDENT_SIZE_HINT,
    DEBUG_HINT,
    TRACE_OUTPUT_HINT,
    LexportError,
    OutputError,
    UsageError,
    error_json,
    export_failure,
)
from ..formats import REGISTRY, get_format, parse_format_list, quiet_torch_logs, submodule_flags
from ..hashing import file_sha256, folder_bytes_and_sha256
from ..report import ArtifactResult, Report
from .artifact import check_artifact
from .options import ExportOptions, options_from
from .prepare import check_flags, check_input_flags, check_manifest_path, prepare, with_format_options
from .run import Step, artifact_step, reported, say_what_else_worked


def export(checkpoint: str | os.PathLike[str], *, progress: Step | None = None, **options: Any) -> Report:
    """Export a Lightning checkpoint; returns the Report, raises a LexportError (with `.report`) on failure.

    Options are the fields of ExportOptions, e.g. ``export("m.ckpt", module="pkg:M", attr="model",
    formats=("onnx",))``.
    """
    return run(options_from(checkpoint, options), progress=progress)


def run(opts: ExportOptions, *, progress: Step | None = None) -> Report:
    """Export with these options and return the Report; raises a LexportError with `.report` when anything failed."""
    return reported(opts, progress, _export)


def _export(opts: ExportOptions, report: Report, step: Step) -> None:
    given = check_flags(opts)
    if not opts.formats:
        raise UsageError(f"nothing to do: pass --to FORMAT ({', '.join(list(REGISTRY)[:4])}, ...)")
    formats = [get_format(name) for name in parse_format_list(opts.formats)]
    outputs.validate_output_flags(opts.output, [f.name for f in formats])
    formats = with_format_options(formats, opts)
    specs = check_input_flags(opts)
    destinations = _destinations(opts, formats)
    check_manifest_path(opts, destinations)
    opts = replace(opts, formats=tuple(f.name for f in formats))
    prepared = prepare(opts, report, step, formats, given, specs)
    for d in {dest.parent for dest in destinations.values()}:
        outputs.remove_stale_temp_dirs(d)
    for fmt in formats:
        with artifact_step(fmt, report, step, "exporting") as result:
            _export_one(fmt, prepared.context_for(fmt), destinations[fmt.name], opts, prepared.refs, result)
    say_what_else_worked(report)
    if opts.hash_checkpoint:
        report.checkpoint["sha256"] = prepared.ckpt.sha256


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
    folders = {f.name for f in formats if f.folder}
    for name, dest in destinations.items():
        try:
            outputs.check_destination(dest, opts.checkpoint, force=opts.force, folder=name in folders)
        except OutputError as e:
            refused.append(e)
    if len(refused) == 1:
        raise refused[0]
    if refused:
        raise OutputError("\n".join(e.message for e in refused), hint=refused[0].hint)
    return destinations


def _export_one(fmt: Any, ctx: Any, dest: Path, opts: ExportOptions, refs: Any, result: ArtifactResult) -> None:
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
        if not dest.name.endswith(fmt.suffix) and not fmt.folder:
            result.notes.append(f"{dest.name} does not end with {fmt.suffix}, the usual suffix of {fmt.name}")
        # fsync and hashing wait on the disk, verification on the CPU: overlap them (both release the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(_fsync_and_hash, staging)
            if opts.verify:
                with quiet_torch_logs():
                    result.verification = check_artifact(fmt, staging.path, ctx, opts, refs)
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
        _name_the_parts(e, ctx, opts)
        result.error = error_json(e)
    finally:
        if staging is not None:
            staging.discard()
        result.seconds = time.perf_counter() - started


def _name_the_parts(e: LexportError, ctx: Any, opts: ExportOptions) -> None:
    """An export refused for sizes that depend on the values, or for an output tracing cannot return: its hint
    names the submodules that can be exported instead (a detector's backbone and heads)."""
    if not e.hint or not any(h in e.hint for h in (DATA_DEPENDENT_SIZE_HINT, TRACE_OUTPUT_HINT)):
        return
    flags = submodule_flags(ctx.target, opts.attr)
    if flags:
        said = f"Submodules to export instead: {', '.join(flags)}."
        e.hint = e.hint.replace(DEBUG_HINT, f"{said}\n{DEBUG_HINT}") if DEBUG_HINT in e.hint else f"{e.hint}\n{said}"


def _fsync_and_hash(staging: Any) -> tuple[int, str]:
    staging.fsync()  # a delayed ENOSPC/EIO (delayed allocation, NFS) surfaces here as OutputError
    files = staging.files()
    try:
        if files[0].is_dir():  # a folder artifact: its files' bytes, and the digest of its listing with theirs
            return folder_bytes_and_sha256(files[0])
        return sum(f.stat().st_size for f in files), file_sha256(files[0])
    except OSError as e:
        raise outputs.write_failure(e, staging.final, staging.needed) from e
