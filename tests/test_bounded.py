"""Walks over hparams and YAML are linear in the size of the input and depth-limited.

Each case would hang or take gigabytes with a naive walk; every assertion here runs in well under a second.
"""

from __future__ import annotations

import time

import pytest

from lightning_export.bounded import MAX_DEPTH, TooDeep, iter_containers, load_yaml, short_repr
from lightning_export.construct.arguments import constructor_arguments
from lightning_export.construct.configs import describes_object, instantiate_arguments
from lightning_export.errors import CheckpointError, UsageError


def _dag(levels: int = 64) -> list:
    """x = [x, x] `levels` times: 2**levels paths through `levels` + 1 objects (a 9 KB pickle)."""
    x: list = [1]
    for _ in range(levels):
        x = [x, x]
    return x


def _deep(levels: int) -> list:
    x: list = []
    for _ in range(levels):
        x = [x]
    return x


def test_shared_references_are_visited_once() -> None:
    started = time.perf_counter()
    assert len(list(iter_containers(_dag()))) == 65
    assert time.perf_counter() - started < 1


def test_self_reference_is_visited_once() -> None:
    x: list = []
    x.append(x)
    d: dict = {"a": x}
    d["self"] = d
    assert len(list(iter_containers(d))) == 2


def test_depth_is_limited_without_recursion() -> None:
    list(iter_containers(_deep(MAX_DEPTH)))
    with pytest.raises(TooDeep):
        list(iter_containers(_deep(100_000)))


def test_short_repr_is_bounded_on_shared_and_recursive_values() -> None:
    x: list = []
    x.append(x)
    for value in (_dag(), x, _deep(100_000), "y" * 10_000_000):
        started = time.perf_counter()
        text = short_repr(value)
        assert len(text) <= 60
        assert time.perf_counter() - started < 1


BILLION_LAUGHS = """
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_billion_laughs_is_refused_quickly() -> None:
    started = time.perf_counter()
    with pytest.raises(UsageError, match="billion laughs"):
        load_yaml(BILLION_LAUGHS, what="--init-args f.yaml")
    assert time.perf_counter() - started < 2


def test_yaml_recursive_alias_and_deep_nesting_are_refused() -> None:
    with pytest.raises(UsageError, match="refers to itself"):
        load_yaml("&a [*a]", what="--init-arg x")
    with pytest.raises(UsageError, match="levels deep|nested too deeply"):
        load_yaml("[" * 5000 + "]" * 5000, what="--init-arg x")


def test_yaml_with_a_few_aliases_still_loads() -> None:
    text = "base: &base {lr: 0.1, layers: [1, 2]}\nmodel: {opt: *base, width: 4}\n"
    data = load_yaml(text, what="--config c.yaml")
    assert data["model"]["opt"] == {"lr": 0.1, "layers": [1, 2]}
    with pytest.raises(UsageError, match="not valid YAML"):
        load_yaml("a: [1, 2", what="--config c.yaml")


def test_object_detection_is_linear_and_plain_values_pass_through() -> None:
    dag = _dag()
    started = time.perf_counter()
    assert not describes_object(dag)
    out = instantiate_arguments(_Module, {"width": 3, "extra": dag})
    assert out["extra"] is dag
    assert time.perf_counter() - started < 1
    with pytest.raises(TooDeep):
        describes_object(_deep(100_000))


class _Module:
    def __init__(self, width: int, extra: object = None) -> None:
        self.width, self.extra = width, extra


def test_checkpoint_hparams_shared_references_pass_through() -> None:
    """A DAG in the checkpoint's hparams is handed to the constructor as loaded, without walking its paths."""
    dag = _dag()
    started = time.perf_counter()
    kwargs = constructor_arguments(_Module, {"width": 3, "extra": dag}, {}, {}, trust=False)
    assert kwargs["extra"] is dag
    assert time.perf_counter() - started < 1


def test_checkpoint_hparams_nested_too_deep_are_the_files_fault() -> None:
    with pytest.raises(CheckpointError, match="nested more than"):
        constructor_arguments(_Module, {"width": 3, "extra": _deep(100_000)}, {}, {}, trust=False)
    # ... unless the constructor does not take it: then it is never looked at.
    kwargs = constructor_arguments(_Module, {"width": 3, "unused": _deep(100_000)}, {}, {}, trust=False)
    assert kwargs == {"width": 3}


def test_yaml_values_python_cannot_build_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="not valid YAML"):
        load_yaml("when: 2020-13-01\n", what="--init-args f.yaml")
