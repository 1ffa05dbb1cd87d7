"""DeepSpeed checkpoint folders (Lightning's DeepSpeedStrategy): module weights only, never the optimizer states.

What Lightning 2.6 with DeepSpeed 0.19 writes for ``trainer.save_checkpoint("epoch=0-step=2.ckpt")``, as seen in
folders written by a real ``pl.Trainer(strategy=DeepSpeedStrategy(stage=2 or 3))``:

    epoch=0-step=2.ckpt/                               (a folder, named like a file)
      latest                                           the tag: "checkpoint" (Lightning always uses that tag)
      zero_to_fp32.py, zero_to_torch.py                DeepSpeed's conversion scripts (never run, never read)
      checkpoint/
        mp_rank_00_model_states.pt                     ZeRO 1/2: the full module weights under "module", plus
                                                       DeepSpeed's engine state and Lightning's client state
                                                       (epoch, global_step, hyper_parameters, loops, ...)
        zero_pp_rank_0_mp_rank_00_model_states.pt      ZeRO-3 instead: one per rank, "module" holds empty
                                                       placeholders; the weights live in the optim states
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt    one per rank: the optimizer partitions (fp32 master
                                                       weights and moments); they pickle DeepSpeed classes

Lightning >= 2.1 saves the LightningModule's own keys ("model.fc1.weight"); older versions prefixed them with
"_forward_module.", which is stripped here as Lightning's convert_zero_checkpoint_to_fp32_state_dict does.

ZeRO 1/2: ``mp_rank_00_model_states.pt`` is read exactly as a ``.ckpt`` is (safeload's loader: weights_only,
--allow-global, the zip directory checked, CRC-32 of every weight) and its ``module`` becomes the state dict. The
optimizer states are never opened. ZeRO-3: the weights can only be put together from the optimizer partitions,
which DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` does with ``torch.load`` with ``weights_only=False``, i.e.
full unpickling. So that runs only with --trust-checkpoint and an installed deepspeed; otherwise the folder is
refused with the conversion step to take.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, lightning_package
from ..hashing import Hasher
from ..hashing import folder_sha256 as hash_files
from ..safeload.archive import check_file
from ..safeload.loader import load_verified, trusted_load
from ..text import printable
from .base import Checkpoint, OpenOptions, as_checkpoint, is_tensor_mapping
from .dcp_layout import METADATA_FILE
from .folder import existing, inside, required

LATEST_FILE = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0/1/2, no tensor or pipeline parallelism
_ZERO3_MODEL_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
_MP_MODEL_RE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_OPTIM_RE = re.compile(r".*_optim_states\.pt")
_LAYER_RE = re.compile(r"layer_.*model_states\.pt")  # pipeline parallelism
MAX_LATEST_BYTES = 1024  # a tag such as "checkpoint" or "global_step1200"
MAX_TAG_FILES = 100_000
FORWARD_PREFIX = "_forward_module."  # Lightning < 2.1 wrapped the module in _LightningModuleWrapperBase
# DeepSpeed's own entries in a model states file; everything else is Lightning's client state.
DEEPSPEED_KEYS = frozenset(
    """module buffer_names optimizer param_shapes frozen_param_shapes shared_params frozen_param_fragments
    lr_scheduler data_sampler random_ltd sparse_tensor_module_names csr_tensor_module_names skipped_steps
    global_steps global_samples dp_world_size mp_world_size checkpoint_parallel_dimensions ds_config ds_version
    state_dict optimizer_states""".split()
)
def _convert_hint() -> str:
    """The conversion step, named in the Lightning package that is installed here."""
    return (
        "Convert it first, in an environment with deepspeed installed: Lightning's "
        f"`{lightning_package()}.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict(FOLDER, "
        "'model.ckpt')` (then pass model.ckpt to lexport), or DeepSpeed's `python FOLDER/zero_to_fp32.py FOLDER "
        "OUT_DIR`. Both unpickle the folder's files fully (weights_only=False), which runs code from them: only for "
        "a folder you trust."
    )


_COPY_HINT = "Copy the whole folder: latest and the tag folder it names, with its *_model_states.pt files."


def is_deepspeed_folder(path: str | os.PathLike[str]) -> bool:
    """True for a directory that looks like a DeepSpeed checkpoint: a ``latest`` file, or (without one) a sub-folder
    holding ``*_model_states.pt``. A DCP folder (``.metadata``) is not one."""
    p = Path(path)
    if not p.is_dir() or (p / METADATA_FILE).exists():
        return False
    if (p / LATEST_FILE).exists() or (p / LATEST_FILE).is_symlink():
        return True
    with contextlib.suppress(OSError):
        with os.scandir(p) as top:
            for i, entry in enumerate(top):
                if i >= 1000:
                    break
                if entry.is_dir(follow_symlinks=False) and _has_model_states(Path(entry.path)):
                    return True
    return False


def _has_model_states(folder: Path) -> bool:
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        for i, entry in enumerate(it):
            if i >= 1000:
                break
            if entry.name.endswith("model_states.pt"):
                return True
    return False


@dataclass(frozen=True)
class DeepSpeedFolder:
    """A DeepSpeed folder, checked: every path is a regular file inside it (no symlink leading out)."""

    root: Path  # resolved
    tag: str
    tag_dir: Path  # resolved, directly inside root
    zero3: bool
    model_files: tuple[str, ...]  # names in tag_dir: the one mp_rank_00 file, or the ZeRO-3 rank files
    optim_files: tuple[str, ...]  # names in tag_dir: read only by DeepSpeed's ZeRO-3 reconstruction

    def read_files(self) -> list[Path]:
        """The files lexport reads (what the checkpoint's sha256 covers): latest, then the model states; for
        ZeRO-3 also the optimizer partitions."""
        names = [*self.model_files, *(self.optim_files if self.zero3 else ())]
        return [self.root / LATEST_FILE, *(self.tag_dir / n for n in names)]


def open_folder(path: str | os.PathLike[str]) -> DeepSpeedFolder:
    """Find the tag and the model states files; CheckpointError for anything but a complete, plain folder."""
    path = Path(path)
    root = existing(path).resolve()
    tag = _read_tag(root)
    tag_dir = root / tag
    try:
        real = tag_dir.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(
            f"{root}: its {LATEST_FILE} file names the tag {tag!r}, but there is no folder {tag_dir}",
            hint=_COPY_HINT,
        ) from e
    if real.parent != root:
        raise CheckpointError(f"{tag_dir} is a symbolic link to {real}, outside the checkpoint folder; refusing it")
    if not real.is_dir():
        raise CheckpointError(f"{tag_dir} is not a folder (the tag {tag!r} in {root / LATEST_FILE} must name one)")
    try:
        with os.scandir(real) as it:
            names = []
            for entry in it:
                names.append(entry.name)
                if len(names) > MAX_TAG_FILES:
                    raise CheckpointError(f"{real} holds more than {MAX_TAG_FILES:,} entries; refusing it")
    except OSError as e:
        raise CheckpointError(f"cannot list {real}: {e.strerror or e}") from e
    names.sort()
    optim = tuple(n for n in names if _OPTIM_RE.fullmatch(n))
    zero3 = tuple(sorted((n for n in names if _ZERO3_MODEL_RE.fullmatch(n)), key=_rank_of))
    if any(_LAYER_RE.fullmatch(n) for n in names):
        raise CheckpointError(
            f"{real} holds pipeline-parallel layer files (layer_*-model_states.pt); lexport reads ZeRO checkpoints "
            "of a single model-parallel rank only",
            hint=_convert_hint(),
        )
    mp = [n for n in names if _MP_MODEL_RE.fullmatch(n)]
    others = [n for n in mp + list(zero3) if not n.endswith("mp_rank_00_model_states.pt")]
    if others:
        raise CheckpointError(
            f"{real} holds model states of several model-parallel ranks ({', '.join(others[:3])}); lexport reads "
            "DeepSpeed checkpoints without tensor or pipeline parallelism only",
        )
    if MODEL_STATES in names:
        inside(real, MODEL_STATES, copy_hint=_COPY_HINT)
        return DeepSpeedFolder(root, tag, real, False, (MODEL_STATES,), optim)
    if zero3:
        for name in (*zero3, *optim):
            inside(real, name, copy_hint=_COPY_HINT)  # a link out of the folder is refused before anything is read
        return DeepSpeedFolder(root, tag, real, True, zero3, optim)
    if any(n == MODEL_STATES or n.endswith("model_states.pt") for n in names):
        raise CheckpointError(f"{real}: its model states files are not ones DeepSpeed writes ({', '.join(names[:4])})")
    raise CheckpointError(
        f"{root} is a DeepSpeed checkpoint folder without model states: {real} has no {MODEL_STATES} "
        "(ZeRO 1/2) nor zero_pp_rank_*_mp_rank_00_model_states.pt (ZeRO-3)",
        hint=_COPY_HINT,
    )


def _rank_of(name: str) -> int:
    m = _ZERO3_MODEL_RE.fullmatch(name)
    return int(m.group(1)) if m else -1


def _read_tag(root: Path) -> str:
    latest = root / LATEST_FILE
    real = required(root, LATEST_FILE, copy_hint=_COPY_HINT, missing=(
        f"{root} is a folder without {LATEST_FILE}: not a checkpoint, or an incomplete copy of a DeepSpeed one "
        "(DeepSpeed names the tag folder to read in it)"
    ))
    size = real.stat().st_size
    if size > MAX_LATEST_BYTES:
        raise CheckpointError(f"{latest} is {size:,} bytes; DeepSpeed writes a tag name of a few bytes there")
    try:
        tag = real.read_bytes()[:MAX_LATEST_BYTES].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the tag in {latest}: {e}") from e
    if not tag or "/" in tag or "\\" in tag or tag in (".", "..") or not tag.isprintable():
        raise CheckpointError(
            f"{latest} names the tag {tag!r}, which is not a plain folder name inside the checkpoint folder"
        )
    return tag


# ------------------------------------------------------------------------------------------- reading
def load_deepspeed(
    folder: str | os.PathLike[str],
    *,
    trust: bool = False,
    allow_globals: tuple[str, ...] = (),
    max_growth: float,
) -> tuple[DeepSpeedFolder, dict[str, Any]]:
    """(the folder, the dict a .ckpt would have held): Lightning's client state (epoch, global_step,
    hyper_parameters, ...) plus ``state_dict``, the module's weights under Lightning's key names."""
    ds = open_folder(folder)
    if ds.zero3:
        return ds, _load_zero3(ds, trust=trust, allow_globals=allow_globals)
    path = ds.tag_dir / MODEL_STATES
    obj, module = _load_model_states(path, trust=trust, allow_globals=allow_globals, max_growth=max_growth)
    return ds, _as_lightning(obj, module)


def _load_model_states(
    path: Path, *, trust: bool, allow_globals: tuple[str, ...], max_growth: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model states file with exactly the checks load_checkpoint makes on a .ckpt (safeload.loader.load_verified)."""
    return load_verified(path, lambda obj: ((obj, module := _module_weights(path, obj)), module), trust=trust,
                         allow_globals=allow_globals, max_growth=max_growth)


