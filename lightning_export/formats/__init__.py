"""The formats: one module per artifact format, each registering a `Format` that declares what it can do.

This module is the interface other packages use: the types a format is made of, the registry, and the helpers
the pipeline needs (a run's formats wrapped for --precision/--quantize, quiet exporter logs). Adding a format is
one module that calls `register` (built-in ones are listed in `_load_all`; another package's registers itself on
import)."""

from __future__ import annotations

from ._base import (
    ALIASES,
    PRECISIONS,
    REGISTRY,
    DynamicSupport,
    ExportContext,
    Format,
    NoOptions,
    Quantization,
    Sniffed,
    Writer,
    Written,
    detect_format,
    get_format,
    installed_check,
    module_bytes,
    option,
    parse_format_list,
    register,
    require_installed,
    storage_bytes,
    weights_estimate,
)
from ._graph import captured_stdout, exporting, graph_estimate, quiet_torch_logs, submodule_flags
from ._precision import check_quantize_request, for_run, normalize_precision, normalize_quantize, quantizations

__all__ = [
    "ALIASES", "DynamicSupport", "PRECISIONS", "REGISTRY", "ExportContext", "Format", "NoOptions", "Quantization",
    "Sniffed", "Writer", "Written", "captured_stdout", "check_quantize_request", "detect_format", "exporting",
    "for_run", "get_format", "graph_estimate", "installed_check", "module_bytes", "normalize_precision",
    "normalize_quantize", "option", "parse_format_list", "quantizations", "quiet_torch_logs", "register",
    "require_installed", "storage_bytes", "submodule_flags", "weights_estimate",
]


def _load_all() -> None:
    # Registration order is the order of --help and of the README table.
    import importlib

    for name in ("state_dict", "safetensors", "torchscript", "onnx", "exported_program", "executorch", "aoti",
                 "openvino", "tflite", "huggingface"):
        importlib.import_module(f"{__name__}.{name}")


_load_all()
