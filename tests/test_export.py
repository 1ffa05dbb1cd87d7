"""End to end: real checkpoints → every format → each artifact loaded by its own runtime and compared
with a reference module that the test builds itself (independently of lexport's builder)."""

from __future__ import annotations

import pytest
import torch
from conftest import available_formats, invoke

from lightning_export import LexportError, export

GRAPH = ["torchscript", "onnx", "exported-program"]
ALL = ["state-dict", "safetensors", *GRAPH]


def reference(ckpts, name: str, attr: str | None = None):
    """The trained module rebuilt by hand, as the tutorials do: make, load_state_dict, eval."""
    from fixtures.make_checkpoints import FIXTURES

    m = FIXTURES[name].make_module()
    sd = torch.load(ckpts[name], weights_only=True)["state_dict"]
    m.load_state_dict(sd)
    m.eval()
    return m.get_submodule(attr) if attr else m, {k: v for k, v in sd.items()}


def run_artifact(fmt: str, path: str):
    if fmt == "torchscript":
        return torch.jit.load(path)
    if fmt == "exported-program":
        return torch.export.load(path).module()
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

        def call(*args):
            leaves = torch.utils._pytree.tree_leaves(args)
            feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), leaves)}
            return [torch.from_numpy(o) for o in sess.run(None, feed)]

        return call
    raise AssertionError(fmt)


def leaves(x):
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def assert_same_outputs(fmt, path, ref, inputs, atol=1e-4, rtol=1e-3):
    art = run_artifact(fmt, path)
    with torch.no_grad():
        expected = leaves(ref(*inputs))
    got = leaves(art(*inputs))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.to(e.dtype), e, atol=atol, rtol=rtol)


def fresh_like(example, seed=123):
    g = torch.Generator().manual_seed(seed)

    def make(t):
        if t.dtype.is_floating_point:
            return torch.randn(t.shape, generator=g).to(t.dtype)
        return torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=g).to(t.dtype)

    return torch.utils._pytree.tree_map(make, example)


SEED_CASES = [
    ("classifier", "MyClassifierModule", "model"),
    ("classifier", "MyClassifierModule", None),
    ("encoder_decoder", "EncoderDecoderLightning", None),
    ("encoder_decoder", "EncoderDecoderLightning", "encoder"),
    ("configurable", "ConfigurableLightning", "nested_model"),
    ("shared_block", "ExternalInjection", None),
]


@pytest.mark.parametrize("name,cls,attr", SEED_CASES, ids=[f"{c[0]}-{c[2]}" for c in SEED_CASES])
def test_seed_modules_every_format(ckpts, tmp_path, name, cls, attr):
    report = export(
        ckpts[name], module=f"fixtures.modules:{cls}", attr=attr, formats=ALL, output_dir=tmp_path
    )
    assert report.ok
    ref, ckpt_sd = reference(ckpts, name, attr)
    prefix = f"{attr}." if attr else ""
    expected_sd = {k[len(prefix):]: v for k, v in ckpt_sd.items() if k.startswith(prefix)}
    by_fmt = {a.format: a for a in report.artifacts}
    assert set(by_fmt) == set(ALL)
    for a in report.artifacts:
        assert a.path and a.verification.passed, a
        assert a.path.startswith(str(tmp_path))
        assert a.verification.inputs_checked >= (4 if a.format in GRAPH else 1)

    # Weight formats: exactly the checkpoint's tensors under the prefix, prefix stripped, bit for bit.
    from safetensors.torch import load_file

    for loaded in (torch.load(by_fmt["state-dict"].path, weights_only=True), load_file(by_fmt["safetensors"].path)):
        assert list(sorted(loaded)) == sorted(expected_sd)
        for k, v in expected_sd.items():
            assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
        ref.load_state_dict(loaded, strict=True)

    example = ref.example_input_array if hasattr(ref, "example_input_array") else None
    example = example if example is not None else reference(ckpts, name)[0].example_input_array
    inputs = fresh_like(example if isinstance(example, tuple) else (example,))
    for fmt in GRAPH:
        assert_same_outputs(fmt, by_fmt[fmt].path, ref, inputs)


