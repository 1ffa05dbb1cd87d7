"""A bound on what one step may allocate: the process's address-space limit lowered for the duration of a block.

torch's weights_only unpickler builds only allowlisted objects, but some of them take a size: `bytearray(3e9)`,
`torch.Tensor(3e9)`. A 2 kB file can ask for gigabytes before any check on tensors runs. Counting what each
allowlisted constructor asks for would need a copy of the unpickler; the kernel counts it for free. Inside
`bounded(extra)` the soft RLIMIT_AS is the address space mapped now plus `extra`: an allocation beyond it fails with
MemoryError (or RuntimeError from torch's allocator), which the caller turns into its own error. The previous limit
is restored on exit. A no-op where the platform has no RLIMIT_AS (Windows), no /proc to read the mapped size from
(macOS), or its limit is already lower.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_lock = threading.Lock()  # nested or concurrent blocks: the first one's limit stands until it ends


def mapped_bytes() -> int | None:
    """The process's current virtual size (VmSize), or None where /proc is not there."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_allocation_failure(e: BaseException) -> bool:
    """MemoryError, or torch's allocator refusing (`DefaultCPUAllocator: can't allocate memory`)."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


@contextlib.contextmanager
def bounded(extra: int) -> Iterator[None]:
    """Allow at most `extra` more bytes of address space than the process maps now, until the block ends."""
    try:
        import resource
    except ImportError:  # Windows
        yield
        return
    now = mapped_bytes()
    if now is None or not _lock.acquire(blocking=False):
        yield
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = now + max(0, int(extra))
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft != resource.RLIM_INFINITY and soft <= cap:
            yield  # already bounded at least as tightly
            return
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    finally:
        _lock.release()
