"""`lexport verify ARTIFACT... CKPT`: the same preparation and artifact check as an export, on files that exist."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Unpack

from ..errors import UsageError, VerificationError
from ..formats import ExportContext, Format, detect_format, quiet_torch_logs
from ..hashing import file_sha256
from ..report import ArtifactResult, Report
from .artifact import check_artifact, failed
from .options import ExportOptions, OptionsKwargs, options_from
from .prepare import Prepared, References
from .run import Step, reported
from .steps import Run, run_steps


def verify(
    artifacts: Iterable[str | os.PathLike[str]] | dict[Any, str | None],
    checkpoint: str | os.PathLike[str],
    *,
    progress: Step | None = None,
    checkpoint_sha256: str | None = None,
    **kwargs: Unpack[OptionsKwargs],
) -> Report:
    """Re-verify existing artifacts against their checkpoint (the format comes from each file). With a dict,
    the values are the sha256 each file must still have (None: any); with `checkpoint_sha256`, the checkpoint
    must still be that file (a manifest's). Options as for `export`."""
    expected = dict(artifacts) if isinstance(artifacts, dict) else {a: None for a in artifacts}
    options: dict[str, Any] = dict(kwargs)
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
        report.error = err
        raise err
    return report


def _verify(opts: ExportOptions, report: Report, step: Step, existing: dict[Path, str | None]) -> None:
    paths: dict[str, Path] = {}

    def detected(opts: ExportOptions) -> list[Format]:
        if not existing:
            raise UsageError("nothing to verify: name an artifact")
        found = [(detect_format(p), p) for p in existing]
        if len({f.name for f, _ in found}) < len(found):
            raise UsageError("one artifact per format: verify the others in another run")
        paths.update({f.name: p for f, p in found})
        return [f for f, _ in found]

    def check_existing(fmt: Format, ctx: ExportContext, path: Path, opts: ExportOptions, prepared: Prepared,
                       result: ArtifactResult) -> None:
        _check_existing(fmt, ctx, path, existing[path], opts, prepared.refs, result)

    run_steps(Run("verifying", detected, lambda opts, formats: paths, check_existing), opts, report, step)


def _check_existing(fmt: Format, ctx: ExportContext, path: Path, expected_sha: str | None, opts: ExportOptions,
                    refs: References | None, result: ArtifactResult) -> None:
    """`lexport verify`: the same verification as after an export, on a file that exists; with a manifest, the
    file must also still have the sha256 recorded there."""
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
        result.error = UsageError(f"cannot read {path}: {e.strerror or e}")
    finally:
        result.seconds = time.perf_counter() - started
