"""LexportCallback: a Lightning Callback that exports the checkpoint ModelCheckpoint wrote, in process, when fit
ends (or after each new best), on rank 0, and logs the report to the Trainer's loggers.

Importing this module imports Lightning (the base class); `import lightning_export` does not import it: the
package's __getattr__ reaches this module on first use of `lightning_export.LexportCallback`."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LexportError, UsageError
from .report import Report

__all__ = ["LexportCallback", "LexportCallbackError", "report_metrics"]

_ON = ("fit_end", "best")
_WHICH = ("best", "last")


def _lightning_bases() -> tuple[type, ...]:
    """The Callback base of the Lightning the user's script already imported (both when both are: a Trainer from
    either accepts the callback, and LightningCLI's type check too); else of the one installed."""
    loaded = tuple(sys.modules[n].Callback for n in ("pytorch_lightning", "lightning.pytorch") if n in sys.modules
                   and hasattr(sys.modules[n], "Callback"))
    if loaded:
        return loaded
    for name in ("pytorch_lightning", "lightning.pytorch"):
        if importlib.util.find_spec(name.partition(".")[0]) is not None:
            return (importlib.import_module(name).Callback,)
    raise ImportError("LexportCallback needs Lightning: pip install pytorch-lightning (or lightning)")


class LexportCallbackError(RuntimeError):
    """The export at the end of training failed (its exit code and kind as attributes; `.report` the Report)."""

    def __init__(self, message: str, *, exit_code: int, kind: str, report: Report | None) -> None:
        super().__init__(message)
        self.exit_code, self.kind, self.report = exit_code, kind, report


