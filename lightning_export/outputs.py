"""Where artifacts go: naming, --force, private temp dirs beside the destination, fsync, atomic publish."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError, OutputError, UsageError
from .text import fmt_bytes

TMP_PREFIX = ".lexport-tmp-"


def output_path(checkpoint: Path, suffix: str, output: Path | None, output_dir: Path | None) -> Path:
    if output is not None:
        return Path(output)
    directory = Path(output_dir) if output_dir is not None else checkpoint.parent
    return directory / f"{checkpoint.stem}{suffix}"


def failed_name(path: Path, suffix: str) -> Path:
    """`model.onnx` -> `model.FAILED.onnx`: a name that says the artifact failed verification."""
    name = path.name
    stem = name[: -len(suffix)] if suffix and name.endswith(suffix) else path.stem
    ext = suffix if suffix and name.endswith(suffix) else path.suffix
    return path.with_name(f"{stem}.FAILED{ext}")


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return None


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_destination(path: Path, checkpoint: Path, *, force: bool, folder: bool = False) -> None:
    resolved = _resolved(path)
    if resolved is None:
        raise OutputError(f"output {path} cannot be resolved: it is a symbolic link loop")
    same = resolved == _resolved(checkpoint) or same_file(path, checkpoint)
    if same:
        raise OutputError(
            f"output {path} is the input checkpoint; refusing to overwrite it (even with --force)",
            hint="Choose another name with -o/--output or another --output-dir.",
        )
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"output directory {parent} does not exist", hint="Create it, or pick another --output-dir.")
    if not parent.is_dir():
        raise OutputError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable")
    _probe_writable(parent)
    if path.is_dir() and not folder:
        raise OutputError(f"output {path} is a directory")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"output {path} is a file; this artifact is a folder", hint="Pick another -o/--output.")
    if folder and path.is_dir() and (_resolved(checkpoint) or checkpoint).is_relative_to(resolved):
        raise OutputError(f"output {path} holds the input checkpoint; refusing to replace it (even with --force)",
                          hint="Choose another name with -o/--output or another --output-dir.")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists", hint="Pass --force to replace it.")


def _probe_writable(directory: Path) -> None:
    """Create and remove an empty private dir: os.access says yes to root even where writes fail (read-only
    bind mounts, /proc, /sys, full quota), so ask the filesystem itself, before any slow work."""
    try:
        probe = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-probe-", dir=directory)
    except OSError as e:
        raise OutputError(
            f"cannot write in {directory}: {e.strerror or e}", hint="Pick another -o/--output or --output-dir."
        ) from e
    try:
        os.rmdir(probe)
    except OSError:
        pass


def free_bytes(directory: Path) -> int | None:
    """Bytes free for this user in `directory`; None where the filesystem does not say (pseudo filesystems)."""
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return None
    if usage.total == 0:  # a pseudo filesystem (/proc, some FUSE mounts) reports no size at all
        return None
    return usage.free


def check_free_space(directory: Path, needed: int, name: str | None = None) -> None:
    """Refuse before writing when the artifact (the format's size estimate) cannot fit."""
    free = free_bytes(directory)
    if free is not None and needed > free:
        what = f"to write {name} " if name else ""
        raise OutputError(
            f"not enough free space {what}in {directory}: about {fmt_bytes(needed)} needed, {fmt_bytes(free)} free",
            hint="Free some space, or pick another -o/--output or --output-dir.",
        )


# errno values that mean "the destination cannot take this write", whoever the writer: exit 6, not 5.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_WRITE_ERRNOS = _DISK_FULL | {
    errno.EIO,
    errno.EFBIG,
    errno.EROFS,
    errno.ENXIO,
    errno.ENODEV,
    errno.ESTALE,
    *(getattr(errno, n) for n in ("EREMOTEIO", "ENOLINK", "ECOMM", "EUCLEAN") if hasattr(errno, n)),
}
# These mean a failed write when the writer itself raises them; deep in an exporter's error chain they may be
# about something else (a file the user's module opens), so they count only at the top.
_WRITE_ERRNOS_TOP = _WRITE_ERRNOS | {errno.EACCES, errno.EPERM, errno.ETXTBSY}


