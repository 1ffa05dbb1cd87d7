"""Opening a checkpoint safely: weights_only + mmap, metadata, and where the tensors come from.

Objects the weights_only unpickler would refuse (a pickled `net` module, Hydra partials, numpy arrays in
hyper_parameters) are built as inert placeholders by that same unpickler: see "placeholders" below for why that
runs no code from the file. Files naming anything from a module whose objects run code are refused outright."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import shlex
import stat
import threading
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UsageError, UserModuleError
from .text import fmt_bytes

# torch < 2.6 has published weights_only bypasses (CVE-2025-32434); untrusted loads refuse it.
MIN_TORCH_FOR_UNTRUSTED = (2, 6)
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class Checkpoint:
    path: Path
    raw: dict[str, Any]  # the whole loaded object (tensors are memory-mapped, never copied)
    # A dict of (memory-mapped) tensors for a file; for a sharded folder a sharded.LazyStateDict, which reads a
    # tensor when asked for it: use tensor_specs() for shapes and dtypes, items() to visit tensors one at a time.
    state_dict: Mapping[str, Any]
    plain: bool  # True when the file is a bare state dict, not a Lightning checkpoint
    hparams: dict[str, Any] = field(default_factory=dict)
    _sha: _Hasher | None = None  # how its sha256 is taken: a folder's differs from a file's

    # Metadata goes into the JSON report: only plain values of the expected type, whatever the file holds.
    @property
    def lightning_version(self) -> str | None:
        for key in ("pytorch-lightning_version", "lightning_version"):
            value = self.raw.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    @property
    def epoch(self) -> int | None:
        return _plain_int(self.raw.get("epoch"))

    @property
    def global_step(self) -> int | None:
        return _plain_int(self.raw.get("global_step"))

    @property
    def sha256(self) -> str:
        return (self._sha or _Hasher(self.path)).result()


def _plain_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Hasher(threading.Thread):
    """The checkpoint's sha256 (a file's, or a folder's files' through `digest`). Started, it hashes in the
    background: hashlib releases the GIL, and the read warms the page cache that the memory-mapped tensors are
    about to use. Not started, result() hashes when asked."""

    def __init__(self, path: Path, digest: Callable[[], str] | None = None) -> None:
        super().__init__(daemon=True)
        self.path, self._compute = path, digest or (lambda: file_sha256(path))
        self._digest: str | None = None
        self._error: OSError | None = None

    def run(self) -> None:
        try:
            self._digest = self._compute()
        except OSError as e:  # reported when asked for
            self._error = e

    def result(self) -> str:
        if self.ident is None:
            self.run()
        else:
            self.join()
        if self._error is not None:
            raise CheckpointError(f"cannot read {self.path}: {self._error}")
        return self._digest  # type: ignore[return-value]


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- --allow-global
# The safe loader calls what --allow-global admits: a class is constructed (cls(*args) or cls.__new__), a function
# is called with arguments chosen by the file. So only classes are admitted, and none from a module whose classes
# execute, import, open, load or spawn things when constructed (or whose functions do, for the hint). A deny-list
# cannot be complete; the user who allows a class vouches for that class. Submodules are included.
_NEVER_MODULES = frozenset(
    """
    builtins __builtin__ __main__ _imp imp importlib zipimport pkgutil runpy code codeop compileall py_compile
    site sysconfig ensurepip venv pip setuptools pkg_resources distutils
    os posix nt posixpath ntpath sys subprocess _posixsubprocess _winapi msvcrt winreg pty tty shutil platform
    signal _signal resource fcntl mmap select selectors atexit faulthandler gc inspect
    socket _socket socketserver ssl urllib http ftplib smtplib poplib imaplib nntplib telnetlib xmlrpc wsgiref
    webbrowser mailbox sqlite3 _sqlite3 dbm shelve tempfile zipfile tarfile gzip bz2 lzma io _io codecs
    pickle _pickle pickletools marshal copyreg copy_reg ctypes _ctypes cffi
    multiprocessing _multiprocessing concurrent threading _thread asyncio sched types operator _operator
    pydoc timeit pdb bdb trace tracemalloc doctest unittest logging cmd readline rlcompleter
    yaml _yaml dill cloudpickle joblib IPython fsspec h5py smart_open
    numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib numpy.lib.format numpy.lib._format_impl
    numpy.lib.npyio numpy.lib._npyio_impl numpy.lib._datasource numpy.lib.utils numpy.lib._utils_impl
    numpy.core.memmap numpy._core.memmap numpy._pytesttester pandas.io
    torch._C torch.jit torch._jit_internal torch.hub torch.package torch.serialization torch.utils.cpp_extension
    torch.utils.tensorboard torch.utils.benchmark torch.utils.bottleneck torch.utils.collect_env torch.testing
    torch.classes torch.ops torch._ops torch.library torch._library torch.multiprocessing torch.distributed
    torch._dynamo torch._inductor torch.compiler torch.fx torch.export torch._export torch.onnx
    lightning.pytorch.cli pytorch_lightning.cli lightning.fabric.cli jsonargparse
    numpy.load numpy.fromfile numpy.loadtxt numpy.genfromtxt numpy.memmap numpy.save numpy.savez numpy.savetxt
    torch.load torch.save torch.utils.model_zoo hydra.utils hydra._internal.instantiate hydra._internal.utils
    pandas.read_pickle pandas.read_csv pandas.read_table pandas.read_parquet pandas.read_json pandas.read_hdf
    pandas.read_feather pandas.read_excel pandas.read_sql pandas.read_html pandas.read_xml pandas.read_orc
    pandas.read_sas pandas.read_spss pandas.read_stata pandas.read_fwf pandas.read_clipboard pandas.to_pickle
    """.split()
)
# Functions and methods of pathlib (Path.write_text, Path.unlink, ...) touch the file system; its classes do not.
_NEVER_FUNCTIONS_OF = frozenset({"pathlib"})
# Functions that only rebuild plain data, admitted although they are not classes: numpy pickles its arrays and
# scalars through them. _reconstruct(subtype, shape, dtype) makes an empty array of an ndarray subclass (it refuses
# other types); scalar(dtype, bytes) makes a numpy scalar from raw bytes (object dtype: returns the object it is
# given, which the loader had to admit already). Neither imports, opens or calls anything else.
_SAFE_FUNCTIONS = frozenset(
    f"{m}.{f}" for m in ("numpy.core.multiarray", "numpy._core.multiarray") for f in ("_reconstruct", "scalar")
)
_CLASS_NAME_RE = re.compile(r"_*[A-Z][A-Za-z0-9_]*")


def _blocked_module(dotted: str) -> str | None:
    """The blocked module that `dotted` (a module, or module.attr) lies in, if any."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in _NEVER_MODULES:
            return prefix
    if parts[0] in _NEVER_FUNCTIONS_OF and len(parts) > 1 and not parts[-1][:1].isupper():
        return parts[0]
    return None


