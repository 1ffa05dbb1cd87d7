"""LexportCallback in real training runs: a real pl.Trainer (and LightningCLI, and 2-process DDP on CPU) exports
the checkpoint ModelCheckpoint wrote, verified, with the report in the logger's files."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SLOW


def _trainer(tmp_path: Path, callback, **kw):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    return pl.Trainer(
        max_epochs=kw.pop("max_epochs", 2), accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, logger=CSVLogger(tmp_path / "logs", name="run"),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True), callback], **kw,
    )


def _fit(tmp_path: Path, module_cls, callback, **kw):
    import pytorch_lightning as pl

    from fixtures.callback_modules import TinyData

    pl.seed_everything(0, verbose=False)
    module = module_cls()
    trainer = _trainer(tmp_path, callback, **kw)
    trainer.fit(module, datamodule=TinyData())
    return trainer, module


def test_fit_exports_the_best_checkpoint_verified_and_logs_the_report(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures.callback_modules import ValClassifier
    from lightning_export import LexportCallback

    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    cb = LexportCallback(to=["onnx"], attr="model")
    trainer, _ = _fit(tmp_path, ValClassifier, cb)
    best = Path(trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.name != "last.ckpt"
    onnx = best.with_suffix(".onnx")
    assert onnx.is_file(), sorted(p.name for p in best.parent.iterdir())
    assert list(cb.exported) == [str(best)]
    report = cb.last_report
    assert report.ok and report.artifacts[0].path == str(onnx) and report.artifacts[0].verification.passed
    logdir = Path(trainer.logger.log_dir)
    rows = list(csv.DictReader((logdir / "metrics.csv").open()))
    logged = [r for r in rows if r.get("lexport/onnx/max_abs_diff")]
    assert len(logged) == 1, rows
    assert float(logged[0]["lexport/onnx/verified"]) == 1.0
    assert float(logged[0]["lexport/onnx/bytes"]) == onnx.stat().st_size
    assert float(logged[0]["lexport/onnx/max_abs_diff"]) < 1e-4
    hparams = yaml.safe_load((logdir / "hparams.yaml").read_text())
    assert hparams["lexport/onnx/path"] == str(onnx) and hparams["lexport/checkpoint"] == str(best)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("### lexport \\(LexportCallback\\): ✅ 1 artifact written and verified")
    assert "| onnx |" in summary


def test_export_at_each_best_leaves_the_training_run_unchanged(tmp_path: Path) -> None:
    """Same seed, with and without the callback exporting mid-training: the same weights (the export restores the
    random generators the shuffling and dropout draw from, and never touches the module being trained)."""
    import torch

    from fixtures.callback_modules import ValClassifier
    from lightning_export import LexportCallback

    cb = LexportCallback(to="onnx", attr="model", on="best", output_dir=str(tmp_path / "out"))
    trainer, with_cb = _fit(tmp_path / "a", ValClassifier, cb, max_epochs=3)
    assert len(cb.exported) >= 2, cb.exported  # epochs 0 and 1 at least (val_loss falls at this lr)
    assert all(r.ok for r in cb.exported.values())
    assert len(list((tmp_path / "out").glob("*.onnx"))) == len(cb.exported)

    from pytorch_lightning.callbacks import Callback

    _, without = _fit(tmp_path / "b", ValClassifier, Callback(), max_epochs=3)
    assert with_cb.training == without.training
    for (name, a), (_, b) in zip(with_cb.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_failed_export_makes_fit_raise_or_warn_with_strict_false(tmp_path: Path) -> None:
    from fixtures.callback_modules import BrokenExport
    from lightning_export import LexportCallback
    from lightning_export.callback import LexportCallbackError

    with pytest.raises(LexportCallbackError, match=r"LexportCallback: exporting .*\.ckpt failed \(exit [15]") as e:
        _fit(tmp_path / "strict", BrokenExport, LexportCallback(to="torchscript", attr="model"), max_epochs=1)
    assert e.value.exit_code in (1, 5) and e.value.report is not None and not e.value.report.ok
    assert not list((tmp_path / "strict" / "ckpt").glob("*.pt"))  # nothing unverified was published

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cb = LexportCallback(to="torchscript", attr="model", strict=False)
        _fit(tmp_path / "lenient", BrokenExport, cb, max_epochs=1)
    said = [str(w.message) for w in seen if "LexportCallback: exporting" in str(w.message)]
    assert len(said) == 1 and not cb.last_report.ok


def test_lightning_cli_config_with_the_callback(tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI

    config = {
        "seed_everything": 0,
        "model": {"class_path": "fixtures.callback_modules.ValClassifier"},
        "data": {"class_path": "fixtures.callback_modules.TinyData"},
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val_loss", "dirpath": str(tmp_path / "ckpt")}},
                {"class_path": "lightning_export.LexportCallback",
                 "init_args": {"to": ["onnx"], "attr": "model", "output_dir": str(tmp_path / "artifacts")}},
            ],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "LexportCallback")
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert (tmp_path / "artifacts" / f"{best.stem}.onnx").is_file()
    assert cb.last_report.ok and cb.last_report.artifacts[0].verification.passed
    assert "lexport/onnx/max_abs_diff" in (Path(cli.trainer.logger.log_dir) / "metrics.csv").read_text()


DDP_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from fixtures.callback_modules import TinyData, ValClassifier
from lightning_export import LexportCallback

cb = LexportCallback(to="onnx", attr="model")
trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, enable_progress_bar=False,
                     enable_model_summary=False, logger=False, default_root_dir={root!r},
                     callbacks=[ModelCheckpoint(dirpath={root!r}, monitor="val_loss"), cb])
trainer.fit(ValClassifier(), datamodule=TinyData())
print(f"RANK {{trainer.global_rank}} EXPORTED {{len(cb.exported)}}", flush=True)
"""


@SLOW
def test_ddp_two_processes_export_once(tmp_path: Path) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(repo=str(REPO), root=str(tmp_path / "ckpt"))))
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK "))
    assert lines == ["RANK 0 EXPORTED 1", "RANK 1 EXPORTED 0"], proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(list((tmp_path / "ckpt").glob("*.onnx"))) == 1
