"""`make bench`: lexport against the hand-written recipe on a big Lightning checkpoint.

    .venv/bin/python benchmarks/run.py [--weights-gb 1.0] [--onnx-weights-gb 0.1] [--out benchmarks/results/latest.json]

Every measured command runs in its own fresh subprocess, from the repo root, and the repetitions of all cases
are interleaved (round-robin, order rotated per round) so that a noisy machine hurts every side alike; figures
are medians. While a child runs, the parent reads /proc/<pid>/status every ~20 ms and keeps the largest RssAnon
(anonymous memory: heap, tensors; *not* the page cache behind a memory-mapped checkpoint); the peak RSS is the
kernel's high-water mark (VmHWM, equal to wait4's ru_maxrss). Before the timed runs each checkpoint is read
once (cat > /dev/null) so every run sees a warm page cache (--cold instead evicts the checkpoint before every
run), and `sync` runs before each run so no run pays for the previous run's dirty pages. CPU seconds (user +
sys, from wait4) are reported too: on a shared machine they are steadier than wall time.

This file imports only the standard library: the parent stays small and never competes for memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
LEXPORT = str(Path(PY).parent / "lexport")
MODULE = "benchmarks.bench_module:BigMLP"
GB = 1e9

TARGETS = {  # name: (limit, what it is)
    "lexport_anon_over_baseline_per_weight_byte": (0.25, "lexport peak RssAnon above the import baseline / weights bytes"),
    "state_dict_time_ratio": (0.6, "lexport --to state-dict wall / recipe torch.save wall"),
    "safetensors_time_ratio": (0.6, "lexport --to safetensors wall / recipe save_file wall"),
    "help_seconds": (0.5, "median wall time of `lexport --help`"),
    "onnx_time_ratio": (1.2, "lexport --to onnx --no-verify wall / direct torch.onnx.export script wall"),
}

# ------------------------------------------------------------------------------------------ child scripts
# A real Trainer run of one Adam step, then trainer.save_checkpoint: state_dict + optimizer_states
# (exp_avg, exp_avg_sq), hyper_parameters, loops, callbacks ... exactly what users have on disk.
MAKE_CHECKPOINT = """
import sys, torch, pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset
from benchmarks.bench_module import BigMLP
width, depth, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = BigMLP(width=width, depth=depth)
data = DataLoader(TensorDataset(torch.randn(4, width), torch.randn(4, width)), batch_size=4)
trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, data)
trainer.save_checkpoint(path)
"""

# The recipe from the articles lexport replaces: load everything, rebuild, load_state_dict, save .model.
RECIPE = """
import sys, torch
from benchmarks.bench_module import BigMLP
ckpt_path, out, fmt = sys.argv[1:4]
ckpt = torch.load(ckpt_path, weights_only=False)
model = BigMLP(**ckpt["hyper_parameters"])
model.load_state_dict(ckpt["state_dict"])
net = model.model
if fmt == "safetensors":
    from safetensors.torch import save_file
    save_file(net.state_dict(), out)
elif fmt == "onnx":
    model.eval()
    with torch.no_grad():
        torch.onnx.export(net, (model.example_input_array,), out, dynamo=True, external_data=False)
else:
    torch.save(net.state_dict(), out)
