"""`lexport inspect`: what a checkpoint holds, without user code, from metadata."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import Result, run_lexport

from lightning_export.pipeline.inspection import inspect_checkpoint


def test_inspect_json_reports_step_hparams_and_submodules(ckpts: dict) -> None:
    ckpt = Path(ckpts["classifier"])
    raw = torch.load(str(ckpt), weights_only=True)
    res = run_lexport("inspect", ckpt, "--json")
    assert res.code == 0, res
    s = json.loads(res.stdout)
    assert s["ok"] is True
    assert (s["epoch"], s["global_step"]) == (raw["epoch"], raw["global_step"])
    assert s["hparams"] == {k: v for k, v in raw["hyper_parameters"].items()}
    paths = {n["path"]: n for n in s["submodules"]}
    expected_top = {k.split(".")[0] for k in raw["state_dict"]}
    assert expected_top <= set(paths)
    model = paths["model"]
    model_sd = {k: v for k, v in raw["state_dict"].items() if k.startswith("model.")}
    assert model["tensors"] == len(model_sd)
    assert model["elements"] == sum(t.numel() for t in model_sd.values())
    assert model["bytes"] == sum(t.numel() * t.element_size() for t in model_sd.values())
    opt_bytes = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for state in raw["optimizer_states"]
        for per_param in state["state"].values()
        for t in per_param.values()
        if isinstance(t, torch.Tensor)
    }
    assert s["not_weights"]["optimizer_states"]["bytes"] == sum(opt_bytes.values())
    assert "--attr model" in s["suggestion"]


def test_inspect_imports_no_user_code(ckpts: dict) -> None:
    code = (
        "import sys; sys.argv=['lexport','inspect',{!r},'--json'];"
        "from lightning_export.cli import _subcommand;"
        "_subcommand('inspect')(args=sys.argv[2:], standalone_mode=False);"
        "print('LOADED', [m for m in ('fixtures.modules','pytorch_lightning','lightning') if m in sys.modules],"
        " file=sys.stderr)"
    ).format(str(ckpts["classifier"]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in proc.stderr, proc.stderr[-2000:]


def test_inspect_human_output_and_unplain_hparams(tmp_path: Path) -> None:
    x: list = [1]
    for _ in range(64):
        x = [x, x]  # 2**64 paths: shown by its type, in bounded time
    path = tmp_path / "run.ckpt"
    torch.save(
        {"state_dict": {"net.encoder.0.weight": torch.ones(4, 3), "net.head.bias": torch.zeros(2)}, "epoch": 2,
         "global_step": 7, "pytorch-lightning_version": "2.6.0",
         "hyper_parameters": {"lr": 0.1, "layers": [1, 2], "shared": x, "_class_path": "pkg.models.Net"}},
        str(path),
    )
    s = inspect_checkpoint(path)
    assert s["hparams"] == {"lr": 0.1, "layers": [1, 2]}
    assert s["hparams_objects"] == {"shared": "list"}
    assert s["class_path"] == "pkg.models.Net"
    assert "--module pkg.models:Net --attr net" in s["suggestion"]
    assert [n["path"] for n in s["submodules"]] == ["net", "net.encoder", "net.encoder.0", "net.head"]
    res = invoke_inspect(path)
    assert res.code == 0, res
    assert "net.encoder" in res.stderr and "global_step 7" in res.stderr


def invoke_inspect(*args: object):
    from typer.testing import CliRunner

    from lightning_export.cli import _subcommand

    res = CliRunner().invoke(_subcommand("inspect"), [str(a) for a in args], catch_exceptions=False)
    return Result(res.exit_code, res.stdout, res.stderr)


def test_a_checkpoint_named_inspect_is_reachable(ckpts: dict, tmp_path: Path) -> None:
    shutil.copy(ckpts["classifier"], tmp_path / "inspect")
    res = run_lexport("./inspect", "--to", "safetensors", "--attr", "model", "-o", tmp_path / "w.safetensors",
                      cwd=tmp_path)
    assert res.code == 0, res
    assert (tmp_path / "w.safetensors").is_file()
