"""Shared fixtures: real checkpoints from a real pl.Trainer, built once per session; CLI runners."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# pytest-xdist workers share the cores: each worker (and every lexport child it starts, which inherits this) gets
# cores / workers math threads. With the default of one thread per core in every worker, OpenMP's spinning threads
# oversubscribe the machine (measured on 2 cores, 2 workers: make test 237-249 s, 225 s with this; one fixture's
# training 25 s -> 3 s). Set before torch is imported; a value already in the environment wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> checkpoint path for every fixture in fixtures/make_checkpoints.py (trained once per session)."""
    from fixtures.make_checkpoints import make_checkpoints

    out = tmp_path_factory.mktemp("ckpts")
    return make_checkpoints(out)


@pytest.fixture(scope="session")
def target_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deployment targets of fixtures/targets.py (conv net, Transformer, MLP), trained once per session and
    shared by tests/test_targets.py and tests/test_edge.py."""
    from fixtures.targets import make_target_checkpoints

    return make_target_checkpoints(tmp_path_factory.mktemp("targets"))


# A draw of fixtures/int8_data.py's task no split uses: calibration (file seed 7, val seed 1) never sees it.
INT8_HOLDOUT_SEED = 4242


@pytest.fixture(scope="session")
def int8_trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small conv net trained with a real Trainer on the synthetic image task (fixtures/int8_data.py): its
    checkpoint, data.pt, config.yaml (model: + data:), broken.yaml; `holdout` (1000 samples no split saw) and the
    module's accuracy on it. Trained once per session for every --data / int8 test."""
    from fixtures.int8_data import accuracy, make_images, train

    out = train(tmp_path_factory.mktemp("int8"))
    x, y = make_images(1000, seed=INT8_HOLDOUT_SEED)
    out["holdout"] = (x, y)
    out["accuracy"] = accuracy(out["module"], x, y)
    assert out["accuracy"] >= 0.95, f"the fixture classifier did not learn the task: {out['accuracy']:.3f}"
    return out


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    # `fixtures.modules` is importable from the repo root, as a user's package is from theirs.
    monkeypatch.chdir(REPO)


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self) -> dict:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"Result(code={self.code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-3000:]!r})"


def run_lexport(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 600) -> Result:
    """The installed CLI in a real subprocess: exit codes and the stdout/stderr split as a shell sees them."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env.pop("LEXPORT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_export", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=str(cwd or REPO),
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def invoke(*args: object) -> Result:
    """The CLI in-process through typer's CliRunner (fast: torch is imported once per session)."""
    from typer.testing import CliRunner

    from lightning_export.cli import SUBCOMMANDS, _subcommand, app

    argv = [str(a) for a in args]
    command = app
    if argv and argv[0] in SUBCOMMANDS:  # as main() dispatches: `inspect ...`, `verify ...`
        command, argv = _subcommand(argv[0]), argv[1:]
    runner = CliRunner()
    res = runner.invoke(command, argv, catch_exceptions=False)
    return Result(res.exit_code, res.stdout, res.stderr)


def patch_format(monkeypatch: pytest.MonkeyPatch, name: str, **changes) -> None:
    """Replace fields of a registered format for one test (a writer that fails half-way, a wrong loader)."""
    from lightning_export.formats import REGISTRY

    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], **changes))


@pytest.fixture
def small(tmp_path: Path, ckpts: dict) -> Path:
    """A private copy of the classifier checkpoint under tmp_path/in, for tests that check the input is untouched."""
    p = tmp_path / "in" / "classifier.ckpt"
    p.parent.mkdir()
    shutil.copyfile(ckpts["classifier"], p)
    return p


# ------------------------------------------------------------------------------ optional extras and limits
# The formats and tests that need an optional extra, by the module they import. A test that needs one skips
# with a reason when it is missing (`make test` installs every extra, so CI runs them all).
EXTRA_MODULES = {"executorch": ("executorch",), "openvino": ("openvino",), "tflite": ("litert_torch", "ai_edge_litert")}


def installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# Formats that export one kind of model only (huggingface: a transformers PreTrainedModel; tests/test_huggingface.py):
# never part of an "every format" run over the plain test modules.
MODEL_SPECIFIC_FORMATS = ("huggingface",)


def available_formats(names: str | list[str]) -> list[str]:
    """`names` without the formats whose optional extra is missing here (all of them where `make test` installed)
    and without the model-specific ones."""
    wanted = names.split(",") if isinstance(names, str) else list(names)
    return [n for n in wanted if n not in MODEL_SPECIFIC_FORMATS
            and all(installed(m) for m in EXTRA_MODULES.get(n, ()))]


