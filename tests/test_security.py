"""Loading never runs code from the checkpoint unless --trust-checkpoint says so.

- torch.load is always called with weights_only=True (explicitly, so an inherited
  TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off) and never retried with weights_only=False;
- a refused checkpoint names the globals it wants and the two ways in (--allow-global, --trust-checkpoint);
- a class named inside a checkpoint (_class_path, _instantiator, class_path in hparams) is never imported;
- torch < 2.6 is refused for untrusted loads.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import invoke, run_lexport

from lightning_export.errors import CheckpointError, UsageError
from lightning_export.safeload.placeholders import Unloaded, placeholder, unloaded_by_key, unloaded_in
from lightning_export.safeload.policy import allow_global_flag, code_running, import_dotted
from lightning_export.sources import load_checkpoint


def _flat(text: str) -> str:
    return " ".join(text.split())


class Evil:
    """Unpickling this creates a directory: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "in" / "evil.ckpt"
    path.parent.mkdir(exist_ok=True)
    torch.save(
        {"state_dict": {"layer.weight": torch.ones(2, 2)}, "epoch": 1, "payload": Evil(marker)},
        str(path),
    )
    return path, marker


# ------------------------------------------------------------------------------------ malicious payloads
def test_malicious_checkpoint_never_runs_without_trust(tmp_path: Path) -> None:
    path, marker = _malicious(tmp_path)
    res = invoke(path, "--to", "state-dict", "--output-dir", tmp_path / "out")
    assert res.code == 3, res
    assert not marker.exists(), "code from the checkpoint ran"
    flat = _flat(res.stderr)
    assert "posix.mkdir" in flat and "not loaded by default" in flat
    assert "--trust-checkpoint" in flat and "runs code from the file" in flat
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_malicious_checkpoint_never_runs_with_force_env_in_process(tmp_path: Path, monkeypatch) -> None:
    path, marker = _malicious(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    res = invoke(path, "--to", "state-dict", "--output-dir", tmp_path / "out")
    assert res.code == 3, res
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1", "the caller's environment was not restored"


def test_malicious_checkpoint_never_runs_with_force_env_subprocess(tmp_path: Path) -> None:
    """As a user's shell would run it: the variable inherited from the environment."""
    path, marker = _malicious(tmp_path)
    res = run_lexport(path, "--to", "state-dict", "--output-dir", tmp_path / "out",
                      env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert res.code == 3, res
    assert not marker.exists(), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turned weights_only off"
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert "posix.mkdir" in _flat(res.stderr)


def test_malicious_checkpoint_runs_with_trust(tmp_path: Path) -> None:
    """The control: the payload is real, and --trust-checkpoint (full unpickling) does run it."""
    path, marker = _malicious(tmp_path)
    res = invoke(path, "--to", "state-dict", "--output-dir", tmp_path / "out", "--trust-checkpoint")
    assert marker.exists(), "the payload did not run: the tests above prove nothing"
    assert res.code == 0, res


def test_blocked_global_is_never_offered_as_allow_global(tmp_path: Path) -> None:
    """os/posix/sys functions cannot be allowed by the safe loader; the hint must not pretend otherwise."""
    path, marker = _malicious(tmp_path)
    # --allow-global itself refuses a function from os (exit 2) before anything is read.
    res = invoke(path, "--to", "state-dict", "--output-dir", tmp_path / "out", "--allow-global", "os.mkdir")
    assert res.code == 2, res
    assert "never allowed" in _flat(res.stderr)
    res = invoke(path, "--to", "state-dict", "--output-dir", tmp_path / "out")
    assert res.code == 3, res
    assert not marker.exists()
    flat = _flat(res.stderr)
    assert "--allow-global posix.mkdir" not in flat
    assert "never allowed" in flat


def test_weights_only_always_explicit_never_retried(tmp_path: Path, monkeypatch, ckpts: dict) -> None:
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(dict(kwargs))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    evil, marker = _malicious(tmp_path)
    garbage = tmp_path / "in" / "garbage.ckpt"
    garbage.write_bytes(bytes([0x80, 0x02]) + random.Random(0).randbytes(512))
    for path in (evil, garbage):
        with pytest.raises(CheckpointError):
            load_checkpoint(path, hash_file=False)
    load_checkpoint(ckpts["classifier"], hash_file=False)
    assert calls, "torch.load was not called"
    assert all(c.get("weights_only") is True for c in calls), calls
    assert len(calls) == 3, "a failed load was retried"
    assert not marker.exists()


# ---------------------------------------------------------------------------------- --allow-global
def _namespace_ckpt(tmp_path: Path, legacy: bool = False) -> Path:
    path = tmp_path / "in" / ("ns_legacy.ckpt" if legacy else "ns.ckpt")
    path.parent.mkdir(exist_ok=True)
    torch.save(
        {
            "state_dict": {"fc.weight": torch.randn(3, 2), "fc.bias": torch.zeros(3)},
            "hyper_parameters": argparse.Namespace(lr=0.1, hidden=3),
            "epoch": 2,
        },
        str(path),
        _use_new_zipfile_serialization=not legacy,
    )
    return path


def test_unsafe_global_message_names_it_and_both_ways_in(tmp_path: Path) -> None:
    """A legacy (non-zip) file cannot be scanned for its globals, so an object in it is refused with the hint."""
    path = _namespace_ckpt(tmp_path, legacy=True)
    res = invoke(path, "--to", "state-dict", "--output-dir", tmp_path / "out")
    assert res.code == 3, res
    flat = _flat(res.stderr)
    assert "argparse.Namespace" in flat
    assert "not loaded by default" in flat
    assert "--allow-global argparse.Namespace" in flat
    assert "--trust-checkpoint" in flat and "runs code from the file" in flat
    assert "weights_only=False" not in flat  # torch's own advice is not passed on
    assert res.stderr.count("error (") == 1 and "Traceback" not in res.stderr


def test_object_hparams_are_placeholders_until_allowed_and_allowing_is_scoped(tmp_path: Path) -> None:
    path = _namespace_ckpt(tmp_path)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    res = invoke(path, "--to", "safetensors", "--output-dir", tmp_path / "out")
    assert res.code == 0, res
    assert isinstance(load_checkpoint(path, hash_file=False).raw["hyper_parameters"], Unloaded)
    ckpt = load_checkpoint(path, hash_file=False, allow_globals=("argparse.Namespace",))
    assert ckpt.raw["hyper_parameters"] == argparse.Namespace(lr=0.1, hidden=3)
    # safe_globals is a context manager: nothing stays allowed for later loads in the process.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    assert isinstance(load_checkpoint(path, hash_file=False).raw["hyper_parameters"], Unloaded)


def test_allow_global_takes_comma_separated_names_and_leaves_the_rest_unloaded(tmp_path: Path) -> None:
    import collections
    import fractions

    path = tmp_path / "in" / "two.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(1)}, "a": argparse.Namespace(x=1),
                "b": fractions.Fraction(1, 3), "c": collections.Counter("ab")}, str(path))
    raw = load_checkpoint(path, hash_file=False, allow_globals=("argparse.Namespace",)).raw
    assert raw["a"] == argparse.Namespace(x=1) and isinstance(raw["b"], Unloaded)
    assert raw["b"].name == "fractions.Fraction" and raw["c"] == collections.Counter("ab")
    raw = load_checkpoint(path, hash_file=False, allow_globals=("argparse.Namespace,fractions.Fraction",)).raw
    assert raw["a"] == argparse.Namespace(x=1) and raw["b"] == fractions.Fraction(1, 3)
    res = invoke(path, "--to", "state-dict", "--output-dir", tmp_path / "out",
                 "--allow-global", "argparse.Namespace,fractions.Fraction")
    assert res.code == 0, res


