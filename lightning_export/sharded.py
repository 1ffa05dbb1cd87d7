"""Lightning sharded checkpoint folders (torch.distributed.checkpoint): the weights only, one tensor at a time.

What Lightning 2.6 writes with FSDPStrategy(state_dict_type="sharded") or ModelParallelStrategy (the default
save_distributed_checkpoint=True), read from its sources:

    folder/                       (named like a file: "epoch=0-step=10.ckpt")
      .metadata                   DCP's Metadata, written with plain pickle.dump by rank 0
      __0_0.distcp, __1_0.distcp  one file per rank: every tensor chunk is a torch.save record at (offset, length)
      meta.pt                     torch.save of the rest of the checkpoint (epoch, global_step, hyper_parameters,
                                  pytorch-lightning_version, loops, callbacks, ...), rank 0 only

The DCP state dict is {"model": <module state dict>, "optimizer_0": ..., "optimizer_1": ...} for FSDPStrategy and
{"state_dict": <module state dict>, "optimizer_0": ...} for ModelParallelStrategy. DCP flattens it: the entry for
"model.fc1.weight" of the module is the DCP key "model.model.fc1.weight" with planner_data ("model",
"model.fc1.weight"). Sharded tensors (DTensor, FSDP) are stored as chunks (offsets, sizes) spread over the rank
files; replicated ones once.

Safety. torch's FileSystemReader.read_metadata is a plain ``pickle.load`` of ``.metadata``: a crafted folder runs
code when torch (or Lightning's consolidate_checkpoint) opens it. Here ``.metadata`` is unpickled by an allowlist
of DCP's own metadata classes, torch.Size, dtypes and paths (nothing that can run code), then every number in it is
checked against the folder before anything is allocated or read: each weight's chunks lie inside the tensor, do not
overlap and cover it exactly; each chunk's record lies inside an existing rank file of this folder (no ``..``, no
symlink leading out); a chunk's bytes fit in its record; records are zip entries stored uncompressed (no
decompression bombs). Tensor records are then read by torch's own FileSystemReader and DefaultLoadPlanner (torch.load
with weights_only=True), without a process group. Entries that are not tensors (pickled objects, which DCP unpickles
with weights_only=False) are never read, and neither is any optimizer entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import pickle
import weakref
import zipfile
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

METADATA_FILE = ".metadata"
META_FILE = "meta.pt"  # lightning_fabric.utilities.load._METADATA_FILENAME
# The DCP key holding the module's state dict: FSDPStrategy, then ModelParallelStrategy.
WEIGHT_KEYS = ("model", "state_dict")
MAX_CHUNKS_PER_TENSOR = 65536  # a 65536-rank job; the overlap check is done in blocks, so memory stays small


# ---------------------------------------------------------------------------------------------- detection
def is_sharded_folder(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding a DCP ``.metadata`` (a Lightning sharded checkpoint, or a plain DCP folder)."""
    p = Path(path)
    return p.is_dir() and (p / METADATA_FILE).exists()


# ------------------------------------------------------------------------------------- the .metadata pickle
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
                f"{path} is not a torch.distributed.checkpoint metadata file ({_short(e)})",
                hint="A genuine .metadata holds only DCP metadata classes; torch's own reader would unpickle this "
                "one with plain pickle (runs code from the file). Only if you trust the folder completely: "
                "--trust-checkpoint.",
            ) from e
        try:
            obj = pickle.loads(raw)  # noqa: S301 - the user said the folder is trusted
        except Exception as e2:  # noqa: BLE001
            raise CheckpointError(f"{path} is corrupt ({_short(e2)}) [loaded with --trust-checkpoint]") from e2
    except Exception as e:  # noqa: BLE001 - truncated or damaged pickles raise anything (EOFError, ValueError...)
        raise CheckpointError(f"{path} is truncated or corrupt ({_short(e)})") from e
    if not isinstance(obj, Metadata):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not torch.distributed.checkpoint Metadata")
    for attr, kind in (("state_dict_metadata", dict), ("storage_data", dict)):
        if not isinstance(getattr(obj, attr, None), kind):
            raise CheckpointError(f"{path} is corrupt: its {attr} is not a {kind.__name__}")
    if not isinstance(getattr(obj, "planner_data", None), (dict, type(None))):
        raise CheckpointError(f"{path} is corrupt: its planner_data is not a dict")
    return obj


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0][:300] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ------------------------------------------------------------------------------------ the folder, checked
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


