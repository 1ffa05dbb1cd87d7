"""--to huggingface from a sharded (torch.distributed.checkpoint) Lightning folder: lexport against the usual
recipe (consolidate the folder into one file, torch.load it, build the module, save_pretrained).

    .venv/bin/python benchmarks/bench_huggingface.py [--n-embd 768] [--n-layer 6] [--vocab 32000]
                                                     [--out benchmarks/results/huggingface.json]

The checkpoint is a GPT-2-style TinyGPT2Module (fixtures/transformers_modules.py) trained one step by a real
Trainer, then written as a DCP folder in Lightning's FSDP layout (save_dcp_folder). Each case runs once in a fresh
subprocess; peak RssAnon (sampled) and VmHWM as in `make bench`. Every case also reports its peak RssAnon above the
``imports`` baseline (``anon_above_imports_bytes``) and the shard size it was asked for (``max_shard_size``).

- ``imports``: a process that imports what lexport imports for this job (torch, torch.distributed.checkpoint,
  safetensors, huggingface_hub, transformers' GPT-2 modeling, Lightning, the fixture's module, lexport's CLI, DCP
  reader and huggingface writer) and exits: the baseline every case is measured above.

- ``lexport``: `lexport FOLDER --module ... --to hf --max-shard-size 100MB` (verification included: the folder is
  loaded back by from_pretrained and run).
- ``lexport_no_verify``: the same with --no-verify: the module is built with its parameters on the meta device and
  the writer reads one tensor at a time from the folder (the weights are never in memory whole).
- ``lexport_ckpt_no_verify``: the same from the .ckpt the folder was made from (memory-mapped: its pages are
  file-backed, not anonymous).
- ``recipe``: torch.distributed.checkpoint.format_utils.dcp_to_torch_save (the whole folder into one file), then
  torch.load, TinyGPT2Module(...).load_state_dict, module.model.save_pretrained(max_shard_size="100MB").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.run import measure  # noqa: E402

PY = sys.executable
MODULE = "fixtures.transformers_modules:TinyGPT2Module"

RECIPE = """
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from fixtures.transformers_modules import TinyGPT2Module
folder, tmp, out, n_embd, n_layer, vocab = sys.argv[1:]
dcp_to_torch_save(folder, tmp)
sd = torch.load(tmp, weights_only=True)["model"]
module = TinyGPT2Module(n_embd=int(n_embd), n_layer=int(n_layer), vocab_size=int(vocab))
module.load_state_dict(sd)
del sd
module.model.save_pretrained(out, max_shard_size="{shard}")
"""

SHARD = "100MB"

IMPORTS = """
import torch, torch.distributed.checkpoint, safetensors.torch, huggingface_hub, pytorch_lightning
import transformers.models.gpt2.modeling_gpt2, fixtures.transformers_modules
import lightning_export.cli, lightning_export.sources.dcp, lightning_export.formats.huggingface
"""

MAKE = """
import sys
from pathlib import Path
from fixtures.transformers_modules import make_big_gpt2, save_dcp_folder
out, n_embd, n_layer, vocab = sys.argv[1:]
ckpt = make_big_gpt2(Path(out), int(n_embd), int(n_layer), int(vocab))
save_dcp_folder(ckpt, Path(out) / "big_gpt2_dcp.ckpt")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "huggingface.json")
    args = ap.parse_args()
    dims = [str(args.n_embd), str(args.n_layer), str(args.vocab)]
    work = Path(tempfile.mkdtemp(prefix="bench-hf-"))
    subprocess.run([PY, "-c", MAKE, str(work), *dims], cwd=REPO, check=True, capture_output=True)
    folder = work / "big_gpt2_dcp.ckpt"
    init = ["--init-arg", f"n_embd={args.n_embd}", "--init-arg", f"n_layer={args.n_layer}",
            "--init-arg", f"vocab_size={args.vocab}"]
    flags = ["--module", MODULE, "--to", "hf", "--max-shard-size", SHARD, *init, "--random-inputs", "1"]
    base = [PY, "-m", "lightning_export", str(folder), *flags]
    cases = {
        "imports": [PY, "-c", IMPORTS],
        "lexport": base + ["-o", str(work / "lexport-hf")],
        "lexport_no_verify": base + ["-o", str(work / "lexport-nv-hf"), "--no-verify"],
        "lexport_ckpt_no_verify": [PY, "-m", "lightning_export", str(work / "big_gpt2.ckpt"), *flags,
                                   "-o", str(work / "lexport-ckpt-nv-hf"), "--no-verify"],
        "recipe": [PY, "-c", RECIPE.replace("{shard}", SHARD), str(folder), str(work / "consolidated.pt"), str(work / "recipe-hf"), *dims],
    }
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".distcp")
    results: dict = {"folder_bytes": weights, "model": dict(zip(("n_embd", "n_layer", "vocab"), dims))}
    for name, cmd in cases.items():
        results[name] = measure(cmd, work / f"{name}.log")
        results[name]["max_shard_size"] = SHARD if name != "imports" else None
        if name != "imports":
            results[name]["anon_above_imports_bytes"] = (results[name]["peak_anon_bytes"]
                                                         - results["imports"]["peak_anon_bytes"])
        print(name, {k: round(v / 1e6, 1) if "bytes" in k else (round(v, 1) if isinstance(v, float) else v)
                     for k, v in results[name].items()})
    results["lexport_hf_bytes"] = sum(p.stat().st_size for p in (work / "lexport-hf").iterdir())
    results["largest_shard_bytes"] = max(p.stat().st_size for p in (work / "lexport-hf").glob("*.safetensors"))
    results["recipe_hf_bytes"] = sum(p.stat().st_size for p in (work / "recipe-hf").iterdir())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
