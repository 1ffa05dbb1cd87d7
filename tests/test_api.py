"""The Python API as editors and type checkers see it: typed keyword arguments that match ExportOptions, py.typed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning_export
from lightning_export.pipeline.options import ExportOptions, OptionsKwargs


def test_the_keyword_arguments_of_export_are_the_fields_of_export_options() -> None:
    fields = {f.name for f in dataclasses.fields(ExportOptions)} - {"checkpoint"}
    assert set(OptionsKwargs.__annotations__) == fields


def test_export_and_verify_declare_their_keywords() -> None:
    from lightning_export import export, verify

    assert export.__annotations__["options"] == "Unpack[OptionsKwargs]"
    assert verify.__annotations__["kwargs"] == "Unpack[OptionsKwargs]"


def test_the_package_ships_py_typed() -> None:
    assert (Path(lightning_export.__file__).parent / "py.typed").is_file()
    assert 'lightning_export = ["py.typed"]' in (Path(__file__).parent.parent / "pyproject.toml").read_text()