class LexportCallback(*_lightning_bases()):  # type: ignore[misc]
    """Export the checkpoint ModelCheckpoint wrote with lexport's pipeline, verified, when fit ends.

    Args:
        to: the formats (``"onnx"`` or ``["onnx", "safetensors"]``).
        attr: the submodule to export (``"model"``); default the whole LightningModule.
        module: the LightningModule class as ``pkg.mod:Class``; default the class being trained.
        on: ``"fit_end"`` (once, when fit ends) or ``"best"`` (after each new best checkpoint; training goes on
            once that export is done).
        checkpoint: ``"best"`` (ModelCheckpoint's best, else its last) or ``"last"`` (last, else best).
        output_dir: where artifacts go (default: beside the checkpoint), named after the checkpoint.
        strict: a failed export or verification raises LexportCallbackError; with False it only warns.
        log: log the report (sizes, drift, agreement) to the Trainer's loggers.
        options: any other export option by its ExportOptions name (``{"opset": 17}``).
        The other arguments are the export options of the same names (``lexport --help``).
    """

    def __init__(
        self,
        to: str | list[str] = "onnx",
        *,
        attr: str | None = None,
        module: str | None = None,
        on: str = "fit_end",
        checkpoint: str = "best",
        output_dir: str | None = None,
        strict: bool = True,
        log: bool = True,
        inputs: list[str] | None = None,
        dynamic_batch: bool = False,
        data: str | None = None,
        data_batches: int | None = None,
        precision: str | None = None,
        quantize: str | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        seed: int = 0,
        random_inputs: int = 5,
        manifest: bool = False,
        force: bool = True,
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if on not in _ON:
            raise ValueError(f"LexportCallback(on={on!r}): use one of {', '.join(_ON)}")
        if checkpoint not in _WHICH:
            raise ValueError(f"LexportCallback(checkpoint={checkpoint!r}): use one of {', '.join(_WHICH)}")
        self.on, self.checkpoint, self.strict, self.log = on, checkpoint, strict, log
        self.module = module
        self.output_dir = output_dir
        self.manifest = manifest
        self.options: dict[str, Any] = {
            "formats": [to] if isinstance(to, str) else list(to), "attr": attr, "inputs": list(inputs or ()),
            "dynamic_batch": dynamic_batch, "data": data, "data_batches": data_batches, "precision": precision,
            "quantize": quantize, "atol": atol, "rtol": rtol, "seed": seed, "random_inputs": random_inputs,
            "force": force, **(options or {}),
        }
        self.exported: dict[str, Report] = {}  # checkpoint path -> its report (rank 0)
        self.last_report: Report | None = None

    # ------------------------------------------------------------------------------------------- Lightning hooks
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "best":
            self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "best":  # ModelCheckpoint runs after us: a best saved now is exported at the next hook
            self._run(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.on == "best" and not trainer.sanity_checking:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._run(trainer, pl_module, required=True)

    # ------------------------------------------------------------------------------------------------ the work
    def chosen_checkpoint(self, trainer: Any) -> str | None:
        """The checkpoint to export: ModelCheckpoint's best (else last), or last (else best); None if none yet."""
        callback = getattr(trainer, "checkpoint_callback", None)
        if callback is None:
            return None
        best, last = getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")
        for path in ((best, last) if self.checkpoint == "best" else (last, best)):
            if path and Path(path).is_file():
                return str(path)
        return None

    def _run(self, trainer: Any, pl_module: Any, *, required: bool = False) -> None:
        """Rank 0 exports (if there is a checkpoint it has not exported yet); every rank learns the outcome by a
        broadcast, so all of them raise together (none waits forever on a rank that failed)."""
        failure: str | None = None
        self._error = None
        if trainer.is_global_zero:
            path = self.chosen_checkpoint(trainer)
            if path is None and required and not self.exported:
                failure = ("LexportCallback: no checkpoint to export: no ModelCheckpoint wrote one (enable "
                           "checkpointing, or add ModelCheckpoint to the Trainer's callbacks)")
            elif path is not None and path not in self.exported:
                failure = self._export(trainer, pl_module, path)
        if trainer.world_size > 1:
            failure = trainer.strategy.broadcast(failure, src=0)
        if failure is None:
            return
        if self.strict:
            error = self._error if trainer.is_global_zero and self._error is not None else None
            raise error or LexportCallbackError(failure, exit_code=1, kind="export", report=None)
        if trainer.is_global_zero:
            warnings.warn(failure, stacklevel=2)

    _error: LexportCallbackError | None = None

    def _export(self, trainer: Any, pl_module: Any, path: str) -> str | None:
        """Export `path`; the failure's text, or None. The training run is untouched: the pipeline builds its own
        module from the file, and the random generators are restored afterwards."""
        from .pipeline.export import export

        options = dict(self.options)
        if self.output_dir is not None:
            options["output_dir"] = self.output_dir
        if self.manifest:
            options["manifest"] = str(Path(self.output_dir or Path(path).parent) / f"{Path(path).stem}.lexport.json")
        logger = _lightning_logger(type(self))
        logger.info("lexport: exporting %s to %s", path, ", ".join(options["formats"]))
        self._error = None
        report = None
        try:
            options["module"] = self.module or _class_path(type(pl_module))
            with _rng_preserved():
                report = export(path, **options)
        except LexportError as e:
            report = e.report
            message = f"LexportCallback: exporting {path} failed (exit {e.exit_code}, {e.kind}): {e.message}"
            if e.hint:
                message += f"\n{e.hint}"
            self._error = LexportCallbackError(message, exit_code=e.exit_code, kind=e.kind, report=report)
        self.exported[path] = report
        self.last_report = report
        if report is not None:
            for a in report.artifacts:
                logger.info("lexport: %s", _artifact_line(a.to_json()))
            if self.log:
                _log_report(trainer, report, path)
        _append_summary(report, self._error)
        return None if self._error is None else str(self._error)


def _class_path(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise UsageError(
            f"LexportCallback: {cls.__qualname__} is defined inside a function, so lexport cannot import it",
            hint="Define the LightningModule at module level, or pass LexportCallback(module='pkg.mod:Class').",
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _lightning_logger(cls: type) -> logging.Logger:
    """Lightning's own logger (it prints at INFO), so the lines read like ModelCheckpoint's."""
    base = next((b.__module__.partition(".callbacks")[0] for b in cls.__mro__[1:] if b.__name__ == "Callback"),
                "lightning_export")
    return logging.getLogger(f"{base}.callbacks.lexport")


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """torch's (CPU and CUDA), Python's and numpy's generators as they were: an export mid-training must not
    change what the next batches draw."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _artifact_line(a: dict[str, Any]) -> str:
    v = a.get("verification") or {}
    verdict = "export failed" if a.get("error") else ("verified" if v.get("passed") else
                                                      "not verified" if not v else "FAILED verification")
    diff = f", max abs diff {v['max_abs_diff']:.2e}" if v.get("max_abs_diff") is not None else ""
    return f"{a['format']} {a.get('path') or '(not written)'}: {verdict}{diff}"


def report_metrics(report: Report) -> dict[str, float]:
    """The report's figures as flat metrics: lexport/<format>/{bytes, verified, max_abs_diff, max_rel_diff,
    inputs_checked, agreement, accuracy, eager_accuracy, size_ratio, seconds}."""
    out: dict[str, float] = {"lexport/ok": float(report.ok)}
    for a in report.to_json()["artifacts"]:
        prefix = f"lexport/{a['format']}/"
        v = a.get("verification") or {}
        agreement = v.get("agreement") or {}
        figures = {
            "bytes": a.get("bytes"), "seconds": a.get("seconds"), "max_abs_diff": v.get("max_abs_diff"),
            "max_rel_diff": v.get("max_rel_diff"), "inputs_checked": v.get("inputs_checked"),
            "agreement": agreement.get("agreement"), "accuracy": agreement.get("artifact_accuracy"),
            "eager_accuracy": agreement.get("eager_accuracy"), "size_ratio": (a.get("info") or {}).get("size_ratio"),
            "verified": 0.0 if a.get("error") else float(bool(v.get("passed"))) if v else None,
        }
        out.update({prefix + k: float(x) for k, x in figures.items() if isinstance(x, (int, float))})
    return out


def _append_summary(report: Report | None, error: LexportCallbackError | None) -> None:
    """In GitHub Actions ($GITHUB_STEP_SUMMARY set), the markdown report as the CLI appends it; never fatal."""
    import os

    from .summary import Failure, markdown

    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    failure = None if error is None else Failure(error.exit_code, error.kind, str(error))
    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(markdown(report.to_json() if report is not None else {}, failure, title="lexport (LexportCallback)"))
    except OSError as e:
        warnings.warn(f"LexportCallback: the summary was not written to {target}: {e}", stacklevel=2)


def _log_report(trainer: Any, report: Report, checkpoint: str) -> None:
    metrics = report_metrics(report)
    params: dict[str, Any] = {"lexport/checkpoint": checkpoint}
    for a in report.artifacts:
        params[f"lexport/{a.format}/path"] = a.path or ""
        if a.exporter:
            params[f"lexport/{a.format}/exporter"] = a.exporter
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.log_hyperparams(params)
        logger.save()
