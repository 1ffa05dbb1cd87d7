"""Artifacts given to `lexport verify` are as hostile as checkpoints.

A `.pt2` whose pickles name os.system never runs it; a runtime that crashes natively on a malformed file crashes in a
child process (a failed verification, exit 1, JSON as always); bit-flipped and truncated artifacts of every format
end with a documented exit code and one JSON object. LEXPORT_FUZZ_ARTIFACTS sets the cases per format (default 6,
deterministic; `make fuzz` runs 300 and adds AOTInductor, whose compile takes about a minute).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import zlib
from pathlib import Path

import hostile as H
import pytest
from conftest import available_formats, invoke, patch_format, run_lexport, tiered

MODULE = ("--module", "fixtures.modules:MyClassifierModule", "--attr", "model")
CASES = int(os.environ.get("LEXPORT_FUZZ_ARTIFACTS", "6"))
FUZZED = ["executorch", "tflite", "onnx", "openvino", "exported-program", "torchscript"] + (["aoti"] if CASES > 50 else [])
DOCUMENTED = {0, 1, 2, 3, 4, 5, 6}
RUNTIME_MODULES = {"executorch": ("executorch.runtime",), "tflite": ("ai_edge_litert.interpreter",),
                   "onnx": ("onnxruntime",), "openvino": ("openvino",)}


@pytest.fixture(scope="module")
def artifacts(ckpts: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """format name -> the classifier exported to it (one export for the module), for every format installed here."""
    from lightning_export import export

    out = tmp_path_factory.mktemp("artifacts")
    formats = available_formats(FUZZED)
    report = export(ckpts["classifier"], module=MODULE[1], attr="model", formats=tuple(formats), output_dir=out)
    paths = {a.format: Path(a.path) for a in report.artifacts}
    assert set(paths) == set(formats), report
    return paths


def _one_json(res) -> dict:
    """stdout is exactly one JSON object (json.loads refuses trailing data)."""
    obj = json.loads(res.stdout)
    assert isinstance(obj, dict), res
    return obj


# ----------------------------------------------------------------------------------- pickles inside a .pt2
def test_pt2_pickle_naming_os_system_never_runs(artifacts: dict, ckpts: dict, tmp_path: Path) -> None:
    """Before: torch.export.load unpickled the sample inputs with weights_only=False after its weights-only try
    failed: the command ran (twice: load, then made_with), exit 1, torch's logging printed a traceback."""
    marker = tmp_path / "ran"
    evil = H.pt2_with_pickle(artifacts["exported-program"], tmp_path / "evil.pt2", marker)
    res = run_lexport("verify", evil, ckpts["classifier"], *MODULE, "--json")
    assert not marker.exists(), "the pickle's command ran"
    assert res.code == 1, res
    assert "Traceback" not in res.stderr and "Logging error" not in res.stderr, res
    (art,) = _one_json(res)["artifacts"]
    problem = " ".join(art["verification"]["problems"])
    assert "data/sample_inputs/model.pt names os.system" in problem and "weights-only" in problem, problem


def test_pt2_pickle_refused_by_every_loader(artifacts: dict, tmp_path: Path) -> None:
    """made_with (the --precision hint after a failed verify) and the AOTInductor loader read the same archive."""
    from lightning_export.formats.exported_program import made_with
    from lightning_export.safeload.pt2 import UnsafeArchiveError, check_pickles

    marker = tmp_path / "ran"
    evil = H.pt2_with_pickle(artifacts["exported-program"], tmp_path / "evil.pt2", marker, name="builtins.exec")
    assert made_with(evil) is None
    with pytest.raises(UnsafeArchiveError, match="names builtins.exec"):
        check_pickles(evil)
    assert check_pickles(artifacts["exported-program"]) == 1  # the honest sample inputs, read weights-only
    assert not marker.exists()


# ----------------------------------------------------------------------------------- native crashes
def _segfault(path: Path) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.skipif(os.name != "posix" or not hasattr(os, "fork"), reason="isolation forks (Linux)")
def test_runtime_crash_is_a_failed_verification(artifacts: dict, ckpts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime that dies with SIGSEGV while loading: exit 1 naming the crash, the report as always."""
    patch_format(monkeypatch, "onnx", load=_segfault, isolate=True)
    res = invoke("verify", artifacts["onnx"], ckpts["classifier"], *MODULE, "--json")
    assert res.code == 1, res
    (art,) = _one_json(res)["artifacts"]
    assert art["verification"]["problems"] == ["the onnx runtime crashed on this file (SIGSEGV)"], art


def test_isolated_and_in_process_agree(artifacts: dict, ckpts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child passes the outputs back exactly: the same max diff as the runtime run in-process."""
    from lightning_export import verify

    diffs = []
    for isolate in (True, False):
        patch_format(monkeypatch, "onnx", isolate=isolate)
        report = verify([artifacts["onnx"]], ckpts["classifier"], module=MODULE[1], attr="model")
        (art,) = report.artifacts
        assert art.verification.passed, art.verification
        diffs.append((art.verification.max_abs_diff, art.verification.inputs_checked))
    assert diffs[0] == diffs[1]


# ----------------------------------------------------------------------------------- bit flips and truncation
# The runtimes that load in a forked child (executorch, LiteRT, aoti) take seconds per case: slow tier.
@pytest.mark.parametrize("fmt", tiered(FUZZED, fast=["onnx", "openvino", "exported-program", "torchscript"]))
def test_fuzzed_artifacts_end_cleanly(artifacts: dict, ckpts: dict, tmp_path: Path, fmt: str) -> None:
    """One bit flipped, or the file cut: a documented exit code (never 70, never a signal), one JSON object, no
    traceback. An OpenVINO IR has its .xml or its .bin mutated."""
    if fmt not in artifacts:
        pytest.skip(f"{fmt}'s optional extra is not installed")
    # The runtime's Python modules imported here once: each case's child then only loads the file.
    for module in RUNTIME_MODULES.get(fmt, ()):
        importlib.import_module(module)
    src = artifacts[fmt]
    files = [src] + ([src.with_suffix(".bin")] if fmt == "openvino" else [])
    rng = random.Random(zlib.crc32(fmt.encode()))
    for i in range(CASES):
        case = tmp_path / str(i)
        case.mkdir()
        for f in files:
            shutil.copyfile(f, case / f.name)
        victim = case / files[i % len(files)].name
        label, blob = H.mutated(victim.read_bytes(), rng, truncate=i % 3 == 2)
        victim.write_bytes(blob)
        res = invoke("verify", case / src.name, ckpts["classifier"], *MODULE, "--json")
        assert res.code in DOCUMENTED - {0} or (res.code == 0 and "flip" in label), (fmt, label, res)
        assert "Traceback" not in res.stderr, (fmt, label, res)
        report = _one_json(res)
        assert report["ok"] is (res.code == 0), (fmt, label, report)
        shutil.rmtree(case)
