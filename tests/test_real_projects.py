"""Patterns of real projects: each pattern trained by a real pl.Trainer (fixtures/real_projects.py), then exported.

- `--module` with only weights formats, when the constructor needs objects the safe loader left unloaded;
- a torchmetrics Metric in hyper_parameters, loaded after one `--allow-global` line (its reduction functions);
- outputs torch.export cannot save (a namedtuple made inside a function, a dataclass, a ModelOutput-like
  OrderedDict subclass), exported as plain containers of the same leaves;
- a detector (boolean mask, nonzero, NMS in a loop, a list of dicts out): what each format says, and the part
  before the post-processing exported with --attr.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke, tiered

pytestmark = pytest.mark.filterwarnings("ignore")

MOD = "fixtures.real_projects"


@pytest.fixture(scope="module")
def p3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> checkpoint, each from a real Trainer run (2 steps)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from fixtures import real_projects as P
    from fixtures.make_checkpoints import _TRAINER_KWARGS, _quiet

    out = tmp_path_factory.mktemp("real_projects")
    g = torch.Generator().manual_seed(0)
    xy = (torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g))
    images = (torch.randn(8, 3, 8, 8, generator=g),)
    models = {
        "held": (lambda: P.HeldNetModel(P.HeldNet()), xy),
        "metric": (lambda: P.MetricLossModel(loss=P._mse()), xy),
        "namedtuple": (P.LocalNamedTupleModel, xy),
        "dataclass": (P.DataclassOutputModel, xy),
        "modeloutput": (P.ModelOutputModel, xy),
        "detector": (P.TinyDetector, images),
    }
    paths = {}
    for name, (make, tensors) in models.items():
        pl.seed_everything(0, verbose=False)
        with _quiet():
            trainer = pl.Trainer(max_steps=2, **_TRAINER_KWARGS)
            trainer.fit(make(), DataLoader(TensorDataset(*tensors), batch_size=4))
            paths[name] = out / f"{name}.ckpt"
            trainer.save_checkpoint(paths[name])
    return paths


def _report(res) -> dict:
    return json.loads(res.stdout)


# ------------------------------------------------------------------ 1. --module with only weights formats
@pytest.mark.parametrize("fmt", ["safetensors", "state-dict"])
def test_module_whose_constructor_needs_an_unloaded_object_still_exports_the_weights(p3, tmp_path, fmt) -> None:
    """The constructor takes `net`, kept in hparams (left unloaded): with --module, a weights export is what it is
    without --module (same bytes, prefix stripped by --attr), with a note saying the module was not built and why."""
    with_module = tmp_path / f"with.{fmt}"
    res = invoke(p3["held"], "--module", f"{MOD}:HeldNetModel", "--attr", "net", "--to", fmt, "-o", with_module,
                 "--json")
    assert res.code == 0, res
    report = _report(res)
    note = " ".join(n for n in report["notes"] if "not built" in n)
    assert "the module was not built" in note and "__init__ needs net" in note, report["notes"]
    assert "needs only the weights, taken as without --module" in note
    without = tmp_path / f"without.{fmt}"
    res = invoke(p3["held"], "--attr", "net", "--to", fmt, "-o", without, "--json")
    assert res.code == 0, res
    assert with_module.read_bytes() == without.read_bytes()
    assert report["artifacts"][0]["verification"]["passed"]
    # lexport verify, which shares the preparation, takes the same way
    res = invoke("verify", with_module, p3["held"], "--module", f"{MOD}:HeldNetModel", "--attr", "net")
    assert res.code == 0, res


def test_module_with_unloaded_arguments_still_fails_for_graph_formats(p3, tmp_path) -> None:
    res = invoke(p3["held"], "--module", f"{MOD}:HeldNetModel", "--attr", "net", "--to", "safetensors,onnx",
                 "--output-dir", tmp_path)
    assert res.code == 4, res
    flat = " ".join(res.stderr.split())
    assert "HeldNetModel.__init__ needs net" in flat and "--init-arg net=VALUE" in flat
    assert not list(tmp_path.iterdir())


def test_module_with_a_wrong_attr_is_refused_as_without_module(p3, tmp_path) -> None:
    res = invoke(p3["held"], "--module", f"{MOD}:HeldNetModel", "--attr", "nope", "--to", "safetensors",
                 "-o", tmp_path / "x.safetensors")
    assert res.code == 4, res
    assert "no tensors in the checkpoint start with 'nope.'" in " ".join(res.stderr.split())


# ------------------------------------------------------------------ 2. torchmetrics in hyper_parameters
REDUCERS = [f"torchmetrics.utilities.data.dim_zero_{r}" for r in ("sum", "mean", "cat", "max", "min")] + [
    "torchmetrics.metric.jit_distributed_available"
]


def test_torchmetrics_metric_in_hparams_exports_to_onnx_after_exactly_one_allow_global_line(p3, tmp_path) -> None:
    pytest.importorskip("torchmetrics")
    args = [p3["metric"], "--module", f"{MOD}:MetricLossModel", "--to", "onnx", "-o", tmp_path / "m.onnx"]
    res = invoke(*args)
    assert res.code == 4, res
    lines = [ln.strip() for ln in res.stderr.splitlines() if ln.strip().startswith("--allow-global ")]
    assert len(lines) == 1, res.stderr
    offered = lines[0].split()[1].split(",")
    assert "torchmetrics.regression.mse.MeanSquaredError" in offered
    assert {"torchmetrics.utilities.data.dim_zero_sum", "torchmetrics.metric.jit_distributed_available"} <= set(offered)
    assert "cannot be allowed" not in res.stderr
    res = invoke(*args, *lines[0].split(), "--json")
    assert res.code == 0, res
    assert _report(res)["artifacts"][0]["verification"]["passed"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randn(2, 6)  # the example's shape (static)
    from fixtures.real_projects import MetricLossModel

    model = MetricLossModel.load_from_checkpoint(p3["metric"], map_location="cpu", weights_only=False).eval()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), atol=1e-5, rtol=1e-4)


def test_allowed_reducers_are_the_real_functions_once_loaded(p3) -> None:
    """The Metric comes back as torchmetrics built it: its _reductions are dim_zero_sum itself (torchmetrics
    compares them by identity), and it computes."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.metric import jit_distributed_available
    from torchmetrics.utilities.data import dim_zero_sum

    from lightning_export.safeload.loader import safe_load
    from lightning_export.safeload.policy import import_dotted

    names = ("torchmetrics.regression.mse.MeanSquaredError", "torchmetrics.utilities.data.dim_zero_sum",
             "torchmetrics.metric.jit_distributed_available")
    obj = safe_load(p3["metric"], allowed=[import_dotted(n) for n in names], allow_globals=names)
    metric = obj["hyper_parameters"]["loss"]
    assert type(metric).__name__ == "MeanSquaredError"
    assert all(fn is dim_zero_sum for fn in metric._reductions.values())
    assert metric.distributed_available_fn is jit_distributed_available
    metric.update(torch.ones(3), torch.zeros(3))
    assert float(metric.compute()) == 1.0


