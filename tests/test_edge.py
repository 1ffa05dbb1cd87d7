"""Edge runtimes. The conv net, the Transformer and the MLP of fixtures/targets.py (trained with a real
Trainer, the session's `target_ckpts`) exported to an OpenVINO IR (`--to openvino`) and a LiteRT flatbuffer
(`--to tflite`); each verified by lexport in its own runtime, then re-run here with that runtime on fresh inputs and
compared with the module rebuilt by hand. The optional extras are imported inside the tests only."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import invoke, tiered

from fixtures.targets import fresh_input, rebuild
from lightning_export import LexportError, export
from lightning_export.formats import detect_format
from lightning_export.formats._precision import PRECISION_TOLERANCE


def lexport(ckpts, name, formats, out, **kw):
    from fixtures.targets import class_path

    report = export(ckpts[name], module=class_path(name), formats=formats, output_dir=out, **kw)
    for a in report.artifacts:
        assert a.ok and a.verification.passed, a
        assert a.path.startswith(str(out))
    return {a.format: a for a in report.artifacts}


def rebuilt(ckpts, name):
    return rebuild(name, ckpts[name])


def fresh(module, seed=11, batch=None):
    return fresh_input(module, seed, batch)


def drift(got, module, x, atol, rtol):
    with torch.no_grad():
        want = module(x)
    got = torch.as_tensor(got).to(torch.float32)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return float((got - want).abs().max())


def run_ir(xml, x):
    """The IR run by OpenVINO directly (not lexport's runner): read, compile for CPU in f32, infer."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled([x.numpy()])[compiled.outputs[0]]


def run_tflite(path, x):
    """The flatbuffer run by the LiteRT interpreter directly, through its signature."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner("serving_default")
    (name, detail), = runner.get_input_details().items()
    (out,) = runner(**{name: x.numpy().astype(detail["dtype"])}).values()
    return out


# ----------------------------------------------------------------------------------------------------------------
# OpenVINO
# ----------------------------------------------------------------------------------------------------------------


def test_openvino_fp32_and_fp16(target_ckpts, tmp_path):
    """fp32 weights by default (not OpenVINO's silent FP16), `--precision fp16` about half the .bin; both verified
    by lexport with the f32 CPU hint and re-run here with openvino; two exports are byte-identical."""
    pytest.importorskip("openvino")
    name = "wide_mlp"
    a = lexport(target_ckpts, name, ["openvino"], tmp_path / "fp32")["openvino"]
    xml, weights = tmp_path / "fp32" / f"{name}.xml", tmp_path / "fp32" / f"{name}.bin"
    assert a.path == str(xml) and a.companions == [str(weights)]
    assert a.bytes == xml.stat().st_size + weights.stat().st_size
    assert a.info["inference_precision_hint"] == "f32" and a.info["weights_type"] == "float32"
    assert a.info["input_shapes"] == [[2, 64]]
    m = rebuilt(target_ckpts, name)
    params = sum(p.numel() for p in m.parameters())
    assert weights.stat().st_size == 4 * params  # float32 weights, nothing compressed
    x = fresh(m)
    assert drift(run_ir(xml, x), m, x, 1e-5, 1e-5) < 1e-5
    # Reproducible bytes: a second export writes the same .xml and .bin.
    lexport(target_ckpts, name, ["openvino"], tmp_path / "again")
    for f in (xml, weights):
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name

    h = lexport(target_ckpts, name, ["openvino"], tmp_path / "fp16", precision="fp16")["openvino"]
    half = tmp_path / "fp16" / f"{name}.bin"
    assert h.info["weights_type"] == "float16" and h.info["precision"] == "fp16"
    assert weights.stat().st_size / 2 <= half.stat().st_size < weights.stat().st_size * 0.51
    out = run_ir(half.with_suffix(".xml"), x.half())  # the fp16 IR takes and returns float16
    assert out.dtype.name == "float16"
    assert 0 < drift(out, m, x, *PRECISION_TOLERANCE["fp16"]) < PRECISION_TOLERANCE["fp16"][0]


def test_openvino_dynamic_batch_and_transformer(target_ckpts, tmp_path):
    """--dynamic-batch: batch -1 in the IR, verified by lexport at another batch, run here at batch 5; the
    Transformer (int64 tokens) exports too."""
    pytest.importorskip("openvino")
    a = lexport(target_ckpts, "convnet", ["openvino"], tmp_path, dynamic_batch=True)["openvino"]
    assert a.info["input_shapes"] == [[-1, 3, 16, 16]]
    assert a.verification.inputs_checked == 8  # example + 5 random + batches of 1 and 5 (--dynamic-batch)
    m = rebuilt(target_ckpts, "convnet")
    x = fresh(m, batch=5)
    assert drift(run_ir(a.path, x), m, x, 1e-4, 1e-4) < 1e-4

    t = lexport(target_ckpts, "transformer", ["openvino"], tmp_path)["openvino"]
    m = rebuilt(target_ckpts, "transformer")
    x = fresh(m)
    assert drift(run_ir(t.path, x), m, x, 1e-4, 1e-4) < 1e-4
    with pytest.raises(RuntimeError):  # static shapes without --dynamic-batch
        run_ir(t.path, fresh(m, batch=3))


def test_openvino_keep_failed_renames_the_bin_too(target_ckpts, tmp_path):
    """--keep-failed publishes `<stem>.FAILED.xml` with `<stem>.FAILED.bin` (OpenVINO reads the .bin by the .xml's
    stem): a failed IR never replaces or pairs with a good `<stem>.bin`."""
    pytest.importorskip("openvino")
    from fixtures.targets import class_path

    with pytest.raises(LexportError) as err:
        export(target_ckpts["convnet"], module=class_path("convnet"), formats=["openvino"], output_dir=tmp_path,
               precision="fp16", atol=1e-9, rtol=0.0, keep_failed=True)
    assert err.value.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convnet.FAILED.bin", "convnet.FAILED.xml"]


# ----------------------------------------------------------------------------------------------------------------
# LiteRT
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", tiered(["convnet", "transformer"], fast=["convnet"]))
def test_tflite(target_ckpts, tmp_path, name):
    """Verified by lexport with the LiteRT interpreter, re-run here with it on fresh inputs; static shapes (int64
    tokens become int32 inputs); two exports are byte-identical."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    a = lexport(target_ckpts, name, ["tflite"], tmp_path / "a")["tflite"]
    path = tmp_path / "a" / f"{name}.tflite"
    assert a.path == str(path) and not a.companions
    assert path.read_bytes()[4:8] == b"TFL3"
    assert "static" in a.info["shapes"]
    m = rebuilt(target_ckpts, name)
    assert a.info["input_shapes"] == [list(m.example_input_array.shape)]
    x = fresh(m)
    assert drift(run_tflite(path, x), m, x, 1e-4, 1e-4) < 1e-4
    if name == "convnet":  # the cheaper one
        lexport(target_ckpts, name, ["tflite"], tmp_path / "b")
        assert (tmp_path / "b" / path.name).read_bytes() == path.read_bytes()


def test_what_the_runtimes_cannot_express(target_ckpts, tmp_path):
    """LiteRT has no float16 compute: --precision fp16 is exit 5 with the converter's own reason and nothing
    written; bf16 is refused for both formats (exit 2)."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("openvino")
    from fixtures.targets import class_path

    with pytest.raises(LexportError) as err:
        export(target_ckpts["wide_mlp"], module=class_path("wide_mlp"), formats=["tflite"], output_dir=tmp_path,
               precision="fp16")
    assert err.value.exit_code == 5
    (a,) = err.value.report.artifacts
    assert a.error.exit_code == 5 and "litert_torch.convert failed" in str(a.error)
    assert "f16" in str(a.error)  # the converter's reason: an op that takes no float16
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LexportError) as err:
        export(target_ckpts["wide_mlp"], module=class_path("wide_mlp"), formats=["openvino", "tflite"],
               output_dir=tmp_path, precision="bf16")
    # Refused before any slow work, by what each format declares (its own reason).
    assert err.value.exit_code == 2 and "--to openvino takes --precision fp16, not bf16" in str(err.value)
    assert err.value.report.artifacts == []
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# lexport verify, the manifest, missing extras
# ----------------------------------------------------------------------------------------------------------------


def test_verify_and_manifest(target_ckpts, tmp_path):
    """openvino with --dynamic-batch and a manifest (tflite refuses it: a run of its own); `lexport verify --manifest`
    passes; `lexport verify` detects each
    format from the content under other names; a changed .bin fails verification (exit 1)."""
    pytest.importorskip("openvino")
    pytest.importorskip("litert_torch")
    from fixtures.targets import class_path

    out = tmp_path / "dist"
    manifest = out / "manifest.json"
    # tflite takes static shapes only: --dynamic-batch with it is exit 2, so it is exported in a run of its own.
    res = invoke(target_ckpts["convnet"], "--module", class_path("convnet"), "--to", "openvino,tflite",
                 "--dynamic-batch", "--output-dir", out)
    assert res.code == 2 and "tflite takes static shapes only" in res.stderr, res
    assert invoke(target_ckpts["convnet"], "--module", class_path("convnet"), "--to", "tflite", "--output-dir",
                  out).code == 0
    res = invoke(target_ckpts["convnet"], "--module", class_path("convnet"), "--to", "openvino",
                 "--dynamic-batch", "--output-dir", out, "--manifest", manifest, "--json")
    assert res.code == 0, res
    recorded = {a["format"]: a for a in json.loads(manifest.read_text())["artifacts"]}
    assert recorded["openvino"]["companions"] == ["convnet.bin"]
    res = invoke("verify", "--manifest", manifest, target_ckpts["convnet"], "--json")  # the checkpoint is outside
    assert res.code == 0, res
    checked = {a["format"]: a for a in res.json()["artifacts"]}
    assert checked["openvino"]["verification"]["inputs_checked"] == 8  # --dynamic-batch from the manifest
    assert checked["openvino"]["companions"] == ["convnet.bin"] or checked["openvino"]["companions"][0].endswith(
        "convnet.bin")

    other = tmp_path / "renamed"
    other.mkdir()
    shutil.copy(out / "convnet.xml", other / "ir.model")
    shutil.copy(out / "convnet.bin", other / "ir.bin")
    shutil.copy(out / "convnet.tflite", other / "edge.model")
    assert detect_format(other / "ir.model").name == "openvino"
    assert detect_format(other / "edge.model").name == "tflite"
    res = invoke("verify", other / "ir.model", other / "edge.model", target_ckpts["convnet"], "--module",
                 class_path("convnet"), "--json")
    assert res.code == 0, res
    assert sorted(a["format"] for a in res.json()["artifacts"]) == ["openvino", "tflite"]

    data = bytearray((other / "ir.bin").read_bytes())
    data[64] ^= 0x01
    (other / "ir.bin").write_bytes(bytes(data))
    res = invoke("verify", other / "ir.model", target_ckpts["convnet"], "--module", class_path("convnet"), "--json")
    assert res.code == 1, res
    assert "ir.bin is not the weights file written with ir.model" in res.stdout


@pytest.mark.parametrize(
    "fmt,modules,pip",
    [
        ("openvino", ("openvino",), "pip install 'lightning-export[openvino]'"),
        ("tflite", ("litert_torch",), "pip install 'lightning-export[litert]'"),
        ("tflite", ("ai_edge_litert", "ai_edge_litert.interpreter"), "pip install 'lightning-export[litert]'"),
    ],
)
def test_missing_extra_says_what_to_install(monkeypatch, target_ckpts, tmp_path, fmt, modules, pip):
    for mod in modules:
        monkeypatch.setitem(sys.modules, mod, None)  # what `import openvino` does when it is not installed
    from fixtures.targets import class_path

    with pytest.raises(LexportError) as err:
        export(target_ckpts["convnet"], module=class_path("convnet"), formats=[fmt], output_dir=tmp_path)
    assert err.value.exit_code == 2  # checked with the flags, before any slow work
    assert pip in str(err.value)
    assert list(tmp_path.iterdir()) == []