class ShardedCheckpoint:
    """A Lightning sharded folder, checked; the weights are read only when asked for, one tensor at a time.

    ``entries``: Lightning key -> TensorEntry, in the order the checkpoint lists them. ``weights_key``: "model"
    (FSDPStrategy) or "state_dict" (ModelParallelStrategy). ``skipped``: DCP keys left unread (optimizer states,
    anything that is not the module's weights).
    """

    def __init__(self, folder: str | os.PathLike[str], *, trust: bool = False) -> None:
        self.path = Path(folder)
        self.root = _check_folder(self.path)
        self.metadata = read_dcp_metadata(self.root, trust=trust)
        self.files = _rank_files(self.root)
        self.weights_key, self.entries, self.skipped = _weight_entries(self.root, self.metadata, self.files)
        self._reader: Any = None
        self.live = _LiveBytes()  # what the LazyStateDicts over this folder have handed out and is still alive

    # -- what it holds, without reading any tensor
    @property
    def weights_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def largest_tensor_bytes(self) -> int:
        return max((e.nbytes for e in self.entries.values()), default=0)

    def keys(self) -> list[str]:
        return list(self.entries)

    def skipped_summary(self) -> dict[str, dict[str, int]]:
        """Top-level DCP key (optimizer_0, ...) -> tensors and bytes of the entries left unread, from the metadata."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        planner_data = self.metadata.planner_data or {}
        out: dict[str, dict[str, int]] = {}
        for fqn in self.skipped:
            md = self.metadata.state_dict_metadata.get(fqn)
            path = planner_data.get(fqn)
            top = str(path[0]) if isinstance(path, (tuple, list)) and path else fqn.split(".", 1)[0]
            item = out.setdefault(top, {"tensors": 0, "bytes": 0})
            size = getattr(md, "size", None)
            if isinstance(md, TensorStorageMetadata) and isinstance(size, (tuple, list)) and all(
                isinstance(v, int) and v >= 0 for v in size
            ):  # skipped entries were never checked: a damaged one is left out of the count
                dtype = getattr(getattr(md, "properties", None), "dtype", None)
                item["tensors"] += 1
                item["bytes"] += math.prod(size) * int(getattr(dtype, "itemsize", 0) or 0)
        return {k: v for k, v in out.items() if v["tensors"]}

    # -- reading
    def tensor(self, key: str) -> Any:
        """One full tensor (a new CPU tensor), assembled from its chunks by torch's reader and planner."""
        return self._read([self.entries[key]])[key]

    def iter_tensors(self, max_bytes: int = 0) -> Iterator[tuple[str, Any]]:
        """(key, tensor) in checkpoint order, reading one tensor at a time, or several whose bytes add up to at
        most ``max_bytes`` (one read pass per group; a tensor larger than max_bytes is read alone)."""
        group: list[TensorEntry] = []
        size = 0
        for entry in self.entries.values():
            if group and size + entry.nbytes > max_bytes:
                yield from self._read(group).items()
                group, size = [], 0
            group.append(entry)
            size += entry.nbytes
        if group:
            yield from self._read(group).items()

    def state_dict(self, max_bytes: int = 0) -> dict[str, Any]:
        """Every weight under its Lightning key, as CPU tensors (what a .ckpt's "state_dict" holds)."""
        return dict(self.iter_tensors(max_bytes=max_bytes))

    def read_meta(self, *, trust: bool = False, allow_globals: tuple[str, ...] = ()) -> dict[str, Any]:
        """meta.pt, under exactly the rules of a .ckpt (checkpoint.py's loader: weights_only, --allow-global)."""
        return load_meta(self.root, trust=trust, allow_globals=allow_globals)

    def _read(self, entries: list[TensorEntry]) -> dict[str, Any]:
        import warnings

        import torch
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        try:
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
        except ImportError:  # pragma: no cover - the public API does the same, with a warning
            from torch.distributed.checkpoint import load as _public_load

            def _load_state_dict(state_dict: Any, storage_reader: Any, planner: Any, no_dist: bool) -> None:
                _public_load(state_dict, storage_reader=storage_reader, planner=planner, no_dist=no_dist)

        for entry in entries:
            for chunk in entry.chunks:
                _check_record(self.root, chunk, entry)
        if self._reader is None:
            self._reader = _PreparsedReader(self.root, self.metadata)
        # Full tensors, one per entry: the planner reads every chunk that overlaps it (all of them) and copies it in.
        targets = {e.fqn: torch.empty(e.shape, dtype=e.dtype) for e in entries}
        saved_env = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _load_state_dict(
                    targets,
                    storage_reader=self._reader,
                    planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                    no_dist=True,
                )
        except CheckpointError:
            raise
        # DCP wraps the failures of a read in CheckpointException, which derives from BaseException, not Exception.
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch raises anything on damaged records
            names = ", ".join(e.key for e in entries[:3]) + (" ..." if len(entries) > 3 else "")
            raise CheckpointError(f"{self.root}: cannot read the weights {names}: {_short(_root_cause(e))}") from e
        finally:
            if saved_env is not None:
                os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = saved_env
        return {e.key: targets[e.fqn] for e in entries}


