"""Example inputs: --input specs, --example-inputs files, example_input_array, and random inputs like them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import UsageError, UserModuleError

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
# An example input is generated once per verification run; these keep a typo ("100000000000") from asking for
# terabytes.
MAX_INPUT_ELEMENTS = 1 << 26  # 64 Mi elements: 256 MB of float32
MAX_INPUT_DIMS = 16
_SPEC = re.compile(
    r"^\s*([a-z0-9]+)\s*\[\s*([0-9]{1,12}(?:\s*,\s*[0-9]{1,12})*)?\s*\]\s*"
    r"(?::\s*(-?[0-9]{1,12})\s*\.\.\s*(-?[0-9]{1,12}))?\s*$"
)


@dataclass(frozen=True)
class InputSpec:
    dtype: str
    shape: tuple[int, ...]
    low: int | None = None  # integer inputs: values drawn from low..high (inclusive)
    high: int | None = None

    def __str__(self) -> str:
        rng = f":{self.low}..{self.high}" if self.low is not None else ""
        return f"{self.dtype}[{','.join(map(str, self.shape))}]{rng}"


def parse_input_spec(text: str) -> InputSpec:
    """Parse `float32[2,10]`; raises UsageError with an example when malformed."""
    m = _SPEC.match(text) if len(text) <= 200 else None
    if not m:
        raise UsageError(
            f"--input {text[:60]!r} is malformed: expected DTYPE[D0,D1,...], e.g. --input float32[2,10]",
        )
    dtype, dims = m.group(1), m.group(2)
    if dtype not in DTYPES:
        raise UsageError(f"--input {text!r}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    low = high = None
    if m.group(3) is not None:
        low, high = int(m.group(3)), int(m.group(4))
        if dtype.startswith("float") or dtype in ("bfloat16", "bool"):
            raise UsageError(f"--input {text!r}: a value range is for integer inputs (e.g. int64[2,16]:0..30000)")
        if low > high:
            raise UsageError(f"--input {text!r}: the range {low}..{high} is empty")
    if len(shape) > MAX_INPUT_DIMS:
        raise UsageError(f"--input {text!r}: {len(shape)} dimensions; at most {MAX_INPUT_DIMS} are supported")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise UsageError(
            f"--input {text!r}: {math.prod(shape):,} elements; an example input may have at most "
            f"{MAX_INPUT_ELEMENTS:,}",
            hint="Verification needs a representative input, not a full-size batch: use a batch of 1 or 2.",
        )
    return InputSpec(dtype, shape, low, high)


@dataclass
class Inputs:
    """Positional and keyword arguments of one forward call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def describe(self) -> str:
        import torch
        from torch.utils._pytree import tree_flatten

        leaves, _ = tree_flatten((self.args, self.kwargs))
        parts = [
            f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
            for t in leaves
        ]
        return ", ".join(parts) or "(no inputs)"

    def tensors(self) -> list[Any]:
        import torch
        from torch.utils._pytree import tree_flatten

        leaves, _ = tree_flatten((self.args, self.kwargs))
        return [t for t in leaves if isinstance(t, torch.Tensor)]


def from_value(value: Any) -> Inputs:
    """Lightning's convention: a tuple/list are positional args, a dict keyword args, else one argument."""
    if isinstance(value, dict):
        return Inputs((), dict(value))
    if isinstance(value, (tuple, list)):
        return Inputs(tuple(value), {})
    return Inputs((value,), {})


def from_specs(specs: list[InputSpec], seed: int, int_high: int | None = None) -> Inputs:
    """Random inputs for --input specs; integers in the spec's range, else 0..int_high-1 (the vocabulary of the
    module's first embedding, when it has one), else 0..9."""
    import torch

    g = torch.Generator().manual_seed(seed)
    args = []
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            t = torch.randn(spec.shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, spec.shape, generator=g).bool()
        elif spec.low is not None and spec.high is not None:
            t = torch.randint(spec.low, spec.high + 1, spec.shape, generator=g, dtype=torch.int64).to(dtype)
        else:
            t = torch.randint(0, int_high or 10, spec.shape, generator=g, dtype=torch.int64).to(dtype)
        args.append(t)
    return Inputs(tuple(args), {})


