"""A manifest handed to `verify`: untrusted JSON, read bounded from a regular file, checked field by field, its
paths kept inside its folder, its options merged under the caller's (which may never turn on a trust flag).

What a manifest may make lexport do is what README's Security section says: it names files inside its own folder
and options that are data (inputs, seed, tolerances, precision); it never makes lexport import a file, import a
module from its own folder, instantiate a class its options name, or load a checkpoint with less protection.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import FormatOption

from ..bounded import TooDeep, iter_containers
from ..errors import UsageError
from ..safeload.archive import DEFAULT_MAX_GROWTH
from .manifest_schema import MAX_MANIFEST_DEPTH, check_record
from .manifest_trust import check_code_options

MAX_MANIFEST_BYTES = 16 << 20  # what an export writes is a few KB
READS_MANIFEST_VERSION = 1
ALLOW_OUTSIDE_FLAG = "--allow-outside"
# Recorded options whose files are located like the artifacts (inside the manifest's folder).
PATH_OPTIONS = ("config", "init_args_file", "example_inputs", "data")


@dataclass(frozen=True)
class Expected:
    """What a manifest records about one artifact; verify checks the file against it before loading it."""

    sha256: str | None = None
    format: str | None = None
    folder: Path | None = None  # its companion files must resolve inside this folder (None: anywhere)


@dataclass
class ManifestTargets:
    """What `verify --manifest` checks: artifacts with what is expected of each, the checkpoint (and the sha256 it
    must have), the merged options, and what the run's report should say about the manifest."""

    artifacts: dict[Path, Expected]
    checkpoint: Path
    checkpoint_sha256: str | None
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest's JSON object: only from a regular file (a FIFO or a device is refused before anything is
    read from it), at most MAX_MANIFEST_BYTES, nested at most MAX_MANIFEST_DEPTH levels; exit 2 otherwise."""
    where = f"--manifest {path}"
    raw = _read_regular(path, where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not a lexport manifest (not UTF-8 text)") from None
    try:
        record = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise UsageError(f"{where}: not a lexport manifest (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and int() of a number with more than 4300 digits
        raise UsageError(f"{where}: not a lexport manifest ({' '.join(str(e).split())[:200]})") from None
    try:
        for _ in iter_containers(record, max_depth=MAX_MANIFEST_DEPTH):
            pass
    except TooDeep:
        raise UsageError(f"{where}: not a lexport manifest (nested more than {MAX_MANIFEST_DEPTH} levels)") from None
    if not isinstance(record, dict) or "manifest_version" not in record:
        raise UsageError(f"{where}: not a lexport manifest (no manifest_version)")
    version = record["manifest_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UsageError(f"{where}: manifest_version must be an integer >= 1")
    if version > READS_MANIFEST_VERSION:
        raise UsageError(f"{where}: manifest_version {version} is newer than this lexport reads "
                         f"({READS_MANIFEST_VERSION}): upgrade lexport")
    check_record(record, where)
    return record


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _read_regular(path: Path, where: str) -> bytes:
    """The bytes of a regular file, bounded. stat() first: a FIFO or a device is never opened; then opened
    non-blocking and fstat()ed again, in case the path was swapped in between."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{where}: not a regular file (a FIFO, a device or a folder is not a manifest)")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise UsageError(f"{where}: {st.st_size:,} bytes is too big to be a manifest")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UsageError(f"{where}: file not found") from None
    except OSError as e:
        raise UsageError(f"{where}: cannot read: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{where}: not a regular file (a FIFO, a device or a folder is not a manifest)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{where}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{where}: too big to be a manifest (more than {MAX_MANIFEST_BYTES:,} bytes)")
    return raw


