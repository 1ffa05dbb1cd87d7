"""`lexport verify --manifest` on a manifest as hostile as a checkpoint: malformed JSON and wrong types, devices and
FIFOs, paths leaving its folder, formats that do not match the files, and options that would run code. Each case
ends with a documented exit code (2 or 1, never 0 wrongly, never 70), one JSON object, and no code run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO, invoke, run_lexport

MODULE = "fixtures.modules:MyClassifierModule"
# The code a hostile manifest would have lexport import: it leaves a marker beside itself.
EVIL = (
    "import pathlib\n"
    "pathlib.Path(__file__).with_name('MARKER').write_text('ran')\n"
    "from fixtures.modules import MyClassifierModule\n"
)


@pytest.fixture(scope="module")
def export(ckpts: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real export with a manifest: two weights formats (fast to verify) and the module recorded."""
    out = tmp_path_factory.mktemp("manifest-export")
    res = invoke(ckpts["classifier"], "--module", MODULE, "--to", "safetensors,state-dict", "--output-dir", out,
                 "--manifest", out / "manifest.json", "--json")
    assert res.code == 0, res
    return {"out": out, "ckpt": Path(ckpts["classifier"]), "manifest": json.loads((out / "manifest.json").read_text())}


def stage(export: dict, folder: Path) -> dict:
    """A later CI stage: the artifacts, the checkpoint and (returned, to mutate and write) the manifest in one
    folder, every path relative to it."""
    folder.mkdir()
    for a in export["manifest"]["artifacts"]:
        shutil.copy(export["out"] / a["path"], folder / a["path"])
    shutil.copy(export["ckpt"], folder / export["ckpt"].name)
    manifest = json.loads(json.dumps(export["manifest"]))
    manifest["checkpoint"]["path"] = export["ckpt"].name
    return manifest


def write(folder: Path, manifest: dict | str) -> Path:
    path = folder / "manifest.json"
    path.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return path


def by_format(manifest: dict, name: str) -> dict:
    return next(a for a in manifest["artifacts"] if a["format"] == name)


def verify(path: Path, *extra: object) -> tuple[int, dict]:
    res = invoke("verify", "--manifest", path, "--json", *extra)
    return res.code, res.json()  # exactly one JSON object, or json.loads fails


def test_a_staged_manifest_verifies(export: dict, tmp_path: Path) -> None:
    """The unmutated case passes: each failure below is the mutation's."""
    folder = tmp_path / "stage"
    code, report = verify(write(folder, stage(export, folder)))
    assert code == 0, report
    assert {a["format"] for a in report["artifacts"]} == {"safetensors", "state-dict"}
    assert all(Path(a["path"]).parent == folder for a in report["artifacts"])


def _sha_as_number(m: dict) -> str:
    text = json.dumps(m)
    return text.replace(json.dumps(m["artifacts"][1]["sha256"]), "1e999")


