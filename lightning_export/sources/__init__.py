"""Checkpoint sources: one module per kind of checkpoint, each with `detect(path)` and `open(path, options)`.
The first source that detects a path opens it; a torch.save file is the last, and takes anything else."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..safeload.archive import DEFAULT_MAX_GROWTH
from . import dcp, deepspeed, torch_file
from .base import Checkpoint, OpenOptions, Source

# In order: folders first (a DCP folder's .metadata, DeepSpeed's latest), then a file.
SOURCES: tuple[Source, ...] = (dcp, deepspeed, torch_file)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    allow_globals: tuple[str, ...] = (),
    hash_file: bool = True,
    max_growth: float = DEFAULT_MAX_GROWTH,
) -> Checkpoint:
    """Load a Lightning checkpoint (or a bare state dict) with weights_only=True, and prove its weights are the
    file's bytes: the zip directory is checked before torch reads it, storage records are memory-mapped only when
    stored uncompressed, and every storage behind a state_dict tensor is checked against its record's CRC-32.
    Work is bounded by the file's size: see DEFAULT_MAX_GROWTH."""
    path = Path(path)
    # --allow-global takes comma-separated names too: the refusal's hint prints them that way, on one line.
    allow_globals = tuple(n.strip() for value in allow_globals for n in value.split(",") if n.strip())
    if not max_growth >= 1:  # also refuses NaN
        raise UsageError(f"--max-growth must be a number >= 1, not {max_growth}")
    options = OpenOptions(trust=trust, allow_globals=allow_globals, max_growth=max_growth, hash_file=hash_file)
    source = next(s for s in SOURCES if s.detect(path))
    return source.open(path, options)