def targets_from_manifest(
    manifest: str | os.PathLike[str],
    options: dict[str, Any],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    allow_outside: bool = False,
    trust_manifest: bool = False,
) -> ManifestTargets:
    """Read and check `manifest`, locate what it names, and merge its options under `options` (the caller's win).
    `checkpoint`: the caller's own, instead of the manifest's path (it must still have the recorded sha256).
    `allow_outside`: recorded paths may leave the manifest's folder. `trust_manifest`: the manifest is the caller's
    own: its module files and the classes its config or init arguments name are honoured, and so are paths
    outside its folder. Neither ever turns on trust_checkpoint or allow_globals."""
    path = Path(manifest)
    where = f"--manifest {path}"
    record = read_manifest(path)
    allow_outside = allow_outside or trust_manifest
    locate = _Locator(path.parent, where, allow_outside)
    merged = dict(options)
    warnings: list[str] = []
    recorded = record.get("options") or {}
    from_manifest = _merge_options(recorded, merged, locate, warnings)
    check_code_options(from_manifest, merged, folder=path.parent, where=where, trust=trust_manifest)
    artifacts: dict[Path, Expected] = {}
    for i, a in enumerate(record.get("artifacts") or []):
        if a.get("path") is None:
            continue  # a format that failed in the export: nothing was published
        located = locate(a["path"], f"artifacts[{i}].path", "")
        if located in artifacts:
            raise UsageError(f"{where}: artifacts[{i}].path names the same file as an earlier entry")
        artifacts[located] = Expected(a["sha256"], a.get("format"), None if allow_outside else locate.folder)
    if not artifacts:
        raise UsageError(f"{where}: it records no published artifact to verify")
    ckpt = record["checkpoint"]
    if checkpoint is not None:
        where_ckpt = Path(checkpoint)  # the caller's: no containment
    else:
        where_ckpt = locate(ckpt["path"], "checkpoint.path",
                            f"or name the checkpoint yourself: lexport verify --manifest {path} CHECKPOINT")
    return ManifestTargets(artifacts, where_ckpt, ckpt.get("sha256"), merged, warnings)


def _recorded_format_options(recorded: object, given: tuple[FormatOption, ...],
                             warnings: list[str]) -> tuple[FormatOption, ...]:
    """The manifest's `format_options` ({format: {option: value}}) that verify takes (declared with
    verify_takes=True by a registered format) and the caller did not give, converted to their declared types
    (exit 2 naming the manifest's field); anything else is ignored (data). A path is never taken from it: it would
    escape the manifest's folder rules; the caller passes --format-option for it."""

    from ..formats import REGISTRY, format_option_types
    from .options import convert_format_option

    if not isinstance(recorded, dict):
        raise UsageError("the manifest's options.format_options must be an object of {format: {option: value}}")
    mine: list[FormatOption] = []
    for fmt_name, own in recorded.items():
        fmt = REGISTRY.get(fmt_name) if isinstance(fmt_name, str) else None
        if fmt is None or not isinstance(own, dict):
            continue
        verify_takes = fmt.verify_option_names()
        types = format_option_types(fmt.options)
        for key, value in own.items():
            if key not in verify_takes or any(g[0] == fmt_name and g[1] == key for g in given):
                continue
            if "Path" in str(types[key]):
                warnings.append(f"the manifest records {fmt_name}.{key}: a path is not taken from a manifest; pass "
                                f"--format-option {fmt_name}.{key}=PATH yourself")
                continue
            label = f"the manifest's options.format_options.{fmt_name}.{key} = "
            mine.append((fmt_name, key, convert_format_option(value, types[key], label)))
    return tuple(mine)