class _CallsReducer:
    def __reduce__(self):
        from torchmetrics.utilities.data import dim_zero_cat

        return (dim_zero_cat, ([torch.zeros(1).expand(1000)],))


def test_a_file_that_calls_an_allowed_reducer_is_refused(tmp_path) -> None:
    """The reducers may be referred to, never called while loading: a file that calls one (here on a stride-0
    view, which could claim 10^12 elements) is exit 3, nothing written."""
    pytest.importorskip("torchmetrics")
    path = tmp_path / "calls.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"x": _CallsReducer()}}, path)
    res = invoke(path, "--to", "state-dict", "-o", tmp_path / "out.pt", "--allow-global",
                 "torchmetrics.utilities.data.dim_zero_cat")
    assert res.code == 3, res
    flat = " ".join(res.stderr.split())
    assert "calls torchmetrics.utilities.data.dim_zero_cat while loading" in flat, res.stderr
    assert "--allow-global" not in flat.split("calls", 1)[1]
    assert not (tmp_path / "out.pt").exists()


def test_reducers_pass_the_allow_global_rule_and_other_functions_still_do_not() -> None:
    pytest.importorskip("torchmetrics")
    from lightning_export.errors import UsageError
    from lightning_export.safeload.policy import allow_global_flag, hint_refusal, import_dotted

    for name in REDUCERS:
        assert callable(import_dotted(name))
        assert hint_refusal(name) is None
    assert allow_global_flag(REDUCERS) == "--allow-global " + ",".join(sorted(REDUCERS))
    for other in ("torchmetrics.utilities.data.to_onehot", "torchmetrics.functional.mean_squared_error",
                  "torchmetrics.utilities.distributed.gather_all_tensors"):
        with pytest.raises(UsageError, match="not a class"):
            import_dotted(other)
        assert hint_refusal(other)


# ------------------------------------------------------------------ 3. outputs torch.export cannot save
def _eager(ckpt: Path, cls_name: str):
    import fixtures.real_projects as P

    return getattr(P, cls_name).load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()


