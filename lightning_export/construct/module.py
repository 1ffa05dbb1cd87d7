"""Building the LightningModule as load_from_checkpoint does (on the meta device when it can), strict loading that
reports every mismatch at once, and selecting --attr."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..bounded import short_repr
from ..errors import UserModuleError
from ..statedict import strip_prefix, tensor_specs


@dataclass
class BuiltModule:
    module: Any  # the whole LightningModule
    target: Any  # the selected submodule (or the module itself)
    attr: str | None
    state_dict: Mapping[str, Any]  # the checkpoint's tensors under the attr's prefix, prefix stripped (lazy for a folder)
    notes: list[str] = field(default_factory=list)
    built_on_meta: bool = False
    # The parameters were left on the meta device (build_module(parameters=False)): the module has its structure
    # (names, shapes, dtypes, ties, config) and its buffers, and every parameter is read from `state_dict` by whoever
    # needs it. load_parameters() fills them when something turns out to need the values.
    parameters_on_meta: bool = False
    checkpoint_raw: Mapping[str, Any] | None = field(default=None, repr=False)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while building; buffers and other tensors stay real.

    Parameters are the bulk and come from the checkpoint anyway; buffers (often non-persistent, e.g. caches)
    must keep the values __init__ computes. Same idea as accelerate's init_empty_weights(include_buffers=False).
    """
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: Any) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        # Already-meta parameters (tied weights assigned twice) keep their identity.
        if type(p) is nn.Parameter and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _construct(cls: type, kwargs: dict[str, Any]) -> Any:
    obj = cls(**kwargs)
    obj.configure_model()  # a no-op unless overridden, as in load_from_checkpoint
    return obj


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's, Python's and numpy's global generators seeded from --seed while the user's code builds the module
    (an example_input_array drawn with torch.randn in __init__ is then the same every run, and so are the bytes of
    formats that embed it); the caller's generator states are restored afterwards."""
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def build_module(
    cls: type,
    kwargs: dict[str, Any],
    checkpoint_raw: dict[str, Any],
    *,
    attr: str | None,
    meta: bool = True,
    parameters: bool = True,
) -> BuiltModule:
    """Build like load_from_checkpoint: cls(**kwargs), configure_model(), on_load_checkpoint(), strict load.

    `parameters=False` (only with `meta`): the checkpoint is checked against the module as strictly, its buffers are
    loaded, and its parameters stay on the meta device when the checkpoint holds each of them as the module has it
    (same dtype, tied names with equal values): nothing of the weights is read into memory. Otherwise (built
    normally, a cast, tied names the checkpoint holds different values under) they are loaded as usual."""
    notes: list[str] = []
    built_on_meta = False
    obj = None
    if meta:
        try:
            with _parameters_on_meta():
                obj = _construct(cls, kwargs)
            built_on_meta = True
        except Exception as e:  # noqa: BLE001 - any failure on meta: retry with a normal build
            notes.append(f"built normally: the module cannot be built on the meta device ({type(e).__name__}: {e})")
            obj = None
    if obj is None:
        try:
            obj = _construct(cls, kwargs)
        except Exception as e:
            raise UserModuleError(
                f"building {cls.__name__}({_fmt_kwargs(kwargs)}) failed: {type(e).__name__}: {e}",
                hint="Check the hyper_parameters against the class, or supply arguments with --init-arg KEY=VALUE.",
            ) from e
    try:
        obj.on_load_checkpoint(checkpoint_raw)
    except Exception as e:
        raise UserModuleError(f"{cls.__name__}.on_load_checkpoint failed: {type(e).__name__}: {e}") from e
    full_sd = checkpoint_raw["state_dict"]
    on_meta = built_on_meta and not parameters and _structure_only(obj, full_sd, what=cls.__name__)
    if not on_meta:
        casts = load_strict(obj, full_sd, what=cls.__name__)
        if casts:
            notes.append(_cast_note(casts, cls.__name__))
    named = [*obj.named_buffers()] if on_meta else [*obj.named_parameters(), *obj.named_buffers()]
    leftovers = [n for n, t in named if t.device.type == "meta"]
    if leftovers:
        raise UserModuleError(f"after loading, these tensors have no values: {', '.join(leftovers[:10])}")
    target = select_attr(obj, attr)
    prefix = f"{attr}." if attr else ""
    sd = strip_prefix(full_sd, prefix)
    if attr:
        load_strict(target, sd, what=f"{cls.__name__}.{attr}", check_only=True)
    return BuiltModule(obj, target, attr, sd, notes, built_on_meta, on_meta, checkpoint_raw if on_meta else None)


