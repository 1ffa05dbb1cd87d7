"""`lexport CKPT --to FORMAT`: prepare once, then write → verify → publish each format."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Unpack

from .. import outputs
from ..errors import Advice, LexportError, OutputError, UsageError, export_failure
from ..formats import REGISTRY, ExportContext, Format, get_format, parse_format_list, quiet_torch_logs, submodule_flags
from ..hashing import file_sha256, folder_bytes_and_sha256
from ..report import ArtifactResult, Report
from .artifact import check_artifact
from .options import ExportOptions, OptionsKwargs, options_from
from .prepare import Prepared
from .run import Step, reported
from .steps import Run, run_steps


def export(checkpoint: str | os.PathLike[str], *, progress: Step | None = None,
           **options: Unpack[OptionsKwargs]) -> Report:
    """Export a Lightning checkpoint; returns the Report, raises a LexportError (with `.report`) on failure.

    Options are the fields of ExportOptions, e.g. ``export("m.ckpt", module="pkg:M", attr="model",
    formats=("onnx",))``.
    """
    return run(options_from(checkpoint, options), progress=progress)


def run(opts: ExportOptions, *, progress: Step | None = None) -> Report:
    """Export with these options and return the Report; raises a LexportError with `.report` when anything failed."""
    return reported(opts, progress, _export)


def _export(opts: ExportOptions, report: Report, step: Step) -> None:
    run_steps(Run("exporting", _formats, _destinations, _export_one), opts, report, step)


def _formats(opts: ExportOptions) -> list[Format]:
    if not opts.formats:
        raise UsageError(f"nothing to do: pass --to FORMAT ({', '.join(list(REGISTRY)[:4])}, ...)")
    formats = [get_format(name) for name in parse_format_list(opts.formats)]
    outputs.validate_output_flags(opts.output, [f.name for f in formats])
    return formats


def _destinations(opts: ExportOptions, formats: list[Format]) -> dict[str, Path]:
    """Where each format goes; every refusal (exists without --force, is the input, not writable) at once; stale
    temp dirs of runs that died there removed."""
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
    for d in {dest.parent for dest in destinations.values()}:
        outputs.remove_stale_temp_dirs(d)
    return destinations


def _export_one(fmt: Format, ctx: ExportContext, dest: Path, opts: ExportOptions, prepared: Prepared,
                result: ArtifactResult) -> None:
    refs = prepared.refs
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
        result.traced = written.traced
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
        _advise_traced(result, ctx, opts)
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
        result.error = e
    finally:
        if staging is not None:
            staging.discard()
        result.seconds = time.perf_counter() - started


def _advise_traced(result: ArtifactResult, ctx: ExportContext, opts: ExportOptions) -> None:
    """An artifact whose graph was traced at the example's data-dependent sizes (or branch), as its writer records
    in `info`, and that then failed verification: the advice the export-time refusals give, with the submodules to
    export instead."""
    v, traced = result.verification, result.info.get("traced_data_dependent")
    if v is None or v.passed or traced not in ("sizes", "branch"):
        return
    v.advice = Advice.DATA_DEPENDENT_SIZE if traced == "sizes" else Advice.DATA_DEPENDENT_BRANCH
    flags = submodule_flags(ctx.target, opts.attr)
    if flags:
        v.advice_said.append(f"Submodules to export instead: {', '.join(flags)}.")


def _name_the_parts(e: LexportError, ctx: ExportContext, opts: ExportOptions) -> None:
    """An export refused for sizes that depend on the values, or for an output tracing cannot return: its hint
    names the submodules that can be exported instead (a detector's backbone and heads)."""
    if e.advice not in (Advice.DATA_DEPENDENT_SIZE, Advice.TRACE_OUTPUT):
        return
    flags = submodule_flags(ctx.target, opts.attr)
    if flags:
        e.said.append(f"Submodules to export instead: {', '.join(flags)}.")


def _fsync_and_hash(staging: outputs.Staging) -> tuple[int, str]:
    staging.fsync()  # a delayed ENOSPC/EIO (delayed allocation, NFS) surfaces here as OutputError
    files = staging.files()
    try:
        if files[0].is_dir():  # a folder artifact: its files' bytes, and the digest of its listing with theirs
            return folder_bytes_and_sha256(files[0])
        return sum(f.stat().st_size for f in files), file_sha256(files[0])
    except OSError as e:
        raise outputs.write_failure(e, staging.final, staging.needed) from e
