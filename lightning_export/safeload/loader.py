"""Loading one torch.save file: weights_only with placeholders and --allow-global (`safe_load`), or full
unpickling for a file the user trusts (`trusted_load`), both under the integrity checks of `load_verified`."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..address_space import bounded, is_allocation_failure
from ..bounded import MAX_DEPTH
from ..errors import Advice, CheckpointError
from ..userpath import ensure_cwd_importable
from .archive import (
    DEFAULT_MAX_GROWTH,
    ZIP_MAGIC,
    check_file,
    check_tensors,
    read_archive,
    verify_storages,
)
from .messages import explain_load_failure, unpickling_error
from .placeholders import placeholder
from .policy import code_running, dtype_classes, import_dotted, qualname
from .references import reference_only, restore_references
from .subject import CHECKPOINT, Subject

# Address space torch.load may map beyond the file and its tensors (mmap'd file, Python objects, thread arenas).
UNPICKLE_SLACK = 256 << 20
# torch < 2.6 has published weights_only bypasses (CVE-2025-32434); untrusted loads refuse it.
MIN_TORCH_FOR_UNTRUSTED = (2, 6)


def _torch_version(text: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.6.0+cpu', '2.7.0a0+git1234' or '2.10.0.dev2025'."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def load_verified(
    path: Path,
    select: Callable[[Any], tuple[Any, Mapping[str, Any]]],
    *,
    trust: bool,
    allow_globals: tuple[str, ...],
    max_growth: float,
    on_checked: Callable[[], None] | None = None,
    subject: Subject = CHECKPOINT,
) -> Any:
    """One torch.save file under every check: a regular file, the zip directory before torch reads it, weights_only
    (with placeholders and --allow-global), mmap only when all storage records are stored; then `select(obj)` gives
    (result, tensors) and those tensors are proven to be the file's bytes (growth bound, CRC-32). Returns result.
    `on_checked` runs once the file is known to be a regular file (the hasher starts there). Every message names the
    file as `subject` says: a checkpoint, or a torch.save file given with a flag (`--data PATH`)."""
    file_size = check_file(path, subject)
    import torch

    if not trust and _torch_version(torch.__version__) < MIN_TORCH_FOR_UNTRUSTED:
        raise CheckpointError(
            subject.about(path, f"torch {torch.__version__} has known weights_only bypasses; refusing to open an "
                          f"untrusted {subject.noun}."),
            hint="Upgrade to torch >= 2.6, or pass --trust-checkpoint if you trust this file completely.",
        )
    allowed = [import_dotted(name) for name in allow_globals]  # a bad --allow-global fails before any work
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
    archive = read_archive(path, file_size, max_growth, subject) if is_zip else None
    mapped = archive is not None and archive.all_stored
    if on_checked is not None:
        on_checked()
    obj = load_file(path, trust=trust, allowed=allowed, allow_globals=allow_globals, mmap=mapped, is_zip=is_zip,
                    max_growth=max_growth, subject=subject)
    result, tensors = select(obj)
    storages = check_tensors(path, tensors, file_size=file_size, max_growth=max_growth, archive=archive,
                             subject=subject)
    if archive is not None:
        verify_storages(path, storages, archive, mapped=mapped, subject=subject)
    return result


def load_file(path: Path, *, trust: bool, allowed: list[Any], allow_globals: tuple[str, ...] = (),
              mmap: bool = False, is_zip: bool = True, max_growth: float = DEFAULT_MAX_GROWTH,
              subject: Subject = CHECKPOINT) -> Any:
    """The file's object: trusted_load when the user trusts it, safe_load otherwise."""
    if trust:
        return trusted_load(path, mmap=mmap, subject=subject)
    return safe_load(path, allowed=allowed, allow_globals=allow_globals, mmap=mmap, is_zip=is_zip,
                     max_growth=max_growth, subject=subject)


def trusted_load(path: Path, *, mmap: bool = False, subject: Subject = CHECKPOINT) -> Any:
    """The user said the file is trusted: full unpickling, which runs code from the file; the classes it names are
    imported from the project's root as with python -m."""
    import warnings

    import torch

    ensure_cwd_importable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # mmap reads a record's bytes where they lie in the file, whatever its compression flag says: only for
            # archives whose storage records are all stored uncompressed (torch inflates the others correctly).
            return torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{explain_load_failure(path, e, subject)} [loaded with --trust-checkpoint]") from e


@contextlib.contextmanager
def weights_only_enforced() -> Iterator[None]:
    """weights_only=True is always passed explicitly and never retried with False: an inherited
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off (torch honours that variable only when weights_only is not
    passed; it is also unset for the call, so a torch that behaved otherwise could not be talked into it either)."""
    saved_env = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        if saved_env is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = saved_env