def test_local_namedtuple_output_exports_to_exported_program_reloaded_and_compared(p3, tmp_path) -> None:
    out = tmp_path / "nt.pt2"
    res = invoke(p3["namedtuple"], "--module", f"{MOD}:LocalNamedTupleModel", "--to", "exported-program",
                 "-o", out, "--json")
    assert res.code == 0, res
    art = _report(res)["artifacts"][0]
    assert art["verification"]["passed"] and len(art["verification"]["outputs"]) == 2
    assert any("namedtuple defined inside a function (Output)" in n and "prediction, backcast" in n
               for n in art["notes"]), art["notes"]
    (conv,) = art["info"]["output_containers"]
    assert conv["fields"] == ["prediction", "backcast"] and conv["plain"] == "tuple"
    # Reloaded by torch alone, in a fresh program: a plain tuple of the same tensors, in field order.
    program = torch.export.load(str(out)).module()
    model = _eager(p3["namedtuple"], "LocalNamedTupleModel")
    x = torch.randn(2, 6)
    got = program(x)
    assert type(got) is tuple and len(got) == 2
    want = model(x)
    torch.testing.assert_close(got[0], want.prediction.detach())
    torch.testing.assert_close(got[1], want.backcast.detach())


@pytest.mark.parametrize(("name", "cls_name", "fields"), [
    ("dataclass", "DataclassOutputModel", ["mean", "scale"]),
    ("modeloutput", "ModelOutputModel", ["logits", "probs"]),
], ids=["dataclass", "modeloutput"])
def test_dataclass_and_dict_subclass_outputs_export_as_dicts(p3, tmp_path, name, cls_name, fields) -> None:
    out = tmp_path / f"{name}.pt2"
    res = invoke(p3[name], "--module", f"{MOD}:{cls_name}", "--to", "exported-program", "-o", out, "--json")
    assert res.code == 0, res
    art = _report(res)["artifacts"][0]
    assert [o["name"] for o in art["verification"]["outputs"]] == [f"output[{f!r}]" for f in fields]
    assert art["info"]["output_containers"][0]["fields"] == fields
    got = torch.export.load(str(out)).module()(torch.ones(2, 6))
    assert type(got) is dict and list(got) == fields
    want = _eager(p3[name], cls_name)(torch.ones(2, 6))
    for f in fields:
        torch.testing.assert_close(got[f], getattr(want, f).detach())


@pytest.mark.parametrize("fmt", tiered(["executorch", "aoti"], fast=["executorch"]))
def test_namedtuple_output_exports_to_every_torch_export_format(p3, tmp_path, fmt) -> None:
    if fmt == "executorch":
        pytest.importorskip("executorch")
    elif not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("aoti needs a C++ compiler")
    res = invoke(p3["namedtuple"], "--module", f"{MOD}:LocalNamedTupleModel", "--to", fmt,
                 "--output-dir", tmp_path, "--json")
    assert res.code == 0, res
    art = _report(res)["artifacts"][0]
    assert art["verification"]["passed"] and art["info"]["output_containers"][0]["plain"] == "tuple"


def test_to_plain_keeps_what_torch_export_can_save_and_rebuilds_the_rest() -> None:
    from lightning_export.formats._containers import to_plain

    Local = collections.namedtuple("Local", "a b")

    @dataclasses.dataclass
    class D:
        x: torch.Tensor
        y: object = None

    t = torch.ones(1)
    plain = {"a": [t, (t,)], "b": t}
    found: list = []
    assert to_plain(plain, found) is plain and not found
    value = {"out": Local(t, D(t)), "rest": [Local(t, t)]}
    got = to_plain(value, found)
    assert type(got["out"]) is tuple and got["out"][1] == {"x": t, "y": None}
    assert type(got["rest"][0]) is tuple
    assert [(c.where, c.kind, c.fields) for c in found] == [
        ("output['out']", "namedtuple", ("a", "b")),
        ("output['out'][1]", "dataclass", ("x", "y")),
        ("output['rest'][0]", "namedtuple", ("a", "b")),
    ]


# ------------------------------------------------------------------ 4. detectors
def _errors(report: dict) -> dict[str, str]:
    return {a["format"]: a["error"]["message"] for a in report["artifacts"] if a.get("error")}