def write_os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e` (itself, or in its cause/context chain) that says the write failed, if any."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS_TOP:
        return e
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _WRITE_ERRNOS:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def write_failure(e: OSError, final: Path, needed: int | None = None) -> OutputError:
    """One message for a failed write of artifact `final`, whichever writer failed and however it reported it."""
    name, directory = final.name, final.parent
    reason = e.strerror or str(e)
    where = ""
    if e.filename and not Path(os.fsdecode(e.filename)).is_relative_to(directory):  # not in the destination
        where = f" ({os.fsdecode(e.filename)})"
    if e.errno in _DISK_FULL:
        free = free_bytes(directory)
        facts = [f"{fmt_bytes(free)} free" if free is not None else None, f"about {fmt_bytes(needed)} needed" if needed else None]
        detail = ", ".join(f for f in facts if f)
        word = "disk full" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return OutputError(
            f"{word} while writing {name} in {directory}: {reason}{where}" + (f"; {detail}" if detail else ""),
            hint="Free some space, or pick another -o/--output or --output-dir.",
        )
    hint = None
    if e.errno == errno.EFBIG:
        hint = "The file is larger than this filesystem or the file size limit (ulimit -f) allows."
    return OutputError(f"cannot write {name} in {directory}: {reason}{where}", hint=hint)


def remove_stale_temp_dirs(directory: Path) -> None:
    """Temp dirs of a killed lexport (its pid gone) are removed by the next run in that directory."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
            continue
        pid_text = entry.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Staging:
    """A private temp dir in the destination's directory: same filesystem, so publishing is a rename."""

    final: Path
    dir: Path
    needed: int | None = None  # the format's size estimate, for the disk-full message

    @property
    def path(self) -> Path:
        return self.dir / self.final.name

    def files(self) -> list[Path]:
        main = self.path
        if main.is_dir() and not main.is_symlink():  # a folder artifact: published whole, nothing beside it
            return [main]
        if not main.is_file():
            raise ExportError(f"the exporter did not write {self.final.name}")
        return [main, *sorted(p for p in self.dir.iterdir() if p != main)]

    def fsync(self) -> None:
        files = self.files()
        if files[0].is_dir():
            files = sorted(p for p in files[0].rglob("*") if p.is_file() and not p.is_symlink())
            _fsync_dir(self.path)
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:  # ENOSPC / EIO surface here for delayed allocation
                raise write_failure(e, self.final, self.needed) from e
        _fsync_dir(self.dir)

    def publish(self, final: Path | None = None, *, force: bool = False) -> list[Path]:
        """Move companions first, the main file last: a reader never sees the main file without its data.

        Without `force` publishing is exclusive: a name that exists now (another run published it meanwhile)
        is never replaced (renameat2 RENAME_NOREPLACE, or a hard link, which fails on an existing name), and the
        run fails instead. With `force` an existing file is replaced atomically (os.replace): last one wins.
        Publishes into one directory take turns (flock on the directory), so racing --force runs never mix one
        run's main file with another's companions.

        Files get the permissions a plain open() would give (0666 & ~umask), whatever the writer used. If a move
        fails, the companions already moved are taken back out and the files they replaced (--force) put back;
        a SIGTERM/SIGINT meanwhile waits until the moves are done.
        """
        final = final or self.final
        main = self.path
        mode = _default_file_mode()
        placed: list[tuple[Path, Path | None, tuple[int, int]]] = []  # (published, what it replaced, its inode)
        with _publish_lock(final.parent), critical_section():
            try:
                files = self.files()
                for f in files:
                    if f.is_file() and not f.is_symlink():
                        os.chmod(f, mode)
                    elif f.is_dir():  # a folder artifact: its files too (writers may use 0600)
                        for inner in f.rglob("*"):
                            if inner.is_file() and not inner.is_symlink():
                                os.chmod(inner, mode)
                moves = [(f, final.parent / self._published_name(f, final)) for f in files[1:]] + [(main, final)]
                for i, (src, target) in enumerate(moves):
                    ident = _inode(src)
                    backup = None
                    if force:
                        if (target != final or src.is_dir()) and os.path.lexists(target):
                            # A folder cannot be renamed over a non-empty one: the old folder is moved into the
                            # staging dir (removed with it) and the new one renamed in: replaced whole, never merged.
                            backup = self.dir / f".replaced-{i}-{target.name}"
                            os.replace(target, backup)
                        os.replace(src, target)
                    else:
                        _place_new(src, target)
                    placed.append((target, backup, ident))
            except OSError as e:
                for target, backup, ident in reversed(placed):
                    with contextlib.suppress(OSError):
                        if _inode(target) != ident:  # no longer ours: leave it alone
                            continue
                        if backup is not None and backup.exists():
                            if os.path.isdir(target) and not os.path.islink(target):
                                os.rename(target, self.dir / f".undone-{target.name}")
                            os.replace(backup, target)
                        else:
                            os.unlink(target)
                if isinstance(e, FileExistsError):
                    name = Path(os.fsdecode(e.filename2 or e.filename or final))
                    if name == final:
                        raise OutputError(
                            f"{final} appeared while exporting; pass --force to replace it",
                            hint="Another process (another lexport?) wrote it after this run checked the name.",
                        ) from e
                    raise OutputError(f"{name} already exists; pass --force to replace it") from e
                raise OutputError(f"cannot publish {final}: {e.strerror or e}") from e
            _fsync_dir(final.parent)
        return [final, *(target for target, _, _ in placed[:-1])]

    def _published_name(self, f: Path, final: Path) -> str:
        if f.name.startswith(self.final.name):  # model.onnx.data beside model.onnx
            return f.name.replace(self.final.name, final.name, 1)
        if f.stem == self.final.stem:  # OpenVINO's model.bin beside model.xml: model.FAILED.bin, model.FAILED.xml
            return final.stem + f.suffix
        return f.name

    def discard(self) -> None:
        with critical_section():
            shutil.rmtree(self.dir, ignore_errors=True)


def write_text_atomically(path: Path, text: str, *, force: bool) -> Path:
    """A small file (the manifest) written like an artifact: staged beside it, fsynced, published whole."""
    data = text.encode()
    check_free_space(path.parent, len(data) + 4096, path.name)
    staging = stage(path, len(data))
    try:
        try:
            staging.path.write_bytes(data)
        except OSError as e:
            raise write_failure(e, path, len(data)) from e
        staging.fsync()
        return staging.publish(force=force)[0]
    finally:
        staging.discard()


def stage(final: Path, needed: int | None = None) -> Staging:
    try:
        d = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=final.parent)
    except OSError as e:
        raise write_failure(e, final, needed) from e
    os.chmod(d, 0o755)
    return Staging(final, Path(d), needed)


def _inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


_NO_LINKS = {errno.EPERM, errno.EMLINK, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP}


def _place_new(src: Path, dst: Path) -> None:
    """Move src to dst, never replacing dst: FileExistsError if dst exists (a dangling symlink included)."""
    if _rename_noreplace(src, dst):
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        # A filesystem with neither (FAT, some FUSE mounts): check, then replace. Not exclusive against a
        # run that publishes in the very same instant, but never a partial file.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.replace(src, dst)
        return
    with contextlib.suppress(OSError):
        os.unlink(src)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError, ImportError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """renameat2(RENAME_NOREPLACE): True when done, False where the kernel or filesystem cannot (then link)."""
    fn = _renameat2()
    if fn is None:
        return False
    import ctypes

    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@contextlib.contextmanager
def _publish_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on the destination directory while publishing (best effort: skipped where unsupported).
    Taken before the critical section, so a SIGTERM still interrupts a wait for it."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _default_file_mode() -> int:
    return 0o666 & ~_umask()


def _umask() -> int:
    # Read it without changing it where possible (os.umask sets it, which races with other threads).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _SignalState(threading.local):
    depth = 0
    pending: int | None = None


_signals = _SignalState()
# The last SIGTERM/SIGINT seen by TerminateOnSignal: a KeyboardInterrupt raised inside an import or a library that
# swallows it (a bare `except:`) would otherwise be lost, and the run would go on; every phase checks this first.
_requested: int | None = None


def raise_if_terminated() -> None:
    if _requested is not None:
        raise KeyboardInterrupt


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """Publishing and cleaning up are not interrupted half-way: a SIGTERM/SIGINT that arrives meanwhile (while
    TerminateOnSignal is active) is raised as KeyboardInterrupt when the section ends."""
    _signals.depth += 1
    try:
        yield
    finally:
        _signals.depth -= 1
        if _signals.depth == 0 and _signals.pending is not None:
            _signals.pending = None
            raise KeyboardInterrupt


class TerminateOnSignal:
    """Turn SIGTERM (and SIGINT) into KeyboardInterrupt so `finally` blocks remove temp files, as on Ctrl-C;
    inside a critical_section the signal waits until the section is done."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> TerminateOnSignal:
        self._old: dict[int, Any] = {}
        for sig in self._SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                break
        self._old_hook = sys.unraisablehook
        if self._old:
            sys.unraisablehook = self._unraisable
        return self

    def _unraisable(self, unraisable: Any) -> None:
        """Our KeyboardInterrupt raised where Python can only print it ("Exception ignored in" an import lock's
        callback, a finalizer) is not printed: the signal is remembered and raised at the next phase."""
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested is not None:
            return
        self._old_hook(unraisable)

    @staticmethod
    def _handle(signum: int, frame: object) -> None:
        global _requested
        _requested = signum
        if _signals.depth > 0:
            _signals.pending = signum
            return
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        global _requested
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._old:
            sys.unraisablehook = self._old_hook
        self._old = {}
        _requested = None  # the run is over: the signal was raised (or the run ended first); the next run starts clean


def validate_output_flags(output: Path | None, formats: list[str]) -> None:
    if output is not None and len(formats) > 1:
        raise UsageError(
            "-o/--output names one file, but several formats were asked for",
            hint="Use --output-dir DIR with several --to, or run lexport once per format.",
        )
