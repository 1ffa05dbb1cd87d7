"""--data's pieces (files and LightningDataModules), the batch rule and agreement. Static int8 through
the CLI, calibrated and verified end to end, is in test_int8.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_export.agreement import DEFAULT_MIN_AGREEMENT, gate, measure, require
from lightning_export.construct.datamodule import build_datamodule, read_data_section, take_batches
from lightning_export.data.batches import forward_signature, prepare, rebatch, take, to_inputs
from lightning_export.data.files import load_batches_file
from lightning_export.errors import UsageError, UserModuleError, VerificationError


@pytest.fixture
def trained(int8_trained: dict) -> dict:
    return int8_trained


# ---- the rule from a batch to forward's arguments --------------------------------------------------------------
class _Two(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x * mask


class _Named(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return input_ids.float()


def test_batch_rule() -> None:
    x, y, m = torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), torch.ones(4, 3)
    one, two, named = forward_signature(nn.Linear(3, 2)), forward_signature(_Two()), forward_signature(_Named())
    inputs, labels, rule = to_inputs(x, one)
    assert inputs.args[0] is x and labels is None and "tensor" in rule
    inputs, labels, rule = to_inputs((x, y), one)  # Lightning's (x, y)
    assert len(inputs.args) == 1 and inputs.args[0] is x and labels is y and "element 0" in rule
    inputs, labels, _ = to_inputs((x, m), two)  # forward takes 2: both
    assert inputs.args == (x, m) and labels is None
    inputs, labels, _ = to_inputs([x, y.float()], one)  # float second element: not labels
    assert labels is None
    ids = torch.randint(0, 9, (4, 5))
    inputs, labels, rule = to_inputs({"input_ids": ids, "attention_mask": m, "labels": y}, named)
    assert set(inputs.kwargs) == {"input_ids", "attention_mask"} and labels is y and "labels" in rule
    inputs, labels, _ = to_inputs((y, x), one, pick=1)  # --data-input 1
    assert inputs.args[0] is x and labels is None
    inputs, _, _ = to_inputs({"image": x, "y": y}, one, pick="image")
    assert inputs.args[0] is x
    for bad in [((x, y), 2), ({"image": x}, "img"), (x, 0)]:
        with pytest.raises(UsageError):
            to_inputs(bad[0], one, pick=bad[1])
    with pytest.raises(UsageError, match="none of which forward takes"):
        to_inputs({"pixels": x}, named)


def test_take_split_and_rebatch() -> None:
    batches = [(torch.randn(32, 2), torch.randint(0, 2, (32,))) for _ in range(40)]
    assert len(take(iter(batches))) == 19  # the default reads about 600 samples
    assert len(take(iter(batches), max_batches=4)) == 4
    with pytest.raises(UsageError):
        take(iter(batches), max_batches=0)
    p = prepare(batches[:4], nn.Linear(2, 2), source="test", calibrate=True)
    assert [b.index for b in p.calibration] == [0, 2] and [b.index for b in p.verification] == [1, 3]
    assert p.calibration_samples == 64 and p.has_labels
    assert any("calibration saw 64 samples" in w for w in p.warnings)  # below ~300: warned
    assert json.dumps(p.summary())
    with pytest.raises(UsageError, match="at least 2"):
        prepare(batches[:1], nn.Linear(2, 2), source="test", calibrate=True)
    re = rebatch(p.verification, 24)  # 64 samples -> 2 batches of 24, the remainder dropped
    assert [b.samples for b in re] == [24, 24] and re[1].labels.shape == (24,)
    assert torch.equal(re[1].inputs.args[0][:8], p.verification[0].inputs.args[0][24:32])


# ---- agreement ------------------------------------------------------------------------------------------------
def test_agreement_and_gate() -> None:
    eager = [torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])]
    artifact = [[torch.tensor([[2.0, 1.0], [0.0, 3.0], [0.0, 1.0], [0.0, 1.0]])]]  # one decision flips
    labels = [torch.tensor([0, 1, 0, -100])]  # -100 is ignore_index
    a = measure(eager, artifact, labels)
    assert a.agreement == 0.75 and a.samples == 4
    assert a.eager_accuracy == 1.0 and a.artifact_accuracy == pytest.approx(2 / 3)
    problem = gate(a, DEFAULT_MIN_AGREEMENT, what="onnx int8")
    assert problem and "3 of 4" in problem and "75.00%" in problem and "accuracy 66.67%" in problem
    with pytest.raises(VerificationError) as e:
        require(a, 0.99)
    assert e.value.exit_code == 1
    assert gate(a, 0.7) is None
    regression = measure([torch.randn(4, 1)], [[torch.randn(4, 1)]])
    assert not regression.applicable and gate(regression) is None


# ---- --data files: the checkpoint loader's rules ---------------------------------------------------------------
def test_data_file_loads(trained: dict) -> None:
    batches = load_batches_file(trained["data"])
    assert len(batches) == 20 and batches[0][0].shape == (32, 1, 16, 16)


def test_data_file_with_a_global_is_refused(tmp_path: Path) -> None:
    import hostile as H
    import hostile_pickle as P

    marker = tmp_path / "ran"
    base = tmp_path / "base.pt"
    torch.save([(torch.zeros(2, 3), P.PLACEHOLDER)], base)
    evil = H.with_pickle(base, tmp_path / "evil.pt",
                         lambda pkl: P.splice(pkl, P.call("os", "system", f"touch {marker}")))
    with pytest.raises(UsageError, match="tries to run code") as e:
        load_batches_file(evil)
    assert "--trust-checkpoint" not in str(e.value) and not marker.exists()
    # A harmless class is not imported either (the checkpoint loader's placeholder), and a data file needs none.
    odd = H.with_pickle(base, tmp_path / "odd.pt",
                        lambda pkl: P.splice(pkl, P.call("argparse", "Namespace")))
    with pytest.raises(UsageError, match="argparse.Namespace"):
        load_batches_file(odd)


def test_data_file_claiming_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    import struct

    import hostile as H
    import hostile_pickle as P

    # A list holding one batch whose tensor declares 10**9 float32 elements over a 4-byte record.
    o = P.Ops(proto=True)
    o.empty_list().mark().tensor("0", "FloatStorage", 10**9, 0, (10**9,), (1,)).appends()
    records = [("data.pkl", o.stop()), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little"), ("data/0", struct.pack("<f", 1.0)), ("version", b"3\n"),
               (".data/serialization_id", b"0" * 40)]
    claims = H.write_torch_zip(tmp_path / "claims.pt", records)
    assert claims.stat().st_size < 4096
    with pytest.raises(UsageError, match=r"^--data .*claims.pt is corrupt"):
        load_batches_file(claims)
    # A zip directory that places a record past the end of the file.
    base = tmp_path / "honest.pt"
    torch.save([torch.zeros(64)], base)
    data = bytearray(base.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_len = struct.unpack("<H", data[at + 28:at + 30])[0]
        if data[at + 46:at + 46 + name_len].endswith(b"/data/0"):
            data[at + 20:at + 28] = struct.pack("<II", 1 << 20, 1 << 20)
        at = data.find(b"PK\x01\x02", at + 4)
    past = tmp_path / "past.pt"
    past.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="ends past the end of the file"):
        load_batches_file(past)
    with pytest.raises(UsageError, match="not a list of batches"):
        torch.save(torch.zeros(3), tmp_path / "one.pt")
        load_batches_file(tmp_path / "one.pt")


def test_data_file_that_is_no_torch_save_file_is_named_by_its_flag(tmp_path: Path) -> None:
    """The checkpoint loader's refusals of what is not a file torch.save wrote name `--data PATH` and a file, never a
    checkpoint (the loader renders them from its subject), and keep the data file's hint."""
    import os
    import pickle

    (tmp_path / "dir.pt").mkdir()
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps([[1.0, 2.0]], protocol=4))
    (tmp_path / "text.pt").write_text('{"x": [1, 2]}')
    said = {
        "dir.pt": "is a directory, not a torch.save file",
        "fifo.pt": "is a named pipe (FIFO), not a torch.save file",
        "empty.pt": "is empty (0 bytes); the file was not written completely",
        "plain.pt": "is a plain Python pickle (protocol 4), not a file written by torch.save",
        "text.pt": "is a text file (JSON, YAML or similar), not a torch.save file",
        "missing.pt": ": file not found",
    }
    for name, what in said.items():
        path = tmp_path / name
        with pytest.raises(UsageError) as e:
            load_batches_file(path)
        message = e.value.message
        assert message.startswith(f"--data {path}{what}" if what[0] == ":" else f"--data {path} {what}"), message
        assert "checkpoint" not in str(e.value).lower(), str(e.value)
        assert e.value.exit_code == 2 and (e.value.hint or "").startswith("Save a list of batches"), e.value.hint


