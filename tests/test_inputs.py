"""--input specs: integer value ranges, and integer inputs that cover the vocabulary of the first embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_export.errors import UsageError
from lightning_export.inputs import embedding_vocabulary, from_specs, parse_input_spec, random_like


def test_integer_range_in_the_spec() -> None:
    spec = parse_input_spec("int64[4,64]:0..30000")
    assert (spec.low, spec.high) == (0, 30000) and str(spec) == "int64[4,64]:0..30000"
    t = from_specs([spec], seed=0).args[0]
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 30000
    assert int(t.max()) > 1000, "values span the range, not 0..9"
    again = random_like(from_specs([spec], seed=0), seed=1).args[0]
    assert int(again.max()) > 1000, "random verification inputs keep the example's range"


@pytest.mark.parametrize("bad", ["float32[2]:0..3", "int64[2]:5..1", "int64[2]:a..b"])
def test_bad_ranges_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_input_spec(bad)


def test_default_integer_range_covers_the_first_embedding() -> None:
    module = nn.Sequential(nn.Embedding(30000, 8), nn.Linear(8, 2))
    vocab = embedding_vocabulary(module)
    assert vocab == 30000
    t = from_specs([parse_input_spec("int64[4,64]")], seed=0, int_high=vocab).args[0]
    assert int(t.max()) > 1000 and int(t.max()) < 30000
    assert embedding_vocabulary(nn.Linear(2, 2)) is None
    assert int(from_specs([parse_input_spec("int64[4,64]")], seed=0).args[0].max()) <= 9


# ---- ONNX graph names ----------------------------------------------------------------------------------------


def _graph_names(path) -> tuple[list[str], list[str]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]


def test_onnx_default_names_come_from_forward_and_the_outputs(ckpts, tmp_path) -> None:
    from conftest import invoke

    res = invoke(ckpts["multi_input"], "--module", "fixtures.modules:MultiInputTupleOutput", "--to", "onnx",
                 "-o", tmp_path / "m.onnx", "--json")
    assert res.code == 0, res
    assert _graph_names(tmp_path / "m.onnx") == (["x", "y"], ["output_0", "output_1"])
    info = res.json()["artifacts"][0]["info"]
    assert (info["inputs"], info["outputs"]) == (["x", "y"], ["output_0", "output_1"])


def test_custom_onnx_names_reach_the_graph_the_report_and_the_manifest(ckpts, tmp_path) -> None:
    import json

    from conftest import invoke, run_lexport

    res = invoke(ckpts["multi_input"], "--module", "fixtures.modules:MultiInputTupleOutput", "--to", "onnx",
                 "-o", tmp_path / "m.onnx", "--input-names", "features", "--input-names", "extra",
                 "--output-names", "score,box", "--manifest", tmp_path / "m.json", "--json")
    assert res.code == 0, res
    assert _graph_names(tmp_path / "m.onnx") == (["features", "extra"], ["score", "box"])
    info = res.json()["artifacts"][0]["info"]
    assert (info["inputs"], info["outputs"]) == (["features", "extra"], ["score", "box"])
    options = json.loads((tmp_path / "m.json").read_text())["options"]
    assert (options["input_names"], options["output_names"]) == (["features", "extra"], ["score,box"])
    # The checkpoint lies outside the manifest's folder: named on the command line.
    res = run_lexport("verify", "--manifest", tmp_path / "m.json", ckpts["multi_input"], "--json")
    assert res.code == 0, res
    assert res.json()["artifacts"][0]["verification"]["passed"] is True


def test_onnx_names_that_do_not_fit_are_usage_errors(ckpts, tmp_path) -> None:
    from conftest import invoke

    common = (ckpts["multi_input"], "--module", "fixtures.modules:MultiInputTupleOutput", "--to", "onnx",
              "--output-dir", tmp_path)
    res = invoke(*common, "--input-names", "only_one")
    assert res.code == 2, res
    assert "--input-names gives 1 name; the graph has 2 input tensors" in res.stderr
    assert "--input-names x,y" in res.stderr  # the defaults, ready to edit
    res = invoke(*common, "--output-names", "a,a")
    assert res.code == 2 and "a given twice" in res.stderr, res
    res = invoke(*common, "--input-names", "a,,b")
    assert res.code == 2 and "a name is empty" in res.stderr, res
    res = invoke(ckpts["classifier"], "--to", "safetensors", "--output-dir", tmp_path, "--output-names", "y")
    assert res.code == 2 and "it needs --to onnx" in res.stderr, res
    assert list(tmp_path.iterdir()) == []


def test_ort_runner_feeds_by_name_when_the_exporter_dropped_an_unused_input(tmp_path) -> None:
    """The TorchScript-based exporter drops inputs the graph does not use; the runner must not shift the rest."""
    from lightning_export.formats import ExportContext
    from lightning_export.formats import onnx as onnx_format
    from lightning_export.formats.onnx import OnnxOptions
    from lightning_export.inputs import Inputs

    class IgnoresB(nn.Module):
        def forward(self, a, b, c):
            return a * 2 + c

    example = Inputs((torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)), {})
    ctx = ExportContext(target=IgnoresB(), state_dict={}, example=example, options=OnnxOptions(opset=17))
    written = onnx_format.write(ctx, tmp_path / "m.onnx")
    assert written.exporter == "torch.onnx.torchscript" and written.info["inputs"] == ["a", "c"]
    assert any("dropped" in n and "b" in n for n in written.notes)
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    (out,) = onnx_format.load(tmp_path / "m.onnx")(a, b, c)
    torch.testing.assert_close(out, a * 2 + c)


def test_default_onnx_names_flatten_dicts_and_never_clash() -> None:
    from lightning_export.formats.onnx import io_names
    from lightning_export.inputs import Inputs

    class M(nn.Module):
        def forward(self, batch, output):
            return {"logits": batch["x"], "aux": (output, output)}

    example = Inputs(({"x": torch.zeros(1), "m": [torch.zeros(1), 3]},), {"output": torch.zeros(1)})
    out = M()(*example.args, **example.kwargs)
    assert io_names(M(), example, out, [], []) == (("batch_x", "batch_m_0", "output"), ("logits", "aux_0", "aux_1"))
    assert io_names(M(), example, torch.zeros(1), [], []) == (("batch_x", "batch_m_0", "output"), ())
    with pytest.raises(UsageError, match="both an input and an output name"):
        io_names(M(), example, torch.zeros(1), [], ["batch_x"])


# --example-inputs files are loaded like checkpoints (data.files.load_tensor_file): weights_only, bounded, CRC-checked
def test_example_inputs_file_is_used_for_export_and_verification(ckpts, tmp_path) -> None:
    from conftest import invoke

    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    torch.save((x,), tmp_path / "ex.pt")
    res = invoke(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--attr", "model",
                 "--to", "onnx", "--example-inputs", tmp_path / "ex.pt", "--output-dir", tmp_path / "out", "--json")
    assert res.code == 0, res
    import onnx

    graph = onnx.load(str(tmp_path / "out" / "classifier.onnx")).graph  # exported at the file's batch of 3
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [3, 10]


@pytest.mark.parametrize("make", ["expanded", "global"])
def test_hostile_example_inputs_files_are_refused(ckpts, tmp_path, make) -> None:
    """A 2 kB file claiming 4 GB, or naming a global, is exit 2 naming the flag; nothing is written."""
    import hostile as H
    import hostile_pickle as P
    from conftest import invoke

    path = tmp_path / "ex.pt"
    if make == "expanded":
        torch.save((torch.zeros(1).expand(10**9),), path)
        assert path.stat().st_size < 4096
    else:
        H.save_with_fragment(path, P.call("os", "system", "touch PWNED"), where="top")
    res = invoke(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--attr", "model",
                 "--to", "onnx", "--example-inputs", path, "--output-dir", tmp_path / "out", "--json")
    assert res.code == 2, res
    message = res.json()["error"]["message"]
    assert message.startswith(f"--example-inputs {path}"), message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
