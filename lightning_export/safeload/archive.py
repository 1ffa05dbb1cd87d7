"""Integrity of a torch.save file before and after torch reads it: a regular file, its zip directory (records
inside the file, no overlaps, no zip bomb), tensors within their storages, and every storage's CRC-32.

Bounded work: an artifact is at most DEFAULT_MAX_GROWTH times the weight bytes the file holds (plus the slack,
for tiny checkpoints and shared tensors), and compressed zip records may not declare more than that either."""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bounded import iter_containers
from ..errors import ZIP_READ_ERRORS, Advice, CheckpointError
from ..progress import track
from ..text import fmt_bytes, printable
from .subject import CHECKPOINT, Subject

ZIP_MAGIC = b"PK\x03\x04"
DEFAULT_MAX_GROWTH = 4.0


GROWTH_SLACK = 64 << 20


_CRC_CHUNK = 16 << 20




# Records torch reads besides the storages; small, so their CRC-32 is checked before torch.load.
_METADATA_RECORDS = ("data.pkl", "byteorder", ".format_version", ".storage_alignment", "version", ".data/version")


def check_file(path: Path, subject: Subject = CHECKPOINT) -> int:
    """Refuse what is not a readable regular file, without opening anything else (open() blocks on a FIFO).
    Returns the file size."""
    name = subject.name(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if path.is_symlink():
            raise CheckpointError(f"{subject.called(path)} is a dangling symbolic link (or a link loop)") from e
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(subject.not_found(path)) from e
        raise CheckpointError(subject.about(path, f"cannot read {path}: {e.strerror or e}")) from e
    if stat.S_ISDIR(st.st_mode):
        folder = (f" (nor a {subject.noun} folder: it has no .metadata, nor DeepSpeed's latest)"
                  if subject.folders else "")
        raise CheckpointError(f"{name} is a directory, not a {subject.file_noun}{folder}")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise CheckpointError(
            f"{name} is {kind}, not a {subject.file_noun}: lexport reads only regular files, whose size bounds its work",
            hint="Save the stream to a file first, then pass that file.",
        )
    size = st.st_size
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(subject.about(path, f"cannot read {path}: {e.strerror or e}")) from e
    if size == 0:
        raise CheckpointError(f"{name} is empty (0 bytes); the {subject.noun} was not written completely")
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{name} is truncated or corrupt: its zip directory is missing")
        return size
    if head[:1] == b"\x80" and head[1:2] in (b"\x03", b"\x04", b"\x05"):
        # torch.save writes a zip, or (legacy) protocol-2 pickles after a magic number: never this.
        raise CheckpointError(
            f"{name} is a plain Python pickle (protocol {head[1]}), not a {subject.noun} written by torch.save",
        )
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") or (head and all(32 <= b < 127 or b in (9, 10, 13) for b in head)):
        raise CheckpointError(f"{name} is a text file (JSON, YAML or similar), not a {subject.torch_noun}")
    return size


@dataclass(frozen=True)
class Record:
    name: str
    data_offset: int  # where the record's bytes start in the file (from its local header)
    size: int  # uncompressed
    crc: int
    stored: bool


@dataclass
class Archive:
    storages: dict[str, Record]  # <prefix>/data/<key> records
    byteorder: str | None

    @property
    def all_stored(self) -> bool:
        return all(r.stored for r in self.storages.values())


def read_archive(path: Path, file_size: int, max_growth: float, subject: Subject = CHECKPOINT) -> Archive:
    """The zip directory of a torch.save file, checked before torch reads anything: every record lies inside the
    file, records do not overlap, stored records are what they claim, and compressed records may not expand past
    the growth bound (a zip bomb is refused before it is inflated). Metadata records are CRC-checked."""
    import struct

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{subject.name(path)} is truncated, corrupt or crafted: {why}")

    try:
        zf = zipfile.ZipFile(path)
    except ZIP_READ_ERRORS as e:
        raise corrupt(f"its zip directory cannot be read ({printable(str(e))[:200]})") from e
    with zf, open(path, "rb") as f:
        infos = zf.infolist()
        if not infos or "/" not in infos[0].filename:
            raise corrupt("its zip directory does not hold a torch archive")
        prefix = infos[0].filename.split("/", 1)[0]  # torch's archive name: the first record's folder
        names: set[str] = set()
        spans: list[tuple[int, int, str]] = []
        storages: dict[str, Record] = {}
        inflated = 0
        for info in infos:
            name = printable(info.filename)
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
            if len(header) != 30 or header[:4] != ZIP_MAGIC:
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
                storages[info.filename] = Record(name, start, info.file_size, info.CRC, stored)
        spans.sort()
        for (_, end, name), (nxt, _, other) in zip(spans, spans[1:]):
            if end > nxt:
                raise corrupt(f"records {name} and {other} overlap")
        limit = max_growth * file_size + GROWTH_SLACK
        if inflated > limit:
            raise CheckpointError(
                f"{subject.name(path)}: its compressed records declare {fmt_bytes(inflated)} once inflated, more than {max_growth:g}x "
                f"the file ({fmt_bytes(file_size)}) + {fmt_bytes(GROWTH_SLACK)}; refusing to inflate it (a zip bomb?)",
                advice=Advice.MAX_GROWTH,
            )
        byteorder = _check_metadata_records(path, zf, prefix, names, subject)
    return Archive(storages, byteorder)


def _check_metadata_records(path: Path, zf: zipfile.ZipFile, prefix: str, names: set[str],
                            subject: Subject) -> str | None:
    """The CRC-32 of the small records torch reads besides the storages; returns the byteorder record's value."""
    byteorder = None
    for short in _METADATA_RECORDS:
        full = f"{prefix}/{short}"
        if full not in names:
            continue
        try:
            data = zf.read(full)  # zipfile checks the CRC-32 when it reaches the end of the record
        except ZIP_READ_ERRORS as e:
            raise CheckpointError(subject.about(
                path, f"record {printable(full)} does not match its CRC-32: the file is corrupt or was altered "
                f"({printable(str(e))[:120]})"
            )) from e
        if short == "byteorder":
            byteorder = data.decode("ascii", errors="replace")
    return byteorder


@dataclass
class Storage:
    storage: Any  # keeps the memory alive while it is read
    ptr: int
    nbytes: int
    element_size: int
    key: str  # the first state_dict key that uses it (for messages)


def check_tensors(path: Path, state_dict: Mapping[str, Any], *, file_size: int, max_growth: float,
                   archive: Archive | None, subject: Subject = CHECKPOINT) -> list[Storage]:
    """Metadata only, no pass over data: every tensor is a CPU strided tensor whose extent fits its storage, and the
    dense bytes of the state dict are bounded by the bytes of the storages behind it. Returns the storages."""
    import torch

    storages: dict[int, Storage] = {}
    dense = 0
    named = subject.name(path)
    for key, t in state_dict.items():
        shown = printable(key)
        if t.device.type != "cpu":
            what = "a meta tensor (a shape without data)" if t.device.type == "meta" else f"on device {t.device}"
            raise CheckpointError(f"{named}: tensor {shown} is {what}; the file holds no weights for it")
        if t.layout != torch.strided or t.is_nested:
            raise CheckpointError(f"{named}: tensor {shown} has layout {t.layout}; only dense tensors can be exported")
        if t.is_quantized:
            raise CheckpointError(f"{named}: tensor {shown} is quantized ({t.dtype}); only plain tensors can be exported")
        numel, esize = t.numel(), t.element_size()
        dense += numel * esize
        if numel == 0:
            continue
        try:
            st = t.untyped_storage()
            nbytes, ptr = st.nbytes(), st.data_ptr()
        except (RuntimeError, NotImplementedError) as e:
            raise CheckpointError(f"{named}: tensor {shown} has no readable storage ({e})") from e
        strides = t.stride()
        if t.storage_offset() < 0 or any(s < 0 for s in strides):
            raise CheckpointError(f"{named}: tensor {shown} has a negative offset or stride: the file is crafted")
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, strides))
        if (last + 1) * esize > nbytes or ptr == 0:
            raise CheckpointError(
                f"{named}: tensor {shown} reaches byte {(last + 1) * esize:,} of a storage of {nbytes:,} bytes: "
                "the file is corrupt or crafted"
            )
        seen = storages.get(ptr)
        if seen is None:
            storages[ptr] = Storage(st, ptr, nbytes, esize, key)
        elif seen.nbytes != nbytes:
            raise CheckpointError(f"{named}: tensors {printable(seen.key)} and {shown} claim one storage with two "
                                  "sizes: the file is corrupt or crafted")
        elif seen.element_size != esize and archive is not None and _swapped(archive):
            raise CheckpointError(f"{named}: tensors {printable(seen.key)} and {shown} read one byte-swapped "
                                  "storage as two element sizes")
    backed = sum(s.nbytes for s in storages.values())
    if archive is None and backed > file_size:
        raise CheckpointError(f"{named}: its tensors claim {fmt_bytes(backed)} of storage in a file of {fmt_bytes(file_size)}: "
                              "the file is corrupt or crafted")
    if dense > max_growth * backed + GROWTH_SLACK:
        raise CheckpointError(
            f"{named}: its state dict expands to {fmt_bytes(dense)} from {fmt_bytes(backed)} of stored weights (tensors that "
            f"repeat one value, e.g. expand() or stride 0), more than {max_growth:g}x + {fmt_bytes(GROWTH_SLACK)}",
            advice=Advice.MAX_GROWTH,
        )
    return list(storages.values())