def _dangerous_base(cls: type) -> str | None:
    """A class that opens files, sockets, processes or threads when constructed, even from an allowed module.
    Only bases from modules already imported are looked at (nothing is imported for the check)."""
    import sys

    for mod, name in (("io", "IOBase"), ("subprocess", "Popen"), ("threading", "Thread"), ("socket", "socket"),
                      ("logging", "Handler"), ("multiprocessing.process", "BaseProcess"), ("ctypes", "CDLL"),
                      ("zipfile", "ZipFile"), ("tarfile", "TarFile"), ("tempfile", "TemporaryDirectory")):
        base = getattr(sys.modules.get(mod), name, None)
        if isinstance(base, type):
            try:
                if issubclass(cls, base):
                    return f"{mod}.{name}"
            except TypeError:
                continue
    return None


def _py3_name(name: str) -> str:
    """The name a protocol-2 pickle's GLOBAL resolves to: pickle writes Python 2 module names for some modules
    (subprocess.call is written as commands.call) and maps them back when loading."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        return ".".join(_compat_pickle.NAME_MAPPING[(module, attr)])
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}" if module else name


def _refusal(name: str, obj: Any = None, *, resolved: bool = False) -> str | None:
    """Why `name` (resolving to `obj` when `resolved`) may never be allowed; None when it may."""
    name = _py3_name(name)
    if name in _SAFE_FUNCTIONS:
        return None
    last = name.rpartition(".")[2]
    if resolved:
        real = f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', '?')}"
        if real in _SAFE_FUNCTIONS:
            return None
        if not isinstance(obj, type):
            kind = type(obj).__name__
            what = ("a builtin function" if kind == "builtin_function_or_method" else "a function"
                    if callable(obj) else f"a {kind}")
            return f"{last} is {what}, not a class; allowing it would let the file run code"
    where = _blocked_module(name) or (resolved and _blocked_module(str(getattr(obj, "__module__", "") or "")))
    if where:
        return f"{name} comes from {where}, whose objects can run commands, import code or open files"
    if not resolved:
        if _CLASS_NAME_RE.fullmatch(last) and any(c.islower() for c in last):
            return None
        return f"{last} is not a class name (only classes can be allowed)"
    base = _dangerous_base(obj)
    if base:
        return f"{name} is a {base}: constructing it opens files, sockets, processes or threads"
    return None


def _import_dotted(name: str) -> Any:
    """The object an --allow-global flag names, if it may be allowed (a class, see _refusal); UsageError if not.
    A name refused by its module alone is refused without importing anything."""
    import importlib

    parts = name.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise UsageError(f"--allow-global {name!r} must be a dotted path such as 'pkg.mod.Name'")
    hint = "Allow only classes that you know; --trust-checkpoint is the way in for a file you trust completely."
    from .model import _ensure_cwd_importable

    _ensure_cwd_importable()  # a project's own classes (src.models...) from its root, as with python -m
    if _blocked_module(_py3_name(name)):
        raise UsageError(f"--allow-global {name}: never allowed: {_hint_refusal(name)}", hint=hint)
    obj: Any = None
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module: pkg.mod.Outer.Inner works too
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as e:
            if i == 1 or e.name != module_name:
                raise UsageError(f"--allow-global {name!r} cannot be imported: {e}") from e
        except ImportError as e:
            raise UsageError(f"--allow-global {name!r} cannot be imported: {e}") from e
    try:
        for part in parts[i:]:
            obj = getattr(obj, part)
    except AttributeError as e:
        raise UsageError(f"--allow-global {name!r} cannot be imported: {e}") from e
    why = _refusal(name, obj, resolved=True)
    if why:
        raise UsageError(f"--allow-global {name}: never allowed: {why}", hint=hint)
    return obj


def _hint_refusal(name: str) -> str | None:
    """_refusal for a name from a file, decided without importing anything new: modules already imported are
    looked into; otherwise the module rule and the CapWords convention for class names decide."""
    import sys
    import types

    parts = _py3_name(name).split(".")
    if not all(p.isidentifier() for p in parts):
        return "it is not a valid dotted name"
    obj: Any = sys.modules.get(parts[0])
    i = 1
    while isinstance(obj, types.ModuleType) and i < len(parts):
        sub = ".".join(parts[: i + 1])
        if parts[i] in vars(obj):
            obj = vars(obj)[parts[i]]
        elif sub in sys.modules:
            obj = sys.modules[sub]
        else:
            obj = None
        i += 1
    if obj is None or isinstance(obj, types.ModuleType):
        return _refusal(name)
    while i < len(parts):  # an attribute of a class (a nested class): look, do not evaluate descriptors
        obj = vars(obj).get(parts[i]) if hasattr(obj, "__dict__") else None
        if obj is None:
            return _refusal(name)
        i += 1
    return _refusal(name, obj, resolved=True)


def _check_file(path: Path) -> int:
    """Refuse what is not a readable regular file, without opening anything else (open() blocks on a FIFO).
    Returns the file size."""
    try:
        st = os.stat(path)
    except OSError as e:
        if path.is_symlink():
            raise CheckpointError(f"checkpoint {path} is a dangling symbolic link (or a link loop)") from e
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"checkpoint not found: {path}") from e
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file (nor a checkpoint folder: it has no .metadata, nor "
            "DeepSpeed's latest)"
        )
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise CheckpointError(
            f"{path} is {kind}, not a checkpoint file: lexport reads only regular files, whose size bounds its work",
            hint="Save the stream to a file first, then pass that file.",
        )
    size = st.st_size
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the checkpoint was not written completely")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is truncated or corrupt: its zip directory is missing")
        return size
    if head[:1] == b"\x80" and head[1:2] in (b"\x03", b"\x04", b"\x05"):
        # torch.save writes a zip, or (legacy) protocol-2 pickles after a magic number: never this.
        raise CheckpointError(
            f"{path} is a plain Python pickle (protocol {head[1]}), not a checkpoint written by torch.save",
        )
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") or (head and all(32 <= b < 127 or b in (9, 10, 13) for b in head)):
        raise CheckpointError(f"{path} is a text file (JSON, YAML or similar), not a torch checkpoint")
    return size


def _describe_unsafe(path: Path) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - best effort (legacy, non-zip files), only for the message
        return []


def _torch_version(text: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.6.0+cpu', '2.7.0a0+git1234' or '2.10.0.dev2025'."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# ---------------------------------------------------------------------------------------------- integrity
# Bounded work: an artifact is at most DEFAULT_MAX_GROWTH times the weight bytes the file holds (plus the slack,
# for tiny checkpoints and shared tensors), and compressed zip records may not declare more than that either.
DEFAULT_MAX_GROWTH = 4.0
GROWTH_SLACK = 64 << 20
_CRC_CHUNK = 16 << 20
_GROWTH_HINT = "Raise the limit with --max-growth N if this is intended."
# Records torch reads besides the storages; small, so their CRC-32 is checked before torch.load.
_METADATA_RECORDS = ("data.pkl", "byteorder", ".format_version", ".storage_alignment", "version", ".data/version")


@dataclass(frozen=True)
class _Record:
    name: str
    data_offset: int  # where the record's bytes start in the file (from its local header)
    size: int  # uncompressed
    crc: int
    stored: bool


@dataclass
class _Archive:
    storages: dict[str, _Record]  # <prefix>/data/<key> records
    byteorder: str | None

    @property
    def all_stored(self) -> bool:
        return all(r.stored for r in self.storages.values())


def _read_archive(path: Path, file_size: int, max_growth: float) -> _Archive:
    """The zip directory of a torch.save file, checked before torch reads anything: every record lies inside the
    file, records do not overlap, stored records are what they claim, and compressed records may not expand past
    the growth bound (a zip bomb is refused before it is inflated). Metadata records are CRC-checked."""
    import struct

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is truncated, corrupt or crafted: {why}")

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as e:
        raise corrupt(f"its zip directory cannot be read ({_printable(str(e))[:200]})") from e
    with zf, open(path, "rb") as f:
        infos = zf.infolist()
        if not infos or "/" not in infos[0].filename:
            raise corrupt("its zip directory does not hold a torch archive")
        prefix = infos[0].filename.split("/", 1)[0]  # torch's archive name: the first record's folder
        names: set[str] = set()
        spans: list[tuple[int, int, str]] = []
        storages: dict[str, _Record] = {}
        inflated = 0
        for info in infos:
            name = _printable(info.filename)
            if info.filename in names:
                raise corrupt(f"record {name} appears twice in its zip directory")
            names.add(info.filename)
            if info.flag_bits & 0x1:
                raise corrupt(f"record {name} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise corrupt(f"record {name} uses zip compression method {info.compress_type}, which torch cannot read")
            if info.header_offset < 0 or info.header_offset + 30 > file_size:
                raise corrupt(f"record {name} starts outside the file")
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) != 30 or header[:4] != _ZIP_MAGIC:
                raise corrupt(f"record {name} has no local header where the zip directory says")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
            if f.read(name_len) != info.filename.encode(encoding, errors="replace"):
                raise corrupt(f"record {name} has a different name in its local header")
            start = info.header_offset + 30 + name_len + extra_len
            end = start + info.compress_size
            if end > file_size:
                raise corrupt(f"record {name} ends past the end of the file ({end} > {file_size} bytes)")
            stored = info.compress_type == zipfile.ZIP_STORED
            if stored and info.file_size != info.compress_size:
                raise corrupt(f"record {name} is stored uncompressed but declares {info.file_size} bytes "
                              f"in {info.compress_size}")
            if not stored:
                inflated += info.file_size
            spans.append((info.header_offset, end, name))
            short = info.filename[len(prefix) + 1:] if info.filename.startswith(prefix + "/") else None
            if short is not None and short.startswith("data/") and "/" not in short[5:]:
                storages[info.filename] = _Record(name, start, info.file_size, info.CRC, stored)
        spans.sort()
        for (_, end, name), (nxt, _, other) in zip(spans, spans[1:]):
            if end > nxt:
                raise corrupt(f"records {name} and {other} overlap")
        limit = max_growth * file_size + GROWTH_SLACK
        if inflated > limit:
            raise CheckpointError(
                f"{path}: its compressed records declare {fmt_bytes(inflated)} once inflated, more than {max_growth:g}x "
                f"the file ({fmt_bytes(file_size)}) + {fmt_bytes(GROWTH_SLACK)}; refusing to inflate it (a zip bomb?)",
                hint=_GROWTH_HINT,
            )
        byteorder = None
        for short in _METADATA_RECORDS:
            full = f"{prefix}/{short}"
            if full not in names:
                continue
            try:
                data = zf.read(full)  # zipfile checks the CRC-32 when it reaches the end of the record
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
                raise CheckpointError(
                    f"record {_printable(full)} does not match its CRC-32: the file is corrupt or was altered "
                    f"({_printable(str(e))[:120]})"
                ) from e
            if short == "byteorder":
                byteorder = data.decode("ascii", errors="replace")
    return _Archive(storages, byteorder)



@dataclass
class _Storage:
    storage: Any  # keeps the memory alive while it is read
    ptr: int
    nbytes: int
    element_size: int
    key: str  # the first state_dict key that uses it (for messages)


def _check_tensors(path: Path, state_dict: dict[str, Any], *, file_size: int, max_growth: float,
                   archive: _Archive | None) -> list[_Storage]:
    """Metadata only, no pass over data: every tensor is a CPU strided tensor whose extent fits its storage, and the
    dense bytes of the state dict are bounded by the bytes of the storages behind it. Returns the storages."""
    import torch

    storages: dict[int, _Storage] = {}
    dense = 0
    for key, t in state_dict.items():
        shown = _printable(key)
        if t.device.type != "cpu":
            what = "a meta tensor (a shape without data)" if t.device.type == "meta" else f"on device {t.device}"
            raise CheckpointError(f"{path}: tensor {shown} is {what}; the file holds no weights for it")
        if t.layout != torch.strided or t.is_nested:
            raise CheckpointError(f"{path}: tensor {shown} has layout {t.layout}; only dense tensors can be exported")
        if t.is_quantized:
            raise CheckpointError(f"{path}: tensor {shown} is quantized ({t.dtype}); only plain tensors can be exported")
        numel, esize = t.numel(), t.element_size()
        dense += numel * esize
        if numel == 0:
            continue
        try:
            st = t.untyped_storage()
            nbytes, ptr = st.nbytes(), st.data_ptr()
        except (RuntimeError, NotImplementedError) as e:
            raise CheckpointError(f"{path}: tensor {shown} has no readable storage ({e})") from e
        strides = t.stride()
        if t.storage_offset() < 0 or any(s < 0 for s in strides):
            raise CheckpointError(f"{path}: tensor {shown} has a negative offset or stride: the file is crafted")
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, strides))
        if (last + 1) * esize > nbytes or ptr == 0:
            raise CheckpointError(
                f"{path}: tensor {shown} reaches byte {(last + 1) * esize:,} of a storage of {nbytes:,} bytes: "
                "the file is corrupt or crafted"
            )
        seen = storages.get(ptr)
        if seen is None:
            storages[ptr] = _Storage(st, ptr, nbytes, esize, key)
        elif seen.nbytes != nbytes:
            raise CheckpointError(f"{path}: tensors {_printable(seen.key)} and {shown} claim one storage with two "
                                  "sizes: the file is corrupt or crafted")
        elif seen.element_size != esize and archive is not None and _swapped(archive):
            raise CheckpointError(f"{path}: tensors {_printable(seen.key)} and {shown} read one byte-swapped "
                                  "storage as two element sizes")
    backed = sum(s.nbytes for s in storages.values())
    if archive is None and backed > file_size:
        raise CheckpointError(f"{path}: its tensors claim {fmt_bytes(backed)} of storage in a file of {fmt_bytes(file_size)}: "
                              "the file is corrupt or crafted")
    if dense > max_growth * backed + GROWTH_SLACK:
        raise CheckpointError(
            f"{path}: its state dict expands to {fmt_bytes(dense)} from {fmt_bytes(backed)} of stored weights (tensors that "
            f"repeat one value, e.g. expand() or stride 0), more than {max_growth:g}x + {fmt_bytes(GROWTH_SLACK)}",
            hint=_GROWTH_HINT,
        )
    return list(storages.values())


def _swapped(archive: _Archive) -> bool:
    import sys

    return archive.byteorder is not None and archive.byteorder != sys.byteorder


def _map_by_address(path: Path, storages: list[_Storage], archive: _Archive) -> list[tuple[_Storage, _Record]]:
    """Memory-mapped: torch slices one mapping of the whole file, so storage address - record data offset is one
    base for every storage. The base is derived from the records (page-aligned candidates first: mmap returns a
    page) and must be consistent with every storage; a storage that is not a record of the file is refused.
    Equal, evenly spaced records (identical layers) make shifted bases consistent too: the true base is the one
    where the mapped memory holds the file's bytes, compared at a few sampled places of every storage."""
    if not storages:
        return []
    by_offset = {r.data_offset: r for r in archive.storages.values()}
    by_size: dict[int, list[_Record]] = {}
    for r in archive.storages.values():
        by_size.setdefault(r.size, []).append(r)
    order = sorted(storages, key=lambda s: s.ptr)
    order = [order[-1], order[0], *order[1:-1]] if len(order) > 1 else order  # shifted bases fail at the ends
    pivot = min(storages, key=lambda s: len(by_size.get(s.nbytes, ())))
    sized = [pivot.ptr - r.data_offset for r in by_size.get(pivot.nbytes, ())]
    anywhere = [order[0].ptr - off for off in by_offset]
    budget = 20_000_000  # bounded work for crafted files with thousands of equal, evenly spaced records

    def fits(base: int, check_size: bool) -> bool:
        nonlocal budget
        for s in order:
            budget -= 1
            r = by_offset.get(s.ptr - base)
            if r is None or (check_size and r.size != s.nbytes):
                return False
        return True

    def holds_file_bytes(base: int, fd: int) -> bool:
        import ctypes

        nonlocal budget
        for s in order:
            budget -= 3
            at = s.ptr - base
            for off in {0, s.nbytes // 2, max(0, s.nbytes - 64)}:
                n = min(64, s.nbytes - off)
                if os.pread(fd, n, at + off) != ctypes.string_at(s.ptr + off, n):
                    return False
        return True

    found = None
    fd = os.open(path, os.O_RDONLY)
    try:
        for candidates, check_size in ((sized, True), (anywhere, False)):
            for base in sorted(set(candidates), key=lambda b: (b % 4096 != 0, b)):
                if budget <= 0:
                    raise CheckpointError(f"{path}: its records are too regular to be matched to its tensors in "
                                          "bounded time: the file is crafted")
                if fits(base, check_size) and (not check_size or holds_file_bytes(base, fd)):
                    found = base
                    break
            if found is not None:
                break
    finally:
        os.close(fd)
    if found is None:
        s = pivot if not sized else order[0]
        raise CheckpointError(
            f"{path}: tensor {_printable(s.key)} ({s.nbytes:,} bytes) is not read from a record of the file: "
            "the file is corrupt or crafted"
        )
    pairs = [(s, by_offset[s.ptr - found]) for s in storages]
    for s, r in pairs:
        if r.size != s.nbytes:
            raise CheckpointError(
                f"record {r.name} ({_printable(s.key)}) holds {r.size:,} bytes but the file's pickle declares "
                f"{s.nbytes:,}: the file is corrupt or crafted"
            )
    return pairs


def _crc_storage(s: _Storage, swap: bool) -> int:
    """CRC-32 of a storage's bytes, read in place (zlib releases the GIL); byte-swapped back first when torch
    swapped the file's big-endian data on load."""
    import ctypes
    import zlib

    crc = 0
    if swap and s.element_size > 1:
        import torch

        whole = torch.empty(0, dtype=torch.uint8).set_(s.storage, 0, (s.nbytes,))
        step = _CRC_CHUNK - _CRC_CHUNK % s.element_size
        for i in range(0, s.nbytes, step):
            part = whole[i:i + step].view(-1, s.element_size).flip(1).contiguous()
            crc = zlib.crc32((ctypes.c_char * part.numel()).from_address(part.data_ptr()), crc)
        return crc
    for i in range(0, s.nbytes, _CRC_CHUNK):
        n = min(_CRC_CHUNK, s.nbytes - i)
        crc = zlib.crc32((ctypes.c_char * n).from_address(s.ptr + i), crc)
    return crc


def _crcs(storages: list[_Storage], swap: bool) -> list[int]:
    total = sum(s.nbytes for s in storages)
    workers = min(4, os.cpu_count() or 1, len(storages))
    if workers <= 1 or total < (64 << 20):
        return [_crc_storage(s, swap) for s in storages]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: _crc_storage(s, swap), storages))


