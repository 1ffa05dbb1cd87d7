"""The weights exported are the bytes in the file, or the run is refused.

- storage records are memory-mapped only when stored uncompressed; every storage behind a state_dict tensor is
  checked against its record's CRC-32 (bit-rot, a bad CRC, a repacked file);
- the zip directory is checked before torch reads the file (records inside the file, no overlap, zip bombs);
- tensors are CPU dense tensors whose extent fits their storage, and whose dense size is bounded by the stored
  bytes (expand(), stride 0): refused before anything sums over them;
- a FIFO (or socket, device) is refused without being opened;
- --allow-global admits only classes outside modules that run code; the refusal hint offers only such names.

Every case goes through the real CLI and checks: exit code, one message, nothing at the output path, the input
unchanged. Checkpoints are made here, in code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import REPO, Result, address_space_limit, invoke, limited_env, run_lexport

from lightning_export.errors import CheckpointError, UsageError
from lightning_export.safeload.archive import Archive, Record, Storage, check_tensors, verify_storages
from lightning_export.safeload.placeholders import Unloaded
from lightning_export.safeload.policy import hint_refusal, import_dotted
from lightning_export.sources import load_checkpoint


# --------------------------------------------------------------------------------------------- helpers
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flat(text: str) -> str:
    return " ".join(text.split())


def _export(src: Path, tmp: Path, *extra: object, run=invoke) -> tuple[Result, Path]:
    """Export `src` to safetensors in tmp/out; asserts the input is unchanged. Returns (result, output path)."""
    before = _sha(src)
    out = tmp / "out"
    res = run(src, "--to", "safetensors", "--output-dir", out, *extra)
    assert _sha(src) == before, "the input checkpoint was modified"
    return res, out / f"{src.stem}.safetensors"


def _refused(res: Result, out: Path, code: int, *needles: str) -> None:
    assert res.code == code, res
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res
    assert res.stderr.count("error (") == 1, res
    flat = _flat(res.stderr)
    for needle in needles:
        assert needle in flat, f"{needle!r} not in stderr:\n{res.stderr}"
    assert not out.exists(), "an artifact was written"
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], list(out.parent.iterdir())


def _save(tmp: Path, obj: object, name: str = "model.ckpt") -> Path:
    path = tmp / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path))
    return path


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(64, 32, generator=g), "layer.bias": torch.randn(64, generator=g),
            "head.weight": torch.randn(10, 64, generator=g)}


def _record(path: Path, short: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as zf:
        return next(i for i in zf.infolist() if i.filename.split("/", 1)[1] == short)


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _repack(src: Path, dst: Path, *, deflate_data: bool = True, changes: dict[str, bytes] | None = None) -> None:
    """Copy a torch.save zip record by record (names keep their order), optionally deflating the storages."""
    changes = changes or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            short = info.filename.split("/", 1)[1]
            zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zi.compress_type = zipfile.ZIP_DEFLATED if deflate_data and short.startswith("data/") else zipfile.ZIP_STORED
            zout.writestr(zi, changes.get(short, zin.read(info.filename)))


def _set_crc(path: Path, info: zipfile.ZipInfo, crc: int) -> None:
    """Rewrite a record's CRC-32 in the central directory (which zip readers use), its local header and its data
    descriptor."""
    data = bytearray(path.read_bytes())
    old, new = struct.pack("<I", info.CRC), struct.pack("<I", crc)
    if data[info.header_offset + 14: info.header_offset + 18] == old:
        data[info.header_offset + 14: info.header_offset + 18] = new
    end = _data_offset(path, info) + info.compress_size  # torch.save writes the CRC in a data descriptor
    at = end + 4 if data[end: end + 4] == b"PK\x07\x08" else end
    if data[at: at + 4] == old:
        data[at: at + 4] = new
    start = data.find(b"PK\x01\x02")
    while start != -1:
        name_len = struct.unpack("<H", data[start + 28: start + 30])[0]
        if data[start + 46: start + 46 + name_len] == info.filename.encode():
            assert data[start + 16: start + 20] == old
            data[start + 16: start + 20] = new
        start = data.find(b"PK\x01\x02", start + 4)
    path.write_bytes(bytes(data))


# Crafting pickles as a hostile writer would: a tensor with any size/stride/offset over any storage key.
class _StorageRef:
    def __init__(self, key: str, numel: int, storage_type: object = torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _Crafted:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, torch.Size(size), stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _CraftingPickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def _crafted(tmp: Path, template: Path, state_dict: dict[str, _Crafted], name: str = "crafted.ckpt") -> Path:
    """The template's records with a data.pkl that holds `state_dict` (crafted tensors over its storage keys)."""
    buf = io.BytesIO()
    _CraftingPickler(buf, protocol=2).dump({"state_dict": state_dict})
    dst = tmp / "in" / name
    _repack(template, dst, deflate_data=False, changes={"data.pkl": buf.getvalue()})
    return dst


