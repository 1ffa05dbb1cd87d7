"""--input specs: integer value ranges, and integer inputs that cover the vocabulary of the first embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_export.errors import UsageError
from lightning_export.inputs import embedding_vocabulary, from_specs, parse_input_spec, random_like


def test_integer_range_in_the_spec() -> None:
    spec = parse_input_spec("int64[4,64]:0..30000")
    assert (spec.low, spec.high) == (0, 30000) and str(spec) == "int64[4,64]:0..30000"
    t = from_specs([spec], seed=0).args[0]
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 30000
    assert int(t.max()) > 1000, "values span the range, not 0..9"
    again = random_like(from_specs([spec], seed=0), seed=1).args[0]
    assert int(again.max()) > 1000, "random verification inputs keep the example's range"


@pytest.mark.parametrize("bad", ["float32[2]:0..3", "int64[2]:5..1", "int64[2]:a..b"])
def test_bad_ranges_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_input_spec(bad)


def test_default_integer_range_covers_the_first_embedding() -> None:
    module = nn.Sequential(nn.Embedding(30000, 8), nn.Linear(8, 2))
    vocab = embedding_vocabulary(module)
    assert vocab == 30000
    t = from_specs([parse_input_spec("int64[4,64]")], seed=0, int_high=vocab).args[0]
    assert int(t.max()) > 1000 and int(t.max()) < 30000
    assert embedding_vocabulary(nn.Linear(2, 2)) is None
    assert int(from_specs([parse_input_spec("int64[4,64]")], seed=0).args[0].max()) <= 9