def _verify_storages(path: Path, storages: list[_Storage], archive: _Archive, *, mapped: bool) -> None:
    """Every storage behind a state_dict tensor is proven to hold the bytes of its record, by the zip's own CRC-32.
    Memory-mapped: the record is found by address. Read by torch (a compressed record, inflated into memory):
    torch checked that the storage has its record's size, and the record is the one whose size and CRC-32 it has
    (an identical record is as good: the bytes are the same)."""
    swap = _swapped(archive)
    if mapped:
        pairs = _map_by_address(path, storages, archive)
        for (s, r), crc in zip(pairs, _crcs([s for s, _ in pairs], swap)):
            if crc != r.crc:
                raise _crc_error(r.name, s.key)
        return
    by_content: dict[tuple[int, int], _Record] = {}
    same_size: dict[int, list[_Record]] = {}
    for r in archive.storages.values():
        by_content.setdefault((r.size, r.crc), r)
        same_size.setdefault(r.size, []).append(r)
    for s, crc in zip(storages, _crcs(storages, swap)):
        if (s.nbytes, crc) in by_content:
            continue
        candidates = same_size.get(s.nbytes, [])
        if len(candidates) == 1:
            raise _crc_error(candidates[0].name, s.key)
        raise CheckpointError(
            f"tensor {_printable(s.key)} ({s.nbytes:,} bytes) matches the CRC-32 of no record of {path}: "
            "the file is corrupt or was altered"
        )


