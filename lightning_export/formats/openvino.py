"""`openvino`: torch.export → `openvino.convert_model` → an IR pair `<stem>.xml` + `<stem>.bin`, run by OpenVINO's
CPU plugin.

- The `.bin` (the weights) is a companion of the `.xml`, staged beside it and published with it (the `.bin` first,
  the `.xml` last), as ONNX external data is. The `.xml` records the `.bin`'s sha256 (rt_info `lexport`), so a
  manifest's sha256 of the `.xml` covers the weights too: a `.bin` that changed fails verification.
- Weights are stored in float32: `openvino.save_model` compresses them to FP16 unless `compress_to_fp16=False`,
  which is what lexport passes; `--precision fp16` stores float16 weights (about half the `.bin`) and an IR that
  takes and returns float16.
- Verification compiles the IR for "CPU" with `INFERENCE_PRECISION_HINT=f32`: on CPUs with AMX or AVX512-BF16 the
  plugin's default is bf16, which would verify a different computation than the one compared.
- Shapes are the example's; `--dynamic` makes the dims it names dynamic (-1, or MIN..MAX).

openvino is an optional extra: `pip install 'lightning-export[openvino]'`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import ExportError, describe_exception
from . import DynamicSupport, ExportContext, Format, Quantization, Written, installed_check, register
from ._graph import (
    DimSpecialized,
    captured_stdout,
    check_program_dims,
    dynamic_info,
    dynamic_shapes_for,
    exporting,
    graph_estimate,
)
from ._int8 import INT8_TOLERANCE, WorkDir, artifact_bytes, int8_info, require_calibration, tensor_leaves

INSTALL_HINT = "Install it with: pip install 'lightning-export[openvino]' (or pip install openvino)."
NNCF_HINT = "Install it with: pip install 'lightning-export[openvino]' (or pip install openvino nncf)."
# The CPU plugin's inference precision for verification (and the one to deploy with for the verified numbers).
INFERENCE_PRECISION = "f32"
RT_INFO_KEY = "lexport"  # <rt_info><lexport><weights_sha256 value=.../></lexport></rt_info> in the .xml


def require() -> str:
    """The installed openvino's version; an ExportError naming the pip line when it is missing."""
    try:
        with captured_stdout(stderr=True):
            import openvino
    except ImportError as e:
        raise ExportError(
            f"--to openvino needs the openvino package, which is not installed ({e.msg})", hint=INSTALL_HINT
        ) from e
    except Exception as e:  # noqa: BLE001 - installed but broken (a shared library that does not load): say so
        raise ExportError(f"openvino is installed but cannot be imported: {describe_exception(e)}",
                          hint=INSTALL_HINT) from e
    return str(openvino.get_version()).split("-")[0]


