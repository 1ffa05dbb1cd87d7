"""What a failed load says: the globals a file wants and how to allow them, or what kind of damage it has."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..text import printable
from .policy import allow_global_flag, hint_refusal, module_exists, py3_name, qualname
from .references import ReferenceCalled
from .subject import CHECKPOINT, Subject


def describe_unsafe(path: Path) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - best effort (legacy, non-zip files), only for the message
        return []


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


def _reference_called(e: BaseException) -> ReferenceCalled | None:
    """The ReferenceCalled behind torch's UnpicklingError (torch re-raises it with its own text), if any."""
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen and len(seen) < 16:
        if isinstance(cur, ReferenceCalled):
            return cur
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return None


def unpickling_error(
    path: Path, e: pickle.UnpicklingError, is_zip: bool, allowed: list[Any], allow_globals: tuple[str, ...],
    subject: Subject = CHECKPOINT,
) -> CheckpointError:
    detail = printable(_weights_only_detail(e))
    name = subject.name(path)
    full = f"{e}\n{e.__context__ or ''}"
    called = _reference_called(e)
    if called is not None:  # a function allowed only as a reference (torchmetrics' reducers), called by the file
        return CheckpointError(
            f"{name} calls {printable(called.name)} while loading: a {subject.noun} only refers to it (torchmetrics "
            "keeps it in a Metric's state), so lexport refuses the file",
            hint="This file is very likely malicious. Only if you trust it completely: --trust-checkpoint "
            "(full unpickling: runs code from the file).",
        )
    blocked = set(_BLOCKED_RE.findall(full))
    found = (describe_unsafe(path) if is_zip else []) + _GLOBAL_RE.findall(full)
    named = [printable(n) for n in dict.fromkeys(found)]
    already = set(allow_globals) | {qualname(o) for o in allowed}
    wanted = [n for n in named if n not in already] or named
    if not named:
        # No global is involved: the pickle itself is not one torch.save writes (random bytes, a plain pickle,
        # a damaged file). There is nothing to allow; trusting it would not make it a checkpoint.
        return CheckpointError(f"{name} is not a {subject.torch_noun}, or it is corrupt ({detail})")
    listed = ", ".join(wanted)
    # The same rule as --allow-global (decided without importing anything new): a name that could never be allowed
    # is never offered, and its presence says what the file is.
    reasons = {n: ("torch blocks its module" if n in blocked else hint_refusal(n)) for n in wanted}
    never = [n for n in wanted if reasons[n]]
    if never:
        why = "; ".join(
            f"{n}{'' if py3_name(n) == n else f' (that is {py3_name(n)})'}: {reasons[n]}" for n in never[:4]
        )
        return CheckpointError(
            f"{name} wants Python objects that are not loaded by default: {listed}. "
            f"{', '.join(never)} is never allowed: this file tries to run code ({why}).",
            hint="This file is very likely malicious. Only if you trust it completely: --trust-checkpoint "
            "(full unpickling: runs code from the file).",
        )
    absent = [n for n in wanted if not module_exists(n)]
    if absent:
        # A name whose module does not exist here cannot be allowed (nor unpickled at all): a damaged name,
        # or a class from a package that is not installed.
        return CheckpointError(
            f"{name} wants Python objects that are not loaded by default: {listed}; "
            f"{', '.join(absent)} cannot be imported here, so the file is corrupt or needs a package that is "
            "not installed",
            hint="If the file is intact, install the package that defines them, then allow them with "
            "--allow-global pkg.mod.Name (or, only if you trust the file completely, --trust-checkpoint: full "
            "unpickling, runs code from the file).",
        )
    return CheckpointError(
        f"{name} wants Python objects that are not loaded by default: {listed}",
        hint=(
            "Two ways in. If you know these classes, allow exactly them (only they are unpickled, nothing else):\n"
            f"{allow_global_flag(wanted)}\n"
            "Or, only if you trust the file completely: --trust-checkpoint (full unpickling: runs code from the file)."
        ),
    )


def explain_load_failure(path: Path, e: Exception, subject: Subject = CHECKPOINT) -> str:
    name = subject.name(path)
    text = "\n".join(printable(line) for line in str(e).strip().splitlines())
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    first = text.splitlines()[0].strip() if text else ""
    low = text.lower()
    if not first:  # e.g. EOFError() says nothing
        first = type(e).__name__
        low = first.lower()
    newer = re.search(r"file with version (\d+), but the maximum supported version for reading is (\d+)", text)
    if newer:
        return (
            f"{name} was written by a newer torch than this one (file format version {newer.group(1)}; "
            f"torch {_installed_torch()} reads up to version {newer.group(2)}). Upgrade torch to read it."
        )
    if "maximum supported version" in low or ("version" in low and "not supported" in low):
        return f"{name} was written by a newer torch than this one: {first}. Upgrade torch to read it."
    if "magic number" in low:
        return f"{name} is not a {subject.torch_noun} (it has no torch.save header), or it is corrupt ({first})"
    if any(k in low for k in ("central directory", "zip archive", "failed reading", "eof", "pytorchstreamreader")):
        return f"{name} is truncated or corrupt ({first})"
    if "invalid load key" in low or "unpickling" in low or "pickle" in low:
        return f"{name} is not a {subject.torch_noun}, or it is corrupt ({first})"
    what = first[:300] if first == type(e).__name__ else f"{type(e).__name__}: {first[:300]}"
    return f"{name} is corrupt or not a {subject.torch_noun} ({what})"


def _installed_torch() -> str:
    import torch

    return str(torch.__version__)
