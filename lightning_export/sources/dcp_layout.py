"""A DCP folder's layout, checked: its .metadata unpickled by an allowlist, then every number in it checked against
the folder's files before anything is allocated or read (see sources/dcp.py for what Lightning writes)."""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import ZIP_READ_ERRORS, CheckpointError
from .folder import existing, inside

METADATA_FILE = ".metadata"
META_FILE = "meta.pt"  # lightning_fabric.utilities.load._METADATA_FILENAME
# The DCP key holding the module's state dict: FSDPStrategy, then ModelParallelStrategy.
WEIGHT_KEYS = ("model", "state_dict")
MAX_CHUNKS_PER_TENSOR = 65536  # a 65536-rank job; the overlap check is done in blocks, so memory stays small
COPY_HINT = "Copy the whole folder: .metadata, meta.pt and one __<rank>_<n>.distcp file per rank."


def is_sharded_folder(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding a DCP ``.metadata`` (a Lightning sharded checkpoint, or a plain DCP folder)."""
    p = Path(path)
    return p.is_dir() and (p / METADATA_FILE).exists()


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    import torch
    import torch.serialization
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint import metadata as md

    allowed: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        # Paths (StorageMeta.checkpoint_id) become pure paths: nothing touches the file system.
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
        ("pathlib._local", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib._local", "WindowsPath"): pathlib.PureWindowsPath,
        ("collections", "OrderedDict"): dict,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
    }
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    ):
        if hasattr(md, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(md, name)
    return allowed


class _Refused(pickle.UnpicklingError):
    """A global outside the allowlist: the file is not DCP metadata (or wants more than DCP metadata needs)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata classes, torch.Size, dtypes and paths: none of them runs code when unpickled."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name} is not a torch.distributed.checkpoint metadata class")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent ids are not used by torch.distributed.checkpoint metadata")


