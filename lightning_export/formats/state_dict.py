"""`state-dict`: torch.save of the stripped state dict, written straight from the memory-mapped tensors."""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..statedict import is_lazy
from . import ExportContext, Format, Written, register
from ._io import sink


def write(ctx: ExportContext, path: Path) -> Written:
    import torch

    # To a path, torch.save reports a failed write as "unexpected pos" without the errno; a Sink keeps it.
    with sink(path) as f:
        if is_lazy(ctx.state_dict):
            save_streaming(ctx.state_dict, f)
        else:
            torch.save(dict(ctx.state_dict), f)  # type: ignore[arg-type]  # a file-like Sink
    return Written("torch.save")


def _placeholder(shape: Any, dtype: Any) -> Any:
    """A CPU tensor of this shape and dtype whose memory is an anonymous mapping never touched: it takes address
    space, not memory, and pickles exactly as the real tensor does (torch.save's pickle records only the storage's
    identity, type, size and location, never its bytes)."""
    import torch

    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).reshape(shape)


class _FillingWriter:
    """torch's zip writer, given each placeholder's storage: writes the real tensor's bytes in its place, read from
    the source just then and dropped after (the writer computes the record's CRC-32 from those bytes)."""

    def __init__(self, writer: Any, fetch: dict[int, Any]) -> None:
        self.writer, self.fetch, self.filled = writer, fetch, 0

    def write_record(self, name: str, data: Any, size: int) -> None:
        import torch

        key = data.data_ptr() if isinstance(data, torch.UntypedStorage) else None
        if key in self.fetch:
            real = self.fetch.pop(key)()
            storage = real.untyped_storage()
            if storage.nbytes() != size or real.storage_offset() != 0 or not real.is_contiguous():
                raise RuntimeError(f"{name}: the tensor read does not match its placeholder ({storage.nbytes()} bytes)")
            self.writer.write_record(name, storage, size)
            self.filled += 1
            del real, storage
        else:
            self.writer.write_record(name, data, size)


def save_streaming(tensors: Mapping[str, Any], f: Any) -> None:
    """The bytes torch.save(dict(tensors), f) writes, holding one tensor at a time: `tensors` is a lazily read
    mapping (statedict.LazyTensors) whose every item is a new contiguous CPU tensor with its own storage.

    torch's own pickler and zip writer run on placeholders of the same shapes and dtypes (so data.pkl, record
    names, 64-byte alignment, CRC-32s and the serialization id are torch's), and each record's bytes are those of the
    tensor read just for it. torch.serialization.skip_data does not give the same file: its FakeTensors pickle the
    device string once per tensor instead of memoizing it, and it writes CRC-32 0 for every record."""
    import pickle

    import torch
    import torch.serialization as ts

    specs = tensors.specs()  # type: ignore[attr-defined]
    held: dict[str, Any] = {}
    fetch: dict[int, Any] = {}
    for key, spec in specs.items():
        if spec.device.type == "meta":
            ph = _placeholder(spec.shape, spec.dtype)
            if ph.numel():
                fetch[ph.untyped_storage().data_ptr()] = lambda key=key: tensors[key]
            else:
                ph = tensors[key]  # no bytes: the real (empty) tensor itself
            held[key] = ph
        else:
            held[key] = spec  # a value assigned in memory: saved as it is
    writer = torch._C.PyTorchFileWriter(f, ts.get_crc32_options(), ts._get_storage_alignment())
    filling = _FillingWriter(writer, fetch)
    expected = len(fetch)
    ts._save(held, filling, pickle, ts.DEFAULT_PROTOCOL, False)
    writer.write_end_of_file()
    f.flush()
    if filling.filled != expected:
        raise RuntimeError(f"torch.save wrote {filling.filled} of {expected} tensors")


def load(path: Path) -> Any:
    """Read back through lexport's own hardened loader: weights_only, each record's size checked against what
    the pickle declares and its CRC-32 against the bytes (memory-mapped, so no second copy). A file that a plain
    torch.load would refuse fails verification here, never publishes."""
    from ..safeload.archive import check_declared_sizes
    from ..sources import load_checkpoint

    check_declared_sizes(path)
    return load_checkpoint(path, hash_file=False).state_dict


register(
    Format(
        "state-dict",
        ".pt",
        "weights",
        "bare state dict for model.load_state_dict (torch.save)",
        write,
        load,
        aliases=("pt", "state_dict", "statedict"),
        rank=10,
        needs_module=False,
        # A torch.save zip that is neither TorchScript (code/) nor a torch.export archive: asked last.
        sniff=lambda s: s.has_member("/data.pkl") and not s.has_dir("/code/") and not s.has_member("archive_format"),
        sniff_order=100,
    )
)