def _crc_error(record: str, key: str) -> CheckpointError:
    return CheckpointError(
        f"record {record} ({_printable(key)}) does not match its CRC-32: the file is corrupt or was altered",
        hint="Re-download or re-copy the checkpoint; nothing was written.",
    )


def check_declared_sizes(path: Path) -> None:
    """The check a plain (non-mmap) torch.load makes on every storage record, without reading tensor data: the
    bytes the pickle declares equal the record's size. Used on lexport's own state-dict artifacts, so a file that
    loads memory-mapped but not plainly is never published."""
    import torch

    from .bounded import iter_containers

    archive = _read_archive(path, path.stat().st_size, DEFAULT_MAX_GROWTH)
    by_offset = {r.data_offset: r for r in archive.storages.values()}
    obj = torch.load(str(path), map_location="meta", weights_only=True)
    containers = list(iter_containers(obj))
    tensors = [v for c in containers for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        record = by_offset.get(getattr(st, "_checkpoint_offset", None))
        if record is None or record.size != st.nbytes():
            raise CheckpointError(
                f"{path}: a storage declares {st.nbytes():,} bytes but its record holds "
                f"{'nothing' if record is None else f'{record.size:,} bytes'}: torch.load would refuse it"
            )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    allow_globals: tuple[str, ...] = (),
    hash_file: bool = True,
    max_growth: float = DEFAULT_MAX_GROWTH,
) -> Checkpoint:
    """Load a Lightning checkpoint (or a bare state dict) with weights_only=True, and prove its weights are the
    file's bytes: the zip directory is checked before torch reads it, storage records are memory-mapped only when
    stored uncompressed, and every storage behind a state_dict tensor is checked against its record's CRC-32.
    Work is bounded by the file's size: see DEFAULT_MAX_GROWTH."""
    path = Path(path)
    # --allow-global takes comma-separated names too: the refusal's hint prints them that way, on one line.
    allow_globals = tuple(n.strip() for value in allow_globals for n in value.split(",") if n.strip())
    if not max_growth >= 1:  # also refuses NaN
        raise UsageError(f"--max-growth must be a number >= 1, not {max_growth}")
    from . import sharded

    if sharded.is_sharded_folder(path):
        # FSDP/ModelParallel: only the model tensors are read, with DCP's own reader, and only when asked for (one
        # at a time: memory stays about the largest tensor for weight formats); meta.pt as a .ckpt is.
        meta, lazy = sharded.load_sharded(path, trust=trust, allow_globals=tuple(allow_globals), lazy=True)
        hasher = _Hasher(path, lambda: sharded.folder_sha256(path))
        if hash_file:
            hasher.start()
        # raw gets its own copy of the key table: on_load_checkpoint may edit raw["state_dict"] in place.
        raw = sharded.as_lightning_checkpoint(meta, lazy.copy())
        return Checkpoint(path, raw, lazy, plain=False, hparams=_hparams(raw.get("hyper_parameters")), _sha=hasher)
    from . import deepspeed_folder

    if deepspeed_folder.is_deepspeed_folder(path):
        # DeepSpeed: ZeRO 1/2 module weights as a .ckpt's; ZeRO-3 only through DeepSpeed, with --trust-checkpoint.
        ds, obj = deepspeed_folder.load_deepspeed(path, trust=trust, allow_globals=tuple(allow_globals),
                                                  max_growth=max_growth)
        hasher = _Hasher(ds.root, lambda: deepspeed_folder.folder_sha256(ds))
        if hash_file:
            hasher.start()
        return _as_checkpoint(path, obj, hasher)
    hasher = _Hasher(path)

    def as_checkpoint(obj: Any) -> tuple[Checkpoint, dict[str, Any]]:
        ckpt = _as_checkpoint(path, obj, hasher)
        return ckpt, ckpt.state_dict

    return load_verified(path, as_checkpoint, trust=trust, allow_globals=allow_globals, max_growth=max_growth,
                         on_checked=hasher.start if hash_file else None)


