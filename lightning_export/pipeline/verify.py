"""`lexport verify ARTIFACT... CKPT`: the same preparation and artifact check as an export, on files that exist."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import UsageError, VerificationError, error_json
from ..formats import detect_format, quiet_torch_logs
from ..hashing import file_sha256, folder_bytes_and_sha256
from ..report import ArtifactResult, Report
from .artifact import check_artifact, failed
from .options import ExportOptions, options_from
from .prepare import check_flags, check_input_flags, check_manifest_path, prepare, with_format_options
from .run import Step, artifact_step, reported, say_what_else_worked


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
    opts = options_from(checkpoint, options)
    existing = {Path(k): v for k, v in expected.items()}
    report = reported(opts, progress, lambda o, r, s: _verify(o, r, s, existing))
    got = report.checkpoint.get("sha256")
    if checkpoint_sha256 and got != checkpoint_sha256:
        err = VerificationError(
            f"{checkpoint} is not the checkpoint the manifest records: sha256 {str(got)[:16]}… vs "
            f"{checkpoint_sha256[:16]}…"
        )
        err.report = report
        report.error = error_json(err)
        raise err
    return report


def _verify(opts: ExportOptions, report: Report, step: Step, existing: dict[Path, str | None]) -> None:
    given = check_flags(opts)
    if not existing:
        raise UsageError("nothing to verify: name an artifact")
    detected = [(detect_format(p), p) for p in existing]
    if len({f.name for f, _ in detected}) < len(detected):
        raise UsageError("one artifact per format: verify the others in another run")
    formats = with_format_options([f for f, _ in detected], opts)
    specs = check_input_flags(opts)
    paths = {f.name: p for f, p in detected}
    check_manifest_path(opts, paths)
    opts = replace(opts, formats=tuple(f.name for f in formats))
    prepared = prepare(opts, report, step, formats, given, specs)
    for fmt in formats:
        with artifact_step(fmt, report, step, "verifying") as result:
            path = paths[fmt.name]
            _check_existing(fmt, prepared.context_for(fmt), path, existing[path], opts, prepared.refs, result)
    say_what_else_worked(report)
    if opts.hash_checkpoint:
        report.checkpoint["sha256"] = prepared.ckpt.sha256


def _check_existing(
    fmt: Any, ctx: Any, path: Path, expected_sha: str | None, opts: ExportOptions, refs: Any, result: ArtifactResult
) -> None:
    """`lexport verify`: the same verification as after an export, on a file that exists; with a manifest, the
    file must also still have the sha256 recorded there."""
    started = time.perf_counter()
    result.path = str(path)
    try:
        if fmt.folder:
            result.bytes, result.sha256 = folder_bytes_and_sha256(path)
        else:
            companions = fmt.companion_files(path)
            result.companions = [str(c) for c in companions]
            result.bytes = sum(f.stat().st_size for f in [path, *companions])
            result.sha256 = file_sha256(path)
        if expected_sha is not None and result.sha256 != expected_sha:
            # Checked before the artifact is loaded: a changed file (an AOTInductor package holds a shared library)
            # is never run.
            result.verification = failed(
                f"sha256 {result.sha256[:16]}… differs from the manifest's {expected_sha[:16]}…: the file changed"
            )
            return
        with quiet_torch_logs():
            result.verification = check_artifact(fmt, path, ctx, opts, refs)
        if not result.verification.passed and not (opts.precision or opts.quantize):
            flag = fmt.made_with(path) if fmt.made_with is not None else None
            if flag:
                result.verification.problems.append(
                    f"{path.name} looks exported with {flag}: verify it with that flag (a manifest records it)"
                )
    except OSError as e:
        result.error = error_json(UsageError(f"cannot read {path}: {e.strerror or e}"))
    finally:
        result.seconds = time.perf_counter() - started