@pytest.mark.parametrize(
    "name,cls,attr,extra",
    [
        ("configurable", "ConfigurableLightning", "nested_model.blocks.0", ["--input", "float32[3,10]"]),
        ("heads", "HeadsModule", "heads.cls", ["--input", "float32[2,8]"]),
        ("multi_input", "MultiInputTupleOutput", None, []),
        ("dict_output", "DictOutput", None, []),
        ("heads", "HeadsModule", None, []),
        ("lstm", "LSTMModule", "model", []),
        ("tied", "TiedWeights", "model", []),
    ],
    ids=["nested-attr", "moduledict-path", "multi-input-tuple-out", "dict-out", "tuple-out", "lstm-nested-in", "tied"],
)
def test_structures_every_graph_format(ckpts, tmp_path, name, cls, attr, extra):
    args = [ckpts[name], "--module", f"fixtures.modules:{cls}", "--output-dir", tmp_path, "--json"]
    args += ["--attr", attr] if attr else []
    args += [a for f in GRAPH for a in ("--to", f)] + extra
    res = invoke(*args)
    assert res.code == 0, res
    doc = res.json()
    assert doc["ok"] and doc["attr"] == attr
    ref, _ = reference(ckpts, name, attr)
    if extra:
        shape = [int(d) for d in extra[1].split("[")[1].rstrip("]").split(",")]
        inputs = (torch.randn(shape),)
    else:
        ex = reference(ckpts, name)[0].example_input_array
        inputs = fresh_like(ex if isinstance(ex, tuple) else (ex,))
    for art in doc["artifacts"]:
        assert art["verification"]["passed"]
        assert_same_outputs(art["format"], art["path"], ref, inputs)


def test_tied_weights_safetensors_keeps_every_key(ckpts, tmp_path):
    from safetensors.torch import load_file

    report = export(ckpts["tied"], attr="model", formats=["safetensors"], output_dir=tmp_path)
    sd = load_file(report.artifacts[0].path)
    assert {"embed.weight", "head.weight"} <= set(sd)
    assert torch.equal(sd["embed.weight"], sd["head.weight"])
    ref, _ = reference(ckpts, "tied", "model")
    ref.load_state_dict(sd, strict=True)


def test_batchnorm_dropout_exported_in_eval_mode(ckpts, tmp_path):
    report = export(
        ckpts["batchnorm_dropout"], module="fixtures.modules:BatchNormDropout", formats=GRAPH, output_dir=tmp_path
    )
    ref, _ = reference(ckpts, "batchnorm_dropout")
    x = torch.randn(2, 6)  # graphs are exported for the example's batch size unless --dynamic-batch
    with torch.no_grad():
        eval_out = ref(x)
        ref.train()
        torch.manual_seed(0)
        train_out = ref(x)
        ref.eval()
    assert not torch.allclose(eval_out, train_out, atol=1e-3)  # the test can tell the modes apart
    for a in report.artifacts:
        got = leaves(run_artifact(a.format, a.path)(x))[0]
        torch.testing.assert_close(got, eval_out, atol=1e-4, rtol=1e-3)


def test_bf16_weights_stay_bf16(ckpts, tmp_path):
    report = export(ckpts["bf16"], formats=["state-dict", "safetensors"], output_dir=tmp_path)
    from safetensors.torch import load_file

    sd = torch.load(report.artifacts[0].path, weights_only=True)
    st = load_file(report.artifacts[1].path)
    assert sd and all(v.dtype == torch.bfloat16 for v in sd.values())
    assert all(v.dtype == torch.bfloat16 for v in st.values())


def test_data_dependent_branch_is_caught(ckpts, tmp_path):
    """A trace bakes in one branch of `if x.sum() > 0`; verification on random inputs must catch it."""
    res = invoke(
        ckpts["data_dependent"], "--module", "fixtures.modules:DataDependentBranch", "--attr", "model",
        "--to", "torchscript", "--output-dir", tmp_path, "--json",
    )
    assert res.code == 1, res
    doc = res.json()
    art = doc["artifacts"][0]
    assert doc["ok"] is False and doc["error"]["code"] == 1
    assert art["verification"]["passed"] is False and art["path"] is None
    assert list(tmp_path.iterdir()) == []  # nothing left at the output path

    res = invoke(
        ckpts["data_dependent"], "--module", "fixtures.modules:DataDependentBranch", "--attr", "model",
        "--to", "torchscript", "--output-dir", tmp_path, "--keep-failed",
    )
    assert res.code == 1
    assert [p.name for p in tmp_path.iterdir()] == ["data_dependent.FAILED.torchscript.pt"]


