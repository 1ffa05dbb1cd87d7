"""Agreement between an artifact and the eager module on real batches: do they make the same decisions?

For an int8 or reduced-precision artifact a max-abs-diff says little; what a deployment needs is that the
artifact picks the same class as the trained model. For every output that holds class scores (a floating tensor
whose last dimension is >= 2 and whose rank is >= 2), `measure` counts the positions where the artifact's argmax
over the last dimension equals the eager module's (top-1 agreement); when the batches carry integer labels whose
shape is the scores' without the last dimension, it also counts both accuracies. Labels < 0 (ignore_index) are
not counted. `gate` turns the figures into a pass/fail with a message that gives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_MIN_AGREEMENT = 0.99


@dataclass
class OutputAgreement:
    name: str  # "output", "output[0]", "output['logits']"
    classes: int  # size of the last dimension
    compared: int = 0  # positions (samples x other dims) compared
    agreed: int = 0
    labelled: int = 0  # positions with a label >= 0
    eager_correct: int = 0
    artifact_correct: int = 0
    max_abs_diff: float = 0.0  # drift of the scores themselves, for the report
    sum_abs_diff: float = 0.0
    scores: int = 0  # elements behind sum_abs_diff

    @property
    def mean_abs_diff(self) -> float | None:
        return self.sum_abs_diff / self.scores if self.scores else None

    @property
    def rate(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def eager_accuracy(self) -> float | None:
        return self.eager_correct / self.labelled if self.labelled else None

    @property
    def artifact_accuracy(self) -> float | None:
        return self.artifact_correct / self.labelled if self.labelled else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "classes": self.classes,
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": _round(self.rate),
            "labelled": self.labelled,
            "eager_accuracy": _round(self.eager_accuracy),
            "artifact_accuracy": _round(self.artifact_accuracy),
            "max_abs_diff": _round(self.max_abs_diff),
            "mean_abs_diff": _round(self.mean_abs_diff),
        }


@dataclass
class Agreement:
    """Figures over every class-score output; `outputs` is empty when the module returns none (regression,
    embeddings), and then `agreement` is None: there is no decision to compare."""

    batches: int = 0
    samples: int = 0
    outputs: list[OutputAgreement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # structure mismatches between artifact and module

    @property
    def applicable(self) -> bool:
        return bool(self.outputs)

    @property
    def agreement(self) -> float | None:
        """The lowest agreement over the class-score outputs (the gate's figure)."""
        rates = [o.rate for o in self.outputs if o.rate is not None]
        return min(rates) if rates else None

    @property
    def eager_accuracy(self) -> float | None:
        return self.outputs[0].eager_accuracy if self.outputs else None

    @property
    def artifact_accuracy(self) -> float | None:
        return self.outputs[0].artifact_accuracy if self.outputs else None

    def describe(self) -> str:
        if not self.outputs:
            return f"no class-score output to compare ({self.samples} samples)"
        parts = []
        for o in self.outputs:
            text = f"{o.name}: top-1 agreement {o.rate:.2%} ({o.agreed}/{o.compared})"
            if o.mean_abs_diff is not None:
                text += f", score drift mean {o.mean_abs_diff:.3g} max {o.max_abs_diff:.3g}"
            if o.labelled:
                text += f", accuracy {o.artifact_accuracy:.2%} (eager {o.eager_accuracy:.2%}, {o.labelled} labels)"
            parts.append(text)
        return f"{'; '.join(parts)} on {self.samples} held-out samples in {self.batches} batches"

    def to_json(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "agreement": _round(self.agreement),
            "eager_accuracy": _round(self.eager_accuracy),
            "artifact_accuracy": _round(self.artifact_accuracy),
            "outputs": [o.to_json() for o in self.outputs],
            "problems": list(self.problems),
        }


def _round(x: float | None) -> float | None:
    import math

    return None if x is None or not math.isfinite(x) else round(x, 6)


def is_class_scores(t: Any) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2 and t.shape[-1] >= 2


def measure(expected_runs: list[Any], actual_runs: list[Any], labels: list[Any] | None = None,
            masks: list[Any] | None = None) -> Agreement:
    """Top-1 agreement (and accuracies) over paired runs: `expected_runs[i]` is the eager output on batch i,
    `actual_runs[i]` the artifact's, `labels[i]` the batch's integer labels or None, `masks[i]` its attention mask
    or None: token-level scores ([B, S, V] logits) are compared at the positions the mask keeps only (padding
    decides nothing). Output trees are flattened as verify.flatten_outputs does (an artifact runner's flat list
    lines up with the module's tree)."""
    import torch

    from .compare import flatten_outputs

    result = Agreement()
    by_name: dict[str, OutputAgreement] = {}
    for i, (expected, actual) in enumerate(zip(expected_runs, actual_runs)):
        exp_leaves = flatten_outputs(expected)
        act_leaves = [v for _, v in flatten_outputs(actual)]
        result.batches += 1
        if len(exp_leaves) != len(act_leaves):
            result.problems.append(f"batch {i}: the artifact returned {len(act_leaves)} outputs, the module "
                                   f"{len(exp_leaves)}")
            continue
        lab = labels[i] if labels is not None and i < len(labels) else None
        mask = masks[i] if masks is not None and i < len(masks) else None
        counted = False
        for (name, e), a in zip(exp_leaves, act_leaves):
            if not is_class_scores(e):
                continue
            a = torch.as_tensor(a)
            if tuple(a.shape) != tuple(e.shape):
                result.problems.append(f"batch {i}: {name} has shape {tuple(a.shape)}, the module's {tuple(e.shape)}")
                continue
            o = by_name.setdefault(name, OutputAgreement(name, int(e.shape[-1])))
            e_top = e.detach().argmax(-1)
            a_top = a.detach().to(torch.float32).argmax(-1)
            diff = (e.detach().to(torch.float64) - a.detach().to(torch.float64)).abs()
            diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
            if diff.numel():
                o.max_abs_diff = max(o.max_abs_diff, float(diff.max()))
                o.sum_abs_diff += float(diff.sum())
                o.scores += diff.numel()
            kept = (torch.as_tensor(mask) != 0 if mask is not None and tuple(mask.shape) == tuple(e_top.shape)
                    else torch.ones_like(e_top, dtype=torch.bool))
            o.compared += int(kept.sum())
            o.agreed += int(((e_top == a_top) & kept).sum())
            if lab is not None and tuple(lab.shape) == tuple(e_top.shape):
                lab64 = lab.to(torch.int64)
                valid = (lab64 >= 0) & kept
                o.labelled += int(valid.sum())
                o.eager_correct += int(((e_top == lab64) & valid).sum())
                o.artifact_correct += int(((a_top == lab64) & valid).sum())
            if not counted:
                result.samples += int(e.shape[0])
                counted = True
    result.outputs = list(by_name.values())
    return result


def gate(result: Agreement, min_agreement: float = DEFAULT_MIN_AGREEMENT, *, what: str = "the artifact") -> str | None:
    """None when `result` passes; else the failure message, with the figures. A result without class-score
    outputs passes here (there is nothing to gate on; tolerances judge it)."""
    if result.problems:
        return f"{what}: {result.problems[0]}"
    rate = result.agreement
    if rate is None:
        return None
    if rate < min_agreement:
        worst = min(result.outputs, key=lambda o: o.rate if o.rate is not None else 1.0)
        detail = (f"{what} picks the eager module's top-1 class on {worst.agreed} of {worst.compared} "
                  f"held-out {'samples' if worst.compared == result.samples else 'positions'} ({rate:.2%}), below "
                  f"--min-agreement {min_agreement:g}")
        if worst.labelled:
            detail += (f"; accuracy {worst.artifact_accuracy:.2%} against the eager module's "
                       f"{worst.eager_accuracy:.2%}")
        return detail
    return None


def require(result: Agreement, min_agreement: float = DEFAULT_MIN_AGREEMENT, *, what: str = "the artifact") -> None:
    """Raise VerificationError (exit 1) with the figures when `gate` fails."""
    from .errors import VerificationError

    problem = gate(result, min_agreement, what=what)
    if problem is not None:
        raise VerificationError(
            problem,
            hint="Calibrate on more representative batches (--data, --data-batches), keep the format in fp32, or "
            "lower --min-agreement if this drift is acceptable for the deployment.",
        )


def check_min_agreement(value: float) -> float:
    """`--min-agreement` validated: a number in [0, 1]."""
    from .errors import UsageError

    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise UsageError(f"--min-agreement {value}: give a fraction between 0 and 1 (default {DEFAULT_MIN_AGREEMENT})")
    return float(value)
