"""`--dynamic SPEC`: dims of any size exported as asked, verified by lexport at other sizes, re-run
here in each runtime at sizes lexport's verification did not use; modules that bake a size in never exit 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import installed, invoke
from torch import nn

from lightning_export import export
from lightning_export.dynamic import parse_dynamic, resolve
from lightning_export.errors import LexportError, UsageError
from lightning_export.inputs import Inputs


@pytest.fixture(scope="session")
def dyn_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fixtures.dynamic_modules import make_dynamic_checkpoints

    return make_dynamic_checkpoints(tmp_path_factory.mktemp("dynamic-ckpts"))


def _export(dyn_ckpts, name, formats, out, dynamic, **kw):
    """export(); the report and the exit code (0, or the error's)."""
    from fixtures.dynamic_modules import class_path

    try:
        return export(dyn_ckpts[name], module=class_path(name), formats=formats, output_dir=out, dynamic=dynamic,
                      **kw), 0
    except LexportError as e:
        return e.report, e.exit_code


def _rebuilt(dyn_ckpts, name):
    from fixtures.dynamic_modules import rebuild

    return rebuild(name, dyn_ckpts[name])


def _checked(artifact) -> set[tuple[int, ...]]:
    return {tuple(s["shapes"][0]) for s in artifact.verification.to_json()["shapes_checked"]}


def _run(fmt: str, path: str, x: torch.Tensor) -> torch.Tensor:
    """The artifact run by its own runtime, not by lexport's runners."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    if fmt == "exported-program":
        return torch.export.load(path).module()(x)
    if fmt == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(ov.Core().read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return torch.from_numpy(compiled([x.numpy()])[0])
    raise AssertionError(fmt)


GRAPHS = ["onnx", "exported-program", *(["openvino"] if installed("openvino") else [])]


# ---------------------------------------------------------------------------------------------------------------
# The spec: parsed once, resolved against the example, the other sizes derived from it
# ---------------------------------------------------------------------------------------------------------------
class TwoInputs(nn.Module):
    def forward(self, input_ids, batch):
        return input_ids.float().sum(-1) + batch["mask"].float().sum(-1)


def _two():
    ids = torch.randint(0, 9, (2, 16))
    return TwoInputs(), Inputs((ids, {"mask": torch.ones(2, 16)}), {})


@pytest.mark.parametrize("text, needle", [
    ("0,x", "'x' is not a dim"),
    ("1:5..2", "5..2 is empty"),
    ("=0", "not an input name"),
    ("0,1:..0", "MAX must be >= 1"),
])
def test_malformed_specs_are_usage_errors(text, needle):
    with pytest.raises(UsageError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        parse_dynamic([text])


@pytest.mark.parametrize("text, needle", [
    ("tokens=1", "no input is called 'tokens'"),
    ("input_ids=2", "dim 2 is out of range"),
    ("7", "dim 7 is out of range"),
    ("1:20..30", "outside its range 20..30"),
])
def test_specs_that_do_not_fit_the_example_are_usage_errors(text, needle):
    module, example = _two()
    with pytest.raises(UsageError, match=needle):
        resolve(parse_dynamic([text]), module, example)


def test_size_one_example_dims_are_refused_up_front():
    module = TwoInputs()
    example = Inputs((torch.zeros(1, 16, dtype=torch.long), {"mask": torch.ones(1, 16)}), {})
    with pytest.raises(UsageError, match="batch of 2 or more") as e:
        resolve(parse_dynamic([], dynamic_batch=True), module, example)
    assert "--input int64[2,16]" in e.value.hint
    example = Inputs((torch.zeros(3, 1, dtype=torch.long), {"mask": torch.ones(3, 1)}), {})
    with pytest.raises(UsageError, match="size of 2 or more in dim 1") as e:
        resolve(parse_dynamic(["input_ids=1"]), module, example)
    assert "--input int64[3,2]" in e.value.hint  # the dim asked for, not the batch


def test_names_dict_keys_ties_and_the_sizes_checked():
    """NAME is a parameter or a dict key; dims of one index and one example size vary together (input_ids and
    mask share their length); each group smaller and larger alone, then all together, within the bounds."""
    module, example = _two()
    r = resolve(parse_dynamic(["input_ids=0,1:4..20", "mask=0,1"]), module, example)
    assert [(d.input, d.dim) for d in r.dims] == [("input_ids", 0), ("input_ids", 1), ("batch['mask']", 0),
                                                 ("batch['mask']", 1)]
    runs = dict(r.runs())
    assert list(runs) == [
        "input_ids/batch['mask'] dim 0 = 1", "input_ids/batch['mask'] dim 0 = 5",
        "input_ids/batch['mask'] dim 1 = 8", "input_ids/batch['mask'] dim 1 = 20",  # 2*16+1 capped at MAX 20
        "input_ids/batch['mask'] dim 0 = 1, input_ids/batch['mask'] dim 1 = 8",
        "input_ids/batch['mask'] dim 0 = 5, input_ids/batch['mask'] dim 1 = 20",
    ]
    assert runs["input_ids/batch['mask'] dim 1 = 8"] == {0: {1: 8}, 1: {1: 8}}
    # A format that plans memory (executorch) bounds the unbounded dims at 4x the example.
    bounded = r.bounded(4)
    assert [(d.max, d.max_default) for d in bounded.dims] == [(8, True), (20, False), (8, True), (64, True)]


def test_dynamic_batch_is_dynamic_zero():
    assert parse_dynamic([], dynamic_batch=True) == parse_dynamic(["0"])
    assert parse_dynamic([]) is None


# ---------------------------------------------------------------------------------------------------------------
# Exports: verified at other sizes, re-run in each runtime at sizes verification did not use
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def image_exports(dyn_ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic-image")
    report, code = _export(dyn_ckpts, "image", GRAPHS, out, ["0,2,3"])
    assert code == 0, report.to_json() if report else code
    return {a.format: a for a in report.artifacts}


@pytest.mark.parametrize("fmt", GRAPHS)
def test_conv_net_batch_height_width(image_exports, dyn_ckpts, fmt):
    """A conv net with --dynamic 0,2,3 (example 2x3x16x20): lexport checked batch, height and width smaller and
    larger, alone and together; the artifact runs here at shapes it never saw."""
    a = image_exports[fmt]
    assert a.verification.passed
    checked = _checked(a)
    assert {(1, 3, 16, 20), (5, 3, 16, 20), (2, 3, 8, 20), (2, 3, 33, 20), (2, 3, 16, 10), (2, 3, 16, 41),
            (1, 3, 8, 10), (5, 3, 33, 41)} <= checked
    assert a.info["dynamic_dims"] == [{"input": "x", "dim": d, "example": s, "min": None, "max": None}
                                      for d, s in ((0, 2), (2, 16), (3, 20))]
    m = _rebuilt(dyn_ckpts, "image")
    for shape in [(3, 3, 24, 13), (1, 3, 7, 50), (4, 3, 40, 40)]:
        assert shape not in checked
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected = m(x)
        torch.testing.assert_close(_run(fmt, a.path, x), expected, atol=1e-4, rtol=1e-4)


def test_gru_batch_and_length(dyn_ckpts, tmp_path):
    """A GRU over [B, T, F] with --dynamic 0,1: onnx and exported-program keep T dynamic (torch's while_loop
    decomposition of nn.GRU), OpenVINO through its TorchScript frontend (its own GRU sequence op); each is verified
    at other sizes and runs at lengths lexport did not check."""
    report, code = _export(dyn_ckpts, "gru", GRAPHS, tmp_path, ["0,1"])
    assert code == 0, report
    m = _rebuilt(dyn_ckpts, "gru")
    assert [a.format for a in report.artifacts] == GRAPHS
    for a in report.artifacts:
        checked = _checked(a)
        assert {(1, 12, 6), (5, 12, 6), (2, 6, 6), (2, 25, 6), (1, 6, 6), (5, 25, 6)} <= checked
        for shape in [(3, 17, 6), (1, 40, 6), (4, 2, 6)]:
            assert shape not in checked
            x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
            with torch.no_grad():
                expected = m(x)
            torch.testing.assert_close(_run(a.format, a.path, x), expected, atol=1e-4, rtol=1e-4)
    if "openvino" in GRAPHS:
        ov = next(a for a in report.artifacts if a.format == "openvino")
        assert ov.info["frontend"] == "torchscript" and ov.info["input_shapes"] == [[-1, -1, 6]]


def test_position_table_needs_its_bound(dyn_ckpts, tmp_path):
    """64 learned positions indexed by x.size(1): unbounded, no artifact (the message names the bound that works);
    with 1..64, exit 0, verified up to 33, and it runs at 64 — and the bound is what the program says."""
    report, code = _export(dyn_ckpts, "positions", ["exported-program", "onnx"], tmp_path, ["0,1"])
    assert code == 2 and not list(tmp_path.iterdir())
    for a in report.artifacts:
        assert "tokens dim 1" in str(a.error) and "--dynamic 0,1:1..64" in str(a.error)
    report, code = _export(dyn_ckpts, "positions", ["exported-program", "onnx"], tmp_path, ["0,1:1..64"])
    assert code == 0
    m = _rebuilt(dyn_ckpts, "positions")
    x = torch.randint(0, 20, (3, 64))
    for a in report.artifacts:
        assert (2, 33) in _checked(a) and a.info["dynamic_dims"][1]["max"] == 64
        with torch.no_grad():
            torch.testing.assert_close(_run(a.format, a.path, x), m(x), atol=1e-4, rtol=1e-4)


def test_reshape_to_a_literal_names_dim_one(dyn_ckpts, tmp_path):
    """x.reshape(B, 64) of [B, 16, 4]: --dynamic 0,1 is exit 2 naming dim 1 and the flag that works, from the CLI
    (one message, no traceback); --dynamic 0 exports and is verified at batches 1 and 5."""
    from fixtures.dynamic_modules import class_path

    res = invoke(dyn_ckpts["reshape"], "--module", class_path("reshape"), "--to", "exported-program",
                 "--dynamic", "0,1", "--output-dir", tmp_path)
    assert res.code == 2, res
    assert "x dim 1 = 8" in res.stderr and "--dynamic 0" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())
    report, code = _export(dyn_ckpts, "reshape", ["exported-program"], tmp_path, ["0"])
    assert code == 0 and _checked(report.artifacts[0]) >= {(1, 16, 4), (5, 16, 4)}


def test_tflite_refusal_needs_no_checkpoint(tmp_path):
    """Checked with the flags, before anything is read (the checkpoint here does not even exist)."""
    with pytest.raises(UsageError, match="LiteRT"):
        export(tmp_path / "none.ckpt", formats=["tflite"], dynamic=["0"])


def test_transformer_encoder_batch_and_length_onnx(dyn_ckpts, tmp_path):
    """nn.TransformerEncoder with --dynamic 0,1 to onnx (pytorch#117209: exported at one length, it broke at
    others): verified at lengths 5 and 21, and run here at 3 and 30."""
    report, code = _export(dyn_ckpts, "encoder", ["onnx"], tmp_path, ["0,1"])
    assert code == 0
    a = report.artifacts[0]
    assert {(2, 5), (2, 21), (1, 5), (5, 21)} <= _checked(a)
    m = _rebuilt(dyn_ckpts, "encoder")
    for shape in [(3, 3), (1, 30)]:
        x = torch.randint(0, 16, shape)
        with torch.no_grad():
            torch.testing.assert_close(_run("onnx", a.path, x), m(x), atol=1e-4, rtol=1e-4)


def test_verify_checks_the_sizes_asked_for(image_exports, dyn_ckpts, tmp_path):
    """`lexport verify --dynamic`: the dynamic program passes at the derived sizes; a program exported with a static
    height fails at another height, exit 1 naming the input, the dim and the size."""
    from fixtures.dynamic_modules import class_path
    from lightning_export import verify

    a = image_exports["exported-program"]
    report = verify([a.path], dyn_ckpts["image"], module=class_path("image"), dynamic=["0,2,3"])
    assert report.artifacts[0].verification.passed and (5, 3, 33, 41) in _checked(report.artifacts[0])
    report, code = _export(dyn_ckpts, "image", ["exported-program"], tmp_path, ["0"])
    assert code == 0
    with pytest.raises(LexportError) as e:
        verify([report.artifacts[0].path], dyn_ckpts["image"], module=class_path("image"), dynamic=["0,2"])
    assert e.value.exit_code == 1
    problems = e.value.report.artifacts[0].verification.problems
    assert any(p.startswith("x dim 2 = 8 (float32[2, 3, 8, 20]): the artifact failed") for p in problems), problems
