"""Issue 10: release-grade outputs. A real LightningCLI run exported with --config to every format twice in
separate processes gives identical bytes, equal to the manifest's; inspect reports the run; verify passes on each
artifact and exits 1 when a weight (safetensors) or an initializer (ONNX) was changed."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_lexport

FORMATS = "state-dict,safetensors,torchscript,onnx,exported-program,executorch,aoti"


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
    assert manifest["options"]["config"] == str(release["config"])
    assert manifest["options"]["config_sha256"] == _sha(release["config"])
    assert {a["format"] for a in manifest["artifacts"]} == set(FORMATS.split(","))
    for a in manifest["artifacts"]:
        first, second = Path(a["path"]), out2 / Path(a["path"]).name
        assert _sha(first) == _sha(second) == a["sha256"], f"{a['format']} is not reproducible"
        assert a["bytes"] == first.stat().st_size
        assert a["verification"]["passed"]
    assert [a["sha256"] for a in report1["artifacts"]] == [a["sha256"] for a in manifest["artifacts"]]


def test_inspect_reports_the_cli_run(release: dict) -> None:
    raw = torch.load(str(release["ckpt"]), weights_only=True)
    res = run_lexport("inspect", release["ckpt"], "--json")
    assert res.code == 0, res
    s = res.json()
    assert s["global_step"] == raw["global_step"] == 2
    assert s["class_path"] == "fixtures.modules.CliModel"
    assert s["hparams"]["hidden"] == 12
    assert {"net", "net.0", "net.2"} <= {n["path"] for n in s["submodules"]}


def test_verify_passes_on_each_artifact(release: dict) -> None:
    out, _ = release["runs"][0]
    artifacts = sorted(p for p in out.iterdir() if p.name != "manifest.json")
    res = run_lexport("verify", *artifacts, release["ckpt"], "--config", release["config"], "--json")
    assert res.code == 0, res
    report = res.json()
    assert sorted(a["format"] for a in report["artifacts"]) == sorted(FORMATS.split(","))
    assert all(a["verification"]["passed"] for a in report["artifacts"])
    res = run_lexport("verify", "--manifest", out / "manifest.json", "--json")
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
    res = run_lexport("verify", bad, release["ckpt"], "--json")
    assert res.code == 1, res
    (a,) = res.json()["artifacts"]
    assert not a["verification"]["passed"]
    assert any("values differ" in p for p in a["verification"]["problems"])


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
    res = run_lexport("verify", bad, release["ckpt"], "--config", release["config"], "--json")
    assert res.code == 1, res
    assert res.json()["artifacts"][0]["format"] == "onnx"


def test_verify_with_manifest_fails_when_the_file_changed(release: dict, tmp_path: Path) -> None:
    out, _ = release["runs"][0]
    manifest = json.loads((out / "manifest.json").read_text())
    (st,) = [a for a in manifest["artifacts"] if a["format"] == "safetensors"]
    copy_dir = tmp_path / "stage2"
    copy_dir.mkdir()
    src = Path(st["path"])
    (n,) = struct.unpack("<Q", src.read_bytes()[:8])
    _changed_copy(src, copy_dir / src.name, 8 + n + 5)
    manifest["artifacts"] = [dict(st, path=src.name)]  # a later stage: files beside the manifest
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    res = run_lexport("verify", "--manifest", copy_dir / "manifest.json", "--json", cwd=tmp_path)
    assert res.code == 1, res
    problems = res.json()["artifacts"][0]["verification"]["problems"]
    assert any("differs from the manifest" in p for p in problems)
