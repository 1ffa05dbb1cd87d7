"""Comparing an artifact with the eager module: output trees within tolerance, weight files bit for bit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .errors import Advice


class JsonRecord(Protocol):
    """A result that says itself as JSON at the edge (agreement.Agreement)."""

    def to_json(self) -> dict[str, Any]: ...


@dataclass
class HeldOutCheck:
    """With --data: what the held-out batches said of an artifact (top-1 agreement and accuracies), whether the
    --min-agreement gate applied, and how many samples were read."""

    result: JsonRecord  # agreement.Agreement (compare sits below agreement: typed by what it is asked)
    gated: bool
    min_agreement: float | None  # the gate, when gated
    source: str | None  # where the batches came from (a file, a datamodule)
    samples_read: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {**self.result.to_json(), "min_agreement": self.min_agreement, "gated": self.gated,
               "source": self.source}
        if self.samples_read is not None:
            out["samples_read"] = self.samples_read
        return out


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    problem: str | None = None


@dataclass
class Verification:
    passed: bool
    inputs_checked: int
    max_abs_diff: float
    max_rel_diff: float
    atol: float | None
    rtol: float | None
    outputs: list[OutputCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # With --data: top-1 agreement and accuracies on the held-out batches and the gate, and the same in words for the
    # human report.
    agreement: HeldOutCheck | None = None
    agreement_text: str | None = None
    gate_problem: str | None = None  # the --min-agreement gate's failure (also among `problems`)
    # What works instead, when the failure has a known cause (a graph traced at the example's data-dependent
    # sizes): the advice of the run's exit-1 error, and what the pipeline adds to it (the submodules to export).
    advice: Advice | None = None
    advice_said: list[str] = field(default_factory=list)
    # With --dynamic: every run's input shapes ({"run": label, "shapes": [[...], ...]}), the other sizes included.
    shapes_checked: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "passed": self.passed,
            "inputs_checked": self.inputs_checked,
            "max_abs_diff": _finite_or_none(self.max_abs_diff),
            "max_rel_diff": _finite_or_none(self.max_rel_diff),
            "atol": self.atol,
            "rtol": self.rtol,
            "outputs": [
                {
                    "name": o.name,
                    "shape": list(o.shape),
                    "max_abs_diff": _finite_or_none(o.max_abs_diff),
                    "max_rel_diff": _finite_or_none(o.max_rel_diff),
                    "passed": o.passed,
                    **({"problem": o.problem} if o.problem else {}),
                }
                for o in self.outputs
            ],
            "problems": self.problems,
        }
        if self.agreement is not None:
            out["agreement"] = self.agreement.to_json()
        if self.advice:
            out["advice"] = self.advice.value
        if self.shapes_checked is not None:
            out["shapes_checked"] = self.shapes_checked
        return out


def _finite_or_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else (x if math.isfinite(x) else None)


def flatten_outputs(value: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    """Leaves of an output tree in order, named like `output[0]`, `output['logits']`."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in flatten_outputs(v, f"{prefix}[{k!r}]")]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in flatten_outputs(v, f"{prefix}[{i}]")]
    if is_dataclass(value) and not isinstance(value, type):  # its fields, in order, named like a dict's
        return [leaf for f in fields(value)
                for leaf in flatten_outputs(getattr(value, f.name), f"{prefix}[{f.name!r}]")]
    return [(prefix, value)]


