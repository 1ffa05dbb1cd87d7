"""The `lexport` command line. `lexport CKPT --to ...` exports;
`lexport inspect CKPT` and `lexport verify ARTIFACT CKPT` are subcommands, chosen by the first argument (a
checkpoint literally named `inspect` is reached as `./inspect`). No torch at import time."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import typer

from ..errors import UsageError, error_json
from ..outputs import TerminateOnSignal
from .common import dumps_strict, json_printed
from .export import app

__all__ = ["app", "main", "SUBCOMMANDS"]


SUBCOMMANDS = ("inspect", "verify", "config")  # each is the module lightning_export.cli.<name>, with its own typer `app`


def _subcommand(name: str) -> Any:
    import importlib

    return importlib.import_module(f"{__name__}.{name}").app


def main() -> None:
    # typer may vendor click: find its exception base through a public name, not a private import.
    click_exception: type[Any] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    args = sys.argv[1:]
    TerminateOnSignal().__enter__()  # SIGTERM/SIGINT → exit 130 from the first instant, parsing included
    error: dict[str, Any] | None = None
    try:
        command, prog = app, "lexport"
        if args and args[0] in SUBCOMMANDS:
            command, prog, args = _subcommand(args[0]), f"lexport {args[0]}", args[1:]
        code = command(prog_name=prog, args=args, standalone_mode=False)  # typer turns Ctrl-C into 130
        code = code if isinstance(code, int) else 0
    except click_exception as e:  # a flag typer rejects before the command runs
        e.show()
        code = e.exit_code
        error = error_json(UsageError(e.format_message()), code=code)
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # only with LEXPORT_DEBUG=1: a bug in lexport, shown in full
        import traceback

        traceback.print_exc()
        code = 70
    if "--json" in args and code != 0 and not json_printed.is_set():  # ended before the command's own JSON
        error = error or {"code": code, "kind": {130: "interrupted"}.get(code, "internal"), "message": "interrupted"
                          if code == 130 else "internal error"}
        print(dumps_strict({"ok": False, "error": error}))
    # Outputs are fsynced and published by now; skip interpreter teardown, which takes 1-1.5 s once torch and
    # Lightning are loaded. Only the command does this, never the Python API.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a closed pipe must not turn the exit code into a traceback
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
