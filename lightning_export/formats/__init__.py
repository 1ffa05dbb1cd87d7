"""The formats: one module per artifact format, each registering a `Format` that declares what it can do.

This module is the interface other packages use: the types a format is made of, the registry, and the helpers
the pipeline needs (a run's formats wrapped for --precision/--quantize, quiet exporter logs). Adding a format is
one module in this folder that calls `register` (found by `_load_all`, nothing else edited), or a module of another
package named by an entry point of the group `lightning_export.formats`."""

from __future__ import annotations

from ._base import (
    ALIASES,
    PLUGIN_ERRORS,
    PLUGINS_ENV,
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
    format_option_types,
    get_format,
    installed_check,
    module_bytes,
    option,
    parse_format_list,
    plugins_disabled,
    register,
    require_installed,
    storage_bytes,
    weights_estimate,
)
from ._graph import captured_stdout, exporting, graph_estimate, quiet_torch_logs, submodule_flags
from ._precision import check_quantize_request, for_run, normalize_precision, normalize_quantize, quantizations

__all__ = [
    "ALIASES", "captured_stdout", "check_quantize_request", "detect_format", "DynamicSupport", "ENTRY_POINT_GROUP",
    "ExportContext", "exporting", "for_run", "Format", "format_option_types", "get_format", "graph_estimate",
    "installed_check", "module_bytes", "NoOptions", "normalize_precision", "normalize_quantize", "option",
    "parse_format_list", "PLUGIN_ERRORS", "plugins_disabled", "PLUGINS_ENV", "PRECISIONS", "Quantization",
    "quantizations", "quiet_torch_logs", "register", "REGISTRY", "require_installed", "Sniffed", "storage_bytes",
    "submodule_flags", "weights_estimate", "Writer", "Written",
]


# The entry-point group through which an installed package adds formats: `name = "pkg.module:FORMAT"` (a Format,
# registered when loaded) or `name = "pkg.module"` (a module that calls register on import).
ENTRY_POINT_GROUP = "lightning_export.formats"


def _load_all() -> None:
    """Every module of this folder (not underscored) registers its formats on import, so adding a format is adding
    its module; then the formats of installed packages (ENTRY_POINT_GROUP). Format.rank orders the registry (the
    order of --help and the report)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    if not plugins_disabled():
        _load_plugins()
    ordered = sorted(REGISTRY.values(), key=lambda f: (f.rank, f.name))
    REGISTRY.clear()
    REGISTRY.update((f.name, f) for f in ordered)


def _load_plugins() -> None:
    import types
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if isinstance(loaded, Format):
                register(loaded)
            elif not isinstance(loaded, types.ModuleType):  # a module registers its formats on import
                raise TypeError(f"it names a {type(loaded).__name__}, not a Format or a module")
        except Exception as e:  # a broken plugin is not lexport's failure: the built-in formats still work
            PLUGIN_ERRORS.append((f"{ep.name} = {ep.value}", f"{type(e).__name__}: {e}"))


_load_all()