# Looser tolerances for low-precision outputs, whatever the format's default.
_DTYPE_TOL = {"float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1.6e-2)}


def compare_outputs(
    expected_runs: list[Any], actual_runs: list[Any], *, atol: float, rtol: float, labels: list[str] | None = None
) -> Verification:
    """Compare every output leaf of every run; collect all mismatches, then decide once."""
    import torch

    checks: dict[str, OutputCheck] = {}
    problems: list[str] = []
    for run, (expected, actual) in enumerate(zip(expected_runs, actual_runs)):
        label = labels[run] if labels else f"input {run}"
        exp_leaves = flatten_outputs(expected)
        act_leaves = [v for _, v in flatten_outputs(actual)]
        if len(exp_leaves) != len(act_leaves):
            problems.append(f"{label}: the artifact returned {len(act_leaves)} outputs, the module {len(exp_leaves)}")
            continue
        for (name, e), a in zip(exp_leaves, act_leaves):
            check = checks.setdefault(name, OutputCheck(name, (), 0.0, 0.0, True))
            if not isinstance(e, torch.Tensor):
                if e != a and not (isinstance(a, torch.Tensor) and a.numel() == 1 and a.item() == e):
                    check.passed = False
                    check.problem = f"{label}: value {a!r} != {e!r}"
                continue
            a = torch.as_tensor(a)
            check.shape = tuple(e.shape)
            if tuple(a.shape) != tuple(e.shape):
                check.passed = False
                check.problem = f"{label}: shape {tuple(a.shape)} != {tuple(e.shape)}"
                continue
            abs_d, rel_d, ok = _tensor_diff(e, a, atol, rtol)
            check.max_abs_diff = max(check.max_abs_diff, abs_d)
            check.max_rel_diff = max(check.max_rel_diff, rel_d)
            if not ok:
                check.passed = False
                check.problem = check.problem or f"{label}: outside atol={atol:g} rtol={rtol:g}"
    outs = list(checks.values())
    passed = not problems and bool(outs) and all(o.passed for o in outs)
    return Verification(
        passed=passed,
        inputs_checked=len(expected_runs),
        max_abs_diff=max((o.max_abs_diff for o in outs), default=0.0),
        max_rel_diff=max((o.max_rel_diff for o in outs), default=0.0),
        atol=atol,
        rtol=rtol,
        outputs=outs,
        problems=problems,
    )


def _tensor_diff(e: Any, a: Any, atol: float, rtol: float) -> tuple[float, float, bool]:
    import torch

    if not (e.dtype.is_floating_point or e.dtype.is_complex):
        a = a.to(e.dtype)
        if torch.equal(e, a):
            return 0.0, 0.0, True
        return float((e.to(torch.float64) - a.to(torch.float64)).abs().max()), math.inf, False
    atol_d, rtol_d = _DTYPE_TOL.get(str(e.dtype).removeprefix("torch."), (0.0, 0.0))
    atol, rtol = max(atol, atol_d), max(rtol, rtol_d)
    e64, a64 = e.detach().to(torch.float64), a.detach().to(torch.float64)
    both_nan = torch.isnan(e64) & torch.isnan(a64)
    same_inf = torch.isinf(e64) & (e64 == a64)
    diff = (e64 - a64).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    rel = diff / e64.abs().clamp_min(1e-12)
    rel = torch.where(diff == 0, torch.zeros_like(rel), rel)
    ok = bool((diff <= atol + rtol * e64.abs().nan_to_num(0.0)).all()) if e.numel() else True
    abs_d = float(diff.max()) if e.numel() else 0.0
    rel_d = float(rel.max()) if e.numel() else 0.0
    return abs_d, rel_d, ok


_CHUNK = 16 << 20  # bytes compared at a time: bounded extra memory for any tensor size


def _words(t: Any) -> Any:
    """The tensor's bytes as a flat view: int64 words when size and alignment allow (8x fewer elements)."""
    import torch

    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    raw = t.reshape(-1).view(torch.uint8)
    if raw.numel() % 8 == 0 and raw.data_ptr() % 8 == 0:
        return raw.view(torch.int64)
    return raw


def tensors_bit_equal(a: Any, b: Any) -> bool:
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    va, vb = _words(a), _words(b)
    if va.dtype != vb.dtype:  # one side unaligned: compare bytes
        va, vb = va.view(torch.uint8), vb.view(torch.uint8)
    step = _CHUNK // va.element_size()
    for start in range(0, va.numel(), step):
        if not torch.equal(va[start : start + step], vb[start : start + step]):
            return False
    return True


def _attr_mismatch(expected: list[str], actual: list[str]) -> str | None:
    """When the two key sets are one another under a submodule prefix, the --attr that makes them meet."""
    def under(longer: list[str], shorter: list[str]) -> str | None:
        first = longer[0]
        for i, ch in enumerate(first):
            if ch == ".":
                prefix = first[: i + 1]
                if len(longer) == len(shorter) and {prefix + k for k in shorter} == set(longer):
                    return prefix[:-1]
        return None

    if not expected or not actual:
        return None
    attr = under(expected, actual)
    if attr is not None:
        return (f"the artifact holds the weights of {attr!r} (its keys are the checkpoint's without {attr + '.'!r}): "
                f"verify with --attr {attr}, as it was exported")
    attr = under(actual, expected)
    if attr is not None:
        return (f"the artifact's keys all start with {attr + '.'!r}: it was exported with another --attr than this "
                "verify's; give the --attr it was exported with")
    return None


def compare_tensor_maps(expected: Mapping[str, Any], actual: Any) -> Verification:
    """Bit-exact: same keys, dtypes, shapes and bytes. `actual` maps names to tensors (loaded lazily)."""
    problems: list[str] = []
    actual_keys = set(actual.keys())
    missing = [k for k in expected if k not in actual_keys]
    extra = sorted(actual_keys - set(expected))
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:10])}")
    if extra:
        problems.append(f"unexpected keys: {', '.join(extra[:10])}")
    if missing and extra:
        said = _attr_mismatch(list(expected), sorted(actual_keys))
        if said:
            problems.append(said)
    for k in expected:
        if k in actual_keys:
            # One pair at a time, dropped before the next is read: `expected` may read each tensor from a sharded
            # folder when asked for it (statedict.LazyTensors), and `actual` from the artifact.
            t, got = expected[k], actual[k]
            if got.dtype != t.dtype or tuple(got.shape) != tuple(t.shape):
                problems.append(f"{k}: {got.dtype}{list(got.shape)} written, {t.dtype}{list(t.shape)} expected")
            elif not tensors_bit_equal(t, got):
                problems.append(f"{k}: values differ")
            del t, got
    return Verification(
        passed=not problems,
        inputs_checked=len(expected),
        max_abs_diff=0.0 if not problems else math.nan,
        max_rel_diff=0.0 if not problems else math.nan,
        atol=None,
        rtol=None,
        problems=problems,
    )
