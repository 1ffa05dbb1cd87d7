"""The --allow-global policy: which globals a user may allow, and why a name from a file never can be.

The safe loader calls what --allow-global admits: a class is constructed (cls(*args) or cls.__new__), a function
is called with arguments chosen by the file. So only classes are admitted (and a short reviewed list of functions
that only rebuild or compute on data: numpy's reconstructors, torchmetrics' reducers), and none from a module whose
classes execute, import, open, load or spawn things when constructed (or whose functions do, for the hint). A deny-list
cannot be complete; the user who allows a class vouches for that class. Submodules are included."""

from __future__ import annotations

import re
import shlex
from typing import Any

from ..errors import UsageError
from ..userpath import ensure_cwd_importable

_NEVER_MODULES = frozenset(
    """
    builtins __builtin__ __main__ _imp imp importlib zipimport pkgutil runpy code codeop compileall py_compile
    site sysconfig ensurepip venv pip setuptools pkg_resources distutils
    os posix nt posixpath ntpath sys subprocess _posixsubprocess _winapi msvcrt winreg pty tty shutil platform
    signal _signal resource fcntl mmap select selectors atexit faulthandler gc inspect
    socket _socket socketserver ssl urllib http ftplib smtplib poplib imaplib nntplib telnetlib xmlrpc wsgiref
    webbrowser mailbox sqlite3 _sqlite3 dbm shelve tempfile zipfile tarfile gzip bz2 lzma io _io codecs
    pickle _pickle pickletools marshal copyreg copy_reg ctypes _ctypes cffi
    multiprocessing _multiprocessing concurrent threading _thread asyncio sched types operator _operator
    pydoc timeit pdb bdb trace tracemalloc doctest unittest logging cmd readline rlcompleter
    yaml _yaml dill cloudpickle joblib IPython fsspec h5py smart_open
    numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib numpy.lib.format numpy.lib._format_impl
    numpy.lib.npyio numpy.lib._npyio_impl numpy.lib._datasource numpy.lib.utils numpy.lib._utils_impl
    numpy.core.memmap numpy._core.memmap numpy._pytesttester pandas.io
    torch._C torch.jit torch._jit_internal torch.hub torch.package torch.serialization torch.utils.cpp_extension
    torch.utils.tensorboard torch.utils.benchmark torch.utils.bottleneck torch.utils.collect_env torch.testing
    torch.classes torch.ops torch._ops torch.library torch._library torch.multiprocessing torch.distributed
    torch._dynamo torch._inductor torch.compiler torch.fx torch.export torch._export torch.onnx
    lightning.pytorch.cli pytorch_lightning.cli lightning.fabric.cli jsonargparse
    numpy.load numpy.fromfile numpy.loadtxt numpy.genfromtxt numpy.memmap numpy.save numpy.savez numpy.savetxt
    torch.load torch.save torch.utils.model_zoo hydra.utils hydra._internal.instantiate hydra._internal.utils
    pandas.read_pickle pandas.read_csv pandas.read_table pandas.read_parquet pandas.read_json pandas.read_hdf
    pandas.read_feather pandas.read_excel pandas.read_sql pandas.read_html pandas.read_xml pandas.read_orc
    pandas.read_sas pandas.read_spss pandas.read_stata pandas.read_fwf pandas.read_clipboard pandas.to_pickle
    """.split()
)


# Functions and methods of pathlib (Path.write_text, Path.unlink, ...) touch the file system; its classes do not.
_NEVER_FUNCTIONS_OF = frozenset({"pathlib"})


# Functions that only rebuild plain data, admitted although they are not classes: numpy pickles its arrays and
# scalars through them. _reconstruct(subtype, shape, dtype) makes an empty array of an ndarray subclass (it refuses
# other types); scalar(dtype, bytes) makes a numpy scalar from raw bytes (object dtype: returns the object it is
# given, which the loader had to admit already). Neither imports, opens or calls anything else.
_SAFE_FUNCTIONS = frozenset(
    f"{m}.{f}" for m in ("numpy.core.multiarray", "numpy._core.multiarray") for f in ("_reconstruct", "scalar")
)


