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
from ..hashing import file_sha256, folder_bytes_and_sha256
from ..report import ArtifactResult, Report
from .artifact import check_artifact, failed
from .manifest_input import Expected, targets_from_manifest
from .options import VERIFY_OPTIONS, ExportOptions, VerifyKwargs, options_from
from .prepare import Prepared, References
from .run import Step, reported
from .steps import Run, run_steps


# `manifest` here is the manifest to read; ExportOptions.manifest (one to write) does not apply to verify.
def verify(
    artifacts: Iterable[str | os.PathLike[str]] | dict[Any, Any] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    manifest: str | os.PathLike[str] | None = None,
    allow_outside: bool = False,
    trust_manifest: bool = False,
    progress: Step | None = None,
    checkpoint_sha256: str | None = None,
    **kwargs: Unpack[VerifyKwargs],
) -> Report:
    """Re-verify existing artifacts against their checkpoint (the format comes from each file). With a dict,
    the values are the sha256 each file must still have (None: any) or an `Expected`; with `checkpoint_sha256`,
    the checkpoint must still be that file. Options as for `export`.

    With `manifest` (a file an export wrote), the artifacts, the checkpoint and the options come from it (the
    options given here win; `checkpoint` may name the checkpoint instead of the manifest's path). A manifest is
    untrusted: its paths must stay inside its folder (unless `allow_outside`) and it may not make lexport run code
    (unless `trust_manifest`); it never turns on trust_checkpoint or allow_globals."""
    export_only = sorted(set(kwargs) - VERIFY_OPTIONS)
    if export_only:
        raise UsageError(f"verify() takes no {', '.join(export_only)}: "
                         f"{'it applies' if len(export_only) == 1 else 'they apply'} to export()",
                         hint=f"Its options: {', '.join(sorted(VERIFY_OPTIONS))}.")
    options: dict[str, Any] = dict(kwargs)
    notes: list[str] = []
    if manifest is not None:
        if artifacts:
            raise UsageError("with a manifest, the artifacts come from it: name none")
        targets = targets_from_manifest(manifest, options, checkpoint=checkpoint, allow_outside=allow_outside,
                                        trust_manifest=trust_manifest)
        artifacts, checkpoint, options, notes = targets.artifacts, targets.checkpoint, targets.options, targets.warnings
        checkpoint_sha256 = checkpoint_sha256 or targets.checkpoint_sha256
    elif artifacts is None or checkpoint is None:
        raise UsageError("verify needs the artifacts and their checkpoint, or a manifest")
    raw = dict(artifacts) if isinstance(artifacts, dict) else {a: None for a in artifacts}
    existing = {Path(k): v if isinstance(v, Expected) else Expected(v) for k, v in raw.items()}
    if checkpoint_sha256:
        options["hash_checkpoint"] = True
    opts = options_from(checkpoint, options)
    report = reported(opts, progress, lambda o, r, s: _verify(o, r, s, existing, notes))
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


def _verify(opts: ExportOptions, report: Report, step: Step, existing: dict[Path, Expected],
            notes: list[str]) -> None:
    report.warnings.extend(notes)
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


def _check_existing(fmt: Format, ctx: ExportContext, path: Path, expected: Expected, opts: ExportOptions,
                    refs: References | None, result: ArtifactResult) -> None:
    """`lexport verify`: the same verification as after an export, on a file that exists; with a manifest, the
    file must also still have the sha256 and the format recorded there, and its companions must be inside the
    manifest's folder. Those are checked before the artifact is loaded."""
    started = time.perf_counter()
    result.path = str(path)
    try:
        if fmt.folder:
            companions: list[Path] = []
            result.bytes, result.sha256 = folder_bytes_and_sha256(path)
        else:
            companions = fmt.companion_files(path)
            result.companions = [str(c) for c in companions]
            result.bytes = sum(f.stat().st_size for f in [path, *companions])
            result.sha256 = file_sha256(path)
        # Checked before the artifact is loaded: a changed file (an AOTInductor package holds a shared library)
        # is never run.
        problem = _unexpected(fmt, path, companions, result.sha256, expected)
        if problem:
            result.verification = failed(problem)
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


def _unexpected(fmt: Any, path: Path, companions: list[Path], sha256: str, expected: Expected) -> str | None:
    """Why the file is not the one the manifest records (None: it is): another format, other bytes, or a
    companion file that resolves outside the manifest's folder."""
    if expected.format is not None and expected.format != fmt.name:
        return (f"the manifest records format {expected.format!r} for {path.name}, but the file is "
                f"{fmt.name!r}: it is not the artifact the manifest describes")
    if expected.sha256 is not None and sha256 != expected.sha256:
        return f"sha256 {sha256[:16]}… differs from the manifest's {expected.sha256[:16]}…: the file changed"
    if expected.folder is not None:
        home = os.path.realpath(expected.folder).rstrip(os.sep) + os.sep
        outside = [c for c in companions if not os.path.realpath(c).startswith(home)]
        if outside:
            return (f"{outside[0].name} (beside {path.name}) resolves outside the manifest's folder, to "
                    f"{os.path.realpath(outside[0])}: pass --allow-outside if you trust it")
    return None