# ---- datamodules from a config ---------------------------------------------------------------------------------
def test_datamodule_from_lightningcli_config(trained: dict, tmp_path: Path) -> None:
    section = read_data_section(trained["config"])
    assert section.class_path == "fixtures.int8_data.SyntheticDataModule" and section.args["batch_size"] == 32
    got = take_batches(build_datamodule(section), max_batches=6)
    assert got.loader == "val_dataloader" and len(got.batches) == 6
    assert got.source == "val_dataloader() of fixtures.int8_data.SyntheticDataModule"
    # LightningCLI with a fixed datamodule class saves data: as init arguments only; the class is named apart.
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("data:\n  batch_size: 16\n")
    bare = read_data_section(fixed)
    assert bare.class_path is None
    with pytest.raises(UsageError, match="names no class"):
        build_datamodule(bare)
    only_train = take_batches(build_datamodule(bare, class_spec="fixtures.int8_data:TrainOnlyDataModule"))
    assert only_train.loader == "train_dataloader" and len(only_train.batches) == 4
    # LightningDataModule.from_datasets sets its loaders on the instance.
    import pytorch_lightning as pl
    from torch.utils.data import TensorDataset

    from fixtures.int8_data import make_images

    made = pl.LightningDataModule.from_datasets(test_dataset=TensorDataset(*make_images(40, 3)), batch_size=10)
    got = take_batches(made)
    assert got.loader == "test_dataloader" and len(got.batches) == 4