"""

# What any tool that imports the user's LightningModule pays before touching the checkpoint.
BASELINE = """
import time, torch, pytorch_lightning
import benchmarks.bench_module
time.sleep(0.2)  # let the sampler see the settled process
"""


# ------------------------------------------------------------------------------------------- measuring
def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (empty once the process has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str], log: Path) -> dict:
    """Run cmd to completion; wall time, peak RSS (VmHWM) and sampled peak RssAnon, in bytes."""
    os.sync()
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    anon = hwm = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        st = proc_status(proc.pid)
        anon, hwm = max(anon, st.get("RssAnon", 0)), max(hwm, st.get("VmHWM", 0))
        time.sleep(0.02)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"benchmark command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": max(hwm, usage.ru_maxrss) * 1024, "peak_anon_bytes": anon * 1024}


def quick_wall(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def interleaved(cases: dict[str, list[str]], reps: int, logs: Path, outputs: dict[str, Path],
                evict: Path | None = None) -> dict[str, dict]:
    """Run every case `reps` times, round-robin with the order rotated each round; medians per case.

    evict: a file to drop from the page cache before every run (--cold), instead of the warm-cache default."""
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name in outputs:
                outputs[name].unlink(missing_ok=True)
            if evict is not None:
                drop_from_cache(evict)
            m = measure(cases[name], logs / f"{name}.log")
            runs[name].append(m)
            print(f"  round {r + 1}/{reps}  {name:<22} {m['wall_s']:7.2f} s  cpu {m['cpu_s']:6.2f} s"
                  f"  anon {m['peak_anon_bytes'] / GB:6.2f} GB  rss {m['peak_rss_bytes'] / GB:6.2f} GB", flush=True)
    return {
        name: {
            "cmd": cases[name] if cases[name][0] != PY else [PY, "-c", "<script>", *cases[name][3:]],
            "runs": ms,
            **{k: statistics.median(m[k] for m in ms) for k in ("wall_s", "cpu_s", "peak_rss_bytes", "peak_anon_bytes")},
        }
        for name, ms in runs.items()
    }


# ---------------------------------------------------------------------------------------- the checkpoint
def shape_for(weights_gb: float) -> tuple[int, int, int]:
    """(width, depth, fp32 weight bytes) of the BigMLP closest to weights_gb."""
    width = 4096 if weights_gb >= 0.5 else 1024
    per_layer = (width * width + width) * 4
    depth = max(1, round(weights_gb * GB / per_layer))
    return width, depth, depth * per_layer


def ensure_checkpoint(cache: Path, weights_gb: float) -> tuple[Path, int]:
    width, depth, nbytes = shape_for(weights_gb)
    path = cache / f"bigmlp-w{width}-d{depth}.ckpt"
    if not path.exists():
        print(f"writing {path.name} ({nbytes / GB:.2f} GB of weights) with a 1-step Adam pl.Trainer run ...", flush=True)
        tmp = path.with_suffix(".tmp.ckpt")
        with open(cache / "make_checkpoint.log", "wb") as log:
            subprocess.run([PY, "-c", MAKE_CHECKPOINT, str(width), str(depth), str(tmp)], cwd=REPO, check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        os.replace(tmp, path)
    return path, nbytes


def warm(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def drop_from_cache(path: Path) -> None:
    """Evict one file's pages (and only that file's) from the page cache: the next read comes from disk."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- reporting
