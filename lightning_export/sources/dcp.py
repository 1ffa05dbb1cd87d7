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

import math
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..hashing import Hasher
from ..hashing import folder_sha256 as hash_files
from ..safeload.archive import check_file
from ..safeload.loader import load_file, weights_only_enforced
from ..safeload.policy import import_dotted
from ..statedict import LazyTensors
from .base import Checkpoint, OpenOptions, hparams_dict
from .dcp_layout import (
    COPY_HINT,
    META_FILE,
    FileSlice,
    TensorEntry,
    check_folder,
    check_record,
    is_sharded_folder,
    rank_files,
    read_dcp_metadata,
    short,
    weight_entries,
)
from .folder import required


class ShardedCheckpoint:
    """A Lightning sharded folder, checked; the weights are read only when asked for, one tensor at a time.

    ``entries``: Lightning key -> TensorEntry, in the order the checkpoint lists them. ``weights_key``: "model"
    (FSDPStrategy) or "state_dict" (ModelParallelStrategy). ``skipped``: DCP keys left unread (optimizer states,
    anything that is not the module's weights).
    """

    def __init__(self, folder: str | os.PathLike[str], *, trust: bool = False) -> None:
        self.path = Path(folder)
        self.root = check_folder(self.path)
        self.metadata = read_dcp_metadata(self.root, trust=trust)
        self.files = rank_files(self.root)
        self.weights_key, self.entries, self.skipped = weight_entries(self.root, self.metadata, self.files)
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
        """meta.pt, under exactly the rules of a .ckpt (safeload's loader: weights_only, --allow-global)."""
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

            def _load_state_dict(  # type: ignore[misc]
                state_dict: Any, storage_reader: Any, planner: Any, no_dist: bool
            ) -> None:
                _public_load(state_dict, storage_reader=storage_reader, planner=planner, no_dist=no_dist)

        for entry in entries:
            for chunk in entry.chunks:
                check_record(self.root, chunk, entry)
        if all(_whole(e) for e in entries):
            try:
                return {e.key: self._load_whole(e) for e in entries}
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - torch.load raises anything on a damaged record
                names = ", ".join(e.key for e in entries[:3]) + (" ..." if len(entries) > 3 else "")
                raise CheckpointError(f"{self.root}: cannot read the weights {names}: {short(e)}") from e
        if self._reader is None:
            self._reader = _PreparsedReader(self.root, self.metadata)
        # Full tensors, one per entry: the planner reads every chunk that overlaps it (all of them) and copies it in.
        targets = {e.fqn: torch.empty(e.shape, dtype=e.dtype) for e in entries}
        try:
            with weights_only_enforced(), warnings.catch_warnings():
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
            raise CheckpointError(f"{self.root}: cannot read the weights {names}: {short(_root_cause(e))}") from e
        return {e.key: targets[e.fqn] for e in entries}


    def _load_whole(self, entry: TensorEntry) -> Any:
        """A tensor stored as one chunk: its record loaded straight into the tensor returned (torch's reader loads it
        and then copies it into a target, holding it twice), each check torch's planner makes made here."""
        import builtins
        import io

        import torch

        chunk = entry.chunks[0]
        with builtins.open(self.root / chunk.file, "rb") as f, weights_only_enforced():  # not this module's open()
            view = io.BufferedReader(FileSlice(f, chunk.offset, chunk.length), 1 << 20)  # large reads go straight in
            t = torch.load(view, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor) or t.dtype != entry.dtype or tuple(t.shape) != tuple(entry.shape):
            what = f"{type(t).__name__} {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}"
            raise CheckpointError(f"{self.root}/{chunk.file}: the record of {entry.key!r} at byte {chunk.offset} "
                                  f"holds a {what.strip()}, not the {entry.dtype} {entry.shape} the metadata says")
        if t.untyped_storage().nbytes() != entry.nbytes or t.storage_offset() or not t.is_contiguous():
            t = t.clone()  # a view of a larger storage: the tensor alone, as torch's reader returns it
        return t


def _whole(entry: TensorEntry) -> bool:
    """One chunk that covers the whole tensor (a single process's save, and most FSDP full state dicts)."""
    return len(entry.chunks) == 1 and not any(entry.chunks[0].offsets) and \
        tuple(entry.chunks[0].sizes) == tuple(entry.shape)


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


class LazyStateDict(LazyTensors):
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


def load_meta(root: Path, *, trust: bool = False, allow_globals: tuple[str, ...] = ()) -> dict[str, Any]:
    """meta.pt through safeload's loader: the same weights_only rules, messages and --allow-global."""
    path = root / META_FILE
    required(root, META_FILE, copy_hint=COPY_HINT, missing=(
        f"{root} is a torch.distributed.checkpoint folder without {META_FILE}: not a Lightning checkpoint, or "
        "an incomplete copy"
    ))
    check_file(path)
    allowed = [import_dotted(name) for name in allow_globals]
    obj = load_file(path, trust=trust, allowed=allowed, allow_globals=allow_globals)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not the dict Lightning saves there")
    return obj


def as_lightning_checkpoint(meta: dict[str, Any], state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The dict a .ckpt would have held (without optimizer states): what base.as_checkpoint expects."""
    obj = {k: v for k, v in meta.items() if k not in ("state_dict", "optimizer_states")}
    obj["state_dict"] = state_dict
    return obj


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """sha256 over the folder's regular files, in name order: each contributes its name, size and sha256."""
    root = Path(folder).resolve()
    return hash_files("lexport-sharded-folder-v1", ((name, root / name) for name in sorted(rank_files(root))))


def detect(path: Path) -> bool:
    return is_sharded_folder(path)


def open(path: Path, options: OpenOptions) -> Checkpoint:  # noqa: A001 - the verb every source module has
    """FSDP/ModelParallel: only the model tensors are read, with DCP's own reader, and only when asked for (one at a
    time: memory stays about the largest tensor for weight formats); meta.pt as a .ckpt is."""
    folder = ShardedCheckpoint(path, trust=options.trust)
    meta = folder.read_meta(trust=options.trust, allow_globals=options.allow_globals)  # fails before the big read
    lazy = LazyStateDict(folder)
    hasher = Hasher(path, lambda: folder_sha256(path))
    if options.hash_file:
        hasher.start()
    # raw gets its own copy of the key table: on_load_checkpoint may edit raw["state_dict"] in place.
    raw = as_lightning_checkpoint(meta, lazy.copy())
    return Checkpoint(path, raw, lazy, plain=False, hparams=hparams_dict(raw.get("hyper_parameters")), sha=hasher,
                      file_bytes=sum(folder.files.values()), skipped=folder.skipped_summary)
