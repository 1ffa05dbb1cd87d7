"""The hostile corpus, made in code (no binary blobs in the repository).

Every generator writes its file(s) the way an attacker would: with ``torch.save`` of a Lightning-style checkpoint
dict, then by hand where torch would refuse or recurse (pickle opcodes written one by one, zip records rewritten or
written byte by byte). Generators take the directory to write into and return the path(s) they wrote; they never
run lexport. ``tests/test_hostile.py`` runs them through the real CLI; ``tests/test_fuzz.py`` uses the pickle
writer (:class:`Ops`, in ``tests/hostile_pickle.py`` with the other opcode-level helpers) and the zip writer
(:func:`write_torch_zip`) to generate structures.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hostile_pickle import (
    PLACEHOLDER,
    Ops,
    call,
    nested_dicts,
    nested_lists,
    self_referencing_dict,
    self_referencing_list,
    shared_refs,
    splice,
)

# The fixture classifier (fixtures.modules:MyClassifierModule, --attr model) with its default hparams.
CLASSIFIER_HPARAMS = {"input_size": 10, "hidden_size": 20, "num_classes": 2}
ALIGN = 64  # torch.save aligns storage records to 64 bytes


# ------------------------------------------------------------------------------------------------- zip files
def read_records(path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """(archive prefix, [(name after the prefix, bytes)]) of a torch.save zip, in file order."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        prefix = infos[0].filename.split("/", 1)[0]
        return prefix, [(i.filename.split("/", 1)[1], z.read(i.filename)) for i in infos]


def write_torch_zip(path: Path, records: Iterable[tuple[str, bytes]], *, prefix: str = "archive",
                    deflate: Iterable[str] = (), align: int = ALIGN) -> Path:
    """Write a torch.save-style zip with Python's zipfile (correct CRCs and sizes): stored records are padded to
    `align` bytes with an extra field the way torch does; records named in `deflate` are ZIP_DEFLATED."""
    deflate = set(deflate)
    with open(path, "wb") as f, zipfile.ZipFile(f, "w") as z:
        for name, data in records:
            full = f"{prefix}/{name}"
            info = zipfile.ZipInfo(full, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 0
            if name in deflate:
                info.compress_type = zipfile.ZIP_DEFLATED
            else:
                info.compress_type = zipfile.ZIP_STORED
                if align:
                    header_end = f.tell() + 30 + len(full.encode()) + 4
                    pad = (-header_end) % align
                    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(info, data)
    return path


def record_span(path: Path, name: str) -> tuple[int, int]:
    """Byte range of a record's (stored) data inside the file."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.split("/", 1)[1] == name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def with_pickle(path: Path, dst: Path, transform) -> Path:
    """Copy a torch.save zip, replacing data.pkl by transform(data.pkl)."""
    prefix, records = read_records(path)
    records = [(n, transform(d) if n == "data.pkl" else d) for n, d in records]
    return write_torch_zip(dst, records, prefix=prefix)


# --------------------------------------------------------------------------------- base (honest) checkpoints
def classifier_state_dict(seed: int = 0, hparams: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights with the keys and shapes of fixtures.modules:MyClassifierModule(**hparams)."""
    hp = {**CLASSIFIER_HPARAMS, **(hparams or {})}
    g = torch.Generator().manual_seed(seed)
    i, h, c = hp["input_size"], hp["hidden_size"], hp["num_classes"]
    return {
        "model.fc1.weight": torch.randn(h, i, generator=g),
        "model.fc1.bias": torch.randn(h, generator=g),
        "model.fc2.weight": torch.randn(c, h, generator=g),
        "model.fc2.bias": torch.randn(c, generator=g),
    }


def lightning_dict(state_dict: dict | None = None, hparams: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "epoch": 1,
        "global_step": 8,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": classifier_state_dict() if state_dict is None else state_dict,
        "hyper_parameters": dict(CLASSIFIER_HPARAMS) if hparams is None else hparams,
        **extra,
    }


def base_dict(base: Path | None) -> dict[str, Any]:
    """The checkpoint dict to start from: a real Trainer checkpoint's state_dict and hparams when given (read with
    weights_only), else the synthetic classifier."""
    if base is None:
        return lightning_dict()
    raw = torch.load(str(base), weights_only=True, map_location="cpu")
    return lightning_dict(dict(raw["state_dict"]), dict(raw.get("hyper_parameters") or CLASSIFIER_HPARAMS))


def save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path))
    return path


