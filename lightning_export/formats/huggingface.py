"""`huggingface`: a folder that transformers' from_pretrained loads (config.json, generation_config.json,
model.safetensors or shards with model.safetensors.index.json, a tokenizer when given).

transformers writes the JSON files (config.save_pretrained), huggingface_hub plans the shards
(split_torch_state_dict_into_shards: file names, the index's weight_map), and lexport's streaming safetensors writer
writes the bytes from the checkpoint's (memory-mapped or lazily read) tensors, one tensor at a time. Tied weights
are stored once, under the key transformers keeps (the tied copy is retied on load). Verified by loading the folder
with the class config.json names, never by re-reading these bytes with lexport's own reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..construct.pretrained import cache_was_on, is_pretrained, select_pretrained, unwrap_peft
from ..errors import ExportError, UsageError
from ..statedict import LazyTensors, tensor_specs
from . import DynamicSupport, ExportContext, Format, Written, option, register, storage_bytes
from ._graph import dynamic_info
from .safetensors import write_safetensors

SUFFIX = "-hf"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few kB
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class HuggingfaceOptions:
    max_shard_size: str | None = option(None)  # transformers' notation (5GB = 5*10**9 bytes, 5GiB = 5*2**30)
    tokenizer: Path | None = option(None)  # a tokenizer.save_pretrained folder copied into the artifact


def parse_size(text: str) -> int:
    """`200KB` -> 200,000 and `5GiB` -> 5 * 2**30, as transformers' save_pretrained reads --max-shard-size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--max-shard-size {text!r} is not a size", hint="Write it as 200KB, 500MB, 5GB or 5GiB.")
    return int(float(m.group(1)) * _UNITS[unit])


def _check(opts: HuggingfaceOptions, requested: bool) -> None:
    if not requested:
        if opts.max_shard_size is not None or opts.tokenizer is not None:
            raise UsageError("--max-shard-size and --tokenizer are options of --to huggingface")
        return
    try:
        import huggingface_hub  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("--to huggingface needs transformers and huggingface_hub",
                         hint="pip install 'lightning-export[huggingface]'") from None
    if opts.max_shard_size is not None:
        parse_size(opts.max_shard_size)
    if opts.tokenizer is not None:
        _check_tokenizer(Path(opts.tokenizer))


def _check_tokenizer(folder: Path) -> None:
    """A folder tokenizer.save_pretrained wrote, which AutoTokenizer loads (offline, nothing from the hub)."""
    if not folder.is_dir() or not (folder / "tokenizer_config.json").is_file():
        raise UsageError(f"--tokenizer {folder}: not a folder written by tokenizer.save_pretrained "
                         "(no tokenizer_config.json)")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's folder's
        raise UsageError(f"--tokenizer {folder}: AutoTokenizer cannot load it: {type(e).__name__}: {e}") from None


