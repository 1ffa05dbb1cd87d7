"""Project defaults: `[tool.lexport]` in the nearest pyproject.toml (walking up from the current directory, as ruff
and pytest do) or `--settings FILE`, with `[tool.lexport.profiles.NAME]` chosen by `--profile NAME`. Keys are the
long flags' names; a flag given on the command line wins. Every option's effective value and where it came from is
recorded (the report's and the manifest's `settings`). The file is an input like any other: bounded, typed."""

from __future__ import annotations

import difflib
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

MAX_SETTINGS_BYTES = 1 << 20  # a pyproject.toml is kilobytes; more is not a settings file
# Flags that shape one invocation, not a project's exports: never read from a settings file.
NOT_SETTINGS = frozenset({"settings", "profile", "summary", "json", "quiet", "version", "help", "install-completion",
                          "show-completion"})
COMMAND_LINE, DEFAULT = "command line", "default"


@dataclass
class Effective:
    """Every option's value (by parameter name) after the settings, and its source per flag name."""

    values: dict[str, Any]
    flags: dict[str, tuple[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    profile: str | None = None

    def record(self) -> dict[str, Any]:
        """For the report and the manifest: {file, profile, options: {flag: {value, source}}}."""
        options = {flag: {"value": _plain(self.values[name]), "source": self.sources.get(flag, DEFAULT)}
                   for flag, (name, _) in self.flags.items() if name in self.values}
        return {"file": str(self.file) if self.file else None, "profile": self.profile, "options": options}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def option_table(params: Iterable[Any], function: Callable[..., Any]) -> dict[str, tuple[str, Any]]:
    """flag name (no dashes) -> (parameter name, its type) of a command's settable options: its click `params`
    and the typed `function` they were made from."""
    hints = typing.get_type_hints(function, include_extras=True)
    table: dict[str, tuple[str, Any]] = {}
    for param in params:
        longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
        if not longs or longs[0][2:] in NOT_SETTINGS:
            continue
        hint = hints.get(param.name)
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        table[longs[0][2:]] = (param.name, base)
    return table


def find_settings(start: Path) -> Path | None:
    """The nearest pyproject.toml (from `start` up) that has a [tool.lexport] table (one that does not parse is an
    error only when it names tool.lexport: a broken pyproject of another project above is not lexport's concern)."""
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and b"tool.lexport" in _read(candidate) and _table(candidate) is not None:
            return candidate
    return None


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SETTINGS_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read the settings file {path}: {e.strerror or e}") from e
    if len(data) > MAX_SETTINGS_BYTES:
        raise UsageError(f"the settings file {path} is over {MAX_SETTINGS_BYTES >> 20} MiB: not a settings file")
    return data


def _table(path: Path) -> Any:
    """[tool.lexport] of `path`, None when it has none (a `tool.lexport` that is not a table included)."""
    document = _parse(path)
    tool = document.get("tool")
    return tool.get("lexport") if isinstance(tool, dict) else None


def _parse(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(_read(path).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"the settings file {path} is not valid TOML: {e}") from e


def load_table(path: Path, *, explicit: bool) -> dict[str, Any]:
    """[tool.lexport] of `path` (a pyproject.toml), or with --settings a file's top level when it has none."""
    table = _table(path)
    if table is None and explicit:
        table = _parse(path)
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.lexport] must be a table")
    return table


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"Did you mean {close[0]!r}? " if close else ""


def _check_type(key: str, value: Any, kind: Any, where: str) -> Any:
    """The TOML value as the option's type (exit 2 naming the key when it is not)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        kind = args[0]
    if typing.get_origin(kind) is list:
        items = value if isinstance(value, list) else [value]
        if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            return [str(v) for v in items]
        expected = "a string or a list of strings"
    elif kind is bool:
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "an integer"
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        expected = "a number"
    else:  # str, Path
        if isinstance(value, str):
            return value
        expected = "a string"
    raise UsageError(f"{where}: {key} = {_short(value)} must be {expected}")


def _short(value: Any) -> str:
    from ..bounded import short_repr

    return short_repr(value)


def _relative(name: str, kind: Any, value: Any, base: Path) -> Any:
    """Paths in a settings file are relative to its folder (as ruff and pytest read theirs)."""
    if Path in typing.get_args(kind) or kind is Path:
        return base / Path(value).expanduser()
    if name == "data" and value != "config":
        return str(base / Path(value).expanduser())
    if name == "module" and ":" in value:
        file, _, cls = value.rpartition(":")
        if file.endswith(".py"):
            return f"{base / Path(file).expanduser()}:{cls}"
    return value


def _layers(table: dict[str, Any], profile: str | None, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(source label, table) in the order they apply: [tool.lexport], then the profile's table over it."""
    profiles = table.get("profiles", {})
    if not isinstance(profiles, dict):
        raise UsageError(f"{where}: profiles must be a table of tables ([tool.lexport.profiles.NAME])")
    layers = [("[tool.lexport]", {k: v for k, v in table.items() if k != "profiles"})]
    if profile is not None:
        if profile not in profiles or not isinstance(profiles[profile], dict):
            names = sorted(profiles)
            raise UsageError(f"--profile {profile!r}: {where} has no [tool.lexport.profiles.{profile}]",
                             hint=f"{_suggest(profile, names)}Profiles there: {', '.join(names) or 'none'}.")
        layers.append((f"[tool.lexport.profiles.{profile}]", profiles[profile]))
    return layers


def effective(ctx: Any, function: Callable[..., Any], values: dict[str, Any], settings: Path | None,
              profile: str | None, cwd: Path | None = None) -> Effective:
    """`values` (the parameters of the command `function` that `ctx` runs) with every option not given on the
    command line taken from the settings (the profile over the table), paths resolved against the settings file's
    folder."""
    path = settings if settings is not None else find_settings((cwd or Path.cwd()).resolve())
    flags = option_table(ctx.command.params, function)
    result = Effective(dict(values), flags, profile=profile)
    for flag, (name, _) in flags.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            result.sources[flag] = COMMAND_LINE
    if path is None:
        if profile is not None:
            raise UsageError(f"--profile {profile}: no pyproject.toml with [tool.lexport] here or above "
                             f"{cwd or Path.cwd()}", hint="Pass --settings FILE, or add [tool.lexport] to it.")
        return result
    result.file = Path(os.path.abspath(path))
    where = f"{path} [tool.lexport]"
    for source, layer in _layers(load_table(path, explicit=settings is not None), profile, where):
        for raw_key, raw in layer.items():
            key = str(raw_key).replace("_", "-")
            if key not in flags:
                raise UsageError(f"{where}: unknown key {str(raw_key)!r}",
                                 hint=f"{_suggest(key, sorted(flags))}Keys are the long flags' names: "
                                      f"{', '.join(sorted(flags))}.")
            name, kind = flags[key]
            if result.sources.get(key) == COMMAND_LINE:
                continue
            value = _check_type(key, raw, kind, f"{path} {source}")
            result.values[name] = _relative(name, kind, value, result.file.parent)
            result.sources[key] = source
    return result
