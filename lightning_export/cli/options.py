"""Flags shared by the commands that load a checkpoint and build its module (export, verify): one definition
each, so they read and behave the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# The panels of `lexport --help`, in this order: typer lists a panel where its first option is, so each command
# declares its options panel by panel. Help texts are rich markup in export and verify: a literal `[tool...]`
# (a '[' then a lower-case letter) is written `\\[tool...]`.
INPUTS = "Inputs: the module, its arguments, example inputs"
VERIFICATION = "Verification"
OUTPUT = "Output"
PRECISION = "Precision and int8"
DATA = "Data (--data: calibration and held-out verification)"
SAFETY = "Safety (what the checkpoint may do)"
FORMAT_OPTIONS = "Format options"
REPORT = "Settings and report"

Module = Annotated[str | None, typer.Option("--module", "-m", metavar="CLASS", help="LightningModule class: pkg.mod:Class, pkg.mod.Class or path/to/file.py:Class. Optional for state-dict and safetensors.", rich_help_panel=INPUTS)]  # noqa: E501
Attr = Annotated[str | None, typer.Option("--attr", "-a", metavar="PATH", help="Dotted path of the submodule to export (model, encoder, heads.cls). Default: the whole LightningModule.", rich_help_panel=INPUTS)]  # noqa: E501
Config = Annotated[Path | None, typer.Option(metavar="FILE", help="LightningCLI config.yaml: its model: section gives the class and init args.", rich_help_panel=INPUTS)]  # noqa: E501
InitArg = Annotated[list[str], typer.Option("--init-arg", metavar="KEY=VALUE", help="KEY=VALUE constructor argument (VALUE is YAML); repeatable; overrides the checkpoint's hyper_parameters.", rich_help_panel=INPUTS)]  # noqa: E501
InitArgs = Annotated[Path | None, typer.Option("--init-args", metavar="FILE", help="YAML/JSON file of constructor arguments; {class_path, init_args} values are instantiated.", rich_help_panel=INPUTS)]  # noqa: E501
InputSpecs = Annotated[list[str], typer.Option("--input", metavar="DTYPE[DIMS]", help="DTYPE[D0,D1,...] per forward argument, e.g. float32[2,10]; repeatable. Default: example_input_array.", rich_help_panel=INPUTS)]  # noqa: E501
ExampleInputs = Annotated[Path | None, typer.Option(metavar="FILE", help=".pt file with a tensor, a tuple of args (nesting allowed) or a dict of kwargs.", rich_help_panel=INPUTS)]  # noqa: E501
DynamicBatch = Annotated[bool, typer.Option("--dynamic-batch", help="Same as --dynamic 0: dim 0 (the batch) of every input dynamic.", rich_help_panel=VERIFICATION)]  # noqa: E501
Dynamic = Annotated[list[str], typer.Option("--dynamic", metavar="SPEC", help="Dims that take other sizes: DIMS for every input (--dynamic 0,1) or NAME=DIMS for one (a forward parameter or dict key: --dynamic input_ids=0,1); a DIM may be bounded, DIM:MIN..MAX (--dynamic 0,1:1..512). Repeatable. Verified at smaller and larger sizes of each dim. onnx, exported-program, openvino, aoti, executorch (bounded: MAX, else 4x the example), torchscript (checked); not tflite.", rich_help_panel=VERIFICATION)]  # noqa: E501
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace existing outputs.", rich_help_panel=OUTPUT)]
Atol = Annotated[float | None, typer.Option(metavar="FLOAT", help="Absolute tolerance (default per format: torchscript and exported-program 1e-5, onnx 1e-4).", rich_help_panel=VERIFICATION)]  # noqa: E501
Rtol = Annotated[float | None, typer.Option(metavar="FLOAT", help="Relative tolerance (default per format: torchscript and exported-program 1e-5, onnx 1e-3).", rich_help_panel=VERIFICATION)]  # noqa: E501
Seed = Annotated[int, typer.Option(metavar="INT", help="Seed of the random verification inputs.", rich_help_panel=VERIFICATION)]
RandomInputs = Annotated[int, typer.Option(metavar="N", help="Random inputs checked besides the example.", min=0, rich_help_panel=VERIFICATION)]
TrustCheckpoint = Annotated[bool, typer.Option("--trust-checkpoint", help="Unpickle the checkpoint fully. This RUNS CODE FROM THE FILE: only for files you trust.", rich_help_panel=SAFETY)]  # noqa: E501
AllowGlobal = Annotated[list[str], typer.Option("--allow-global", metavar="NAME", help="Allow classes in the checkpoint (pkg.mod.Name, or several comma-separated) for the safe loader; repeatable.", rich_help_panel=SAFETY)]  # noqa: E501
MaxGrowth = Annotated[float, typer.Option("--max-growth", metavar="FACTOR", help="Refuse a checkpoint whose tensors (or zip records) would take more than FACTOR times the bytes they occupy in the file, plus 64 MiB: views, stride tricks, zip bombs.", rich_help_panel=SAFETY)]  # noqa: E501
StrictFinite = Annotated[bool, typer.Option("--strict-finite", help="NaN/Inf in weights or example outputs is an error (exit 4), not a warning.", rich_help_panel=VERIFICATION)]  # noqa: E501
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout and nothing else there.", rich_help_panel=REPORT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.", rich_help_panel=REPORT)]
Precision = Annotated[str | None, typer.Option("--precision", metavar="P", help="fp32, fp16 or bf16: graph formats compute in that precision (weights cast, floating inputs and outputs in it), verified against the module with looser default tolerances (fp16 1e-2, bf16 1e-1). Without it, graphs compute in the dtypes the module's constructor creates (a 16-true checkpoint's tensors are cast into them, as load_from_checkpoint does).", rich_help_panel=PRECISION)]  # noqa: E501
Quantize = Annotated[str | None, typer.Option("--quantize", metavar="Q", help="int8: static int8 (weights and activations) for onnx, executorch and openvino, calibrated on --data and gated on top-1 agreement on its held-out batches. int8-dynamic: onnx only; onnxruntime's dynamic quantization of the exported graph, verified against the fp32 module (default atol/rtol 1e-1).", rich_help_panel=PRECISION)]  # noqa: E501
Data = Annotated[str | None, typer.Option("--data", metavar="SOURCE", help="Real batches: a .pt file holding a list of batches (each a tensor, a tuple or a dict, as in a dataloader; loaded weights_only), or 'config' (the data: section of --config builds the LightningDataModule; its val, else test, else train loader). Every artifact is also checked on held-out batches (top-1 agreement); --quantize int8 calibrates on the others.", rich_help_panel=DATA)]  # noqa: E501
DataBatches = Annotated[int | None, typer.Option("--data-batches", metavar="N", help="Batches read from --data (default: enough for about 600 samples; half calibrate, half verify with --quantize int8).", rich_help_panel=DATA)]  # noqa: E501
DataInput = Annotated[str | None, typer.Option("--data-input", metavar="INDEX|KEY", help="The element (index) or key of each batch that is forward's input, when the rule (a tensor as is; a tuple's first element unless forward takes that many arguments; a dict as keyword arguments) is wrong.", rich_help_panel=DATA)]  # noqa: E501
MinAgreement = Annotated[float | None, typer.Option("--min-agreement", metavar="X", help="Quantized (int8, int8-dynamic) and fp16/bf16 artifacts must pick the eager module's top-1 class on this share of the held-out --data samples; below it is exit 1 (default 0.99).", rich_help_panel=DATA)]  # noqa: E501
FormatOption = Annotated[list[str], typer.Option("--format-option", metavar="FORMAT.OPTION=VALUE", help="Set a format's own option (repeatable): onnx.opset=17, or an option of a format added by a plugin. Wins over the option's own flag.", rich_help_panel=FORMAT_OPTIONS)]  # noqa: E501
InputNames = Annotated[list[str], typer.Option("--input-names", metavar="A,B", help="onnx: graph input names, one per input tensor in forward's order (comma-separated or repeatable). Default: forward's parameter names, dict keys appended (batch_x).", rich_help_panel=FORMAT_OPTIONS)]  # noqa: E501
OutputNames = Annotated[list[str], typer.Option("--output-names", metavar="Y", help="onnx: graph output names, one per output tensor (comma-separated or repeatable). Default: output; output_0, output_1 for a tuple; the keys of a dict.", rich_help_panel=FORMAT_OPTIONS)]  # noqa: E501
