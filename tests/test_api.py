"""The Python API as editors and type checkers see it: typed keyword arguments that match ExportOptions, py.typed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import lightning_export
from lightning_export.errors import UsageError
from lightning_export.pipeline.options import ExportOptions, OptionsKwargs, VerifyKwargs


def test_the_keyword_arguments_of_export_are_the_fields_of_export_options() -> None:
    fields = {f.name for f in dataclasses.fields(ExportOptions)} - {"checkpoint"}
    assert set(OptionsKwargs.__annotations__) == fields


def test_export_and_verify_declare_their_keywords() -> None:
    from lightning_export import export, verify

    assert export.__annotations__["options"] == "Unpack[OptionsKwargs]"
    assert verify.__annotations__["kwargs"] == "Unpack[VerifyKwargs]"


def test_verify_takes_the_options_of_a_verification_only(ckpts, tmp_path) -> None:
    """verify()'s keywords are ExportOptions fields, with the same types; an export-only one is exit 2, not ignored."""
    from lightning_export import verify

    assert set(VerifyKwargs.__annotations__) < set(OptionsKwargs.__annotations__)
    assert all(VerifyKwargs.__annotations__[k] == OptionsKwargs.__annotations__[k] for k in VerifyKwargs.__annotations__)
    with pytest.raises(UsageError, match="verify\\(\\) takes no opset, output_dir: they apply to export"):
        verify([tmp_path / "x.onnx"], ckpts["classifier"], output_dir=tmp_path, opset=17)  # type: ignore[call-arg]


def test_the_package_ships_py_typed() -> None:
    assert (Path(lightning_export.__file__).parent / "py.typed").is_file()
    assert 'lightning_export = ["py.typed"]' in (Path(__file__).parent.parent / "pyproject.toml").read_text()