def read_dcp_metadata(folder: Path, *, trust: bool = False) -> Any:
    """The ``.metadata`` of a DCP folder, unpickled safely (with ``trust``: by plain pickle if it must be)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / METADATA_FILE
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if not raw:
        raise CheckpointError(f"{path} is empty (0 bytes); the checkpoint was not written completely")
    try:
        obj = _MetadataUnpickler(io.BytesIO(raw), _allowed_globals()).load()
    except _Refused as e:
        if not trust:
            raise CheckpointError(
                f"{path} is not a torch.distributed.checkpoint metadata file ({short(e)})",
                hint="A genuine .metadata holds only DCP metadata classes; torch's own reader would unpickle this "
                "one with plain pickle (runs code from the file). Only if you trust the folder completely: "
                "--trust-checkpoint.",
            ) from e
        try:
            obj = pickle.loads(raw)  # noqa: S301 - the user said the folder is trusted
        except Exception as e2:  # noqa: BLE001
            raise CheckpointError(f"{path} is corrupt ({short(e2)}) [loaded with --trust-checkpoint]") from e2
    except Exception as e:  # noqa: BLE001 - truncated or damaged pickles raise anything (EOFError, ValueError...)
        raise CheckpointError(f"{path} is truncated or corrupt ({short(e)})") from e
    if not isinstance(obj, Metadata):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not torch.distributed.checkpoint Metadata")
    for attr, kind in (("state_dict_metadata", dict), ("storage_data", dict)):
        if not isinstance(getattr(obj, attr, None), kind):
            raise CheckpointError(f"{path} is corrupt: its {attr} is not a {kind.__name__}")
    if not isinstance(getattr(obj, "planner_data", None), (dict, type(None))):
        raise CheckpointError(f"{path} is corrupt: its planner_data is not a dict")
    return obj


def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0][:300] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # a file name in the folder
    offset: int  # where its torch.save record starts in that file
    length: int  # the record's length

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorEntry:
    key: str  # the Lightning state-dict key ("model.fc1.weight")
    fqn: str  # the DCP key ("model.model.fc1.weight")
    shape: tuple[int, ...]
    dtype: Any  # torch.dtype
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def check_folder(path: Path) -> Path:
    existing(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    root = path.resolve()
    if not (root / METADATA_FILE).exists():
        raise CheckpointError(f"{path} is a directory, not a checkpoint (it has no {METADATA_FILE})")
    inside(root, METADATA_FILE, copy_hint=COPY_HINT)
    return root


def rank_files(root: Path) -> dict[str, int]:
    """name -> size of the regular files of the folder (nothing else is ever opened)."""
    sizes: dict[str, int] = {}
    try:
        names = os.listdir(root)
    except OSError as e:
        raise CheckpointError(f"cannot list {root}: {e.strerror or e}") from e
    for name in names:
        p = root / name
        with contextlib.suppress(OSError):
            if p.is_file() and p.resolve().parent == root:
                sizes[name] = p.stat().st_size
    return sizes


def plain_ints(value: Any, what: str, fqn: str, root: Path) -> tuple[int, ...]:
    import torch

    if not isinstance(value, (torch.Size, tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(f"{root}/{METADATA_FILE} is corrupt: {what} of {fqn!r} is not a list of sizes")
    return tuple(int(v) for v in value)


def weight_entries(
    root: Path, metadata: Any, files: dict[str, int]
) -> tuple[str, dict[str, TensorEntry], list[str]]:
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where = f"{root}/{METADATA_FILE}"
    planner_data = metadata.planner_data or {}
    paths: dict[str, tuple[Any, ...]] = {}
    for fqn in metadata.state_dict_metadata:
        if not isinstance(fqn, str):
            raise CheckpointError(f"{where} is corrupt: a key is a {type(fqn).__name__}, not a string")
        path = planner_data.get(fqn)
        # Without planner data (a state dict saved unflattened), the DCP key is the path.
        paths[fqn] = tuple(path) if isinstance(path, (tuple, list)) and path else (fqn,)
    tops = list(dict.fromkeys(str(p[0]) for p in paths.values()))
    key = next((k for k in WEIGHT_KEYS if k in tops), None)
    if key is None:
        shown = ", ".join(tops[:10]) or "nothing"
        raise CheckpointError(
            f"{root} is a torch.distributed.checkpoint folder, but not one Lightning wrote: it has no "
            f"{' or '.join(repr(k) for k in WEIGHT_KEYS)} entry with the module's weights (it has: {shown})",
        )
    entries: dict[str, TensorEntry] = {}
    skipped: list[str] = []
    storage = metadata.storage_data
    for fqn, md in metadata.state_dict_metadata.items():
        path = paths[fqn]
        if str(path[0]) != key or len(path) < 2:
            skipped.append(fqn)
            continue
        name = ".".join(str(p) for p in path[1:])
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(
                f"{root}: the weight {name!r} is a pickled Python object, not a tensor; lexport reads only tensors "
                "(torch would unpickle it with weights_only=False)",
            )
        shape = plain_ints(md.size, "the size", fqn, root)
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{where} is corrupt: {fqn!r} has no dtype")
        if not isinstance(md.chunks, list) or not md.chunks:
            raise CheckpointError(f"{where} is corrupt: {fqn!r} has no stored chunks")
        if len(md.chunks) > MAX_CHUNKS_PER_TENSOR:
            raise CheckpointError(f"{where}: {fqn!r} is split into {len(md.chunks)} chunks; refusing so many")
        chunks = [_chunk(c, fqn, name, shape, dtype, storage, files, root) for c in md.chunks]
        _check_coverage(name, shape, chunks, where)
        if name in entries:
            raise CheckpointError(f"{where} is corrupt: the weight {name!r} is listed twice")
        entries[name] = TensorEntry(name, fqn, shape, dtype, tuple(chunks))
    if not entries:
        raise CheckpointError(f"{root}: its {key!r} entry holds no tensors (nothing to export)")
    return key, entries, skipped


def _chunk(c: Any, fqn: str, name: str, shape: tuple[int, ...], dtype: Any, storage: Any, files: dict[str, int],
           root: Path) -> Chunk:
    """One stored chunk of a weight, checked: inside the tensor, its record inside a rank file of the folder, and its
    bytes within the record."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex

    where = f"{root}/{METADATA_FILE}"
    offsets = plain_ints(getattr(c, "offsets", None), "a chunk offset", fqn, root)
    sizes = plain_ints(getattr(c, "sizes", None), "a chunk size", fqn, root)
    if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
        o + s > d for o, s, d in zip(offsets, sizes, shape)
    ):
        raise CheckpointError(
            f"{where} is corrupt: a chunk of {name!r} at {list(offsets)} of size {list(sizes)} lies outside "
            f"the tensor's shape {list(shape)}"
        )
    info = storage.get(MetadataIndex(fqn, torch.Size(offsets)))
    rel = getattr(info, "relative_path", None)
    off, length = getattr(info, "offset", None), getattr(info, "length", None)
    if info is None or not isinstance(rel, str) or not _is_count(off) or not _is_count(length) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, length)
    ):
        raise CheckpointError(f"{where} is corrupt: the chunk of {name!r} at {list(offsets)} has no storage")
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            f"{root}: {name!r} is stored through transforms {list(info.transform_descriptors)} "
            "(compression or encryption); lexport reads plain torch.distributed.checkpoint records only"
        )
    if rel not in files:
        inside(root, rel, copy_hint=COPY_HINT)  # names why: missing, a link out of the folder, not a file
        raise CheckpointError(f"{root}: {rel} is not a regular file of the folder")
    if off + length > files[rel]:
        raise CheckpointError(
            f"{root}/{rel} is truncated: {name!r} is stored at bytes {off}..{off + length} of a "
            f"{files[rel]}-byte file",
            hint=COPY_HINT,
        )
    chunk = Chunk(offsets, sizes, rel, off, length)
    if chunk.numel * dtype.itemsize > length:
        raise CheckpointError(
            f"{where} is corrupt: a chunk of {name!r} declares {chunk.numel * dtype.itemsize} bytes of "
            f"{dtype} in a {length}-byte record"
        )
    return chunk