def test_datamodule_that_raises_is_a_user_module_error(trained: dict) -> None:
    dm = build_datamodule(read_data_section(trained["broken"]))
    with pytest.raises(UserModuleError, match="dataset not found at /data/imagenet") as e:
        take_batches(dm)
    assert e.value.exit_code == 4 and "BrokenDataModule.setup('fit')" in str(e.value)


def test_hydra_data_section(tmp_path: Path) -> None:
    pytest.importorskip("hydra")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("bs: 8\nmodel:\n  _target_: fixtures.int8_data.PatternClassifier\n"
                   "data:\n  _target_: fixtures.int8_data.SyntheticDataModule\n  batch_size: ${bs}\n"
                   "  train_size: 16\n  val_size: 24\n  test_size: 8\n")
    section = read_data_section(cfg)
    assert section.style == "hydra" and section.args["batch_size"] == 8
    got = take_batches(build_datamodule(section))
    assert got.loader == "val_dataloader" and [b[0].shape[0] for b in got.batches] == [8, 8, 8]


# ---- a gate that did not run is a failure; data that cannot run is said -----------------------------
MODULE = "fixtures.int8_data:PatternClassifier"


def _images(n: int, side: int = 16, fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 31 + side)
    x = torch.randn(n, 1, side, side, generator=g) if fill is None else torch.full((n, 1, side, side), fill)
    return x, torch.randint(0, 10, (n,), generator=g)


def _data_files(d: Path) -> dict[str, Path]:
    """Tiny --data files, one per case."""
    files = {
        "empty": [_images(0), _images(0)],  # batches of 0 samples
        "two-single": [_images(1), _images(1)],  # the held-out sample fills no batch of 8
        "nan": [_images(8, fill=float("nan")) for _ in range(4)],
        "inf": [_images(8, fill=float("inf")) for _ in range(4)],
        "mixed": [_images(8), _images(8, side=20), _images(8), _images(8, side=20)],
        "mixed-calibration": [_images(8), _images(8), _images(8, side=20), _images(8, side=20)],  # 0, 2 calibrate
        "odd": [_images(5), _images(5), _images(5)],  # 15 samples: one batch of 8 runs
        "huge": [_images(5000)],  # one batch: the default cuts it to about 600 samples
        "small": [_images(8) for _ in range(8)],  # 64 samples: fewer than a gate needs
    }
    paths = {}
    for name, batches in files.items():
        paths[name] = d / f"{name}.pt"
        torch.save(batches, paths[name])
    return paths


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _data_files(tmp_path_factory.mktemp("data21"))


