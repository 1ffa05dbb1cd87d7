"""`aoti`: torch.export → torch._inductor.aoti_compile_and_package → `<stem>.aoti.pt2`, an AOTInductor package.

The package holds a shared library compiled by the system C++ compiler for this machine's CPU (its OS, architecture
and vector ISA, e.g. linux / x86_64 / AVX2; the report says which). It is loaded without Python by libtorch's
`torch::inductor::AOTIModelPackageLoader`, and in Python by `torch._inductor.aoti_load_package`, which is what
verifies it. Compiling takes tens of seconds.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..safeload.pt2 import check_pickles, weights_only_forced
from . import PRECISIONS, DynamicSupport, ExportContext, Format, Written, module_bytes, register
from ._containers import plain_outputs, report
from ._graph import check_program_dims, dynamic_info, dynamic_shapes_for, exporting, tail

# AOTInductor compiles dynamic dims for sizes >= 2 (its input checks refuse 1): verified from 2.
SUPPORT = DynamicSupport(min_size=2)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@contextlib.contextmanager
def _fresh_inductor_cache() -> Iterator[None]:
    """Compile in an empty inductor cache at a fixed path: a warm cache changes the packaged sources (inductor
    appends the compile commands it cached, with their temp paths), so the same export would give other bytes.
    One compile at a time per user (a lock), the cache emptied before each."""
    import fcntl
    import shutil
    import tempfile

    root = Path(tempfile.gettempdir()) / f"lexport-inductor-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = root / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
            shutil.rmtree(cache, ignore_errors=True)


def write(ctx: ExportContext, path: Path) -> Written:
    import torch

    if _compiler() is None:
        raise ExportError(
            "--to aoti compiles C++: no C++ compiler found (CXX, g++, c++, clang++)",
            hint="Install one (e.g. apt-get install g++) or set CXX.",
        )
    ex = ctx.inputs()
    with exporting(ctx) as chatter:
        dynamic = SUPPORT.applied(ctx.dynamic)
        with plain_outputs(ctx.target) as converted:
            program = torch.export.export(ctx.module(), ex.args, ex.kwargs or None,
                                          dynamic_shapes=dynamic_shapes_for(ctx, dynamic), strict=False)
        check_program_dims(program, dynamic, "aoti")
        started = time.perf_counter()
        try:
            with _fresh_inductor_cache():
                torch._inductor.aoti_compile_and_package(
                    program,
                    package_path=str(path),
                    # The Python API returns outputs in the module's structure; store which lexport wrote it.
                    inductor_configs={"aot_inductor.metadata": {"lexport": "1"}},
                )
        except Exception as e:
            detail = tail(chatter)
            raise ExportError(
                f"AOTInductor compilation failed: {type(e).__name__}: {str(e)[:2000]}",
                hint=f"Compiler output:\n{detail}" if detail else None,
                debug=True,
            ) from e
        compile_seconds = time.perf_counter() - started
    meta = _metadata(path)
    target = f"{meta.get('AOTI_DEVICE_KEY', 'cpu')} {meta.get('AOTI_PLATFORM', platform.system().lower())}/" + (
        f"{meta.get('AOTI_MACHINE', platform.machine())} {meta.get('AOTI_CPU_ISA', '')}".strip()
    )
    info = {
        "device": meta.get("AOTI_DEVICE_KEY", "cpu"),
        "platform": meta.get("AOTI_PLATFORM"),
        "machine": meta.get("AOTI_MACHINE"),
        "cpu_isa": meta.get("AOTI_CPU_ISA"),
        "compile_seconds": round(compile_seconds, 1),
        "compiler": _compiler(),
        "torch": torch.__version__,
        "shapes": "dynamic (dynamic_dims)" if ctx.dynamic is not None else "static (the example's)",
        **({"dynamic_dims": dynamic_info(dynamic)} if dynamic is not None else {}),
        "cpp_loader": "torch::inductor::AOTIModelPackageLoader",
    }
    container_notes, containers = report(converted)
    info.update(containers)
    notes = [*container_notes,
        f"compiled for {target} in {compile_seconds:.0f} s: load it on a machine of that kind with a libtorch of "
        f"the same version ({torch.__version__.split('+')[0]})"
    ]
    if ctx.dynamic is None:
        notes.append(
            "shapes are the example's; set AOTI_RUNTIME_CHECK_INPUTS=1 where it runs to have other shapes refused"
        )
    return Written("torch._inductor.aoti_compile_and_package", notes, info)


def _metadata(path: Path) -> dict[str, str]:
    import torch

    try:
        return dict(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(  # type: ignore[attr-defined]
            str(path), "model"))
    except Exception:  # noqa: BLE001 - metadata is for the report only
        return {}


class AotiRunner:
    """`aoti_load_package` with its shape checks on: a static package given another shape would otherwise run and
    return garbage of the compiled shape."""

    def __init__(self, path: Path) -> None:
        import torch

        # Read by the compiled library when it first runs (a static, per library); it only adds checks.
        os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
        # The package's own pickles (an exported program's sample inputs, pickled weights) weights-only, as for a
        # .pt2; its shared library is code, which loading runs (README: "Artifacts given to verify").
        check_pickles(path)
        with weights_only_forced():
            self.model = torch._inductor.aoti_load_package(str(path))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def load(path: Path) -> Any:
    return AotiRunner(path)


def size_estimate(ctx: ExportContext) -> int:
    """Weights (embedded in the library) plus the library itself and its C++ sources: 1.5 MB for a 1 kB model
    here; 16 MB of margin."""
    return module_bytes(ctx.target) + module_bytes(ctx.target) // 10 + (16 << 20)


register(
    Format(
        "aoti",
        ".aoti.pt2",
        "graph",
        "AOTInductor package (.aoti.pt2) compiled for this machine's CPU, loaded from C++ by AOTIModelPackageLoader",
        write,
        load,
        aliases=("aotinductor",),
        rank=70,
        atol=1e-5,
        rtol=1e-5,
        dynamic=SUPPORT,
        precisions=PRECISIONS,
        isolate=True,  # a shared library: a malformed one can crash the process that loads it
        size_estimate=size_estimate,
        sniff=lambda s: s.has_dir("aotinductor/"),
        sniff_order=10,
    )
)
