"""One call for the pipeline: `--data SOURCE` (+ `--config`, `--data-batches`, `--data-input`, `--datamodule`) to
the calibration and verification batches, with what the report and the manifest record about them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..data.batches import Prepared, parse_pick, prepare, take

CONFIG_SOURCE = "config"  # --data config: the data: section of --config


def read_data(
    source: str | os.PathLike[str],
    module: Any,
    *,
    config: str | os.PathLike[str] | None = None,
    max_batches: int | None = None,
    pick: str | int | None = None,
    datamodule_class: str | None = None,
    calibrate: bool = False,
) -> tuple[Prepared, dict[str, Any]]:
    """(the mapped, split batches; the record of the source for the JSON and the manifest).

    `source` is a `.pt` file or the word `config` (then `config` is the `--config` file whose `data:` section builds
    the LightningDataModule). `module` is the exported target (its forward's signature drives the batch rule).
    `calibrate` splits the batches (even positions calibrate, odd ones verify); without it all of them verify.

    The record: `{"kind": "file", "path", "sha256", "bytes"}` or `{"kind": "datamodule", "class", "loader",
    "config"}`, plus `batches_read`. Raises UsageError (exit 2) for a bad file or flag, UserModuleError (exit 4)
    when the user's datamodule raises."""
    pick = parse_pick(pick)
    if str(source) == CONFIG_SOURCE:
        if config is None:
            raise UsageError("--data config reads the data: section of --config; pass --config FILE too")
        from ..build.datamodule import build_datamodule, read_data_section, take_batches

        got = take_batches(build_datamodule(read_data_section(config), class_spec=datamodule_class),
                           max_batches=max_batches)
        raw, where = got.batches, got.source
        record: dict[str, Any] = {"kind": "datamodule", "class": got.class_name, "loader": got.loader,
                                  "config": str(config)}
    else:
        from ..data.files import load_batches_file
        from ..hashing import file_sha256

        path = Path(source)
        everything = load_batches_file(path)
        raw = take(iter(everything), max_batches=max_batches)
        where = f"file {path}"
        record = {"kind": "file", "path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size,
                  "batches_in_file": len(everything)}
    record["batches_read"] = len(raw)
    prepared = prepare(raw, module, source=where, calibrate=calibrate, pick=pick)
    return prepared, {**record, **prepared.summary()}

