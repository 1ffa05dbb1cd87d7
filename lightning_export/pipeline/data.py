"""One call for the pipeline: `--data SOURCE` (+ `--config`, `--data-batches`, `--data-input`) to
the calibration and verification batches, with what the report and the manifest record about them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..data.batches import Prepared, parse_pick, prepare, take
from ..errors import UsageError
from ..inputs import Inputs

CONFIG_SOURCE = "config"  # --data config: the data: section of --config


def read_data(
    source: str | os.PathLike[str],
    module: Any,
    *,
    config: str | os.PathLike[str] | None = None,
    max_batches: int | None = None,
    pick: str | int | None = None,
    calibrate: bool = False,
    min_verification_samples: int = 1,
    exported: tuple[str, ...] | None = None,
    positional: int = 0,
) -> tuple[Prepared, dict[str, Any]]:
    """(the mapped, split batches; the record of the source for the JSON and the manifest).

    `source` is a `.pt` file or the word `config` (then `config` is the `--config` file whose `data:` section builds
    the LightningDataModule). `module` is the exported target (its forward's signature drives the batch rule).
    `calibrate` splits the batches (even positions calibrate, odd ones verify); without it all of them verify.
    Fewer held-out samples than `min_verification_samples` (a gate's minimum) is a UsageError naming what was read.

    The record: `{"kind": "file", "path", "sha256", "bytes"}` or `{"kind": "datamodule", "class", "loader",
    "config"}`, plus `batches_read`. Raises UsageError (exit 2) for a bad file or flag, UserModuleError (exit 4)
    when the user's datamodule raises."""
    picked = parse_pick(pick)
    if str(source) == CONFIG_SOURCE:
        if config is None:
            raise UsageError("--data config reads the data: section of --config; pass --config FILE too")
        from ..construct.datamodule import build_datamodule, exits_refused, read_data_section, take_batches

        section = read_data_section(config)
        with exits_refused(f"--data config: the datamodule {section.class_path or ''}".rstrip()):
            got = take_batches(build_datamodule(section), max_batches=max_batches)
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
    prepared = prepare(raw, module, source=where, calibrate=calibrate, pick=picked,
                       min_verification_samples=min_verification_samples, exported=exported,
                       positional=positional)
    return prepared, {**record, **prepared.summary()}


class HeldOut:
    """The held-out verification batches of `--data` and the eager outputs on them, computed once per batch size
    and shared by every format: as read for programs that take any batch, re-batched to the example's batch size
    for static-shape programs (ExecuTorch, TFLite, AOTInductor and others without --dynamic-batch)."""

    def __init__(self, target: Any, prepared: Prepared, record: dict[str, Any]) -> None:
        self.target = target
        self.prepared = prepared
        self.record = record
        self._cache: dict[int | None, tuple[list[Any], list[Any]]] = {}

    def runs(self, batch: int | None) -> tuple[list[Any], list[Any]]:
        """(batches, the eager module's outputs on each) for programs whose batch size is `batch` (None: any)."""
        if batch not in self._cache:
            from ..data.batches import rebatch
            from ..inputs import detached, run_forward

            batches = self.prepared.verification if batch is None else rebatch(self.prepared.verification, batch)
            self._cache[batch] = (batches, [detached(self._eager(b, run_forward)) for b in batches])
        return self._cache[batch]

    def _eager(self, b: Any, run_forward: Any) -> Any:
        """The eager module on a held-out batch; where it fails on the data (a shape it does not take) the data is
        what to change: exit 2 naming the batch."""
        from ..errors import UserModuleError, describe_exception

        try:
            return run_forward(self.target, b.inputs)
        except UserModuleError as e:
            raise UsageError(
                f"--data: the module itself fails on held-out data from {self.prepared.source} "
                f"(a batch {b.inputs.describe()}): {describe_exception(e.__cause__ or e)}",
                hint="Give batches the module takes (the shapes of its example input); batches of other shapes "
                "are never verified.",
            ) from e

    def ran(self, batch: int | None) -> int:
        """How many held-out samples run in a program whose batch size is `batch` (None: any)."""
        return sum(b.samples for b in self.runs(batch)[0])


def _sizes_a_static_program_cannot_take(prepared: Prepared, example: Inputs, formats: Any,
                                        names: tuple[str, ...] | None) -> UsageError | None:
    """Held-out batches whose sizes differ from the example's beyond the batch (text padded per batch: lengths 10,
    14, 20 for an example of 16) cannot run in a program exported with the example's shapes: exit 2 naming the
    --dynamic flag, before anything is exported, rather than every batch failing in the runtime."""
    from ..formats import REGISTRY

    def fixes_shapes(name: str) -> bool:
        support = REGISTRY[name].dynamic
        return support is None or support.exported

    static = [n for n in formats if n in REGISTRY and REGISTRY[n].kind == "graph" and fixes_shapes(n)]
    if not static:
        return None
    want = [tuple(t.shape) for t in example.tensors()]
    names = names if names is not None and len(names) == len(want) else ()
    seen: dict[tuple[int, int], set[int]] = {}
    for b in prepared.verification:
        got = [tuple(t.shape) for t in b.inputs.tensors()]
        if len(got) != len(want):
            return None
        for i, (g, w) in enumerate(zip(got, want)):
            if len(g) != len(w):
                return None
            for d in range(1, len(w)):
                if g[d] != w[d]:
                    seen.setdefault((i, d), set()).add(g[d])
    if not seen:
        return None
    (i, d), sizes = next(iter(seen.items()))
    label = f"{names[i]} dim {d}" if i < len(names) else f"input {i} dim {d}"
    dims = ",".join(str(x) for x in sorted({0, *(dd for _, dd in seen)}))
    largest = max(sizes)
    return UsageError(
        f"--data: the held-out batches have {label} = {', '.join(map(str, sorted(sizes)[:6]))} where the example "
        f"inputs have {want[i][d]}; {', '.join(static)} export the example's shapes and cannot run them",
        hint=f"Export those dims dynamic: --dynamic {dims} (a bound where the model has one: DIM:MIN..MAX, e.g. "
        f"{d}:1..{max(largest, want[i][d])}), or give batches padded to the example's sizes.",
    )


def read_held_out(opts: Any, target: Any, report: Any, example: Inputs | None = None) -> HeldOut:
    """`--data` read once for the run (after the module is built: the batch rule reads forward's signature): the
    calibration batches for --quantize int8, the held-out ones for every artifact; what was read goes into the
    report (`data` in the JSON and the manifest) and its notes."""
    from ..data.batches import MIN_GATE_SAMPLES, bound_names
    from ..errors import VerificationError
    from .options import is_gated

    names = bound_names(target, example) if example is not None else None
    prepared, record = read_data(opts.data, target, config=opts.config, max_batches=opts.data_batches,
                                 pick=opts.data_input, calibrate=(opts.quantize or "").strip().lower() == "int8",
                                 min_verification_samples=MIN_GATE_SAMPLES if is_gated(opts) else 1,
                                 exported=names,
                                 positional=len(example.args) if example is not None else 0)
    if opts.data_sha256 and record.get("sha256") != opts.data_sha256:
        raise VerificationError(
            f"--data {opts.data} is not the data the manifest records: sha256 {str(record.get('sha256'))[:16]}… vs "
            f"{opts.data_sha256[:16]}…",
            hint="Verify with the file the export used, or export again with this one.",
        )
    report.warnings.extend(record.get("warnings", []))
    report.data = record
    where = record["source"]  # "file data.pt", or "val_dataloader() of pkg.DataModule": the loader used
    calibration = (f"{record['calibration_batches']} batches ({record['calibration_samples']} samples) calibrate, "
                   if record["calibration_batches"] else "")
    report.notes.append(
        f"--data: {where}: {calibration}{record['verification_batches']} batches "
        f"({record['verification_samples']} samples) are held out to verify every artifact (what ran in each is in its "
        f"agreement); {record['rule']}"
    )
    held = HeldOut(target, prepared, record)
    problem = (_sizes_a_static_program_cannot_take(prepared, example, opts.formats, names)
               if example is not None and not opts.dynamic else None)
    if problem is not None:
        held.runs(None)  # the eager module runs them first (cached for verification): its own failure comes first
        raise problem
    return held
