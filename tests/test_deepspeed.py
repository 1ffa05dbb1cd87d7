"""DeepSpeed checkpoint folders, written by a real pl.Trainer with Lightning's DeepSpeedStrategy.

The folders are real: fixtures/make_deepspeed.py trains MyClassifierModule for 2 steps on CPU (DeepSpeed's CPU
accelerator, gloo) with ZeRO-2 on 2 ranks and ZeRO-3 on 1 rank, then calls trainer.save_checkpoint. Beside each
folder it saves the trained module's weights and what DeepSpeed's own get_fp32_state_dict_from_zero_checkpoint
makes of the folder. Both writers run at once, in subprocesses, once per session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SLOW, Result, invoke, run_lexport

from lightning_export.errors import CheckpointError
from lightning_export.sources.deepspeed import is_deepspeed_folder, load_deepspeed, open_folder, strip_forward_prefix

pytestmark = [pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (it is in the dev extra: pip install -e '.[dev]'); these tests write real "
    "DeepSpeed checkpoints with it",
), SLOW]  # the fixture runs two real DeepSpeed trainings (ZeRO-2 on 2 processes, ZeRO-3): about 35 s

MODULE = "fixtures.modules:MyClassifierModule"
RUNS = {"zero2": ("2", "2"), "zero3": ("3", "1")}  # name -> (stage, devices)


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> the output folder of fixtures/make_deepspeed.py (NAME.ckpt/, NAME.full.pt, NAME.zero_to_fp32.pt)."""
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "fixtures" / "make_deepspeed.py"), str(out), "--stage", stage,
             "--devices", devices, "--name", name],
            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, (stage, devices) in RUNS.items()
    }
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"make_deepspeed.py {name} failed:\n{log[-4000:]}"
    return {name: out for name in RUNS}


def _folder(ds_runs: dict[str, Path], name: str) -> Path:
    return ds_runs[name] / f"{name}.ckpt"


