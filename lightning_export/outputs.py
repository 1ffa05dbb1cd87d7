"""Where artifacts go: naming, --force, private temp dirs beside the destination, fsync, atomic publish."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError, UsageError

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


def check_destination(path: Path, checkpoint: Path, *, force: bool) -> None:
    same = path.resolve() == checkpoint.resolve() or (path.exists() and os.path.samefile(path, checkpoint))
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
    if path.is_dir():
        raise OutputError(f"output {path} is a directory")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists", hint="Pass --force to replace it.")


def check_free_space(directory: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
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
        return [main, *sorted(p for p in self.dir.iterdir() if p != main)]

    def fsync(self) -> None:
        for f in self.files():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def publish(self, final: Path | None = None) -> list[Path]:
        """Move companions first, the main file last: a reader never sees the main file without its data."""
        final = final or self.final
        main = self.path
        published = []
        for f in self.files()[1:]:
            name = f.name.replace(self.final.name, final.name, 1) if f.name.startswith(self.final.name) else f.name
            target = final.parent / name
            os.replace(f, target)
            published.append(target)
        os.replace(main, final)
        _fsync_dir(final.parent)
        return [final, *published]

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def stage(final: Path) -> Staging:
    try:
        d = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=final.parent)
    except OSError as e:
        raise OutputError(f"cannot write in {final.parent}: {e.strerror or e}") from e
    os.chmod(d, 0o755)
    return Staging(final, Path(d))


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


class TerminateOnSignal:
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks remove temp files, as on Ctrl-C."""

    def __enter__(self) -> "TerminateOnSignal":
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def validate_output_flags(output: Path | None, formats: list[str]) -> None:
    if output is not None and len(formats) > 1:
        raise UsageError(
            "-o/--output names one file, but several formats were asked for",
            hint="Use --output-dir DIR with several --to, or run lexport once per format.",
        )
