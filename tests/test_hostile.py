"""The hostile corpus through the real CLI, under a memory limit and a timeout.

Every case is made in code by tests/hostile.py and run as a release pipeline would run lexport: a subprocess
(`python -m lightning_export ... --json`) with RLIMIT_AS and a wall-clock timeout. For every case:

- the documented exit code (never 70, never a signal, never the timeout);
- stdout is exactly one strict JSON object (no NaN/Infinity) with "ok" and error.code equal to the exit code,
  and the error message is one line; no "Traceback" anywhere;
- peak RSS stays far below what the file claims (measured with wait4, not only enforced by the limit);
- nothing at the output path and no `.lexport-tmp-*` left when the run failed; the input unchanged.

A subset also runs without --json, to check the human error: one `error (...)` line plus at most a hint line,
and, for refused pickles, a hint that never proposes `--allow-global` for a name that runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hostile as H
import pytest
import torch
from conftest import REPO, address_space_limit, baseline_rss, limited_env, tiered

CLASSIFIER = "fixtures.modules:MyClassifierModule"
# Address-space limit for the child: torch, Lightning, onnxruntime and a full 5-format export of the fixture run
# in 2 GiB (measured); 3 GiB leaves room and still stops any multi-GB allocation the corpus asks for.
AS_LIMIT_GB = float(os.environ.get("LEXPORT_TEST_AS_LIMIT_GB", "3"))
TIMEOUT = float(os.environ.get("LEXPORT_TEST_TIMEOUT", "60"))
# Peak RSS allowed to any hostile run: importing torch + Lightning and exporting the fixture is ~0.5 GB.
MAX_RSS = int(float(os.environ.get("LEXPORT_TEST_MAX_RSS_GB", "1.2")) * (1 << 30))


# ----------------------------------------------------------------------------------------------- running
@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    max_rss: int  # bytes
    timed_out: bool = False

    def __repr__(self) -> str:
        return (f"Run(code={self.code}, seconds={self.seconds:.1f}, max_rss={self.max_rss >> 20} MiB, "
                f"timed_out={self.timed_out}, stdout={self.stdout[-1500:]!r}, stderr={self.stderr[-2500:]!r})")


def _limiter(limit: int) -> Callable[[], None]:
    def limit_child() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return limit_child


def run_limited(args: list[str], cwd: Path = REPO, *, unlimited: bool = False) -> Run:
    """`python -m lightning_export *args` under RLIMIT_AS and TIMEOUT; the child's peak RSS (VmHWM, polled)."""
    env = limited_env({"COLUMNS": "1000"})
    env.pop("LEXPORT_DEBUG", None)
    limit = _limiter(resource.RLIM_INFINITY if unlimited else address_space_limit(AS_LIMIT_GB))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lightning_export", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(cwd), env=env,
                            preexec_fn=limit, start_new_session=True)
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}

    def pump(stream, key: str) -> None:
        for block in iter(lambda: stream.read(65536), b""):
            chunks[key].append(block)

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    peak = 0  # the child's own high-water mark, read while it runs
    while True:
        peak = max(peak, _vm_hwm(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - t0 > TIMEOUT:
            timed_out = True
            os.killpg(proc.pid, 9)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    seconds = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(10)
    # wait4's ru_maxrss also counts the forked pytest worker's pages before exec (a worker that ran in-process
    # exports is itself 500 MB): the child's own VmHWM, polled, is its peak; rusage where /proc cannot tell.
    return Run(proc.returncode, b"".join(chunks["out"]).decode(errors="replace"),
               b"".join(chunks["err"]).decode(errors="replace"), seconds, peak or usage.ru_maxrss * 1024, timed_out)


def _vm_hwm(pid: int) -> int:
    """Peak resident bytes of the process's current image (VmHWM), 0 when it cannot be read (gone, zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def strict_json(text: str) -> dict:
    def no_constants(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=no_constants)  # the whole stdout: exactly one JSON value
    assert isinstance(data, dict), data
    return data


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(root))] = sha(p)
        else:
            out[str(p.relative_to(root))] = stat.filemode(st.st_mode)
    return out


# ------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """`setup(tmp_in, ckpts)` writes the hostile input(s) into tmp/in and returns the CLI arguments; "{out}" in
    them is tmp/out, which must stay empty unless the run exits 0."""

    setup: Callable[[Path, dict], list]
    codes: frozenset[int]
    needles: tuple[str, ...] = ()  # in the error message (case-insensitive)
    marker: bool = False  # tmp/PWNED must not exist afterwards
    forbid_hint: tuple[str, ...] = ()  # names never to be offered to --allow-global
    on_success: Callable[[Path, Path], None] | None = None  # (tmp, out) checks when the run exits 0
    flag: bool = False  # a range-checked flag: the parser may also reject it (exit 2, nothing on stdout)
    human: bool = False  # also run without --json and check the human error
    json_ok: bool | None = None  # expected "ok" when the run exits 0
    max_rss: int | None = None  # a tighter peak-RSS bound than MAX_RSS
    # Run without RLIMIT_AS: the case checks that lexport bounds itself (the limit would fail the allocation for it).
    unlimited: bool = False


def _c(*codes: int) -> frozenset[int]:
    return frozenset(codes)


OUT = ["--output-dir", "{out}"]


def _marker(tmp_in: Path) -> Path:
    return tmp_in.parent / "PWNED"


def _deflated(compressible: bool) -> Callable[[Path, dict], list]:
    def setup(tmp_in: Path, ck: dict) -> list:
        p = H.deflated_records(tmp_in / "deflated.ckpt", compressible=compressible)
        return [p, "--to", "state-dict,safetensors", *OUT]

    return setup


def _deflated_weights_exact(tmp: Path, out: Path) -> None:
    """Exit 0 is only acceptable with the weights the file really holds (torch.load without mmap decompresses)."""
    from safetensors.torch import load_file

    want = torch.load(str(tmp / "in" / "deflated.ckpt"), weights_only=True, mmap=False)["state_dict"]
    got_pt = torch.load(str(out / "deflated.pt"), weights_only=True)
    got_st = load_file(str(out / "deflated.safetensors"))
    for got in (got_pt, got_st):
        assert set(got) == set(want), (sorted(got), sorted(want))
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{k}: wrong weights published with exit 0"


def _flipped(tmp_in: Path, ck: dict) -> list:
    return [H.flipped_byte(tmp_in / "bitrot.ckpt"), "--to", "state-dict", *OUT]


def _malicious(name: str) -> Callable[[Path, dict], list]:
    def setup(tmp_in: Path, ck: dict) -> list:
        return [H.malicious(tmp_in / "evil.ckpt", _marker(tmp_in), name), "--to", "state-dict", *OUT]

    return setup


def _allow(name: str, payload: str) -> Callable[[Path, dict], list]:
    def setup(tmp_in: Path, ck: dict) -> list:
        p = H.malicious(tmp_in / "evil.ckpt", _marker(tmp_in), payload)
        return [p, "--allow-global", name, "--to", "state-dict", *OUT]

    return setup


def _hparams(make: Callable[..., Path], module: bool) -> Callable[[Path, dict], list]:
    def setup(tmp_in: Path, ck: dict) -> list:
        p = make(tmp_in / "hp.ckpt", base=ck["classifier"])
        mod = ["--module", CLASSIFIER, "--attr", "model"] if module else []
        return [p, *mod, "--to", "state-dict", *OUT]

    return setup


def _published(*names: str) -> Callable[[Path, Path], None]:
    def check(tmp: Path, out: Path) -> None:
        assert sorted(p.name for p in out.iterdir()) == sorted(names)

    return check


def _stride0(tmp_in: Path, ck: dict) -> list:
    return [H.stride0_huge(tmp_in / "stride0.ckpt"), "--to", "state-dict,safetensors", *OUT]


def _expanded(tmp_in: Path, ck: dict) -> list:
    return [H.expanded_zeros(tmp_in / "expanded.ckpt"), "--to", "safetensors,state-dict", *OUT]


def _bomb(tmp_in: Path, ck: dict) -> list:
    return [H.zip_bomb(tmp_in / "bomb.ckpt"), "--to", "state-dict", *OUT]


def _yaml_init_arg(tmp_in: Path, ck: dict) -> list:
    p = tmp_in / "classifier.ckpt"
    p.write_bytes(Path(ck["classifier"]).read_bytes())
    return [p, "--module", CLASSIFIER, "--attr", "model", "--init-arg", "hidden_size=" + H.yaml_bomb(),
            "--to", "state-dict", *OUT]


def _yaml_init_args_file(tmp_in: Path, ck: dict) -> list:
    p = tmp_in / "classifier.ckpt"
    p.write_bytes(Path(ck["classifier"]).read_bytes())
    f = H.yaml_bomb_init_args_file(tmp_in / "init_args.yaml")
    return [p, "--module", CLASSIFIER, "--attr", "model", "--init-args", f, "--to", "state-dict", *OUT]


def _yaml_config_file(tmp_in: Path, ck: dict) -> list:
    p = tmp_in / "classifier.ckpt"
    p.write_bytes(Path(ck["classifier"]).read_bytes())
    f = H.yaml_bomb_config_file(tmp_in / "config.yaml")
    return [p, "--config", f, "--attr", "model", "--to", "state-dict", *OUT]


def _fifo(tmp_in: Path, ck: dict) -> list:
    return [H.fifo(tmp_in / "pipe.ckpt"), "--to", "state-dict", *OUT]


def _meta(tmp_in: Path, ck: dict) -> list:
    return [H.meta_tensor(tmp_in / "meta.ckpt"), "--to", "state-dict", *OUT]


def _flags(*flags: str, module: bool = True) -> Callable[[Path, dict], list]:
    def setup(tmp_in: Path, ck: dict) -> list:
        p = tmp_in / "classifier.ckpt"
        p.write_bytes(Path(ck["classifier"]).read_bytes())
        mod = ["--module", CLASSIFIER] if module else []
        return [p, *mod, *flags, *OUT]

    return setup


def _noisy(tmp_in: Path, ck: dict) -> list:
    mod, ckpt = H.noisy_module(tmp_in)
    return [ckpt, "--module", f"{mod}:Noisy", "--to", "torchscript", *OUT]


def _noisy_published(tmp: Path, out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["noisy.torchscript.pt"]


RUNS_CODE = ("subprocess.call", "os.system", "builtins.eval", "numpy.testing._private.utils.runstring")

CASES: dict[str, Case] = {
    # 1. the bytes read are the bytes in the file
    "deflated-storage-records": Case(_deflated(False), _c(0, 3), on_success=_deflated_weights_exact),
    "deflated-compressible-records": Case(_deflated(True), _c(0, 3), on_success=_deflated_weights_exact),
    "flipped-byte-in-tensor-record": Case(_flipped, _c(3), needles=("data/0",), human=True),
    # 2. refused pickles: nothing runs, and the hint never offers the payload
    **{f"pickle-calls-{n}": Case(_malicious(n), _c(3), needles=(n,), marker=True,
                                 forbid_hint=(n, "posix.system", "subprocess.call", "builtins.eval"), human=True)
       for n in RUNS_CODE},
    "allow-global-builtins.eval": Case(_allow("builtins.eval", "builtins.eval"), _c(2), needles=("builtins.eval",),
                                       marker=True, human=True),
    "allow-global-subprocess.call": Case(_allow("subprocess.call", "subprocess.call"), _c(2),
                                         needles=("subprocess.call",), marker=True),
    "allow-global-subprocess.Popen": Case(_allow("subprocess.Popen", "subprocess.Popen"), _c(2),
                                          needles=("subprocess.Popen",), marker=True),
    # 3. bounded work: hparams walks
    "hparams-shared-refs": Case(_hparams(H.hparams_shared_refs, False), _c(0, 3),
                                on_success=_published("hp.pt")),
    "hparams-shared-refs-module": Case(_hparams(H.hparams_shared_refs, True), _c(0, 3, 4),
                                       on_success=_published("hp.pt")),
    "hparams-self-reference": Case(_hparams(H.hparams_self_reference, False), _c(0, 3),
                                   on_success=_published("hp.pt")),
    "hparams-self-reference-module": Case(_hparams(H.hparams_self_reference, True), _c(0, 3, 4),
                                          on_success=_published("hp.pt")),
    "hparams-deep-100000": Case(_hparams(H.hparams_deep, False), _c(0, 3), on_success=_published("hp.pt")),
    "hparams-deep-100000-module": Case(_hparams(H.hparams_deep, True), _c(0, 3, 4),
                                       on_success=_published("hp.pt"), human=True),
    # 3. bounded work: claimed sizes
    # The size bound covers what the unpickler builds, not only tensors (3.1 GB peak RSS, exit 0 before).
    **{f"hparams-{what}-{n}{'-module' if module else ''}": Case(
        _hparams(lambda p, base, what=what: H.hparams_allocation(p, base, what), module), _c(3),
        needles=("memory",), max_rss=500 << 20, human=not module, unlimited=True)
       for what, n in (("bytearray", "3e9"), ("tensor", "3e9")) for module in (False, True)},
    # A fuzzed file (an OrderedDict BUILDing values=None) made a walk call None: exit 70 before.
    "hparams-shadowed-methods": Case(_hparams(H.hparams_shadowing, False), _c(0), on_success=_published("hp.pt")),
    "hparams-shadowed-methods-module": Case(_hparams(H.hparams_shadowing, True), _c(0)),
    "stride0-1e12-elements": Case(_stride0, _c(3)),
    "expand-1e9-in-2kb": Case(_expanded, _c(3)),
    "zip-bomb-1.5mb": Case(_bomb, _c(3)),
    "yaml-billion-laughs-init-arg": Case(_yaml_init_arg, _c(2), human=True),
    "yaml-billion-laughs-init-args-file": Case(_yaml_init_args_file, _c(2)),
    "yaml-billion-laughs-config": Case(_yaml_config_file, _c(2)),
    "fifo-as-checkpoint": Case(_fifo, _c(3)),
    # 4. every failure has its code
    "meta-tensor": Case(_meta, _c(3)),
    "input-1e11-rows": Case(_flags("--attr", "model", "--input", "float32[100000000000,8]", "--to", "onnx"), _c(2),
                            flag=True),
    "seed-2**70": Case(_flags("--attr", "model", "--seed", str(2**70), "--to", "onnx"), _c(2), flag=True,
                       human=True),
    "atol-nan": Case(_flags("--attr", "model", "--atol", "nan", "--to", "onnx"), _c(2), flag=True),
    "atol-inf": Case(_flags("--attr", "model", "--atol", "inf", "--to", "onnx"), _c(2), flag=True),
    "rtol-negative": Case(_flags("--attr", "model", "--rtol=-1", "--to", "onnx"), _c(2), flag=True),
    "attr-trainer": Case(_flags("--attr", "trainer", "--to", "onnx"), _c(4), needles=("trainer",)),
    "noisy-user-module": Case(_noisy, _c(0), on_success=_noisy_published, json_ok=True),
}


def _prepare(name: str, tmp: Path, ckpts: dict) -> tuple[Case, list[str], Path]:
    case = CASES[name]
    (tmp / "in").mkdir()
    out = tmp / "out"
    out.mkdir()
    args = [str(a).replace("{out}", str(out)) for a in case.setup(tmp / "in", ckpts)]
    return case, args, out


def _input_state(tmp: Path) -> dict[str, str]:
    return snapshot(tmp / "in")


def _common_checks(name: str, case: Case, run: Run, tmp: Path, out: Path, before: dict) -> None:
    if case.marker:
        assert not (tmp / "PWNED").exists(), f"{name}: code from the checkpoint ran (exit {run.code}): {run}"
    assert not run.timed_out, f"{name}: still running after {TIMEOUT:.0f} s: {run}"
    assert run.code >= 0, f"{name}: killed by signal {-run.code}: {run}"
    assert run.code in case.codes, f"{name}: exit {run.code}, expected one of {sorted(case.codes)}: {run}"
    assert "Traceback" not in run.stdout + run.stderr, run
    # A tighter bound is the case's (500 MB for the bytearray bomb, measured with the CPU build of torch),
    # raised by however much more than that build's 450 MB importing the dependencies keeps resident here (430 MB
    # with torch 2.13+cpu; 711 MB with 2.14.1+cu130).
    bound = case.max_rss + max(0, baseline_rss() - (450 << 20)) if case.max_rss else MAX_RSS
    assert run.max_rss < bound, f"{name}: peak RSS {run.max_rss >> 20} MiB (bound {bound >> 20} MiB): {run}"
    assert _input_state(tmp) == before, f"{name}: the input directory changed"
    leftovers = [str(p) for p in tmp.rglob(".lexport-tmp-*")]
    assert not leftovers, leftovers
    if run.code == 0:
        if case.on_success:
            case.on_success(tmp, out)
    else:
        assert list(out.iterdir()) == [], f"{name}: files left at the output path: {list(out.iterdir())}"
    text = run.stdout + run.stderr
    for n in case.forbid_hint:
        assert f"--allow-global {n}" not in " ".join(text.split()), f"{name}: the hint offers {n}: {run}"
    if case.forbid_hint:
        assert "never allowed" in " ".join(text.split()).lower(), f"{name}: the refusal does not say the name is never allowed: {run}"


# The hparams bombs through a module build (`hparams-*-module`, ~7 s each: a child importing Lightning) are in the
# slow tier; the same files without --module, and tests/test_security.py's in-process walks, stay in make test.
@pytest.mark.parametrize("name", tiered(list(CASES), fast=[n for n in CASES
                                                           if not (n.startswith("hparams-") and n.endswith("-module"))]))
def test_hostile_json(name: str, tmp_path: Path, ckpts: dict) -> None:
    """The case with --json: exit code, strict JSON with the same code, one-line message, nothing left behind."""
    case, args, out = _prepare(name, tmp_path, ckpts)
    before = _input_state(tmp_path)
    run = run_limited([*args, "--json"], unlimited=case.unlimited)
    _common_checks(name, case, run, tmp_path, out, before)
    if case.flag and run.code == 2 and run.stdout == "":
        return  # rejected by the argument parser itself (README: nothing on stdout)
    data = strict_json(run.stdout)
    if run.code == 0:
        assert data.get("ok") is True, data
        if case.json_ok is not None:
            assert data["ok"] is case.json_ok
        return
    assert data.get("ok") is False, data
    err = data.get("error") or {}
    assert err.get("code") == run.code, data
    message = str(err.get("message", ""))
    assert message and len(message.strip().splitlines()) <= 2, f"{name}: not a one-line message: {message!r}"
    flat = " ".join(message.split()).lower()
    for needle in case.needles:
        assert needle.lower() in flat, f"{name}: {needle!r} not in {message!r}"


HUMAN = [n for n, c in CASES.items() if c.human]


@pytest.mark.parametrize("name", tiered(HUMAN, fast=[n for n in HUMAN if not n.endswith("-module")]))
def test_hostile_human(name: str, tmp_path: Path, ckpts: dict) -> None:
    """Without --json: one `error (...)` message and at most a hint on stderr (no warnings, no second error),
    nothing on stdout."""
    case, args, out = _prepare(name, tmp_path, ckpts)
    before = _input_state(tmp_path)
    run = run_limited(args, unlimited=case.unlimited)
    _common_checks(name, case, run, tmp_path, out, before)
    if run.code == 0:
        return
    assert run.stdout == "", run
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    errs = [i for i, ln in enumerate(lines) if ln.startswith("error (")]
    assert len(errs) == 1, run
    assert f"exit {run.code}" in lines[errs[0]], run
    # The message and its hint; rich wraps long lines at the console width, so allow a few physical lines.
    tail = lines[errs[0]:]
    assert len(tail) <= 6, f"{name}: more than a message and a hint after the error: {run}"
    assert not any(w in ln for ln in tail for w in ("Warning", "warning:", "internal error")), run


def test_corpus_is_small_files(tmp_path: Path) -> None:
    """The attacks are cheap: each file is kilobytes (the bomb 1.5 MB), however much it claims."""
    sizes = {
        "shared-refs": H.hparams_shared_refs(tmp_path / "a.ckpt").stat().st_size,
        "stride0": H.stride0_huge(tmp_path / "b.ckpt").stat().st_size,
        "expanded": H.expanded_zeros(tmp_path / "c.ckpt").stat().st_size,
        "deep": H.hparams_deep(tmp_path / "d.ckpt").stat().st_size,
    }
    assert sizes["shared-refs"] < 16_000 and sizes["stride0"] < 4096 and sizes["expanded"] < 4096, sizes
    assert sizes["deep"] < 300_000, sizes
    assert H.zip_bomb(tmp_path / "e.ckpt").stat().st_size < 2_000_000
