"""A format added from outside the package: one module that registers a Format, and nothing else edited. This one
writes the weights as a numpy .npz; the test runs it through the CLI like any built-in format (export, verify,
detection by `lexport verify`, refusal of --precision and --quantize, its own option in the manifest)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lightning_export.formats import REGISTRY, ExportContext, Format, Sniffed, Written, option, register
from tests.conftest import invoke


@dataclass(frozen=True)
class NpzOptions:
    # Named like an existing run option (a new format with a new option adds one ExportOptions field and a flag);
    # the manifest records it because the format declares it.
    hash_checkpoint: bool = option(True)


def _write(ctx: ExportContext, path: Path) -> Written:
    import numpy as np

    arrays = {k: v.detach().cpu().numpy() for k, v in ctx.state_dict.items()}
    with open(path, "wb") as f:  # np.savez adds ".npz" to a name that lacks it
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return Written("numpy.savez", info={"arrays": len(arrays), "hashed": ctx.options_as(NpzOptions).hash_checkpoint})


def _load(path: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


def _sniff(s: Sniffed) -> bool:
    return s.zip_names is not None and bool(s.zip_names) and all(n.endswith(".npy") for n in s.zip_names)


NPZ = Format("npz", ".npz", "weights", "numpy .npz of the state dict", _write, _load, needs_module=False,
             sniff=_sniff, options=NpzOptions)


@pytest.fixture
def npz_format():
    register(NPZ)
    yield NPZ
    del REGISTRY["npz"]


def test_a_format_registered_from_outside_exports_and_verifies(npz_format, ckpts, tmp_path) -> None:
    out = tmp_path / "w.npz"
    manifest = tmp_path / "m.json"
    res = invoke(ckpts["classifier"], "--to", "npz", "-o", out, "--json", "--manifest", manifest)
    assert res.code == 0, res.stdout + res.stderr
    (artifact,) = json.loads(res.stdout)["artifacts"]
    assert artifact["format"] == "npz" and artifact["verification"]["passed"], artifact
    assert artifact["exporter"] == "numpy.savez" and artifact["info"]["arrays"] > 0
    assert json.loads(manifest.read_text())["options"]["hash_checkpoint"] is True  # --json asks for the full read
    assert artifact["info"]["hashed"] is True  # the format got its own option
    res = invoke("verify", out, ckpts["classifier"], "--json")  # found by its sniff, checked bit for bit
    assert res.code == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["artifacts"][0]["format"] == "npz"


def test_a_format_without_declared_precisions_refuses_them(npz_format, ckpts, tmp_path) -> None:
    res = invoke(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz", "--precision", "fp16")
    assert res.code == 2 and "npz stores the checkpoint's tensors as they are" in res.stderr, res.stderr
    res = invoke(ckpts["classifier"], "--to", "npz", "-o", tmp_path / "w.npz", "--quantize", "int8-dynamic")
    assert res.code == 2 and "applies to onnx" in res.stderr, res.stderr
    assert not (tmp_path / "w.npz").exists()
