"""The one list of steps export and verify share: flags checked, formats and their paths, preparation, then each
format's own work under its status line. Export and verify differ only in the three things a `Run` names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..formats import ExportContext, Format, get_format
from ..report import ArtifactResult, Report
from .options import ExportOptions
from .prepare import Prepared, check_flags, check_input_flags, check_manifest_path, prepare, with_format_options
from .run import Step, artifact_step, say_what_else_worked


@dataclass(frozen=True)
class Run:
    """What a command does around the shared steps."""

    verb: str  # the status line's: "exporting", "verifying"
    # The formats of the run, before their options are checked (export: --to; verify: detected from the files).
    formats: Callable[[ExportOptions], list[Format]]
    # Where each format's artifact is (export: its destination, refused when it exists; verify: the file given).
    paths: Callable[[ExportOptions, list[Format]], dict[str, Path]]
    # One format's work on its artifact, with the format's own context and the run's shared references.
    each: Callable[[Format, ExportContext, Path, ExportOptions, Prepared, ArtifactResult], None]


def run_steps(run: Run, opts: ExportOptions, report: Report, step: Step) -> None:
    given = check_flags(opts)
    formats = with_format_options(run.formats(opts), opts)
    _warn_unused_format_options(run, opts, formats, report)
    specs = check_input_flags(opts)
    paths = run.paths(opts, formats)
    check_manifest_path(opts, paths)
    opts = replace(opts, formats=tuple(f.name for f in formats))
    prepared = prepare(opts, report, step, formats, given, specs)
    for fmt in formats:
        with artifact_step(fmt, report, step, run.verb) as result:
            run.each(fmt, prepared.context_for(fmt), paths[fmt.name], opts, prepared, result)
    say_what_else_worked(report)
    if opts.hash_checkpoint:
        report.checkpoint["sha256"] = prepared.ckpt.sha256


def _warn_unused_format_options(run: Run, opts: ExportOptions, formats: list[Format], report: Report) -> None:
    """A --format-option this run cannot use is said, not silently dropped: one for a format it does not write or
    verify, and on verify one the format declares export-only (the artifact already holds its effect)."""
    names = {f.name for f in formats}
    unused = sorted({get_format(f).name for f, _, _ in opts.format_options} - names)
    if unused:
        report.warnings.append(f"--format-option for {', '.join(unused)}: not a format this run writes or verifies; "
                               "not used")
    if run.verb == "verifying":
        for fmt_name, key, _ in opts.format_options:
            fmt = get_format(fmt_name)
            if fmt.name in names and key not in fmt.verify_option_names():
                report.warnings.append(f"--format-option {fmt.name}.{key}: export-only (the artifact holds its "
                                       "effect); verify does not use it")
