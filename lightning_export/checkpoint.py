"""Opening a checkpoint safely: weights_only + mmap, metadata, and where the tensors come from."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
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
    _sha: _Hasher | None = None

    # Metadata goes into the JSON report: only plain values of the expected type, whatever the file holds.
    @property
    def lightning_version(self) -> str | None:
        for key in ("pytorch-lightning_version", "lightning_version"):
            value = self.raw.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    @property
    def epoch(self) -> int | None:
        return _plain_int(self.raw.get("epoch"))

    @property
    def global_step(self) -> int | None:
        return _plain_int(self.raw.get("global_step"))

    @property
    def sha256(self) -> str:
        return self._sha.result() if self._sha else file_sha256(self.path)


def _plain_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
        if path.is_symlink():
            raise CheckpointError(f"checkpoint {path} is a dangling symbolic link (or a link loop)")
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
    if head[:1] == b"\x80" and head[1:2] in (b"\x03", b"\x04", b"\x05"):
        # torch.save writes a zip, or (legacy) protocol-2 pickles after a magic number: never this.
        raise CheckpointError(
            f"{path} is a plain Python pickle (protocol {head[1]}), not a checkpoint written by torch.save",
        )
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"[") or (head and all(32 <= b < 127 or b in (9, 10, 13) for b in head)):
        raise CheckpointError(f"{path} is a text file (JSON, YAML or similar), not a torch checkpoint")


def _describe_unsafe(path: Path) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - best effort (legacy, non-zip files), only for the message
        return []


def _torch_version(text: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.6.0+cpu', '2.7.0a0+git1234' or '2.10.0.dev2025'."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


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

    if not trust and _torch_version(torch.__version__) < MIN_TORCH_FOR_UNTRUSTED:
        raise CheckpointError(
            f"torch {torch.__version__} has known weights_only bypasses; refusing to open an untrusted checkpoint.",
            hint="Upgrade to torch >= 2.6, or pass --trust-checkpoint if you trust this file completely.",
        )
    allowed = [_import_dotted(name) for name in allow_globals]  # a bad --allow-global fails before any work
    hasher = _Hasher(path) if hash_file else None
    obj = _torch_load(path, trust=trust, allowed=allowed, allow_globals=allow_globals)
    return _as_checkpoint(path, obj, hasher)


def _torch_load(path: Path, *, trust: bool, allowed: list[Any], allow_globals: tuple[str, ...] = ()) -> Any:
    import warnings

    import torch

    # torch's own test (torch.serialization._is_zipfile) looks at the first bytes, not at the zip directory.
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    kwargs: dict[str, Any] = {"map_location": "cpu", "mmap": is_zip}
    if trust:
        # The user said the file is trusted: full unpickling, which runs code from the file.
        kwargs["weights_only"] = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(str(path), **kwargs)
        except Exception as e:
            raise CheckpointError(f"{_explain_load_failure(path, e)} [loaded with --trust-checkpoint]") from e

    # Always explicit, and never retried with weights_only=False: an inherited TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    # cannot turn it off (torch honours that variable only when weights_only is not passed; it is also unset
    # for the call, so a torch that behaved otherwise could not be talked into it either).
    kwargs["weights_only"] = True
    saved_env = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        ctx = torch.serialization.safe_globals(allowed) if allowed else contextlib.nullcontext()
        with ctx, warnings.catch_warnings():
            # torch warns about pickle protocols and legacy formats; the user gets one clear message instead.
            warnings.simplefilter("ignore")
            return torch.load(str(path), **kwargs)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e, is_zip, allowed, allow_globals) from e
    except Exception as e:
        raise CheckpointError(_explain_load_failure(path, e)) from e
    finally:
        if saved_env is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = saved_env


_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_BLOCKED_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) whose module \S+ is blocked")


def _weights_only_detail(e: BaseException) -> str:
    """The unpickler's own words, without torch's generic advice (which says to retry with weights_only=False)."""
    inner = e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else None
    text = str(inner) if inner is not None else str(e)
    if inner is None and "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    if inner is None:
        text = text.split("Check the documentation of torch.load", 1)[0]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _unpickling_error(
    path: Path, e: pickle.UnpicklingError, is_zip: bool, allowed: list[Any], allow_globals: tuple[str, ...]
) -> CheckpointError:
    detail = _printable(_weights_only_detail(e))
    full = f"{e}\n{e.__context__ or ''}"
    blocked = set(_BLOCKED_RE.findall(full))
    found = (_describe_unsafe(path) if is_zip else []) + _GLOBAL_RE.findall(full)
    named = [_printable(n) for n in dict.fromkeys(found)]
    already = set(allow_globals) | {_qualname(o) for o in allowed}
    wanted = [n for n in named if n not in already] or named
    if not named:
        # No global is involved: the pickle itself is not one torch.save writes (random bytes, a plain pickle,
        # a damaged file). There is nothing to allow; trusting it would not make it a checkpoint.
        return CheckpointError(f"{path} is not a torch checkpoint, or it is corrupt ({detail})")
    listed = ", ".join(wanted)
    never = [n for n in wanted if n in blocked]
    absent = [n for n in wanted if n not in never and not _module_exists(n)]
    if absent:
        # A name whose module does not exist here cannot be allowed (nor unpickled at all): a damaged name,
        # or a class from a package that is not installed.
        return CheckpointError(
            f"{path} wants Python objects that are not loaded by default: {listed}; "
            f"{', '.join(absent)} cannot be imported here, so the file is corrupt or needs a package that is "
            "not installed",
            hint="If the file is intact, install the package that defines them, then allow them with "
            "--allow-global pkg.mod.Name (or, only if you trust the file completely, --trust-checkpoint: full "
            "unpickling, runs code from the file).",
        )
    if never:
        return CheckpointError(
            f"{path} wants Python objects that are not loaded by default: {listed}. "
            f"{', '.join(never)} can run arbitrary code and is never allowed by the safe loader.",
            hint="This file is very likely malicious. Only if you trust it completely: --trust-checkpoint "
            "(full unpickling: runs code from the file).",
        )
    flags = " ".join(f"--allow-global {n}" for n in wanted)
    return CheckpointError(
        f"{path} wants Python objects that are not loaded by default: {listed}",
        hint=(
            f"Two ways in. If you know these classes, allow exactly them (only they are unpickled, nothing else): "
            f"{flags}\n"
            "Or, only if you trust the file completely: --trust-checkpoint (full unpickling: runs code from the file)."
        ),
    )


def _printable(text: str) -> str:
    """Names and messages from a file are shown escaped: no terminal control sequences from a checkpoint."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _module_exists(dotted: str) -> bool:
    """Whether `dotted` (pkg.mod.Name) can name something in this environment, decided without importing (running)
    anything new: modules already imported are looked into, others only located. True when unsure."""
    import importlib.util
    import sys
    import types

    parts = dotted.split(".")
    if not all(p.isidentifier() for p in parts):
        return False
    try:
        if parts[0] not in sys.modules:
            return importlib.util.find_spec(parts[0]) is not None
        obj: Any = sys.modules[parts[0]]
        for i, part in enumerate(parts[1:], start=1):
            if not isinstance(obj, types.ModuleType):
                return True  # an attribute of a class: do not evaluate anything
            if part in vars(obj):
                obj = vars(obj)[part]
                continue
            name = ".".join(parts[: i + 1])
            if name in sys.modules:
                obj = sys.modules[name]
                continue
            # The parent is imported, so locating the submodule runs no code; what lies inside it is not checked.
            return importlib.util.find_spec(name) is not None
        return True
    except (ImportError, ValueError, AttributeError):
        return False


