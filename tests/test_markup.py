"""Text from the user's checkpoint, module and exporter is printed as text: rich markup in it is neither applied
nor a crash (an output key `[/x]` used to export, publish, then exit 70 on the table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_lexport

MODULE = "fixtures.markup:MarkupModule"


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.markup import make_checkpoint

    path = tmp_path_factory.mktemp("markup") / "marked.ckpt"
    make_checkpoint(str(path))
    return path


def test_markup_in_output_keys_class_names_and_hparams_is_printed_as_text(marked: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt2"
    args = tmp_path / "args.yaml"
    args.write_text('{"hidden": 4, "[/h]": 1}\n')  # an argument file with a name the constructor does not take
    res = run_lexport(marked, "--module", MODULE, "--init-args", args, "--to", "exported-program", "-o", out)
    assert res.code == 0, res.stderr
    assert out.is_file()
    # The per-output table names both keys as they are; the warning names the class and the hparam as they are.
    assert "[/x]" in res.stderr and "[bold]y" in res.stderr, res.stderr
    assert "[/red]Marked.__init__ does not take [/h]: ignored" in res.stderr, res.stderr
    assert res.stderr.count("✓") >= 3  # the artifact and both outputs verified


def test_markup_in_an_exporters_message_is_printed_as_text(marked: Path, tmp_path: Path) -> None:
    res = run_lexport(marked, "--module", MODULE, "--to", "torchscript", "-o", tmp_path / "m.torchscript.pt")
    assert res.code == 5, res.stderr  # the export failed; not a crash while printing it (70)
    assert "[/x] cannot be traced [bold]here[/bold]" in res.stderr, res.stderr
    assert not (tmp_path / "m.torchscript.pt").exists()
