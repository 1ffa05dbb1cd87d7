"""A format added from outside the package: one module (fixtures/npz_format.py, numpy .npz weights) and nothing in
lexport edited. It reaches the real CLI the way an installed package's does, through an entry point of the group
`lightning_export.formats` (a .dist-info on PYTHONPATH, as pip would write it), and gets everything a built-in format
gets: --to, --help, its own option (--format-option), the manifest, verify's detection, --precision/--quantize
refusals."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from lightning_export.formats import ENTRY_POINT_GROUP, REGISTRY, register
from tests.conftest import REPO, invoke, run_lexport


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the plugin module and the metadata pip writes for a package that declares the entry point."""
    site = tmp_path_factory.mktemp("site")
    shutil.copyfile(REPO / "fixtures" / "npz_format.py", site / "npz_format.py")
    info = site / "lexport_npz-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lexport-npz\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nnpz = npz_format:NPZ\n")
    return site


def _env(site: Path, **extra: str) -> dict[str, str]:
    import os

    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **extra}


def test_an_installed_plugin_format_exports_verifies_and_records_its_own_option(site, ckpts, tmp_path) -> None:
    out, manifest = tmp_path / "w.npz", tmp_path / "m.json"
    res = run_lexport(ckpts["classifier"], "--to", "npz", "-o", out, "--format-option", "npz.compress=true",
                      "--manifest", manifest, "--json", env=_env(site))
    assert res.code == 0, res
    (artifact,) = res.json()["artifacts"]
    assert artifact["format"] == "npz" and artifact["verification"]["passed"], artifact
    assert artifact["exporter"] == "numpy.savez_compressed" and artifact["info"]["compressed"] is True
    with zipfile.ZipFile(out) as z:  # the option reached the writer: the members are deflated
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
    options = json.loads(manifest.read_text())["options"]
    assert options["formats"] == ["npz"] and options["format_options"] == {"npz": {"compress": True}}
    # Detected by its sniff; the checkpoint (a session fixture) lies outside the manifest's folder: named.
    res = run_lexport("verify", "--manifest", manifest, ckpts["classifier"], "--json", env=_env(site))
    assert res.code == 0 and res.json()["artifacts"][0]["format"] == "npz", res
    help_text = run_lexport("--help", env=_env(site)).stdout
    assert "npz" in help_text


def test_plugin_option_names_and_values_are_checked(site, ckpts, tmp_path) -> None:
    res = run_lexport(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz",
                      "--format-option", "npz.compres=true", env=_env(site))
    assert res.code == 2 and "npz has no option 'compres'" in res.stderr and "Its options: compress" in res.stderr, res
    res = run_lexport(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz",
                      "--format-option", "npz.compress=maybe", env=_env(site))
    assert res.code == 2 and "npz.compress=maybe: give true or false" in res.stderr, res
    assert not (tmp_path / "w.npz").exists()


def test_a_plugin_that_cannot_load_or_takes_a_built_in_name_is_left_out(site, ckpts, tmp_path) -> None:
    bad = tmp_path / "bad"
    info = bad / "lexport_bad-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lexport-bad\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = not_a_module_here:NPZ\n"
                                           "onnx = onnx_clash:ONNX\n")
    (bad / "onnx_clash.py").write_text("import dataclasses\nfrom npz_format import NPZ\n"
                                       "ONNX = dataclasses.replace(NPZ, name='onnx')\n")
    env = _env(site)
    env["PYTHONPATH"] = f"{bad}:{env['PYTHONPATH']}"
    res = run_lexport(ckpts["classifier"], "--to", "broken", env=env)
    said = " ".join(res.stderr.split())
    assert res.code == 2 and "unknown format 'broken'" in said, res
    assert "did not load (broken = not_a_module_here:NPZ): ModuleNotFoundError" in said, res
    assert ("did not load (onnx = onnx_clash:ONNX): ValueError: the name 'onnx' of format 'onnx' is taken: it names "
            "the format 'onnx', registered first") in said, res
    res = run_lexport(ckpts["classifier"], "--to", "onnx,npz", "--module", "fixtures.modules:MyClassifierModule",
                      "--attr", "model", "--output-dir", tmp_path / "out", "--json", env=env)
    assert res.code == 0, res  # the built-in onnx, not the clash; the good plugin still there
    assert [(a["format"], a["exporter"].startswith("torch.onnx")) for a in res.json()["artifacts"]] == [
        ("onnx", True), ("npz", False)]