def embedding_vocabulary(module: Any) -> int | None:
    """num_embeddings of the first nn.Embedding in the module (the one integer inputs usually feed), if any."""
    from torch import nn

    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return int(m.num_embeddings)
    return None


# What an --example-inputs file holds (it is loaded like a checkpoint: data.files.load_tensor_file).
FILE_HINT = "Save a tensor, a tuple/list of tensors (nesting allowed) or a dict of them with torch.save."


def from_module(target: Any, lightning_module: Any) -> Inputs | None:
    for m in (target, lightning_module):
        value = getattr(m, "example_input_array", None) if m is not None else None
        if value is not None:
            return from_value(value)
    return None


def random_like(example: Inputs, seed: int, batch: int | None = None,
                sizes: dict[int, dict[int, int]] | None = None) -> Inputs:
    """Same structure as `example`: floats standard normal, ints uniform in the example's range, bools random.

    With `batch`, dim 0 of every tensor of rank >= 1 is set to it; with `sizes`, {tensor leaf: {dim: size}}.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    g = torch.Generator().manual_seed(seed)
    leaves, spec = tree_flatten((example.args, example.kwargs))
    out = []
    n = -1
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        n += 1
        shape = list(t.shape)
        if batch is not None and shape:
            shape[0] = batch
        for dim, size in (sizes or {}).get(n, {}).items():
            shape[dim] = size
        if t.dtype.is_floating_point:
            new = torch.randn(shape, generator=g, dtype=torch.float32).to(t.dtype)
        elif t.dtype == torch.bool:
            new = torch.randint(0, 2, shape, generator=g).bool()
        elif t.dtype.is_complex:
            new = torch.randn(shape, generator=g, dtype=t.dtype)
        else:
            lo = int(t.min()) if t.numel() else 0
            hi = int(t.max()) if t.numel() else 1
            new = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64).to(t.dtype)
        out.append(new)
    args, kwargs = tree_unflatten(out, spec)
    return Inputs(tuple(args), dict(kwargs))


def batch_size(example: Inputs) -> int | None:
    sizes = {t.shape[0] for t in example.tensors() if t.dim() >= 1}
    return sizes.pop() if len(sizes) == 1 else None


def run_forward(module: Any, inputs: Inputs) -> Any:
    """Eager forward, eval mode, no_grad; a failure is the user's module's (exit 4)."""
    import torch

    try:
        with torch.no_grad():
            return module(*inputs.args, **inputs.kwargs)
    except Exception as e:
        raise ForwardFailed(type(module).__name__, inputs.describe(), f"{type(e).__name__}: {e}") from e


class ForwardFailed(UserModuleError):
    """The module's forward raised on `inputs` (described); its parts as data: `reason` is what forward raised
    (`Type: text`), `source` where the inputs came from when the pipeline says (`with_source`)."""

    def __init__(self, module: str, inputs: str, reason: str, *, source: str | None = None) -> None:
        self.module, self.inputs, self.reason, self.source = module, inputs, reason, source
        message = f"forward of {module} failed on inputs {inputs}: {reason}"
        super().__init__(
            message if source is None else f"{message}\n(the inputs are {source})",
            hint="Give the inputs forward expects with --input DTYPE[D0,D1,...] (one per argument) or "
            "--example-inputs FILE.",
        )

    def with_source(self, source: str) -> ForwardFailed:
        """The same failure, saying where the inputs came from."""
        return ForwardFailed(self.module, self.inputs, self.reason, source=source)


def detached(value: Any) -> Any:
    """`value` (an output tree) with every tensor detached and cloned: a reference no later call can change."""
    from torch.utils._pytree import tree_map

    def clone(x: Any) -> Any:
        return x.detach().clone() if hasattr(x, "detach") else x

    return tree_map(clone, value)
