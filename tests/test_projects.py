"""Real project layouts, built for real: what third-party projects put in their checkpoints.

- A lightning-hydra-template project: `src/models/...`, Hydra's instantiate with `_partial_: true`,
  `save_hyperparameters(logger=False)` (which pickles the `net` module and the partial optimizer into the
  checkpoint) and the run's `.hydra/config.yaml`. Trained by a real Trainer in a subprocess from the project root.
- A module whose constructor takes numpy arrays (normalisation constants), saved in hparams.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import COMPILED_FORMATS, available_formats, invoke, run_lexport, tiered

pytestmark = pytest.mark.filterwarnings("ignore")

NET = '''
import os
from torch import nn

if os.environ.get("LEXPORT_TEST_MARKER"):  # proves whether lexport imported (ran) the project's code
    open(os.environ["LEXPORT_TEST_MARKER"], "a").write("imported\\n")


class SimpleDenseNet(nn.Module):
    def __init__(self, input_size: int = 6, lin1_size: int = 8, output_size: int = 3):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(input_size, lin1_size), nn.ReLU(), nn.Linear(lin1_size, output_size))

    def forward(self, x):
        return self.model(x)
'''

LIT = '''
import torch
import torch.nn.functional as F
import pytorch_lightning as pl


class MNISTLitModule(pl.LightningModule):
    def __init__(self, net, optimizer, scheduler=None, compile: bool = False):
        super().__init__()
        self.save_hyperparameters(logger=False)  # as the template does: net and the partials are pickled
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return {"optimizer": self.hparams.optimizer(params=self.parameters())}
'''

CONFIG = """
task_name: train
paths:
  root_dir: .
  output_dir: ${hydra:runtime.output_dir}
data:
  input_size: 6
model:
  _target_: src.models.mnist_module.MNISTLitModule
  optimizer:
    _target_: torch.optim.Adam
    _partial_: true
    lr: 0.001
    weight_decay: 0.0
  scheduler:
    _target_: torch.optim.lr_scheduler.ReduceLROnPlateau
    _partial_: true
    mode: min
    factor: 0.1
  net:
    _target_: src.models.components.simple_dense_net.SimpleDenseNet
    input_size: ${data.input_size}
    lin1_size: 8
    output_size: 3
  compile: false
"""

TRAIN = """
import torch, pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import OmegaConf

