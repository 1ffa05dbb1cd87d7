"""The shape of a manifest as `verify` reads it: every field it uses, with its type, checked before any is used
(exit 2 naming the field: "artifacts[1].sha256 must be a 64-hex string")."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, cast

from ..errors import UsageError

MAX_MANIFEST_DEPTH = 64  # an export writes 5 levels; init_args may nest a config's values
MAX_ARTIFACTS = 64  # one per format in an export
MAX_TEXT = 4096  # a path, a class path, a flag value
MAX_ITEMS = 256  # --input specs, --allow-global names
MAX_INT = 2**63 - 1

_HEX = re.compile(r"[0-9a-f]{64}")


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_TEXT and "\0" not in v


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _texts(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_ITEMS and all(_text(x) for x in v)


# kind -> (test, what the message says a value must be)
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (_text, f"a non-empty string (at most {MAX_TEXT} characters, no NUL)"),
    "hex": (lambda v: isinstance(v, str) and _HEX.fullmatch(v) is not None, "a 64-hex string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (_int, "an integer >= 0"),
    "number": (_number, "a finite number"),
    "texts": (_texts, f"a list of strings (at most {MAX_ITEMS})"),
    "text|int": (lambda v: _text(v) or _int(v), "a string or an integer >= 0"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}

# The options verify reads from a manifest (null means "not recorded").
OPTION_KINDS: dict[str, str] = {
    "module": "text", "attr": "text", "config": "text", "init_args": "object", "init_args_file": "text",
    "inputs": "texts", "example_inputs": "text", "dynamic_batch": "bool", "dynamic": "texts", "seed": "int",
    "random_inputs": "int", "atol": "number", "rtol": "number", "trust_checkpoint": "bool", "allow_globals": "texts",
    "max_growth": "number", "precision": "text", "quantize": "text", "data": "text", "data_batches": "int",
    "data_input": "text|int", "min_agreement": "number", "data_sha256": "hex",
}


def _check(value: Any, kind: str, name: str, where: str) -> None:
    test, what = KINDS[kind]
    if not test(value):
        raise UsageError(f"{where}: {name} must be {what}")


def check_record(record: dict[str, Any], where: str) -> None:
    """Every field verify uses, typed; raises UsageError naming the first that is not."""
    ckpt = record.get("checkpoint")
    _check(ckpt, "object", "checkpoint", where)
    ckpt = cast(dict[str, Any], ckpt)  # _check raised for anything else
    _check(ckpt.get("path"), "text", "checkpoint.path", where)
    if ckpt.get("sha256") is not None:
        _check(ckpt["sha256"], "hex", "checkpoint.sha256", where)
    artifacts = record.get("artifacts")
    if not isinstance(artifacts, list) or len(artifacts) > MAX_ARTIFACTS:
        raise UsageError(f"{where}: artifacts must be a list (at most {MAX_ARTIFACTS} entries)")
    for i, a in enumerate(artifacts):
        _check(a, "object", f"artifacts[{i}]", where)
        if a.get("path") is None:
            continue  # failed in the export: not published, not verified
        _check(a["path"], "text", f"artifacts[{i}].path", where)
        _check(a.get("sha256"), "hex", f"artifacts[{i}].sha256", where)
        _check(a.get("format"), "text", f"artifacts[{i}].format", where)
    options = record.get("options")
    if options is None:
        return
    _check(options, "object", "options", where)
    for key, kind in OPTION_KINDS.items():
        if options.get(key) is not None:
            _check(options[key], kind, f"options.{key}", where)
