"""Artifacts appear at their final path complete and verified, or not at all.

Everything is written into a private `.lexport-tmp-<pid>-*` dir beside the destination, fsynced, verified, then
moved into place (never replacing a file unless --force: see test_faults.py). On a failure, Ctrl-C, SIGTERM or SIGKILL nothing partial is left at the final
path; temp files are removed (by the next run in that directory after a SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, invoke, patch_format

from lightning_export import outputs
from lightning_export.formats import REGISTRY

CLASSIFIER = "fixtures.modules:MyClassifierModule"
BIG_FLOATS = 100_000_000  # 400 MB of float32: writing it takes long enough to interrupt it half-way


# --------------------------------------------------------------------------------------------- helpers
def temp_dirs(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{outputs.TMP_PREFIX}*"))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain state dict of 400 MB of zeros (built once per module, copied nowhere: tests only read it)."""
    import torch

    path = tmp_path_factory.mktemp("big") / "big.pt"
    torch.save({"w": torch.zeros(BIG_FLOATS), "b": torch.zeros(4)}, str(path))
    return path


def _spawn(*args: object, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("LEXPORT_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_export", *map(str, args)],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a signal for it never reaches pytest
    )


def _wait_for_partial_write(proc: subprocess.Popen, directory: Path, name: str, timeout: float = 120) -> int:
    """Poll until the staged artifact exists in a temp dir with some bytes in it; return its size then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"lexport ended (rc={proc.returncode}) before it was interrupted:\n{err[-3000:]}")
        for d in temp_dirs(directory):
            try:
                size = (d / name).stat().st_size
            except OSError:
                continue
            if size > 0:
                return size
        time.sleep(0.003)
    proc.kill()
    pytest.fail("the staged artifact never appeared")


# ---------------------------------------------------------------------------------------- kill / signals
def test_sigkill_mid_write_leaves_nothing_and_next_run_cleans_up(
    big_ckpt: Path, tmp_path: Path, ckpts: dict
) -> None:
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    final = out_dir / "out.safetensors"
    proc = _spawn(big_ckpt, "--to", "safetensors", "-o", final, cwd=tmp_path)
    size = _wait_for_partial_write(proc, out_dir, final.name)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    assert not final.exists(), "a partial artifact sits at the output path"
    stale = temp_dirs(out_dir)
    assert len(stale) == 1, listing(out_dir)  # a SIGKILLed process cannot clean up: its temp dir stays ...
    assert str(proc.pid) in stale[0].name
    assert size > 0

    # ... until the next run in that directory, which removes it.
    small = tmp_path / "small.ckpt"
    shutil.copyfile(ckpts["classifier"], small)
    res = invoke(small, "--to", "state-dict", "--output-dir", out_dir)
    assert res.code == 0, res
    assert temp_dirs(out_dir) == [], listing(out_dir)
    assert listing(out_dir) == ["small.pt"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_cleans_up(sig: int, big_ckpt: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    final = out_dir / "out.safetensors"
    proc = _spawn(big_ckpt, "--to", "safetensors", "-o", final, cwd=tmp_path)
    _wait_for_partial_write(proc, out_dir, final.name)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert not final.exists()
    assert listing(out_dir) == [], "temp files or a partial artifact left behind"


SLOW_MODULE = """
import time
from pathlib import Path

from fixtures.modules import MyClassifierModule


class SlowToBuild(MyClassifierModule):
    def __init__(self, *args, **kwargs):
        Path(__file__).with_name("BUILDING").touch()
        time.sleep(60)
        super().__init__(*args, **kwargs)