run = "logs/train/runs/2026-11-23_12-00-00"
cfg = OmegaConf.load(run + "/.hydra/config.yaml")
pl.seed_everything(0, verbose=False)
model = instantiate(cfg.model)
data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1)
trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
trainer.save_checkpoint(run + "/checkpoints/last.ckpt")
torch.save({k: v.clone() for k, v in model.net.state_dict().items()}, "expected_net.pt")
x = torch.randn(2, 6)
torch.save({"x": x, "y": model.net.eval()(x).detach()}, "expected_io.pt")
"""


@pytest.fixture(scope="module")
def hydra_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("hydra")
    proj = tmp_path_factory.mktemp("hydra-template")
    comp = proj / "src" / "models" / "components"
    comp.mkdir(parents=True)
    for d in (proj / "src", proj / "src" / "models", comp):
        (d / "__init__.py").write_text("")
    (comp / "simple_dense_net.py").write_text(NET)
    (proj / "src" / "models" / "mnist_module.py").write_text(LIT)
    run = proj / "logs" / "train" / "runs" / "2026-11-23_12-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / ".hydra" / "config.yaml").write_text(textwrap.dedent(CONFIG))
    env = {k: v for k, v in os.environ.items() if k != "LEXPORT_TEST_MARKER"}
    env["PYTHONPATH"] = os.pathsep.join([str(proj), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", TRAIN], cwd=proj, env=env, check=True, timeout=300,
                   capture_output=True)
    return proj


CKPT = "logs/train/runs/2026-11-23_12-00-00/checkpoints/last.ckpt"
RUN_CONFIG = "logs/train/runs/2026-11-23_12-00-00/.hydra/config.yaml"


def test_hydra_template_checkpoint_to_safetensors_with_no_flag_and_no_code_run(hydra_project: Path) -> None:
    """The checkpoint pickles the net module and Hydra's partials; the weights come out with no flag, and nothing
    of the project (nor hydra) is imported: the marker file is never written."""
    marker = hydra_project / "MARKER"
    res = run_lexport(CKPT, "--attr", "net", "--to", "safetensors", "-o", "net.safetensors", "--json",
                      cwd=hydra_project, env={"LEXPORT_TEST_MARKER": str(marker)})
    assert res.code == 0, res
    assert not marker.exists(), "lexport imported the project's code"
    report = json.loads(res.stdout)
    assert any("net, optimizer, scheduler hold objects that were left unloaded" in n for n in report["notes"]), report
    from safetensors.torch import load_file

    got = load_file(str(hydra_project / "net.safetensors"))
    expected = torch.load(hydra_project / "expected_net.pt", weights_only=True)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_hydra_template_checkpoint_to_onnx_with_its_run_config(hydra_project: Path) -> None:
    """The run's .hydra/config.yaml gives the class and the objects (Hydra instantiates them); onnx verifies and
    computes what the trained net computes."""
    res = run_lexport(CKPT, "--config", RUN_CONFIG, "--attr", "net", "--to", "onnx", "-o", "net.onnx",
                      "--input", "float32[2,6]",
                      cwd=hydra_project)
    assert res.code == 0, res
    import onnxruntime as ort

    io = torch.load(hydra_project / "expected_io.pt", weights_only=True)
    sess = ort.InferenceSession(str(hydra_project / "net.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: io["x"].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), io["y"], atol=1e-5, rtol=1e-4)


def test_hydra_template_graph_export_without_config_names_the_objects_to_give(hydra_project: Path) -> None:
    marker = hydra_project / "MARKER2"
    res = run_lexport(CKPT, "--module", "src.models.mnist_module:MNISTLitModule", "--attr", "net", "--to", "onnx",
                      "-o", "x.onnx", cwd=hydra_project, env={"LEXPORT_TEST_MARKER": str(marker)})
    assert res.code == 4, res
    flat = " ".join(res.stderr.split())
    assert "MNISTLitModule.__init__ needs net, optimizer, scheduler" in flat, res.stderr
    assert "net: a src.models.components.simple_dense_net.SimpleDenseNet" in flat
    assert "--config FILE" in flat and "--init-arg net=VALUE" in flat
    assert "Traceback" not in res.stderr and not (hydra_project / "x.onnx").exists()


# ------------------------------------------------------------------------------------- numpy in hparams
def test_numpy_hparams_load_after_exactly_one_round_of_the_hint(ckpts: dict, tmp_path: Path) -> None:
    """A constructor taking numpy arrays and a numpy scalar: a weights export needs no flag; a graph export
    prints one --allow-global line, and that line pasted back once is enough (numpy's dtype classes included)."""
    ckpt = ckpts["numpy_hparams"]
    res = invoke(ckpt, "--to", "safetensors", "-o", tmp_path / "w.safetensors")
    assert res.code == 0, res
    args = [ckpt, "--module", "fixtures.config_modules:NumpyNormModel", "--to", "onnx", "-o", tmp_path / "m.onnx"]
    res = invoke(*args)
    assert res.code == 4, res
    lines = [line.strip() for line in res.stderr.splitlines() if line.strip().startswith("--allow-global ")]
    assert len(lines) == 1, res.stderr
    assert "numpy.ndarray" in lines[0] and "numpy.dtype" in lines[0]
    res = invoke(*args, *lines[0].split())
    assert res.code == 0, res
    assert (tmp_path / "m.onnx").is_file()


# ----------------------------------------------------------------------------------------- dict batch
def _dict_module(ckpt: Path) -> torch.nn.Module:
    from fixtures.config_modules import DictBatchModel

    return DictBatchModel.load_from_checkpoint(ckpt, weights_only=False).eval()


@pytest.mark.parametrize("opset", [None, 17], ids=["dynamo", "torchscript-exporter"])
def test_forward_taking_a_dict_batch_exports_to_onnx(ckpts: dict, tmp_path: Path, opset) -> None:
    """torch.onnx.export reads a trailing dict in args as kwargs; a forward(batch: dict) must still export."""
    extra = ["--opset", str(opset)] if opset else []
    res = invoke(ckpts["dict_batch"], "--module", "fixtures.config_modules:DictBatchModel", "--to", "onnx",
                 "-o", tmp_path / "d.onnx", *extra)
    assert res.code == 0, res
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "d.onnx"))
    # Both exporters name the inputs after forward's parameter and the dict's keys.
    assert [i.name for i in sess.get_inputs()] == ["batch_x", "batch_bias"]
    assert [o.name for o in sess.get_outputs()] == ["output"]
    batch = {"x": torch.randn(2, 4), "bias": torch.randn(2, 2)}
    feeds = dict(zip([i.name for i in sess.get_inputs()], [batch["x"].numpy(), batch["bias"].numpy()]))
    got = sess.run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(got), _dict_module(ckpts["dict_batch"])(batch).detach(),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("group", tiered(["plain", "compiled"], fast=["plain"]))
def test_forward_taking_a_dict_batch_exports_to_every_graph_format(ckpts: dict, tmp_path: Path, group: str) -> None:
    """forward(batch: dict) to torchscript, exported-program, executorch, aoti, openvino and tflite (those installed;
    the compiled ones in the slow tier) in one run (onnx above): each is verified by lexport in its own runtime; the
    exported program is also called here with a dict."""
    from lightning_export.formats import REGISTRY

    graph = [n for n in available_formats([n for n, f in REGISTRY.items() if f.kind == "graph" and n != "onnx"])
             if (n in COMPILED_FORMATS) == (group == "compiled")]
    assert {"torchscript", "exported-program"} <= set(graph) if group == "plain" else "aoti" in graph, graph
    res = invoke(ckpts["dict_batch"], "--module", "fixtures.config_modules:DictBatchModel",
                 *(a for n in graph for a in ("--to", n)), "--output-dir", tmp_path / "out", "--json")
    assert res.code == 0, res
    report = json.loads(res.stdout)
    assert sorted(a["format"] for a in report["artifacts"] if a["verification"]["passed"]) == sorted(graph), report
    if group == "compiled":
        return
    program = torch.export.load(str(tmp_path / "out" / "dict_batch.pt2")).module()
    batch = {"x": torch.randn(2, 4), "bias": torch.randn(2, 2)}
    torch.testing.assert_close(program(batch), _dict_module(ckpts["dict_batch"])(batch).detach())