def save_with_fragment(path: Path, fragment: bytes, where: str = "hparam", base: Path | None = None) -> Path:
    """torch.save a checkpoint holding PLACEHOLDER, then swap the placeholder for hand-written opcodes.

    where="hparam": hyper_parameters["payload"] (a module built from it receives no such argument);
    where="top": a top-level key "payload" next to state_dict.
    """
    d = base_dict(base)
    if where == "hparam":
        d["hyper_parameters"] = {**d["hyper_parameters"], "payload": PLACEHOLDER}
    else:
        d["payload"] = PLACEHOLDER
    tmp = path.with_name(path.name + ".plain")
    save(d, tmp)
    with_pickle(tmp, path, lambda pkl: splice(pkl, fragment))
    tmp.unlink()
    return path


# ------------------------------------------------------------------------------------------- the corpus
def deflated_records(path: Path, base: Path | None = None, compressible: bool = False) -> Path:
    """A valid zip whose storage records are deflate-compressed (plain torch.load reads it correctly).

    Random weights do not compress: each deflated record is a little *longer* than the raw bytes, so a reader that
    memory-maps the record as if stored gets nbytes of compressed stream without any error (the silent misread).
    compressible=True adds zeros and a ramp, whose records are much shorter than the tensor."""
    d = base_dict(base)
    if compressible:
        d["state_dict"] = {**d["state_dict"], "extra.zeros": torch.zeros(64, 64),
                           "extra.steps": torch.arange(4096.0)}
    tmp = save(d, path.with_name(path.name + ".plain"))
    prefix, records = read_records(tmp)
    tmp.unlink()
    return write_torch_zip(path, records, prefix=prefix, deflate=[n for n, _ in records if n.startswith("data/")])


def flipped_byte(path: Path, base: Path | None = None, record: str = "data/0", at: int = 5) -> Path:
    """One bit flipped inside a stored tensor record, in place: the zip's CRC-32 for it is now wrong."""
    save(base_dict(base), path)
    start, end = record_span(path, record)
    assert end - start > at
    data = bytearray(path.read_bytes())
    data[start + at] ^= 0x40
    path.write_bytes(bytes(data))
    return path


# name -> (module, qualname, args) of payloads that would create `marker` if they ever ran
def payloads(marker: Path) -> dict[str, tuple[str, str, tuple]]:
    m = str(marker)
    return {
        "subprocess.call": ("subprocess", "call", (["touch", m],)),
        "subprocess.Popen": ("subprocess", "Popen", (["touch", m],)),
        "os.system": ("os", "system", (f"touch {m}",)),
        "posix.system": ("posix", "system", (f"touch {m}",)),
        "builtins.eval": ("builtins", "eval", (f"open({m!r}, 'w').close()",)),
        "builtins.exec": ("builtins", "exec", (f"open({m!r}, 'w').close()",)),
        "builtins.open": ("builtins", "open", (m, "w")),
        "numpy.testing._private.utils.runstring": (
            "numpy.testing._private.utils", "runstring", (f"open({m!r}, 'w').close()", {})),
        "shutil.copyfile": ("shutil", "copyfile", ("/etc/hostname", m)),
        "runpy.run_path": ("runpy", "run_path", (m,)),
    }


def malicious(path: Path, marker: Path, name: str, base: Path | None = None) -> Path:
    """A checkpoint whose pickle calls `name` (e.g. subprocess.call) to create `marker`: GLOBAL + REDUCE written by
    hand, next to an honest state_dict."""
    module, qual, args = payloads(marker)[name]
    return save_with_fragment(path, call(module, qual, *args), where="top", base=base)


def hparams_shared_refs(path: Path, base: Path | None = None, levels: int = 64) -> Path:
    """hyper_parameters["payload"] = x where x = [x, x] 64 times: ~9 KB of pickle, 2**64 paths."""
    return save_with_fragment(path, shared_refs(levels), base=base)


def hparams_self_reference(path: Path, base: Path | None = None) -> Path:
    """hyper_parameters["payload"] = l where l = [l]; and hyper_parameters["other"] is a dict containing itself."""
    d = base_dict(base)
    d["hyper_parameters"] = {**d["hyper_parameters"], "payload": PLACEHOLDER, "other": PLACEHOLDER + "2"}
    tmp = save(d, path.with_name(path.name + ".plain"))
    with_pickle(tmp, path, lambda pkl: splice(splice(pkl, self_referencing_list()),
                                               self_referencing_dict(1_500_000), PLACEHOLDER + "2"))
    tmp.unlink()
    return path


def hparams_deep(path: Path, base: Path | None = None, depth: int = 100_000, kind: str = "list") -> Path:
    """hyper_parameters["payload"] nested `depth` levels (lists or dicts), written as opcodes so neither
    torch.save nor pickle recurses; the weights_only unpickler itself is iterative and loads it."""
    frag = nested_lists(depth) if kind == "list" else nested_dicts(depth)
    return save_with_fragment(path, frag, base=base)