def load_parameters(built: BuiltModule) -> None:
    """The parameters a build_module(parameters=False) left on the meta device, loaded as build_module loads them
    (something needs their values: a peft adapter merged, the module run)."""
    if not built.parameters_on_meta or built.checkpoint_raw is None:
        return
    what = type(built.module).__name__
    casts = load_strict(built.module, built.checkpoint_raw["state_dict"], what=what)
    if casts:
        built.notes.append(_cast_note(casts, what))
    built.parameters_on_meta, built.checkpoint_raw = False, None


def _structure_only(module: Any, state_dict: Mapping[str, Any], *, what: str) -> bool:
    """Check the checkpoint against the module as load_strict does and load its buffers, leaving the parameters on
    the meta device; False (nothing changed) when the parameters must be loaded after all: a floating tensor stored
    in another dtype than the module's (load_strict casts it), or names the module ties that the checkpoint holds
    different values under (loading unties them). Tied names are compared one tensor at a time, by digest."""
    load_strict(module, state_dict, what=what, check_only=True)
    specs = tensor_specs(state_dict)
    expected = module.state_dict(keep_vars=True)
    if any(specs[k].dtype != t.dtype for k, t in expected.items()):
        return False
    for names in _tied_parameters(module):
        present = [n for n in names if n in specs]
        if len({_digest(state_dict[n]) for n in present}) > 1:
            return False
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    buffers = {k: state_dict[k] for k in expected if k not in params}
    if buffers:
        try:
            module.load_state_dict(buffers, strict=False, assign=True)
        except Exception as e:
            raise UserModuleError(f"loading the checkpoint into {what} failed: {e}") from e
    return True


def _digest(t: Any) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes (a tensor read from a folder is freed once hashed)."""
    import hashlib

    import torch

    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    c = t.detach().contiguous()
    if c.numel():
        h.update(c.reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def load_strict(module: Any, state_dict: Mapping[str, Any], *, what: str, check_only: bool = False) -> dict[str, Any]:
    """Strict loading that collects every missing, unexpected and mis-shaped key before failing once. Floating
    tensors stored in another dtype than the module's (a Trainer(precision="16-true") checkpoint into the float32
    parameters the constructor makes) are cast into the module's dtype, as load_from_checkpoint's copy does;
    returns {key: (stored dtype, module dtype)} of those."""
    expected = module.state_dict(keep_vars=True)
    specs = tensor_specs(state_dict)  # shapes without reading a lazily read folder's tensors
    missing = [k for k in expected if k not in specs]
    unexpected = [k for k in specs if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(specs[k].shape)} vs module {tuple(expected[k].shape)}"
        for k in expected
        if k in specs and tuple(specs[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatch:\n    " + "\n    ".join(mismatched[:20]))
        if missing:
            parts.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(missing[:20]))
        if unexpected:
            parts.append(f"in the checkpoint but not in the module ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        overlap = len(set(expected) & set(state_dict))
        hint = (
            "The checkpoint and the module have no tensor name in common: is --module the class this "
            "checkpoint was trained with?"
            if overlap == 0
            else "Are the init arguments the ones it was trained with? Pass them with --init-arg KEY=VALUE."
        )
        raise UserModuleError(f"the checkpoint does not fit {what}:\n  " + "\n  ".join(parts), hint=hint)
    if check_only:
        return {}
    casts = {
        k: (specs[k].dtype, t.dtype) for k, t in expected.items()
        if specs[k].dtype != t.dtype and specs[k].dtype.is_floating_point and t.dtype.is_floating_point
    }
    tied = _tied_parameters(module)
    try:
        if specs is state_dict and not casts:
            module.load_state_dict(state_dict, strict=True, assign=True)
        else:
            _load_in_groups(module, state_dict, specs, {k: to for k, (_, to) in casts.items()})
    except Exception as e:
        raise UserModuleError(f"loading the checkpoint into {what} failed: {e}") from e
    _retie(module, tied)
    return casts


def _tied_parameters(module: Any) -> list[list[str]]:
    """Names of each parameter the module holds under several names (tied embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: Any, tied: list[list[str]]) -> None:
    """load_state_dict(assign=True) assigns each name its own tensor, untying what the constructor tied (Lightning's
    load_from_checkpoint copies into the tied parameter instead): the names share one parameter again when the
    checkpoint holds equal values under them."""
    import torch

    for names in tied:
        first = module.get_parameter(names[0])
        for name in names[1:]:
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            other = parent._parameters[leaf]
            if other is not first and other.shape == first.shape and torch.equal(other, first):
                parent._parameters[leaf] = first