def test_detector_gets_messages_that_name_what_happened_and_what_works(p3, tmp_path) -> None:
    """A list of dicts whose sizes depend on the values (threshold, nonzero, NMS in a loop): no artifact that
    differs is published, each message names what happened, and the advice names submodules that export."""
    from fixtures.real_projects import TinyDetector

    eager = TinyDetector.load_from_checkpoint(p3["detector"], map_location="cpu").eval()
    with torch.no_grad():
        inputs = (eager.example_input_array, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
        passing = {int(n) for x in inputs for n in (eager.model(x)[0] > 0.5).sum(dim=1)}
    assert len(passing) > 1 and 0 not in passing, passing  # the pattern: sizes vary with the values
    res = invoke(p3["detector"], "--module", f"{MOD}:TinyDetector", "--to", "torchscript,onnx,exported-program",
                 "--output-dir", tmp_path, "--json")
    assert res.code != 0, res
    report = _report(res)
    errors = _errors(report)
    arts = {a["format"]: a for a in report["artifacts"]}
    # torchscript: tracing refuses a list of dicts, and says so
    ts = " ".join(errors["torchscript"].split())
    assert "torch.jit.trace cannot return forward's output" in ts and "a list of dicts" in ts
    assert "--attr model.backbone (TinyBackbone)" in ts
    # exported-program: a data-dependent size, not "a branch on a tensor's value"; no torch.where/cond advice
    ep = " ".join(errors["exported-program"].split())
    assert "size depends on the values" in ep and "NMS" in ep
    assert "branches on a tensor's value" not in ep and "torch.where" not in ep
    assert "--attr model (DetectorCore)" in ep and "--attr model.heads (TinyHeads)" in ep
    assert ("In this run: torchscript export failed; onnx failed verification (torch.onnx.torchscript traced the "
            "example's sizes)") in ep
    assert "In this run: onnx failed verification (torch.onnx.torchscript traced the example's sizes); " \
           "exported-program export failed" in ts
    # onnx: the TorchScript-based fallback's graph holds the example's sizes; verification refuses it
    onnx = arts["onnx"]
    assert onnx["exporter"] == "torch.onnx.torchscript" and not onnx["verification"]["passed"]
    notes = " ".join(" ".join(onnx["notes"]).split())
    assert "sizes and loop counts of the example input" in notes
    assert "holds only the branch" not in notes
    # nothing that differs was published
    assert not any(a.get("path") for a in report["artifacts"]), report["artifacts"]
    assert not list(tmp_path.glob("detector*"))


def test_detector_onnx_alone_fails_verification_with_what_works(p3, tmp_path) -> None:
    """`--to onnx` alone: the dynamo exporter refuses, the TorchScript-based fallback traces the example's
    sizes, verification fails (exit 1), and the exit-1 message says what works, as exported-program's refusal does:
    the advice is recorded by the writer (info.traced_data_dependent), not matched from message text."""
    res = invoke(p3["detector"], "--module", f"{MOD}:TinyDetector", "--to", "onnx", "--output-dir", tmp_path, "--json")
    assert res.code == 1, res
    report = _report(res)
    onnx = report["artifacts"][0]
    assert onnx["info"]["traced_data_dependent"] == "sizes" and not onnx["verification"]["passed"]
    message = " ".join(report["error"]["message"].split())
    assert message.startswith("verification failed for onnx")
    assert "size depends on the values" in message and "--attr model.backbone (TinyBackbone)" in message, message
    assert onnx["verification"]["advice"] == report["error"]["advice"] == "data-dependent-size"
    assert not list(tmp_path.glob("*.onnx"))


def test_detector_backbone_and_heads_export_with_attr(p3, tmp_path) -> None:
    """The advice works: the part before the post-processing exports to every format asked for, verified."""
    res = invoke(p3["detector"], "--module", f"{MOD}:TinyDetector", "--attr", "model",
                 "--to", "torchscript,onnx,exported-program", "--output-dir", tmp_path, "--json")
    assert res.code == 0, res
    assert all(a["verification"]["passed"] for a in _report(res)["artifacts"])
    res = invoke(p3["detector"], "--module", f"{MOD}:TinyDetector", "--attr", "model.backbone", "--to", "onnx",
                 "-o", tmp_path / "backbone.onnx")
    assert res.code == 0, res


def test_data_dependent_sizes_are_told_apart_from_value_branches() -> None:
    from lightning_export.errors import (
        DATA_DEPENDENT_SIZE_HINT,
        Advice,
        data_dependent_advice,
        is_data_dependent_size,
    )

    class Branch(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x - 1

    class Mask(torch.nn.Module):
        def forward(self, x):
            y = x[x > 0]
            return y[:3] if y.numel() > 3 else y

    caught = {}
    for cls, x in ((Branch, torch.randn(4)), (Mask, torch.randn(10))):
        with pytest.raises(Exception) as info:
            torch.export.export(cls(), (x,), strict=False)
        caught[cls.__name__] = info.value
    assert not is_data_dependent_size(caught["Branch"]) and data_dependent_advice(caught["Branch"]) is Advice.DATA_DEPENDENT_BRANCH
    assert is_data_dependent_size(caught["Mask"]) and data_dependent_advice(caught["Mask"]) is Advice.DATA_DEPENDENT_SIZE
    assert data_dependent_advice(RuntimeError("something else")) is None
    pickle.dumps(DATA_DEPENDENT_SIZE_HINT)  # plain text, usable in JSON