# -------------------------------------------------------------------------- 1. the bytes read are the file's
def test_deflated_checkpoint_exports_the_inflated_weights(tmp_path: Path, ckpts: dict) -> None:
    """A valid zip whose storage records are deflated: mmap would read the compressed bytes as floats."""
    from safetensors.torch import load_file

    src = tmp_path / "in" / "deflated.ckpt"
    src.parent.mkdir()
    _repack(ckpts["classifier"], src)
    assert all(_record(src, "data/0").compress_type == zipfile.ZIP_DEFLATED for _ in [0])
    res, out = _export(src, tmp_path)
    assert res.code == 0, res
    expected = torch.load(str(src), weights_only=True, map_location="cpu")["state_dict"]  # no mmap: inflated
    got = load_file(str(out))
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert got[key].contiguous().view(torch.uint8).equal(t.contiguous().view(torch.uint8)), key


def test_flipped_byte_in_stored_record_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, _weights(), "bitrot.ckpt")
    info = _record(src, "data/1")  # layer.bias
    data = bytearray(src.read_bytes())
    data[_data_offset(src, info) + 17] ^= 0x10
    src.write_bytes(bytes(data))
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, f"record {info.filename} (layer.bias) does not match its CRC-32", "corrupt or was altered")


def test_clean_checkpoint_passes_the_crc_check(tmp_path: Path) -> None:
    """The control for the test above: the same file, unflipped, exports."""
    src = _save(tmp_path, _weights(), "clean.ckpt")
    res, out = _export(src, tmp_path)
    assert res.code == 0, res
    assert out.is_file()


def test_bad_crc_in_deflated_record_is_refused(tmp_path: Path) -> None:
    """torch's reader (miniz) does not check CRCs, neither inflating nor memory-mapping: lexport does."""
    plain = _save(tmp_path, _weights(), "plain.ckpt")
    src = tmp_path / "in" / "deflated_bad_crc.ckpt"
    _repack(plain, src)
    info = _record(src, "data/2")  # head.weight
    _set_crc(src, info, info.CRC ^ 0x1)
    assert torch.load(str(src), weights_only=True)["head.weight"].equal(_weights()["head.weight"]), \
        "torch itself should read this file without noticing"
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, f"record {info.filename} (head.weight) does not match its CRC-32")


def test_altered_deflated_data_is_refused(tmp_path: Path) -> None:
    """A different deflate stream for a record whose CRC stays the old one (as a repacker that swapped data)."""
    plain = _save(tmp_path, _weights(), "plain.ckpt")
    other = _save(tmp_path, {k: v + 1 for k, v in _weights().items()}, "other.ckpt")
    src = tmp_path / "in" / "swapped.ckpt"
    with zipfile.ZipFile(other) as z:
        new_bias = z.read(_record(other, "data/1").filename)
    _repack(plain, src, changes={"data/1": new_bias})
    good_crc = _record(plain, "data/1").CRC
    _set_crc(src, _record(src, "data/1"), good_crc)
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, "(layer.bias) does not match its CRC-32")