def _swapped(archive: Archive) -> bool:
    import sys

    return archive.byteorder is not None and archive.byteorder != sys.byteorder


def _map_by_address(path: Path, storages: list[Storage], archive: Archive,
                    subject: Subject) -> list[tuple[Storage, Record]]:
    """Memory-mapped: torch slices one mapping of the whole file, so storage address - record data offset is one
    base for every storage. The base is derived from the records (page-aligned candidates first: mmap returns a
    page) and must be consistent with every storage; a storage that is not a record of the file is refused.
    Equal, evenly spaced records (identical layers) make shifted bases consistent too: the true base is the one
    where the mapped memory holds the file's bytes, compared at a few sampled places of every storage."""
    if not storages:
        return []
    by_offset = {r.data_offset: r for r in archive.storages.values()}
    by_size: dict[int, list[Record]] = {}
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
                    raise CheckpointError(f"{subject.name(path)}: its records are too regular to be matched to its tensors in "
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
            f"{subject.name(path)}: tensor {printable(s.key)} ({s.nbytes:,} bytes) is not read from a record of the file: "
            "the file is corrupt or crafted"
        )
    pairs = [(s, by_offset[s.ptr - found]) for s in storages]
    for s, r in pairs:
        if r.size != s.nbytes:
            raise CheckpointError(subject.about(
                path, f"record {r.name} ({printable(s.key)}) holds {r.size:,} bytes but the file's pickle declares "
                f"{s.nbytes:,}: the file is corrupt or crafted"
            ))
    return pairs


