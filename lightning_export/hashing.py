"""sha256 of a file, or of a folder's files (each one's name, size and digest), optionally in the background."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import CheckpointError
from .progress import track

CHUNK = 8 << 20


def _file_digest(path: Path, chunk: int) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f, track(f"sha256 of {path.name}", os.fstat(f.fileno()).st_size) as task:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
            task.advance(len(block))
    return h.hexdigest(), size


def file_sha256(path: Path, chunk: int = CHUNK) -> str:
    return _file_digest(path, chunk)[0]


def folder_sha256(tag: str, files: Iterable[tuple[str, Path]], chunk: int = CHUNK) -> str:
    """sha256 over (name, path) files in the given order: each contributes its name, size and sha256, after a
    line naming the kind of folder (`tag`), so two kinds of folder never hash alike."""
    outer = hashlib.sha256(f"{tag}\n".encode())
    for name, path in files:
        digest, size = _file_digest(path, chunk)
        outer.update(f"{name}\0{size}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return outer.hexdigest()


def folder_bytes_and_sha256(folder: Path) -> tuple[int, str]:
    """(total bytes, folder_sha256) of an artifact folder's files, by relative name in sorted order."""
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    return sum(p.stat().st_size for _, p in files), folder_sha256("artifact-folder", files)


class Hasher(threading.Thread):
    """A checkpoint's sha256 (a file's, or a folder's files' through `digest`). Started, it hashes in the
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
