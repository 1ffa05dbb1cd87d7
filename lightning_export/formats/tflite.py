"""`tflite`: `litert_torch.convert` (formerly ai_edge_torch; torch.export underneath) → a LiteRT flatbuffer
`<stem>.tflite`, run by the LiteRT interpreter (`ai_edge_litert.interpreter`, XNNPACK-delegated on CPU).

Shapes are static: every input takes exactly the example's shape (batch included); `--dynamic` and
`--dynamic-batch` are refused (exit 2): the converter writes static shapes, and LiteRT needs them. Integer inputs keep their dtype where the converter
keeps it; where it narrows int64 to int32, lexport's runner casts (the values must fit).

The extras: `pip install 'lightning-export[litert]'` (litert-torch and ai-edge-litert).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import ExportError, describe_exception
from . import ExportContext, Format, Written, installed_check, register
from ._graph import captured_stdout, exporting, graph_estimate

INSTALL_HINT = "Install it with: pip install 'lightning-export[litert]' (or pip install litert-torch ai-edge-litert)."
SIGNATURE = "serving_default"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("litert-torch", "ai-edge-litert"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    return out


def require_runtime() -> None:
    try:
        with captured_stdout(stderr=True):
            from ai_edge_litert import interpreter  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"--to tflite needs the ai-edge-litert package (the LiteRT interpreter), which is not installed ({e.msg})",
            hint=INSTALL_HINT,
        ) from e
    except Exception as e:  # noqa: BLE001 - installed but broken (a shared library that does not load): say so
        raise ExportError(f"ai-edge-litert is installed but cannot be imported: {describe_exception(e)}",
                          hint=INSTALL_HINT) from e


def _installed(name: str) -> bool:
    """Whether `import name` would find the package, without importing it (litert_torch takes ~3 s: jax)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require() -> dict[str, str]:
    """Both packages (the converter and the interpreter); an ExportError naming the pip line when one is missing.
    The converter is only looked for here; write() imports it."""
    if not _installed("litert_torch"):
        raise ExportError("--to tflite needs the litert-torch package, which is not installed", hint=INSTALL_HINT)
    require_runtime()
    return _versions()


def _import_converter() -> Any:
    try:
        with captured_stdout(stderr=True):  # the import logs absl/torch warnings on fd 2
            import litert_torch
    except Exception as e:  # noqa: BLE001 - an ImportError, or a broken install (jax, a shared library)
        raise ExportError(
            f"--to tflite needs the litert-torch package, which cannot be imported: {describe_exception(e)}",
            hint=INSTALL_HINT,
        ) from e
    return litert_torch


def write(ctx: ExportContext, path: Path) -> Written:
    versions = require()
    litert_torch = _import_converter()

    precision = ctx.precision
    ex = ctx.inputs()
    with exporting(ctx), captured_stdout(stderr=True):  # the converter logs progress on fds 1 and 2
        try:
            model = litert_torch.convert(ctx.target, tuple(ex.args), ex.kwargs or None)
            model.export(str(path))
        except Exception as e:  # noqa: BLE001 - torch.export or the LiteRT converter refused: exit 5 with its reason
            from ..errors import export_failure

            detail = None
            if precision == "fp16":
                detail = ("LiteRT's CPU kernels compute in float32 (float16 TFLite models keep float16 weights and "
                          "float32 compute): export tflite without --precision.")
            raise export_failure("litert_torch.convert failed", e, detail=detail) from e
    try:
        runner = TFLiteRunner(path)
    except Exception as e:  # noqa: BLE001 - written but the interpreter cannot run it: an export failure
        raise ExportError(f"the LiteRT interpreter cannot load the .tflite: {describe_exception(e)}") from e
    notes = []
    by_name = {d["name"]: d for d in runner.input_details}
    narrowed = [
        f"{name}: {str(t.dtype).replace('torch.', '')} -> {by_name[name]['dtype'].__name__}"
        for name, t in _leaf_names(tuple(ex.args), dict(ex.kwargs or {}))
        if name in by_name and str(t.dtype).replace("torch.", "") != by_name[name]["dtype"].__name__
    ]
    if narrowed and precision is None:
        notes.append(f"the converter changed input dtypes ({', '.join(narrowed)}); lexport's runner casts")
    info: dict[str, Any] = {
        **versions,
        "signature": SIGNATURE,
        "inputs": [d["name"] for d in runner.input_details],
        "input_shapes": [list(map(int, d["shape"])) for d in runner.input_details],
        "input_dtypes": [d["dtype"].__name__ for d in runner.input_details],
        "shapes": "static (the example's, batch included): the interpreter takes exactly these shapes",
    }
    return Written(f"litert_torch.convert {versions['litert-torch']}", notes, info)