def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")]
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb * 1024 / GB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "pytorch_lightning": version("pytorch-lightning"),
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
        "safetensors": version("safetensors"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(title: str, rows: dict[str, dict], baseline_anon: int | None, weights: int) -> None:
    print(f"\n{title}")
    print(f"  {'case':<22} {'wall s':>8} {'cpu s':>7} {'peak RSS GB':>12} {'peak anon GB':>13} {'anon - base':>12} {'x weights':>10}")
    for name, r in rows.items():
        over = r["peak_anon_bytes"] - baseline_anon if baseline_anon is not None else None
        print(f"  {name:<22} {r['wall_s']:8.2f} {r['cpu_s']:7.2f} {r['peak_rss_bytes'] / GB:12.2f} {r['peak_anon_bytes'] / GB:13.2f} "
              + (f"{over / GB:12.2f} {over / weights:10.2f}" if over is not None else f"{'':>12} {'':>10}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights-gb", type=float, default=1.0, help="fp32 weights of the main checkpoint (GB = 1e9 B)")
    ap.add_argument("--onnx-weights-gb", type=float, default=0.1, help="weights of the ONNX comparison's checkpoint")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per case (interleaved)")
    ap.add_argument("--onnx-reps", type=int, default=3)
    ap.add_argument("--help-reps", type=int, default=10)
    ap.add_argument("--skip-onnx", action="store_true")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before every run "
                    "of [1/3] (posix_fadvise DONTNEED) instead of warming it once: measures disk speed")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / ".cache")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latest.json")
    args = ap.parse_args()

    cache = args.cache_dir.resolve()
    work, logs = cache / "out", cache / "logs"
    for d in (cache, work, logs):
        d.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, torch {info['torch']}")
    ckpt, weights = ensure_checkpoint(cache, args.weights_gb)
    if not args.skip_onnx:
        onnx_ckpt, onnx_weights = ensure_checkpoint(cache, args.onnx_weights_gb)
    print(f"checkpoint {ckpt} ({ckpt.stat().st_size / GB:.2f} GB on disk, {weights / GB:.3f} GB of weights)")
    if args.cold:
        print("COLD cache: the checkpoint is evicted from the page cache before every run of [1/3]")
    else:
        print("warming the page cache: cat checkpoint > /dev/null (every run then reads it from a warm cache)")
        warm(ckpt)

    # ---- 1. big checkpoint: recipe vs lexport, state-dict and safetensors
    out = {"state-dict": work / "lexport.pt", "safetensors": work / "lexport.safetensors",
           "recipe": work / "recipe.pt", "recipe_st": work / "recipe.safetensors"}
    lex = [LEXPORT, str(ckpt), "--module", MODULE, "--attr", "model", "--force", "--quiet"]
    cases = {
        "baseline_import": [PY, "-c", BASELINE],
        "recipe_torch_save": [PY, "-c", RECIPE, str(ckpt), str(out["recipe"]), "pt"],
        "lexport_state_dict": [*lex, "--to", "state-dict", "-o", str(out["state-dict"])],
        "recipe_safetensors": [PY, "-c", RECIPE, str(ckpt), str(out["recipe_st"]), "safetensors"],
        "lexport_safetensors": [*lex, "--to", "safetensors", "-o", str(out["safetensors"])],
    }
    outputs = {"recipe_torch_save": out["recipe"], "lexport_state_dict": out["state-dict"],
               "recipe_safetensors": out["recipe_st"], "lexport_safetensors": out["safetensors"]}
    print(f"\n[1/3] {args.reps} interleaved rounds (lexport with verification on)")
    big = interleaved(cases, args.reps, logs, outputs, evict=ckpt if args.cold else None)
    base = big["baseline_import"]["peak_anon_bytes"]
    for p in out.values():
        p.unlink(missing_ok=True)

    # ---- 2. CLI start-up
    print(f"\n[2/3] lexport --help x{args.help_reps}, --version x{args.help_reps}")
    help_s = [quick_wall([LEXPORT, "--help"]) for _ in range(args.help_reps)]
    version_s = [quick_wall([LEXPORT, "--version"]) for _ in range(args.help_reps)]
    version_text = subprocess.run([LEXPORT, "--version"], capture_output=True, text=True).stdout.strip()

    # ---- 3. ONNX on a smaller checkpoint
    onnx = None
    if not args.skip_onnx:
        warm(onnx_ckpt)
        o_lex, o_dir = work / "lexport.onnx", work / "direct.onnx"
        print(f"\n[3/3] ONNX, {onnx_weights / GB:.3f} GB of weights, {args.onnx_reps} interleaved rounds")
        onnx_cases = {
            "direct_onnx_export": [PY, "-c", RECIPE, str(onnx_ckpt), str(o_dir), "onnx"],
            "lexport_onnx": [LEXPORT, str(onnx_ckpt), "--module", MODULE, "--attr", "model", "--to", "onnx",
                             "--no-verify", "-o", str(o_lex), "--force", "--quiet"],
        }
        onnx = {"checkpoint": str(onnx_ckpt), "weights_bytes": onnx_weights,
                "cases": interleaved(onnx_cases, args.onnx_reps, logs, {"direct_onnx_export": o_dir, "lexport_onnx": o_lex})}
        for p in (o_lex, o_dir):
            p.unlink(missing_ok=True)

    # ---- figures, targets, report
    def wall(name: str) -> float:
        return big[name]["wall_s"]

    figures = {
        "lexport_anon_over_baseline_per_weight_byte": max(
            big[n]["peak_anon_bytes"] - base for n in ("lexport_state_dict", "lexport_safetensors")) / weights,
        "state_dict_time_ratio": wall("lexport_state_dict") / wall("recipe_torch_save"),
        "safetensors_time_ratio": wall("lexport_safetensors") / wall("recipe_safetensors"),
        "help_seconds": statistics.median(help_s),
    }
    if onnx:
        c = onnx["cases"]
        figures["onnx_time_ratio"] = c["lexport_onnx"]["wall_s"] / c["direct_onnx_export"]["wall_s"]
    # Not targets: CPU seconds (user + sys) are steadier than wall time on a shared machine, and show how much of
    # lexport's wall-time lead comes from running work on a second core.
    extra = {
        "state_dict_cpu_ratio": big["lexport_state_dict"]["cpu_s"] / big["recipe_torch_save"]["cpu_s"],
        "safetensors_cpu_ratio": big["lexport_safetensors"]["cpu_s"] / big["recipe_safetensors"]["cpu_s"],
        "recipe_anon_over_baseline_per_weight_byte": max(
            big[n]["peak_anon_bytes"] - base for n in ("recipe_torch_save", "recipe_safetensors")) / weights,
    }
    if onnx:
        extra["onnx_cpu_ratio"] = c["lexport_onnx"]["cpu_s"] / c["direct_onnx_export"]["cpu_s"]
    targets = {k: {"value": round(v, 4), "limit": TARGETS[k][0], "what": TARGETS[k][1], "pass": v <= TARGETS[k][0]}
               for k, v in figures.items()}

    print_table(f"big checkpoint: {weights / GB:.3f} GB weights, {ckpt.stat().st_size / GB:.2f} GB file (medians)",
                big, base, weights)
    if onnx:
        print_table(f"onnx: {onnx['weights_bytes'] / GB:.3f} GB weights (medians)", onnx["cases"], None, weights)
    print(f"\n  lexport --help     median {statistics.median(help_s):.3f} s (min {min(help_s):.3f})")
    print(f"  lexport --version  median {statistics.median(version_s):.3f} s -> {version_text!r}")
    print("\nfor information: " + ", ".join(f"{k} {v:.3f}" for k, v in extra.items()))
    print("\ntargets")
    for t in targets.values():
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['value']:8.3f}  <= {t['limit']:<5}  {t['what']}")

    info["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    result = {
        "machine": info,
        "method": {
            "checkpoint": "written by a real pl.Trainer run (1 step, Adam) + trainer.save_checkpoint",
            "page_cache": ("cold: checkpoint evicted (posix_fadvise DONTNEED) before every run of the big section"
                           if args.cold else "warm: each checkpoint is read once (cat > /dev/null) before the timed runs")
            + "; sync before each run",
            "repetitions": "fresh subprocess per run, cases interleaved round-robin; medians",
            "peak_anon": "max RssAnon of /proc/<pid>/status, sampled every ~20 ms by the parent",
            "peak_rss": "VmHWM (= wait4 ru_maxrss)",
            "gb": "1e9 bytes",
        },
        "checkpoint": {"path": str(ckpt), "file_bytes": ckpt.stat().st_size, "weights_bytes": weights},
        "big": big,
        "baseline_import_anon_bytes": base,
        "cli": {"help_s": help_s, "help_median_s": statistics.median(help_s), "version_s": version_s,
                "version_median_s": statistics.median(version_s), "version_output": version_text},
        "onnx": onnx,
        "info": {k: round(v, 4) for k, v in extra.items()},
        "targets": targets,
        "all_pass": all(t["pass"] for t in targets.values()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
