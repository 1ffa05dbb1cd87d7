"""The contract scripts rely on: exit codes, stdout holding only JSON, the JSON schema, a fast --help."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import REPO, run_lexport

ARTIFACT_KEYS = {"format", "path", "bytes", "sha256", "exporter", "verification"}
VERIFICATION_KEYS = {"passed", "inputs_checked", "max_abs_diff", "max_rel_diff", "atol", "rtol"}


def test_basic_invocation_json_schema(ckpts, tmp_path):
    """`lexport ckpt --module pkg:MyModule --attr model --to onnx`, as a CI step calls it."""
    res = run_lexport(ckpts["classifier"], "--module", "fixtures.modules:MyClassifierModule", "--attr", "model",
                      "--to", "onnx", "--to", "state-dict", "--output-dir", tmp_path, "--json")
    assert res.code == 0, res
    doc = json.loads(res.stdout)  # stdout is exactly one JSON object
    assert doc["ok"] is True and "error" not in doc
    assert set(doc["checkpoint"]) >= {"path", "sha256", "lightning_version", "epoch", "global_step"}
    import hashlib

    assert doc["checkpoint"]["sha256"] == hashlib.sha256(ckpts["classifier"].read_bytes()).hexdigest()
    assert doc["checkpoint"]["lightning_version"] and doc["checkpoint"]["global_step"] > 0
    assert doc["module"] == "fixtures.modules:MyClassifierModule" and doc["attr"] == "model"
    assert set(doc["versions"]) >= {"lexport", "torch", "onnx", "onnxruntime", "lightning"}
    assert [a["format"] for a in doc["artifacts"]] == ["onnx", "state-dict"]
    for a in doc["artifacts"]:
        assert set(a) >= ARTIFACT_KEYS
        assert set(a["verification"]) >= VERIFICATION_KEYS
        assert a["verification"]["passed"] is True
        with open(a["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == a["sha256"]
    onnx = doc["artifacts"][0]
    assert onnx["exporter"] in ("torch.onnx.dynamo", "torch.onnx.torchscript")
    assert onnx["verification"]["atol"] == 1e-4 and onnx["verification"]["inputs_checked"] >= 4
    assert not (tmp_path / "classifier.onnx.data").exists()  # one self-contained file under 2 GB
    assert "error" not in res.stderr.lower()


def test_human_output_goes_to_stderr(ckpts, tmp_path):
    res = run_lexport(ckpts["classifier"], "--attr", "model", "--to", "safetensors", "--output-dir", tmp_path)
    assert res.code == 0, res
    assert res.stdout == ""
    assert "safetensors" in res.stderr and "bit-exact" in res.stderr


def test_quiet_prints_nothing_on_success(ckpts, tmp_path):
    res = run_lexport(ckpts["classifier"], "--attr", "model", "--to", "state-dict", "--output-dir", tmp_path, "-q")
    assert (res.code, res.stdout, res.stderr) == (0, "", "")


def test_error_json_and_exit_codes(ckpts, tmp_path):
    res = run_lexport(tmp_path / "missing.ckpt", "--to", "state-dict", "--json")
    assert res.code == 3
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == 3 and doc["error"]["kind"] == "checkpoint"
    assert "Traceback" not in res.stderr

    res = run_lexport(ckpts["classifier"], "--to", "onx", "--output-dir", tmp_path)
    assert res.code == 2 and "onnx" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []

    res = run_lexport(ckpts["classifier"], "--to", "onnx", "--input", "float32(2,10)", "--module",
                      "fixtures.modules:MyClassifierModule", "--output-dir", tmp_path)
    assert res.code == 2 and "DTYPE[D0,D1,...]" in res.stderr

    res = run_lexport(ckpts["classifier"], "--to", "onnx", "--output-dir", tmp_path)
    assert res.code == 2 and "--module" in res.stderr

    res = run_lexport(ckpts["classifier"], "--bogus-flag")
    assert res.code == 2


def test_verification_failure_json(ckpts, tmp_path):
    res = run_lexport(ckpts["data_dependent"], "--module", "fixtures.modules:DataDependentBranch", "--attr", "model",
                      "--to", "torchscript", "--output-dir", tmp_path, "--json")
    assert res.code == 1
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["error"]["kind"] == "verification"
    v = doc["artifacts"][0]["verification"]
    assert v["passed"] is False and v["max_abs_diff"] > v["atol"]
    assert any(o["passed"] is False for o in v["outputs"])


def test_help_and_version_are_fast_and_import_no_torch():
    code = "import sys; import lightning_export.cli; print(sorted(m for m in ('torch', 'onnx', 'pytorch_lightning', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
    started = time.perf_counter()
    res = run_lexport("--help")
    elapsed = time.perf_counter() - started
    assert res.code == 0 and "Exit codes" in res.stdout and "exported-program" in res.stdout
    # help texts are rich markup: a literal [tool.lexport] must be escaped there, or rich eats it as a style tag
    assert "FILE ([tool.lexport] of a pyproject.toml" in res.stdout
    assert "Also apply [tool.lexport.profiles.NAME] of the settings" in res.stdout
    panels = [p for p in ("Inputs:", "Verification", "Output", "Precision and int8", "Data (", "Safety (",
                          "Format options", "Settings and report") if f"─ {p}" in res.stdout]
    assert panels == sorted(panels, key=lambda p: res.stdout.index(f"─ {p}")) and len(panels) == 8, panels
    assert elapsed < 5  # generous: the 0.5 s target is measured by `make bench`, not asserted here
    res = run_lexport("--version")
    assert res.code == 0 and res.stdout.startswith("lexport ")


def test_console_script_installed():
    """The `lexport` script sits beside the interpreter running the tests (a venv's bin/, activated or not)."""
    from pathlib import Path

    exe = Path(sys.executable).parent / ("lexport.exe" if sys.platform == "win32" else "lexport")
    assert exe.is_file(), f"the lexport console script is not installed beside {sys.executable}"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("lexport "), res


def test_hints_name_the_installed_lightning_package():
    """The prefix hints use is the package that is installed (the unified `lightning` first), found without importing
    Lightning; checked in a fresh interpreter against the installed distributions."""
    from importlib.metadata import PackageNotFoundError, version

    code = ("import sys; from lightning_export.errors import lightning_package; "
            "print(lightning_package(), 'lightning' in sys.modules or 'pytorch_lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    prefix, imported = out.stdout.split()
    try:
        version("lightning")
        expected = "lightning.pytorch"
    except PackageNotFoundError:
        expected = "pytorch_lightning"
    assert (prefix, imported) == (expected, "False")
    import importlib

    assert hasattr(importlib.import_module(prefix), "LightningModule")  # the hint names something importable