class _LiveBytes:
    """Bytes of the tensors a LazyStateDict handed out that are still alive, and the most at any moment: what the
    tests check to prove that a consumer holds one tensor at a time."""

    def __init__(self) -> None:
        self.now = self.peak = self.reads = 0

    def track(self, t: Any, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        self.reads += 1
        weakref.finalize(t, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.now -= nbytes


class LazyStateDict(MutableMapping):
    """The weights of a sharded folder as a state dict whose tensors are read when asked for.

    Keys, shapes and dtypes come from the checked metadata (``specs()``, ``entry()``), so counting, prefix
    stripping, key checks and size estimates read no tensor. ``d[key]`` reads the tensor from the folder each time
    (a new CPU tensor, CRC-checked); dropping it frees it. Iterating ``items()`` or ``values()`` therefore holds one
    tensor at a time, while ``dict(d)`` holds them all, as a ``.ckpt``'s state dict would. Assigned values (a
    LightningModule's on_load_checkpoint may rename or replace entries) are kept in memory as given.
    """

    def __init__(self, source: ShardedCheckpoint, names: dict[str, str | None] | None = None,
                 set_values: dict[str, Any] | None = None) -> None:
        self.source = source
        # key -> the folder's key (None: a value assigned in memory, in self._set)
        self._names: dict[str, str | None] = dict(names) if names is not None else {k: k for k in source.entries}
        self._set: dict[str, Any] = dict(set_values or {})

    def __getitem__(self, key: str) -> Any:
        src = self._names[key]
        if src is None:
            return self._set[key]
        t = self.source.tensor(src)
        self.source.live.track(t, self.source.entries[src].nbytes)
        return t

    def __setitem__(self, key: str, value: Any) -> None:
        self._names[key] = None
        self._set[key] = value

    def __delitem__(self, key: str) -> None:
        del self._names[key]
        self._set.pop(key, None)

    def __contains__(self, key: object) -> bool:  # Mapping's would read the tensor
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"LazyStateDict({self.source.path}, {len(self)} tensors)"

    def entry(self, key: str) -> TensorEntry | None:
        """The folder's entry behind ``key`` (None for a value assigned in memory)."""
        src = self._names[key]
        return None if src is None else self.source.entries[src]

    def specs(self) -> dict[str, Any]:
        """key -> a tensor with the shape and dtype (meta tensors, no data; assigned values as they are)."""
        import torch

        out = {}
        for key, src in self._names.items():
            if src is None:
                out[key] = self._set[key]
            else:
                e = self.source.entries[src]
                out[key] = torch.empty(e.shape, dtype=e.dtype, device="meta")
        return out

    def renamed(self, names: dict[str, str]) -> LazyStateDict:
        """A view with keys ``new`` for each ``new -> old`` of ``names`` (old: a key of this mapping)."""
        return LazyStateDict(
            self.source,
            {new: self._names[old] for new, old in names.items()},
            {new: self._set[old] for new, old in names.items() if self._names[old] is None},
        )

    def copy(self) -> LazyStateDict:
        return self.renamed({k: k for k in self._names})


def is_lazy(state_dict: Any) -> bool:
    return isinstance(state_dict, LazyStateDict)


def _root_cause(e: BaseException) -> BaseException:
    """DCP wraps the errors of a read in CheckpointException({rank: (exception, traceback)}): the first real one."""
    for _ in range(8):
        failures = getattr(e, "failures", None)
        if not isinstance(failures, dict) or not failures:
            break
        first = next(iter(failures.values()))
        first = first[0] if isinstance(first, tuple) and first else first
        if not isinstance(first, BaseException):
            break
        e = first
    return e


def _preparsed_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader

    class PreparsedReader(FileSystemReader):
        """torch's FileSystemReader, given the metadata read safely once (its own read_metadata is pickle.load)."""

        def __init__(self, path: Path, metadata: Any) -> None:
            super().__init__(path)
            self._metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self._metadata

    return PreparsedReader


def _PreparsedReader(path: Path, metadata: Any) -> Any:  # noqa: N802 - a class made on first use (imports torch)
    return _preparsed_reader_class()(path, metadata)


def _check_folder(path: Path) -> Path:
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(f"checkpoint {path} is a dangling symbolic link (or a link loop)")
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder")
    root = path.resolve()
    if not (root / METADATA_FILE).exists():
        raise CheckpointError(f"{path} is a directory, not a checkpoint (it has no {METADATA_FILE})")
    _inside(root, METADATA_FILE)
    return root


def _inside(root: Path, name: str) -> Path:
    """root/name as a regular file that really is in root: a plain name, and no symlink leading elsewhere."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise CheckpointError(f"{root}: the checkpoint names a file {name!r} that is not a plain file name")
    p = root / name
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        if p.is_symlink():
            raise CheckpointError(f"{p} is a dangling symbolic link (or a link loop)") from e
        raise CheckpointError(f"{root}: {name} is missing; the folder is incomplete", hint=_COPY_HINT) from e
    if real.parent != root:
        raise CheckpointError(f"{p} is a symbolic link to {real}, outside the checkpoint folder; refusing it")
    if not real.is_file():
        raise CheckpointError(f"{p} is not a regular file")
    return real


_COPY_HINT = "Copy the whole folder: .metadata, meta.pt and one __<rank>_<n>.distcp file per rank."


def _rank_files(root: Path) -> dict[str, int]:
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


def _plain_ints(value: Any, what: str, fqn: str, root: Path) -> tuple[int, ...]:
    import torch

    if not isinstance(value, (torch.Size, tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(f"{root}/{METADATA_FILE} is corrupt: {what} of {fqn!r} is not a list of sizes")
    return tuple(int(v) for v in value)


def _weight_entries(
    root: Path, metadata: Any, files: dict[str, int]
) -> tuple[str, dict[str, TensorEntry], list[str]]:
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

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
        shape = _plain_ints(md.size, "the size", fqn, root)
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{where} is corrupt: {fqn!r} has no dtype")
        if not isinstance(md.chunks, list) or not md.chunks:
            raise CheckpointError(f"{where} is corrupt: {fqn!r} has no stored chunks")
        if len(md.chunks) > MAX_CHUNKS_PER_TENSOR:
            raise CheckpointError(f"{where}: {fqn!r} is split into {len(md.chunks)} chunks; refusing so many")
        chunks = []
        for c in md.chunks:
            offsets = _plain_ints(getattr(c, "offsets", None), "a chunk offset", fqn, root)
            sizes = _plain_ints(getattr(c, "sizes", None), "a chunk size", fqn, root)
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
            if info is None or not isinstance(rel, str) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, length)
            ):
                raise CheckpointError(f"{where} is corrupt: the chunk of {name!r} at {list(offsets)} has no storage")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    f"{root}: {name!r} is stored through transforms {list(info.transform_descriptors)} "
                    "(compression or encryption); lexport reads plain torch.distributed.checkpoint records only"
                )
            if rel not in files:
                _inside(root, rel)  # names why: missing, a link out of the folder, not a file
                raise CheckpointError(f"{root}: {rel} is not a regular file of the folder")
            if off + length > files[rel]:
                raise CheckpointError(
                    f"{root}/{rel} is truncated: {name!r} is stored at bytes {off}..{off + length} of a "
                    f"{files[rel]}-byte file",
                    hint=_COPY_HINT,
                )
            chunk = Chunk(offsets, sizes, rel, off, length)
            if chunk.numel * dtype.itemsize > length:
                raise CheckpointError(
                    f"{where} is corrupt: a chunk of {name!r} declares {chunk.numel * dtype.itemsize} bytes of "
                    f"{dtype} in a {length}-byte record"
                )
            chunks.append(chunk)
        _check_coverage(name, shape, chunks, where)
        if name in entries:
            raise CheckpointError(f"{where} is corrupt: the weight {name!r} is listed twice")
        entries[name] = TensorEntry(name, fqn, shape, dtype, tuple(chunks))
    if not entries:
        raise CheckpointError(f"{root}: its {key!r} entry holds no tensors (nothing to export)")
    return key, entries, skipped


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


class _Slice(io.RawIOBase):
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
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _check_record(root: Path, chunk: Chunk, entry: TensorEntry, verify_crc: bool = True) -> None:
    """A chunk's record is a zip (what torch.save writes) whose entries are stored, not compressed, and fit in it
    (torch.load would otherwise inflate a small record into any size it declares), with intact CRC-32s."""
    where = f"{root}/{chunk.file}: the record of {entry.key!r} at byte {chunk.offset}"
    try:
        with open(root / chunk.file, "rb") as f:
            view = io.BufferedReader(_Slice(f, chunk.offset, chunk.length), 1 << 20)
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
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise CheckpointError(f"{where} is corrupt ({_short(e)})") from e


# --------------------------------------------------------------------------------------------- meta.pt
def load_meta(root: Path, *, trust: bool = False, allow_globals: tuple[str, ...] = ()) -> dict[str, Any]:
    """meta.pt through checkpoint.py's own loader: the same weights_only rules, messages and --allow-global."""
    from . import checkpoint as ck  # lazily: checkpoint.py imports this module to read folders

    path = root / META_FILE
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(
            f"{root} is a torch.distributed.checkpoint folder without {META_FILE}: not a Lightning checkpoint, or "
            "an incomplete copy",
            hint=_COPY_HINT,
        )
    _inside(root, META_FILE)
    ck._check_file(path)
    allowed = [ck._import_dotted(name) for name in allow_globals]
    obj = ck._torch_load(path, trust=trust, allowed=allowed, allow_globals=allow_globals)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not the dict Lightning saves there")
    return obj


# ------------------------------------------------------------------------------------------ one call
def load_sharded(
    folder: str | os.PathLike[str], *, trust: bool = False, allow_globals: tuple[str, ...] = (), lazy: bool = False
) -> tuple[dict[str, Any], Any]:
    """(meta, state_dict) of a Lightning sharded folder: meta.pt's dict (epoch, global_step, hyper_parameters,
    ...) and the module's weights under Lightning's key names, as CPU tensors (``lazy``: a LazyStateDict, which
    reads a tensor when asked for it). Optimizer entries are never read. Everything is checked before the first
    byte of a tensor is read; CheckpointError (exit 3) otherwise."""
    sharded = ShardedCheckpoint(folder, trust=trust)
    meta = sharded.read_meta(trust=trust, allow_globals=allow_globals)  # a bad meta.pt fails before the big read
    return meta, LazyStateDict(sharded) if lazy else sharded.state_dict()


def as_lightning_checkpoint(meta: dict[str, Any], state_dict: dict[str, Any]) -> dict[str, Any]:
    """The dict a .ckpt would have held (without optimizer states): what checkpoint._as_checkpoint expects."""
    obj = {k: v for k, v in meta.items() if k not in ("state_dict", "optimizer_states")}
    obj["state_dict"] = state_dict
    return obj


# ------------------------------------------------------------------------------------------ hashing
def folder_sha256(folder: str | os.PathLike[str], chunk: int = 8 << 20) -> str:
    """sha256 over the folder's regular files, in name order: each contributes its name, size and sha256."""
    root = Path(folder).resolve()
    outer = hashlib.sha256(b"lexport-sharded-folder-v1\n")
    for name, size in sorted(_rank_files(root).items()):
        h = hashlib.sha256()
        with open(root / name, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        outer.update(f"{name}\0{size}\0{h.hexdigest()}\n".encode("utf-8", "surrogateescape"))
    return outer.hexdigest()
