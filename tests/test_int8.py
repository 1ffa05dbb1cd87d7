"""Real data in, static int8 out, through the CLI: calibrated on --data (a .pt file, or the datamodule
of a LightningCLI config), verified by lexport on held-out batches with top-1 agreement, then re-run here on a draw
of the task neither calibration nor verification saw. One run per data source covers every int8 format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import available_formats, installed, invoke, tiered

MODULE = "fixtures.int8_data:PatternClassifier"
# openvino's int8 also needs nncf (in the openvino extra); a format whose extra is missing drops out here.
INT8 = [f for f in available_formats("onnx,executorch,openvino") if f != "openvino" or installed("nncf")]
MAX_RATIO = 0.35
MIN_HELD_OUT_AGREEMENT = 0.98


def _held_out_agreement(trained: dict, fmt: str, path: Path, batch: int = 8) -> tuple[float, float]:
    """(top-1 agreement with the fp32 module, the artifact's accuracy) on 1000 samples no run saw, in the
    artifact's own runtime (the format's loader), at the example's batch size (static shapes)."""
    from lightning_export.formats import REGISTRY

    runner = REGISTRY[fmt].load(path)
    x, y = trained["holdout"]
    agreed = correct = 0
    for xb, yb in zip(x.split(batch), y.split(batch)):
        with torch.no_grad():
            eager = trained["module"](xb).argmax(-1)
        out = runner(xb)
        got = torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else out).argmax(-1)
        agreed += int((got == eager).sum())
        correct += int((got == yb).sum())
    return agreed / len(y), correct / len(y)


def _export(trained: dict, tmp_path: Path, *extra: object, formats: list[str] = INT8) -> dict:
    res = invoke(trained["ckpt"], "--to", ",".join(formats), "--quantize", "int8", "--output-dir", tmp_path / "out",
                 "--manifest", tmp_path / "out" / "manifest.json", "--min-agreement", "0.98", "--json", *extra)
    assert res.code == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def _check_int8(trained: dict, report: dict, source: str) -> None:
    data = report["data"]
    assert data["calibration_samples"] >= 300 and data["verification_samples"] >= 250, data
    for a in report["artifacts"]:
        v = a["verification"]
        agreement = v["agreement"]
        assert v["passed"] and agreement["gated"] and agreement["agreement"] >= MIN_HELD_OUT_AGREEMENT, (a["format"], v)
        assert agreement["samples"] == data["verification_samples"] and agreement["eager_accuracy"] is not None
        assert a["info"]["quantize"] == "int8" and a["info"]["size_ratio"] <= MAX_RATIO, a["info"]
        assert a["info"]["calibration_samples"] == data["calibration_samples"]
        held, accuracy = _held_out_agreement(trained, a["format"], Path(a["path"]))
        assert held >= MIN_HELD_OUT_AGREEMENT, (a["format"], held)
        print(f"\n{a['format']} int8 ({source}): {a['bytes']:,} B = {a['info']['size_ratio']:.3f}x fp32; lexport: "
              f"agreement {agreement['agreement']:.2%}, accuracy {agreement['artifact_accuracy']:.2%} (eager "
              f"{agreement['eager_accuracy']:.2%}) on {agreement['samples']}; unseen 1000: agreement {held:.2%}, "
              f"accuracy {accuracy:.2%} (eager {trained['accuracy']:.2%})")


@pytest.mark.skipif(not INT8, reason="no int8 runtime installed")
def test_int8_from_a_data_file_then_verify_manifest(int8_trained: dict, tmp_path: Path) -> None:
    data = tmp_path / "batches.pt"
    shutil.copy(int8_trained["data"], data)
    report = _export(int8_trained, tmp_path, "--module", MODULE, "--data", data)
    assert report["data"]["kind"] == "file" and len(report["data"]["sha256"]) == 64
    _check_int8(int8_trained, report, "data file")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["data_sha256"] == report["data"]["sha256"] and manifest["options"]["quantize"] == "int8"
    # A later CI stage: the same held-out batches, the same figures.
    # The checkpoint and the data file lie outside the manifest's folder: our own manifest.
    res = invoke("verify", "--manifest", tmp_path / "out" / "manifest.json", "--allow-outside", "--json")
    assert res.code == 0, res.stdout + res.stderr
    again = json.loads(res.stdout)
    assert [a["verification"]["agreement"]["agreement"] for a in again["artifacts"]] == [
        a["verification"]["agreement"]["agreement"] for a in report["artifacts"]]
    # The data file changed: the manifest's re-check refuses it.
    torch.save(torch.load(data)[::-1], data)
    res = invoke("verify", "--manifest", tmp_path / "out" / "manifest.json", "--allow-outside")
    assert res.code == 1 and "sha256" in res.stderr and "--data" in res.stderr, res.stderr


