"""What every command shares: the stderr console, live steps, and `execute`, which ends each command the
documented way (exit code; with --json exactly one strict JSON object on stdout)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from ..errors import LexportError, error_json


def console() -> Console:
    # Bound to the stderr of this call: exporters' own stderr chatter is redirected while they run, and
    # the status line and table must not be. Wide when not a terminal, so CI logs keep full paths.
    file = sys.stderr
    width = None if file.isatty() else 160
    return Console(file=file, highlight=False, width=width)


def execute(
    work: Callable[[Steps], Any], *, json_out: bool, quiet: bool, render: Callable[[Console, Any], None],
    after: Callable[[Any, BaseException | None], None] | None = None,
) -> None:
    """Run one command's work and end the process the documented way: the table or the error on stderr, the
    exit code, and with --json exactly one strict JSON object on stdout, whatever happened (70 included).
    `after(report, error)` runs last either way (error: what ended the run, or None), e.g. the CI summary.

    While the work runs, stdout is pointed at stderr (file descriptor 1 too): a user's module that prints at
    import or in forward cannot put text before the JSON.
    """
    stderr = console()
    debug = os.environ.get("LEXPORT_DEBUG", "") not in ("", "0")
    show = not quiet and not json_out
    report: Any = None
    error: dict[str, Any] | None = None
    failure: BaseException | None = None
    code = 0
    with _stdout_to_stderr(json_out) as real_stdout:
        try:
            with Steps(stderr if show else None) as steps:  # on a terminal: progress bars under the step lines
                report = work(steps)
        except LexportError as e:
            report, code = e.report, e.exit_code
            error, failure = error_json(e), e
            if debug:
                import traceback

                traceback.print_exception(e)  # with the chained causes: the exporter's own traceback
            if report is not None and show:
                render(stderr, report)
            if not json_out:
                print_error(stderr, e)
        except KeyboardInterrupt as e:
            code = 130
            error, failure = error_json(e), e
            stderr.print("[red]interrupted[/red]: nothing partial was left; artifacts already published stay")
        except Exception as e:  # noqa: BLE001 - a bug in lexport: say so, exit 70
            if debug:
                raise
            code = 70
            error, failure = error_json(e), e
            stderr.print("[red]internal error[/red] ", end="")
            stderr.print(error["message"], markup=False)
            stderr.print("This is a bug in lexport. Re-run with LEXPORT_DEBUG=1 and report the traceback.")
        else:
            if show:
                render(stderr, report)
        if after is not None:
            after(report, failure)
    if json_out:
        payload = report.to_json() if report is not None else {"ok": False}
        if error is not None:
            payload["ok"], payload["error"] = False, error
        json_printed.set()
        with contextlib.suppress(BrokenPipeError):  # `lexport ... --json | head`
            print(dumps_strict(payload), file=real_stdout, flush=True)
    raise typer.Exit(code)


json_printed = threading.Event()  # main() prints the JSON itself for what ends before a command runs


def dumps_strict(payload: Any) -> str:
    """JSON that every parser accepts: NaN and infinities become null (json.dumps would write NaN/Infinity)."""
    from ..report import strict_json

    return json.dumps(strict_json(payload), indent=2, allow_nan=False, default=str)


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[Any]:
    """Yields the stream to print the JSON on; meanwhile sys.stdout and (when it is a real file) fd 1 write to
    stderr."""
    if not active:
        yield sys.stdout
        return
    real = sys.stdout
    saved_fd = None
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. a test runner's in-memory stream
        fd = None
    if fd is not None:
        real.flush()
        saved_fd = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        if saved_fd is not None and fd is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def print_error(stderr: Console, e: LexportError) -> None:
    stderr.print(f"[bold red]error[/bold red] ({e.kind}, exit {e.exit_code}): ", end="")
    stderr.print(e.message, markup=False)
    for line in e.full_hint().splitlines():
        # A flag line is never wrapped by rich: pasted back, it must be the one line it was printed as.
        stderr.print(line, markup=False, style="dim", soft_wrap=line.lstrip().startswith("--"))


class Steps:
    """A live status line per step with elapsed time on a terminal; one line per finished step otherwise. On a
    terminal it is also the sink of lightning_export.progress: under the step's line, a bar per running task
    (bytes with rate and time left, or inputs done)."""

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self._tasks: list[Any] = []
        self._lock = threading.Lock()
        self._status: Any = None
        self._label, self._started = "", 0.0
        self._routing: Any = None

    def __enter__(self) -> Steps:
        if self.console is not None and self.console.is_terminal:
            from .. import progress

            self._routing = progress.showing(self)
            self._routing.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._routing is not None:
            self._routing.__exit__(None, None, None)
        return None

    def begin(self, task: Any) -> None:
        with self._lock:
            self._tasks.append(task)
        self.refresh(draw=True)

    def end(self, task: Any) -> None:
        self.refresh(draw=True)  # drawn once complete, then gone
        with self._lock:
            self._tasks.remove(task)

    def refresh(self, *, draw: bool = False) -> None:
        """The status line with the running tasks; `draw`: on the terminal now, not at the next of rich's frames
        (a task that begins and ends between two frames is still seen)."""
        status = self._status
        if status is not None:
            # Status.update redraws at once only when given a spinner: the one console.status uses.
            status.update(self._renderable(), **({"spinner": "dots"} if draw else {}))

    def _renderable(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        head = Text(f"{self._label} … {time.perf_counter() - self._started:.0f} s")
        with self._lock:
            tasks = list(self._tasks)
        return Group(head, *(_task_row(t) for t in tasks)) if tasks else head

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[StepStatus]:
        """Yields a StepStatus; the line ends in ✓, or ✗ when the step raised or set `failed`."""
        status_obj = StepStatus()
        if self.console is None:
            yield status_obj
            return
        started = time.perf_counter()
        try:
            if self.console.is_terminal:
                with self.console.status(Text(f"{label} …")) as status:
                    self._status, self._label, self._started = status, label, started
                    try:
                        with _ticker(self.refresh):
                            yield status_obj
                    finally:
                        self._status = None
            else:
                yield status_obj
        except BaseException:
            status_obj.failed = True
            raise
        finally:
            mark = ("✗", "red") if status_obj.failed else ("✓", "green")
            done = Text.assemble(mark, f" {label} ", (f"({time.perf_counter() - started:.1f} s)", "dim"))
            self.console.print(done, highlight=False)


def _task_row(task: Any) -> Any:
    """  sha256 of run.ckpt ━━━━━━━━━━╺━━━━━━━━━  1.2 GB / 3.4 GB  250 MB/s  0:00:09 left"""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    from ..progress import rate_and_eta
    from ..text import fmt_bytes

    completed = min(task.completed, task.total)
    rate, left = rate_and_eta(task)
    if task.unit == "bytes":
        amount, speed = f"{fmt_bytes(completed)} / {fmt_bytes(task.total)}", f"{fmt_bytes(rate)}/s"
    else:
        amount, speed = f"{completed}/{task.total} {task.unit}", f"{rate:.1f}/s"
    eta = "-" if left is None else f"{int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d} left"
    grid = Table.grid(padding=(0, 1))
    grid.add_row(Text(f"  {task.label}"), ProgressBar(total=task.total, completed=completed, width=30),
                 Text(amount), Text(speed, style="dim"), Text(eta, style="dim"))
    return grid


@dataclass
class StepStatus:
    failed: bool = False


@contextlib.contextmanager
def _ticker(refresh: Callable[[], None]) -> Iterator[None]:
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.25):
            refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
