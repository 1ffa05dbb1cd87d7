"""Configs are instantiated by the engines that wrote them: jsonargparse (LightningCLI) and Hydra.

Each case is a real run: LightningCLI `fit` in subclass and plain mode with an injected encoder and an
OptimizerCallable; a Hydra-template style config (`_target_`, `_partial_`, interpolation) instantiated by Hydra and
trained by a real Trainer. The exports are verified by lexport in onnxruntime.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import invoke

pytestmark = pytest.mark.filterwarnings("ignore")


def _lightning_cli(root: Path, subclass: bool) -> tuple[Path, Path]:
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    from fixtures import config_modules as C

    model_args = [
        "--model.encoder=fixtures.config_modules.CliEncoder",
        "--model.encoder.hidden=8",
        "--model.optimizer=torch.optim.SGD",
        "--model.optimizer.lr=0.1",
        "--model.out_features=2",
    ]
    args = [
        "fit",
        *(["--model=fixtures.config_modules.CallableOptModel", "--data=fixtures.config_modules.CliDataModule"]
          if subclass else []),
        *model_args,
        "--trainer.max_steps=2",
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    pl.seed_everything(0, verbose=False)
    cli = LightningCLI(C.CallableOptModel, C.CliDataModule, subclass_mode_model=subclass,
                       subclass_mode_data=subclass, args=args)
    log_dir = Path(cli.trainer.log_dir)
    (ckpt,) = sorted((log_dir / "checkpoints").glob("*.ckpt"))
    return ckpt, log_dir / "config.yaml"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("cli-configs")
    return {mode: _lightning_cli(root / mode, mode == "subclass") for mode in ("subclass", "plain")}


def test_lightning_cli_callable_and_injected_module_subclass_mode(cli_runs: dict, tmp_path: Path) -> None:
    ckpt, config = cli_runs["subclass"]
    assert "class_path: torch.optim.SGD" in config.read_text()
    res = invoke(ckpt, "--config", config, "--to", "onnx", "-o", tmp_path / "m.onnx")
    assert res.code == 0, res
    assert (tmp_path / "m.onnx").is_file()


def test_lightning_cli_plain_mode_needs_module_only_for_graph_formats(cli_runs: dict, tmp_path: Path) -> None:
    ckpt, config = cli_runs["plain"]
    res = invoke(ckpt, "--config", config, "--to", "onnx", "-o", tmp_path / "m.onnx")
    assert res.code == 2, res
    flat = " ".join(res.stderr.split())
    assert "names no class" in flat and "--module" in flat
    assert not (tmp_path / "m.onnx").exists()
    # Weights formats never need the class.
    res = invoke(ckpt, "--config", config, "--to", "safetensors", "-o", tmp_path / "m.safetensors")
    assert res.code == 0, res
    res = invoke(ckpt, "--config", config, "--module", "fixtures.config_modules:CallableOptModel", "--to", "onnx",
                 "-o", tmp_path / "m.onnx")
    assert res.code == 0, res


def test_checkpoint_class_paths_alone_are_never_imported(cli_runs: dict, tmp_path: Path) -> None:
    """Without the config, the checkpoint's own class_path values are refused, not imported."""
    ckpt, _ = cli_runs["subclass"]
    res = invoke(ckpt, "--module", "fixtures.config_modules:CallableOptModel", "--to", "onnx", "-o", tmp_path / "m.onnx")
    assert res.code == 4, res
    assert "does not import classes named inside a checkpoint" in " ".join(res.stderr.split())


HYDRA_CONFIG = """
data:
  in_features: 6
model:
  _target_: fixtures.config_modules.HydraLitModule
  net:
    _target_: fixtures.config_modules.CliEncoder
    in_features: ${data.in_features}
    hidden: 5
  optimizer:
    _target_: torch.optim.Adam
    _partial_: true
    lr: 0.001
  compile: false
trainer:
  max_steps: 2
"""


def test_project_classes_resolve_from_the_project_root(tmp_path: Path) -> None:
    """From a project's root, its own classes (src.models...) are importable for --allow-global and for the
    unpickler under --trust-checkpoint, as with `python -m`."""
    import subprocess
    import sys

    from conftest import run_lexport

    proj = tmp_path / "proj"
    (proj / "src" / "models").mkdir(parents=True)
    (proj / "src" / "__init__.py").write_text("")
    (proj / "src" / "models" / "__init__.py").write_text("")
    (proj / "src" / "models" / "cfg.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\nclass Cfg:\n    width: int = 3\n"
    )
    save = (
        "import torch; from src.models.cfg import Cfg; "
        "torch.save({'state_dict': {'net.w': torch.ones(2, 2)}, 'hyper_parameters': {'cfg': Cfg()}}, 'run.ckpt')"
    )
    subprocess.run([sys.executable, "-c", save], cwd=proj, check=True, timeout=120)
    res = run_lexport("run.ckpt", "--to", "safetensors", "--attr", "net", "-o", "a.safetensors", cwd=proj)
    assert res.code == 0 and "cfg hold objects that were left unloaded" in " ".join(res.stderr.split()), res
    res = run_lexport("run.ckpt", "--to", "safetensors", "--attr", "net", "-o", "b.safetensors",
                      "--allow-global", "src.models.cfg.Cfg", cwd=proj)
    assert res.code == 0, res
    res = run_lexport("run.ckpt", "--to", "safetensors", "--attr", "net", "-o", "c.safetensors",
                      "--trust-checkpoint", cwd=proj)
    assert res.code == 0, res


def test_hydra_run_config_with_paths_only_hydra_resolves(tmp_path: Path) -> None:
    """A Hydra run's config has `${hydra:runtime.output_dir}` paths outside `model:`; only `model:` is resolved."""
    pytest.importorskip("omegaconf")
    from lightning_export.construct.configs import read_model_section

    cfg = tmp_path / "config.yaml"
    cfg.write_text(textwrap.dedent(HYDRA_CONFIG) + "paths:\n  output_dir: ${hydra:runtime.output_dir}\n")
    section = read_model_section(cfg)
    assert section.style == "hydra" and section.class_path == "fixtures.config_modules.HydraLitModule"
    assert section.args["net"]["in_features"] == 6