def test_bad_crc_in_pickle_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, _weights(), "badpkl.ckpt")
    info = _record(src, "data.pkl")
    _set_crc(src, info, info.CRC ^ 0x100)
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, f"record {info.filename} does not match its CRC-32")


@pytest.mark.parametrize("claimed", [12, 8], ids=["more", "less"])
def test_storage_claiming_other_size_than_its_record_is_refused(tmp_path: Path, claimed: int) -> None:
    """The pickle declares each storage's size; with mmap torch slices that many bytes, past its record."""
    template = _save(tmp_path, {"w": torch.arange(10.0), "x": torch.ones(1000)}, "template.ckpt")
    src = _crafted(tmp_path, template, {
        "w": _Crafted(_StorageRef("0", claimed), 0, (claimed,), (1,)),
        "x": _Crafted(_StorageRef("1", 1000), 0, (1000,), (1,)),
    })
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, "data/0 (w) holds 40 bytes but the file's pickle declares", "corrupt or crafted")


def test_storage_claiming_other_size_deflated_is_refused(tmp_path: Path) -> None:
    """Same without mmap (deflated records): torch refuses it itself; still exit 3 and one message."""
    template = _save(tmp_path, {"w": torch.arange(10.0), "x": torch.ones(1000)}, "template.ckpt")
    crafted = _crafted(tmp_path, template, {"w": _Crafted(_StorageRef("0", 12), 0, (12,), (1,))})
    src = tmp_path / "in" / "crafted_deflated.ckpt"
    _repack(crafted, src)
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, "corrupt")


def test_tensor_extent_past_its_storage_is_refused(tmp_path: Path) -> None:
    """A tensor that reads past its storage (torch's set_ refuses it on a mapped storage): exit 3, one line."""
    template = _save(tmp_path, {"w": torch.arange(10.0)}, "template.ckpt")
    src = _crafted(tmp_path, template, {"w": _Crafted(_StorageRef("0", 10), 4, (4, 4), (4, 1))})
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, "corrupt")


def test_tensor_not_read_from_a_record_is_refused(tmp_path: Path) -> None:
    """A storage that no record of the file backs (mmap mode: its address matches no record)."""
    t = torch.arange(10.0)
    path = tmp_path / "x.ckpt"
    path.write_bytes(bytes(1000))  # the matcher compares mapped memory with the file's bytes
    arch = Archive({"a/data/0": Record("a/data/0", 100, 40, 0, True)}, "little")
    storages = check_tensors(path, {"w": t}, file_size=1000, max_growth=4, archive=arch)
    storages.append(Storage(torch.ones(3).untyped_storage(), 1 << 40, 12, 4, "other"))
    with pytest.raises(CheckpointError, match="is not read from a record"):
        verify_storages(path, storages, arch, mapped=True)


def test_meta_tensor_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, {"layer.weight": torch.empty(3, 4, device="meta"), "b": torch.ones(2)}, "meta.ckpt")
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, "tensor layer.weight is a meta tensor", "holds no weights")


def test_tied_and_sliced_tensors_still_export(tmp_path: Path) -> None:
    """Shared storages (tied weights, views) map to one record each and pass."""
    w = torch.randn(8, 8)
    src = _save(tmp_path, {"a.weight": w, "b.weight": w, "row": w[2], "col": w[:, 3]}, "tied.ckpt")
    res, out = _export(src, tmp_path)
    assert res.code == 0, res