def test_data_dependent_onnx_falls_back_and_is_still_caught(ckpts, tmp_path):
    with pytest.raises(LexportError) as info:
        export(ckpts["data_dependent"], module="fixtures.modules:DataDependentBranch", attr="model",
               formats=["onnx", "exported-program"], output_dir=tmp_path)
    onnx, ep = info.value.report.artifacts
    assert onnx.exporter == "torch.onnx.torchscript"  # dynamo refused the data-dependent guard
    assert onnx.verification.passed is False
    assert any("only the branch the example input takes" in n for n in onnx.notes)
    assert ep.error.exit_code == 5 and "GuardOnDataDependent" in str(ep.error)
    # What the other format of the run did, and what can export such a forward.
    assert "In this run: onnx failed verification (torch.onnx.torchscript traced one branch)" in str(ep.error)
    assert "--torchscript-mode script" in str(ep.error)
    assert info.value.exit_code == 1  # the first failing artifact decides


def test_data_dependent_export_errors_point_at_the_users_line(ckpts, tmp_path):
    """Every torch.export-based format fails on `if x.sum() > 0:`; each error names that line of the user's file,
    says what works instead, and how to see the traceback. The failed step ends in ✗."""
    import inspect

    from fixtures.modules import Branchy

    lines, first = inspect.getsourcelines(Branchy.forward)
    line = first + next(i for i, text in enumerate(lines) if "if x.sum() > 0" in text)
    res = invoke(
        ckpts["data_dependent"], "--module", "fixtures.modules:DataDependentBranch", "--attr", "model",
        "--to", ",".join(available_formats("exported-program,executorch,aoti,torchscript")), "--torchscript-mode", "script",
        "--output-dir", tmp_path, "--json",
    )
    assert res.code == 5, res
    for art in res.json()["artifacts"]:
        if art["format"] == "torchscript":
            assert art["verification"]["passed"] is True  # scripting keeps both branches
            continue
        message = art["error"]["message"]
        assert f"fixtures/modules.py:{line} in forward: if x.sum() > 0:" in message, message
        assert "Set LEXPORT_DEBUG=1 for the full traceback." in message
        assert "In this run: " in message and "torchscript verified" in message
        assert "Traceback" not in message and len(message.splitlines()) <= 8
    res = invoke(ckpts["data_dependent"], "--module", "fixtures.modules:DataDependentBranch", "--attr", "model",
                 "--to", "exported-program", "--output-dir", tmp_path)
    assert res.code == 5
    assert "✗ exporting exported-program" in res.stderr and "✓ exporting" not in res.stderr
    assert f"modules.py:{line} in forward" in res.stderr and "LEXPORT_DEBUG=1" in res.stderr
    assert "Traceback" not in res.stderr


def test_init_arg_supplies_missing_arguments(ckpts, tmp_path):
    res = invoke(ckpts["no_hparams"], "--module", "fixtures.modules:NoHparamsClassifier", "--to", "onnx",
                 "--output-dir", tmp_path)
    assert res.code == 4
    for name in ("input_size", "hidden_size", "num_classes"):
        assert name in res.stderr
    assert "--init-arg" in res.stderr and "Traceback" not in res.stderr
    res = invoke(ckpts["no_hparams"], "--module", "fixtures.modules:NoHparamsClassifier", "--to", "onnx",
                 "--attr", "model", "--init-arg", "input_size=10", "--init-arg", "hidden_size=20",
                 "--init-arg", "num_classes=2", "--output-dir", tmp_path)
    assert res.code == 0, res


def test_wrong_init_arg_is_a_shape_mismatch(ckpts, tmp_path):
    res = invoke(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--to", "onnx",
                 "--init-arg", "hidden_size=7", "--output-dir", tmp_path)
    assert res.code == 4
    assert "model.fc1.weight" in res.stderr and "(20, 10)" in res.stderr and "(7, 10)" in res.stderr


def test_injected_submodule_via_init_args_file(ckpts, tmp_path):
    res = invoke(ckpts["injected"], "--module", "fixtures.modules:InjectedEncoderModule", "--to", "onnx",
                 "--output-dir", tmp_path)
    assert res.code == 4 and "encoder" in res.stderr
    report = export(ckpts["injected"], module="fixtures.modules:InjectedEncoderModule",
                    init_args_file="fixtures/injected_init_args.yaml", formats=["onnx", "state-dict"],
                    output_dir=tmp_path)
    ref, _ = reference(ckpts, "injected")
    x = torch.randn(2, 10)
    assert_same_outputs("onnx", report.artifacts[0].path, ref, (x,))


