"""Opening a checkpoint safely: weights_only + mmap, metadata, and where the tensors come from."""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UsageError

# torch < 2.6 has published weights_only bypasses (CVE-2025-32434); untrusted loads refuse it.
MIN_TORCH_FOR_UNTRUSTED = (2, 6)
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class Checkpoint:
    path: Path
    raw: dict[str, Any]  # the whole loaded object (tensors are memory-mapped, never copied)
    state_dict: dict[str, Any]
    plain: bool  # True when the file is a bare state dict, not a Lightning checkpoint
    hparams: dict[str, Any] = field(default_factory=dict)
    _sha: "_Hasher | None" = None

    @property
    def lightning_version(self) -> str | None:
        return self.raw.get("pytorch-lightning_version") or self.raw.get("lightning_version")

    @property
    def epoch(self) -> int | None:
        return self.raw.get("epoch")

    @property
    def global_step(self) -> int | None:
        return self.raw.get("global_step")

    @property
    def sha256(self) -> str:
        return self._sha.result() if self._sha else file_sha256(self.path)

    @property
    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())


class _Hasher(threading.Thread):
    """Hashes the checkpoint in the background: hashlib releases the GIL, and the read warms the page cache
    that the memory-mapped tensors are about to use."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self._digest, self._error = path, None, None
        self.start()

    def run(self) -> None:
        try:
            self._digest = file_sha256(self.path)
        except OSError as e:  # reported when asked for
            self._error = e

    def result(self) -> str:
        self.join()
        if self._error is not None:
            raise CheckpointError(f"cannot read {self.path}: {self._error}")
        return self._digest  # type: ignore[return-value]


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _import_dotted(name: str) -> Any:
    import importlib

    module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise UsageError(f"--allow-global {name!r} must be a dotted path such as 'pkg.mod.Name'")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--allow-global {name!r} cannot be imported: {e}") from e
    return obj


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / ".metadata").exists():
            raise CheckpointError(
                f"{path} is a sharded (torch.distributed.checkpoint) folder; lexport does not read those yet.",
                hint="Consolidate it first, e.g. with `python -m lightning.pytorch.utilities.consolidate_checkpoint`.",
            )
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the checkpoint was not written completely")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} is truncated or corrupt: its zip directory is missing")
        return
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") or (head and all(32 <= b < 127 or b in (9, 10, 13) for b in head)):
        raise CheckpointError(f"{path} is a text file (JSON, YAML or similar), not a torch checkpoint")


def _describe_unsafe(path: Path) -> list[str]:
    import torch

    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - best effort, only for the message
        return []


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    allow_globals: tuple[str, ...] = (),
    hash_file: bool = True,
) -> Checkpoint:
    """Load a Lightning checkpoint (or a bare state dict) with weights_only=True and mmap=True."""
    path = Path(path)
    _check_file(path)
    import torch

    if not trust:
        version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
        if version < MIN_TORCH_FOR_UNTRUSTED:
            raise CheckpointError(
                f"torch {torch.__version__} has known weights_only bypasses; refusing to open an untrusted checkpoint.",
                hint="Upgrade to torch >= 2.6, or pass --trust-checkpoint if you trust this file completely.",
            )
    hasher = _Hasher(path) if hash_file else None
    obj = _torch_load(path, trust=trust, allow_globals=allow_globals)
    return _as_checkpoint(path, obj, hasher)


def _torch_load(path: Path, *, trust: bool, allow_globals: tuple[str, ...]) -> Any:
    import pickle

    import torch

    is_zip = zipfile.is_zipfile(path)
    kwargs: dict[str, Any] = {"map_location": "cpu", "mmap": is_zip}
    if trust:
        # The user said the file is trusted: full unpickling, which runs code from the file.
        kwargs["weights_only"] = False
        try:
            return torch.load(str(path), **kwargs)
        except Exception as e:
            raise CheckpointError(f"cannot load {path} (trusted, full unpickling): {type(e).__name__}: {e}") from e

    # Always explicit: an inherited TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn weights_only off then.
    kwargs["weights_only"] = True
    saved_env = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        from contextlib import nullcontext

        allowed = [_import_dotted(name) for name in allow_globals]
        ctx = torch.serialization.safe_globals(allowed) if allowed else nullcontext()
        with ctx:
            return torch.load(str(path), **kwargs)
    except pickle.UnpicklingError as e:
        unsafe = _describe_unsafe(path)
        if unsafe or "Weights only load failed" in str(e):
            names = ", ".join(unsafe) if unsafe else "(could not list them)"
            flags = " ".join(f"--allow-global {n}" for n in unsafe) or "--allow-global pkg.mod.Name"
            raise CheckpointError(
                f"{path} needs Python objects that are not loaded by default: {names}",
                hint=(
                    f"If you know these classes, allow exactly them: {flags}\n"
                    "Or, only if you trust the file completely, --trust-checkpoint (full unpickling: runs code "
                    "from the file)."
                ),
            ) from e
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    except UsageError:
        raise
    except Exception as e:
        raise CheckpointError(_explain_load_failure(path, e)) from e
    finally:
        if saved_env is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = saved_env


def _explain_load_failure(path: Path, e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = str(e).lower()
    if "maximum supported version" in low or "version" in low and "not supported" in low:
        return f"{path} was written by a newer torch than this one: {text}. Upgrade torch to read it."
    if "central directory" in low or "zip archive" in low or "failed reading" in low or "eof" in low:
        return f"{path} is truncated or corrupt ({text})"
    if "invalid load key" in low or "unpickling" in low:
        return f"{path} is not a torch checkpoint ({text})"
    return f"{path} cannot be loaded: {type(e).__name__}: {text}"


def _is_tensor_mapping(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _as_checkpoint(path: Path, obj: Any, hasher: _Hasher | None) -> Checkpoint:
    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
        if not _is_tensor_mapping(sd):
            raise CheckpointError(f"{path}: its 'state_dict' entry does not hold tensors")
        hparams = obj.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            hparams = dict(vars(hparams)) if hasattr(hparams, "__dict__") else {}
        return Checkpoint(path, obj, dict(sd), plain=False, hparams=dict(hparams), _sha=hasher)
    if _is_tensor_mapping(obj):
        return Checkpoint(path, {"state_dict": obj}, dict(obj), plain=True, _sha=hasher)
    what = type(obj).__name__
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:8])) or "nothing"
        raise CheckpointError(
            f"{path} holds a {what} without a 'state_dict' entry and is not a state dict of tensors (keys: {keys})"
        )
    raise CheckpointError(f"{path} holds a {what}, not a Lightning checkpoint or a state dict of tensors")