def test_without_plugins_the_format_is_unknown(site, ckpts, tmp_path) -> None:
    res = run_lexport(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz",
                      env=_env(site, LEXPORT_PLUGINS="0"))
    said = " ".join(res.stderr.split())
    assert res.code == 2 and "unknown format 'npz'" in said and "LEXPORT_PLUGINS=0 is set" in said, res
    assert run_lexport(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz", env=_env(site)).code == 0
    res = run_lexport("verify", tmp_path / "w.npz", ckpts["classifier"], "--format-option", "npz.compress=1",
                      "--json", env=_env(site))
    assert res.code == 0, res  # verify takes a format's options too, and says compress is export-only
    assert any("npz.compress: export-only" in w for w in res.json()["warnings"]), res
    res = run_lexport("verify", tmp_path / "w.npz", ckpts["classifier"], env=_env(site, LEXPORT_PLUGINS="0"))
    said = " ".join(res.stderr.split())
    assert res.code == 2 and "not an artifact lexport recognises" in said and "LEXPORT_PLUGINS=0 is set" in said


@pytest.fixture
def npz_format():
    """The same Format registered in this process (the Python API's way), removed afterwards."""
    import sys

    sys.path.insert(0, str(REPO / "fixtures"))
    try:
        from npz_format import NPZ
    finally:
        sys.path.remove(str(REPO / "fixtures"))
    register(NPZ)
    yield NPZ
    del REGISTRY["npz"]


def test_a_format_without_declared_precisions_refuses_them(npz_format, ckpts, tmp_path) -> None:
    res = invoke(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz", "--precision", "fp16")
    assert res.code == 2 and "npz stores the checkpoint's tensors as they are" in res.stderr, res.stderr
    res = invoke(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz", "--quantize", "int8-dynamic")
    assert res.code == 2 and "applies to onnx" in res.stderr, res.stderr
    assert not (tmp_path / "w.npz").exists()


def test_format_options_through_the_python_api(npz_format, ckpts, tmp_path) -> None:
    import lightning_export

    report = lightning_export.export(ckpts["classifier"], formats="npz", output=tmp_path / "w.npz",
                                     format_options={"npz": {"compress": True}}, manifest=tmp_path / "m.json")
    assert report.artifacts[0].info["compressed"] is True
    assert json.loads((tmp_path / "m.json").read_text())["options"]["format_options"] == {"npz": {"compress": True}}
    from lightning_export.errors import UsageError

    with pytest.raises(UsageError, match="npz has no option 'level'"):
        lightning_export.export(ckpts["classifier"], formats="npz", output=tmp_path / "x.npz",
                                format_options={"npz": {"level": 9}})


def test_a_built_in_option_through_format_option_is_the_flag(ckpts, tmp_path) -> None:
    """`--format-option onnx.opset=17` is --opset 17: the writer, the report and the manifest say 17."""
    manifest = tmp_path / "m.json"
    res = invoke(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--attr", "model",
                 "--to", "onnx", "-o", tmp_path / "m.onnx", "--format-option", "onnx.opset=17",
                 "--manifest", manifest, "--json")
    assert res.code == 0, res
    assert res.json()["artifacts"][0]["info"]["opset"] == 17
    assert json.loads(manifest.read_text())["options"]["opset"] == 17
    res = invoke(ckpts["classifier"], "--to", "safetensors", "-o", tmp_path / "w.safetensors",
                 "--format-option", "onnx.opset=17", "--json")  # a format the run does not write: said, not silent
    assert res.code == 0 and any("--format-option for onnx: not a format this run" in w
                                 for w in res.json()["warnings"]), res


def _typed_format():
    """A format with options of several declared types, verify-taken, one named like a run option (opset) and one
    like a run option the manifest must keep meaning the run's (seed)."""
    import dataclasses
    import sys

    from lightning_export.formats import option

    sys.path.insert(0, str(REPO / "fixtures"))
    try:
        from npz_format import NPZ
    finally:
        sys.path.remove(str(REPO / "fixtures"))

    @dataclasses.dataclass(frozen=True)
    class TypedOptions:
        level: int = option(1, verify_takes=True)
        opset: int | None = option(None, verify_takes=True)
        root: Path | None = option(None, verify_takes=True)
        seed: int = option(0)

    return dataclasses.replace(NPZ, name="typednpz", options=TypedOptions)


@pytest.fixture
def typed_format():
    fmt = register(_typed_format())
    yield fmt
    del REGISTRY["typednpz"]


def test_a_manifest_s_format_options_are_typed_and_bounded(typed_format, ckpts, tmp_path) -> None:
    from lightning_export.pipeline.options import manifest_options

    assert manifest_options()["seed"] is True  # a format's export-only `seed` does not change the run's
    out, manifest = tmp_path / "w.npz", tmp_path / "m.json"
    res = invoke(ckpts["classifier"], "--to", "typednpz", "-o", out, "--manifest", manifest,
                 "--format-option", "typednpz.opset=13", "--format-option", "typednpz.level=3",
                 "--format-option", f"typednpz.root={tmp_path / 'sub'}")
    assert res.code == 0, res
    record = json.loads(manifest.read_text())
    assert record["options"]["opset"] == 13  # the run's format's value, not onnx's default
    assert record["options"]["format_options"]["typednpz"]["level"] == 3
    assert record["options"]["format_options"]["typednpz"]["root"] == "sub"  # relative to the manifest

    def verify_with(change) -> tuple[int, str]:
        edited = json.loads(manifest.read_text())
        change(edited["options"])
        path = tmp_path / "edited.json"
        path.write_text(json.dumps(edited))
        res = invoke("verify", "--manifest", path, ckpts["classifier"], "--json")
        return res.code, res.stdout + res.stderr

    code, said = verify_with(lambda o: None)
    assert code == 0 and "a path is not taken from a manifest" in said, said
    code, said = verify_with(lambda o: o["format_options"]["typednpz"].update(level="abc"))
    assert code == 2 and "options.format_options.typednpz.level = abc: give an integer" in said, said
    code, said = verify_with(lambda o: o["format_options"]["typednpz"].update(level=1e300))
    assert code == 2 and "give an integer" in said, said
    code, said = verify_with(lambda o: o["format_options"]["typednpz"].update(level=[1, {"a": 2}]))
    assert code == 2 and "give an integer" in said, said
    code, said = verify_with(lambda o: o.update(opset="abc"))
    assert code == 2 and "give an integer" in said, said
    code, said = verify_with(lambda o: o.update(format_options=[1, 2]))
    assert code == 2 and "options.format_options must be an object" in said, said


def test_register_refuses_names_and_option_types_it_cannot_serve() -> None:
    import dataclasses

    fmt = _typed_format()
    with pytest.raises(ValueError, match="lower-case"):
        register(dataclasses.replace(fmt, name="NPZ"))

    @dataclasses.dataclass(frozen=True)
    class ListOptions:
        sizes: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="sizes: type"):
        register(dataclasses.replace(fmt, name="listnpz", options=ListOptions))
    assert "NPZ" not in REGISTRY and "listnpz" not in REGISTRY
