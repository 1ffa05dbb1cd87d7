"""A module whose __init__ draws example_input_array from the global RNG (Lightning's own examples
do) exports to the same bytes twice, in every format: lexport seeds the generators from --seed before building."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import COMPILED_FORMATS, available_formats, run_lexport, tiered

MODULE = "fixtures.config_modules:GlobalRandomExample"


@pytest.fixture(scope="module")
def random_example_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from fixtures.config_modules import GlobalRandomExample
    from fixtures.make_checkpoints import _TRAINER_KWARGS, _quiet

    path = tmp_path_factory.mktemp("random-example") / "random_example.ckpt"
    with _quiet():
        pl.seed_everything(0, verbose=False)
        model = GlobalRandomExample()
        data = TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,)))
        trainer = pl.Trainer(max_steps=2, **_TRAINER_KWARGS)
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=8))
        trainer.save_checkpoint(path)
    return path


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("group", tiered(["plain", "compiled"], fast=["plain"]))
def test_random_example_input_array_gives_the_same_bytes_in_every_format(random_example_ckpt, tmp_path, group):
    """Two runs in two processes give the same bytes although the example is drawn from the global RNG (the compiled
    formats, aoti/executorch/tflite, in the slow tier)."""
    from lightning_export.formats import REGISTRY

    # The plain formats' two-process reproducibility is test_release's; here, what a drawn example can reach: the
    # exported program stores it (sample inputs), ONNX and TorchScript trace with it.
    plain = ["exported-program", "onnx", "torchscript"]
    formats = [f for f in available_formats(list(REGISTRY))
               if (f in COMPILED_FORMATS if group == "compiled" else f in plain)]
    runs = []
    for i in (1, 2):
        out = tmp_path / f"run{i}"
        res = run_lexport(random_example_ckpt, "--module", MODULE, "--to", ",".join(formats), "--output-dir", out,
                          "--json")
        assert res.code == 0, res
        runs.append({a["format"]: a for a in res.json()["artifacts"]})
    assert sorted(runs[0]) == sorted(formats)
    for name in formats:
        first, second = Path(runs[0][name]["path"]), Path(runs[1][name]["path"])
        assert _sha(first) == _sha(second), f"{name}: two runs wrote different bytes"
        for c1, c2 in zip(runs[0][name].get("companions") or [], runs[1][name].get("companions") or []):
            assert _sha(Path(c1)) == _sha(Path(c2)), f"{name}: companion {c1} differs"
