"""Sharded case of the benchmark: a ~500 MB Lightning sharded folder to a state dict, two ways.

    .venv/bin/python benchmarks/bench_sharded.py [--width 2048] [--depth 10] [--reps 3] [--before CHECKOUT]
                                                 [--out benchmarks/results/sharded.json]

The folder is made once (cached under benchmarks/results/) by fixtures/make_sharded.py: 2 gloo ranks, BigMLP's
weights and Adam states as DTensors sharded on dim 0, torch.distributed.checkpoint.save + meta.pt, FSDPStrategy's
layout. 2048 x 10 gives 168 MB of weights and a 504 MB folder (weights + exp_avg + exp_avg_sq).

Cases, each in a fresh subprocess, interleaved round-robin (order rotated each round), medians:

- ``lexport_reader``: lightning_export.sources.dcp.ShardedCheckpoint's read_meta and state_dict (weights only,
  tensor by tensor, CRC-checked), then torch.save of the "model." submodule's state dict: what
  `lexport FOLDER --attr model --to state-dict` does once checkpoint.py hands folders to sharded.py.
- ``lexport_stream``: ShardedCheckpoint.iter_tensors, each tensor dropped once read: the reader's own peak, what a
  streaming writer would see.
- ``lexport_cli``: the real CLI, with its verification (the default): `lexport FOLDER --attr model --to
  state-dict`, only if this lexport accepts folders (skipped otherwise).
- ``lexport_cli_before``: the same command run from another checkout (``--before /path/to/checkout``, put first
  on PYTHONPATH), to measure a change side by side.
- ``recipe``: Lightning's documented route: `python -m lightning_fabric.utilities.consolidate_checkpoint FOLDER`
  (whole checkpoint, optimizer states included, into memory and into one file), then the hand-written export
  (torch.load, build BigMLP, load_state_dict, torch.save of .model). Its time is the sum of both steps, its peak the
  larger one.

Memory: peak RssAnon sampled every ~20 ms from /proc (heap and tensors, not the page cache) and VmHWM. Figures are
reported side by side and as ratios lexport / recipe. Only the standard library is imported here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.run import measure  # noqa: E402 - the same sampling as make bench: RssAnon, VmHWM, CPU

PY = sys.executable
LEXPORT = str(Path(PY).parent / "lexport")
MB = 1e6

READER = """
import sys, torch
from lightning_export.sources.dcp import ShardedCheckpoint
sharded = ShardedCheckpoint(sys.argv[1])
meta, sd = sharded.read_meta(), sharded.state_dict()
torch.save({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, sys.argv[2])
"""

STREAM = """
import sys
from lightning_export.sources.dcp import ShardedCheckpoint
n = 0
for key, tensor in ShardedCheckpoint(sys.argv[1]).iter_tensors():
    n += tensor.numel()
    del tensor
print(n)
"""

# What the reader's process holds before reading anything: torch, torch.distributed.checkpoint, lexport's reader.
BASELINE = """
import time, torch, torch.distributed.checkpoint, lightning_export.sources.dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
time.sleep(0.2)
"""

RECIPE_EXPORT = """
import sys, torch
from benchmarks.bench_module import BigMLP
ckpt = torch.load(sys.argv[1], weights_only=False)
model = BigMLP(**ckpt["hyper_parameters"])
model.load_state_dict(ckpt["model"])
torch.save(model.model.state_dict(), sys.argv[2])
"""


def combine(steps: list[dict]) -> dict:
    return {"wall_s": sum(s["wall_s"] for s in steps), "cpu_s": sum(s["cpu_s"] for s in steps),
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in steps),
            "peak_anon_bytes": max(s["peak_anon_bytes"] for s in steps)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def ensure_folder(cache: Path, width: int, depth: int) -> Path:
    out = cache / f"sharded_w{width}_d{depth}"
    folder = out.with_name(out.name + ".ckpt")
    if not (folder / "meta.pt").is_file():
        print(f"making {folder} (2 gloo ranks) ...", flush=True)
        subprocess.run(
            [PY, "fixtures/make_sharded.py", str(out), "--module", "benchmarks.bench_module:BigMLP",
             "--init-arg", f"width={width}", "--init-arg", f"depth={depth}"],
            cwd=REPO, check=True,
        )
    return folder


def cli_accepts_folders(folder: Path, tmp: Path) -> bool:
    proc = subprocess.run([LEXPORT, str(folder), "--attr", "model", "--to", "state-dict", "-o", str(tmp / "probe.pt"),
                           "--force", "--no-verify", "-q"], cwd=REPO, capture_output=True)
    return proc.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sharded.json")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout of lexport, run as the case lexport_cli_before")
    args = parser.parse_args()
    cache = REPO / "benchmarks" / "results"
    cache.mkdir(parents=True, exist_ok=True)
    folder = ensure_folder(cache, args.width, args.depth)
    work = cache / "sharded_work"
    work.mkdir(exist_ok=True)
    for p in folder.iterdir():  # warm page cache for every side alike
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass
    weights = 4 * args.depth * (args.width * args.width + args.width)
    cases = {
        "lexport_reader": [[PY, "-c", READER, str(folder), str(work / "reader.pt")]],
        "lexport_stream": [[PY, "-c", STREAM, str(folder)]],
        "baseline": [[PY, "-c", BASELINE]],
        "recipe": [
            [PY, "-m", "lightning_fabric.utilities.consolidate_checkpoint", str(folder),
             "--output_file", str(work / "consolidated.ckpt")],
            [PY, "-c", RECIPE_EXPORT, str(work / "consolidated.ckpt"), str(work / "recipe.pt")],
        ],
    }
    if cli_accepts_folders(folder, work):
        cases["lexport_cli"] = [[PY, "-m", "lightning_export", str(folder), "--attr", "model", "--to", "state-dict",
                                 "-o", str(work / "cli.pt"), "--force", "-q"]]
    # `env` execs python: the measured process is lexport itself; -P: not the current directory (this checkout)
    if args.before is not None:
        cases["lexport_cli_before"] = [["env", f"PYTHONPATH={args.before.resolve()}", PY, "-P", "-m", "lightning_export",
                                        str(folder), "--attr", "model", "--to", "state-dict",
                                        "-o", str(work / "cli_before.pt"), "--force", "-q"]]
    runs: dict[str, list[dict]] = {n: [] for n in cases}
    names = list(cases)
    for r in range(args.reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            (work / "consolidated.ckpt").unlink(missing_ok=True)
            m = combine([measure(cmd, work / f"{name}.{i}.log") for i, cmd in enumerate(cases[name])])
            runs[name].append(m)
            print(f"  round {r + 1}/{args.reps}  {name:<15} {m['wall_s']:7.2f} s  cpu {m['cpu_s']:6.2f} s  "
                  f"anon {m['peak_anon_bytes'] / MB:7.0f} MB  rss {m['peak_rss_bytes'] / MB:7.0f} MB", flush=True)
    med = {n: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for n, rs in runs.items()}
    rec = med["recipe"]
    ratios = {
        f"{n}_over_recipe": {k: med[n][k] / rec[k] for k in ("wall_s", "cpu_s", "peak_anon_bytes", "peak_rss_bytes")}
        for n in med if n not in ("recipe", "baseline")
    }
    base = med["baseline"]["peak_anon_bytes"]
    above = {n: (m["peak_anon_bytes"] - base) / weights for n, m in med.items() if n != "baseline"}
    result = {"folder": str(folder), "folder_bytes": folder_bytes(folder), "weights_bytes": weights,
              "reps": args.reps, "medians": med, "ratios": ratios,
              "anon_above_baseline_per_weight_byte": above, "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"\nfolder {folder_bytes(folder) / MB:.0f} MB, weights {weights / MB:.0f} MB; medians of {args.reps}:")
    print(f"  {'case':<15} {'wall s':>8} {'cpu s':>8} {'anon MB':>9} {'rss MB':>9}")
    for n, m in med.items():
        print(f"  {n:<15} {m['wall_s']:8.2f} {m['cpu_s']:8.2f} {m['peak_anon_bytes'] / MB:9.0f} "
              f"{m['peak_rss_bytes'] / MB:9.0f}")
    for n, r in ratios.items():
        print(f"  {n}: wall {r['wall_s']:.2f}, cpu {r['cpu_s']:.2f}, anon {r['peak_anon_bytes']:.2f}, "
              f"rss {r['peak_rss_bytes']:.2f}")
    for n, a in above.items():
        print(f"  {n}: peak RssAnon above the import baseline = {a:.2f} x the weights")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