@pytest.fixture
def zero2(ds_runs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the ZeRO-2 folder, to damage."""
    return Path(shutil.copytree(_folder(ds_runs, "zero2"), tmp_path / "zero2.ckpt"))


def _reference(ds_runs: dict[str, Path], name: str, which: str) -> dict[str, torch.Tensor]:
    """The trained module's weights ("full") or DeepSpeed's reconstruction ("zero_to_fp32"), under --attr model."""
    sd = torch.load(ds_runs[name] / f"{name}.{which}.pt", weights_only=True)
    return {k.removeprefix("model."): v for k, v in sd.items()}


def _assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k].view(torch.uint8), want[k].contiguous().view(torch.uint8)), k


# ------------------------------------------------------------------------------------- the layout
def test_layout_is_what_lightning_and_deepspeed_write(ds_runs):
    """What the module reads is what the real Trainer wrote (not a layout described from memory)."""
    z2, z3 = _folder(ds_runs, "zero2"), _folder(ds_runs, "zero3")
    assert (z2 / "latest").read_text().strip() == "checkpoint"
    assert sorted(p.name for p in (z2 / "checkpoint").iterdir()) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert sorted(p.name for p in (z3 / "checkpoint").iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    assert is_deepspeed_folder(z2) and is_deepspeed_folder(z3)
    assert not open_folder(z2).zero3 and open_folder(z3).zero3
    # ZeRO-3's model states hold placeholders only: the weights are in the optimizer partitions.
    placeholders = torch.load(z3 / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=True)
    assert all(t.numel() == 0 for t in placeholders["module"].values())


def test_zero2_state_dict_and_metadata(ds_runs):
    ds, obj = load_deepspeed(_folder(ds_runs, "zero2"), max_growth=4.0)
    assert ds.model_files == ("mp_rank_00_model_states.pt",)
    _assert_bit_equal(
        {k.removeprefix("model."): v for k, v in obj["state_dict"].items()}, _reference(ds_runs, "zero2", "full")
    )
    assert obj["global_step"] == 2 and obj["epoch"] == 1
    assert obj["hyper_parameters"] == {"input_size": 10, "hidden_size": 20, "num_classes": 2}
    assert not {"module", "optimizer", "ds_config", "param_shapes"} & set(obj)  # DeepSpeed's entries are dropped


def test_forward_module_prefix_of_old_lightning_is_stripped():
    """Lightning < 2.1 saved "_forward_module.model.fc1.weight"; only a prefix every key has is removed."""
    t = torch.zeros(1)
    assert strip_forward_prefix({"_forward_module.model.w": t, "_forward_module.b": t}) == {"model.w": t, "b": t}
    assert strip_forward_prefix({"_forward_module.w": t, "b": t}) == {"_forward_module.w": t, "b": t}


# --------------------------------------------------------------------------------------------- CLI
def test_cli_zero2_exports_equal_the_weights_and_verify(ds_runs, tmp_path):
    """lexport FOLDER --module ... --attr model --to state-dict --to safetensors --to onnx --json"""
    from safetensors.torch import load_file

    res = invoke(_folder(ds_runs, "zero2"), "--module", MODULE, "--attr", "model", "--to", "state-dict",
                 "--to", "safetensors", "--to", "onnx", "--output-dir", tmp_path, "--json")
    assert res.code == 0, res
    report = res.json()
    assert [a["verification"]["passed"] for a in report["artifacts"]] == [True] * 3
    assert report["checkpoint"]["global_step"] == 2 and report["checkpoint"]["lightning_version"]
    for want in (_reference(ds_runs, "zero2", "full"), _reference(ds_runs, "zero2", "zero_to_fp32")):
        _assert_bit_equal(torch.load(next(tmp_path.glob("*.pt")), weights_only=True), want)
        _assert_bit_equal(load_file(next(tmp_path.glob("*.safetensors"))), want)


def _invoke_subcommand(name: str, *args: object) -> Result:
    from typer.testing import CliRunner

    from lightning_export.cli import _subcommand

    res = CliRunner().invoke(_subcommand(name), [str(a) for a in args], catch_exceptions=False)
    return Result(res.exit_code, res.stdout, res.stderr)


def test_cli_inspect_and_verify_take_the_folder(ds_runs, tmp_path):
    """lexport inspect FOLDER --json; lexport verify ARTIFACT FOLDER --attr model"""
    folder = _folder(ds_runs, "zero2")
    res = _invoke_subcommand("inspect", folder, "--json")
    assert res.code == 0, res
    assert res.json()["global_step"] == 2 and res.json()["hparams"]["hidden_size"] == 20, res.stdout
    assert "zero_to_fp32" not in res.stdout + res.stderr
    assert invoke(folder, "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path).code == 0
    res = _invoke_subcommand("verify", next(tmp_path.glob("*.safetensors")), folder, "--attr", "model")
    assert res.code == 0, res


def test_optimizer_states_are_never_read(zero2, tmp_path):
    """Garbage in every optim_states file changes nothing: not the weights, not the checkpoint's sha256."""
    before = invoke(zero2, "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path / "a", "--json")
    for optim in (zero2 / "checkpoint").glob("*_optim_states.pt"):
        optim.write_bytes(b"not a pickle " * 100)
    after = invoke(zero2, "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path / "b", "--json")
    assert before.code == after.code == 0, after
    assert after.json()["checkpoint"]["sha256"] == before.json()["checkpoint"]["sha256"]
    assert after.json()["artifacts"][0]["sha256"] == before.json()["artifacts"][0]["sha256"]


def test_zero3_without_trust_names_the_conversion(ds_runs, tmp_path):
    """A true subprocess: exit 3, one JSON object on stdout, the conversion step and what --trust-checkpoint does."""
    res = run_lexport(_folder(ds_runs, "zero3"), "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path,
                      "--json")
    assert res.code == 3, res
    message = res.json()["error"]["message"]
    assert "ZeRO-3" in message and "zero_to_fp32.py" in message
    assert "convert_zero_checkpoint_to_fp32_state_dict" in message
    assert "--trust-checkpoint" in message and "runs code from the files" in message
    assert not list(tmp_path.iterdir())


def test_zero3_without_deepspeed_is_refused_without_the_trust_flag(ds_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importlib.util.find_spec("deepspeed") is None
    res = invoke(_folder(ds_runs, "zero3"), "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path,
                 "--trust-checkpoint", "--json")
    assert res.code == 3, res
    message = res.json()["error"]["message"]
    assert "deepspeed is not installed" in message and "zero_to_fp32.py" in message
    assert "--trust-checkpoint" not in message  # it would not help


def test_zero3_with_trust_uses_deepspeeds_reconstruction(ds_runs, tmp_path):
    """A true subprocess (deepspeed is imported there, not in the test process)."""
    from safetensors.torch import load_file

    res = run_lexport(_folder(ds_runs, "zero3"), "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path,
                      "--trust-checkpoint", "--json")
    assert res.code == 0, res
    report = json.loads(res.stdout)  # DeepSpeed's prints went to stderr
    assert report["checkpoint"]["global_step"] == 2
    got = load_file(next(tmp_path.glob("*.safetensors")))
    _assert_bit_equal(got, _reference(ds_runs, "zero3", "zero_to_fp32"))
    _assert_bit_equal(got, _reference(ds_runs, "zero3", "full"))


# ---------------------------------------------------------------------------------------- hostile
def _latest_outside(folder: Path, outside: Path) -> str:
    (folder / "latest").write_text("../../etc")
    return "not a plain folder name"


def _latest_dotdot(folder: Path, outside: Path) -> str:
    (folder / "latest").write_text("..")
    return "not a plain folder name"


def _tag_dir_symlinked_out(folder: Path, outside: Path) -> str:
    shutil.move(folder / "checkpoint", outside / "checkpoint")
    (folder / "checkpoint").symlink_to(outside / "checkpoint")
    return "outside the checkpoint folder"


def _model_file_symlinked_out(folder: Path, outside: Path) -> str:
    model = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    shutil.move(model, outside / model.name)
    model.symlink_to(outside / model.name)
    return "outside the checkpoint folder"


def _model_file_missing(folder: Path, outside: Path) -> str:
    (folder / "checkpoint" / "mp_rank_00_model_states.pt").unlink()
    return "without model states"


def _model_file_truncated(folder: Path, outside: Path) -> str:
    model = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:3000])
    return "truncated"


def _model_file_flipped_bit(folder: Path, outside: Path) -> str:
    import struct
    import zipfile

    model = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    with zipfile.ZipFile(model) as z:  # the largest record: fc1.weight
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 8] ^= 0x40
    model.write_bytes(bytes(data))
    return "CRC-32"


def _latest_huge(folder: Path, outside: Path) -> str:
    (folder / "latest").write_bytes(b"checkpoint" + b" " * (1 << 20))
    return "bytes"


def _no_latest(folder: Path, outside: Path) -> str:
    (folder / "latest").unlink()
    return "without latest"


def _model_file_is_a_plain_pickle(folder: Path, outside: Path) -> str:
    import pickle

    (folder / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": {}}, protocol=4))
    return "plain Python pickle"


HOSTILE = [
    _latest_outside, _latest_dotdot, _tag_dir_symlinked_out, _model_file_symlinked_out, _model_file_missing,
    _model_file_truncated, _model_file_flipped_bit, _latest_huge, _no_latest, _model_file_is_a_plain_pickle,
]


@pytest.mark.parametrize("damage", HOSTILE, ids=[f.__name__.lstrip("_") for f in HOSTILE])
def test_hostile_folder_exits_3_with_json(zero2, tmp_path, damage):
    outside = tmp_path / "outside"
    outside.mkdir()
    expected = damage(zero2, outside)
    res = invoke(zero2, "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path / "out", "--json")
    assert res.code == 3, res
    error = res.json()["error"]
    assert error["kind"] == "checkpoint" and expected in error["message"], error
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(CheckpointError):
        load_deepspeed(zero2, max_growth=4.0)


def test_hostile_folder_in_a_true_subprocess(zero2, tmp_path):
    """latest naming ../../etc: exit 3, stdout is exactly one JSON object, no traceback on stderr."""
    (zero2 / "latest").write_text("../../etc")
    res = run_lexport(zero2, "--to", "safetensors", "--output-dir", tmp_path / "out", "--json")
    assert res.code == 3, res
    assert json.loads(res.stdout)["error"]["code"] == 3
    assert "Traceback" not in res.stderr


def test_sha256_is_the_same_hashed_in_the_background_or_when_asked(ds_runs: dict[str, Path]) -> None:
    """A checkpoint loaded without background hashing gives the same sha256 when asked (it used to hash a DeepSpeed
    folder as a DCP one)."""
    from lightning_export.sources import load_checkpoint

    folder = _folder(ds_runs, "zero2")
    hashed = load_checkpoint(folder).sha256
    assert load_checkpoint(folder, hash_file=False).sha256 == hashed
    assert len(hashed) == 64