# name, data file, extra flags, exit code, words the message must hold
CASES = [
    ("int8-on-empty-batches", "empty", ("--quantize", "int8"), 2, ("2 batches, all of 0 samples",)),
    ("int8-on-one-held-out-sample", "two-single", ("--quantize", "int8"),
     2, ("1 held-out samples", "the agreement gate needs at least 100")),
    ("fp32-held-out-fills-no-batch", "two-single", (), 2, ("2 held-out samples", "0 fill whole batches")),
    ("fp16-gate-on-64-samples", "small", ("--precision", "fp16"), 2, ("64 held-out samples", "at least 100")),
    ("int8-calibrated-on-nan", "nan", ("--quantize", "int8"), 2, ("calibration batches 0, 2", "NaN or Inf")),
    ("int8-calibrated-on-inf", "inf", ("--quantize", "int8"), 2, ("NaN or Inf", "cannot be calibrated")),
    ("fp32-on-mixed-shapes", "mixed", (), 2, ("the module itself fails on held-out data", "20, 20")),
    ("int8-on-mixed-shapes", "mixed-calibration", ("--quantize", "int8"), 2, ("2 shapes", "1x16x16", "1x20x20")),
]


@pytest.mark.parametrize("name,data,extra,code,words", CASES, ids=[c[0] for c in CASES])
def test_data_that_cannot_run_is_refused(trained: dict, data_files: dict, tmp_path: Path, name: str, data: str,
                                         extra: tuple, code: int, words: tuple) -> None:
    """Each case: its exit code (never 0 with a gate that did not run, never 70), one JSON object whose error
    names what was read, nothing published."""
    from conftest import invoke

    out = tmp_path / "out"
    res = invoke(trained["ckpt"], "--module", MODULE, "--to", "onnx", "--data", data_files[data], "--output-dir", out,
                 "--json", *extra)
    report = json.loads(res.stdout)
    assert res.code == code, res
    message = " ".join(report["error"]["message"].split())
    assert all(w in message for w in words), message
    assert not any(a.get("path") for a in report["artifacts"]) and not list(out.glob("*.onnx"))


def test_nan_data_is_a_warning_for_fp32(trained: dict, data_files: dict, tmp_path: Path) -> None:
    """All-NaN held-out data: the fp32 artifact still verifies (its outputs are NaN where the module's are), and the
    report says the agreement on them says nothing (it was 1.0 with no word)."""
    from conftest import invoke

    res = invoke(trained["ckpt"], "--module", MODULE, "--to", "onnx", "--data", data_files["nan"], "--output-dir",
                 tmp_path, "--json")
    assert res.code == 0, res
    report = json.loads(res.stdout)
    said = [w for w in report["warnings"] if "NaN or Inf" in w]
    assert said and "32 of 32 samples" in said[0] and said[0] in report["data"]["warnings"], report["warnings"]


def test_the_report_counts_only_samples_that_ran(trained: dict, data_files: dict, tmp_path: Path) -> None:
    """3 batches of 5: re-batched to the example's 8, one batch runs; the agreement counts 8 of the 15 read."""
    from conftest import invoke

    res = invoke(trained["ckpt"], "--module", MODULE, "--to", "onnx", "--data", data_files["odd"], "--output-dir",
                 tmp_path, "--json")
    assert res.code == 0, res
    agreement = json.loads(res.stdout)["artifacts"][0]["verification"]["agreement"]
    assert agreement["samples"] == 8 and agreement["samples_read"] == 15, agreement


