"""The pickles inside a torch.export archive (`.pt2`), read weights-only before torch reads them.

`torch.export.load` (torch 2.13) unpickles three kinds of record with full pickle: the sample inputs (weights_only
first, then silently retried with weights_only=False), tensors saved with `use_pickle` (weights and constants,
weights_only=False) and "opaque" constants (plain `pickle.loads`). A record naming `os.system` runs it. lexport reads
every such record itself first with torch's weights_only unpickler and refuses the archive when one names anything
else; `torch.export.load` (and `aoti_load_package`, which reads the same archive) then run with
TORCH_FORCE_WEIGHTS_ONLY_LOAD set, so a record this check missed could still not run code through torch.load.
"""

from __future__ import annotations

import contextlib
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ZIP_READ_ERRORS

# The file-name prefixes torch.export.save gives constants (torch/export/pt2_archive/constants.py): objects that
# only a full unpickler reads.
OPAQUE_PREFIX = "opaque_obj_"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"


class UnsafeArchiveError(RuntimeError):
    """A record of the archive would run code (or cannot be read safely) if torch unpickled it."""


@contextlib.contextmanager
def weights_only_forced() -> Iterator[None]:
    """Every torch.load inside the block is weights_only, even one that passes weights_only=False (torch honours
    TORCH_FORCE_WEIGHTS_ONLY_LOAD over the argument); an inherited TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is unset."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_pickles(path: Path) -> int:
    """Read every pickle record of the archive at `path` weights-only; raise UnsafeArchiveError naming the record
    (and the globals it names) when one would need a full unpickler. Returns the number of records read."""
    try:
        zf = zipfile.ZipFile(path)
    except ZIP_READ_ERRORS as e:
        raise UnsafeArchiveError(f"not a readable zip archive ({e})") from None
    file_size = os.path.getsize(path)
    checked = 0
    with zf:
        for info in zf.infolist():
            if info.is_dir() or "/data/" not in f"/{info.filename}" or "/aotinductor/" in info.filename:
                continue
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith(OPAQUE_PREFIX):
                raise UnsafeArchiveError(
                    f"{info.filename} is a pickled Python object, which only a full unpickler reads: lexport does not "
                    "unpickle it (it could run any code)"
                )
            if info.file_size > file_size:  # a deflated record larger than the archive: a bomb, never torch's writing
                raise UnsafeArchiveError(f"{info.filename} declares {info.file_size} bytes in a {file_size}-byte file")
            try:
                with zf.open(info) as f:
                    head = f.read(4)
                    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
                        continue  # raw tensor bytes or JSON: read without unpickling
                    data = head + f.read()
            except ZIP_READ_ERRORS as e:
                raise UnsafeArchiveError(f"{info.filename} cannot be read ({e})") from None
            if head.startswith(ZIP_MAGIC):
                _load_weights_only(info.filename, data)
                checked += 1
            elif not base.startswith("custom_obj_"):
                # A bare pickle other than a TorchScript object (read by TorchScript's own unpickler, which knows
                # no Python globals) is read by pickle.loads.
                raise UnsafeArchiveError(f"{info.filename} is a bare Python pickle: lexport does not unpickle it")
    return checked


def _load_weights_only(name: str, data: bytes) -> None:
    import pickle

    import torch

    try:
        with weights_only_forced():
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
        except Exception:  # noqa: BLE001 - only for the message
            names = []
        what = f"names {', '.join(sorted(names)[:5])}" if names else f"is refused by the weights-only unpickler ({e})"
        raise UnsafeArchiveError(
            f"the pickle {name} {what}: a .pt2's pickles hold only tensors and containers, and lexport unpickles them "
            "weights-only (nothing in them runs)"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt record: the archive cannot be loaded
        raise UnsafeArchiveError(f"the pickle {name} cannot be read: {type(e).__name__}: {str(e)[:300]}") from None