def hparams_shadowing(path: Path, base: Path | None = None) -> Path:
    """hyper_parameters["payload"]: an OrderedDict whose pickle BUILDs instance attributes named like its own
    methods (items, values, get, keys = None): every walk that calls them would fail (a fuzzed file found it)."""
    o = Ops(2_000_000)
    o.ordered_dict().empty_dict().mark()
    for name in ("items", "values", "get", "keys", "__len__"):
        o.str(name).none()
    o.setitems().build()
    return save_with_fragment(path, bytes(o.b), base=base)


def hparams_allocation(path: Path, base: Path | None = None, what: str = "bytearray", n: int = 3_000_000_000) -> Path:
    """A kilobyte file whose hyper_parameters ask an allowlisted constructor for `n` elements: `bytearray(n)` (3 GB
    of zeros the unpickler writes) or `torch.Tensor(n)` (12 GB, uninitialised)."""
    module, name = ("builtins", "bytearray") if what == "bytearray" else ("torch", "Tensor")
    return save_with_fragment(path, call(module, name, n), base=base)


def _one_tensor(path: Path, key: str, storage: str, numel: int, size: tuple, stride: tuple, record: bytes,
                offset: int = 0) -> Path:
    """A Lightning checkpoint whose state_dict holds exactly one tensor, built from opcodes."""
    o = Ops(proto=True)
    o.empty_dict().mark()
    o.str("epoch").int(1).str("global_step").int(1).str("pytorch-lightning_version").str("2.6.6")
    o.str("state_dict").ordered_dict().mark().str(key).tensor("0", storage, numel, offset, size, stride).setitems()
    o.str("hyper_parameters").empty_dict()
    o.setitems()
    pkl = o.stop()
    return write_torch_zip(path, _torch_records(pkl, {"0": record}))


def _torch_records(pkl: bytes, storages: dict[str, bytes]) -> list[tuple[str, bytes]]:
    recs = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")]
    recs += [(f"data/{k}", v) for k, v in storages.items()]
    recs += [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
    return recs


def stride0_huge(path: Path, numel: int = 10**12) -> Path:
    """A 4-byte storage viewed with stride 0 as `numel` elements (10**12 float32 = 4 TB of claimed weights)."""
    return _one_tensor(path, "layer.weight", "FloatStorage", 1, (numel,), (0,), struct.pack("<f", 1.0))


def expanded_zeros(path: Path, numel: int = 10**9) -> Path:
    """torch.zeros(1).expand(10**9), saved by torch.save: a ~2 KB file claiming 4 GB."""
    save({"state_dict": {"layer.weight": torch.zeros(1).expand(numel)}, "epoch": 1, "global_step": 1,
          "pytorch-lightning_version": "2.6.6", "hyper_parameters": {}}, path)
    assert path.stat().st_size < 4096
    return path


def zip_bomb(path: Path, mib: int = 1536) -> Path:
    """A deflated storage record of `mib` MiB of zeros in a ~1.5 MB file (deflate's ratio is ~1000:1), declared
    consistently in the pickle (a float32 storage of that many bytes). The compressed stream is built from one
    compressed MiB repeated (full flushes make the blocks independent), so making it costs no memory."""
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) == block
    tail = c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    usize = mib << 20
    numel = usize // 4
    o = Ops(proto=True)
    o.empty_dict().mark()
    o.str("epoch").int(1).str("global_step").int(1).str("pytorch-lightning_version").str("2.6.6")
    o.str("state_dict").ordered_dict().mark().str("layer.weight")
    o.tensor("0", "FloatStorage", numel, 0, (numel,), (1,)).setitems()
    o.str("hyper_parameters").empty_dict().setitems()
    records = _torch_records(o.stop(), {})
    bomb = _RawRecord("archive/data/0", block, mib, tail, crc, usize)
    _write_zip_by_hand(path, [(f"archive/{n}", d) for n, d in records[:4]] + [bomb]
                       + [(f"archive/{n}", d) for n, d in records[4:]])
    return path


class _RawRecord:
    """A deflated record given as its compressed stream (block * repeat + tail), CRC and uncompressed size."""

    def __init__(self, name: str, block: bytes, repeat: int, tail: bytes, crc: int, usize: int) -> None:
        self.name, self.block, self.repeat, self.tail, self.crc, self.usize = name, block, repeat, tail, crc, usize

    @property
    def csize(self) -> int:
        return len(self.block) * self.repeat + len(self.tail)


