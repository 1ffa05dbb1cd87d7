"""The manifest: the --json record plus the options that shaped the artifacts, written atomically beside them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import outputs
from ..errors import OutputError
from ..hashing import file_sha256
from ..report import Report, strict_json
from .options import ExportOptions, manifest_options, resolve_format_options

MANIFEST_VERSION = 1


def manifest_record(opts: ExportOptions, report: Report) -> dict[str, Any]:
    """The --json record plus the options; every path in it is relative to the manifest's directory, so the
    manifest and the files it names can move together (a later CI stage)."""
    home = (opts.manifest or Path(".")).resolve().parent

    def rel(path: Any) -> str:
        return os.path.relpath(Path(path).resolve(), home)

    record: dict[str, Any] = {"manifest_version": MANIFEST_VERSION, **report.to_json()}
    record["checkpoint"] = {**record["checkpoint"], "path": rel(opts.checkpoint)}
    for a in record["artifacts"]:
        if a.get("path"):
            a["path"] = rel(a["path"])
        if a.get("companions"):
            a["companions"] = [rel(c) for c in a["companions"]]
    options: dict[str, Any] = {}
    resolved = resolve_format_options(opts)
    given = _given_format_options(resolved, report)
    for name in manifest_options():
        value = given.get(name, getattr(opts, name))
        if name == "format_options":
            continue  # below, once the run options it must not repeat are recorded
        if name == "init_args":
            value = dict(opts.init_args)
        elif isinstance(value, Path):
            value = rel(value)
        elif isinstance(value, tuple):
            value = list(value)
        options[name] = value
    for name in ("config", "init_args_file", "example_inputs"):
        path = getattr(opts, name)
        if path is not None and Path(path).is_file():
            options[f"{name}_sha256"] = file_sha256(Path(path))
    if report.data is not None and report.data.get("kind") == "file":
        options["data"] = rel(opts.data)
        options["data_sha256"] = report.data["sha256"]  # what was read (verify --manifest re-reads this file)
        record["data"] = {**report.data, "path": rel(report.data["path"])}
    options["format_options"] = _own_options(resolved, report, options, rel)
    options["formats"] = [a.format for a in report.artifacts]
    record["options"] = options
    return record


def _run_formats_first(report: Report) -> list[str]:
    """Registered format names, the run's own first (their values are what the artifacts were made with)."""
    from ..formats import REGISTRY, get_format

    ran = [get_format(a.format).name for a in report.artifacts]
    return list(dict.fromkeys([*ran, *REGISTRY]))


def _given_format_options(resolved: dict[str, object], report: Report) -> dict[str, object]:
    """The run options that are a format's options, as the format got them (the run's formats first): its
    default when not given, the --format-option value (`onnx.opset=17` is the run's opset) when given that way."""
    import dataclasses

    values: dict[str, object] = {}
    for name in _run_formats_first(report):
        for f in dataclasses.fields(resolved[name]):  # type: ignore[arg-type]
            if hasattr(ExportOptions, f.name):
                values.setdefault(f.name, getattr(resolved[name], f.name))
    return values


def _own_options(resolved: dict[str, object], report: Report, recorded: dict[str, object],
                 rel: Callable[[Path], str]) -> dict[str, dict[str, object]]:
    """{format: {option: value}} of the run's formats' own options that the run options do not record: the fields
    of their own names (a format added from outside), and a field named like a run option whose value differs
    from the one recorded there."""
    import dataclasses

    from ..formats import get_format

    out: dict[str, dict[str, object]] = {}
    for name in dict.fromkeys(get_format(a.format).name for a in report.artifacts):
        own = resolved[name]
        fields = {}
        for f in dataclasses.fields(own):  # type: ignore[arg-type]
            value = getattr(own, f.name)
            plain = rel(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            if not hasattr(ExportOptions, f.name) or recorded.get(f.name) != plain:
                fields[f.name] = plain
        if fields:
            out[name] = fields
    return out


def write_manifest(opts: ExportOptions, report: Report) -> None:
    """Atomically, once the artifacts are published (or failed): the record of what was done."""
    if opts.manifest is None or not report.artifacts:
        return
    try:
        # default=str: YAML-typed --init-arg values (dates, bytes) are recorded as text
        text = json.dumps(strict_json(manifest_record(opts, report)), indent=2, allow_nan=False, default=str) + "\n"
    except (TypeError, ValueError) as e:
        raise OutputError(f"cannot write the manifest {opts.manifest}: {e}") from e
    outputs.write_text_atomically(opts.manifest, text, force=opts.force)