def _crc_storage(s: Storage, swap: bool, advance: Any) -> int:
    """CRC-32 of a storage's bytes, read in place (zlib releases the GIL); byte-swapped back first when torch
    swapped the file's big-endian data on load."""
    import ctypes

    crc = 0
    if swap and s.element_size > 1:
        import torch

        whole = torch.empty(0, dtype=torch.uint8).set_(s.storage, 0, (s.nbytes,))  # type: ignore[call-overload]
        step = _CRC_CHUNK - _CRC_CHUNK % s.element_size
        for i in range(0, s.nbytes, step):
            part = whole[i:i + step].view(-1, s.element_size).flip(1).contiguous()
            crc = zlib.crc32((ctypes.c_char * part.numel()).from_address(part.data_ptr()), crc)
            advance(part.numel())
        return crc
    for i in range(0, s.nbytes, _CRC_CHUNK):
        n = min(_CRC_CHUNK, s.nbytes - i)
        crc = zlib.crc32((ctypes.c_char * n).from_address(s.ptr + i), crc)
        advance(n)
    return crc


def _crcs(storages: list[Storage], swap: bool) -> list[int]:
    total = sum(s.nbytes for s in storages)
    workers = min(4, os.cpu_count() or 1, len(storages))
    with track("checking CRC-32 of the tensors", total) as task:
        if workers <= 1 or total < (64 << 20):
            return [_crc_storage(s, swap, task.advance) for s in storages]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda s: _crc_storage(s, swap, task.advance), storages))