# torchmetrics' reduction functions, which a pickled torchmetrics.Metric refers to (torchmetrics 1.9: add_state's
# dist_reduce_fx "sum", "mean", "cat", "max", "min" in Metric._reductions, and Metric.distributed_available_fn).
# Each only computes on the tensors it is given (torch.sum/mean/cat/max/min along dim 0) or reads whether
# torch.distributed is initialized; none imports, opens or calls anything the file names. A Metric's pickle only
# refers to them, never calls them: the loader hands the unpickler stand-ins that refuse to be called while loading
# and puts the real functions in their place afterwards (safeload/references.py), so a file cannot make lexport
# sum or concatenate tensors of its choosing (a stride-0 view claiming 10^12 elements) while loading.
REFERENCE_FUNCTIONS = frozenset(
    [f"torchmetrics.utilities.data.dim_zero_{r}" for r in ("sum", "mean", "cat", "max", "min")]
    + ["torchmetrics.metric.jit_distributed_available"]
)


_CLASS_NAME_RE = re.compile(r"_*[A-Z][A-Za-z0-9_]*")


def blocked_module(dotted: str) -> str | None:
    """The blocked module that `dotted` (a module, or module.attr) lies in, if any."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in _NEVER_MODULES:
            return prefix
    if parts[0] in _NEVER_FUNCTIONS_OF and len(parts) > 1 and not parts[-1][:1].isupper():
        return parts[0]
    return None


def _dangerous_base(cls: type) -> str | None:
    """A class that opens files, sockets, processes or threads when constructed, even from an allowed module.
    Only bases from modules already imported are looked at (nothing is imported for the check)."""
    import sys

    for mod, name in (("io", "IOBase"), ("subprocess", "Popen"), ("threading", "Thread"), ("socket", "socket"),
                      ("logging", "Handler"), ("multiprocessing.process", "BaseProcess"), ("ctypes", "CDLL"),
                      ("zipfile", "ZipFile"), ("tarfile", "TarFile"), ("tempfile", "TemporaryDirectory")):
        base = getattr(sys.modules.get(mod), name, None)
        if isinstance(base, type):
            try:
                if issubclass(cls, base):
                    return f"{mod}.{name}"
            except TypeError:
                continue
    return None


def py3_name(name: str) -> str:
    """The name a protocol-2 pickle's GLOBAL resolves to: pickle writes Python 2 module names for some modules
    (subprocess.call is written as commands.call) and maps them back when loading."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        return ".".join(_compat_pickle.NAME_MAPPING[(module, attr)])
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}" if module else name


def _refusal(name: str, obj: Any = None, *, resolved: bool = False) -> str | None:
    """Why `name` (resolving to `obj` when `resolved`) may never be allowed; None when it may."""
    name = py3_name(name)
    if name in _SAFE_FUNCTIONS or name in REFERENCE_FUNCTIONS:
        return None
    last = name.rpartition(".")[2]
    if resolved:
        real = f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', '?')}"
        if real in _SAFE_FUNCTIONS or real in REFERENCE_FUNCTIONS:
            return None
        if not isinstance(obj, type):
            kind = type(obj).__name__
            what = ("a builtin function" if kind == "builtin_function_or_method" else "a function"
                    if callable(obj) else f"a {kind}")
            return f"{last} is {what}, not a class; allowing it would let the file run code"
    where = blocked_module(name) or (resolved and blocked_module(str(getattr(obj, "__module__", "") or "")))
    if where:
        return f"{name} comes from {where}, whose objects can run commands, import code or open files"
    if not resolved:
        if _CLASS_NAME_RE.fullmatch(last) and any(c.islower() for c in last):
            return None
        return f"{last} is not a class name (only classes can be allowed)"
    base = _dangerous_base(obj)
    if base:
        return f"{name} is a {base}: constructing it opens files, sockets, processes or threads"
    return None