def _check_coverage(name: str, shape: tuple[int, ...], chunks: list[Chunk], where: str) -> None:
    """The chunks tile the tensor: they do not overlap and their volumes add up to it. Otherwise part of the
    tensor would be left as uninitialised memory, silently."""
    total = math.prod(shape)
    if sum(c.numel for c in chunks) != total or any(c.numel == 0 for c in chunks if total):
        raise CheckpointError(
            f"{where} is corrupt: the chunks of {name!r} do not add up to its shape {list(shape)}"
        )
    if len(chunks) < 2 or not shape:
        return
    import torch

    lo = torch.tensor([c.offsets for c in chunks], dtype=torch.int64)
    hi = lo + torch.tensor([c.sizes for c in chunks], dtype=torch.int64)
    block = max(1, (1 << 22) // (len(chunks) * len(shape)))  # about 4M comparisons at a time
    for start in range(0, len(chunks), block):
        a_lo, a_hi = lo[start : start + block, None, :], hi[start : start + block, None, :]
        overlap = ((a_lo < hi[None]) & (lo[None] < a_hi)).all(dim=-1)
        rows = torch.arange(start, min(start + block, len(chunks)))
        overlap[rows - start, rows] = False
        if bool(overlap.any()):
            raise CheckpointError(f"{where} is corrupt: chunks of {name!r} overlap")


class FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset + length) of an open file."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b).cast("B")[:n])  # straight into the caller's buffer, no copy
        self.pos += got
        return got


def check_record(root: Path, chunk: Chunk, entry: TensorEntry, verify_crc: bool = True) -> None:
    """A chunk's record is a zip (what torch.save writes) whose entries are stored, not compressed, and fit in it
    (torch.load would otherwise inflate a small record into any size it declares), with intact CRC-32s."""
    where = f"{root}/{chunk.file}: the record of {entry.key!r} at byte {chunk.offset}"
    try:
        with open(root / chunk.file, "rb") as f:
            view = io.BufferedReader(FileSlice(f, chunk.offset, chunk.length), 1 << 20)
            with zipfile.ZipFile(view) as z:
                for info in z.infolist():
                    if info.compress_type != zipfile.ZIP_STORED or info.file_size > chunk.length:
                        raise CheckpointError(
                            f"{where} holds a compressed or oversized entry ({info.filename}, {info.file_size} "
                            "bytes); torch.save never writes one"
                        )
                    if verify_crc:
                        # torch.load does not check the CRC-32 of what it reads: a flipped bit would be a silently
                        # different weight. zipfile checks it at the end of the entry; 1 MiB at a time.
                        with z.open(info) as data:
                            while data.read(1 << 20):
                                pass
    except ZIP_READ_ERRORS as e:
        raise CheckpointError(f"{where} is corrupt ({short(e)})") from e


def _is_count(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