def verify_storages(path: Path, storages: list[Storage], archive: Archive, *, mapped: bool,
                    subject: Subject = CHECKPOINT) -> None:
    """Every storage behind a state_dict tensor is proven to hold the bytes of its record, by the zip's own CRC-32.
    Memory-mapped: the record is found by address. Read by torch (a compressed record, inflated into memory):
    torch checked that the storage has its record's size, and the record is the one whose size and CRC-32 it has
    (an identical record is as good: the bytes are the same)."""
    swap = _swapped(archive)
    if mapped:
        pairs = _map_by_address(path, storages, archive, subject)
        for (s, r), crc in zip(pairs, _crcs([s for s, _ in pairs], swap)):
            if crc != r.crc:
                raise _crc_error(path, r.name, s.key, subject)
        return
    by_content: dict[tuple[int, int], Record] = {}
    same_size: dict[int, list[Record]] = {}
    for r in archive.storages.values():
        by_content.setdefault((r.size, r.crc), r)
        same_size.setdefault(r.size, []).append(r)
    for s, crc in zip(storages, _crcs(storages, swap)):
        if (s.nbytes, crc) in by_content:
            continue
        candidates = same_size.get(s.nbytes, [])
        if len(candidates) == 1:
            raise _crc_error(path, candidates[0].name, s.key, subject)
        raise CheckpointError(subject.about(
            path, f"tensor {printable(s.key)} ({s.nbytes:,} bytes) matches the CRC-32 of no record of {path}: "
            "the file is corrupt or was altered"
        ))


def _crc_error(path: Path, record: str, key: str, subject: Subject) -> CheckpointError:
    return CheckpointError(
        subject.about(path, f"record {record} ({printable(key)}) does not match its CRC-32: the file is corrupt or "
                      "was altered"),
        hint=f"Re-download or re-copy the {subject.noun}; nothing was written.",
    )


def check_declared_sizes(path: Path) -> None:
    """The check a plain (non-mmap) torch.load makes on every storage record, without reading tensor data: the
    bytes the pickle declares equal the record's size. Used on lexport's own state-dict artifacts, so a file that
    loads memory-mapped but not plainly is never published."""
    import torch

    archive = read_archive(path, path.stat().st_size, DEFAULT_MAX_GROWTH)
    by_offset = {r.data_offset: r for r in archive.storages.values()}
    obj = torch.load(str(path), map_location="meta", weights_only=True)
    containers = list(iter_containers(obj))
    tensors = [v for c in containers for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        offset = getattr(st, "_checkpoint_offset", None)
        record = by_offset.get(offset) if isinstance(offset, int) else None
        if record is None or record.size != st.nbytes():
            raise CheckpointError(
                f"{path}: a storage declares {st.nbytes():,} bytes but its record holds "
                f"{'nothing' if record is None else f'{record.size:,} bytes'}: torch.load would refuse it"
            )