def load_verified(
    path: Path,
    select: Callable[[Any], tuple[Any, dict[str, Any]]],
    *,
    trust: bool,
    allow_globals: tuple[str, ...],
    max_growth: float,
    on_checked: Callable[[], None] | None = None,
) -> Any:
    """One torch.save file under every check: a regular file, the zip directory before torch reads it, weights_only
    (with placeholders and --allow-global), mmap only when all storage records are stored; then `select(obj)` gives
    (result, tensors) and those tensors are proven to be the file's bytes (growth bound, CRC-32). Returns result.
    `on_checked` runs once the file is known to be a regular file (the hasher starts there)."""
    file_size = _check_file(path)
    import torch

    if not trust and _torch_version(torch.__version__) < MIN_TORCH_FOR_UNTRUSTED:
        raise CheckpointError(
            f"torch {torch.__version__} has known weights_only bypasses; refusing to open an untrusted checkpoint.",
            hint="Upgrade to torch >= 2.6, or pass --trust-checkpoint if you trust this file completely.",
        )
    allowed = [_import_dotted(name) for name in allow_globals]  # a bad --allow-global fails before any work
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    archive = _read_archive(path, file_size, max_growth) if is_zip else None
    mapped = archive is not None and archive.all_stored
    if on_checked is not None:
        on_checked()
    obj = _torch_load(path, trust=trust, allowed=allowed, allow_globals=allow_globals, mmap=mapped, is_zip=is_zip)
    result, tensors = select(obj)
    storages = _check_tensors(path, tensors, file_size=file_size, max_growth=max_growth, archive=archive)
    if archive is not None:
        _verify_storages(path, storages, archive, mapped=mapped)
    return result