def bin_path(xml: Path) -> Path:
    """Where OpenVINO reads an IR's weights: the `.xml`'s name with `.bin` for its suffix."""
    return xml.with_suffix(".bin")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write(ctx: ExportContext, path: Path) -> Written:
    import torch

    version = require()
    import openvino as ov

    precision = ctx.precision
    ex = ctx.inputs()
    tensors = list(ex.tensors())
    frontend = "torch.export"
    with exporting(ctx):
        program = torch.export.export(ctx.module(), ex.args, ex.kwargs or None, dynamic_shapes=dynamic_shapes_for(ctx),
                                      strict=False)
        source: Any = program
        try:
            check_program_dims(program, ctx.dynamic, "openvino")
        except DimSpecialized:
            # torch.export unrolls nn.GRU/nn.LSTM over the example's length (its while_loop form is one OpenVINO's
            # converter runs wrongly at other lengths); OpenVINO's TorchScript frontend maps them to its own
            # sequence ops, whose length is dynamic. Anything else that fixes a dim keeps the message.
            if not _has_rnn(ctx.module()) or ex.kwargs or len(tensors) != len(ex.args):
                raise
            source = ctx.module()
            frontend = "torchscript"
        try:
            model = ov.convert_model(source) if source is program else ov.convert_model(
                source, example_input=_ov_example(ex))
        except Exception as e:  # noqa: BLE001 - OpenVINO's frontend refused an op: its reason, exit 5
            raise ExportError(
                f"openvino.convert_model cannot convert the module: {describe_exception(e)}",
                hint="The exported program is fine (torch.export captured it); OpenVINO's PyTorch frontend lacks "
                "something it uses. The run's other formats are unaffected.",
            ) from e
        _stable_names(model, type(ctx.target).__name__)
        # convert_model leaves every dim of an exported program dynamic; pin the example's shapes (-1 for the
        # --dynamic dims, or their MIN..MAX) so the IR says what it was verified for.
        shapes = []
        if len(model.inputs) == len(tensors):
            new = {}
            for i, (port, t) in enumerate(zip(model.inputs, tensors)):
                dims: list[Any] = list(t.shape)
                for d in (ctx.dynamic.of_leaf(i) if ctx.dynamic is not None else []):
                    dims[d.dim] = -1 if d.min is None and d.max is None else [d.min or 1, d.max or -1]
                new[port] = ov.PartialShape([ov.Dimension(*x) if isinstance(x, list) else x for x in dims])
                shapes.append(dims)
            model.reshape(new)
        ov.save_model(model, str(path), compress_to_fp16=False)
        # Record the weights' sha256 in the .xml (the .bin does not change on the second save).
        model.set_rt_info(_sha256(bin_path(path)), [RT_INFO_KEY, "weights_sha256"])
        ov.save_model(model, str(path), compress_to_fp16=False)
        try:
            # Compile once here: what the CPU plugin cannot run is an export failure (exit 5), not a failed check.
            ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION})
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"OpenVINO's CPU plugin cannot compile the IR: {describe_exception(e)}") from e
    default_hint = _default_cpu_precision(ov)
    info: dict[str, Any] = {
        "openvino": version,
        "frontend": frontend,
        "inference_precision_hint": INFERENCE_PRECISION,
        "cpu_default_inference_precision": default_hint,
        "weights_type": "float16" if precision == "fp16" else "float32",
        "compress_to_fp16": False,
        "input_shapes": shapes or [list(t.shape) for t in tensors],
        "shapes": "the --dynamic dims dynamic (-1, or [MIN, MAX]), the others static (the example's)"
        if ctx.dynamic is not None else "static (the example's)",
        **({"dynamic_dims": dynamic_info(ctx.dynamic)} if ctx.dynamic is not None else {}),
        "bin_bytes": bin_path(path).stat().st_size,
    }
    notes = []
    if frontend == "torchscript":
        notes.append("nn.GRU/nn.LSTM with a dynamic length: converted by OpenVINO's TorchScript frontend (its own "
                     "sequence ops; torch.export fixes the length)")
    if default_hint and default_hint != INFERENCE_PRECISION:
        notes.append(
            f"verified with INFERENCE_PRECISION_HINT={INFERENCE_PRECISION}; this CPU's default is {default_hint}: "
            "pass the same hint when deploying for the verified numbers"
        )
    return Written(f"openvino.convert_model {version}", notes, info)


def _has_rnn(module: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.RNNBase) for m in module.modules())


def _stable_names(model: Any, name: str) -> None:
    """OpenVINO names the model `Model<N>` and unnamed ops `<Type>_<N>` from process-wide counters, so a second
    export in one process would write other bytes: name them by their position in the graph instead."""
    model.set_friendly_name(name)
    ops = list(model.get_ordered_ops())
    taken = {op.get_friendly_name() for op in ops if op.get_friendly_name() != op.get_name()}
    for i, op in enumerate(ops):
        if op.get_friendly_name() == op.get_name():  # never named: the counter's name
            new = f"{op.get_type_name()}_{i}"
            while new in taken:
                new += "_"
            taken.add(new)
            op.set_friendly_name(new)


def _default_cpu_precision(ov: Any) -> str | None:
    try:
        hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
        return str(hint.get_type_name() if hasattr(hint, "get_type_name") else hint)
    except Exception:  # noqa: BLE001 - informative only
        return None


class OpenVINORunner:
    """Calls an IR like the module: tensor leaves of (args, kwargs) in order, returns the list of outputs."""

    def __init__(self, path: Path, precision_hint: str = INFERENCE_PRECISION) -> None:
        require()
        import openvino as ov

        weights = bin_path(path)
        if not weights.is_file():
            raise RuntimeError(f"{weights.name} (the IR's weights) is not beside {path.name}")
        core = ov.Core()
        model = core.read_model(str(path), str(weights))
        if model.has_rt_info([RT_INFO_KEY, "weights_sha256"]):
            recorded = model.get_rt_info([RT_INFO_KEY, "weights_sha256"]).astype(str)
            if _sha256(weights) != recorded:
                raise RuntimeError(f"{weights.name} is not the weights file written with {path.name} (sha256 differs)")
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision_hint})
        self.inputs = list(self.compiled.inputs)

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        import torch
        from torch.utils._pytree import tree_leaves

        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.inputs):
            raise RuntimeError(f"the IR takes {len(self.inputs)} inputs, {len(tensors)} were given")
        feed = []
        for t in tensors:
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:
                raise RuntimeError("OpenVINO's Python API takes numpy arrays, and numpy has no bfloat16")
            feed.append(t.contiguous().numpy())
        result = self.compiled(feed)
        return [torch.from_numpy(result[out].copy()) for out in self.compiled.outputs]