# ------------------------------------------------------------------------------------- 3. bounded work
def _limited(args: list[object], limit_gb: float = 3, timeout: int = 120) -> tuple[Result, float]:
    """The CLI in a subprocess with at most `limit_gb` of address space (torch needs ~2 GB to start)."""
    limit = address_space_limit(limit_gb)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = limited_env()
    env.pop("LEXPORT_DEBUG", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lightning_export", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=str(REPO), timeout=timeout, preexec_fn=cap)
    return Result(proc.returncode, proc.stdout, proc.stderr), time.monotonic() - started


def test_expanded_tensor_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """torch.zeros(1).expand(10**9) is a 2 KB file; exported it would be 4 GB."""
    src = _save(tmp_path, {"w": torch.zeros(1).expand(10**9), "b": torch.ones(3)}, "expand.ckpt")
    assert src.stat().st_size < 4096
    before = _sha(src)
    res, elapsed = _limited([src, "--to", "safetensors", "--output-dir", tmp_path / "out"])
    assert _sha(src) == before
    _refused(res, tmp_path / "out" / "expand.safetensors", 3, "expands to", "--max-growth")
    assert elapsed < 60, elapsed


def test_stride0_view_of_4_bytes_is_refused_quickly(tmp_path: Path) -> None:
    template = _save(tmp_path, {"w": torch.ones(1)}, "template.ckpt")
    src = _crafted(tmp_path, template, {"w": _Crafted(_StorageRef("0", 1), 0, (10**12,), (0,))}, "stride0.ckpt")
    before = _sha(src)
    res, elapsed = _limited([src, "--to", "safetensors", "--output-dir", tmp_path / "out"])
    assert _sha(src) == before
    _refused(res, tmp_path / "out" / "stride0.safetensors", 3, "expands to", "--max-growth")
    assert elapsed < 60, elapsed


def test_max_growth_bounds_and_raises_the_limit(tmp_path: Path) -> None:
    """The bound is a documented factor + slack: 16x the stored bytes passes only when the factor allows it."""
    w = torch.randn(1 << 20)  # 4 MiB stored once, 40 tensors use it: 160 MiB dense > 4 x 4 MiB + 64 MiB
    src = _save(tmp_path, {f"w{i}": w for i in range(40)}, "shared.ckpt")
    with pytest.raises(CheckpointError, match="--max-growth"):
        load_checkpoint(src, hash_file=False)
    assert load_checkpoint(src, hash_file=False, max_growth=32).state_dict
    with pytest.raises(UsageError):
        load_checkpoint(src, hash_file=False, max_growth=float("nan"))


def _zip_bomb(tmp: Path, inflated: int) -> Path:
    """A torch archive whose one storage record inflates to `inflated` bytes of zeros."""
    template = _save(tmp, {"w": torch.ones(1)}, "template.ckpt")
    dst = tmp / "in" / "bomb.ckpt"
    with zipfile.ZipFile(template) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("/data/0"):
                zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                zi.compress_type = zipfile.ZIP_DEFLATED
                chunk = bytes(16 << 20)
                with zout.open(zi, "w", force_zip64=True) as w:
                    for _ in range(inflated // len(chunk)):
                        w.write(chunk)
            else:
                zout.writestr(info, zin.read(info.filename))
    return dst


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    src = _zip_bomb(tmp_path, 1 << 30)
    assert src.stat().st_size < 2 << 20
    before = _sha(src)
    res, elapsed = _limited([src, "--to", "safetensors", "--output-dir", tmp_path / "out"], limit_gb=2.5)
    assert _sha(src) == before
    _refused(res, tmp_path / "out" / "bomb.safetensors", 3, "zip bomb", "--max-growth")
    assert elapsed < 60, elapsed


def test_overlapping_and_out_of_file_records_are_refused(tmp_path: Path) -> None:
    src = _save(tmp_path, _weights(), "overlap.ckpt")
    info = _record(src, "data/1")
    data = bytearray(src.read_bytes())
    # The central directory says data/1 is 1 MB long (local header and directory), past the end of the file.
    start = data.find(b"PK\x01\x02")
    while start != -1:
        name_len = struct.unpack("<H", data[start + 28: start + 30])[0]
        if data[start + 46: start + 46 + name_len] == info.filename.encode():
            data[start + 20: start + 28] = struct.pack("<II", 1 << 20, 1 << 20)
        start = data.find(b"PK\x01\x02", start + 4)
    src.write_bytes(bytes(data))
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, "ends past the end of the file")


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "in" / "pipe.ckpt"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    # In a subprocess with a timeout first: a regression would hang there, not the test session.
    res = run_lexport(fifo, "--to", "safetensors", "--output-dir", tmp_path / "out", timeout=120)
    _refused(res, tmp_path / "out" / "pipe.safetensors", 3, "is a named pipe (FIFO)")
    res = invoke(fifo, "--to", "safetensors", "--output-dir", tmp_path / "out")
    _refused(res, tmp_path / "out" / "pipe.safetensors", 3, "is a named pipe (FIFO)")


def test_device_is_refused(tmp_path: Path) -> None:
    res = invoke("/dev/zero", "--to", "safetensors", "--output-dir", tmp_path / "out")
    _refused(res, tmp_path / "out" / "zero.safetensors", 3, "is a character device")


def test_big_endian_checkpoint_is_verified_after_the_swap(tmp_path: Path) -> None:
    """torch byte-swaps a big-endian file's storages on load; the CRC is checked on the file's byte order."""
    w = _weights()
    plain = _save(tmp_path, w, "little.ckpt")
    changes = {"byteorder": b"big"}
    with zipfile.ZipFile(plain) as z:
        for i in z.infolist():
            short = i.filename.split("/", 1)[1]
            if short.startswith("data/"):
                raw = z.read(i.filename)
                changes[short] = bytes(torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 4).flip(1)
                                       .contiguous().numpy().tobytes())
    src = tmp_path / "in" / "big.ckpt"
    _repack(plain, src, deflate_data=False, changes=changes)
    loaded = load_checkpoint(src, hash_file=False)
    assert all(loaded.state_dict[k].equal(v) for k, v in w.items())