def import_dotted(name: str) -> Any:
    """The object an --allow-global flag names, if it may be allowed (a class, see _refusal); UsageError if not.
    A name refused by its module alone is refused without importing anything."""
    import importlib

    parts = name.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise UsageError(f"--allow-global {name!r} must be a dotted path such as 'pkg.mod.Name'")
    hint = "Allow only classes that you know; --trust-checkpoint is the way in for a file you trust completely."
    ensure_cwd_importable()  # a project's own classes (src.models...) from its root, as with python -m
    if blocked_module(py3_name(name)):
        raise UsageError(f"--allow-global {name}: never allowed: {hint_refusal(name)}", hint=hint)
    obj: Any = None
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module: pkg.mod.Outer.Inner works too
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
            break
        except ModuleNotFoundError as e:
            if i == 1 or e.name != module_name:
                raise UsageError(f"--allow-global {name!r} cannot be imported: {e}") from e
        except ImportError as e:
            raise UsageError(f"--allow-global {name!r} cannot be imported: {e}") from e
    try:
        for part in parts[i:]:
            obj = getattr(obj, part)
    except AttributeError as e:
        raise UsageError(f"--allow-global {name!r} cannot be imported: {e}") from e
    why = _refusal(name, obj, resolved=True)
    if why:
        raise UsageError(f"--allow-global {name}: never allowed: {why}", hint=hint)
    return obj


def hint_refusal(name: str) -> str | None:
    """_refusal for a name from a file, decided without importing anything new: modules already imported are
    looked into; otherwise the module rule and the CapWords convention for class names decide."""
    import sys
    import types

    parts = py3_name(name).split(".")
    if not all(p.isidentifier() for p in parts):
        return "it is not a valid dotted name"
    obj: Any = sys.modules.get(parts[0])
    i = 1
    while isinstance(obj, types.ModuleType) and i < len(parts):
        sub = ".".join(parts[: i + 1])
        if parts[i] in vars(obj):
            obj = vars(obj)[parts[i]]
        elif sub in sys.modules:
            obj = sys.modules[sub]
        else:
            obj = None
        i += 1
    if obj is None or isinstance(obj, types.ModuleType):
        return _refusal(name)
    while i < len(parts):  # an attribute of a class (a nested class): look, do not evaluate descriptors
        obj = vars(obj).get(parts[i]) if hasattr(obj, "__dict__") else None
        if obj is None:
            return _refusal(name)
        i += 1
    return _refusal(name, obj, resolved=True)


def allow_global_flag(names: list[str]) -> str:
    """Every name on one line, sorted, as one shell word: pasted whole, it needs no second round. Only names that
    --allow-global accepts are offered: dotted identifiers (nothing a shell would expand) that pass its rule."""
    offered = sorted({n for n in names if all(p.isidentifier() for p in n.split(".")) and not hint_refusal(n)})
    return "--allow-global " + shlex.quote(",".join(offered)) if offered else ""


def code_running(name: str) -> bool:
    """A global from a module whose objects run commands, import code or open files (or that torch blocks)."""
    try:
        from torch._weights_only_unpickler import _blocklisted_modules
    except ImportError:  # pragma: no cover - a torch that moved it: lexport's own list still applies
        _blocklisted_modules = []
    module = py3_name(name).rpartition(".")[0]
    return bool(blocked_module(py3_name(name))) or module.split(".")[0] in _blocklisted_modules


def module_exists(dotted: str) -> bool:
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


def dtype_classes(obj: Any) -> list[Any]:
    """Allowing numpy.dtype admits its per-dtype classes too (numpy.dtypes.Float64DType, ...): a pickle names only
    numpy.dtype, but what it builds is an instance of one of them, which torch checks again. Without this, each
    dtype class is named by torch only once the previous ones are allowed, one round at a time."""
    import sys

    np = sys.modules.get("numpy")
    if np is None or obj is not getattr(np, "dtype", None):
        return []
    dtypes = getattr(np, "dtypes", None)
    return [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)] if dtypes else []


def qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"
