"""Bounded handling of data that came from a file or a flag: hyper_parameters, YAML, reprs.

Values unpickled from a checkpoint or parsed from YAML can share references (`x = [x, x]` 64 times is a 9 KB
pickle and 2**64 paths), refer to themselves, or nest a million levels deep. Everything here visits each object
once, stops at a fixed depth, and never expands aliases: work is linear in the size of the file.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterator
from typing import Any

from .errors import UsageError

MAX_DEPTH = 200  # deeper than any real config or hparams; well inside Python's recursion limit
MAX_YAML_NODES = 1_000_000  # nodes of a YAML document once its aliases are expanded


class TooDeep(ValueError):
    pass


class NotYaml(UsageError):
    """The text does not parse as YAML (or JSON) at all, as opposed to YAML refused for its size or depth: a
    caller that also takes plain text (--init-arg KEY=VALUE) takes the text itself."""


def iter_containers(value: Any, max_depth: int = MAX_DEPTH) -> Iterator[Any]:
    """Every dict, list and tuple reachable from `value`, each once (by identity), depth-first, iteratively.
    Raises TooDeep past `max_depth` levels."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        obj, depth = stack.pop()
        if not isinstance(obj, (dict, list, tuple)) or id(obj) in seen:
            continue
        if depth > max_depth:
            raise TooDeep(f"nested more than {max_depth} levels deep")
        seen.add(id(obj))
        yield obj
        children = dict.values(obj) if isinstance(obj, dict) else obj  # a pickle may shadow .values
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))


def short_repr(value: Any, limit: int = 60) -> str:
    """A repr that is bounded in time and length whatever the value's shape (shared or recursive references)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    try:
        text = r.repr(value)
    except Exception as e:  # noqa: BLE001 - a user object's __repr__ may fail; only for messages
        text = f"<{type(value).__name__} ({type(e).__name__} in repr)>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(text: str, *, what: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand beyond MAX_YAML_NODES ("billion laughs"),
    recursive aliases, and nesting deeper than MAX_DEPTH. Errors are UsageError (exit 2) naming `what`."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, what)
        return loader.construct_document(node)
    except RecursionError:
        raise UsageError(f"{what}: nested too deeply to be a configuration") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:  # e.g. a timestamp with month 13
        raise NotYaml(f"{what}: not valid YAML or JSON: {_one_line(e)}") from None
    finally:
        loader.dispose()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _check_yaml_size(root: Any, what: str) -> None:
    import yaml

    expanded: dict[int, int] = {}  # node id -> node count once its aliases are expanded
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _yaml_children(node)
            expanded[key] = 1 + sum(expanded[id(c)] for c in children)
            if expanded[key] > MAX_YAML_NODES:
                raise UsageError(
                    f"{what}: its aliases expand to more than {MAX_YAML_NODES:,} values (a YAML 'billion laughs')"
                )
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise UsageError(f"{what}: a YAML alias refers to itself (a recursive value cannot be an argument)")
        if depth > MAX_DEPTH:
            raise UsageError(f"{what}: nested more than {MAX_DEPTH} levels deep")
        on_path.add(key)
        stack.append((node, depth, True))
        if isinstance(node, yaml.CollectionNode):
            stack.extend((c, depth + 1, False) for c in _yaml_children(node) if id(c) not in expanded)


def _yaml_children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