# ------------------------------------------------------------------------------------ 2. --allow-global
@pytest.mark.parametrize("name, needle", [
    ("builtins.eval", "eval is a builtin function, not a class; allowing it would let the file run code"),
    ("builtins.getattr", "never allowed"),
    ("subprocess.Popen", "never allowed: subprocess.Popen comes from subprocess"),
    ("os.system", "never allowed: system is a builtin function, not a class"),
    ("os.PathLike", "never allowed: os.PathLike comes from os"),
    ("textwrap.dedent", "dedent is a function, not a class; allowing it would let the file run code"),
    ("numpy.testing._private.utils.runstring", "never allowed"),
    ("torch.load", "never allowed"),
    ("torch.serialization.load", "load is a function, not a class"),
    ("io.FileIO", "never allowed: io.FileIO comes from io"),
    ("collections.namedtuple", "namedtuple is a function, not a class"),
    ("pathlib.Path.write_text", "not a class"),
])
def test_allow_global_refuses_what_runs_code(tmp_path: Path, name: str, needle: str) -> None:
    src = _save(tmp_path, _weights(), "fine.ckpt")
    res, out = _export(src, tmp_path, "--allow-global", name)
    _refused(res, out, 2, f"--allow-global {name}", needle)


def test_allow_global_accepts_classes_and_numpy_reconstructors() -> None:
    import argparse
    import pathlib

    assert import_dotted("argparse.Namespace") is argparse.Namespace
    assert import_dotted("pathlib.PosixPath") is pathlib.PosixPath
    assert callable(import_dotted("numpy._core.multiarray._reconstruct"))


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["mkdir", str(self.marker)],))


class _RunsNumpyString:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return (runstring, (f"import os; os.mkdir({str(self.marker)!r})", {}))


# A protocol-2 pickle names subprocess.call "commands.call" (Python 2's name); it is judged as subprocess.call.
@pytest.mark.parametrize("payload, shown", [(_RunsCommand, "subprocess.call"),
                                            (_RunsNumpyString, "numpy.testing._private.utils.runstring")])
