"""The user's argument files and flags: --init-arg KEY=VALUE, and YAML/JSON files read with the bounded loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..bounded import NotYaml, load_yaml, short_repr
from ..errors import UsageError


def parse_init_arg(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise UsageError(f"--init-arg {short_repr(item)} must look like KEY=VALUE, e.g. --init-arg hidden_size=64")
    try:
        value = load_yaml(raw, what=f"--init-arg {key}") if raw.strip() else raw
    except NotYaml:
        value = raw  # not YAML: the text itself, as a string
    return key, value


MAX_ARGS_FILE_BYTES = 16 << 20  # a config or init-args file; anything bigger is not one


def load_args_file(path: str | os.PathLike[str], *, flag: str) -> dict[str, Any]:
    import stat

    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{flag} {p}: not a regular file")
        if st.st_size > MAX_ARGS_FILE_BYTES:
            raise UsageError(f"{flag} {p}: {st.st_size:,} bytes is too big for a configuration file")
        raw = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {p}: cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {p}: not a text file (YAML or JSON)") from None
    data = load_yaml(text, what=f"{flag} {p}")  # YAML is a superset of JSON
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {p}: expected a mapping of argument names to values, got {type(data).__name__}")
    return data
