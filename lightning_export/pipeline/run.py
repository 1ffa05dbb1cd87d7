"""What export and verify share around their work: the Report, signals, errors as data, the manifest, the steps."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .. import outputs
from ..bounded import short_repr
from ..errors import Advice, LexportError, VerificationError, describe_exception
from ..report import ArtifactResult, Report, versions
from .manifest import write_manifest
from .options import ExportOptions

Step = Callable[[str], contextlib.AbstractContextManager[Any]]


@contextlib.contextmanager
def no_status(label: str) -> Iterator[None]:
    yield


def reported(opts: ExportOptions, progress: Step | None, work: Callable[[ExportOptions, Report, Step], None]) -> Report:
    """Run `work` and return the Report; raises a LexportError with `.report` (and the report's `error`) when
    anything failed. The manifest, if asked for, is written either way."""
    report = Report(module=opts.module, attr=opts.attr, versions=versions(), settings=opts.settings)
    try:
        # SIGTERM becomes KeyboardInterrupt from the first step on (loading and building included), so every
        # `finally` removes its temp files and the CLI exits 130.
        with outputs.TerminateOnSignal():
            work(opts, report, progress or no_status)
        _raise_first_failure(report)
    except LexportError as e:
        e.report = report
        report.error = e
        try:
            write_manifest(opts, report)  # the record of a failed run is worth keeping too
        except LexportError as m:
            report.warnings.append(f"the manifest was not written: {m.message}")
        raise
    try:
        write_manifest(opts, report)
    except LexportError as e:
        e.report = report
        report.error = e
        raise
    return report


def _raise_first_failure(report: Report) -> None:
    """Raise the error of the first failed artifact (its own code), or VerificationError (1)."""
    failed = [a for a in report.artifacts if not a.ok]
    if failed:
        first = failed[0]
        if first.error:
            raise first.error
        else:
            failed_export = [a.format for a in failed if a.error]
            gated = [a.verification.gate_problem for a in failed
                     if a.verification is not None and a.verification.gate_problem]
            advised = next((a.verification for a in failed
                            if a.verification is not None and a.verification.advice), None)
            err = VerificationError(
                "verification failed for "
                + ", ".join(a.format for a in failed if a.error is None)
                + (f"; export failed for {', '.join(failed_export)}" if failed_export else "")
                + "".join(f"\n{p}" for p in gated),  # the agreement figures, where the gate failed
                advice=advised.advice if advised else None,
            )
            if advised:
                err.said.extend(advised.advice_said)
        raise err


@contextlib.contextmanager
def phase(error: type[LexportError], what: str) -> Iterator[None]:
    """Whatever goes wrong in a phase is that phase's error, with its exit code: a file that makes the loader run
    out of memory is a bad checkpoint (3), a user's module that raises or recurses while building is the module's
    (4). Never the internal-error exit (70)."""
    outputs.raise_if_terminated()
    try:
        yield
    except LexportError:
        raise
    except RecursionError as e:
        raise error(f"{what}: nested too deeply (RecursionError)") from e
    except MemoryError as e:
        raise error(f"{what}: out of memory (MemoryError)") from e
    except Exception as e:
        raise error(f"{what} failed: {describe_exception(e)}") from e
    except SystemExit as e:  # a user's module that calls sys.exit() while importing or building
        raise error(f"{what}: the code called sys.exit({short_repr(e.code)})") from e


@contextlib.contextmanager
def artifact_step(fmt: Any, report: Report, step: Step, verb: str) -> Iterator[ArtifactResult]:
    """The format's result, added to the report, under its status line (which ends in ✗ when it failed)."""
    result = ArtifactResult(format=fmt.name)
    report.artifacts.append(result)
    with step(f"{verb} {fmt.name}") as shown:
        yield result
        if shown is not None and not result.ok:
            shown.failed = True  # the status line ends in ✗


def say_what_else_worked(report: Report) -> None:
    """A format that failed on data-dependent control flow or sizes, or on an output tracing cannot return: its
    error says what the other formats of this run did."""
    advised = (Advice.DATA_DEPENDENT_BRANCH, Advice.DATA_DEPENDENT_SIZE, Advice.TRACE_OUTPUT)
    failed = [a for a in report.artifacts if a.error is not None and a.error.advice in advised]
    if not failed or len(report.artifacts) < 2:
        return
    sizes = any(a.error is not None and a.error.advice is Advice.DATA_DEPENDENT_SIZE for a in failed)

    def outcome(a: ArtifactResult) -> str:
        if a.error:
            return "export failed"
        if a.verification is not None and not a.verification.passed:
            what = "the example's sizes" if sizes else "one branch"
            return "failed verification" + (f" ({a.exporter} traced {what})" if a.traced else "")
        return "verified" if a.verification is not None else "written, not verified"

    for a in failed:
        others = [o for o in report.artifacts if o is not a]
        if a.error is not None:
            a.error.said.append("In this run: " + "; ".join(f"{o.format} {outcome(o)}" for o in others) + ".")
