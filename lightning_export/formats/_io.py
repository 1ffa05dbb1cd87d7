"""Writing through torch's C++ writers without letting a full disk or an I/O error kill the process.

torch's zip writer (PyTorchStreamWriter) checks every write; when one fails (ENOSPC, EIO, EFBIG) it throws, and its
destructor then tries to finish the archive, throws again during unwinding, and std::terminate aborts the process
(exit 134, no JSON, temp dir left). Seen with torch 2.13:

- torch.save(obj, "path")        RuntimeError "unexpected pos ..." (the errno is lost), no abort
- torch.jit.save(m, "path")      abort
- torch.jit.save(m, file object) no abort, but it serializes to memory first: ~3x the weights in RAM
- torch.export.save(ep, "path")  RuntimeError, then abort when the writer is garbage-collected
- torch.export.save(ep, file)    abort as well when file.write raises
- torch.onnx (both exporters, external data too): a plain OSError from Python code

So writers that take a Python file get a `Sink` whose write() never raises: it keeps the first OSError, swallows
the rest of the stream, and the error is raised once torch returns (streaming, no extra memory). torch.jit.save
takes only a path or memory, so it runs in a forked child (copy-on-write: no extra memory); if the child dies, the
staged file is probed with one more write to learn the errno.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_PROBE = b"\0" * 65536


class Sink(io.RawIOBase):
    """A write-only file whose write() always reports success; the first OSError is kept in `.error`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
        self._pos = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.error is None:
            try:
                os.lseek(self._fd, self._pos, os.SEEK_SET)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as e:
                self.error = e
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = os.fstat(self._fd).st_size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            except OSError as e:  # NFS and friends report delayed write errors at close
                self.error = self.error or e
        super().close()


@contextlib.contextmanager
def sink(path: Path) -> Iterator[Sink]:
    """Yield a Sink for `path`; a write error is raised as OSError once the writer is done (even when the writer
    itself then failed on the truncated stream: the I/O error is the cause)."""
    f = Sink(path)
    try:
        yield f
    except Exception as e:
        f.close()
        if f.error is not None:
            raise f.error from e
        raise
    else:
        f.close()
        if f.error is not None:
            raise f.error
    finally:
        f.close()


def save_isolated(save: Callable[[str], None], path: Path) -> None:
    """Run `save(str(path))` (a C++ writer that aborts on a write error) where an abort cannot end lexport.

    In a forked child where os.fork exists; an ordinary error comes back as RuntimeError/OSError with its message;
    if the child dies (std::terminate after a failed write), one more write to the staged file tells why.
    """
    if not hasattr(os, "fork"):
        save(str(path))
        return
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, never runs Python cleanup (os._exit)
        code = 0
        try:
            os.close(r)
            for sig in (signal.SIGINT, signal.SIGTERM):  # die at once; the parent reports the interruption
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(sig, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)  # torch prints a C++ stack on abort
            save(str(path))
            payload = pickle.dumps(None)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            code = 1
            errno = e.errno if isinstance(e, OSError) else None
            payload = pickle.dumps((type(e).__name__, str(e)[:4000], errno, getattr(e, "strerror", None)))
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(code)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        os.close(r)
        if pid:  # interrupted (Ctrl-C, SIGTERM): stop the child, the staging dir is about to go
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return
    if chunks:
        name, message, errno, strerror = pickle.loads(b"".join(chunks))
        if errno is not None:
            raise OSError(errno, strerror or message, str(path))
        raise RuntimeError(f"{name}: {message}" if message else name)
    _probe(path)
    how = f"signal {-code}" if code < 0 else f"exit {code}"
    raise RuntimeError(f"the writer process died ({how}) while writing {path.name}")


def _probe(path: Path) -> None:
    """After a writer died mid-write: append to the (discarded) staged file; a full disk, a file size limit or an
    I/O error shows up here as the OSError the writer saw."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.write(fd, _PROBE)
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