@pytest.mark.parametrize("name,module", [("cli", None), ("cli_plain", "fixtures.config_modules:CliModel")])
def test_lightning_cli_config(ckpts, tmp_path, name, module):
    import yaml

    config = ckpts[name].parent / name / "config.yaml"
    args = [ckpts[name], "--config", config, "--to", "exported-program", "--output-dir", tmp_path, "--json"]
    args += ["--module", module] if module else []
    res = invoke(*args)
    assert res.code == 0, res
    if module is None:  # the class came from the config's class_path
        assert res.json()["module"] == "fixtures.config_modules.CliModel"
    # The config's init_args really are used: change the width there and the checkpoint no longer fits.
    data = yaml.safe_load(config.read_text())
    section = data["model"]["init_args"] if "class_path" in data["model"] else data["model"]
    assert section["hidden"] == 12
    section["hidden"] = 99
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    res = invoke(*[edited if a == config else a for a in args], "--force")
    assert res.code == 4 and "(99, 6)" in res.stdout + res.stderr, res


def test_plain_state_dict_input(ckpts, tmp_path):
    sd = torch.load(ckpts["classifier"], weights_only=True)["state_dict"]
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    out = tmp_path / "out"
    res = invoke(plain, "--module", "fixtures.modules:MyClassifierModule", "--attr", "model", "--to", "onnx",
                 "--init-arg", "input_size=10", "--init-arg", "hidden_size=20", "--init-arg", "num_classes=2",
                 "--output-dir", out, "--json")
    assert res.code == 0, res
    assert res.json()["checkpoint"]["plain_state_dict"] is True