def safe_load(path: Path, *, allowed: list[Any], allow_globals: tuple[str, ...] = (), mmap: bool = False,
              is_zip: bool = True, max_growth: float = DEFAULT_MAX_GROWTH, subject: Subject = CHECKPOINT) -> Any:
    """weights_only unpickling, with the classes of --allow-global (`allowed`, imported from `allow_globals`) and
    an inert placeholder for every other global the file names, unless one comes from a module that runs code."""
    kwargs: dict[str, Any] = {"map_location": "cpu", "mmap": mmap, "weights_only": True}
    # Keyed as torch keys them (module.qualname of the object) and by the name the user gave, which is the
    # name a pickle uses when a module re-exports the object (numpy.core.multiarray -> numpy._core...).
    safe: list[Any] = []
    restore = restore_references if any(reference_only(o, n) for o, n in zip(allowed, allow_globals)) else _same
    for obj, name in zip(allowed, allow_globals):
        stand_in = reference_only(obj, name)
        if stand_in is not None:  # a function the file may refer to, never call (torchmetrics' reducers)
            safe.extend({(stand_in, qualname(obj)), (stand_in, name)})
            continue
        safe.append(obj)
        if name != qualname(obj):
            safe.append((obj, name))
        safe.extend(dtype_classes(obj))
    # What the unpickler builds is bounded like the tensors: an allowlisted constructor that takes a size
    # (bytearray(3e9), torch.Tensor(3e9)) in a 2 kB file fails instead of allocating gigabytes.
    budget = int(path.stat().st_size * (1 + max_growth)) + UNPICKLE_SLACK
    try:
        with weights_only_enforced(), bounded(budget):
            try:
                return restore(_weights_only_load(path, safe, kwargs))
            except pickle.UnpicklingError as e:
                # Objects beyond what torch and --allow-global admit (hparams holding modules, partials, numpy
                # arrays): each becomes an inert placeholder, unless one of them comes from a module that runs code.
                unloaded = _unloaded_globals(path, safe) if is_zip else []
                if not unloaded or any(code_running(n) for n in unloaded):
                    raise
                try:
                    return restore(_weights_only_load(path, [*safe, *((placeholder(n), n) for n in unloaded)], kwargs))
                except pickle.UnpicklingError:
                    raise e from None
    except pickle.UnpicklingError as e:
        raise unpickling_error(path, e, is_zip, allowed, allow_globals, subject) from e
    except Exception as e:
        if is_allocation_failure(e):
            raise CheckpointError(
                f"{subject.name(path)}: unpickling it asks for more memory than {max_growth:g}x its size allows: an object in it "
                "(in hyper_parameters or elsewhere) is built with a huge size", advice=Advice.MAX_GROWTH) from e
        raise CheckpointError(explain_load_failure(path, e, subject)) from e


def _same(obj: Any) -> Any:
    return obj


def _unshadowed(obj: Any) -> Any:
    """`obj` with the instance attributes that shadow their type's own (an OrderedDict whose pickle BUILDs
    `items = None`, a tensor given `numel`) removed: every walk over the file's objects calls those methods, and data
    never needs such a name. Each container once, bounded by what the file holds; deeper than MAX_DEPTH is left to
    the walks that refuse it."""
    import torch

    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        v, depth = stack.pop()
        if id(v) in seen or depth > MAX_DEPTH or not isinstance(v, (dict, list, tuple, torch.Tensor)):
            continue
        seen.add(id(v))
        attrs = getattr(v, "__dict__", None) if isinstance(v, (dict, torch.Tensor)) else None
        if isinstance(attrs, dict):
            for name in [n for n in dict.keys(attrs) if isinstance(n, str) and hasattr(type(v), n)]:
                del attrs[name]
            stack.extend((c, depth + 1) for c in dict.values(attrs))
        if isinstance(v, dict):
            stack.extend((c, depth + 1) for c in dict.values(v))
        elif isinstance(v, (list, tuple)):
            stack.extend((c, depth + 1) for c in v)
    return obj


def _weights_only_load(path: Path, safe: list[Any], kwargs: dict[str, Any]) -> Any:
    import warnings

    import torch

    ctx = torch.serialization.safe_globals(safe) if safe else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        # torch warns about pickle protocols and legacy formats; the user gets one clear message instead.
        warnings.simplefilter("ignore")
        return _unshadowed(torch.load(str(path), **kwargs))


def _unloaded_globals(path: Path, safe: list[Any]) -> list[str]:
    """Every global the file's pickle names that torch and the user's --allow-global do not admit, read from its
    opcodes (not only the first one torch names), sorted."""
    import torch

    try:
        with torch.serialization.safe_globals(safe) if safe else contextlib.nullcontext():
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - an opcode the scanner does not know: no placeholders, the refusal stands
        return []
