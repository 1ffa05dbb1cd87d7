"""Release-grade outputs. A real LightningCLI run exported with --config to every format twice in
separate processes gives identical bytes, equal to the manifest's; inspect reports the run; verify passes on each
artifact and exits 1 when a weight (safetensors) or an initializer (ONNX) was changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import COMPILED_FORMATS, REPO, SLOW, available_formats, invoke, run_lexport

# The formats whose optional extra is missing drop out here (make test installs them all). The compiled ones
# (executorch, aoti) are checked the same way in the slow tier (test_compiled_formats_same_bytes_twice).
FORMATS = ",".join(available_formats("state-dict,safetensors,torchscript,onnx,exported-program"))
COMPILED = available_formats([f for f in COMPILED_FORMATS if f != "tflite"])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def release(ckpts: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ckpt = Path(ckpts["cli"])
    config = ckpt.parent / "cli" / "config.yaml"
    runs = []
    for i in (1, 2):
        out = tmp_path_factory.mktemp(f"release{i}")
        res = run_lexport(ckpt, "--config", config, "--to", FORMATS, "--output-dir", out,
                          "--manifest", out / "manifest.json", "--json")
        assert res.code == 0, res
        runs.append((out, res.json()))
    return {"ckpt": ckpt, "config": config, "runs": runs}


def test_same_bytes_twice_and_equal_to_the_manifest(release: dict) -> None:
    (out1, report1), (out2, _) = release["runs"]
    manifest = json.loads((out1 / "manifest.json").read_text())
    assert manifest["manifest_version"] == 1
    assert manifest["checkpoint"]["sha256"] == _sha(release["ckpt"])
    assert manifest["options"]["formats"] == FORMATS.split(",")
    assert (out1 / manifest["options"]["config"]).resolve() == release["config"].resolve()
    assert manifest["options"]["config_sha256"] == _sha(release["config"])
    assert {a["format"] for a in manifest["artifacts"]} == set(FORMATS.split(","))
    for a in manifest["artifacts"]:
        first, second = out1 / a["path"], out2 / Path(a["path"]).name  # paths are relative to the manifest
        assert _sha(first) == _sha(second) == a["sha256"], f"{a['format']} is not reproducible"
        assert a["bytes"] == first.stat().st_size
        assert a["verification"]["passed"]
    assert [a["sha256"] for a in report1["artifacts"]] == [a["sha256"] for a in manifest["artifacts"]]


@SLOW
@pytest.mark.skipif(not COMPILED, reason="needs the executorch extra (aoti is torch's own)")
def test_compiled_formats_same_bytes_twice(ckpts: dict, tmp_path: Path) -> None:
    """The release run's check for the compiled formats: two processes, the same bytes, equal to the manifest's."""
    ckpt = Path(ckpts["cli"])
    config = ckpt.parent / "cli" / "config.yaml"
    shas = []
    for i in (1, 2):
        out = tmp_path / f"run{i}"
        res = run_lexport(ckpt, "--config", config, "--to", ",".join(COMPILED), "--output-dir", out,
                          "--manifest", out / "manifest.json", "--json")
        assert res.code == 0, res
        manifest = json.loads((out / "manifest.json").read_text())
        assert {a["format"] for a in manifest["artifacts"]} == set(COMPILED)
        for a in manifest["artifacts"]:
            assert _sha(out / a["path"]) == a["sha256"] and a["verification"]["passed"]
        shas.append({a["format"]: a["sha256"] for a in manifest["artifacts"]})
    assert shas[0] == shas[1], "a compiled format is not reproducible"


def test_inspect_reports_the_cli_run(release: dict) -> None:
    raw = torch.load(str(release["ckpt"]), weights_only=True)
    res = invoke("inspect", release["ckpt"], "--json")
    assert res.code == 0, res
    s = res.json()
    assert s["global_step"] == raw["global_step"] == 2
    assert s["class_path"] == "fixtures.config_modules.CliModel"
    assert s["hparams"]["hidden"] == 12
    assert {"net", "net.0", "net.2"} <= {n["path"] for n in s["submodules"]}


def test_verify_passes_on_each_artifact(release: dict) -> None:
    out, _ = release["runs"][0]
    artifacts = sorted(p for p in out.iterdir() if p.name != "manifest.json")
    res = invoke("verify", *artifacts, release["ckpt"], "--config", release["config"], "--json")
    assert res.code == 0, res
    report = res.json()
    assert sorted(a["format"] for a in report["artifacts"]) == sorted(FORMATS.split(","))
    assert all(a["verification"]["passed"] for a in report["artifacts"])
    res = invoke("verify", "--manifest", out / "manifest.json", "--json")
    assert res.code == 2 and "--allow-outside" in res.json()["error"]["message"], res  # the checkpoint is outside
    res = invoke("verify", "--manifest", out / "manifest.json", "--allow-outside", "--json")
    assert res.code == 0, res


def _changed_copy(src: Path, dst: Path, offset: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x40
    dst.write_bytes(bytes(data))
    return dst


def test_verify_fails_on_a_changed_safetensors_weight(release: dict, tmp_path: Path) -> None:
    out, _ = release["runs"][0]
    src = next(out.glob("*.safetensors"))
    (n,) = struct.unpack("<Q", src.read_bytes()[:8])
    bad = _changed_copy(src, tmp_path / src.name, 8 + n + 5)  # a byte of the first tensor
    res = invoke("verify", bad, release["ckpt"], "--json")
    assert res.code == 1, res
    (a,) = res.json()["artifacts"]
    assert not a["verification"]["passed"]
    assert any("values differ" in p for p in a["verification"]["problems"])


def test_verify_of_weights_without_their_attr_names_the_attr(ckpts: dict, tmp_path: Path) -> None:
    """A weights file exported with --attr model, verified without it (or the reverse): the key sets differ by the
    prefix, and the failure says which --attr makes them meet instead of listing keys only."""
    sub, whole = tmp_path / "model.safetensors", tmp_path / "whole.safetensors"
    assert invoke(ckpts["classifier"], "--to", "safetensors", "--attr", "model", "-o", sub).code == 0
    assert invoke(ckpts["classifier"], "--to", "safetensors", "-o", whole).code == 0
    res = invoke("verify", sub, ckpts["classifier"], "--json")
    assert res.code == 1, res
    problems = res.json()["artifacts"][0]["verification"]["problems"]
    assert any("holds the weights of 'model'" in p and "verify with --attr model" in p for p in problems), problems
    res = invoke("verify", whole, ckpts["classifier"], "--attr", "model", "--json")
    assert res.code == 1, res
    problems = res.json()["artifacts"][0]["verification"]["problems"]
    assert any("keys all start with 'model.'" in p for p in problems), problems
    assert invoke("verify", sub, ckpts["classifier"], "--attr", "model").code == 0


def test_verify_fails_on_a_changed_onnx_initializer(release: dict, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    out, _ = release["runs"][0]
    model = onnx.load(str(next(out.glob("*.onnx"))))
    init = max(model.graph.initializer, key=lambda t: len(numpy_helper.to_array(t).ravel()))
    arr = numpy_helper.to_array(init).copy()
    arr.ravel()[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    bad = tmp_path / "changed.onnx"
    onnx.save(model, str(bad))
    res = invoke("verify", bad, release["ckpt"], "--config", release["config"], "--json")
    assert res.code == 1, res
    assert res.json()["artifacts"][0]["format"] == "onnx"


def _staged_safetensors(release: dict, stage: Path) -> tuple[dict, Path]:
    """A later CI stage: the release's manifest naming only its safetensors artifact, which `stage` will hold beside
    the manifest, and the checkpoint and config where they are (outside it: verified with --allow-outside); returns
    (manifest, the artifact in the first run's folder)."""
    out, _ = release["runs"][0]
    manifest = json.loads((out / "manifest.json").read_text())
    (st,) = [a for a in manifest["artifacts"] if a["format"] == "safetensors"]
    stage.mkdir()
    manifest["artifacts"] = [dict(st, path=Path(st["path"]).name)]
    manifest["checkpoint"]["path"] = str(release["ckpt"])
    manifest["options"]["config"] = str(release["config"])
    return manifest, out / st["path"]


def test_verify_with_manifest_fails_when_the_file_changed(release: dict, tmp_path: Path) -> None:
    copy_dir = tmp_path / "stage2"
    manifest, src = _staged_safetensors(release, copy_dir)
    (n,) = struct.unpack("<Q", src.read_bytes()[:8])
    _changed_copy(src, copy_dir / src.name, 8 + n + 5)
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    res = run_lexport("verify", "--manifest", copy_dir / "manifest.json", "--allow-outside", "--json", cwd=tmp_path)
    assert res.code == 1, res
    problems = res.json()["artifacts"][0]["verification"]["problems"]
    assert any("differs from the manifest" in p for p in problems)


def test_verify_with_manifest_never_takes_a_same_named_file_from_the_current_directory(release: dict,
                                                                                        tmp_path: Path) -> None:
    """Paths are the manifest's: a stray file of the same name where verify runs is not the artifact (it made a
    correct manifest fail before)."""
    stage = tmp_path / "stage2"
    manifest, src = _staged_safetensors(release, stage)
    shutil.copyfile(src, stage / src.name)
    (stage / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / src.name).write_bytes(b"junk")  # same name, in the current directory
    res = run_lexport("verify", "--manifest", stage / "manifest.json", "--allow-outside", "--json", cwd=tmp_path)
    assert res.code == 0, res
    assert res.json()["artifacts"][0]["path"] == str(stage / src.name)


def test_verify_honours_zero_tolerances_and_the_manifests_options(release: dict, tmp_path: Path) -> None:
    """Typed zeros are options too; a manifest's seed and input count are used when the command line is silent."""
    out, _ = release["runs"][0]
    onnx_file = next(out.glob("*.onnx"))
    res = invoke("verify", onnx_file, release["ckpt"], "--config", release["config"], "--atol", "0", "--rtol",
                 "0", "--random-inputs", "0", "--json")
    (a,) = res.json()["artifacts"]
    assert a["verification"]["atol"] == 0.0 and a["verification"]["inputs_checked"] == 1, res
    # An export whose --output-dir does not exist yet, a manifest inside it, read back from another directory.
    dist = tmp_path / "dist"
    res = invoke(release["ckpt"], "--config", release["config"], "--to", "safetensors,onnx", "--output-dir",
                 dist, "--manifest", dist / "m.json", "--seed", "7", "--random-inputs", "0")
    assert res.code == 0, res
    manifest = json.loads((dist / "m.json").read_text())
    assert not Path(manifest["checkpoint"]["path"]).is_absolute(), "paths are relative to the manifest"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run_lexport("verify", "--manifest", dist / "m.json", "--allow-outside", "--json", cwd=elsewhere,
                      env={"PYTHONPATH": str(REPO)})  # the config's class lives in this repo's fixtures
    assert res.code == 0, res
    onnx_result = next(a for a in res.json()["artifacts"] if a["format"] == "onnx")
    assert onnx_result["verification"]["inputs_checked"] == 1, "the manifest's --random-inputs 0 was not used"


def test_manifest_may_not_be_an_artifact(release: dict, tmp_path: Path) -> None:
    res = invoke(release["ckpt"], "--to", "safetensors", "--attr", "net", "-o", tmp_path / "x.safetensors",
                 "--manifest", tmp_path / "x.safetensors")
    assert res.code == 2, res
    assert not (tmp_path / "x.safetensors").exists()


def test_verify_with_manifest_fails_when_the_checkpoint_changed(release: dict, tmp_path: Path) -> None:
    """The manifest records the checkpoint's sha256: a different file at its path is not the release's."""
    stage = tmp_path / "stage"
    manifest, src = _staged_safetensors(release, stage)
    shutil.copy(src, stage / src.name)
    ckpt = stage / "cli.ckpt"
    raw = torch.load(str(release["ckpt"]), weights_only=True)
    raw["epoch"] = 99  # same weights, another file
    torch.save(raw, str(ckpt))
    manifest["checkpoint"]["path"] = ckpt.name
    (stage / "manifest.json").write_text(json.dumps(manifest))
    res = invoke("verify", "--manifest", stage / "manifest.json", "--allow-outside", "--json")
    assert res.code == 1, res
    assert "not the checkpoint the manifest records" in res.json()["error"]["message"]