def _torch_load(
    path: Path,
    *,
    trust: bool,
    allowed: list[Any],
    allow_globals: tuple[str, ...] = (),
    mmap: bool = False,
    is_zip: bool = True,
) -> Any:
    import warnings

    import torch

    # mmap reads a record's bytes where they lie in the file, whatever its compression flag says: only for
    # archives whose storage records are all stored uncompressed (torch inflates the others correctly).
    kwargs: dict[str, Any] = {"map_location": "cpu", "mmap": mmap}
    if trust:
        # The user said the file is trusted: full unpickling, which runs code from the file; the classes it names
        # are imported from the project's root as with python -m.
        from .model import _ensure_cwd_importable

        _ensure_cwd_importable()
        kwargs["weights_only"] = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(str(path), **kwargs)
        except Exception as e:
            raise CheckpointError(f"{_explain_load_failure(path, e)} [loaded with --trust-checkpoint]") from e

    # Always explicit, and never retried with weights_only=False: an inherited TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    # cannot turn it off (torch honours that variable only when weights_only is not passed; it is also unset
    # for the call, so a torch that behaved otherwise could not be talked into it either).
    kwargs["weights_only"] = True
    saved_env = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        # Keyed as torch keys them (module.qualname of the object) and by the name the user gave, which is the
        # name a pickle uses when a module re-exports the object (numpy.core.multiarray -> numpy._core...).
        safe: list[Any] = []
        for obj, name in zip(allowed, allow_globals):
            safe.append(obj)
            if name != _qualname(obj):
                safe.append((obj, name))
            safe.extend(_dtype_classes(obj))
        try:
            return _weights_only_load(path, safe, kwargs)
        except pickle.UnpicklingError as e:
            # Objects beyond what torch and --allow-global admit (hparams holding modules, partials, numpy arrays):
            # each becomes an inert placeholder, unless one of them comes from a module whose objects run code.
            unloaded = _unloaded_globals(path, safe) if is_zip else []
            if not unloaded or any(_code_running(n) for n in unloaded):
                raise
            try:
                return _weights_only_load(path, [*safe, *((_placeholder(n), n) for n in unloaded)], kwargs)
            except pickle.UnpicklingError:
                raise e from None
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e, is_zip, allowed, allow_globals) from e
    except Exception as e:
        raise CheckpointError(_explain_load_failure(path, e)) from e
    finally:
        if saved_env is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = saved_env


def _weights_only_load(path: Path, safe: list[Any], kwargs: dict[str, Any]) -> Any:
    import warnings

    import torch

    ctx = torch.serialization.safe_globals(safe) if safe else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        # torch warns about pickle protocols and legacy formats; the user gets one clear message instead.
        warnings.simplefilter("ignore")
        return torch.load(str(path), **kwargs)


# ------------------------------------------------------------------------------------------- placeholders
# hyper_parameters often hold objects: save_hyperparameters(logger=False) pickles the `net` module and Hydra's
# partial optimizers, forecasting libraries pickle metrics and numpy arrays. The weights never need them, so the
# weights_only unpickler itself builds an inert placeholder for each such global instead of refusing the file.
#
# Why this runs no code from the file. torch's weights_only unpickler calls only torch's own allowlisted functions
# (tensor and storage rebuilders, dtypes, OrderedDict, ...) and the objects passed in safe_globals. lexport passes,
# for every global name torch would refuse, a fresh subclass of Unloaded keyed by that name (torch accepts
# (object, "module.Name") pairs): the name is a string, nothing is imported or looked up. Unloaded's __new__,
# __init__ and __setstate__ ignore their arguments, so calling it (REDUCE), creating it (NEWOBJ) or building it
# (BUILD) does nothing. Tensors still come only through torch's rebuild functions, and the state dict must hold
# nothing but torch.Tensor values (a placeholder is not one). A file that names anything from a module whose objects
# run code (os, subprocess, builtins.eval, ...) is refused as before and never loaded with placeholders, so its
# refusal still says what it is. tests/test_security.py runs such pickles and checks that no marker file appears.
class Unloaded:
    """An object of the checkpoint that the safe loader did not load; `name` is the global the pickle named.
    What the pickle passed to it (arguments, state) is kept as data, never used: so the names of objects nested
    inside it (a module's submodules) can be listed."""

    __slots__ = ("args", "state")
    name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Unloaded:
        self = object.__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.what} (not loaded)>"

    @property
    def what(self) -> str:
        """The name for messages: escaped (a name from a file carries no terminal control sequences)."""
        return "numpy.ndarray" if self.name.endswith("multiarray._reconstruct") else _printable(self.name)


def _placeholder(name: str) -> type[Unloaded]:
    return type(name.rpartition(".")[2] or name, (Unloaded,), {"__slots__": (), "name": name})


class _WalkBudget(Exception):
    pass