# ------------------------------------------------------------------------------ the two tiers
# `make test` runs `-m "not slow"` (every claim at least once, under 5 minutes on 2 cores); `make test-slow` runs the
# rest, which repeats a claim across every compiled format (aoti, executorch, LiteRT), multi-process Trainer layouts
# and the larger fuzz draws. CI (.ci/run) runs both. Collection is the same in every worker: the mark only selects.
SLOW = pytest.mark.slow
# The formats a compile makes slow (seconds each): an "every format" test runs them in the slow tier.
COMPILED_FORMATS = ("aoti", "executorch", "tflite")


def tiered(values: list, fast: list | tuple) -> list:
    """Parametrize values; those not in `fast` are marked slow."""
    return [v if v in fast else pytest.param(v, marks=SLOW) for v in values]


# The longest files first (measured with --durations): with --dist loadscope a worker takes a whole file, and a long
# one taken last would run alone while the other worker idles. The same order in every worker (a fixed list).
LONGEST_FIRST = ("test_int8", "test_huggingface", "test_hostile", "test_sharded", "test_faults", "test_targets",
                 "test_edge", "test_release", "test_real_projects", "test_dynamic_shapes", "test_precision",
                 "test_projects", "test_summary", "test_reproducible", "test_cli")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file keeps its own order


def peak_above_imports_script(imports: str) -> str:
    """`python -c` code that imports `imports` (what the run will import, so the baseline holds them), then runs the
    CLI on sys.argv[1:] while sampling its own RssAnon every 2 ms; prints `PEAK_ABOVE_IMPORTS <bytes> EXIT <code>`
    to stderr (anonymous memory: heap and tensors, not the page cache of mapped files)."""
    return f"""
import sys, threading, time
import {imports}
import lightning_export.cli
def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
base, peak, done = anon(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
code = lightning_export.cli.app(prog_name="lexport", args=sys.argv[1:], standalone_mode=False)
done.append(1)
print(f"PEAK_ABOVE_IMPORTS {{peak[0] - base}} EXIT {{code}}", file=sys.stderr)
"""


# Children that run lexport under RLIMIT_AS: one BLAS thread (OpenBLAS sizes a buffer per thread at import and
# aborts when that fails), and the limit set above what importing torch + Lightning + onnxruntime maps on this
# machine (a CUDA build of torch maps several GB more than the CPU build), so the limit keeps its meaning: any
# multi-GB allocation a file asks for still fails.
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _baseline() -> tuple[int, int]:
    """(peak virtual memory, peak RSS) in bytes of a child that imports what lexport imports to export, measured
    once per interpreter (a CUDA build of torch maps and keeps resident far more than the CPU build)."""
    cache = REPO / ".pytest_cache" / "lexport-baseline-vm"
    code = ("import torch, pytorch_lightning, onnxruntime, onnx, lightning_export.cli\n"
            "s = {l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith('Vm')}\n"
            "print(s['VmPeak'], s['VmHWM'])")
    env = {**os.environ, **SINGLE_THREADED}
    key = f"{sys.executable}:{os.path.getmtime(sys.executable)}"
    try:
        saved_key, peak, hwm = cache.read_text().split("\n")[:3]
        if saved_key == key:
            return int(peak), int(hwm)
    except (OSError, ValueError):
        pass
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO),
                         timeout=300, check=True)
    peak, hwm = (int(v) * 1024 for v in out.stdout.split())
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}")
        tmp.write_text(f"{key}\n{peak}\n{hwm}\n")
        os.replace(tmp, cache)
    except OSError:
        pass
    return peak, hwm


def baseline_rss() -> int:
    """Peak RSS of importing lexport's dependencies here (430 MB with torch 2.13+cpu, 711 MB with 2.14.1+cu130)."""
    return _baseline()[1]


def address_space_limit(limit_gb: float) -> int:
    """RLIMIT_AS for a lexport child: `limit_gb`, the limit a test was written for on the CPU build of torch
    (whose imports map under 1.5 GB here), raised by however much more this machine's imports map."""
    calibrated = 3 << 29  # 1.5 GB
    return int(limit_gb * (1 << 30)) + max(0, _baseline()[0] - calibrated)


def limited_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **SINGLE_THREADED, **(env or {})}