def _write_zip_by_hand(path: Path, entries: list) -> None:
    """A plain (non-zip64) zip writer: stored records for (name, bytes), deflated ones for _RawRecord."""
    central = io.BytesIO()
    with open(path, "wb") as f:
        for e in entries:
            offset = f.tell()
            if isinstance(e, _RawRecord):
                name, method, crc, csize, usize = e.name.encode(), 8, e.crc, e.csize, e.usize
            else:
                name, data = e[0].encode(), e[1]
                method, crc, csize, usize = 0, zlib.crc32(data), len(data), len(data)
            extra = b""
            if method == 0:
                pad = (-(offset + 30 + len(name) + 4)) % ALIGN
                extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, csize, usize,
                                len(name), len(extra)) + name + extra)
            if isinstance(e, _RawRecord):
                for _ in range(e.repeat):
                    f.write(e.block)
                f.write(e.tail)
            else:
                f.write(data)
            central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, csize,
                                      usize, len(name), 0, 0, 0, 0, 0, offset) + name)
        cd_offset = f.tell()
        cd = central.getvalue()
        f.write(cd)
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(cd), cd_offset, 0))


def meta_tensor(path: Path) -> Path:
    """A tensor on the meta device in state_dict (torch.save writes it without data)."""
    sd = classifier_state_dict()
    sd["model.fc1.weight"] = torch.empty(20, 10, device="meta")
    return save(lightning_dict(sd), path)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def yaml_bomb(levels: int = 9, width: int = 10) -> str:
    """A YAML "billion laughs": `width`**`levels` elements from a few hundred bytes of aliases."""
    lines = [f"&a0 [{', '.join(['1'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "[" + ", ".join(lines) + "]"


def yaml_bomb_init_args_file(path: Path) -> Path:
    path.write_text("hidden_size: 20\nlaughs: " + yaml_bomb() + "\n")
    return path


def yaml_bomb_config_file(path: Path) -> Path:
    path.write_text(
        "model:\n"
        "  class_path: fixtures.modules.MyClassifierModule\n"
        "  init_args:\n"
        "    input_size: 10\n"
        "    hidden_size: 20\n"
        "    num_classes: 2\n"
        "    laughs: " + yaml_bomb() + "\n"
    )
    return path


NOISY_MODULE = '''\
"""A user's module that writes to stdout at import and in forward (print and the raw file descriptor)."""
import os
import sys

print("noisy: imported")
os.write(1, b"noisy: fd 1 at import\\n")
sys.stdout.flush()

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402


class Noisy(pl.LightningModule):
    def __init__(self, n_in: int = 4, n_out: int = 2):
        super().__init__()
        print("noisy: __init__")
        self.save_hyperparameters()
        self.net = torch.nn.Linear(n_in, n_out)
        self.example_input_array = torch.zeros(2, n_in)

    def forward(self, x):
        print("noisy: forward")
        os.write(1, b"noisy: fd 1 in forward\\n")
        return self.net(x)
'''


def noisy_module(dirpath: Path) -> tuple[Path, Path]:
    """(module file, checkpoint of its class): the checkpoint is its state_dict wrapped as a Lightning dict."""
    mod = dirpath / "noisy_module.py"
    mod.write_text(NOISY_MODULE)
    g = torch.Generator().manual_seed(1)
    sd = {"net.weight": torch.randn(2, 4, generator=g), "net.bias": torch.randn(2, generator=g)}
    ckpt = save(lightning_dict(sd, {"n_in": 4, "n_out": 2}), dirpath / "noisy.ckpt")
    return mod, ckpt


# ---------------------------------------------------------------------------------- artifacts given to verify
def pt2_with_pickle(src: Path, dst: Path, marker: Path, member: str = "data/sample_inputs/model.pt",
                    name: str = "os.system") -> Path:
    """A copy of a torch.export archive (.pt2) whose pickle record `member` (a torch.save zip: the sample inputs by
    default) calls `name` to create `marker` when a full unpickler reads it."""
    module, qual, args = payloads(marker)[name]
    pkl = b"\x80\x02" + call(module, qual, *args) + b"."
    inner = dst.with_name(dst.name + ".inner")
    write_torch_zip(inner, [("data.pkl", pkl), ("byteorder", b"little"), ("version", b"3\n")], prefix="model")
    payload = inner.read_bytes()
    inner.unlink()
    prefix, records = read_records(src)
    assert any(n == member for n, _ in records), f"{member} not in {src}"
    return write_torch_zip(dst, [(n, payload if n == member else d) for n, d in records], prefix=prefix)


def mutated(data: bytes, rng: Any, *, truncate: bool) -> tuple[str, bytes]:
    """(label, bytes): one random bit flipped, or the file cut at a random point."""
    if truncate:
        cut = rng.randrange(len(data))
        return f"cut@{cut}", data[:cut]
    pos, bit = rng.randrange(len(data)), rng.randrange(8)
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return f"flip@{pos}.{bit}", bytes(out)
