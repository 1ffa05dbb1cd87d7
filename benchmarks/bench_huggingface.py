"""--to huggingface from a sharded (torch.distributed.checkpoint) Lightning folder: lexport against the usual
recipe (consolidate the folder into one file, torch.load it, build the module, save_pretrained).

    .venv/bin/python benchmarks/bench_huggingface.py [--n-embd 768] [--n-layer 6] [--vocab 32000]
                                                     [--out benchmarks/results/huggingface.json]

The checkpoint is a GPT-2-style TinyGPT2Module (fixtures/transformers_modules.py) trained one step by a real
Trainer, then written as a DCP folder in Lightning's FSDP layout (save_dcp_folder). Each case runs once in a fresh
subprocess; peak RssAnon (sampled) and VmHWM as in `make bench`.

- ``lexport``: `lexport FOLDER --module ... --to hf --max-shard-size 100MB` (verification included: the folder is
  loaded back by from_pretrained and run).
- ``lexport_no_verify``: the same with --no-verify (the writer's own peak).
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
module.model.save_pretrained(out, max_shard_size="100MB")
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
    base = [PY, "-m", "lightning_export", str(folder), "--module", MODULE, "--to", "hf", "--max-shard-size",
            "100MB", *init, "--random-inputs", "1"]
    cases = {
        "lexport": base + ["-o", str(work / "lexport-hf")],
        "lexport_no_verify": base + ["-o", str(work / "lexport-nv-hf"), "--no-verify"],
        "recipe": [PY, "-c", RECIPE, str(folder), str(work / "consolidated.pt"), str(work / "recipe-hf"), *dims],
    }
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".distcp")
    results = {"folder_bytes": weights, "model": dict(zip(("n_embd", "n_layer", "vocab"), dims))}
    for name, cmd in cases.items():
        results[name] = measure(cmd, work / f"{name}.log")
        print(name, {k: round(v / 1e6, 1) if "bytes" in k else round(v, 1) for k, v in results[name].items()})
    results["lexport_hf_bytes"] = sum(p.stat().st_size for p in (work / "lexport-hf").iterdir())
    results["recipe_hf_bytes"] = sum(p.stat().st_size for p in (work / "recipe-hf").iterdir())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