def load(path: Path) -> Any:
    return OpenVINORunner(path)


def companions(path: Path) -> list[Path]:
    """The `.bin` beside an `.xml` (`lexport verify`, the manifest)."""
    weights = bin_path(path)
    return [weights] if weights.is_file() and weights != path else []


def _sniff(s: Any) -> bool:
    """An OpenVINO IR: an XML document whose root element is `<net ...>`."""
    if s.zip_names is not None:
        return False
    head = s.head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"<"):
        return False
    try:
        with open(s.path, "rb") as f:
            start = f.read(512)
    except OSError:
        return False
    if start.startswith(b"<?xml"):
        start = start[start.find(b"?>") + 2:] if b"?>" in start else b""
    return start.lstrip().startswith(b"<net ")


def require_nncf() -> tuple[str, str]:
    """(openvino version, nncf version); ExportError naming the extra when either is missing."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise ExportError(f"static int8 for openvino needs openvino and nncf ({e})", hint=NNCF_HINT) from e
    return str(ov.__version__), str(nncf.__version__)


def _ov_example(example: Any) -> Any:
    tensors = tensor_leaves(example)
    if example.kwargs or len(tensors) != len(example.args):
        raise ExportError("static int8 for openvino takes modules whose forward takes tensors as positional "
                          "arguments (keyword or nested inputs are not supported here yet)")
    return tuple(example.args) if len(example.args) > 1 else example.args[0]


def write_int8(ctx: ExportContext, path: Path) -> Written:
    """Static int8 OpenVINO IR (`path` .xml + its .bin beside it) of ctx.target, quantized by NNCF on
    ctx.calibration (every batch), saved with `compress_to_fp16=False`."""
    calibration = ctx.calibration
    require_calibration(calibration)
    ov_version, nncf_version = require_nncf()
    import nncf
    import openvino as ov

    module, example = ctx.module(), ctx.inputs()
    feeds = [tuple(t.detach().cpu().contiguous().numpy() for t in tensor_leaves(b)) for b in calibration]
    with exporting(ctx), WorkDir(path) as work:
        try:
            ov_model = ov.convert_model(module, example_input=_ov_example(example))
            fp32 = work / "fp32.xml"
            ov.save_model(ov_model, str(fp32), compress_to_fp16=False)
            fp32_bytes = fp32.stat().st_size + fp32.with_suffix(".bin").stat().st_size
            quantized = nncf.quantize(ov_model, nncf.Dataset(feeds), subset_size=len(feeds))
            ov.save_model(quantized, str(path), compress_to_fp16=False)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"static int8 OpenVINO export failed: {describe_exception(e)}") from e
    int8_bytes = artifact_bytes(path)
    info = int8_info(
        "nncf.quantize (OpenVINO IR; symmetric int8 weights per channel, int8 activations)", calibration,
        fp32_bytes, int8_bytes, openvino=ov_version, nncf=nncf_version,
    )
    notes = [f"static int8: {int8_bytes:,} bytes (.xml + .bin), {info['size_ratio']:.2f}x the fp32 IR "
             f"({fp32_bytes:,} bytes), calibrated on {info['calibration_samples']} samples"]
    return Written("openvino.convert_model + nncf.quantize", notes, info)


register(
    Format(
        "openvino",
        ".xml",
        "graph",
        "OpenVINO IR (.xml + .bin) for Intel CPUs, GPUs and NPUs; float32 weights by default",
        write,
        load,
        aliases=("ov", "openvino-ir"),
        rank=80,
        atol=1e-4,
        rtol=1e-4,
        dynamic=DynamicSupport(),
        size_estimate=graph_estimate,  # the .bin holds the weights (float32 by default), the .xml a few kB per op
        sniff=_sniff,
        companions=companions,
        check=installed_check(require),
        precisions=("fp32", "fp16"),
        quantizations={"int8": Quantization(write_int8, calibrated=True, atol=INT8_TOLERANCE[0], rtol=INT8_TOLERANCE[1],
                                            description="static int8 (calibrated on --data)", require=require_nncf)},
        refusals={"bf16": "--to openvino takes --precision fp16, not bf16: an OpenVINO IR's bf16 is the CPU plugin's "
                  "inference precision (INFERENCE_PRECISION_HINT), not a weight type lexport stores"},
    )
)