@pytest.mark.parametrize("name, needle", [
    ("Namespace", "dotted path"),
    ("lexport_no_such_module.Thing", "cannot be imported"),
    ("argparse.NoSuchClass", "cannot be imported"),
])
def test_bad_allow_global_is_a_usage_error(tmp_path: Path, ckpts: dict, name: str, needle: str) -> None:
    src = tmp_path / "c.ckpt"
    shutil.copyfile(ckpts["classifier"], src)
    res = invoke(src, "--to", "state-dict", "--output-dir", tmp_path / "out", "--allow-global", name)
    assert res.code == 2, res
    assert needle in _flat(res.stderr)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------ classes named in a checkpoint
EVIL_MODULE = textwrap.dedent(
    """
    import os
    import pytorch_lightning as pl
    from torch import nn

    open(os.environ["LEXPORT_TEST_MARKER"], "w").write("imported")

    class EvilModule(pl.LightningModule):
        def __init__(self, dim: int = 2):
            super().__init__()
            self.layer = nn.Linear(dim, dim)

        def forward(self, x):
            return self.layer(x)

    def instantiate(cls, *args, **kwargs):
        open(os.environ["LEXPORT_TEST_MARKER"], "a").write("called")
        return cls(*args, **kwargs)
    """
)


def _marker_module(tmp_path: Path, monkeypatch, prefix: str, source: str, marker_name: str):
    """An importable module (tmp_path/pkg on sys.path) that writes to a marker file: (module name, marker, pkg)."""
    modname = f"{prefix}_{os.getpid()}"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / f"{modname}.py").write_text(source)
    marker = tmp_path / marker_name
    monkeypatch.setenv("LEXPORT_TEST_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(pkg))
    return modname, marker, pkg


@pytest.fixture
def named_class_ckpt(tmp_path: Path, monkeypatch):
    """A checkpoint whose hyper_parameters name an importable module that leaves a marker when imported."""
    modname, marker, _ = _marker_module(tmp_path, monkeypatch, "lexport_evil", EVIL_MODULE, "IMPORTED")
    path = tmp_path / "in" / "named.ckpt"
    path.parent.mkdir()
    torch.save(
        {
            "state_dict": {"layer.weight": torch.eye(2), "layer.bias": torch.zeros(2)},
            "hyper_parameters": {
                "dim": 2,
                "_class_path": f"{modname}.EvilModule",
                "_instantiator": f"{modname}.instantiate",
            },
        },
        str(path),
    )
    yield path, marker, modname
    sys.modules.pop(modname, None)


def test_class_path_in_checkpoint_is_not_imported(named_class_ckpt, tmp_path: Path) -> None:
    path, marker, modname = named_class_ckpt
    res = invoke(path, "--to", "torchscript", "--output-dir", tmp_path / "out")
    assert res.code == 2, res
    assert not marker.exists(), "a class named inside the checkpoint was imported"
    assert modname not in sys.modules
    flat = _flat(res.stderr)
    assert f"--module {modname}:EvilModule" in flat.replace("'", "")
    assert "Traceback" not in res.stderr


def test_class_path_ignored_for_weights_formats(named_class_ckpt, tmp_path: Path) -> None:
    path, marker, modname = named_class_ckpt
    res = invoke(path, "--to", "state-dict", "--to", "safetensors", "--output-dir", tmp_path / "out")
    assert res.code == 0, res
    assert not marker.exists()
    assert modname not in sys.modules


def test_class_path_imported_only_with_trust(named_class_ckpt, tmp_path: Path) -> None:
    """The control: with --trust-checkpoint the named class is used (so the tests above can fail)."""
    path, marker, modname = named_class_ckpt
    res = invoke(path, "--to", "torchscript", "--output-dir", tmp_path / "out", "--trust-checkpoint",
                 "--input", "float32[2,2]")
    assert marker.exists()
    assert res.code == 0, res


def test_nested_class_path_in_hparams_is_not_imported(named_class_ckpt, tmp_path: Path) -> None:
    path, marker, modname = named_class_ckpt
    path2 = tmp_path / "in" / "nested.ckpt"
    torch.save(
        {
            "state_dict": {"model.layer.weight": torch.eye(2)},
            "hyper_parameters": {"encoder": {"class_path": f"{modname}.EvilModule", "init_args": {"dim": 2}}},
        },
        str(path2),
    )
    res = invoke(path2, "--module", "fixtures.modules:InjectedEncoderModule", "--to", "onnx",
                 "--output-dir", tmp_path / "out")
    assert res.code == 4, res
    assert not marker.exists()
    assert modname not in sys.modules
    assert "class_path" in res.stderr and "Traceback" not in res.stderr


PAYLOAD_MODULE = textwrap.dedent(
    """
    import os

    def _mark(what):
        open(os.environ["LEXPORT_TEST_MARKER"], "a").write(what + "\\n")

    _mark("imported")

    class Payload:
        def __new__(cls, *args):
            _mark("new")
            return super().__new__(cls)

        def __init__(self, *args):
            _mark("init")

        def __setstate__(self, state):
            _mark("setstate")

        def __reduce__(self):  # pickled as a call: REDUCE
            return (Payload, (1, 2))

    class Built:
        def __setstate__(self, state):  # pickled as NEWOBJ + BUILD
            _mark("setstate")

    def run_me(*args):
        _mark("called")
    """
)


def test_placeholders_never_import_call_or_build_what_the_file_names(tmp_path: Path, monkeypatch) -> None:
    """hyper_parameters holding objects of an importable module whose import, __new__, __init__, __setstate__ and
    functions all leave a marker: a weights export succeeds and the marker never appears (REDUCE, NEWOBJ, BUILD and
    a function call in the pickle all meet placeholders). --trust-checkpoint is the control: it does run them."""
    import pickletools

    modname, marker, pkg = _marker_module(tmp_path, monkeypatch, "lexport_payload", PAYLOAD_MODULE, "MARKER")
    path = tmp_path / "in" / "payload.ckpt"
    path.parent.mkdir()
    save = (
        f"import torch, {modname} as m, copyreg\n"
        "class Call:\n    def __reduce__(self): return (m.run_me, ('x',))\n"
        "b = m.Built(); b.width = 3\n"
        "torch.save({'state_dict': {'layer.weight': torch.eye(2)}, 'hyper_parameters': "
        "{'a': m.Payload(), 'b': b, 'c': Call(), 'd': [m.Payload, m.run_me]}}, " + repr(str(path)) + ")\n"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", save], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(pkg)}, capture_output=True)
    marker.unlink()
    ops = {op.name for op, _, _ in pickletools.genops(zipfile.ZipFile(path).read("payload/data.pkl"))}
    assert {"REDUCE", "NEWOBJ", "BUILD", "GLOBAL"} <= ops, ops
    sys.modules.pop(modname, None)
    res = invoke(path, "--to", "safetensors", "--to", "state-dict", "--output-dir", tmp_path / "out")
    assert res.code == 0, res
    assert not marker.exists(), marker.read_text()
    assert modname not in sys.modules
    hp = load_checkpoint(path, hash_file=False).hparams
    assert {k: type(v).__mro__[1] for k, v in hp.items() if k != "d"} == dict.fromkeys("abc", Unloaded)
    assert not marker.exists() and modname not in sys.modules
    load_checkpoint(path, hash_file=False, trust=True)
    assert "called" in marker.read_text(), "the control: full unpickling runs the file's calls"
    sys.modules.pop(modname, None)


def test_lightning_cli_checkpoint_needs_module(ckpts: dict, tmp_path: Path) -> None:
    """The real LightningCLI checkpoint: its _class_path is shown as the --module to pass, not used."""
    src = tmp_path / "cli.ckpt"
    shutil.copyfile(ckpts["cli"], src)
    raw = torch.load(str(src), weights_only=True)
    assert raw["hyper_parameters"]["_class_path"] == "fixtures.config_modules.CliModel"
    assert "_instantiator" in raw["hyper_parameters"]
    res = invoke(src, "--to", "onnx", "--output-dir", tmp_path / "out")
    assert res.code == 2, res
    assert "--module fixtures.config_modules:CliModel" in _flat(res.stderr).replace("'", "")
    # ... and the command it suggests works.
    res = invoke(src, "--module", "fixtures.config_modules.CliModel", "--to", "state-dict", "--output-dir",
                 tmp_path / "out")
    assert res.code == 0, res


# ----------------------------------------------------------------------------------------- torch version
@pytest.mark.parametrize("version", ["2.5.1", "2.5.1+cpu", "1.13.0", "2.4.0a0+git1234"])
def test_old_torch_refused_for_untrusted_loads(monkeypatch, ckpts: dict, version: str) -> None:
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpts["classifier"], hash_file=False)
    assert "2.6" in str(info.value) and "--trust-checkpoint" in str(info.value)
    ck = load_checkpoint(ckpts["classifier"], trust=True, hash_file=False)
    assert ck.state_dict


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+gitabc", "2.10.1+cu126", "2.13.0.dev20260101", "3.0"])
def test_new_enough_torch_versions_accepted(monkeypatch, ckpts: dict, version: str) -> None:
    monkeypatch.setattr(torch, "__version__", version)
    assert load_checkpoint(ckpts["classifier"], hash_file=False).state_dict


def test_old_torch_refused_via_cli(monkeypatch, ckpts: dict, tmp_path: Path) -> None:
    monkeypatch.setattr(torch, "__version__", "2.5.0")
    res = invoke(ckpts["classifier"], "--to", "state-dict", "--output-dir", tmp_path / "out")
    assert res.code == 3, res
    assert "weights_only bypasses" in _flat(res.stderr)


def test_allow_global_bad_name_unit() -> None:
    with pytest.raises(UsageError):
        import_dotted("NoDots")


# ------------------------------------------------------------------------------ placeholders: review findings
def test_hparams_sharing_one_big_list_are_walked_in_bounded_time(tmp_path: Path) -> None:
    """6,000 hyper-parameters sharing one 300,000-item list (which holds an object left unloaded): walked once per
    key, that was hours of work from a 700 kB file; the shared walk budget ends it in seconds."""
    import fractions

    shared = [0] * 300_000 + [fractions.Fraction(1, 3)]
    path = tmp_path / "shared.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {f"k{i}": shared for i in range(6000)}},
               str(path))
    assert path.stat().st_size < 1_000_000
    res = run_lexport(path, "--to", "safetensors", "-o", tmp_path / "w.safetensors", "--json", timeout=60)
    assert res.code == 0, res
    assert any("k0, k1" in n and "left unloaded" in n for n in res.json()["notes"]), res.json()["notes"]