def test_the_default_bounds_samples_not_batches(trained: dict, data_files: dict, tmp_path: Path) -> None:
    """One batch of 5000 images: cut to the default's 600 samples (in batches of 60), not run whole; int8 gets
    calibration and held-out batches from it."""
    from conftest import invoke

    batches = take(iter(torch.load(data_files["huge"])))
    assert [len(b[0]) for b in batches] == [60] * 10 and all(len(b[1]) == 60 for b in batches)
    res = invoke(trained["ckpt"], "--module", MODULE, "--to", "onnx", "--data", data_files["huge"], "--output-dir",
                 tmp_path, "--json")
    assert res.code == 0, res
    report = json.loads(res.stdout)
    assert report["data"]["verification_samples"] == 600 and report["data"]["batches_in_file"] == 1
    assert report["artifacts"][0]["verification"]["agreement"]["samples"] == 600
    assert len(take(iter(torch.load(data_files["huge"])), max_batches=1)[0][0]) == 5000  # asked for: as it is


def test_prepare_refuses_what_would_not_run() -> None:
    linear = nn.Linear(2, 3)
    with pytest.raises(UsageError, match=r"gives forward no tensor \(str\)"):
        prepare([(["a", "b"], torch.zeros(2, dtype=torch.long))], linear, source="test", calibrate=False)
    with pytest.raises(UsageError, match="all of 0 samples"):
        prepare([torch.zeros(0, 2)] * 3, linear, source="test", calibrate=False)
    with pytest.raises(UsageError, match="needs at least 2 batches"):  # one usable batch left to calibrate
        prepare([torch.zeros(0, 2), torch.ones(4, 2)], linear, source="test", calibrate=True)
    p = prepare([torch.zeros(0, 2), torch.ones(4, 2)], linear, source="test", calibrate=False)
    assert p.verification_samples == 4 and any("hold 0 samples and were left out" in w for w in p.warnings)
    with pytest.raises(UsageError, match="needs at least 100"):
        prepare([torch.ones(60, 2)] * 3, linear, source="test", calibrate=True, min_verification_samples=100)


def test_rebatch_groups_each_shape() -> None:
    """16x16 and 20x20 batches: re-batched per shape (torch.cat across them was exit 70)."""
    from lightning_export.data.batches import Batch
    from lightning_export.inputs import Inputs

    def batch(n: int, side: int, i: int) -> Batch:
        return Batch(Inputs((torch.full((n, 1, side, side), float(i)),), {}), torch.full((n,), i), n, i)

    out = rebatch([batch(6, 16, 0), batch(6, 20, 1), batch(6, 16, 2), batch(2, 20, 3)], 4)
    assert [tuple(b.inputs.args[0].shape) for b in out] == [(4, 1, 16, 16)] * 3 + [(4, 1, 20, 20)] * 2
    assert out[1].labels.tolist() == [0, 0, 2, 2] and out[4].labels.tolist() == [1, 1, 3, 3]


def test_strings_from_a_datamodule_are_refused(trained: dict, tmp_path: Path) -> None:
    """A loader that yields strings: exit 2 naming them (it reported 8 held-out samples verified, none ran)."""
    from conftest import invoke

    config = tmp_path / "strings.yaml"
    config.write_text(trained["config"].read_text().replace("SyntheticDataModule", "StringsDataModule"))
    res = invoke(trained["ckpt"], "--config", config, "--to", "onnx", "--data", "config", "--output-dir", tmp_path,
                 "--json")
    assert res.code == 2, res
    message = json.loads(res.stdout)["error"]["message"]
    assert "val_dataloader() of fixtures.int8_data.StringsDataModule" in message and "(list)" not in message
    assert "gives forward no tensor (str)" in message, message


def test_a_datamodule_that_calls_os_exit_is_exit_4(trained: dict, tmp_path: Path) -> None:
    """os._exit(0) in setup ended lexport with exit 0 and nothing on stdout; now exit 4 naming the call. A real
    process: in-process, a failed guard would end the test run."""
    from conftest import run_lexport

    config = tmp_path / "exit.yaml"
    config.write_text(trained["config"].read_text().replace("SyntheticDataModule", "ExitingDataModule"))
    res = run_lexport(trained["ckpt"], "--config", config, "--to", "onnx", "--data", "config", "--output-dir",
                      tmp_path / "out", "--json")
    assert res.code == 4, res
    message = res.json()["error"]["message"]
    assert "ExitingDataModule called os._exit(0)" in message, message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