def _position(name: str) -> tuple[int, str]:
    """Signature input names are `args_0`, `args_1`, ... then keyword names: order them as the module's inputs."""
    m = re.fullmatch(r"args_(\d+)", name)
    return (int(m.group(1)), "") if m else (1 << 30, name)


class TFLiteRunner:
    """Calls a .tflite like the module through its `serving_default` signature; returns the list of outputs."""

    def __init__(self, path: Path) -> None:
        require_runtime()
        with captured_stdout(stderr=True):
            from ai_edge_litert.interpreter import Interpreter

            self.interpreter = Interpreter(model_path=str(path))
            self.interpreter.allocate_tensors()  # creates the XNNPACK delegate, which logs on fd 2
        signatures = self.interpreter.get_signature_list()
        name = SIGNATURE if SIGNATURE in signatures else next(iter(signatures), None)
        if name is None:
            raise RuntimeError("the .tflite has no signature to call")
        self.runner = self.interpreter.get_signature_runner(name)
        details = self.runner.get_input_details()
        self.input_names = sorted(details, key=_position)
        self.input_details = [{**details[n], "name": n} for n in self.input_names]
        self.output_names = sorted(self.runner.get_output_details(), key=_out_position)

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        import numpy as np
        import torch

        named = _leaf_names(args, kwargs)
        if len(named) != len(self.input_details):
            raise RuntimeError(f"the .tflite takes {len(self.input_details)} inputs, {len(named)} were given")
        by_name = {d["name"]: d for d in self.input_details}
        if all(n in by_name for n, _ in named):  # litert-torch's signature names: feed each tensor by its name
            pairs = [(t, by_name[n]) for n, t in named]
        else:  # other names: positional order
            pairs = list(zip([t for _, t in named], self.input_details))
        feed = {}
        for t, d in pairs:
            want = [int(s) for s in d["shape"]]
            if list(t.shape) != want:
                raise RuntimeError(f"input {d['name']} has shape {list(t.shape)}, the .tflite was exported for {want}")
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:
                raise RuntimeError("the LiteRT interpreter takes numpy arrays, and numpy has no bfloat16")
            a = t.contiguous().numpy()
            if a.dtype != d["dtype"]:
                if np.issubdtype(a.dtype, np.integer) and np.issubdtype(d["dtype"], np.integer):
                    info = np.iinfo(d["dtype"])
                    if a.size and (a.min() < info.min or a.max() > info.max):
                        raise RuntimeError(f"input {d['name']}: values do not fit {d['dtype'].__name__}")
                a = a.astype(d["dtype"])
            feed[d["name"]] = a
        out = self.runner(**feed)
        return [torch.from_numpy(np.array(out[n], copy=True)) for n in self.output_names]


def _leaf_names(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """(name, tensor) per tensor input, named as litert-torch names the signature's inputs: `args_<i>` for the
    i-th positional argument, a keyword's own name, with dict keys and list indices appended by `_`
    (`forward(batch)` with batch["x"] is `args_0_x`)."""
    import torch
    from torch.utils._pytree import tree_flatten_with_path

    def keys(path: Any) -> list[str]:
        out = []
        for entry in path:
            for attr in ("key", "idx", "name"):
                if hasattr(entry, attr):
                    out.append(str(getattr(entry, attr)))
                    break
        return out

    named = []
    for prefix, value in [*((f"args_{i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        for path, leaf in tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                named.append(("_".join([prefix, *keys(path)]), leaf))
    return named


def _out_position(name: str) -> tuple[int, str]:
    m = re.fullmatch(r"output_(\d+)", name)
    return (int(m.group(1)), "") if m else (1 << 30, name)


def load(path: Path) -> Any:
    return TFLiteRunner(path)


register(
    Format(
        "tflite",
        ".tflite",
        "graph",
        "LiteRT (TFLite) flatbuffer for Android, iOS and microcontrollers; static shapes",
        write,
        load,
        aliases=("litert",),
        rank=90,
        atol=1e-4,
        rtol=1e-4,
        isolate=True,  # LiteRT crashed on 1 of 500 bit-flipped files (make fuzz)
        size_estimate=graph_estimate,
        sniff=lambda s: s.zip_names is None and s.head[4:8] == b"TFL3",  # the flatbuffer's file identifier
        check=installed_check(require),
        precisions=("fp32", "fp16"),
        refusals={
            "bf16": "--to tflite takes --precision fp16, not bf16: LiteRT's CPU kernels have no bfloat16",
            "int8": "--quantize int8 is not supported for tflite: litert-torch's quantizer path (PT2E with its own "
            "quantizer, calibrated and converted before lowering) is not wired into lexport; export tflite without "
            "--quantize (fp32: LiteRT's CPU kernels compute in float32)",
            # No Format.dynamic: --dynamic and --dynamic-batch are refused, with this reason.
            "dynamic": "the LiteRT converter and interpreter need the example's shapes",
        },
    )
)
