"""`state-dict`: torch.save of the stripped state dict, written straight from the memory-mapped tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import ExportContext, Format, Written, register
from ._io import sink


def write(ctx: ExportContext, path: Path) -> Written:
    import torch

    # To a path, torch.save reports a failed write as "unexpected pos" without the errno; a Sink keeps it.
    with sink(path) as f:
        torch.save(dict(ctx.state_dict), f)
    return Written("torch.save")


def load(path: Path) -> Any:
    """Read back through lexport's own hardened loader: weights_only, each record's size checked against what
    the pickle declares and its CRC-32 against the bytes (memory-mapped, so no second copy). A file that a plain
    torch.load would refuse fails verification here, never publishes."""
    from ..checkpoint import check_declared_sizes, load_checkpoint

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
        needs_module=False,
        # A torch.save zip that is neither TorchScript (code/) nor a torch.export archive: asked last.
        sniff=lambda s: s.has_member("/data.pkl") and not s.has_dir("/code/") and not s.has_member("archive_format"),
        sniff_order=100,
    )
)