def _explain_load_failure(path: Path, e: Exception) -> str:
    text = "\n".join(_printable(line) for line in str(e).strip().splitlines())
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    first = text.splitlines()[0].strip() if text else ""
    low = text.lower()
    if not first:  # e.g. EOFError() says nothing
        first = type(e).__name__
        low = first.lower()
    newer = re.search(r"file with version (\d+), but the maximum supported version for reading is (\d+)", text)
    if newer:
        return (
            f"{path} was written by a newer torch than this one (file format version {newer.group(1)}; "
            f"torch {_installed_torch()} reads up to version {newer.group(2)}). Upgrade torch to read it."
        )
    if "maximum supported version" in low or ("version" in low and "not supported" in low):
        return f"{path} was written by a newer torch than this one: {first}. Upgrade torch to read it."
    if "magic number" in low:
        return f"{path} is not a torch checkpoint (it has no torch.save header), or it is corrupt ({first})"
    if any(k in low for k in ("central directory", "zip archive", "failed reading", "eof", "pytorchstreamreader")):
        return f"{path} is truncated or corrupt ({first})"
    if "invalid load key" in low or "unpickling" in low or "pickle" in low:
        return f"{path} is not a torch checkpoint, or it is corrupt ({first})"
    what = first[:300] if first == type(e).__name__ else f"{type(e).__name__}: {first[:300]}"
    return f"{path} is corrupt or not a torch checkpoint ({what})"


def _installed_torch() -> str:
    import torch

    return str(torch.__version__)


def _is_tensor_mapping(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _hparams(value: Any) -> dict[str, Any]:
    """hyper_parameters as a dict of str keys: a dict, or a Namespace-like object (allowed with --allow-global);
    anything else (None, a tensor or list in a damaged file) gives no hyper-parameters."""
    import torch

    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(k, str)}
    if value is not None and not isinstance(value, (torch.Tensor, list, tuple, str, bytes, int, float)):
        try:
            return {k: v for k, v in vars(value).items() if isinstance(k, str)}
        except TypeError:
            return {}
    return {}


def _as_checkpoint(path: Path, obj: Any, hasher: _Hasher | None) -> Checkpoint:
    if isinstance(obj, dict) and "state_dict" in obj:
        sd = obj["state_dict"]
        if isinstance(sd, dict) and not sd:
            raise CheckpointError(f"{path}: its 'state_dict' entry is empty (no tensors to export)")
        if not _is_tensor_mapping(sd):
            raise CheckpointError(f"{path}: its 'state_dict' entry does not hold tensors")
        hparams = _hparams(obj.get("hyper_parameters"))
        return Checkpoint(path, obj, dict(sd), plain=False, hparams=hparams, _sha=hasher)
    if _is_tensor_mapping(obj):
        return Checkpoint(path, {"state_dict": obj}, dict(obj), plain=True, _sha=hasher)
    what = type(obj).__name__
    if isinstance(obj, dict):
        keys = _printable(", ".join(map(str, list(obj)[:8]))) or "nothing"
        raise CheckpointError(
            f"{path} holds a {what} without a 'state_dict' entry and is not a state dict of tensors (keys: {keys})"
        )
    raise CheckpointError(f"{path} holds a {what}, not a Lightning checkpoint or a state dict of tensors")
