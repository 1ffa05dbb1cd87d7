"""Checks shared by the folder sources: the path exists, and a file it names really lies inside it."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError


def existing(path: Path) -> Path:
    """`path`, or the CheckpointError for a checkpoint that is missing or a dangling link."""
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(f"checkpoint {path} is a dangling symbolic link (or a link loop)")
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def required(root: Path, name: str, *, missing: str, copy_hint: str) -> Path:
    """root/name, a file the folder must hold: `missing` when it does not, else as `inside` checks it."""
    if not (root / name).exists() and not (root / name).is_symlink():
        raise CheckpointError(missing, hint=copy_hint)
    return inside(root, name, copy_hint=copy_hint)


def inside(root: Path, name: str, *, copy_hint: str) -> Path:
    """root/name as a regular file that really is in root: a plain name, and no symlink leading elsewhere."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise CheckpointError(f"{root}: the checkpoint names a file {name!r} that is not a plain file name")
    p = root / name
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        if p.is_symlink():
            raise CheckpointError(f"{p} is a dangling symbolic link (or a link loop)") from e
        raise CheckpointError(f"{root}: {name} is missing; the folder is incomplete", hint=copy_hint) from e
    if real.parent != root:
        raise CheckpointError(f"{p} is a symbolic link to {real}, outside the checkpoint folder; refusing it")
    if not real.is_file():
        raise CheckpointError(f"{p} is not a regular file")
    return real