"""


@pytest.mark.parametrize("moment", ["starting", "building"])
def test_sigterm_at_any_moment_exits_130_with_json(moment: str, ckpts: dict, tmp_path: Path) -> None:
    """SIGTERM while the flags are parsed and torch imported, or while the user's module is being built: exit
    130 (not killed by the signal), one JSON object saying so, nothing at the output path."""
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE)
    final = tmp_path / "out" / "m.onnx"
    final.parent.mkdir()
    proc = _spawn(ckpts["classifier"], "--module", f"{tmp_path / 'slow_module.py'}:SlowToBuild", "--attr", "model",
                  "--to", "onnx", "-o", final, "--json", cwd=tmp_path)
    if moment == "starting":
        time.sleep(0.5)
    else:
        deadline = time.monotonic() + 120
        while not (tmp_path / "BUILDING").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "Traceback" not in err, err
    report = json.loads(out)
    assert report["ok"] is False and report["error"]["code"] == 130
    assert listing(final.parent) == []


# ------------------------------------------------------------------------------------ in-process failures
def _half_then(exc: BaseException):
    def write(ctx, path):
        path.write_bytes(b"\0" * 4096)  # a partial artifact ...
        (path.parent / (path.name + ".data")).write_bytes(b"\0" * 100)  # ... and a companion
        raise exc

    return write


@pytest.mark.parametrize(
    "exc, code",
    [
        (RuntimeError("exporter exploded"), 5),
        (OSError(28, "No space left on device"), 6),
        (KeyboardInterrupt(), 130),
    ],
    ids=["exporter-error", "disk-full", "ctrl-c"],
)
def test_failure_while_writing_leaves_nothing(exc, code, monkeypatch, small: Path, tmp_path: Path) -> None:
    patch_format(monkeypatch, "state-dict", write=_half_then(exc))
    out = tmp_path / "out"
    res = invoke(small, "--to", "state-dict", "--output-dir", out)
    assert res.code == code, res
    assert "Traceback" not in res.stderr
    assert listing(out) == []
    assert listing(small.parent) == ["classifier.ckpt"]


def test_failure_keeps_the_old_file_with_force(monkeypatch, small: Path, tmp_path: Path) -> None:
    """--force replaces an existing artifact only with a complete, verified one."""
    final = tmp_path / "model.pt"
    final.write_bytes(b"the previous artifact")
    patch_format(monkeypatch, "state-dict", write=_half_then(RuntimeError("boom")))
    res = invoke(small, "--to", "state-dict", "-o", final, "--force")
    assert res.code == 5, res
    assert final.read_bytes() == b"the previous artifact"
    assert temp_dirs(tmp_path) == []


def test_verification_failure_publishes_nothing(monkeypatch, small: Path, tmp_path: Path) -> None:
    import torch

    def wrong_load(path):
        return {k: v + 1 for k, v in torch.load(str(path), weights_only=True).items()}

    patch_format(monkeypatch, "state-dict", load=wrong_load)
    out = tmp_path / "out"
    res = invoke(small, "--to", "state-dict", "--output-dir", out)
    assert res.code == 1, res
    assert listing(out) == []

    res = invoke(small, "--to", "state-dict", "--output-dir", out, "--keep-failed")
    assert res.code == 1, res
    assert listing(out) == ["classifier.FAILED.pt"]


def test_exporter_that_writes_nothing(monkeypatch, small: Path, tmp_path: Path) -> None:
    from lightning_export.formats import Written

    patch_format(monkeypatch, "state-dict", write=lambda ctx, path: Written("nothing", [path]))
    out = tmp_path / "out"
    res = invoke(small, "--to", "state-dict", "--output-dir", out)
    assert res.code == 5, res
    assert "did not write" in res.stderr
    assert listing(out) == []


def test_not_enough_space_fails_before_writing(monkeypatch, small: Path, tmp_path: Path) -> None:
    calls = []

    def write(ctx, path):
        calls.append(path)
        raise AssertionError("must not be called")

    patch_format(monkeypatch, "safetensors", write=write)
    real = shutil.disk_usage
    monkeypatch.setattr(
        outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1000)
    )
    out = tmp_path / "out"
    res = invoke(small, "--to", "safetensors", "--output-dir", out)
    assert res.code == 6, res
    assert "not enough free space to write classifier.safetensors" in res.stderr
    assert calls == []
    assert listing(out) == []


@pytest.mark.parametrize("force", [False, True], ids=["exclusive", "force"])
def test_publish_moves_companions_then_main_and_fsyncs(monkeypatch, tmp_path: Path, force: bool) -> None:
    final = tmp_path / "model.onnx"
    staging = outputs.stage(final)
    staging.path.write_bytes(b"main")
    (staging.dir / "model.onnx.data").write_bytes(b"data")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    staging.fsync()
    assert len(synced) >= 2
    moves: list[tuple[str, str]] = []
    # --force replaces (os.replace); without it a move never replaces (outputs._place_new).
    name = "replace" if force else "_place_new"
    owner = outputs.os if force else outputs
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda a, b: (moves.append((Path(a).name, Path(b).name)), real(a, b)))
    published = staging.publish(force=force)
    staging.discard()
    assert moves == [("model.onnx.data", "model.onnx.data"), ("model.onnx", "model.onnx")]
    assert published == [final, tmp_path / "model.onnx.data"]
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing-with-force"])
def test_publish_failure_takes_companions_back(monkeypatch, tmp_path: Path, existing: bool) -> None:
    final = tmp_path / "model.onnx"
    if existing:  # an earlier export, replaced with --force: it must survive a failed publish intact
        final.write_bytes(b"old main")
        (tmp_path / "model.onnx.data").write_bytes(b"old data")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    staging = outputs.stage(final)
    staging.path.write_bytes(b"main")
    (staging.dir / "model.onnx.data").write_bytes(b"data")
    real_replace, real_place = os.replace, outputs._place_new

    def failing(real):
        def move(a, b):
            if Path(b) == final and Path(a).parent == staging.dir:
                raise OSError(5, "Input/output error")
            return real(a, b)

        return move

    monkeypatch.setattr(outputs.os, "replace", failing(real_replace))
    monkeypatch.setattr(outputs, "_place_new", failing(real_place))
    with pytest.raises(outputs.OutputError):
        staging.publish(force=existing)
    staging.discard()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_signal_during_publish_is_deferred(tmp_path: Path) -> None:
    """A SIGTERM that lands while publishing does not stop it half-way: it is raised once the move is done."""
    final = tmp_path / "model.onnx"
    staging = outputs.stage(final)
    staging.path.write_bytes(b"main")
    (staging.dir / "model.onnx.data").write_bytes(b"data")
    before = signal.getsignal(signal.SIGTERM)
    with outputs.TerminateOnSignal():
        with pytest.raises(KeyboardInterrupt):
            with outputs.critical_section():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now, and deferred the signal
                staging.publish()
        staging.discard()
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------------------- stale temp dirs
def test_stale_temp_dirs_only_of_dead_processes_are_removed(tmp_path: Path) -> None:
    exited = subprocess.Popen(["true"])  # a pid that has certainly exited (and been reaped)
    exited.wait()
    dead = tmp_path / f"{outputs.TMP_PREFIX}{exited.pid}-abc"
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"partial")
    live_proc = subprocess.Popen(["sleep", "30"])
    try:
        live = tmp_path / f"{outputs.TMP_PREFIX}{live_proc.pid}-def"
        live.mkdir()
        mine = tmp_path / f"{outputs.TMP_PREFIX}{os.getpid()}-ghi"
        mine.mkdir()
        unrelated = tmp_path / ".lexport-tmp-notapid"
        unrelated.mkdir()
        outputs.remove_stale_temp_dirs(tmp_path)
        assert not dead.exists()
        assert live.exists() and mine.exists() and unrelated.exists()
    finally:
        live_proc.kill()
        live_proc.wait()


# -------------------------------------------------------------------------------------------- permissions
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_published_files_have_normal_permissions(umask_022, small: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke(small, "--module", CLASSIFIER, "--attr", "model", "--to", "state-dict", "--to", "safetensors",
                 "--to", "torchscript", "--output-dir", out)
    assert res.code == 0, res
    files = sorted(out.iterdir())
    expected = sorted(f"classifier{REGISTRY[n].suffix}" for n in ("state-dict", "safetensors", "torchscript"))
    assert [f.name for f in files] == expected, files
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode))


def test_private_writer_modes_are_normalised(umask_022, monkeypatch, small: Path, tmp_path: Path) -> None:
    """Even a writer that creates its file 0600 (mkstemp-style) publishes a 0644 file."""
    real = REGISTRY["state-dict"].write

    def write(ctx, path):
        written = real(ctx, path)
        os.chmod(path, 0o600)
        return written

    patch_format(monkeypatch, "state-dict", write=write)
    out = tmp_path / "out"
    res = invoke(small, "--to", "state-dict", "--output-dir", out)
    assert res.code == 0, res
    assert (out / "classifier.pt").stat().st_mode & 0o777 == 0o644


def test_file_mode_follows_umask(monkeypatch, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        final = tmp_path / "x.pt"
        staging = outputs.stage(final)
        staging.path.write_bytes(b"x")
        os.chmod(staging.path, 0o600)
        staging.publish()
        staging.discard()
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o640
