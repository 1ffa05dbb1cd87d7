"""Shared fixtures: real checkpoints from a real pl.Trainer, built once per session; CLI runners."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> checkpoint path for every fixture in fixtures/make_checkpoints.py (trained once per session)."""
    from fixtures.make_checkpoints import make_checkpoints

    out = tmp_path_factory.mktemp("ckpts")
    return make_checkpoints(out)


@pytest.fixture(scope="session")
def target_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deployment targets of fixtures/targets.py (conv net, Transformer, MLP), trained once per session and
    shared by tests/test_targets.py and tests/test_edge.py."""
    from fixtures.targets import make_target_checkpoints

    return make_target_checkpoints(tmp_path_factory.mktemp("targets"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    # `fixtures.modules` is importable from the repo root, as a user's package is from theirs.
    monkeypatch.chdir(REPO)


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self) -> dict:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"Result(code={self.code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-3000:]!r})"


def run_lexport(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 600) -> Result:
    """The installed CLI in a real subprocess: exit codes and the stdout/stderr split as a shell sees them."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("LEXPORT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_export", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=str(cwd or REPO),
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def invoke(*args: object) -> Result:
    """The CLI in-process through typer's CliRunner (fast: torch is imported once per session)."""
    from typer.testing import CliRunner

    from lightning_export.cli import SUBCOMMANDS, _subcommand, app

    argv = [str(a) for a in args]
    command = app
    if argv and argv[0] in SUBCOMMANDS:  # as main() dispatches: `inspect ...`, `verify ...`
        command, argv = _subcommand(argv[0]), argv[1:]
    runner = CliRunner()
    res = runner.invoke(command, argv, catch_exceptions=False)
    return Result(res.exit_code, res.stdout, res.stderr)


def patch_format(monkeypatch: pytest.MonkeyPatch, name: str, **changes) -> None:
    """Replace fields of a registered format for one test (a writer that fails half-way, a wrong loader)."""
    from lightning_export.formats import REGISTRY

    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], **changes))


@pytest.fixture
def small(tmp_path: Path, ckpts: dict) -> Path:
    """A private copy of the classifier checkpoint under tmp_path/in, for tests that check the input is untouched."""
    p = tmp_path / "in" / "classifier.ckpt"
    p.parent.mkdir()
    shutil.copyfile(ckpts["classifier"], p)
    return p