class _Picked(LazyTensors):
    """The tensors to write, each from the checkpoint (memory-mapped or read from a folder when asked for) when it
    holds the module's tensor as it is, else from the module in memory (a merged adapter, a cast)."""

    def __init__(self, keys: list[str], checkpoint: Mapping[str, Any], module_sd: Mapping[str, Any]) -> None:
        specs = tensor_specs(checkpoint)
        self._specs, self._from = {}, {}
        for k in keys:
            mine, stored = module_sd[k], specs.get(k)
            use_stored = stored is not None and stored.dtype == mine.dtype and tuple(stored.shape) == tuple(mine.shape)
            if not use_stored and mine.device.type == "meta":  # the pipeline loads the parameters in that case
                raise RuntimeError(f"{k}: the checkpoint does not hold it as the module has it, and the module's "
                                   "parameters were left on the meta device")
            self._from[k] = checkpoint if use_stored else module_sd
            self._specs[k] = stored if use_stored else mine

    def specs(self) -> dict[str, Any]:
        return dict(self._specs)

    def subset(self, keys: list[str]) -> _Picked:
        out = _Picked.__new__(_Picked)
        out._specs = {k: self._specs[k] for k in keys}
        out._from = {k: self._from[k] for k in keys}
        return out

    def __getitem__(self, key: str) -> Any:
        return self._from[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError("read-only")

    def __delitem__(self, key: str) -> None:
        raise TypeError("read-only")


def _tied_copies(model: Any, module_sd: Mapping[str, Any]) -> set[str]:
    """The keys transformers leaves out of a saved state dict: the tied copies it declares (lm_head.weight tied to
    the input embeddings) and any other key whose tensor shares memory with a key kept (a parameter left on the meta
    device has no memory: one the module holds under several names, as tied weights are, counts as shared)."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(declared, Mapping):  # transformers 4: a list of patterns, the source being the embeddings
        declared = {}
    drop = {t for t, s in declared.items() if t in module_sd and s in module_sd}
    parameter = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    by_storage: dict[Any, list[str]] = {}
    for k, t in module_sd.items():
        if k in drop or not t.numel():
            continue
        if t.device.type != "meta":
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(k)
        elif k in parameter:
            by_storage.setdefault(("meta", parameter[k]), []).append(k)
    for names in by_storage.values():
        drop.update(sorted(names)[1:])
    return drop


def _save_configs(model: Any, folder: Path) -> None:
    """config.json as save_pretrained writes it (architectures, dtype), the user's use_cache restored;
    generation_config.json when the model generates."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).removeprefix("torch.")
    if cache_was_on(config):
        config.use_cache = True
    config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(str(folder))


def write(ctx: ExportContext, path: Path) -> Written:
    from huggingface_hub import split_torch_state_dict_into_shards

    model = unwrap_peft(ctx.target)
    if not is_pretrained(model):
        raise ExportError(f"--to huggingface needs a transformers PreTrainedModel, not {type(model).__name__}")
    path.mkdir()
    module_sd = model.state_dict()
    tied = _tied_copies(model, module_sd)
    picked = _Picked([k for k in module_sd if k not in tied], ctx.state_dict, module_sd)
    own = ctx.options_as(HuggingfaceOptions)
    limit = parse_size(own.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    plan = split_torch_state_dict_into_shards(picked.specs(), filename_pattern="model{suffix}.safetensors",
                                              max_shard_size=limit)
    _save_configs(model, path)
    for filename, names in plan.filename_to_tensors.items():
        write_safetensors(picked.subset(names), path / filename, {"format": "pt"})
    if plan.is_sharded:
        index = {"metadata": {"total_parameters": sum(t.numel() for t in picked.specs().values()), **plan.metadata},
                 "weight_map": plan.tensor_to_filename}
        (path / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    notes = []
    if tied:
        notes.append(f"tied weights stored once ({', '.join(sorted(tied))} retied on load)")
    if own.tokenizer is not None:
        _copy_tokenizer(Path(own.tokenizer), path)
        notes.append(f"tokenizer from {own.tokenizer} copied in")
    info = {"files": sorted(p.name for p in path.iterdir()), "shards": len(plan.filename_to_tensors),
            "architecture": type(model).__name__, "tied_keys": sorted(tied)}
    if ctx.dynamic is not None:
        info["shapes"] = ("no shapes stored (the transformers class runs at any size its code takes); verified at "
                          "other sizes of the --dynamic dims")
        info["dynamic_dims"] = dynamic_info(ctx.dynamic)
    return Written("transformers config.save_pretrained + huggingface_hub shard plan + lexport.safetensors", notes,
                   info)


def _copy_tokenizer(source: Path, folder: Path) -> None:
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.is_symlink() and not (folder / f.name).exists():
            shutil.copyfile(f, folder / f.name)


def load(path: Path) -> Any:
    """The folder loaded by the transformers class its config.json names, offline; any missing, unexpected or
    mis-shaped key fails (from_pretrained only warns). Returns the model's forward, one step without a KV cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar is not lexport's to print

    config_file = path / "config.json"
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"config.json is {config_file.stat().st_size} bytes: not a model config")
    config = json.loads(config_file.read_text())
    names = config.get("architectures") if isinstance(config, dict) else None
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    cls = getattr(transformers, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"config.json names no transformers class ({names})")
    # A folder given to verify is untrusted: safetensors only (never a pickled pytorch_model.bin beside it), no code
    # from the folder (auto_map), nothing from the hub.
    loader: Any = cls  # output_loading_info=True returns (model, info), which the stubs do not say
    model, info = loader.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                         use_safetensors=True, trust_remote_code=False)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise ValueError(f"{cls.__name__}.from_pretrained: " + "; ".join(f"{k} {sorted(map(str, v))[:10]}"
                                                                          for k, v in bad.items()))
    model.eval()
    use_cache = getattr(model.config, "use_cache", None) is not None

    def forward(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return model(*args, **({"use_cache": False} if use_cache else {}), **kwargs)

    forward.model = model  # type: ignore[attr-defined]
    return forward


def size_estimate(ctx: ExportContext) -> int:
    return storage_bytes(tensor_specs(ctx.state_dict).values())[0] + 256 * len(ctx.state_dict) + (1 << 20)


def _sniff(s: Any) -> bool:
    return s.path.is_dir() and (s.path / "config.json").is_file() and (
        (s.path / WEIGHTS).is_file() or (s.path / INDEX).is_file())


register(
    Format(
        "huggingface",
        SUFFIX,
        "graph",
        "folder for transformers' from_pretrained: config.json, safetensors (sharded past --max-shard-size)",
        write,
        load,
        aliases=("hf", "transformers"),
        rank=100,
        atol=1e-5,
        rtol=1e-4,
        # Weights and a config, no graph: the folder's class runs at any size its code takes (a position table
        # bounds it), so --dynamic is taken and verification runs it at the other sizes, as for a trace.
        dynamic=DynamicSupport(exported=False),
        # The writer takes each tensor from the checkpoint (_Picked): with --no-verify the module stays on meta.
        writes_from_checkpoint=True,
        size_estimate=size_estimate,
        sniff=_sniff,
        options=HuggingfaceOptions,
        check=_check,
        folder=True,
        select=select_pretrained,
    )
)
