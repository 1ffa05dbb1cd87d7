"""`safetensors`: written by a streaming writer, so no second copy of the weights is ever held in memory.

safetensors' own save_file copies every tensor into bytes first and refuses tensors that share memory (tied
weights); this writer streams each tensor from its (memory-mapped) storage and writes shared tensors once per
key, so the file loads with safetensors' own loader into a model with tied weights as well.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import ExportContext, Format, Written, register

_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
}
_BLOCK = 64 << 20


def _raw_bytes(t: Any) -> Any:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(tensors: Mapping[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """The header from shapes and dtypes alone, then each tensor's bytes: a lazily read mapping (a sharded folder)
    is read one tensor at a time, each dropped once written."""
    from ..statedict import tensor_specs

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensor_specs(tensors).items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        if t.layout.__repr__() != "torch.strided":
            raise TypeError(f"{name}: sparse tensors cannot be stored in safetensors; make it dense first")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors.items():
            data = _raw_bytes(t)
            if len(data) != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise TypeError(f"{name}: {len(data)} bytes read, the header says otherwise")  # a changed source
            for start in range(0, len(data), _BLOCK):
                f.write(data[start : start + _BLOCK])
            del data, t


def size_estimate(ctx: ExportContext) -> int:
    """Every key's bytes (tied weights are written under each key) plus the JSON header."""
    from ..statedict import tensor_specs

    data = sum(t.numel() * t.element_size() for t in tensor_specs(ctx.state_dict).values())
    return data + 256 * len(ctx.state_dict) + (64 << 10)


def write(ctx: ExportContext, path: Path) -> Written:
    write_safetensors(ctx.state_dict, path, {"format": "pt"})
    return Written("lexport.safetensors")


class _SafeOpenMapping:
    """A read-only mapping over safe_open: tensors are read one at a time, on demand."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._f = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._f.keys())

    def keys(self) -> list[str]:
        return self._keys

    def __getitem__(self, key: str) -> Any:
        return self._f.get_tensor(key)


def load(path: Path) -> Any:
    return _SafeOpenMapping(path)


def _sniff(s: Any) -> bool:
    """An 8-byte little-endian header length that fits the file, then the JSON header."""
    if len(s.head) < 9 or s.head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", s.head[:8])
    return 8 + n <= s.size


register(
    Format(
        "safetensors",
        ".safetensors",
        "weights",
        "safetensors file of the state dict (no pickle; tied weights kept under every key)",
        write,
        load,
        aliases=("st",),
        rank=20,
        needs_module=False,
        sniff=_sniff,
        size_estimate=size_estimate,
    )
)
