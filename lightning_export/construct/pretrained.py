"""Hugging Face models inside a LightningModule: finding a transformers PreTrainedModel, exporting one forward
without a KV cache, and peft adapters merged into a copy (the deployed computation), never into the module itself."""

from __future__ import annotations

import copy
import sys
from typing import Any

from ..errors import UsageError


def is_pretrained(module: Any) -> bool:
    """A transformers PreTrainedModel (only when its module is already imported: the user's model made one). Never
    `transformers.PreTrainedModel` on the package: torchmetrics imports transformers whenever it is installed, and
    that attribute loads its modeling stack (a second of imports, torchao's warnings on stderr)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(module, modeling.PreTrainedModel)


def is_peft(module: Any) -> bool:
    peft = sys.modules.get("peft.peft_model")
    return peft is not None and isinstance(module, peft.PeftModel)


def pretrained_candidates(module: Any) -> list[str]:
    """Dotted names of the outermost PreTrainedModels and PeftModels inside `module` (itself excluded)."""
    found: list[str] = []
    for name, sub in module.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        if is_pretrained(sub) or is_peft(sub):
            found.append(name)
    return found


def select_pretrained(module: Any, attr: str | None) -> tuple[str | None, str | None]:
    """(--attr to use, a note) for a format that exports a PreTrainedModel: the one --attr selects, else the one the
    LightningModule holds; exit 2 naming the class and the candidates when it is not one."""
    from .module import select_attr

    target = select_attr(module, attr)
    if is_pretrained(target) or is_peft(target):
        return attr, None
    candidates = [f"{attr}.{c}" if attr else c for c in pretrained_candidates(target)]
    if not candidates and attr:
        # --attr went past the model (model.classifier inside model): the models of the whole LightningModule.
        candidates = pretrained_candidates(module)
    if attr is None and len(candidates) == 1:
        return candidates[0], (f"{type(module).__name__} holds one transformers model, {candidates[0]} "
                               f"({type(select_attr(module, candidates[0])).__name__}): exported as --attr {candidates[0]}")
    what = f"--attr {attr} selects" if attr else "the LightningModule is"
    hint = (f"Select one with {', '.join('--attr ' + c for c in candidates)}." if candidates
            else "No submodule is a transformers.PreTrainedModel.")
    raise UsageError(f"--to huggingface needs a transformers PreTrainedModel: {what} a {type(target).__name__}",
                     hint=hint)


def unwrap_peft(module: Any) -> Any:
    """The transformers model inside a PeftModel (adapters still attached)."""
    return module.get_base_model() if is_peft(module) else module


def without_cache(target: Any) -> str | None:
    """A PreTrainedModel (or peft model) whose config asks for a KV cache returns a DynamicCache that no exporter can
    flatten ("register a pytree"): its forward is exported as one step without one (use_cache=False in the config
    of the module in memory; a saved config keeps the user's value). The note says so; None when nothing changed."""
    model = unwrap_peft(target)
    config = getattr(model, "config", None)
    if config is None or not is_pretrained(model) or not getattr(config, "use_cache", False):
        return None
    config.use_cache = False
    config._lexport_cache_off = True  # travels with deepcopy; a saved config.json keeps the user's use_cache
    generates = bool(getattr(model, "can_generate", lambda: False)())
    return (f"{type(model).__name__}: exported with use_cache=False (one forward without a KV cache, which no "
            "exporter can return)" + ("; generation config unchanged" if generates else ""))


def cache_was_on(config: Any) -> bool:
    """Whether without_cache turned this config's use_cache off (then forgets it: call on a copy to save)."""
    return bool(config.__dict__.pop("_lexport_cache_off", False))


def merged_copy(module: Any) -> tuple[Any, str | None]:
    """`module` with every peft adapter inside merged into a deep copy (merge_and_unload changes a model in place);
    the original is left as it is (the reference computation). (module itself, None) when there is no adapter."""
    if is_peft(module):
        merged = copy.deepcopy(module).merge_and_unload()
        return merged.eval(), _merge_note(module)
    names = [n for n, m in module.named_modules() if n and is_peft(m)]
    if not names:
        return module, None
    top = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    clone = copy.deepcopy(module)
    for name in top:
        parent_name, _, leaf = name.rpartition(".")
        parent = clone.get_submodule(parent_name) if parent_name else clone
        setattr(parent, leaf, parent.get_submodule(leaf).merge_and_unload())
    return clone.eval(), _merge_note(module.get_submodule(top[0]))


def _merge_note(peft_model: Any) -> str:
    adapters = ", ".join(getattr(peft_model, "peft_config", {}) or ["default"])
    kind = type(next(iter(peft_model.peft_config.values()))).__name__ if getattr(peft_model, "peft_config", None) else ""
    return (f"peft adapter {adapters} ({kind}) merged into a copy of the base weights (merge_and_unload): the "
            "artifact is the plain merged model; verified against the unmerged module")
