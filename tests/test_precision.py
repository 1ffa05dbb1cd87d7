"""Modules trained with Trainer(precision="16-true"/"bf16-true") export as they are.

The checkpoints hold fp16/bf16 tensors; the modules' constructors make float32 parameters and a float32
example_input_array. Graph formats compute what load_from_checkpoint gives (the stored tensors cast into the
constructor's dtypes), weights formats keep the stored tensors bit-exact, and --precision asks for reduced precision
explicitly. Each artifact is re-run here in its own runtime against the module rebuilt by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import COMPILED_FORMATS, available_formats, invoke, tiered

from fixtures.targets import PRECISION_TARGETS, class_path, fresh_input, rebuild

STORED = {"wide_mlp_16true": torch.float16, "convnet_bf16true": torch.bfloat16, "transformer_16true": torch.float16}


@pytest.fixture(scope="session")
def precision_ckpts(tmp_path_factory):
    from fixtures.targets import make_target_checkpoints

    return make_target_checkpoints(tmp_path_factory.mktemp("precision"), list(PRECISION_TARGETS))


def _export(ckpts, name, out: Path, *formats: str, extra: tuple = ()):
    res = invoke(ckpts[name], "--module", class_path(name), *(a for f in formats for a in ("--to", f)),
                 *extra, "--output-dir", out, "--json")
    return res, (json.loads(res.stdout) if res.stdout.strip().startswith("{") else None)


def test_stored_tensors_are_reduced_precision(precision_ckpts):
    """The premise: the Trainer stored fp16/bf16 weights, and load_from_checkpoint's module is float32."""
    for name, dtype in STORED.items():
        sd = torch.load(precision_ckpts[name], weights_only=True)["state_dict"]
        assert {v.dtype for v in sd.values() if v.is_floating_point()} == {dtype}, name
        model = rebuild(name, precision_ckpts[name])
        assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("name", list(PRECISION_TARGETS))
def test_graphs_export_in_the_constructors_dtypes_with_no_flag(precision_ckpts, tmp_path, name):
    """onnx and exported-program with no flag: exit 0, a note naming the cast, float32 graphs equal to the module
    rebuilt as load_from_checkpoint builds it, on inputs lexport never saw."""
    res, report = _export(precision_ckpts, name, tmp_path, "onnx", "exported-program")
    assert res.code == 0, res
    notes = " ".join(report["notes"])
    assert "cast" in notes and str(STORED[name]).replace("torch.", "") in notes and "float32" in notes, report["notes"]
    model = rebuild(name, precision_ckpts[name])
    x = fresh_input(model)
    with torch.no_grad():
        want = model(x)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"))
    assert sess.get_inputs()[0].type == ("tensor(float)" if x.is_floating_point() else "tensor(int64)")
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)
    program = torch.export.load(str(tmp_path / f"{name}.pt2")).module()
    torch.testing.assert_close(program(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", tiered(["plain", "compiled"], fast=["plain"]))
@pytest.mark.parametrize("name", ["wide_mlp_16true", "convnet_bf16true"])
def test_every_graph_format_with_no_flag(precision_ckpts, tmp_path, name, group):
    """A 16-true and a bf16-true module to every graph format this machine has, in one run each: each verified by
    lexport against the float32 module (the compiled formats, aoti/executorch/tflite, in the slow tier)."""
    from lightning_export.formats import REGISTRY

    graph = [n for n in available_formats([n for n, f in REGISTRY.items() if f.kind == "graph"])
             if (n in COMPILED_FORMATS) == (group == "compiled")]
    res, report = _export(precision_ckpts, name, tmp_path, *graph)
    assert res.code == 0, res
    assert sorted(a["format"] for a in report["artifacts"] if a["verification"]["passed"]) == sorted(graph)


def test_precision_bf16_where_the_runtime_runs_it(precision_ckpts, tmp_path):
    """--precision bf16 on the bf16-true conv net: bfloat16 graphs for the formats whose CPU runtimes run it."""
    formats = available_formats(["exported-program", "executorch"])
    res, report = _export(precision_ckpts, "convnet_bf16true", tmp_path, *formats, extra=("--precision", "bf16"))
    assert res.code == 0, res
    assert {a["info"]["weights_dtype"] for a in report["artifacts"]} == {"bfloat16"}


def test_weights_formats_keep_the_stored_tensors(precision_ckpts, tmp_path):
    """safetensors and state-dict hold the checkpoint's fp16 tensors bit for bit, built module or not."""
    from safetensors.torch import load_file

    name = "wide_mlp_16true"
    res, _ = _export(precision_ckpts, name, tmp_path, "safetensors", "state-dict", "onnx")
    assert res.code == 0, res
    stored = torch.load(precision_ckpts[name], weights_only=True)["state_dict"]
    for got in (load_file(str(tmp_path / f"{name}.safetensors")), torch.load(tmp_path / f"{name}.pt", weights_only=True)):
        assert got.keys() == stored.keys()
        for k, v in got.items():
            assert v.dtype == torch.float16 and torch.equal(v, stored[k]), k


def test_precision_fp16_asks_for_fp16_graphs(precision_ckpts, tmp_path):
    """--precision fp16 on the 16-true module: fp16 weights in the graphs, verified by lexport."""
    name = "wide_mlp_16true"
    res, report = _export(precision_ckpts, name, tmp_path, "onnx", "exported-program", extra=("--precision", "fp16"))
    assert res.code == 0, res
    import onnx

    model = onnx.load(str(tmp_path / f"{name}.onnx"))
    assert {i.data_type for i in model.graph.initializer} == {onnx.TensorProto.FLOAT16}


def test_precision_fp32_is_never_a_silent_no_op(precision_ckpts, tmp_path):
    res, report = _export(precision_ckpts, "wide_mlp_16true", tmp_path, "onnx", extra=("--precision", "fp32"))
    assert res.code == 0, res
    assert any(n.startswith("--precision fp32:") for n in report["artifacts"][0]["notes"]), report
    assert report["artifacts"][0]["info"]["precision"] == "fp32"
    res, _ = _export(precision_ckpts, "wide_mlp_16true", tmp_path / "w", "safetensors", extra=("--precision", "fp32"))
    assert res.code == 2 and "graph formats" in res.stdout, res  # weights keep the stored tensors: said, not ignored


def test_bf16_onnx_that_onnxruntime_cannot_run_names_what_works(precision_ckpts, tmp_path):
    """onnxruntime has no CPU bfloat16 kernels for most ops: the message says which precision or format runs."""
    res, report = _export(precision_ckpts, "convnet_bf16true", tmp_path, "onnx", extra=("--precision", "bf16"))
    if res.code == 0:  # an onnxruntime that runs bf16 on CPU: then it must have been verified
        assert report["artifacts"][0]["verification"]["passed"] is True
        return
    assert res.code == 5, res
    message = report["artifacts"][0]["error"]["message"]
    assert "bfloat16" in message or "bf16" in message, message
    assert "--precision fp16" in message and "exported-program" in message, message
    assert not (tmp_path / "convnet_bf16true.onnx").exists()