def test_weights_without_module_import_no_user_code(ckpts, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, json; from lightning_export import export; "
        f"r = export({str(ckpts['encoder_decoder'])!r}, attr='decoder', formats=['state-dict', 'safetensors'], "
        f"output_dir={str(tmp_path)!r}); "
        "print(json.dumps([any(m.startswith(p) for m in sys.modules) for p in ('fixtures', 'pytorch_lightning')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip().splitlines()[-1] == "[false, false]"
    sd = torch.load(tmp_path / "encoder_decoder.pt", weights_only=True)
    assert sorted(sd) == ["fc.bias", "fc.weight"]


def test_torchscript_script_mode(ckpts, tmp_path):
    report = export(ckpts["classifier"], module="fixtures.modules:MyClassifierModule", attr="model",
                    formats=["torchscript"], torchscript_mode="script", output_dir=tmp_path)
    assert report.artifacts[0].exporter == "torch.jit.script"
    assert "exported-program" in " ".join(report.artifacts[0].notes)


def test_dynamic_batch(ckpts, tmp_path):
    report = export(ckpts["classifier"], module="fixtures.modules:MyClassifierModule", attr="model",
                    formats=["onnx", "exported-program"], dynamic_batch=True, output_dir=tmp_path)
    ref, _ = reference(ckpts, "classifier", "model")
    for a in report.artifacts:
        assert a.verification.inputs_checked == 8  # example + 5 random + batches of 1 and 5 (smaller, larger)
        assert_same_outputs(a.format, a.path, ref, (torch.randn(5, 10),))


def test_existing_output_needs_force(ckpts, tmp_path):
    args = [ckpts["classifier"], "--to", "state-dict", "--attr", "model", "--output-dir", tmp_path]
    assert invoke(*args).code == 0
    res = invoke(*args)
    assert res.code == 6 and "--force" in res.stderr
    assert invoke(*args, "--force").code == 0


def test_forward_failure_names_the_inputs_and_their_origin(ckpts, tmp_path):
    res = invoke(ckpts["heads"], "--module", "fixtures.modules:HeadsModule", "--attr", "heads.cls", "--to", "onnx",
                 "--output-dir", tmp_path)
    # heads.cls has no example of its own; the LightningModule's (2, 6) does not fit it: a clear module error.
    assert res.code == 4 and "float32[2, 6]" in res.stderr and "--input" in res.stderr
    assert "the LightningModule's example_input_array" in res.stderr


def test_unknown_attr_lists_children(ckpts, tmp_path):
    res = invoke(ckpts["configurable"], "--module", "fixtures.modules:ConfigurableLightning",
                 "--attr", "nested_model.blokcs", "--to", "onnx", "--output-dir", tmp_path)
    assert res.code == 4 and "blocks (ModuleList)" in res.stderr


def test_meta_build_keeps_non_persistent_buffers(ckpts, tmp_path):
    report = export(ckpts["non_persistent"], module="fixtures.modules:NonPersistentBuffer", formats=GRAPH,
                    output_dir=tmp_path)
    assert not any("built normally" in n for n in report.notes)
    ref, _ = reference(ckpts, "non_persistent")
    assert_same_outputs("onnx", report.artifacts[1].path, ref, (torch.randn(2, 4),))


def test_module_that_cannot_be_built_on_meta_falls_back(ckpts, tmp_path):
    report = export(ckpts["reads_weights"], module="fixtures.modules:ReadsWeightsInInit",
                    formats=["exported-program"], output_dir=tmp_path)
    assert any("built normally" in n and "meta" in n for n in report.notes)
    ref, _ = reference(ckpts, "reads_weights")
    assert_same_outputs("exported-program", report.artifacts[0].path, ref, (torch.randn(2, 4),))


def test_compare_tensor_maps_catches_one_flipped_bit():
    from lightning_export.compare import compare_tensor_maps

    a = {"w": torch.randn(100), "b": torch.zeros(3, dtype=torch.bfloat16)}
    b = {k: v.clone() for k, v in a.items()}
    assert compare_tensor_maps(a, b).passed
    b["w"].view(torch.int32)[17] ^= 1
    v = compare_tensor_maps(a, b)
    assert not v.passed and "w: values differ" in v.problems
    assert not compare_tensor_maps(a, {"w": a["w"], "b": a["b"].float()}).passed
    assert not compare_tensor_maps(a, {"w": a["w"]}).passed


def test_onnx_opset_below_18_is_honoured(ckpts, tmp_path):
    import onnx

    report = export(ckpts["classifier"], module="fixtures.modules:MyClassifierModule", attr="model",
                    formats=["onnx"], opset=17, output_dir=tmp_path)
    art = report.artifacts[0]
    model = onnx.load(art.path)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert art.info["opset"] == 17 and art.exporter == "torch.onnx.torchscript"
    assert art.info["inputs"] == [i.name for i in model.graph.input]


def test_dynamic_batch_axis_is_named_batch(ckpts, tmp_path):
    import onnx

    report = export(ckpts["multi_input"], module="fixtures.modules:MultiInputTupleOutput", formats=["onnx"],
                    dynamic_batch=True, output_dir=tmp_path)
    graph = onnx.load(report.artifacts[0].path).graph
    assert {i.type.tensor_type.shape.dim[0].dim_param for i in graph.input} == {"batch"}


def test_format_names_are_forgiving_but_never_guessed(ckpts, tmp_path):
    res = invoke(ckpts["classifier"], "--attr", "model", "--to", "state-dict,SafeTensors", "--output-dir", tmp_path)
    assert res.code == 0, res
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.pt", "classifier.safetensors"]
    res = invoke(ckpts["classifier"], "--to", "onxx", "--output-dir", tmp_path)
    assert res.code == 2 and "Did you mean --to onnx?" in res.stderr


def test_mistyped_init_arg_is_an_error(ckpts, tmp_path):
    res = invoke(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--to", "onnx",
                 "--init-arg", "num_clases=2", "--output-dir", tmp_path)
    assert res.code == 4 and "num_clases" in res.stderr and "did you mean 'num_classes'" in res.stderr


def test_wrong_module_class_is_called_out(ckpts, tmp_path):
    res = invoke(ckpts["classifier"], "--module", "fixtures.modules:HeadsModule", "--to", "onnx",
                 "--output-dir", tmp_path)
    assert res.code == 4 and "no tensor name in common" in res.stderr


def test_missing_module_names_only_the_formats_that_need_it(ckpts, tmp_path):
    res = invoke(ckpts["classifier"], "--to", "onnx", "--to", "safetensors", "--output-dir", tmp_path)
    assert res.code == 2 and "--to onnx needs" in res.stderr and "--to safetensors" not in res.stderr


def test_dynamic_batch_with_batch_one_is_refused_up_front(ckpts, tmp_path):
    res = invoke(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--attr", "model",
                 "--to", "exported-program", "--dynamic-batch", "--input", "float32[1,10]", "--output-dir", tmp_path)
    assert res.code == 2 and "batch of 2 or more" in res.stderr


def test_non_finite_weights_warn_or_fail(ckpts, tmp_path):
    ckpt = torch.load(ckpts["classifier"], weights_only=True)
    ckpt["state_dict"]["model.fc2.bias"][0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    res = invoke(bad, "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path / "a", "--json")
    assert res.code == 0, res
    doc = res.json()
    assert any("model.fc2.bias" not in w and "fc2.bias" in w for w in doc["warnings"])
    res = invoke(bad, "--module", "fixtures.modules:MyClassifierModule", "--attr", "model", "--to", "onnx",
                 "--output-dir", tmp_path / "b", "--strict-finite")
    assert res.code == 4 and "NaN" in res.stderr
    assert not (tmp_path / "b" / "nan.onnx").exists()