def test_allow_global_hint_offers_only_safe_names_as_one_shell_word() -> None:
    assert allow_global_flag(["pkg.mod.Good", "a.B$(touch x)", "numpy.load", "os.system"]) == (
        "--allow-global pkg.mod.Good")
    assert allow_global_flag(["a.B;rm -rf ~", "builtins.eval"]) == ""
    assert allow_global_flag(["b.Second", "a.First", "a.First"]) == "--allow-global a.First,b.Second"


def test_placeholder_names_are_printed_escaped() -> None:
    ph = placeholder("evil\x1b]0;HACKED\x07.Net")()
    assert "\x1b" not in ph.what and "\x07" not in ph.what and "\x1b" not in repr(ph)
    from lightning_export.pipeline.inspection import plain_value

    assert "\x1b" not in plain_value(ph)[1]


def test_placeholders_hidden_in_object_attributes_are_found() -> None:
    """torch's unpickler BUILDs an OrderedDict's __dict__ and sets tensor attributes: placeholders there count."""
    import collections

    od = collections.OrderedDict(a=1)
    od.__dict__["hidden"] = placeholder("p.Hidden")()
    t = torch.ones(1)
    t.extra = [placeholder("q.Extra")]
    assert unloaded_in(od) == ["p.Hidden"]
    assert unloaded_in({"t": t}) == ["q.Extra"]
    assert unloaded_by_key({"cfg": od, "plain": [1, 2], "t": t}) == {"cfg": ["p.Hidden"], "t": ["q.Extra"]}


@pytest.mark.parametrize("name", ["numpy.load", "numpy._core.multiarray._reconstruct", "torch.load",
                                  "torch.utils.model_zoo.load_url", "pandas.read_pickle", "hydra.utils.instantiate",
                                  "pathlib.Path.write_text", "pathlib.PosixPath.unlink", "builtins.eval"])
def test_loaders_are_code_running_names(name: str) -> None:
    """A file naming a function that loads or writes files is refused outright, never placeholder-loaded (numpy's
    reconstructor, which --allow-global admits, is the control: it is not)."""
    assert code_running(name) == (name != "numpy._core.multiarray._reconstruct")


@pytest.mark.parametrize("name", ["pathlib.PosixPath", "hydra._internal.target_policy._DeferredTarget", "numpy.ndarray",
                                  "torch.optim.adam.Adam", "fixtures.config_modules.CliEncoder"])
def test_ordinary_classes_stay_placeholders(name: str) -> None:
    assert not code_running(name)