MALFORMED = {
    # case -> (mutation of the manifest's text or object, what the message names)
    "nested 10^5 deep": (lambda m: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "nested 100 deep in options": (lambda m: {**m, "options": {"init_args": {"a": json.loads("[" * 100 + "]" * 100)}}},
                                   "nested more than"),
    "sha256 of 1e999": (_sha_as_number, "artifacts[1].sha256 must be a 64-hex string"),
    "checkpoint a string": (lambda m: {**m, "checkpoint": "classifier.ckpt"}, "checkpoint must be an object"),
    "checkpoint path a list": (lambda m: {**m, "checkpoint": {"path": ["x"]}}, "checkpoint.path must be"),
    "artifact path a number": (lambda m: {**m, "artifacts": [{**m["artifacts"][0], "path": 5}]},
                               "artifacts[0].path must be a non-empty string"),
    "artifacts an object": (lambda m: {**m, "artifacts": {"a": 1}}, "artifacts must be a list"),
    "seed a string": (lambda m: {**m, "options": {**m["options"], "seed": "7"}}, "options.seed must be an integer"),
    "atol NaN": (lambda m: json.dumps(m).replace('"atol": null', '"atol": NaN'), "NaN is not a JSON number"),
    "atol a boolean": (lambda m: {**m, "options": {**m["options"], "atol": True}}, "options.atol must be a finite"),
    "inputs a string": (lambda m: {**m, "options": {**m["options"], "inputs": "float32[2,10]"}},
                        "options.inputs must be a list of strings"),
    "init_args a list": (lambda m: {**m, "options": {**m["options"], "init_args": [1]}},
                         "options.init_args must be an object"),
    "path with NUL": (lambda m: {**m, "artifacts": [{**m["artifacts"][0], "path": "a\0b"}]}, "artifacts[0].path"),
    "a number of 5000 digits": (lambda m: json.dumps(m).replace('"seed": 0', '"seed": ' + "9" * 5000),
                                "not a lexport manifest"),
    "newer version": (lambda m: {**m, "manifest_version": 99}, "newer than this lexport reads"),
    "not an object": (lambda m: "[1, 2]", "no manifest_version"),
    "not UTF-8": (lambda m: "\udcff", "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_exit_2_naming_the_field(export: dict, tmp_path: Path, case: str) -> None:
    mutate, said = MALFORMED[case]
    folder = tmp_path / "stage"
    changed = mutate(stage(export, folder))
    path = folder / "manifest.json"
    if isinstance(changed, str):
        path.write_bytes(changed.encode("utf-8", "surrogateescape"))
    else:
        write(folder, changed)
    code, report = verify(path)
    assert code == 2, report
    assert said in report["error"]["message"], report["error"]
    assert report["error"]["message"].startswith(f"--manifest {path}")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_a_manifest_that_is_no_regular_file_is_refused_before_it_is_read(tmp_path: Path, kind: str) -> None:
    """A FIFO would block forever and /dev/zero never ends (6 GB in 9 s before): refused from stat(), in a real
    process bounded by a timeout."""
    path = {"fifo": tmp_path / "m.json", "dev-zero": Path("/dev/zero"), "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    res = run_lexport("verify", "--manifest", path, "--json", timeout=120)
    assert res.code == 2, res
    assert "not a regular file" in res.json()["error"]["message"]


LEAVING = {
    # case -> (mutation given the stage folder and the export, what the message says)
    "../../etc/passwd": (lambda m, f, e: by_format(m, "safetensors").update(path="../../../../../../etc/passwd"),
                         "a path through '..'"),
    "an absolute path to a valid artifact": (
        lambda m, f, e: (by_format(m, "safetensors").update(path=str(e["out"] / "classifier.safetensors")),
                         (f / "classifier.safetensors").unlink()), "an absolute path"),
    "a symlink to a valid artifact elsewhere": (
        lambda m, f, e: ((f / "classifier.safetensors").unlink(),
                         (f / "classifier.safetensors").symlink_to(e["out"] / "classifier.safetensors")),
        "resolves through a symlink to"),
    "the checkpoint through ..": (
        lambda m, f, e: ((f / e["ckpt"].name).unlink(), m["checkpoint"].update(path=os.path.relpath(e["ckpt"], f))),
        "lexport verify --manifest"),
    "a data file that is /etc/passwd": (lambda m, f, e: m["options"].update(data="/etc/passwd"), "--data yourself"),
    "a config through a symlinked folder": (
        lambda m, f, e: ((f / "cfg").symlink_to("/etc"), m["options"].update(config="cfg/passwd")),
        "resolves through a symlink to"),
}


@pytest.mark.parametrize("case", sorted(LEAVING))
def test_a_path_leaving_the_manifests_folder_is_refused(export: dict, tmp_path: Path, case: str) -> None:
    mutate, said = LEAVING[case]
    folder = tmp_path / "stage"
    manifest = stage(export, folder)
    mutate(manifest, folder, export)
    code, report = verify(write(folder, manifest))
    assert code == 2, report
    message = report["error"]["message"]
    assert "leaves the manifest's folder" in message and said in message and "--allow-outside" in message, message


def test_allow_outside_takes_a_valid_artifact_elsewhere(export: dict, tmp_path: Path) -> None:
    folder = tmp_path / "stage"
    manifest = stage(export, folder)
    (folder / "classifier.safetensors").unlink()
    by_format(manifest, "safetensors")["path"] = str(export["out"] / "classifier.safetensors")
    code, report = verify(write(folder, manifest), "--allow-outside")
    assert code == 0, report
    assert by_format(report, "safetensors")["path"] == str(export["out"] / "classifier.safetensors")


def test_a_checkpoint_outside_the_folder_is_named_on_the_command_line(export: dict, tmp_path: Path) -> None:
    """The export's own manifest records its checkpoint outside its folder: name it (its sha256 still counts)."""
    code, report = verify(export["out"] / "manifest.json")
    assert code == 2 and "checkpoint.path" in report["error"]["message"], report
    res = invoke("verify", "--manifest", export["out"] / "manifest.json", export["ckpt"], "--json")
    assert res.code == 0, res
    other = tmp_path / "other.ckpt"
    import torch

    raw = torch.load(str(export["ckpt"]), weights_only=True)
    raw["epoch"] = 99  # same weights, another file
    torch.save(raw, str(other))
    res = invoke("verify", "--manifest", export["out"] / "manifest.json", other, "--json")
    assert res.code == 1 and "not the checkpoint the manifest records" in res.json()["error"]["message"], res


def test_a_recorded_format_must_match_the_file(export: dict, tmp_path: Path) -> None:
    """Two entries with their format names swapped passed with exit 0 before."""
    folder = tmp_path / "stage"
    manifest = stage(export, folder)
    a, b = manifest["artifacts"]
    a["format"], b["format"] = b["format"], a["format"]
    code, report = verify(write(folder, manifest))
    assert code == 1, report
    for result in report["artifacts"]:
        (problem,) = result["verification"]["problems"]
        other = "state-dict" if result["format"] == "safetensors" else "safetensors"
        assert f"records format {other!r}" in problem and f"the file is {result['format']!r}" in problem


@pytest.mark.parametrize("how", ["a .py file beside it", "a module name found in its folder"])
def test_a_manifest_never_imports_code_shipped_with_it(export: dict, tmp_path: Path, how: str) -> None:
    folder = tmp_path / "stage"
    manifest = stage(export, folder)
    (folder / "evil_mod.py").write_text(EVIL)
    manifest["options"]["module"] = "evil_mod.py:MyClassifierModule" if how.startswith("a .py") else \
        "evil_mod:MyClassifierModule"
    path = write(folder, manifest)
    # From the manifest's folder: the module name resolves there, as `python -m` would import it.
    res = run_lexport("verify", "--manifest", path.name, "--json", cwd=folder, env={"PYTHONPATH": str(REPO)})
    assert res.code == 2, res
    message = res.json()["error"]["message"]
    assert "options.module" in message and "--trust-manifest" in message and "--module" in message, message
    assert not (folder / "MARKER").exists(), "the manifest's code ran"


def test_trust_manifest_imports_its_module_file(export: dict, tmp_path: Path) -> None:
    """The gate above is what stops it: with --trust-manifest the same manifest imports its file."""
    folder = tmp_path / "stage"
    manifest = stage(export, folder)
    (folder / "trusted_mod.py").write_text(EVIL)
    manifest["options"]["module"] = f"{folder / 'trusted_mod.py'}:MyClassifierModule"  # as --module takes it
    path = write(folder, manifest)
    res = run_lexport("verify", "--manifest", path, "--trust-manifest", "--json", env={"PYTHONPATH": str(REPO)})
    assert res.code == 0, res
    assert (folder / "MARKER").exists()


@pytest.mark.skipif(not __import__("importlib").util.find_spec("hydra"), reason="hydra-core is not installed")
@pytest.mark.parametrize("where", ["init_args", "config"])
def test_a_manifest_never_instantiates_the_classes_it_names(export: dict, tmp_path: Path, where: str) -> None:
    """Hydra's _target_ in a recorded init argument (or a config) would call os.makedirs (or worse)."""
    folder = tmp_path / "stage"
    manifest = stage(export, folder)
    marker = folder / "MARKER"
    evil = {"_target_": "os.makedirs", "_args_": [str(marker)]}  # os.system is on Hydra 1.3.8's blocklist
    if where == "init_args":
        manifest["options"]["init_args"] = {"hidden_size": evil}
    else:
        (folder / "config.yaml").write_text(json.dumps({"model": {"class_path": "fixtures.modules.MyClassifierModule",
                                                                  "init_args": {"hidden_size": evil}}}))
        manifest["options"]["config"] = "config.yaml"
    code, report = verify(write(folder, manifest))
    assert code == 2, report
    assert "names classes" in report["error"]["message"] and "--trust-manifest" in report["error"]["message"]
    assert not marker.exists()


def test_a_manifest_never_turns_on_the_checkpoint_trust_flags(export: dict, tmp_path: Path) -> None:
    """Nor loosens the growth bound (1e300 would lift the address-space limit on loading)."""
    folder = tmp_path / "stage"
    manifest = stage(export, folder)
    manifest["options"].update(trust_checkpoint=True, allow_globals=["os.system"], max_growth=1e300)
    code, report = verify(write(folder, manifest))
    assert code == 0, report
    said = " ".join(report["warnings"])
    assert "--trust-checkpoint: a manifest never turns it on" in said and "--allow-global os.system" in said
    assert "--max-growth 1e+300: a manifest never loosens" in said


def test_the_python_verify_takes_a_manifest(export: dict, tmp_path: Path) -> None:
    import lightning_export
    from lightning_export import LexportError

    folder = tmp_path / "stage"
    path = write(folder, stage(export, folder))
    report = lightning_export.verify(manifest=path)
    assert report.ok and {a.format for a in report.artifacts} == {"safetensors", "state-dict"}
    manifest = stage(export, tmp_path / "stage2")
    by_format(manifest, "state-dict")["path"] = "/etc/passwd"
    with pytest.raises(LexportError) as e:
        lightning_export.verify(manifest=write(tmp_path / "stage2", manifest))
    assert e.value.exit_code == 2 and "leaves the manifest's folder" in e.value.message


def test_a_companion_file_may_not_leave_the_folder_either(export: dict, tmp_path: Path) -> None:
    """Files published beside an artifact (`<name>.*`: ONNX external data) are read with it: a symlink out of the
    folder fails the artifact before it is loaded (exit 1), unless --allow-outside."""
    folder = tmp_path / "stage"
    path = write(folder, stage(export, folder))
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x")
    (folder / "classifier.safetensors.data").symlink_to(outside)
    code, report = verify(path)
    assert code == 1, report
    (problem,) = by_format(report, "safetensors")["verification"]["problems"]
    assert "classifier.safetensors.data" in problem and "outside the manifest's folder" in problem
    assert by_format(report, "state-dict")["verification"]["passed"]
    code, report = verify(path, "--allow-outside")
    assert code == 0, report
