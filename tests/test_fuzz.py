"""Property-based fuzzing of the checkpoint reader.

Real checkpoints are truncated, bit-flipped and spliced; for every mutation lexport must end cleanly: an exit code
from the documented set (a flipped byte inside tensor data is still a valid checkpoint, so 0 is fine), never 70,
never a traceback, nothing partial in the output directory, the input unchanged. In-process (invoke) and bounded
so the whole file runs in well under a minute.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import os
import random
import resource
import struct
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import hostile as H
import hostile_pickle as P
import pytest
import torch
from conftest import invoke
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6}
FUZZ_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Source:
    name: str
    data: bytes
    pickle_span: tuple[int, int]  # where the pickle (hyper_parameters, tensor metadata) lives in the file


def _zip_member_span(data: bytes, suffix: str) -> tuple[int, int]:
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[off + 26 : off + 30])
    start = off + 30 + name_len + extra_len
    return start, start + info.compress_size


@pytest.fixture(scope="module")
def sources(ckpts: dict, tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    """A Lightning checkpoint, a plain state dict, and a legacy (pre-zip) torch.save file."""
    tmp = tmp_path_factory.mktemp("fuzz-sources")
    lightning = Path(ckpts["classifier"]).read_bytes()
    sd = torch.load(str(ckpts["classifier"]), weights_only=True)["state_dict"]
    plain_path, legacy_path = tmp / "plain.pt", tmp / "legacy.pt"
    torch.save(sd, str(plain_path))
    torch.save({"state_dict": sd, "epoch": 1, "hyper_parameters": {"input_size": 10, "hidden_size": 20,
                                                                   "num_classes": 2}},
               str(legacy_path), _use_new_zipfile_serialization=False)
    plain, legacy = plain_path.read_bytes(), legacy_path.read_bytes()
    return [
        Source("lightning", lightning, _zip_member_span(lightning, "/data.pkl")),
        Source("plain", plain, _zip_member_span(plain, "/data.pkl")),
        Source("legacy", legacy, (0, min(len(legacy), 2048))),
    ]


def _mutate(draw, sources: list[Source]) -> tuple[str, bytes]:
    src = draw(st.sampled_from(sources))
    data = bytearray(src.data)
    kind = draw(st.sampled_from(["truncate", "flip", "flip-pickle", "splice", "join", "zero-run"]))
    n = len(data)
    if kind == "truncate":
        cut = draw(st.integers(0, n - 1))
        return f"{src.name}:truncate@{cut}", bytes(data[:cut])
    if kind in ("flip", "flip-pickle"):
        lo, hi = (0, n - 1) if kind == "flip" else (src.pickle_span[0], src.pickle_span[1] - 1)
        flips = draw(st.lists(st.tuples(st.integers(lo, hi), st.integers(1, 255)), min_size=1, max_size=8))
        for pos, mask in flips:
            data[pos] ^= mask
        return f"{src.name}:{kind}{flips}", bytes(data)
    if kind == "zero-run":
        start = draw(st.integers(0, n - 1))
        length = draw(st.integers(1, 512))
        data[start : start + length] = bytes(len(data[start : start + length]))
        return f"{src.name}:zero-run@{start}+{length}", bytes(data)
    other = draw(st.sampled_from(sources)).data
    if kind == "splice":  # overwrite a run with bytes from elsewhere (same or another file)
        a = draw(st.integers(0, len(other) - 1))
        length = draw(st.integers(1, 1024))
        chunk = other[a : a + length]
        at = draw(st.integers(0, n - 1))
        data[at : at + len(chunk)] = chunk
        return f"{src.name}:splice@{at}<-{a}+{len(chunk)}", bytes(data)
    # join: the head of one file and the tail of another
    i = draw(st.integers(0, n))
    j = draw(st.integers(0, len(other)))
    return f"{src.name}:join@{i}+{j}", bytes(data[:i]) + other[j:]


def _ended_cleanly(res, label: str, d: Path, path: Path, digest: str) -> None:
    """A documented exit code, one error message and no traceback; the state dict published only on exit 0,
    nothing else in the output dir; the input unchanged."""
    out = d / "out"
    assert res.code in DOCUMENTED, (label, res)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, (label, res)
    assert "internal error" not in res.stderr, (label, res)
    if res.code != 0:
        assert res.stderr.count("error (") >= 1, (label, res)
    produced = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert produced == (["fuzzed.pt"] if res.code == 0 else []), (label, res, produced)
    assert sorted(p.name for p in (d / "in").iterdir()) == ["fuzzed.ckpt"], label
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{label}: the input was modified"


def _run_one(args_for, label: str, blob: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="lexport-fuzz-") as d:
        d = Path(d)
        (d / "in").mkdir()
        path = d / "in" / "fuzzed.ckpt"
        path.write_bytes(blob)
        digest = hashlib.sha256(blob).hexdigest()
        out = d / "out"
        res = invoke(path, *args_for(out))
        _ended_cleanly(res, label, d, path, digest)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_checkpoints_fail_cleanly(sources: list[Source], data: st.DataObject) -> None:
    """Weights only (no user code): the reader, the checks and the state-dict writer with verification."""
    label, blob = _mutate(data.draw, sources)
    _run_one(lambda out: ("--to", "state-dict", "--output-dir", out), label, blob)


@settings(FUZZ_SETTINGS, max_examples=40)
@given(data=st.data())
def test_fuzzed_checkpoints_with_module_fail_cleanly(sources: list[Source], data: st.DataObject) -> None:
    """Building the module from fuzzed hyper_parameters and tensor metadata: exit 3 or 4, never a crash."""
    label, blob = _mutate(data.draw, sources[:1] + sources[2:])
    _run_one(
        lambda out: ("--module", "fixtures.modules:MyClassifierModule", "--attr", "model", "--to", "state-dict",
                     "--output-dir", out),
        label,
        blob,
    )


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4, 22, 100, 512, -1, -22, -100])
def test_truncation_points(sources: list[Source], cut: int) -> None:
    """The corners hypothesis may miss: a few bytes, a lone zip magic, and cuts inside the zip directory."""
    for src in sources:
        blob = src.data[:cut] if cut >= 0 else src.data[:cut]
        _run_one(lambda out: ("--to", "state-dict", "--output-dir", out), f"{src.name}:cut{cut}", blob)


# ===================================================================================================================
# Fuzzing pickle *structures*, not only bytes.
#
# Each example is a checkpoint whose data.pkl is written opcode by opcode from a hypothesis strategy
# (tests/hostile_pickle.py Ops): shared and self references, depth up to 10**5, declared storage sizes vs record sizes, tensor sizes, strides
# and offsets, odd key types, BUILD on tensors and OrderedDicts, allowed globals called with garbage and disallowed
# globals that would create a marker file. The zip around it is real (zipfile: correct CRCs; records sometimes
# deflated). Run in-process, each example must end with a documented code, no traceback, within PER_EXAMPLE_SECONDS,
# nothing partial left, the input unchanged, the payload never run; and when it exits 0 without a module, the
# published state dict must hold exactly what torch.load(mmap=False) reads from the file.
#
# LEXPORT_FUZZ_EXAMPLES sets the number of examples (default 60; `make fuzz` runs 5000).
# ===================================================================================================================
PICKLE_EXAMPLES = int(os.environ.get("LEXPORT_FUZZ_EXAMPLES", "60"))
PER_EXAMPLE_SECONDS = float(os.environ.get("LEXPORT_FUZZ_SECONDS", "20"))
HARD_KILL_SECONDS = 180  # a hung example dumps every thread's stack and ends the run instead of hanging it
AS_HEADROOM = 3 << 30  # address space an example may add to the test process (a multi-GB allocation fails)

STORAGES = [("FloatStorage", 4), ("DoubleStorage", 8), ("HalfStorage", 2), ("BFloat16Storage", 2),
            ("LongStorage", 8), ("IntStorage", 4), ("ShortStorage", 2), ("CharStorage", 1), ("ByteStorage", 1),
            ("BoolStorage", 1), ("ComplexFloatStorage", 8), ("QInt8Storage", 1)]
BIG = [10**6, 2**31 - 1, 2**31, 2**32 + 1, 10**12, 2**62, 2**63 - 1]
ALLOWED_CALLS = [  # allowed by weights_only, called with garbage or with sense
    ("collections", "OrderedDict", ()),
    ("collections", "OrderedDict", ([1, 2],)),
    ("collections", "Counter", ("abc",)),
    ("torch._utils", "_rebuild_tensor_v2", (1, 2, 3)),
    ("torch._utils", "_rebuild_tensor_v2", ()),
    ("torch._utils", "_rebuild_parameter", (1, True, {})),
    ("torch", "Size", ([1, 2, 3],)),
    ("torch", "Size", ([10**12, -1],)),
    ("torch", "device", ("meta",)),
    ("torch", "device", ("cuda:7",)),
    ("builtins", "set", ([1, 2],)),
    ("builtins", "complex", (1.0, float("nan"))),
    ("builtins", "bytearray", (10**3,)),
    ("_codecs", "encode", ("x" * 100, "latin1")),
    ("torch.serialization", "_get_layout", ("torch.sparse_coo",)),
]
DISALLOWED = ["subprocess.call", "subprocess.Popen", "os.system", "posix.system", "builtins.eval", "builtins.exec",
              "builtins.open", "numpy.testing._private.utils.runstring", "shutil.copyfile", "runpy.run_path"]
ODD_STRINGS = ["", "model.fc1.weight", "é\u202e", "a" * 300, "../../etc/passwd", "state_dict", "class_path",
               "\x00", "\ud800"]


class _Ctx:
    def __init__(self, draw, marker: Path) -> None:
        self.draw, self.marker = draw, marker
        self.done: list[int] = []  # memo indices of finished objects
        self.open: list[int] = []  # containers under construction (a GET of one is a cycle)
        self.tensors: list[int] = []
        self.next_base = 50_000_000
        self.features: set[str] = set()

    def base(self) -> int:
        self.next_base += 10_000_000
        return self.next_base


def _emit_scalar(c: _Ctx, o: P.Ops) -> None:
    kind = c.draw(st.sampled_from(["int", "bigint", "float", "str", "none", "bool", "bytes"]))
    if kind == "int":
        o.int(c.draw(st.integers(-(2**31), 2**31 - 1)))
    elif kind == "bigint":
        o.int(c.draw(st.sampled_from(BIG + [-(2**70), 2**200])))
    elif kind == "float":
        o.float(c.draw(st.floats(allow_nan=True, allow_infinity=True)))
    elif kind == "str":
        o.str(c.draw(st.sampled_from(ODD_STRINGS) | st.text(max_size=12)))
    elif kind == "bytes":
        o.bytes_(c.draw(st.binary(max_size=20)))
    elif kind == "none":
        o.none()
    else:
        o.bool(c.draw(st.booleans()))


def _emit_key(c: _Ctx, o: P.Ops) -> None:
    kind = c.draw(st.sampled_from(["str", "str", "int", "none", "float", "tuple", "bool", "ref"]))
    if kind == "str":
        o.str(c.draw(st.sampled_from(ODD_STRINGS) | st.text(max_size=8)))
    elif kind == "int":
        o.int(c.draw(st.integers(-5, 2**40)))
    elif kind == "none":
        o.none()
    elif kind == "float":
        o.float(c.draw(st.sampled_from([0.5, float("nan"), float("inf")])))
    elif kind == "bool":
        o.bool(c.draw(st.booleans()))
    elif kind == "tuple":
        o.mark().int(1).str("a").tuple()
    else:  # a reference as a key: unhashable when it is a list/dict
        c.features.add("ref-key")
        _emit_ref(c, o)


def _emit_ref(c: _Ctx, o: P.Ops) -> None:
    pool = c.done + c.open + c.tensors
    if not pool:
        o.none()
        return
    idx = c.draw(st.sampled_from(pool))
    if idx in c.open:
        c.features.add("cycle")
    else:
        c.features.add("shared")
    o.get(idx)


def _emit_value(c: _Ctx, o: P.Ops, depth: int) -> None:
    kinds = ["scalar", "scalar", "ref"]
    if depth < 4:
        kinds += ["list", "dict", "tuple", "odict", "selfref", "deep", "chain", "call", "evil", "class_path",
                  "build-odict", "build-tensor"]
    kind = c.draw(st.sampled_from(kinds))
    n = c.draw(st.integers(0, 4)) if kind in ("list", "dict", "tuple", "odict") else 0
    if kind == "scalar":
        _emit_scalar(c, o)
    elif kind == "ref":
        _emit_ref(c, o)
    elif kind in ("list", "selfref"):
        o.empty_list()
        idx = o.put()
        c.open.append(idx)
        o.mark()
        for _ in range(n):
            _emit_value(c, o, depth + 1)
        if kind == "selfref":
            c.features.add("cycle")
            o.get(idx)
        o.appends()
        c.open.pop()
        c.done.append(idx)
    elif kind in ("dict", "odict"):
        o.ordered_dict() if kind == "odict" else o.empty_dict()
        idx = o.put()
        c.open.append(idx)
        o.mark()
        for _ in range(n):
            _emit_key(c, o)
            _emit_value(c, o, depth + 1)
        o.setitems()
        c.open.pop()
        c.done.append(idx)
    elif kind == "tuple":
        o.mark()
        for _ in range(n):
            _emit_value(c, o, depth + 1)
        o.tuple()
        c.done.append(o.put())
    elif kind == "deep":
        d = c.draw(st.sampled_from([2, 100, 1000, 5000, 30_000, 100_000]))
        c.features.add(f"deep{d}")
        o.extend(P.nested_lists(d) if c.draw(st.booleans()) else P.nested_dicts(d))
    elif kind == "chain":
        levels = c.draw(st.integers(1, 80))
        c.features.add("shared-chain" if levels < 30 else "shared-chain-30+")
        o.extend(P.shared_refs(levels, memo_base=c.base()))
    elif kind == "call":
        module, name, args = c.draw(st.sampled_from(ALLOWED_CALLS))
        c.features.add(f"call:{module}.{name}")
        o.extend(_call(module, name, args, c))
    elif kind == "evil":
        name = c.draw(st.sampled_from(DISALLOWED))
        module, qual, args = H.payloads(c.marker)[name]
        c.features.add("evil")
        o.extend(_call(module, qual, args, c))
    elif kind == "class_path":  # LightningCLI-style: must never be imported
        target = c.draw(st.sampled_from(["os.system", "subprocess.Popen", "fixtures.modules.MyClassifierModule",
                                         "builtins.eval", "no.such.Class"]))
        o.empty_dict().mark().str("class_path").str(target).str("init_args").empty_dict()
        o.mark().str("command").str(f"touch {c.marker}").setitems().setitems()
        c.features.add("class_path")
    elif kind == "build-odict":  # instance attributes that shadow OrderedDict methods
        c.features.add("build-odict")
        o.ordered_dict().empty_dict().mark()
        for attr in c.draw(st.lists(st.sampled_from(["items", "keys", "values", "get", "copy", "__len__"]),
                                    min_size=1, max_size=3)):
            o.str(attr)
            _emit_scalar(c, o)
        o.setitems().build()
    else:  # build-tensor: BUILD on a tensor calls tensor.set_(*state)
        if not c.tensors:
            o.none()
            return
        c.features.add("build-tensor")
        o.get(c.draw(st.sampled_from(c.tensors))).mark()
        for _ in range(c.draw(st.integers(0, 4))):
            o.int(c.draw(st.sampled_from([0, 1, 3, -1, 10**12])))
        o.tuple().build()


def _call(module: str, name: str, args: tuple, c: _Ctx) -> bytes:
    frag = P.Ops(c.base())
    frag.global_(module, name).mark()
    for a in args:
        P.push_plain(frag, a)
    frag.tuple().reduce()
    return bytes(frag.b)


def _emit_tensor(c: _Ctx, o: P.Ops, storages: list[tuple[str, str, int, int]]) -> None:
    key, stype, itemsize, numel = c.draw(st.sampled_from(storages))
    ndim = c.draw(st.integers(0, 3))
    dims = st.integers(0, 6) | st.sampled_from([0, 1, 10**6, 10**12, -1, 2**62])
    size = c.draw(st.lists(dims, min_size=ndim, max_size=ndim))
    natural = []
    acc = 1
    for d in reversed(size):
        natural.insert(0, acc)
        acc *= max(d, 1)
    stride_kind = c.draw(st.sampled_from(["natural", "natural", "zero", "random", "wrong-length"]))
    if stride_kind == "natural":
        stride = natural
    elif stride_kind == "zero":
        stride = [0] * ndim
        c.features.add("stride0")
    elif stride_kind == "random":
        stride = c.draw(st.lists(st.sampled_from([0, 1, 2, 7, -1, 10**12]), min_size=ndim, max_size=ndim))
    else:
        stride = c.draw(st.lists(st.integers(0, 5), max_size=4))
    offset = c.draw(st.integers(0, 8) | st.sampled_from([-1, 10**12, 2**62]))
    o.tensor(key, stype, numel, offset, size, stride, requires_grad=c.draw(st.booleans()))
    c.tensors.append(o.put())


def _draw_pickle_checkpoint(draw, marker: Path) -> tuple[str, bytes, dict[str, bytes], bool, set[str]]:
    """(label, data.pkl, {storage key: record bytes}, deflate, features)."""
    c = _Ctx(draw, marker)
    rng = random.Random(draw(st.integers(0, 2**32)))
    # storages: declared numel vs record size
    storages = []
    records: dict[str, bytes] = {}
    for i in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from([str(i), str(i), f"{i}/../../x", f"k{i}"]))
        stype, itemsize = draw(st.sampled_from(STORAGES))
        numel = draw(st.integers(0, 64) | st.sampled_from(BIG + [-1]))
        exact = numel * itemsize
        rec = draw(st.sampled_from(["exact", "exact", "short", "long", "missing", "empty"]))
        if rec == "exact" and 0 <= exact <= 1 << 16:
            records[key] = rng.randbytes(exact)
        elif rec == "short":
            records[key] = rng.randbytes(draw(st.integers(0, max(0, min(exact, 1 << 12) - 1))))
            c.features.add("record-short")
        elif rec == "long":
            records[key] = rng.randbytes(max(exact, 0) % (1 << 12) + draw(st.integers(1, 4096)))
            c.features.add("record-long")
        elif rec == "empty":
            records[key] = b""
        else:
            c.features.add("record-missing")
        if numel in BIG:
            c.features.add("declared-big")
        storages.append((key, stype, itemsize, numel))

    o = P.Ops(proto=True)
    o.empty_dict()
    top = o.put()
    c.open.append(top)
    o.mark()
    for field_name in ("epoch", "global_step", "pytorch-lightning_version"):
        if draw(st.integers(0, 4)):
            o.str(field_name)
            if draw(st.integers(0, 3)):
                o.str("2.6.6") if field_name.startswith("pytorch") else o.int(draw(st.integers(0, 10**6)))
            else:
                _emit_scalar(c, o)
    # state_dict: an OrderedDict (usually), a dict, or something else entirely
    sd_kind = draw(st.sampled_from(["odict", "odict", "dict", "list", "missing", "honest"]))
    if sd_kind != "missing":
        o.str("state_dict")
        if sd_kind == "list":
            o.empty_list().mark()
            for _ in range(draw(st.integers(0, 3))):
                if storages:
                    _emit_tensor(c, o, storages)
            o.appends()
        elif sd_kind == "honest":  # real weights in a hand-written pickle: exit 0 is possible
            c.features.add("honest")
            o.ordered_dict().mark()
            for j, (k, t) in enumerate(H.classifier_state_dict(seed=draw(st.integers(0, 3))).items()):
                skey = f"h{j}"
                o.str(k).tensor(skey, "FloatStorage", t.numel(), 0, tuple(t.shape), t.stride())
                c.tensors.append(o.put())
                records[skey] = t.numpy().tobytes()
            o.setitems()
        else:
            o.ordered_dict() if sd_kind == "odict" else o.empty_dict()
            sd = o.put()
            c.open.append(sd)
            o.mark()
            for j in range(draw(st.integers(0, 5))):
                entry = draw(st.sampled_from(["tensor", "tensor", "tensor", "tied", "odd-key", "not-tensor"]))
                if entry == "odd-key":
                    _emit_key(c, o)
                else:
                    o.str(f"layer{j}.weight")
                if entry == "tied" and c.tensors:
                    c.features.add("tied")
                    o.get(draw(st.sampled_from(c.tensors)))
                elif entry == "not-tensor":
                    _emit_value(c, o, 3)
                elif storages:
                    _emit_tensor(c, o, storages)
                else:
                    o.none()
            o.setitems()
            c.open.pop()
            c.done.append(sd)
    if draw(st.integers(0, 5)):
        o.str("hyper_parameters")
        hp_kind = draw(st.sampled_from(["dict", "dict", "value"]))
        if hp_kind == "dict":
            o.empty_dict()
            hp = o.put()
            c.open.append(hp)
            o.mark()
            for name, val in H.CLASSIFIER_HPARAMS.items():
                if draw(st.integers(0, 3)):
                    o.str(name)
                    o.int(val) if draw(st.integers(0, 3)) else _emit_value(c, o, 2)
            for _ in range(draw(st.integers(0, 3))):
                _emit_key(c, o)
                _emit_value(c, o, 0)
            o.setitems()
            c.open.pop()
        else:
            _emit_value(c, o, 0)
    for _ in range(draw(st.integers(0, 2))):
        o.str(draw(st.sampled_from(["hparams_name", "optimizer_states", "loops", "payload", "callbacks"])))
        _emit_value(c, o, 1)
    o.setitems()
    pkl = o.stop()
    deflate = draw(st.integers(0, 4)) == 0
    if deflate:
        c.features.add("deflated")
    label = f"{sd_kind} storages={[(k, t, n) for k, t, _, n in storages]} features={sorted(c.features)}"
    return label, pkl, records, deflate, c.features


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# Counts over every example run (hypothesis's own replays included); printed once the module's tests are done.
_STATS: dict = {"codes": Counter(), "slowest": (0.0, ""), "features": Counter(), "oracle": Counter()}


@pytest.fixture(scope="module", autouse=True)
def _pickle_fuzz_report(request: pytest.FixtureRequest):
    yield
    stats = _STATS
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if not stats["codes"]:
        return
    lines = [
        f"pickle-structure fuzz: {sum(stats['codes'].values())} runs, exit codes {dict(sorted(stats['codes'].items()))}",
        f"  slowest: {stats['slowest'][0]:.2f} s  {stats['slowest'][1][:300]}",
        f"  exit-0 weights checked against torch.load(mmap=False): {dict(stats['oracle'])}",
        f"  features: {dict(stats['features'].most_common())}",
    ]
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        for line in lines:
            (reporter.write_line(line) if reporter else print(line))


@contextlib.contextmanager
def _limited_address_space():
    """Cap this process's address space at its current size + AS_HEADROOM while an example runs, so a multi-GB
    allocation fails instead of swamping the machine (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
    cap = vm + AS_HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# Examples can take seconds each (torch import is shared, but a deep or huge one is slow until bounded): shrinking
# is off unless LEXPORT_FUZZ_SHRINK=1; a failure prints its label (the structure's features) and its draws.
_PHASES = tuple(Phase) if os.environ.get("LEXPORT_FUZZ_SHRINK") == "1" else (
    Phase.explicit, Phase.reuse, Phase.generate)


@settings(FUZZ_SETTINGS, max_examples=PICKLE_EXAMPLES, phases=_PHASES, report_multiple_bugs=False)
@given(data=st.data())
def test_fuzzed_pickle_structures(data: st.DataObject) -> None:
    pickle_stats = _STATS
    with tempfile.TemporaryDirectory(prefix="lexport-pfuzz-") as d:
        d = Path(d)
        (d / "in").mkdir()
        marker = d / "PWNED"
        label, pkl, records, deflate, features = _draw_pickle_checkpoint(data.draw, marker)
        path = d / "in" / "fuzzed.ckpt"
        recs = H._torch_records(pkl, records)
        H.write_torch_zip(path, recs, deflate=[n for n, _ in recs if n.startswith("data/")] if deflate else ())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out = d / "out"
        module = data.draw(st.integers(0, 3)) == 0
        args = (["--module", "fixtures.modules:MyClassifierModule", "--attr", "model"] if module else [])
        faulthandler.dump_traceback_later(HARD_KILL_SECONDS, exit=True)
        t0 = time.monotonic()
        try:
            with _limited_address_space():
                res = invoke(path, *args, "--to", "state-dict", "--output-dir", out)
        finally:
            faulthandler.cancel_dump_traceback_later()
        seconds = time.monotonic() - t0
        label = f"{'module ' if module else ''}{label}"
        pickle_stats["codes"][res.code] += 1
        pickle_stats["features"].update(features)
        if seconds > pickle_stats["slowest"][0]:
            pickle_stats["slowest"] = (seconds, label)

        _ended_cleanly(res, label, d, path, digest)
        assert seconds < PER_EXAMPLE_SECONDS, f"{label}: took {seconds:.1f} s"
        assert not marker.exists(), f"{label}: code from the checkpoint ran"
        if res.code == 0 and not module:
            # The bytes published are the bytes in the file: what a plain, non-mmap torch.load reads.
            try:  # what a user does with the artifact: a plain torch.load, no mmap
                got = torch.load(str(out / "fuzzed.pt"), weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{label}: the published state dict does not load: {e}") from e
            try:
                want = torch.load(str(path), weights_only=True, mmap=False)["state_dict"]
            except Exception:  # noqa: BLE001 - torch itself cannot read what lexport accepted
                pickle_stats["oracle"]["torch.load refuses"] += 1
                return
            assert set(got) == set(want), (label, sorted(got), sorted(want))
            for k in want:
                assert _same_tensor(got[k], want[k]), f"{label}: {k} differs from what the file holds"
            pickle_stats["oracle"]["equal"] += 1
