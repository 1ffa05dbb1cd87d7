"""Faults while writing and publishing.

- A full disk, a file size limit or an I/O error from any writer (torch's C++ zip writers included) ends in exit 6
  with one JSON object on stdout, the temp dir removed, nothing at the output path and the input unchanged; a
  format's size estimate that does not fit in the free space is refused before writing.
- Publishing without --force is exclusive: of two runs writing the same -o exactly one publishes, the other exits
  6; with --force the last one wins and the file is always whole.

Faults that could kill the process (a C++ abort) run in subprocesses. The small-disk tests mount a tmpfs (skipped
where `mount` is not permitted); the RLIMIT_FSIZE tests run everywhere.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, Result, invoke, patch_format

from lightning_export import outputs
from lightning_export.formats import REGISTRY

CLASSIFIER = "fixtures.modules:MyClassifierModule"
ALL_FORMATS = ("state-dict", "safetensors", "torchscript", "onnx", "exported-program")
MODULE_ARGS = ("--module", CLASSIFIER, "--attr", "model")

# The CLI with the free-space check switched off: stands for "another process filled the disk after the check",
# so the write itself hits the full disk.
NO_SPACE_CHECK = (
    "import sys; import lightning_export.outputs as o; o.check_free_space = lambda *a, **k: None; "
    "sys.argv[0] = 'lexport'; from lightning_export.cli import main; main()"
)


# --------------------------------------------------------------------------------------------- helpers
def temp_dirs(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{outputs.TMP_PREFIX}*"))


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lexport(*args: object, code: str | None = None, fsize: int | None = None, timeout: int = 600) -> Result:
    """The CLI in a subprocess (`code` replaces `-m lightning_export`); `fsize` sets RLIMIT_FSIZE in the child."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("LEXPORT_DEBUG", None)

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    head = ["-c", code] if code else ["-m", "lightning_export"]
    proc = subprocess.run(
        [sys.executable, *head, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=timeout,
        preexec_fn=limit,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def only_json(res: Result) -> dict:
    """stdout is exactly one JSON object."""
    return json.loads(res.stdout)


def assert_failed_cleanly(res: Result, out_dir: Path, ckpt: Path, ckpt_sha: str, formats: tuple[str, ...]) -> dict:
    assert res.code == 6, res
    assert "Traceback" not in res.stderr and "terminate called" not in res.stderr, res.stderr
    report = only_json(res)
    assert report["error"]["code"] == 6, report["error"]
    assert [a["format"] for a in report["artifacts"]] == list(formats)
    for a in report["artifacts"]:
        assert a["error"] is not None and a["error"]["code"] == 6, a
        assert a["path"] is None, a
    assert listing(out_dir) == [], "temp dirs or partial artifacts left behind"
    assert sha256(ckpt) == ckpt_sha, "the input checkpoint changed"
    return report


@pytest.fixture(scope="module")
def mid_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of MyClassifierModule(100, 2000, 2): 824 kB of weights, so every artifact is ~0.8 MB."""
    import torch

    g = torch.Generator().manual_seed(0)
    hidden, inputs = 2000, 100
    sd = {
        "model.fc1.weight": torch.randn(hidden, inputs, generator=g),
        "model.fc1.bias": torch.randn(hidden, generator=g),
        "model.fc2.weight": torch.randn(2, hidden, generator=g),
        "model.fc2.bias": torch.randn(2, generator=g),
    }
    path = tmp_path_factory.mktemp("mid") / "mid.ckpt"
    torch.save(
        {
            "state_dict": sd,
            "epoch": 1,
            "global_step": 1,
            "pytorch-lightning_version": "2.6.6",
            "hyper_parameters": {"input_size": inputs, "hidden_size": hidden, "num_classes": 2},
        },
        path,
    )
    return path


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 512 kB tmpfs (smaller than every artifact of mid_ckpt), or a skip where mounting is not permitted."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command: cannot make a small filesystem to fill")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------------- disk full, any writer
def test_disk_full_mid_write_every_format(small_disk: Path, mid_ckpt: Path) -> None:
    """The disk fills after the check (here: the check is off): every writer's failure, torch.jit.save's and
    torch.export.save's C++ aborts included, ends in exit 6 with the temp dirs removed."""
    before = sha256(mid_ckpt)
    res = lexport(mid_ckpt, *MODULE_ARGS, "--to", ",".join(ALL_FORMATS), "--output-dir", small_disk, "--json",
                  code=NO_SPACE_CHECK)
    report = assert_failed_cleanly(res, small_disk, mid_ckpt, before, ALL_FORMATS)
    for a in report["artifacts"]:
        assert a["error"]["message"].startswith(f"disk full while writing mid{REGISTRY[a['format']].suffix} in "), a
        assert "No space left on device" in a["error"]["message"] and "needed" in a["error"]["message"], a


def test_disk_too_small_for_the_estimate_is_refused_before_writing(small_disk: Path, mid_ckpt: Path) -> None:
    before = sha256(mid_ckpt)
    res = lexport(mid_ckpt, *MODULE_ARGS, "--to", ",".join(ALL_FORMATS), "--output-dir", small_disk, "--json")
    report = assert_failed_cleanly(res, small_disk, mid_ckpt, before, ALL_FORMATS)
    for a in report["artifacts"]:
        assert a["error"]["message"].startswith("not enough free space to write mid"), a
        assert a["exporter"] is None  # nothing was written


def test_file_size_limit_every_format(tmp_path: Path, mid_ckpt: Path) -> None:
    """RLIMIT_FSIZE (ulimit -f) below the artifact size: EFBIG from every writer, without any privileges."""
    out = tmp_path / "out"
    out.mkdir()
    before = sha256(mid_ckpt)
    res = lexport(mid_ckpt, *MODULE_ARGS, "--to", ",".join(ALL_FORMATS), "--output-dir", out, "--json",
                  fsize=300_000)
    report = assert_failed_cleanly(res, out, mid_ckpt, before, ALL_FORMATS)
    for a in report["artifacts"]:
        assert "File too large" in a["error"]["message"], a


def test_size_estimates_cover_the_artifacts(monkeypatch, tmp_path: Path, mid_ckpt: Path) -> None:
    """Every format's declared estimate is at least what it writes (and not wildly more for the weight formats)."""
    estimates: dict[str, int] = {}
    for name, fmt in list(REGISTRY.items()):
        def estimate(ctx, fmt=fmt):
            estimates[fmt.name] = fmt.size_estimate(ctx)
            return estimates[fmt.name]

        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(fmt, size_estimate=estimate))
    res = invoke(mid_ckpt, *MODULE_ARGS, "--to", ",".join(ALL_FORMATS), "--output-dir", tmp_path, "--json")
    assert res.code == 0, res
    for a in res.json()["artifacts"]:
        assert a["bytes"] <= estimates[a["format"]], (a["format"], a["bytes"], estimates[a["format"]])
        if REGISTRY[a["format"]].kind == "weights":
            assert estimates[a["format"]] < a["bytes"] * 1.2, (a["format"], a["bytes"], estimates[a["format"]])


@pytest.mark.parametrize(
    "exc, text",
    [
        (OSError(errno.EIO, "Input/output error"), "cannot write classifier.pt in"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded while writing classifier.pt"),
        (RuntimeError("exporter gave up"), "cannot write classifier.pt in"),  # caused by an EIO below
    ],
    ids=["EIO", "EDQUOT", "wrapped-EIO"],
)
def test_io_errors_from_a_writer_are_output_errors(exc, text, monkeypatch, small: Path, tmp_path: Path) -> None:
    def write(ctx, path):
        path.write_bytes(b"\0" * 4096)
        if isinstance(exc, OSError):
            raise exc
        raise exc from OSError(errno.EIO, "Input/output error")

    patch_format(monkeypatch, "state-dict", write=write)
    out = tmp_path / "out"
    res = invoke(small, "--to", "state-dict", "--output-dir", out, "--json")
    assert res.code == 6, res
    assert text in res.json()["error"]["message"], res.json()["error"]
    assert listing(out) == []


def test_sink_keeps_the_first_error_and_torch_save_does_not_notice(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC; torch.save through a Sink completes, the error comes after."""
    import torch

    from lightning_export.formats._io import Sink, sink

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(OSError) as info:
        with sink(Path("/dev/full")) as f:
            torch.save({"w": torch.zeros(1000)}, f)
            assert isinstance(f, Sink) and f.error is not None  # kept, not raised into torch's C++ writer
    assert info.value.errno == errno.ENOSPC


def test_isolated_writer_abort_becomes_an_os_error(tmp_path: Path) -> None:
    """torch.jit.save to /dev/full aborts (std::terminate) in the child; the parent learns ENOSPC and lives."""
    import torch

    from lightning_export.formats._io import save_isolated

    if not os.path.exists("/dev/full") or not hasattr(os, "fork"):
        pytest.skip("needs /dev/full and os.fork")
    scripted = torch.jit.script(torch.nn.Linear(4, 4))
    with pytest.raises(OSError) as info:
        save_isolated(lambda p: torch.jit.save(scripted, p), Path("/dev/full"))
    assert info.value.errno == errno.ENOSPC

    def crash(path: str) -> None:
        os.abort()

    with pytest.raises(RuntimeError, match="died"):
        save_isolated(crash, tmp_path / "x.pt")

    def refuse(path: str) -> None:
        raise ValueError("cannot serialize this")

    with pytest.raises(RuntimeError, match="ValueError: cannot serialize this"):
        save_isolated(refuse, tmp_path / "y.pt")
    target = tmp_path / "z.pt"
    save_isolated(lambda p: torch.jit.save(scripted, p), target)
    assert torch.jit.load(str(target))(torch.ones(1, 4)).shape == (1, 4)


# ---------------------------------------------------------------------------------------- exclusive publish
def _race(*args: object) -> list[Result]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda _: lexport(*args), range(2)))


def _load_state_dict(path: Path) -> dict:
    import torch

    return torch.load(str(path), weights_only=True)


@pytest.mark.parametrize("round_", range(2))
def test_two_runs_race_without_force_exactly_one_publishes(round_: int, small: Path, tmp_path: Path) -> None:
    final = tmp_path / "out" / "model.pt"
    final.parent.mkdir()
    results = _race(small, "--to", "state-dict", "-o", final, "--json")
    codes = sorted(r.code for r in results)
    assert codes == [0, 6], results
    loser = next(r for r in results if r.code == 6)
    message = only_json(loser)["error"]["message"]
    # Usually both pass the early check and the publish decides; a slow start meets the finished file instead.
    assert "appeared while exporting; pass --force to replace it" in message or "already exists" in message, message
    winner = only_json(next(r for r in results if r.code == 0))
    assert winner["artifacts"][0]["sha256"] == sha256(final)
    sd = _load_state_dict(final)
    assert set(sd) == {"model.fc1.weight", "model.fc1.bias", "model.fc2.weight", "model.fc2.bias"}
    assert listing(final.parent) == ["model.pt"]


def test_two_runs_race_with_force_both_succeed_and_the_file_is_whole(small: Path, tmp_path: Path) -> None:
    final = tmp_path / "model.safetensors"
    final.write_bytes(b"an older artifact")
    results = _race(small, "--to", "safetensors", "-o", final, "--force", "--json")
    assert [r.code for r in results] == [0, 0], results
    assert {only_json(r)["artifacts"][0]["sha256"] for r in results} == {sha256(final)}  # same bytes either way
    from safetensors.torch import load_file

    assert len(load_file(str(final))) == 4
    assert listing(tmp_path) == ["in", "model.safetensors"]


def test_destination_that_appears_during_the_export_is_not_replaced(monkeypatch, small: Path, tmp_path: Path) -> None:
    """Deterministic version of the race: another run publishes between this run's check and its publish."""
    real = REGISTRY["state-dict"].write
    final = tmp_path / "model.pt"

    def write(ctx, path):
        final.write_bytes(b"the other run's artifact")
        return real(ctx, path)

    patch_format(monkeypatch, "state-dict", write=write)
    res = invoke(small, "--to", "state-dict", "-o", final, "--json")
    assert res.code == 6, res
    assert res.json()["error"]["message"].startswith(f"{final} appeared while exporting; pass --force to replace it")
    assert final.read_bytes() == b"the other run's artifact"
    assert temp_dirs(tmp_path) == []

    res = invoke(small, "--to", "state-dict", "-o", final, "--force")  # with --force this run's file wins
    assert res.code == 0, res
    assert set(_load_state_dict(final)) == {"model.fc1.weight", "model.fc1.bias", "model.fc2.weight", "model.fc2.bias"}


@pytest.fixture(params=["renameat2", "link"])
def exclusive_move(request, monkeypatch) -> str:
    """Both ways of publishing without replacing: renameat2(RENAME_NOREPLACE), and os.link where it is missing."""
    if request.param == "link":
        monkeypatch.setattr(outputs, "_rename_noreplace", lambda src, dst: False)
    return request.param


def _staged(final: Path) -> outputs.Staging:
    staging = outputs.stage(final)
    staging.path.write_bytes(b"new main")
    (staging.dir / f"{final.name}.data").write_bytes(b"new data")
    os.chmod(staging.path, 0o600)
    return staging


def test_exclusive_publish_of_main_and_companion(exclusive_move: str, tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    old = os.umask(0o022)
    try:
        staging = _staged(final)
        published = staging.publish()
        staging.discard()
    finally:
        os.umask(old)
    assert published == [final, tmp_path / "model.onnx.data"]
    assert listing(tmp_path) == ["model.onnx", "model.onnx.data"]
    assert final.read_bytes() == b"new main"
    assert final.stat().st_mode & 0o777 == 0o644 and final.stat().st_nlink == 1


def test_exclusive_publish_rolls_back_companions_when_main_appeared(exclusive_move: str, tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    staging = _staged(final)
    final.write_bytes(b"other main")  # another run published the main file meanwhile
    with pytest.raises(outputs.OutputError, match="appeared while exporting; pass --force"):
        staging.publish()
    staging.discard()
    assert listing(tmp_path) == ["model.onnx"]  # our companion was taken back out
    assert final.read_bytes() == b"other main"


def test_exclusive_publish_never_replaces_a_companion(exclusive_move: str, tmp_path: Path) -> None:
    final = tmp_path / "model.onnx"
    staging = _staged(final)
    (tmp_path / "model.onnx.data").write_bytes(b"other data")
    with pytest.raises(outputs.OutputError, match="model.onnx.data already exists; pass --force"):
        staging.publish()
    staging.discard()
    assert listing(tmp_path) == ["model.onnx.data"]
    assert (tmp_path / "model.onnx.data").read_bytes() == b"other data"


def test_keep_failed_replaces_an_old_failed_artifact(monkeypatch, small: Path, tmp_path: Path) -> None:
    """--keep-failed keeps replacing a previous run's .FAILED file (it is not a published artifact)."""
    import torch

    def wrong_load(path):
        return {k: v + 1 for k, v in torch.load(str(path), weights_only=True).items()}

    patch_format(monkeypatch, "state-dict", load=wrong_load)
    out = tmp_path / "out"
    out.mkdir()
    (out / "classifier.FAILED.pt").write_bytes(b"old failure")
    res = invoke(small, "--to", "state-dict", "--output-dir", out, "--keep-failed")
    assert res.code == 1, res
    assert listing(out) == ["classifier.FAILED.pt"]
    assert (out / "classifier.FAILED.pt").read_bytes() != b"old failure"
