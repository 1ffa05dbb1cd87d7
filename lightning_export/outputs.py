"""Where artifacts go: naming, --force, private temp dirs beside the destination, fsync, atomic publish."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError, OutputError, UsageError

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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_destination(path: Path, checkpoint: Path, *, force: bool) -> None:
    resolved = _resolved(path)
    if resolved is None:
        raise OutputError(f"output {path} cannot be resolved: it is a symbolic link loop")
    same = resolved == _resolved(checkpoint) or _same_file(path, checkpoint)
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
    if path.is_dir():
        raise OutputError(f"output {path} is a directory")
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


def check_free_space(directory: Path, needed: int) -> None:
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return
    free = usage.free
    if usage.total == 0:  # a pseudo filesystem (/proc, some FUSE mounts) reports no size at all
        return
    if needed > free:
        raise OutputError(
            f"not enough free space in {directory}: about {_mb(needed)} needed, {_mb(free)} free",
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


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
    """A private temp dir in the destination's directory: same filesystem, so publishing is os.replace."""

    final: Path
    dir: Path

    @property
    def path(self) -> Path:
        return self.dir / self.final.name

    def files(self) -> list[Path]:
        main = self.path
        if not main.is_file():
            raise ExportError(f"the exporter did not write {self.final.name}")
        return [main, *sorted(p for p in self.dir.iterdir() if p != main)]

    def fsync(self) -> None:
        for f in self.files():
            try:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:  # ENOSPC / EIO surface here for delayed allocation
                raise OutputError(f"cannot write {self.final.name} in {self.final.parent}: {e.strerror or e}") from e
        _fsync_dir(self.dir)

    def publish(self, final: Path | None = None) -> list[Path]:
        """Move companions first, the main file last: a reader never sees the main file without its data.

        Files get the permissions a plain open() would give (0666 & ~umask), whatever the writer used. If a move
        fails, the companions already moved are taken back out and the files they replaced (--force) put back;
        a SIGTERM/SIGINT meanwhile waits until the moves are done.
        """
        final = final or self.final
        main = self.path
        mode = _default_file_mode()
        moved: list[tuple[Path, Path | None]] = []  # (published companion, what it replaced, kept in self.dir)
        with critical_section():
            try:
                files = self.files()
                for f in files:
                    if f.is_file() and not f.is_symlink():
                        os.chmod(f, mode)
                for i, f in enumerate(files[1:]):
                    name = (
                        f.name.replace(self.final.name, final.name, 1) if f.name.startswith(self.final.name) else f.name
                    )
                    target = final.parent / name
                    backup = None
                    if target.exists() or target.is_symlink():
                        backup = self.dir / f".replaced-{i}-{name}"
                        os.replace(target, backup)
                    moved.append((target, backup))
                    os.replace(f, target)
                os.replace(main, final)
            except OSError as e:
                for target, backup in reversed(moved):
                    with contextlib.suppress(OSError):
                        if backup is None or not backup.exists():
                            os.unlink(target)
                        else:
                            os.replace(backup, target)
                raise OutputError(f"cannot publish {final}: {e.strerror or e}") from e
            _fsync_dir(final.parent)
        return [final, *(target for target, _ in moved)]

    def discard(self) -> None:
        with critical_section():
            shutil.rmtree(self.dir, ignore_errors=True)


def stage(final: Path) -> Staging:
    try:
        d = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=final.parent)
    except OSError as e:
        raise OutputError(f"cannot write in {final.parent}: {e.strerror or e}") from e
    os.chmod(d, 0o755)
    return Staging(final, Path(d))


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
        return self

    @staticmethod
    def _handle(signum: int, frame: object) -> None:
        if _signals.depth > 0:
            _signals.pending = signum
            return
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def validate_output_flags(output: Path | None, formats: list[str]) -> None:
    if output is not None and len(formats) > 1:
        raise UsageError(
            "-o/--output names one file, but several formats were asked for",
            hint="Use --output-dir DIR with several --to, or run lexport once per format.",
        )
