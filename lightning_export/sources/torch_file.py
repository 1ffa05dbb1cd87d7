"""A checkpoint file written by torch.save (a Lightning .ckpt, or a bare state dict): the safe loader's checks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..hashing import Hasher
from ..safeload.loader import load_verified
from .base import Checkpoint, OpenOptions, as_checkpoint


def detect(path: Path) -> bool:
    """Anything that is not a folder of another source: the loader says what is wrong with it, if anything."""
    return True


def open(path: Path, options: OpenOptions) -> Checkpoint:  # noqa: A001 - the verb every source module has
    hasher = Hasher(path)

    def select(obj: Any) -> tuple[Checkpoint, Mapping[str, Any]]:
        ckpt = as_checkpoint(path, obj, hasher, file_bytes=path.stat().st_size)
        return ckpt, ckpt.state_dict

    return load_verified(path, select, trust=options.trust, allow_globals=options.allow_globals,
                         max_growth=options.max_growth, on_checked=hasher.start if options.hash_file else None)