# Every int8 format is calibrated from a data file above; from a datamodule, onnx (the others in the slow tier).
@pytest.mark.parametrize("fmt", tiered(INT8, fast=["onnx"]))
def test_int8_from_a_lightningcli_datamodule(int8_trained: dict, tmp_path: Path, fmt: str) -> None:
    report = _export(int8_trained, tmp_path, "--config", int8_trained["config"], "--data", "config", formats=[fmt])
    assert report["data"]["kind"] == "datamodule" and report["data"]["loader"] == "val_dataloader"
    assert report["data"]["class"] == "fixtures.int8_data.SyntheticDataModule"
    assert any("val_dataloader() of fixtures.int8_data.SyntheticDataModule" in n for n in report["notes"])
    _check_int8(int8_trained, report, "datamodule")


@pytest.mark.skipif("onnx" not in INT8, reason="needs onnxruntime")
def test_int8_onnx_keeps_the_graph_names(int8_trained: dict, tmp_path: Path) -> None:
    """The int8 graph is named as the fp32 one: the defaults, or --input-names/--output-names (they were ignored)."""
    import onnx

    for extra, names in (((), (["x"], ["output"])), (("--input-names", "image", "--output-names", "logits"),
                                                      (["image"], ["logits"]))):
        out = tmp_path / "-".join(names[0])
        res = invoke(int8_trained["ckpt"], "--module", MODULE, "--to", "onnx", "--quantize", "int8", "--data",
                     int8_trained["data"], "--min-agreement", "0.98", "--output-dir", out, *extra)
        assert res.code == 0, res.stdout + res.stderr
        graph = onnx.load(str(next(out.glob("*.onnx")))).graph
        assert ([i.name for i in graph.input], [o.name for o in graph.output]) == names


@pytest.mark.skipif("onnx" not in INT8, reason="needs onnxruntime")
def test_int8_whose_decisions_drift_fails_with_the_figure(int8_trained: dict, tmp_path: Path) -> None:
    """Calibration batches (even positions) scaled x100: the activation ranges are 100x too wide, most int8 steps
    fall where the data never is, and the held-out decisions drift. Exit 1 with the agreement figure. fp32 with
    the same data reports its agreement without a gate."""
    batches = torch.load(int8_trained["data"])
    drift = tmp_path / "drift.pt"
    torch.save([(x * 100, y) if i % 2 == 0 else (x, y) for i, (x, y) in enumerate(batches)], drift)
    res = invoke(int8_trained["ckpt"], "--module", MODULE, "--to", "onnx", "--quantize", "int8", "--data", drift,
                 "--output-dir", tmp_path / "int8", "--json")
    assert res.code == 1, res.stdout + res.stderr
    message = json.loads(res.stdout)["error"]["message"]
    assert "top-1 class on" in message and "%" in message and "below --min-agreement 0.99" in message, message
    res = invoke(int8_trained["ckpt"], "--module", MODULE, "--to", "onnx", "--data", drift, "--output-dir",
                 tmp_path / "fp32", "--json")
    assert res.code == 0, res.stdout + res.stderr
    agreement = json.loads(res.stdout)["artifacts"][0]["verification"]["agreement"]
    assert agreement["agreement"] == 1.0 and not agreement["gated"] and agreement["samples"] > 300


def test_int8_refusals(int8_trained: dict, tmp_path: Path) -> None:
    ckpt, out = int8_trained["ckpt"], tmp_path / "out"
    res = invoke(ckpt, "--module", MODULE, "--to", "onnx", "--quantize", "int8", "--output-dir", out)
    assert res.code == 2 and "--data" in res.stderr, res.stderr
    res = invoke(ckpt, "--module", MODULE, "--to", "tflite", "--quantize", "int8", "--data", int8_trained["data"],
                 "--output-dir", out)
    assert res.code == 2 and "litert-torch" in res.stderr, res.stderr
    res = invoke(ckpt, "--module", MODULE, "--to", "onnx", "--data", int8_trained["data"], "--min-agreement", "2",
                 "--output-dir", out)
    assert res.code == 2 and "--min-agreement" in res.stderr, res.stderr
    hostile = tmp_path / "hostile.pt"
    torch.save([(torch.zeros(2, 1, 16, 16), torch.nn.ReLU())], hostile)  # a global weights_only refuses
    res = invoke(ckpt, "--module", MODULE, "--to", "onnx", "--data", hostile, "--output-dir", out)
    assert res.code == 2 and "hostile.pt" in res.stderr and "ReLU" in res.stderr, res.stderr
    res = invoke(ckpt, "--config", int8_trained["broken"], "--to", "onnx", "--data", "config", "--output-dir", out)
    assert res.code == 4 and "dataset not found at /data/imagenet" in res.stderr, res.stderr
    if "executorch" in INT8:  # its int8 program takes the example's shapes: never half-dynamic
        res = invoke(ckpt, "--module", MODULE, "--to", "executorch", "--quantize", "int8", "--data",
                     int8_trained["data"], "--dynamic", "0", "--output-dir", out)
        assert res.code == 2 and "does not take --dynamic" in res.stderr, res.stderr
    assert not out.exists() or not any(out.iterdir())
