"""The `lexport` command: parse flags → ExportOptions → core.run → render. No torch at import time."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import EXIT_CODES, LexportError
from .formats import REGISTRY
from .outputs import TerminateOnSignal

_FORMATS_HELP = "; ".join(f"{f.name} ({f.suffix})" for f in REGISTRY.values())
_EXIT_HELP = "\n\n".join(f"{code}  {text}" for code, text in EXIT_CODES.items())

EPILOG = f"""Examples:

  lexport run.ckpt --module pkg.models:MyModule --attr model --to onnx

  lexport run.ckpt --to safetensors --attr model   (no user code imported)

  lexport run.ckpt --config lightning_logs/version_0/config.yaml --to exported-program --dynamic-batch

Exit codes:

{_EXIT_HELP}

Set LEXPORT_DEBUG=1 for full tracebacks."""

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _console() -> Console:
    # Bound to the stderr of this call: exporters' own stderr chatter is redirected while they run, and
    # the status line and table must not be. Wide when not a terminal, so CI logs keep full paths.
    file = sys.stderr
    width = None if file.isatty() else 160
    return Console(file=file, highlight=False, width=width)


def _version(value: bool) -> None:
    if value:
        print(f"lexport {__version__}")
        raise typer.Exit(0)


@app.command(
    help="Export a PyTorch Lightning checkpoint to a deployment artifact and verify that it computes what the "
    f"module computes. Formats: {_FORMATS_HELP}.",
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def lexport(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Lightning .ckpt file, or a file holding a plain state dict.", show_default=False)],
    to: Annotated[list[str], typer.Option("--to", "-t", metavar="FORMAT", help=f"Format to write (repeatable, or comma-separated): {', '.join(REGISTRY)}.")] = [],  # noqa: B006
    module: Annotated[str | None, typer.Option("--module", "-m", metavar="CLASS", help="LightningModule class: pkg.mod:Class, pkg.mod.Class or path/to/file.py:Class. Optional for state-dict and safetensors.")] = None,  # noqa: E501
    attr: Annotated[str | None, typer.Option("--attr", "-a", metavar="PATH", help="Dotted path of the submodule to export (model, encoder, heads.cls). Default: the whole LightningModule.")] = None,  # noqa: E501
    config: Annotated[Path | None, typer.Option(metavar="FILE", help="LightningCLI config.yaml: its model: section gives the class and init args.")] = None,  # noqa: E501
    init_arg: Annotated[list[str], typer.Option("--init-arg", metavar="KEY=VALUE", help="KEY=VALUE constructor argument (VALUE is YAML); repeatable; overrides the checkpoint's hyper_parameters.")] = [],  # noqa: B006,E501
    init_args: Annotated[Path | None, typer.Option("--init-args", metavar="FILE", help="YAML/JSON file of constructor arguments; {class_path, init_args} values are instantiated.")] = None,  # noqa: E501
    input_spec: Annotated[list[str], typer.Option("--input", metavar="DTYPE[DIMS]", help="DTYPE[D0,D1,...] per forward argument, e.g. float32[2,10]; repeatable. Default: example_input_array.")] = [],  # noqa: B006,E501
    example_inputs: Annotated[Path | None, typer.Option(metavar="FILE", help=".pt file with a tensor, a tuple of args (nesting allowed) or a dict of kwargs.")] = None,  # noqa: E501
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make dim 0 of every input dynamic (onnx, exported-program); verified at another batch size.")] = False,  # noqa: E501
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="Output file (one format only).")] = None,
    output_dir: Annotated[Path | None, typer.Option(metavar="DIR", help="Output directory; files are named <checkpoint stem><suffix>. Default: beside the checkpoint.")] = None,  # noqa: E501
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace existing outputs.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify every artifact against the eager module.")] = True,  # noqa: E501
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep an artifact that failed verification, as NAME.FAILED.<suffix>.")] = False,  # noqa: E501
    atol: Annotated[float | None, typer.Option(metavar="FLOAT", help="Absolute tolerance (default per format: torchscript and exported-program 1e-5, onnx 1e-4).")] = None,  # noqa: E501
    rtol: Annotated[float | None, typer.Option(metavar="FLOAT", help="Relative tolerance (default per format: torchscript and exported-program 1e-5, onnx 1e-3).")] = None,  # noqa: E501
    seed: Annotated[int, typer.Option(metavar="INT", help="Seed of the random verification inputs.")] = 0,
    random_inputs: Annotated[int, typer.Option(metavar="N", help="Random inputs checked besides the example.", min=0)] = 5,
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset version (default: the dynamo exporter's; below 18 the TorchScript-based exporter writes it).")] = None,
    torchscript_mode: Annotated[str, typer.Option(metavar="MODE", help="trace or script.")] = "trace",
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle the checkpoint fully. This RUNS CODE FROM THE FILE: only for files you trust.")] = False,  # noqa: E501
    allow_global: Annotated[list[str], typer.Option("--allow-global", metavar="NAME", help="Allow one class in the checkpoint (pkg.mod.Name) for the safe loader; repeatable.")] = [],  # noqa: B006,E501
    max_growth: Annotated[float | None, typer.Option("--max-growth", metavar="FACTOR", help="Refuse a checkpoint whose tensors would make an artifact more than FACTOR times the bytes they occupy in the file (default 4; views and stride tricks).")] = None,  # noqa: E501
    strict_finite: Annotated[bool, typer.Option("--strict-finite", help="NaN/Inf in weights or example outputs is an error (exit 4), not a warning.")] = False,  # noqa: E501
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout and nothing else there.")] = False,  # noqa: E501
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,  # noqa: E501
) -> None:
    def options() -> Any:
        from .core import ExportOptions
        from .model import parse_init_arg

        return ExportOptions(
            checkpoint=checkpoint,
            formats=tuple(to),
            module=module,
            attr=attr,
            config=config,
            init_args=tuple(parse_init_arg(item) for item in init_arg),
            init_args_file=init_args,
            inputs=tuple(input_spec),
            example_inputs=example_inputs,
            dynamic_batch=dynamic_batch,
            output=output,
            output_dir=output_dir,
            force=force,
            verify=verify,
            keep_failed=keep_failed,
            atol=atol,
            rtol=rtol,
            seed=seed,
            random_inputs=random_inputs,
            opset=opset,
            torchscript_mode=torchscript_mode,
            trust_checkpoint=trust_checkpoint,
            allow_globals=tuple(allow_global),
            strict_finite=strict_finite,
            max_growth=max_growth,
            hash_checkpoint=json_out,
        )

    def export(steps: _Steps) -> Any:
        from .core import run

        return run(options(), progress=steps.step)

    _execute(export, json_out=json_out, quiet=quiet)


def _execute(work: Any, *, json_out: bool, quiet: bool) -> None:
    """Run one command's work and end the process the documented way: the table or the error on stderr, the
    exit code, and with --json exactly one strict JSON object on stdout, whatever happened (70 included).

    While the work runs, stdout is pointed at stderr (file descriptor 1 too): a user's module that prints at
    import or in forward cannot put text before the JSON.
    """
    stderr = _console()
    debug = os.environ.get("LEXPORT_DEBUG", "") not in ("", "0")
    show = not quiet and not json_out
    report: Any = None
    error: dict[str, Any] | None = None
    code = 0
    with _stdout_to_stderr(json_out) as real_stdout:
        try:
            with _Steps(stderr if show else None) as steps:
                report = work(steps)
        except LexportError as e:
            report, code = e.report, e.exit_code
            error = {"code": code, "kind": e.kind, "message": str(e)}
            if debug:
                import traceback

                traceback.print_exception(e)  # with the chained causes: the exporter's own traceback
            if report is not None and show:
                _render(stderr, report)
            if not json_out:
                _print_error(stderr, e)
        except KeyboardInterrupt:
            code = 130
            error = {"code": code, "kind": "interrupted", "message": "interrupted (SIGINT or SIGTERM)"}
            stderr.print("[red]interrupted[/red]: nothing partial was left; artifacts already published stay")
        except Exception as e:  # noqa: BLE001 - a bug in lexport: say so, exit 70
            if debug:
                raise
            code = 70
            error = {"code": code, "kind": "internal", "message": f"{type(e).__name__}: {str(e)[:500]}"}
            stderr.print("[red]internal error[/red] ", end="")
            stderr.print(error["message"], markup=False)
            stderr.print("This is a bug in lexport. Re-run with LEXPORT_DEBUG=1 and report the traceback.")
        else:
            if show:
                _render(stderr, report)
    if json_out:
        payload = report.to_json() if report is not None else {"ok": False}
        if error is not None:
            payload["ok"], payload["error"] = False, error
        print(dumps_strict(payload), file=real_stdout, flush=True)
        _json_printed.set()
    raise typer.Exit(code)


_json_printed = threading.Event()  # main() prints the JSON itself for what ends before a command runs


def dumps_strict(payload: Any) -> str:
    """JSON that every parser accepts: NaN and infinities become null (json.dumps would write NaN/Infinity)."""
    return json.dumps(_finite(payload), indent=2, allow_nan=False, default=str)


def _finite(value: Any) -> Any:
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
        if saved_fd is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def _print_error(stderr: Console, e: LexportError) -> None:
    stderr.print(f"[bold red]error[/bold red] ({e.kind}, exit {e.exit_code}): ", end="")
    stderr.print(e.message, markup=False)
    if e.hint:
        stderr.print(e.hint, markup=False, style="dim")


class _Steps:
    """A live status line per step with elapsed time on a terminal; one line per finished step otherwise."""

    def __init__(self, console: Console | None) -> None:
        self.console = console

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        started = time.perf_counter()
        if self.console.is_terminal:
            with self.console.status(f"{label} …") as status:
                with _ticker(status, label, started):
                    yield
        else:
            yield
        self.console.print(f"[green]✓[/green] {label} [dim]({time.perf_counter() - started:.1f} s)[/dim]")


@contextlib.contextmanager
def _ticker(status: Any, label: str, started: float) -> Iterator[None]:
    import threading

    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            status.update(f"{label} … {time.perf_counter() - started:.0f} s")

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt_diff(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _render(stderr: Console, report: Any) -> None:
    if not report.artifacts:
        return
    table = Table(title="lexport", title_justify="left")
    for col in ("format", "path", "size", "exporter", "max abs diff", "verdict"):
        table.add_column(col)
    for a in report.artifacts:
        v = a.verification
        if a.error:
            verdict = f"[red]✗ {a.error['kind']} error[/red]"
        elif v is None:
            verdict = "[yellow]not verified[/yellow]"
        elif v.passed:
            verdict = f"[green]✓ {v.inputs_checked} inputs[/green]" if v.atol is not None else "[green]✓ bit-exact[/green]"
        else:
            verdict = "[red]✗ FAILED[/red]"
        table.add_row(
            a.format,
            a.path or "[dim](not written)[/dim]",
            _fmt_bytes(a.bytes),
            a.exporter or "-",
            _fmt_diff(v.max_abs_diff) if v and v.atol is not None else "-",
            verdict,
        )
    stderr.print(table)
    details = Table(title="outputs", title_justify="left")
    for col in ("format", "output", "shape", "max abs diff", "max rel diff", "atol / rtol", "verdict"):
        details.add_column(col)
    rows = 0
    for a in report.artifacts:
        v = a.verification
        if v is None:
            continue
        for o in v.outputs:
            rows += 1
            details.add_row(
                a.format,
                o.name,
                str(list(o.shape)),
                _fmt_diff(o.max_abs_diff),
                _fmt_diff(o.max_rel_diff),
                f"{v.atol:g} / {v.rtol:g}",
                "[green]✓[/green]" if o.passed else f"[red]✗[/red] {o.problem or ''}",
            )
    if rows:
        stderr.print(details)
    for a in report.artifacts:
        if a.error:
            stderr.print(f"[red]{a.format}[/red]: {a.error['message']}", markup=True, highlight=False)
        if a.verification:
            for p in a.verification.problems:
                stderr.print(f"[red]{a.format}[/red]: {p}")
        for n in a.notes:
            stderr.print(f"[dim]{a.format}: {n}[/dim]")
    for n in report.notes:
        stderr.print(f"[dim]note: {n}[/dim]")
    for w in report.warnings:
        stderr.print(f"[yellow]warning[/yellow]: {w}")


def main() -> None:
    # typer may vendor click: find its exception base through a public name, not a private import.
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    args = sys.argv[1:]
    TerminateOnSignal().__enter__()  # SIGTERM/SIGINT → exit 130 from the first instant, parsing included
    error: dict[str, Any] | None = None
    try:
        code = app(prog_name="lexport", args=args, standalone_mode=False)  # typer turns Ctrl-C into 130
        code = code if isinstance(code, int) else 0
    except click_exception as e:  # a flag typer rejects before the command runs
        e.show()
        code = e.exit_code
        error = {"code": code, "kind": "usage", "message": e.format_message()}
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # only with LEXPORT_DEBUG=1: a bug in lexport, shown in full
        import traceback

        traceback.print_exc()
        code = 70
    if "--json" in args and code != 0 and not _json_printed.is_set():  # ended before the command's own JSON
        error = error or {"code": code, "kind": {130: "interrupted"}.get(code, "internal"), "message": "interrupted"
                          if code == 130 else "internal error"}
        print(dumps_strict({"ok": False, "error": error}))
    # Outputs are fsynced and published by now; skip interpreter teardown, which takes 1-1.5 s once torch and
    # Lightning are loaded. Only the command does this, never the Python API.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