def _merge_options(recorded: dict[str, Any], merged: dict[str, Any], locate: _Locator,
                   warnings: list[str]) -> dict[str, Any]:
    """The manifest's options into `merged` where the caller said nothing; returns those taken from it (for
    init_args, the arguments the caller did not give)."""
    from .options import format_option_triples, manifest_options

    taken: dict[str, Any] = {}
    takes = manifest_options()
    for key in ("trust_checkpoint", "allow_globals"):
        if recorded.get(key) and not merged.get(key):
            flag = "--trust-checkpoint" if key == "trust_checkpoint" else "--allow-global " + ",".join(recorded[key])
            warnings.append(f"the manifest records {flag}: a manifest never turns it on; pass it yourself if you "
                            "trust the checkpoint")
    for key, value in recorded.items():
        if not takes.get(key, False):
            continue  # export-only options (the artifact holds their effect), the inputs' hashes, the trust flags
        if value is None or value == [] or value is False or value == {}:
            continue
        if key == "format_options":
            triples = format_option_triples(merged.get("format_options"))
            recorded_own = _recorded_format_options(value, triples, warnings)
            if recorded_own:
                merged["format_options"] = (*recorded_own, *triples)  # later triples win: the caller's
                taken[key] = recorded_own
            continue
        if key == "init_args":
            given = merged.get("init_args") or {}
            mine = {k: v for k, v in value.items() if k not in given}
            if mine:
                merged["init_args"] = {**mine, **given}
                taken[key] = mine
            continue
        if merged.get(key) is not None:
            continue  # the caller's value wins
        if key == "max_growth" and value > DEFAULT_MAX_GROWTH:  # a safety bound: a manifest may only tighten it
            warnings.append(f"the manifest records --max-growth {value:g}: a manifest never loosens the bound "
                            f"(default {DEFAULT_MAX_GROWTH:g}); pass it yourself if you trust the checkpoint")
            continue
        if key in PATH_OPTIONS and not (key == "data" and value == "config"):
            hint = f"or pass --{key.replace('_', '-')} yourself"
            value = locate(value, f"options.{key}", hint)
            if key == "data":
                value = str(value)
                if isinstance(recorded.get("data_sha256"), str):
                    merged["data_sha256"] = recorded["data_sha256"]  # the file must still be the one exported with
        merged[key] = tuple(value) if isinstance(value, list) else value
        taken[key] = merged[key]
    return taken


class _Locator:
    """Recorded paths, relative to the manifest's folder, kept inside it: never absolute, never through `..`,
    never a symlink out of it (unless allowed). A path that leaves the folder but whose file name is beside the
    manifest is taken from there (a later CI stage downloads the manifest and its files together); never a file of
    the same name in the current directory."""

    def __init__(self, folder: Path, where: str, allow_outside: bool) -> None:
        self.folder, self.where, self.allow_outside = folder, where, allow_outside
        self.real_folder = os.path.realpath(folder)

    def __call__(self, recorded: str, what: str, hint: str) -> Path:
        path = Path(recorded)
        leaves = path.is_absolute() or ".." in path.parts
        if self.allow_outside:
            full = path if path.is_absolute() else self.folder / path
            beside = self.folder / path.name
            return full if full.exists() or not beside.exists() else beside
        candidates = [self.folder / path.name] if leaves else [self.folder / path, self.folder / path.name]
        found = next((c for c in candidates if os.path.lexists(c)), None)
        if found is None:
            if leaves:
                self._refuse(recorded, what, "an absolute path" if path.is_absolute() else "a path through '..'",
                             hint)
            return candidates[0]  # not found: whoever opens it says so
        real = os.path.realpath(found)
        if not self.inside(real):
            self._refuse(recorded, what, f"{found} resolves through a symlink to {real}", hint)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return found  # a dangling link inside the folder: whoever opens it says so
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UsageError(f"{self.where}: {what} {recorded!r} is not a regular file (a FIFO or a device)")
        return found

    def inside(self, real: str) -> bool:
        return real == self.real_folder or real.startswith(self.real_folder.rstrip(os.sep) + os.sep)

    def _refuse(self, recorded: str, what: str, why: str, hint: str) -> None:
        raise UsageError(
            f"{self.where}: {what} {recorded!r} leaves the manifest's folder ({why}); lexport reads only files "
            f"inside it",
            hint=f"If you trust the manifest, pass {ALLOW_OUTSIDE_FLAG}" + (f"; {hint}" if hint else "") + ".",
        )
