"""A corpus of bad inputs. Each one exits with its documented code and ONE clear message on
stderr (no traceback), leaves no file in the output directory, and leaves the input byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import invoke, run_lexport

CLASSIFIER = "fixtures.modules:MyClassifierModule"


# --------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (or '<dir>') of everything under root; {} when root does not exist."""
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"<link to {os.readlink(p)}>"
        else:
            out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_clean_error(res, code: int, *needles: str) -> None:
    assert res.code == code, res
    err = res.stderr
    assert "Traceback" not in err and "Traceback" not in res.stdout, res
    # One message: exactly one "error (...)" line, nothing after the message and its hint but the hint.
    assert err.count("error (") == 1, res
    assert f"exit {code}" in err, res
    flat = " ".join(err.split())  # rich may wrap long lines
    for needle in needles:
        assert " ".join(needle.split()) in flat, f"{needle!r} not in stderr:\n{err}"


def rewrite_zip(src: Path, dst: Path, changes: dict[str, bytes]) -> None:
    """Copy a torch.save zip record by record, replacing some records (keyed by name after 'archive/')."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            short = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, changes.get(short, zin.read(info.filename)))


@dataclass
class Case:
    """`setup(tmp, ckpts)` prepares files under tmp/in (and may add more) and returns the CLI arguments;
    `{out}` in them is replaced by tmp/out (an empty directory that must stay empty)."""

    setup: Callable[[Path, dict], list[str]]
    code: int
    needles: tuple[str, ...] = ()
    dynamic_needles: Callable[[Path], tuple[str, ...]] | None = None
    out_must_stay_empty: bool = True
    extra_unchanged: tuple[str, ...] = field(default_factory=tuple)  # other paths under tmp to snapshot


def _copy(ckpts: dict, name: str, tmp: Path, as_name: str | None = None) -> Path:
    dst = tmp / "in" / (as_name or f"{name}.ckpt")
    shutil.copyfile(ckpts[name], dst)
    return dst


def _write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / "in" / name
    p.write_bytes(data)
    return p


def _torch_save(obj, path: Path) -> Path:
    import torch

    torch.save(obj, str(path))
    return path


# ---------------------------------------------------------------------------------------------- cases
def _missing(tmp, ck):
    return [tmp / "in" / "nope.ckpt", "--to", "state-dict", "--output-dir", "{out}"]


def _symlink_loop(tmp, ck):
    (tmp / "in" / "a.ckpt").symlink_to(tmp / "in" / "b.ckpt")
    (tmp / "in" / "b.ckpt").symlink_to(tmp / "in" / "a.ckpt")
    return [tmp / "in" / "a.ckpt", "--to", "state-dict", "--output-dir", "{out}"]


def _dangling_symlink(tmp, ck):
    (tmp / "in" / "last.ckpt").symlink_to(tmp / "in" / "epoch=3.ckpt")
    return [tmp / "in" / "last.ckpt", "--to", "state-dict", "--output-dir", "{out}"]


def _output_symlink_loop(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    (tmp / "in" / "a.pt").symlink_to(tmp / "in" / "b.pt")
    (tmp / "in" / "b.pt").symlink_to(tmp / "in" / "a.pt")
    return [p, "--to", "state-dict", "-o", tmp / "in" / "a.pt", "--force"]


def _directory(tmp, ck):
    d = tmp / "in" / "run_dir.ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("not a checkpoint")
    return [d, "--to", "state-dict", "--output-dir", "{out}"]


def _sharded(tmp, ck):
    d = tmp / "in" / "sharded"
    d.mkdir()
    (d / ".metadata").write_bytes(b"\x80\x04")
    (d / "__0_0.distcp").write_bytes(b"\0" * 16)
    return [d, "--to", "state-dict", "--output-dir", "{out}"]


def _empty(tmp, ck):
    return [_write(tmp, "empty.ckpt", b""), "--to", "state-dict", "--output-dir", "{out}"]


def _random_bytes(tmp, ck):
    data = bytes([0x80, 0xA5]) + random.Random(0).randbytes(4094)  # starts like no text and no zip
    return [_write(tmp, "random.ckpt", data), "--to", "state-dict", "--output-dir", "{out}"]


def _random_with_zip_magic(tmp, ck):
    data = b"PK\x03\x04" + random.Random(1).randbytes(2048)
    return [_write(tmp, "zipmagic.ckpt", data), "--to", "state-dict", "--output-dir", "{out}"]


def _truncated_zip(tmp, ck):
    data = Path(ck["classifier"]).read_bytes()
    return [_write(tmp, "truncated.ckpt", data[: len(data) // 2]), "--to", "state-dict", "--output-dir", "{out}"]


def _truncated_zip_tail(tmp, ck):
    data = Path(ck["classifier"]).read_bytes()
    return [_write(tmp, "cut.ckpt", data[:-30]), "--to", "safetensors", "--output-dir", "{out}"]


def _json(tmp, ck):
    data = b'{"state_dict": {"fc.weight": [[1.0, 2.0]]}, "epoch": 3}\n'
    return [_write(tmp, "config.ckpt", data), "--to", "state-dict", "--output-dir", "{out}"]


def _text(tmp, ck):
    data = b"model:\n  class_path: pkg.Model\n  init_args:\n    hidden: 12\n"
    return [_write(tmp, "notes.ckpt", data), "--to", "state-dict", "--output-dir", "{out}"]


def _torch_pickle_no_tensors(tmp, ck):
    p = _torch_save({"epoch": 3, "global_step": 10, "note": "no tensors here"}, tmp / "in" / "notensors.ckpt")
    return [p, "--to", "state-dict", "--output-dir", "{out}"]


def _raw_pickle_no_tensors(tmp, ck):
    data = pickle.dumps({"epoch": 3, "hyper_parameters": {"lr": 0.1}}, protocol=4)
    return [_write(tmp, "raw_pickle.ckpt", data), "--to", "state-dict", "--output-dir", "{out}"]


def _raw_pickle_protocol2(tmp, ck):
    data = pickle.dumps({"epoch": 3}, protocol=2)
    return [_write(tmp, "raw_pickle2.ckpt", data), "--to", "state-dict", "--output-dir", "{out}"]


def _state_dict_not_tensors(tmp, ck):
    p = _torch_save({"state_dict": {"w": 1.0, "b": "x"}, "epoch": 1}, tmp / "in" / "nottensors.ckpt")
    return [p, "--to", "state-dict", "--output-dir", "{out}"]


def _newer_torch(tmp, ck):
    dst = tmp / "in" / "from_the_future.ckpt"
    rewrite_zip(Path(ck["classifier"]), dst, {"version": b"99\n"})
    return [dst, "--to", "state-dict", "--output-dir", "{out}"]


def _damaged_global_name(tmp, ck):
    # One byte off inside the pickle: a global name that exists nowhere; nothing to --allow-global.
    src = Path(ck["classifier"])
    with zipfile.ZipFile(src) as z:
        pkl_name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        pkl = z.read(pkl_name)
    assert b"collections\nOrderedDict" in pkl
    dst = tmp / "in" / "damaged.ckpt"
    rewrite_zip(src, dst, {"data.pkl": pkl.replace(b"collections\nOrderedDict", b"collectioos\nOrderedDict")})
    return [dst, "--to", "state-dict", "--output-dir", "{out}"]


def _module_not_importable(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", "lexport_no_such_pkg.models:MyModule", "--to", "torchscript", "--output-dir", "{out}"]


def _module_file_missing(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", str(tmp / "in" / "nowhere.py") + ":MyModule", "--to", "onnx", "--output-dir", "{out}"]


def _module_dependency_missing(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    (tmp / "in" / "needs_dep.py").write_text("import lexport_missing_dependency\n\nclass M: pass\n")
    return [p, "--module", str(tmp / "in" / "needs_dep.py") + ":M", "--to", "onnx", "--output-dir", "{out}"]


def _class_missing(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", "fixtures.modules:NoSuchModule", "--to", "onnx", "--output-dir", "{out}"]


def _not_lightning(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", "fixtures.modules:SimpleClassifier", "--to", "onnx", "--output-dir", "{out}"]


def _attr_missing(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", CLASSIFIER, "--attr", "modle", "--to", "onnx", "--output-dir", "{out}"]


def _attr_missing_no_module(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--attr", "modle", "--to", "safetensors", "--output-dir", "{out}"]


def _attr_not_module(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", CLASSIFIER, "--attr", "example_input_array", "--to", "onnx", "--output-dir", "{out}"]


def _hparams_missing(tmp, ck):
    p = _copy(ck, "no_hparams", tmp)
    return [p, "--module", "fixtures.modules:NoHparamsClassifier", "--to", "onnx", "--output-dir", "{out}"]


def _hparams_bad_value(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", CLASSIFIER, "--init-arg", "hidden_size=lots", "--to", "onnx", "--output-dir", "{out}"]


def _hparams_other_class(tmp, ck):
    # The classifier's hyper_parameters (input_size, ...) do not fit EncoderDecoderLightning at all.
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", "fixtures.modules:EncoderDecoderLightning", "--to", "onnx", "--output-dir", "{out}"]


def _shape_mismatch(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", CLASSIFIER, "--init-arg", "hidden_size=32", "--to", "onnx", "--output-dir", "{out}"]


def _forward_fails(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", CLASSIFIER, "--attr", "model", "--input", "float32[2,7]", "--to", "onnx",
            "--output-dir", "{out}"]


def _unknown_format_close(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--to", "onx", "--output-dir", "{out}"]


def _unknown_format_far(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--to", "banana", "--output-dir", "{out}"]


def _no_format(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--output-dir", "{out}"]


def _malformed_input(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", CLASSIFIER, "--attr", "model", "--input", "float32[2,x]", "--to", "onnx",
            "--output-dir", "{out}"]


def _input_unknown_dtype(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--module", CLASSIFIER, "--attr", "model", "--input", "float31[2,10]", "--to", "onnx",
            "--output-dir", "{out}"]


def _output_for_two_formats(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--to", "state-dict", "--to", "safetensors", "-o", "{out}/x.pt"]


def _output_dir_parent_is_file(tmp, ck):
    # Runs as root in CI, where chmod does not stop writes; a path *through a regular file* fails for root too.
    p = _copy(ck, "classifier", tmp)
    (tmp / "blocker").write_text("a regular file")
    return [p, "--to", "state-dict", "--output-dir", tmp / "blocker" / "exports"]


def _output_parent_is_file(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    (tmp / "blocker").write_text("a regular file")
    return [p, "--to", "safetensors", "-o", tmp / "blocker" / "model.safetensors"]


def _output_in_proc(tmp, ck):
    # /proc refuses new files even for root.
    p = _copy(ck, "classifier", tmp)
    return [p, "--to", "state-dict", "-o", f"/proc/lexport-test-{os.getpid()}.pt"]


def _output_dir_in_proc(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--to", "state-dict", "--output-dir", f"/proc/lexport-test-{os.getpid()}"]


def _output_is_input(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    return [p, "--to", "state-dict", "-o", p, "--force"]


def _output_is_input_other_spelling(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    (tmp / "in" / "sub").mkdir()
    return [p, "--to", "state-dict", "-o", tmp / "in" / "sub" / ".." / p.name, "--force"]


def _output_is_input_symlink(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    (tmp / "in" / "link.pt").symlink_to(p)
    return [p, "--to", "state-dict", "-o", tmp / "in" / "link.pt", "--force"]


def _output_is_input_hardlink(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    os.link(p, tmp / "in" / "hard.pt")
    return [p, "--to", "state-dict", "-o", tmp / "in" / "hard.pt", "--force"]


def _output_is_input_default_name(tmp, ck):
    # A plain state dict `weights.pt` exported --to state-dict would be named weights.pt beside itself.
    import torch

    sd = torch.load(str(ck["classifier"]), weights_only=True)["state_dict"]
    p = _torch_save(sd, tmp / "in" / "weights.pt")
    return [p, "--to", "state-dict", "--force"]


def _output_exists(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    (tmp / "in" / "existing.pt").write_bytes(b"keep me")
    return [p, "--to", "state-dict", "-o", tmp / "in" / "existing.pt"]


def _output_is_directory(tmp, ck):
    p = _copy(ck, "classifier", tmp)
    (tmp / "in" / "adir.pt").mkdir()
    return [p, "--to", "state-dict", "-o", tmp / "in" / "adir.pt", "--force"]


CASES: dict[str, Case] = {
    "missing-path": Case(_missing, 3, ("checkpoint not found", "nope.ckpt")),
    "checkpoint-symlink-loop": Case(_symlink_loop, 3, ("a.ckpt", "symbolic link")),
    "checkpoint-dangling-symlink": Case(_dangling_symlink, 3, ("last.ckpt", "dangling symbolic link")),
    "directory": Case(_directory, 3, ("is a directory",)),
    "sharded-directory": Case(_sharded, 3, ("sharded",)),
    "empty-file": Case(_empty, 3, ("empty", "0 bytes")),
    "random-bytes": Case(_random_bytes, 3, ("random.ckpt", "not a torch checkpoint")),
    "random-bytes-zip-magic": Case(_random_with_zip_magic, 3, ("truncated or corrupt",)),
    "truncated-zip": Case(_truncated_zip, 3, ("truncated.ckpt", "truncated or corrupt")),
    "truncated-zip-tail": Case(_truncated_zip_tail, 3, ("truncated or corrupt",)),
    "json-named-ckpt": Case(_json, 3, ("text file", "not a torch checkpoint")),
    "text-named-ckpt": Case(_text, 3, ("text file",)),
    "torch-pickle-no-tensors": Case(_torch_pickle_no_tensors, 3, ("without a 'state_dict'", "epoch")),
    "raw-pickle-no-tensors": Case(_raw_pickle_no_tensors, 3, ("plain Python pickle", "not a checkpoint written by torch.save")),
    "raw-pickle-protocol-2": Case(_raw_pickle_protocol2, 3, ("not a torch checkpoint",)),
    "state-dict-without-tensors": Case(_state_dict_not_tensors, 3, ("does not hold tensors",)),
    "newer-torch": Case(_newer_torch, 3, ("newer torch", "version 99", "Upgrade torch")),
    "damaged-global-name": Case(_damaged_global_name, 3, ("collectioos.OrderedDict", "corrupt")),
    "module-not-importable": Case(
        _module_not_importable, 4, ("lexport_no_such_pkg", "Searched"),
        dynamic_needles=lambda tmp: (str(Path(__file__).resolve().parent.parent),),
    ),
    "module-file-missing": Case(_module_file_missing, 4, ("file not found", "nowhere.py")),
    "module-dependency-missing": Case(_module_dependency_missing, 4, ("lexport_missing_dependency",)),
    "class-missing": Case(_class_missing, 4, ("NoSuchModule", "MyClassifierModule")),
    "class-not-lightning": Case(_not_lightning, 4, ("SimpleClassifier", "not a LightningModule")),
    "attr-missing": Case(_attr_missing, 4, ("'modle'", "model (SimpleClassifier)")),
    "attr-missing-no-module": Case(_attr_missing_no_module, 4, ("'modle'", "model")),
    "attr-not-a-module": Case(_attr_not_module, 4, ("example_input_array", "not an nn.Module")),
    "hparams-missing": Case(_hparams_missing, 4, ("input_size", "--init-arg")),
    "hparams-bad-value": Case(_hparams_bad_value, 4, ("MyClassifierModule", "hidden_size='lots'")),
    "hparams-other-class": Case(_hparams_other_class, 4, ("does not fit EncoderDecoderLightning",)),
    "state-dict-shape-mismatch": Case(
        _shape_mismatch, 4, ("model.fc1.weight", "(20, 10)", "(32, 10)", "shape mismatch")
    ),
    "forward-fails": Case(_forward_fails, 4, ("float32[2, 7]", "mat1 and mat2")),
    "unknown-format-close": Case(_unknown_format_close, 2, ("unknown format 'onx'", "Did you mean --to onnx")),
    "unknown-format-far": Case(_unknown_format_far, 2, ("unknown format 'banana'", "safetensors")),
    "no-format": Case(_no_format, 2, ("--to",)),
    "malformed-input": Case(_malformed_input, 2, ("float32[2,x]", "malformed", "float32[2,10]")),
    "input-unknown-dtype": Case(_input_unknown_dtype, 2, ("float31", "unknown dtype")),
    "output-with-two-formats": Case(_output_for_two_formats, 2, ("-o/--output",)),
    "output-dir-parent-is-file": Case(_output_dir_parent_is_file, 6, ("blocker",), extra_unchanged=("blocker",)),
    "output-parent-is-file": Case(_output_parent_is_file, 6, ("blocker", "not a directory"),
                                  extra_unchanged=("blocker",)),
    "output-in-proc": Case(_output_in_proc, 6, ("cannot write in /proc",)),
    "output-dir-in-proc": Case(_output_dir_in_proc, 6, ("cannot create --output-dir /proc",)),
    "output-is-input": Case(_output_is_input, 6, ("is the input", "even with --force")),
    "output-is-input-other-spelling": Case(_output_is_input_other_spelling, 6, ("is the input",)),
    "output-is-input-symlink": Case(_output_is_input_symlink, 6, ("is the input",)),
    "output-is-input-hardlink": Case(_output_is_input_hardlink, 6, ("is the input",)),
    "output-is-input-default-name": Case(_output_is_input_default_name, 6, ("is the input",)),
    "output-symlink-loop": Case(_output_symlink_loop, 6, ("a.pt", "symbolic link loop")),
    "output-exists": Case(_output_exists, 6, ("already exists", "--force")),
    "output-is-directory": Case(_output_is_directory, 6, ("is a directory",)),
}


def _prepare(name: str, tmp: Path, ckpts: dict) -> tuple[Case, list[str], Path]:
    case = CASES[name]
    (tmp / "in").mkdir()
    out = tmp / "out"
    out.mkdir()
    args = [str(a).replace("{out}", str(out)) for a in case.setup(tmp, ckpts)]
    return case, args, out


def _check(case: Case, res, tmp: Path, out: Path, before: dict, extra_before: dict) -> None:
    needles = case.needles + (case.dynamic_needles(tmp) if case.dynamic_needles else ())
    assert_clean_error(res, case.code, *needles)
    assert snapshot(out) == {}, f"files left in the output dir: {snapshot(out)}"
    assert snapshot(tmp / "in") == before, "the input directory changed"
    for rel, snap in extra_before.items():
        assert snapshot(tmp / rel) == snap, f"{rel} changed"
    leftovers = [p for p in tmp.rglob(".lexport-tmp-*")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, ckpts: dict) -> None:
    case, args, out = _prepare(name, tmp_path, ckpts)
    before = snapshot(tmp_path / "in")
    extra_before = {rel: snapshot(tmp_path / rel) for rel in case.extra_unchanged}
    res = invoke(*args)
    _check(case, res, tmp_path, out, before, extra_before)


# A few cases through a real process: exit status, the stdout/stderr split and warnings as a shell sees them.
SUBPROCESS_CASES = ["raw-pickle-no-tensors", "random-bytes", "module-not-importable", "output-is-input"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(name: str, tmp_path: Path, ckpts: dict) -> None:
    case, args, out = _prepare(name, tmp_path, ckpts)
    before = snapshot(tmp_path / "in")
    res = run_lexport(*args)
    _check(case, res, tmp_path, out, before, {})
    assert res.stdout == "", res
    # One message: no Python warnings or log lines around it.
    assert "Warning" not in res.stderr, res
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("✓", "✗"))]
    assert lines[0].startswith("error ("), res


def test_bad_input_json_mode(tmp_path: Path, ckpts: dict) -> None:
    """--json: the error is one JSON object on stdout, still no traceback anywhere."""
    case, args, out = _prepare("random-bytes", tmp_path, ckpts)
    res = invoke(*args, "--json")
    assert res.code == 3, res
    data = res.json()
    assert data["ok"] is False and data["error"]["code"] == 3
    assert "not a torch checkpoint" in data["error"]["message"]
    assert "Traceback" not in res.stdout + res.stderr


def test_corpus_covers_every_exit_code() -> None:
    assert {c.code for c in CASES.values()} == {2, 3, 4, 6}


def test_sys_path_entries_listed(tmp_path: Path, ckpts: dict) -> None:
    """The not-importable message lists the sys.path entries that were searched."""
    case, args, out = _prepare("module-not-importable", tmp_path, ckpts)
    res = invoke(*args)
    flat = " ".join(res.stderr.split())
    shown = [p for p in sys.path if p and p in flat]
    assert len(shown) >= 2, res