def unloaded_in(value: Any, budget: list[int] | None = None) -> list[str]:
    """The global names of every placeholder inside `value` (a hyper-parameter), nested ones included, sorted.
    Containers, objects' attributes (an OrderedDict's __dict__, a tensor's, an allowed class's) and placeholders'
    kept arguments are looked into; each object once, so one walk is bounded by what the file holds. `budget`
    (a one-item list) is shared by several walks and raises _WalkBudget when spent."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if budget is not None:  # every step counts, repeats included: they are the work a shared object makes
            budget[0] -= 1
            if budget[0] < 0:
                raise _WalkBudget
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, Unloaded):
            found.add(v.name)
            stack.extend((v.args, v.state))
            continue
        if isinstance(v, type):
            if issubclass(v, Unloaded):  # a class passed as data (ndarray, Adam)
                found.add(v.name)
            continue
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        attrs = getattr(v, "__dict__", None)  # Namespace, OrderedDict and tensor attributes, allowed classes
        if isinstance(attrs, dict):
            stack.extend(attrs.values())
    return sorted(found)


# Walks of hyper_parameters one key at a time may meet the same shared objects once per key; together they stop
# here (a few seconds), and the keys not walked by then count as holding the objects found in the whole.
WALK_BUDGET = 4_000_000


def unloaded_by_key(mapping: dict[str, Any]) -> dict[str, list[str]]:
    """key -> the placeholders inside mapping[key], for the keys that hold any. One walk of the whole first: a
    mapping without placeholders (the usual case) costs that walk only, whatever its keys share."""
    everything = unloaded_in(mapping)
    if not everything:
        return {}
    budget, out = [WALK_BUDGET], {}
    for k, v in mapping.items():
        try:
            names = unloaded_in(v, budget)
        except _WalkBudget:
            names = everything  # not walked to the end: assume the worst, it is only ever refused for that
        if names:
            out[k] = names
    return out


def unloaded_arguments_error(cls_name: str, held: dict[str, list[str]], values: dict[str, Any]) -> UserModuleError:
    """The error for constructor arguments that the checkpoint holds only as placeholders: which, and where to give
    them; and, when every object inside them is a class that may be allowed, the one --allow-global line that loads
    them all (nested objects included), so one round is enough."""
    names = sorted({n for v in held.values() for n in v})
    what = ", ".join(f"{_printable(k)}: a {values[k].what}" if isinstance(values.get(k), Unloaded)
                     else f"{_printable(k)}: holds objects" for k in held)
    args = _printable(", ".join(held))  # keys come from the file too
    first = _printable(next(iter(held)))
    hint = (
        "Give them yourself: --config FILE (the run's LightningCLI config.yaml or Hydra .hydra/config.yaml), "
        f"--init-args FILE, or --init-arg {first}=VALUE (a submodule as {{class_path: pkg.mod.Class, init_args: ...}})."
    )
    refused = [_printable(n) for n in names if _hint_refusal(n)]
    if refused:
        hint += (f"\n{', '.join(refused)} cannot be allowed (only classes can), so --allow-global cannot load "
                 f"{'it' if len(refused) == 1 else 'them'}; --trust-checkpoint can (full unpickling: runs code from "
                 "the file).")
    else:
        hint += ("\nOr load the real objects, if you trust these classes (only they are unpickled):\n"
                 f"{allow_global_flag(names)}")
    return UserModuleError(
        f"{cls_name}.__init__ needs {args}, which the checkpoint's hyper_parameters hold as objects that lexport did "
        f"not load ({what}): loading them would run code from the file",
        hint=hint,
    )


def _unloaded_globals(path: Path, safe: list[Any]) -> list[str]:
    """Every global the file's pickle names that torch and the user's --allow-global do not admit, read from its
    opcodes (not only the first one torch names), sorted."""
    import torch

    try:
        with torch.serialization.safe_globals(safe) if safe else contextlib.nullcontext():
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - an opcode the scanner does not know: no placeholders, the refusal stands
        return []


def _code_running(name: str) -> bool:
    """A global from a module whose objects run commands, import code or open files (or that torch blocks)."""
    try:
        from torch._weights_only_unpickler import _blocklisted_modules
    except ImportError:  # pragma: no cover - a torch that moved it: lexport's own list still applies
        _blocklisted_modules = []
    module = _py3_name(name).rpartition(".")[0]
    return bool(_blocked_module(_py3_name(name))) or module.split(".")[0] in _blocklisted_modules


_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_BLOCKED_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) whose module \S+ is blocked")


def _weights_only_detail(e: BaseException) -> str:
    """The unpickler's own words, without torch's generic advice (which says to retry with weights_only=False)."""
    inner = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else None
    text = str(inner) if inner is not None else str(e)
    if inner is None and "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    if inner is None:
        text = text.split("Check the documentation of torch.load", 1)[0]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _dtype_classes(obj: Any) -> list[Any]:
    """Allowing numpy.dtype admits its per-dtype classes too (numpy.dtypes.Float64DType, ...): a pickle names only
    numpy.dtype, but what it builds is an instance of one of them, which torch checks again. Without this, each
    dtype class is named by torch only once the previous ones are allowed, one round at a time."""
    import sys

    np = sys.modules.get("numpy")
    if np is None or obj is not getattr(np, "dtype", None):
        return []
    dtypes = getattr(np, "dtypes", None)
    return [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)] if dtypes else []


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _unpickling_error(
    path: Path, e: pickle.UnpicklingError, is_zip: bool, allowed: list[Any], allow_globals: tuple[str, ...]
) -> CheckpointError:
    detail = _printable(_weights_only_detail(e))
    full = f"{e}\n{e.__context__ or ''}"
    blocked = set(_BLOCKED_RE.findall(full))
    found = (_describe_unsafe(path) if is_zip else []) + _GLOBAL_RE.findall(full)
    named = [_printable(n) for n in dict.fromkeys(found)]
    already = set(allow_globals) | {_qualname(o) for o in allowed}
    wanted = [n for n in named if n not in already] or named
    if not named:
        # No global is involved: the pickle itself is not one torch.save writes (random bytes, a plain pickle,
        # a damaged file). There is nothing to allow; trusting it would not make it a checkpoint.
        return CheckpointError(f"{path} is not a torch checkpoint, or it is corrupt ({detail})")
    listed = ", ".join(wanted)
    # The same rule as --allow-global (decided without importing anything new): a name that could never be allowed
    # is never offered, and its presence says what the file is.
    reasons = {n: ("torch blocks its module" if n in blocked else _hint_refusal(n)) for n in wanted}
    never = [n for n in wanted if reasons[n]]
    if never:
        why = "; ".join(
            f"{n}{'' if _py3_name(n) == n else f' (that is {_py3_name(n)})'}: {reasons[n]}" for n in never[:4]
        )
        return CheckpointError(
            f"{path} wants Python objects that are not loaded by default: {listed}. "
            f"{', '.join(never)} is never allowed: this file tries to run code ({why}).",
            hint="This file is very likely malicious. Only if you trust it completely: --trust-checkpoint "
            "(full unpickling: runs code from the file).",
        )
    absent = [n for n in wanted if not _module_exists(n)]
    if absent:
        # A name whose module does not exist here cannot be allowed (nor unpickled at all): a damaged name,
        # or a class from a package that is not installed.
        return CheckpointError(
            f"{path} wants Python objects that are not loaded by default: {listed}; "
            f"{', '.join(absent)} cannot be imported here, so the file is corrupt or needs a package that is "
            "not installed",
            hint="If the file is intact, install the package that defines them, then allow them with "
            "--allow-global pkg.mod.Name (or, only if you trust the file completely, --trust-checkpoint: full "
            "unpickling, runs code from the file).",
        )
    return CheckpointError(
        f"{path} wants Python objects that are not loaded by default: {listed}",
        hint=(
            "Two ways in. If you know these classes, allow exactly them (only they are unpickled, nothing else):\n"
            f"{allow_global_flag(wanted)}\n"
            "Or, only if you trust the file completely: --trust-checkpoint (full unpickling: runs code from the file)."
        ),
    )


def allow_global_flag(names: list[str]) -> str:
    """Every name on one line, sorted, as one shell word: pasted whole, it needs no second round. Only names that
    --allow-global accepts are offered: dotted identifiers (nothing a shell would expand) that pass its rule."""
    offered = sorted({n for n in names if all(p.isidentifier() for p in n.split(".")) and not _hint_refusal(n)})
    return "--allow-global " + shlex.quote(",".join(offered)) if offered else ""


def _printable(text: str) -> str:
    """Names and messages from a file are shown escaped: no terminal control sequences from a checkpoint."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _module_exists(dotted: str) -> bool:
    """Whether `dotted` (pkg.mod.Name) can name something in this environment, decided without importing (running)
    anything new: modules already imported are looked into, others only located. True when unsure."""
    import importlib.util
    import sys
    import types

    parts = dotted.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    try:
        if parts[0] not in sys.modules:
            return importlib.util.find_spec(parts[0]) is not None
        obj: Any = sys.modules[parts[0]]
        for i, part in enumerate(parts[1:], start=1):
            if not isinstance(obj, types.ModuleType):
                return True  # an attribute of a class: do not evaluate anything
            if part in vars(obj):
                obj = vars(obj)[part]
                continue
            name = ".".join(parts[: i + 1])
            if name in sys.modules:
                obj = sys.modules[name]
                continue
            # The parent is imported, so locating the submodule runs no code; what lies inside it is not checked.
            return importlib.util.find_spec(name) is not None
        return True
    except (ImportError, ValueError, AttributeError):
        return False


