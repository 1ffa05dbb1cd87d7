"""Loading an artifact with its runtime and running it on every input, in a child process for runtimes that can
crash natively on a malformed file (Format.isolate): a SIGSEGV or SIGABRT there is a failed verification, not the
end of lexport.

One forked child per artifact (copy-on-write: the inputs are not copied). Only tensors and plain containers come
back, through torch.save read with weights_only. The child runs torch single-threaded: OpenMP's thread pool does not
survive a fork (a forked child's first parallel region hangs once the parent has used it). Where os.fork is missing
or unsafe (Windows, macOS), the artifact runs in-process.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..address_space import bounded
from ..errors import describe_exception
from ..formats import Format
from ..progress import track

# What the child may map beyond the forked process: a malformed file that declares a huge tensor (a .tflite asking for
# [134217730, 10] made LiteRT allocate 5 GB) fails there instead of taking the machine's memory; real models get
# this much plus 16 times the artifact's size.
CHILD_EXTRA_BYTES = 4 << 30
LOG_TAIL = 600  # bytes of the runtime's own last words kept for the message after a crash


@dataclass
class Ran:
    """What the runtime did: a load error, or one (output, error) per input; `crashed` when the child died."""

    load_error: str | None = None
    results: list[tuple[Any, str | None]] = field(default_factory=list)
    crashed: str | None = None


def run_artifact(fmt: Format, path: Path, inputs: list[Any]) -> Ran:
    """Load `path` with fmt.load and call it on each of `inputs` (inputs.Inputs): in a child process when the format
    declares `isolate`, else here."""
    if fmt.isolate and can_isolate():
        return _run_in_child(fmt, path, inputs)
    return _run_here(fmt, path, inputs)


def can_isolate() -> bool:
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def _run_here(fmt: Any, path: Path, inputs: list[Any], *, show: bool = True) -> Ran:
    """`show`: inputs done as a progress row on a terminal (never from a forked child, whose output is a log)."""
    try:
        loaded = fmt.load(path)
    except Exception as e:  # noqa: BLE001 - an artifact its own runtime cannot load has failed verification
        return Ran(load_error=describe_exception(e))
    results: list[tuple[Any, str | None]] = []
    with track(f"verifying {fmt.name}", len(inputs) if show else 0, unit="inputs") as task:
        for data in inputs:
            try:
                results.append((loaded(*data.args, **data.kwargs), None))
            except Exception as e:  # noqa: BLE001 - the artifact fails where the module does not
                results.append((None, describe_exception(e)))
            task.advance()
    return Ran(results=results)


def _child(fmt: Any, path: Path, inputs: list[Any], w: int, log: int) -> None:
    """The child: never returns, never runs the parent's cleanup (os._exit)."""
    import gc

    gc.disable()  # a collection in the child walks (and so copies) the parent's whole heap: 3 s here
    code = 0
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):  # die at once; the parent reports the interruption
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_DFL)
        os.dup2(log, 1)  # runtimes log on fds 1 and 2: stdout stays the parent's (--json), stderr is kept
        os.dup2(log, 2)
        import torch

        torch.set_num_threads(1)
        # The loaded runtime is released when _run_here returns (its destructors run: an AOTInductor package's
        # extracted library is removed), before os._exit.
        with bounded(CHILD_EXTRA_BYTES + 16 * _artifact_bytes(path)):
            ran = _run_here(fmt, path, inputs, show=False)
        payload = _encode(ran)
        view = memoryview(payload)
        while view:
            view = view[os.write(w, view):]
    except BaseException:  # noqa: BLE001 - the parent sees a child that ended without an answer
        code = 3
    finally:
        os._exit(code)


def _artifact_bytes(path: Path) -> int:
    try:
        return sum(p.stat().st_size for p in ([*path.rglob("*")] if path.is_dir() else [path]) if p.is_file())
    except OSError:
        return 0


def _encode(ran: Ran) -> bytes:
    """torch.save of plain data: the parent reads it weights_only. Outputs of another kind become an error."""
    import torch

    record: dict[str, Any] = {"load_error": ran.load_error, "results": [[o, e] for o, e in ran.results]}
    buf = io.BytesIO()
    try:
        torch.save(record, buf)
    except Exception as e:  # noqa: BLE001 - an output torch cannot save: said per input
        why = f"its output cannot be passed back for comparison: {describe_exception(e)}"
        record["results"] = [[None, err or why] for _, err in ran.results]
        buf = io.BytesIO()
        torch.save(record, buf)
    return buf.getvalue()


def _run_in_child(fmt: Any, path: Path, inputs: list[Any]) -> Ran:
    import torch

    r, w = os.pipe()
    with tempfile.TemporaryFile() as log:
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(fmt, path, inputs, w, log.fileno())
        os.close(w)
        try:
            chunks = []
            while chunk := os.read(r, 1 << 20):
                chunks.append(chunk)
            _, status = os.waitpid(pid, 0)
            pid = 0
        finally:
            os.close(r)
            if pid:  # interrupted (Ctrl-C, SIGTERM): stop the child
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        tail = _tail(log)
    if code == 0 and chunks:
        try:
            record = torch.load(io.BytesIO(b"".join(chunks)), weights_only=True)
            return Ran(load_error=record["load_error"], results=[(o, e) for o, e in record["results"]])
        except Exception as e:  # noqa: BLE001 - outputs weights_only cannot read (a custom class)
            return Ran(load_error=f"its outputs cannot be passed back for comparison: {describe_exception(e)}")
    if code < 0:
        try:
            how = signal.Signals(-code).name
        except ValueError:
            how = f"signal {-code}"
        said = f"; it said: {tail}" if tail else ""
        return Ran(crashed=f"the {fmt.name} runtime crashed on this file ({how}){said}")
    return Ran(crashed=f"the {fmt.name} runtime ended the verifying process (exit {code}) on this file")


def _tail(log: Any) -> str:
    """The last line or two the runtime printed (its error message before an abort), printable, bounded."""
    from ..text import printable

    try:
        size = log.seek(0, io.SEEK_END)
        log.seek(max(0, size - LOG_TAIL))
        text = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return printable(" / ".join(lines[-2:]))[:LOG_TAIL]