def _module_weights(path: Path, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict) or "module" not in obj:
        what = type(obj).__name__
        keys = printable(", ".join(map(str, list(obj)[:8]))) if isinstance(obj, dict) else ""
        raise CheckpointError(
            f"{path} holds a {what} without the 'module' entry DeepSpeed writes there"
            + (f" (keys: {keys or 'nothing'})" if isinstance(obj, dict) else "")
        )
    module = obj["module"]
    if isinstance(module, dict) and not module:
        raise CheckpointError(f"{path}: its 'module' entry is empty (no weights to export)")
    if not is_tensor_mapping(module):
        raise CheckpointError(f"{path}: its 'module' entry does not hold tensors")
    stage = _zero_stage(obj)
    placeholders = [k for k, t in module.items() if t.numel() == 0 and _declared_numel(obj, k)]
    if stage == 3 or placeholders:
        raise CheckpointError(
            f"{path}: the module weights are ZeRO-3 placeholders (empty tensors; the weights are partitioned in the "
            "optimizer states), although the file is named like a ZeRO 1/2 one",
            hint=_convert_hint(),
        )
    mp = obj.get("mp_world_size")
    if isinstance(mp, int) and not isinstance(mp, bool) and mp > 1:
        raise CheckpointError(f"{path}: the model is split over {mp} model-parallel ranks; lexport reads one")
    return dict(module)


