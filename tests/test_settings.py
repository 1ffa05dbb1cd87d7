"""[tool.lexport] in pyproject.toml: defaults for every export option, profiles, command-line flags win, paths
relative to the pyproject's folder, unknown keys and bad types exit 2, the effective options and their sources in
the report and the manifest; `lexport config` prints them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import invoke

PYPROJECT = """\
[project]
name = "demo"

[tool.lexport]
to = ["safetensors"]
attr = "model"
output-dir = "dist"
manifest = "dist/manifest.json"

[tool.lexport.profiles.raw]
to = "state-dict"
output_dir = "raw"
manifest = "raw/manifest.json"
"""


@pytest.fixture
def project(tmp_path: Path, ckpts: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "runs").mkdir()
    shutil.copyfile(ckpts["classifier"], tmp_path / "runs" / "best.ckpt")
    monkeypatch.chdir(tmp_path / "runs")  # a subfolder: the pyproject is found by walking up
    return tmp_path


def test_checkpoint_alone_exports_with_the_project_settings(project: Path) -> None:
    res = invoke("best.ckpt", "--json")
    assert res.code == 0, res
    out = project / "dist" / "best.safetensors"  # output-dir relative to the pyproject's folder, not the cwd
    assert out.is_file() and not (project / "runs" / "dist").exists()
    settings = res.json()["settings"]
    assert settings["file"] == str(project / "pyproject.toml") and settings["profile"] is None
    assert settings["options"]["to"] == {"value": ["safetensors"], "source": "[tool.lexport]"}
    assert settings["options"]["output-dir"] == {"value": str(project / "dist"), "source": "[tool.lexport]"}
    assert settings["options"]["seed"] == {"value": 0, "source": "default"}
    manifest = json.loads((project / "dist" / "manifest.json").read_text())
    assert manifest["options"]["attr"] == "model" and manifest["options"]["formats"] == ["safetensors"]
    assert manifest["settings"]["options"]["attr"]["source"] == "[tool.lexport]"


def test_a_flag_overrides_a_setting_and_a_profile_selects_another_set(project: Path) -> None:
    res = invoke("best.ckpt", "--output-dir", "here", "--manifest", "here/m.json", "--json")
    assert res.code == 0, res
    assert (project / "runs" / "here" / "best.safetensors").is_file()  # the flag's path: from the cwd
    assert res.json()["settings"]["options"]["output-dir"]["source"] == "command line"

    res = invoke("best.ckpt", "--profile", "raw", "--json")
    assert res.code == 0, res
    assert [a["format"] for a in res.json()["artifacts"]] == ["state-dict"]
    assert (project / "raw" / "best.pt").is_file()
    options = res.json()["settings"]["options"]
    assert options["to"]["source"] == "[tool.lexport.profiles.raw]"
    assert options["attr"]["source"] == "[tool.lexport]"  # the profile applies over the table

    res = invoke("best.ckpt", "--profile", "rwa")
    assert res.code == 2 and "--profile 'rwa'" in res.stderr and "Did you mean 'raw'?" in res.stderr, res


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('outptu-dir = "x"', "unknown key 'outptu-dir'"),
        ("seed = 'x'", "seed = 'x' must be an integer"),
        ("force = 1", "force = 1 must be true or false"),
        ("input = [{ a = 1 }]", "must be a string or a list of strings"),
        ("profiles = 3", "profiles must be a table"),
        ("json = true", "unknown key 'json'"),  # how one invocation prints is not a project setting
        ("input = [", "is not valid TOML"),
    ],
)
def test_a_bad_settings_file_is_exit_2_naming_the_key(project: Path, line: str, said: str) -> None:
    text = PYPROJECT.split("[tool.lexport.profiles.raw]")[0] if "profiles" in line else PYPROJECT
    (project / "pyproject.toml").write_text(text.replace('attr = "model"', f'attr = "model"\n{line}'))
    res = invoke("best.ckpt", "--json")
    assert res.code == 2, res
    error = res.json()["error"]
    assert error["kind"] == "usage" and said in error["message"], error
    assert not (project / "dist").exists()
    if "outptu" in line:
        assert "Did you mean 'output-dir'?" in error["message"]


def test_settings_file_flag_and_its_bounds(project: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "lexport.toml"  # a TOML file of keys at its top level
    other.parent.mkdir()
    other.write_text('to = "state-dict"\nattr = "model"\noutput-dir = "out"\nmanifest = "out/m.json"\n')
    res = invoke("best.ckpt", "--settings", other, "--json")
    assert res.code == 0, res
    assert (other.parent / "out" / "best.pt").is_file()
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    res = invoke("best.ckpt", "--settings", big, "--json")
    assert res.code == 2 and "over 1 MiB" in res.json()["error"]["message"], res


def test_lexport_config_prints_the_effective_options(project: Path) -> None:
    res = invoke("config", "--profile", "raw", "--json")
    assert res.code == 0, res
    options = res.json()["settings"]["options"]
    assert options["to"] == {"value": ["state-dict"], "source": "[tool.lexport.profiles.raw]"}
    assert options["output-dir"]["value"] == str(project / "raw")
    res = invoke("config")
    assert res.code == 0 and "[tool.lexport]" in res.stderr and "--output-dir" in res.stderr, res


def test_a_pyproject_without_the_table_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    (outer / "pyproject.toml").write_text('[tool.lexport]\nattr = "net"\n')
    (inner / "pyproject.toml").write_text('# lexport reads [tool.lexport]; this project has none\n[project]\nname = "x"\n')
    monkeypatch.chdir(inner)
    res = invoke("config", "--json")
    assert res.code == 0, res
    settings = res.json()["settings"]
    assert settings["file"] == str(outer / "pyproject.toml") and settings["options"]["attr"]["value"] == "net"