def _explain_load_failure(path: Path, e: Exception) -> str:
    text = "\n".join(_printable(line) for line in str(e).strip().splitlines())
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    first = text.splitlines()[0].strip() if text else ""
    low = text.lower()
    if not first:  # e.g. EOFError() says nothing
        first = type(e).__name__
        low = first.lower()
    newer = re.search(r"file with version (\d+), but the maximum supported version for reading is (\d+)", text)
    if newer:
        return (
            f"{path} was written by a newer torch than this one (file format version {newer.group(1)}; "
            f"torch {_installed_torch()} reads up to version {newer.group(2)}). Upgrade torch to read it."
        )
    if "maximum supported version" in low or ("version" in low and "not supported" in low):
        return f"{path} was written by a newer torch than this one: {first}. Upgrade torch to read it."
    if "magic number" in low:
        return f"{path} is not a torch checkpoint (it has no torch.save header), or it is corrupt ({first})"
    if any(k in low for k in ("central directory", "zip archive", "failed reading", "eof", "pytorchstreamreader")):
        return f"{path} is truncated or corrupt ({first})"
    if "invalid load key" in low or "unpickling" in low or "pickle" in low:
        return f"{path} is not a torch checkpoint, or it is corrupt ({first})"
    what = first[:300] if first == type(e).__name__ else f"{type(e).__name__}: {first[:300]}"
    return f"{path} is corrupt or not a torch checkpoint ({what})"


def _installed_torch() -> str:
    import torch

    return str(torch.__version__)


def tensor_specs(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """key -> something with the tensor's shape, dtype, numel() and element_size(), without reading any data: the
    tensors themselves for a loaded state dict, meta tensors for one read lazily (a sharded folder)."""
    specs = getattr(state_dict, "specs", None)
    return specs() if callable(specs) else state_dict


def _is_tensor_mapping(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _hparams(value: Any) -> dict[str, Any]:
    """hyper_parameters as a dict of str keys: a dict, or a Namespace-like object (allowed with --allow-global);
    anything else (None, a tensor or list in a damaged file) gives no hyper-parameters."""
    import torch

    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(k, str)}
    if value is not None and not isinstance(value, (torch.Tensor, list, tuple, str, bytes, int, float)):
        try:
            return {k: v for k, v in vars(value).items() if isinstance(k, str)}
        except TypeError:
            return {}
    return {}


def _as_checkpoint(path: Path, obj: Any, hasher: _Hasher | None) -> Checkpoint:
    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
        if isinstance(sd, dict) and not sd:
            raise CheckpointError(f"{path}: its 'state_dict' entry is empty (no tensors to export)")
        if not _is_tensor_mapping(sd):
            names = unloaded_in(sd) if isinstance(sd, (Unloaded, dict)) else []
            flag = allow_global_flag(names)
            raise CheckpointError(
                f"{path}: its 'state_dict' entry does not hold tensors"
                + (f" (it holds objects that were not loaded: {_printable(', '.join(names))})" if names else ""),
                hint=f"If you know these classes, allow them:\n{flag}" if flag else None,
            )
        hparams = _hparams(obj.get("hyper_parameters"))
        return Checkpoint(path, obj, dict(sd), plain=False, hparams=hparams, _sha=hasher)
    if _is_tensor_mapping(obj):
        return Checkpoint(path, {"state_dict": obj}, dict(obj), plain=True, _sha=hasher)
    what = type(obj).__name__
    if isinstance(obj, dict):
        keys = _printable(", ".join(map(str, list(obj)[:8]))) or "nothing"
        raise CheckpointError(
            f"{path} holds a {what} without a 'state_dict' entry and is not a state dict of tensors (keys: {keys})"
        )
    raise CheckpointError(f"{path} holds a {what}, not a Lightning checkpoint or a state dict of tensors")