def _zero_stage(obj: dict[str, Any]) -> int | None:
    config = obj.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else None


def _declared_numel(obj: dict[str, Any], key: str) -> int:
    """The size DeepSpeed recorded for a parameter in param_shapes (0 when it recorded none)."""
    import math

    groups = obj.get("param_shapes")
    for group in groups if isinstance(groups, list) else ():
        shape = group.get(key) if isinstance(group, dict) else None
        if isinstance(shape, (tuple, list)) and all(isinstance(d, int) and d >= 0 for d in shape):
            return math.prod(shape)
    return 0


def strip_forward_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Keys as the LightningModule names them: "_forward_module." (Lightning < 2.1) removed when every key has it."""
    if state_dict and all(k.startswith(FORWARD_PREFIX) for k in state_dict):
        return {k[len(FORWARD_PREFIX):]: v for k, v in state_dict.items()}
    return state_dict


def _as_lightning(client: dict[str, Any], state_dict: dict[str, Any]) -> dict[str, Any]:
    """The dict a .ckpt would have held: Lightning's client state without DeepSpeed's engine entries."""
    obj = {k: v for k, v in client.items() if k not in DEEPSPEED_KEYS}
    obj["state_dict"] = strip_forward_prefix(state_dict)
    return obj


# ------------------------------------------------------------------------------------------- ZeRO-3
def _load_zero3(ds: DeepSpeedFolder, *, trust: bool, allow_globals: tuple[str, ...]) -> dict[str, Any]:
    import importlib.util

    ranks = len(ds.model_files)
    what = (
        f"{ds.root} is a DeepSpeed ZeRO-3 checkpoint: its model states hold only placeholders and the weights are "
        f"partitioned over the optimizer states of {ranks} rank{'s' if ranks > 1 else ''}, which only DeepSpeed's "
        "reconstruction reads, by unpickling them fully (torch.load with weights_only=False)"
    )
    trust_hint = (
        "Or, only if you trust the folder completely: --trust-checkpoint (lexport then runs DeepSpeed's "
        "get_fp32_state_dict_from_zero_checkpoint, full unpickling: runs code from the files)."
    )
    if importlib.util.find_spec("deepspeed") is None:
        raise CheckpointError(f"{what}; deepspeed is not installed here.", hint=_convert_hint())
    if not trust:
        raise CheckpointError(f"{what}.", hint=f"{_convert_hint()}\n{trust_hint}")
    if not ds.optim_files:
        raise CheckpointError(f"{ds.tag_dir} has no *_optim_states.pt files: a ZeRO-3 checkpoint's weights are "
                              "in them", hint=_COPY_HINT)
    for name in (*ds.model_files, *ds.optim_files):
        check_file(ds.tag_dir / name)
    # Lightning's client state from rank 0's model states, as Lightning's own conversion takes it (trusted: full).
    client = trusted_load(ds.tag_dir / ds.model_files[0])
    if not isinstance(client, dict):
        raise CheckpointError(f"{ds.tag_dir / ds.model_files[0]} holds a {type(client).__name__}, not a dict")
    state_dict = _deepspeed_reconstruction(ds)
    return _as_lightning(client, state_dict)


def _deepspeed_reconstruction(ds: DeepSpeedFolder) -> dict[str, Any]:
    """DeepSpeed's own get_fp32_state_dict_from_zero_checkpoint; what it prints goes to stderr (stdout is the
    JSON report's)."""
    import warnings

    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except Exception as e:  # noqa: BLE001 - a broken deepspeed install raises anything on import
            raise CheckpointError(f"deepspeed is installed but cannot be imported: {e}") from e
        try:
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ds.root), tag=ds.tag)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises anything on a damaged folder
            raise CheckpointError(
                f"{ds.root}: DeepSpeed's ZeRO-3 reconstruction failed ({type(e).__name__}: {str(e)[:300]}) "
                "[loaded with --trust-checkpoint]"
            ) from e
    if not is_tensor_mapping(state_dict):
        raise CheckpointError(f"{ds.root}: DeepSpeed's ZeRO-3 reconstruction gave no tensors")
    return dict(state_dict)


# ------------------------------------------------------------------------------------------ hashing
def folder_sha256(ds: DeepSpeedFolder) -> str:
    """sha256 over the files lexport reads (DeepSpeedFolder.read_files), in order: each contributes its path in
    the folder, its size and its sha256. Optimizer states that are never read are not hashed either."""
    return hash_files("lexport-deepspeed-folder-v1", ((p.relative_to(ds.root).as_posix(), p) for p in ds.read_files()))


def detect(path: Path) -> bool:
    return is_deepspeed_folder(path)


def open(path: Path, options: OpenOptions) -> Checkpoint:  # noqa: A001 - the verb every source module has
    """ZeRO 1/2 module weights as a .ckpt's; ZeRO-3 only through DeepSpeed, with --trust-checkpoint."""
    ds, obj = load_deepspeed(path, trust=options.trust, allow_globals=options.allow_globals,
                             max_growth=options.max_growth)
    hasher = Hasher(ds.root, lambda: folder_sha256(ds))
    if options.hash_file:
        hasher.start()
    return as_checkpoint(path, obj, hasher, file_bytes=sum(p.stat().st_size for p in ds.read_files()))