def test_payload_is_never_offered_as_allow_global(tmp_path: Path, payload: type, shown: str) -> None:
    marker = tmp_path / "PWNED"
    src = _save(tmp_path, {"state_dict": _weights(), "hyper_parameters": {"x": payload(marker)}}, "evil.ckpt")
    res, out = _export(src, tmp_path)
    _refused(res, out, 3, shown, "never allowed: this file tries to run code", "--trust-checkpoint")
    assert not marker.exists()
    for stream in (res.stdout, res.stderr, _flat(res.stderr)):
        assert "--allow-global subprocess" not in stream and "--allow-global numpy" not in stream
        assert "--allow-global" not in stream


@dataclasses.dataclass
class Config:
    lr: float = 0.1
    layers: int = 2


def test_harmless_class_in_hparams_is_a_placeholder_for_weights(tmp_path: Path) -> None:
    """An object in hyper_parameters does not stop a weights export: it is left unloaded (an inert placeholder,
    said in a note), and the weights are the file's."""
    src = _save(tmp_path, {"state_dict": _weights(), "hyper_parameters": {"config": Config()}}, "cfg.ckpt")
    res, out = _export(src, tmp_path, "--json")
    assert res.code == 0, res
    assert any("config hold objects that were left unloaded" in n for n in json.loads(res.stdout)["notes"]), res
    from safetensors.torch import load_file

    got = load_file(str(out))
    assert all(torch.equal(got[k], v) for k, v in _weights().items()) and set(got) == set(_weights())
    ckpt = load_checkpoint(src, hash_file=False)
    assert isinstance(ckpt.hparams["config"], Unloaded) and ckpt.hparams["config"].name.endswith(".Config")
    name = f"{Config.__module__}.Config"
    assert load_checkpoint(src, hash_file=False, allow_globals=(name,)).hparams["config"] == Config()


def test_harmless_class_is_offered_on_one_line_and_the_hint_works(tmp_path: Path) -> None:
    """Where placeholders cannot be used (legacy, non-zip files have no opcode scan), the refusal offers the flag on
    a line of its own, and that line pasted back works."""
    src = tmp_path / "in" / "cfg.ckpt"
    src.parent.mkdir(parents=True)
    torch.save({"state_dict": _weights(), "hyper_parameters": {"config": Config()}}, str(src),
               _use_new_zipfile_serialization=False)
    res, out = _export(src, tmp_path)
    name = f"{Config.__module__}.Config"
    _refused(res, out, 3, name, "not loaded by default")
    lines = [line.strip() for line in res.stderr.splitlines()]
    assert f"--allow-global {name}" in lines, res.stderr
    res, out = _export(src, tmp_path, *f"--allow-global {name}".split())
    assert res.code == 0, res
    assert out.is_file()


def test_hint_rule_without_importing() -> None:
    """Names from a file are judged without importing anything new."""
    assert hint_refusal("subprocess.call")
    assert hint_refusal("builtins.eval")
    assert hint_refusal("lexport_not_installed_pkg.run_me")
    assert hint_refusal("lexport_not_installed_pkg.Config") is None
    assert hint_refusal("argparse.Namespace") is None
    assert hint_refusal("collections.OrderedDict") is None
    assert hint_refusal("os.PathLike")
    assert "lexport_not_installed_pkg" not in sys.modules


def test_identical_layers_map_to_their_own_records(tmp_path: Path) -> None:
    """Equal, evenly spaced records (identical layers plus optimizer states of the same shape) make shifted
    address bases look consistent; the base where memory holds the file's bytes is the one used."""
    g = torch.Generator().manual_seed(1)
    sd = {f"layer{i}.weight": torch.randn(1024, generator=g) for i in range(50)}
    opt = {i: {"exp_avg": torch.randn(1024, generator=g), "exp_avg_sq": torch.randn(1024, generator=g)}
           for i in range(50)}
    src = _save(tmp_path, {"state_dict": sd, "optimizer_states": [{"state": opt}]}, "same.ckpt")
    ck = load_checkpoint(src, hash_file=False)
    assert all(ck.state_dict[k].equal(v) for k, v in sd.items())
