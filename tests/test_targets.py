"""Deployment targets. A conv net, a Transformer-style model and a Linear-heavy MLP, trained with a real
Trainer, exported to ExecuTorch (.pte), an AOTInductor package, fp16/bf16 graphs and int8-dynamic ONNX; each verified
by lexport in its runtime, then reloaded here in that runtime and compared with the module rebuilt by hand."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from fixtures.targets import fresh_input, rebuild
from lightning_export import LexportError, export
from lightning_export.errors import UsageError
from lightning_export.formats import REGISTRY, Format, for_run, get_format
from lightning_export.formats._onnx_quantize import DYNAMIC_TOLERANCE
from lightning_export.formats._precision import (
    PRECISION_TOLERANCE,
    CastInputs,
    reduced,
)

_NEW = ("executorch", "aoti")


def _new_formats() -> dict[str, Format]:
    """Import the new format modules; until the registry loads them itself, keep them out of it between tests."""
    known = set(REGISTRY)
    out = {}
    for module in _NEW:
        importlib.import_module(f"lightning_export.formats.{module}")
        out[module] = REGISTRY[module]
        if module not in known:
            REGISTRY.pop(module)
    return out


FORMATS = _new_formats()


def lexport(monkeypatch, ckpts, name, fmt, out, *, precision=None, quantize=None, executorch_backend=None, **kw):
    """`export()` with the deployment options, as the CLI passes them."""
    from fixtures.targets import class_path

    options = {"precision": precision, "quantize": quantize, "executorch_backend": executorch_backend}
    kw.update({k: v for k, v in options.items() if v is not None})
    report = export(ckpts[name], module=class_path(name), formats=[fmt], output_dir=out, **kw)
    (artifact,) = report.artifacts
    assert artifact.ok and artifact.verification.passed, artifact
    assert artifact.path and artifact.path.startswith(str(out))
    return artifact


def rebuilt(ckpts, name):
    return rebuild(name, ckpts[name])


def fresh(module, seed=7, batch=None):
    return fresh_input(module, seed, batch)


def expected(module, x):
    with torch.no_grad():
        return module(x)


def close(got, want, atol, rtol):
    torch.testing.assert_close(got.to(torch.float32), want, atol=atol, rtol=rtol)
    return float((got.to(torch.float32) - want).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# ExecuTorch
# ----------------------------------------------------------------------------------------------------------------


def run_pte(path, x):
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method("forward")
    return method.execute([x])[0]


@pytest.mark.parametrize("name,backend", [("convnet", None), pytest.param("transformer", "portable", marks=pytest.mark.slow)])
def test_executorch(monkeypatch, target_ckpts, tmp_path, name, backend):
    pytest.importorskip("executorch")
    a = lexport(monkeypatch, target_ckpts, name, "executorch", tmp_path, executorch_backend=backend)
    assert a.path.endswith(f"{name}.pte") and not a.companions
    assert a.info["backend"] == (backend or "xnnpack")
    if backend is None:
        assert a.info["ops_delegated"] > 0  # XNNPACK took the convolutions
    else:
        assert a.info["ops_delegated"] == 0
    assert a.verification.inputs_checked == 6 and a.verification.max_abs_diff < 1e-5
    m = rebuilt(target_ckpts, name)
    x = fresh(m)
    close(run_pte(a.path, x), expected(m, x), atol=1e-5, rtol=1e-5)


def test_executorch_fp16(monkeypatch, target_ckpts, tmp_path):
    pytest.importorskip("executorch")
    a = lexport(monkeypatch, target_ckpts, "wide_mlp", "executorch", tmp_path, precision="fp16")
    assert a.info["precision"] == "fp16" and a.info["weights_dtype"] == "float16"
    m = rebuilt(target_ckpts, "wide_mlp")
    x = fresh(m)
    out = run_pte(a.path, x.half())  # the program takes and returns float16
    assert out.dtype == torch.float16
    drift = close(out, expected(m, x), *PRECISION_TOLERANCE["fp16"])
    assert 0 < drift < PRECISION_TOLERANCE["fp16"][0]


def test_executorch_missing_says_what_to_install(monkeypatch, target_ckpts, tmp_path):
    for mod in ("executorch", "executorch.exir"):
        monkeypatch.setitem(sys.modules, mod, None)  # what `import executorch` does when it is not installed
    monkeypatch.setitem(REGISTRY, "executorch", FORMATS["executorch"])
    from fixtures.targets import class_path

    with pytest.raises(LexportError) as err:
        export(target_ckpts["convnet"], module=class_path("convnet"), formats=["executorch"], output_dir=tmp_path)
    assert err.value.exit_code == 2  # checked with the flags, before any slow work
    assert "pip install 'lightning-export[executorch]'" in str(err.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# AOTInductor (one compile: tens of seconds)
# ----------------------------------------------------------------------------------------------------------------


def test_aoti_package(monkeypatch, target_ckpts, tmp_path):
    a = lexport(monkeypatch, target_ckpts, "convnet", "aoti", tmp_path, dynamic_batch=True)
    assert a.path.endswith("convnet.aoti.pt2") and not a.companions  # one file: the library is inside
    assert a.info["device"] == "cpu" and a.info["machine"]
    assert a.info["compile_seconds"] > 0
    assert a.verification.inputs_checked == 7  # example, 5 random, and a batch of 5 (aoti takes dynamic sizes >= 2)
    assert [s["run"] for s in a.verification.to_json()["shapes_checked"]][-1] == "x dim 0 = 5"
    m = rebuilt(target_ckpts, "convnet")
    package = torch._inductor.aoti_load_package(a.path)
    for batch in (2, 5):
        x = fresh(m, batch=batch)
        close(package(x), expected(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_aoti_package_fp16_transformer(monkeypatch, target_ckpts, tmp_path):
    """The second (and last) compile: a Transformer, in float16."""
    a = lexport(monkeypatch, target_ckpts, "transformer", "aoti", tmp_path, precision="fp16")
    assert a.info["precision"] == "fp16" and a.info["cpu_isa"] is not None
    m = rebuilt(target_ckpts, "transformer")
    x = fresh(m)
    out = torch._inductor.aoti_load_package(a.path)(x)
    assert out.dtype == torch.float16
    close(out, expected(m, x), *PRECISION_TOLERANCE["fp16"])


# ----------------------------------------------------------------------------------------------------------------
# fp16 / bf16
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convnet", "transformer"])
def test_fp16_exported_program(monkeypatch, target_ckpts, tmp_path, name):
    a = lexport(monkeypatch, target_ckpts, name, "exported-program", tmp_path, precision="fp16")
    assert a.info["precision"] == "fp16" and a.info["outputs_dtype"] == "float16"
    assert a.info["weights_bytes"] < a.info["weights_bytes_fp32"]
    assert (a.verification.atol, a.verification.rtol) == PRECISION_TOLERANCE["fp16"]
    assert 0 < a.verification.max_abs_diff < PRECISION_TOLERANCE["fp16"][0]  # drift is real, and reported
    program = torch.export.load(a.path)
    assert {t.dtype for t in program.state_dict.values() if t.is_floating_point()} == {torch.float16}
    m = rebuilt(target_ckpts, name)
    x = fresh(m)
    out = program.module()(x.half() if x.is_floating_point() else x)
    assert out.dtype == torch.float16
    close(out, expected(m, x), *PRECISION_TOLERANCE["fp16"])


def test_bf16_exported_program(monkeypatch, target_ckpts, tmp_path):
    a = lexport(monkeypatch, target_ckpts, "wide_mlp", "exported-program", tmp_path, precision="bf16")
    assert a.info["weights_dtype"] == "bfloat16"
    m = rebuilt(target_ckpts, "wide_mlp")
    x = fresh(m)
    out = torch.export.load(a.path).module()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    close(out, expected(m, x), *PRECISION_TOLERANCE["bf16"])


def test_bf16_onnx_fails_with_the_runtime_reason(monkeypatch, target_ckpts, tmp_path):
    with pytest.raises(LexportError) as err:
        lexport(monkeypatch, target_ckpts, "wide_mlp", "onnx", tmp_path, precision="bf16")
    (a,) = err.value.report.artifacts
    # onnxruntime has no CPU bfloat16 kernel for Gemm: the session refuses the graph, an export that cannot run
    # here (exit 5) with the runtime's reason and what runs instead.
    assert err.value.exit_code == 5 and a.error.exit_code == 5, a.error
    assert "Gemm" in str(a.error) and "bfloat16" in str(a.error), a.error
    assert "--precision fp16" in str(a.error) and "exported-program" in str(a.error), a.error
    assert not list(tmp_path.glob("*.onnx"))


def test_reduced_precision_leaves_the_module_untouched():
    from lightning_export.formats import ExportContext
    from lightning_export.inputs import Inputs

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    m[2].weight = m[0].weight  # tied
    before = {k: (v, v.clone()) for k, v in m.state_dict(keep_vars=True).items()}
    ctx = ExportContext(target=m, state_dict={}, example=Inputs((torch.randn(2, 4),), {}))
    with reduced(ctx, "fp16") as r:
        assert r.example.args[0].dtype == torch.float16
        assert m[0].weight.dtype == torch.float16 and m[2].weight is m[0].weight
        assert m[1].num_batches_tracked.dtype == torch.int64
    after = m.state_dict(keep_vars=True)
    for k, (obj, value) in before.items():
        assert after[k] is obj and torch.equal(after[k], value), k
    assert ctx.example.args[0].dtype == torch.float32


def test_cast_inputs_calls_like_the_fp32_module():
    lin = torch.nn.Linear(3, 2).half()
    call = CastInputs(lin, torch.float16)
    out = call(torch.randn(2, 3))
    assert out.dtype == torch.float32


def test_options_that_make_no_sense_are_usage_errors():
    with pytest.raises(UsageError, match="graph formats"):
        for_run(get_format("state-dict"), precision="fp16")
    with pytest.raises(UsageError, match="not supported for exported-program") as e:
        for_run(get_format("exported-program"), quantize="int8-dynamic")
    assert e.value.hint == "--quantize int8-dynamic applies to onnx."
    with pytest.raises(UsageError, match="do not combine"):
        for_run(get_format("onnx"), precision="fp16", quantize="int8-dynamic")
    with pytest.raises(UsageError, match="fp32, fp16, bf16"):
        for_run(get_format("onnx"), precision="fp8")
    # --precision fp32 is never a silent no-op: a wrapper that computes in float32 and says so (tests/test_precision.py)
    assert for_run(get_format("onnx"), precision="fp32") is not get_format("onnx")
    assert for_run(get_format("onnx")) is get_format("onnx")
    with pytest.raises(UsageError, match="graph formats"):
        for_run(get_format("safetensors"), precision="fp32")


# ----------------------------------------------------------------------------------------------------------------
# int8 dynamic quantization (ONNX)
# ----------------------------------------------------------------------------------------------------------------


def run_onnx(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name,max_ratio", [("wide_mlp", 0.4), ("transformer", 0.4), ("convnet", 1.0)])
def test_int8_dynamic_onnx(monkeypatch, target_ckpts, tmp_path, name, max_ratio):
    import onnx

    a = lexport(monkeypatch, target_ckpts, name, "onnx", tmp_path, quantize="int8-dynamic")
    assert a.info["quantize"] == "int8-dynamic"
    assert a.info["size_ratio"] <= max_ratio and a.info["bytes"] == a.bytes
    assert (a.verification.atol, a.verification.rtol) == DYNAMIC_TOLERANCE
    assert 0 < a.verification.max_abs_diff < DYNAMIC_TOLERANCE[0]
    ops = {n.op_type for n in onnx.load(a.path).graph.node}
    assert "DynamicQuantizeLinear" in ops
    assert list(tmp_path.iterdir()) == [tmp_path / f"{name}.onnx"]
    m = rebuilt(target_ckpts, name)
    x = fresh(m)
    close(run_onnx(a.path, x), expected(m, x), *DYNAMIC_TOLERANCE)


@pytest.mark.parametrize("flag", [["--precision", "fp16"], ["--quantize", "int8-dynamic"]], ids=["fp16", "int8"])
def test_verify_without_the_deployment_flag_names_it(ckpts, tmp_path, flag):
    """An fp16 or int8 ONNX file verified without the flag it was made with fails, and the message names the flag;
    with the flag it passes."""
    from conftest import invoke

    common = ["--module", "fixtures.modules:MyClassifierModule", "--attr", "model"]
    out = tmp_path / "m.onnx"
    assert invoke(ckpts["classifier"], *common, "--to", "onnx", *flag, "-o", out).code == 0
    from lightning_export.errors import VerificationError
    from lightning_export.pipeline.verify import verify

    opts = {"module": "fixtures.modules:MyClassifierModule", "attr": "model"}
    with pytest.raises(VerificationError) as info:
        verify([out], ckpts["classifier"], **opts)
    problems = info.value.report.artifacts[0].verification.problems
    assert f"m.onnx looks exported with {' '.join(flag)}: verify it with that flag" in problems[-1], problems
    option = {"precision": flag[1]} if flag[0] == "--precision" else {"quantize": flag[1]}
    assert verify([out], ckpts["classifier"], **opts, **option).artifacts[0].verification.passed