def _cast_note(casts: dict[str, Any], cls_name: str) -> str:
    pairs: dict[tuple[str, str], int] = {}
    for stored, made in casts.values():
        key = (str(stored).removeprefix("torch."), str(made).removeprefix("torch."))
        pairs[key] = pairs.get(key, 0) + 1
    said = ", ".join(f"{n} tensor{'s' if n > 1 else ''} stored in {a} cast to {b}" for (a, b), n in pairs.items())
    return (f"{said}: the dtypes {cls_name}'s constructor creates, as load_from_checkpoint does (graph formats "
            "compute in them; weights formats keep the stored tensors; --precision fp16|bf16 asks for reduced "
            "precision)")


_GROUP_BYTES = 64 << 20


def _load_in_groups(module: Any, state_dict: Mapping[str, Any], specs: Mapping[str, Any],
                    casts: Mapping[str, Any]) -> None:
    """Assign a state dict a group of tensors at a time, about _GROUP_BYTES each (a larger tensor alone), each tensor
    cast to the dtype `casts` gives for its key on the way: module.load_state_dict would first copy a lazily read
    mapping (a sharded folder) into a dict, and casting all at once would hold every cast copy at the same time. The
    keys were checked strictly already; each group is loaded with assign=True through the module's own
    load_state_dict, so its hooks run as usual."""
    group: dict[str, Any] = {}
    size = 0
    for key, spec in specs.items():
        nbytes = spec.numel() * spec.element_size()
        if group and size + nbytes > _GROUP_BYTES:
            module.load_state_dict(group, strict=False, assign=True)
            group, size = {}, 0
        group[key] = state_dict[key].to(casts[key]) if key in casts else state_dict[key]
        size += nbytes
    if group:
        module.load_state_dict(group, strict=False, assign=True)


def select_attr(module: Any, attr: str | None) -> Any:
    from torch import nn

    if not attr:
        return module
    obj = module
    walked: list[str] = []
    for part in attr.split("."):
        children = _child_names(obj)
        nxt = None
        if isinstance(obj, nn.Module) and part in obj._modules:
            nxt = obj._modules[part]
        else:
            try:  # a property of the user's class runs here (LightningModule.trainer raises when detached)
                nxt = getattr(obj, part, None)
            except Exception as e:
                raise UserModuleError(
                    f"--attr {attr!r}: reading {part!r} of {'.'.join(walked) or type(module).__name__} failed: "
                    f"{type(e).__name__}: {' '.join(str(e).split())[:200]}",
                    hint=f"--attr selects a submodule. Submodules there: {', '.join(children) or 'none'}",
                ) from e
        if nxt is None:
            where = ".".join(walked) or type(module).__name__
            raise UserModuleError(
                f"--attr {attr!r}: {where} has no submodule {part!r}",
                hint=f"Its submodules: {', '.join(children) or 'none'}",
            )
        walked.append(part)
        obj = nxt
    if not isinstance(obj, nn.Module):
        parent = module if len(walked) == 1 else select_attr(module, ".".join(walked[:-1]))
        raise UserModuleError(
            f"--attr {attr!r} is a {type(obj).__name__}, not an nn.Module",
            hint=f"Submodules there: {', '.join(_child_names(parent)) or 'none'}",
        )
    return obj


def _child_names(obj: Any) -> list[str]:
    from torch import nn

    if not isinstance(obj, nn.Module):
        return []
    return [f"{n} ({type(m).__name__})" for n, m in obj.named_children()]


def _fmt_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())


def _short(v: Any) -> str:
    return short_repr(v, limit=40)
