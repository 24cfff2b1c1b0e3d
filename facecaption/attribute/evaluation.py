"""How good and how calibrated a CelebA-40 classifier is: per-attribute calibration fitted on
held-out logits, calibration error, the test metrics and the table that reports them.

Calibration is per attribute and affine on the logit: p = sigmoid(scale * logit + shift).
`fit_calibration(..., shift=False)` fits a temperature alone (scale = 1 / T, shift = 0: it
moves probabilities but never the 0.5 decision); with `shift=True` it is Platt scaling, which
also undoes a prior shift (what class-balanced `pos_weight` training leaves). Both minimise the
binary cross-entropy of the held-out split (the valid split; never the test split).

Calibration error is the expected calibration error (ECE) of each attribute's positive-class
probability over `ECE_BINS` equal-width bins: sum over bins of |mean p - positive rate| times
the bin's share of faces. The paper keeps a label when p > 0.85; `precision_at` reports how
often such a label is true, the number that rule is about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facecaption.attribute.labels import CELEBA_ATTRIBUTES

ECE_BINS = 15
DECISION_THRESHOLD = 0.5  # accuracy, balanced accuracy and F1 are of p > 0.5
_FIT_ITERATIONS = 100
_MIN_SCALE = 1e-3  # a temperature above 1000 would flatten every probability to 0.5

# Mean accuracy over the 40 attributes on CelebA's test split, as their papers report them.
PUBLISHED_BASELINES: tuple[tuple[str, float], ...] = (
    ("LNets+ANet (Liu et al., ICCV 2015)", 0.87),
    ("MOON, VGG-16 (Rudd et al., ECCV 2016)", 0.9094),
    ("ResNet-50, adaptively weighted multi-task (He et al., ACM MM 2017; as cited)", 0.908),
)


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(scale * logit + shift), one pair per attribute (CelebA order)."""

    scale: np.ndarray  # (40,)
    shift: np.ndarray  # (40,)
    method: str  # "temperature" or "platt"

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return logits * self.scale + self.shift

    def as_json(self) -> dict:
        return {
            "method": self.method,
            "temperature": dict(
                zip(CELEBA_ATTRIBUTES, (1 / self.scale).round(6).tolist(), strict=True)
            ),
            "shift": dict(zip(CELEBA_ATTRIBUTES, self.shift.round(6).tolist(), strict=True)),
        }


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def fit_calibration(logits: np.ndarray, labels: np.ndarray, *, shift: bool = False) -> Calibration:
    """Per-attribute scale (and shift) minimising the BCE of `labels` (faces x 40, 0/1)."""
    import torch

    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    log_scale = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=shift)
    params = [log_scale, bias] if shift else [log_scale]
    optimiser = torch.optim.LBFGS(
        params, max_iter=_FIT_ITERATIONS, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        # attributes are independent: the sum of their mean losses separates
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(
                z * log_scale.exp() + bias, y, reduction="none"
            )
            .mean(dim=0)
            .sum()
        )
        loss.backward()
        return loss

    optimiser.step(closure)
    scale = np.maximum(log_scale.detach().exp().numpy(), _MIN_SCALE)
    return Calibration(scale, bias.detach().numpy().copy(), "platt" if shift else "temperature")


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ECE per attribute (see the module docstring)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    bins = np.minimum((p * ECE_BINS).astype(int), ECE_BINS - 1)
    errors = np.zeros(p.shape[1])
    for column in range(p.shape[1]):
        confidence = np.bincount(bins[:, column], p[:, column], ECE_BINS)
        positives = np.bincount(bins[:, column], y[:, column], ECE_BINS)
        errors[column] = np.abs(confidence - positives).sum() / max(len(p), 1)
    return errors


def precision_at(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Per attribute: the share of p > threshold predictions whose label is true (NaN: none)."""
    chosen = np.asarray(probabilities) > threshold
    hits = (chosen & (np.asarray(labels) > 0.5)).sum(axis=0)
    made = chosen.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(made > 0, hits / np.maximum(made, 1), np.nan)


def attribute_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """Per attribute: accuracy, balanced accuracy, F1 (of p > 0.5) and the positive rate."""
    predicted = np.asarray(probabilities) > DECISION_THRESHOLD
    truth = np.asarray(labels) > 0.5
    tp = (predicted & truth).sum(axis=0).astype(float)
    tn = (~predicted & ~truth).sum(axis=0).astype(float)
    fp = (predicted & ~truth).sum(axis=0).astype(float)
    fn = (~predicted & truth).sum(axis=0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    total = max(len(truth), 1)
    return {
        name: {
            "accuracy": float((tp[i] + tn[i]) / total),
            "balanced_accuracy": float((recall[i] + specificity[i]) / 2),
            "f1": float(f1[i]),
            "positive_rate": float((tp[i] + fn[i]) / total),
        }
        for i, name in enumerate(CELEBA_ATTRIBUTES)
    }


def evaluation_report(
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    valid_logits: np.ndarray,
    valid_labels: np.ndarray,
    calibration: Calibration,
    threshold: float,
) -> dict:
    """Everything the model card says: calibration error on valid (where it was fitted) and
    on test (where it was not), the test metrics of the calibrated model and their means."""
    raw = {"valid": sigmoid(valid_logits), "test": sigmoid(test_logits)}
    fitted = {
        "valid": sigmoid(calibration.apply(valid_logits)),
        "test": sigmoid(calibration.apply(test_logits)),
    }
    truth = {"valid": valid_labels, "test": test_labels}
    per_attribute = attribute_metrics(fitted["test"], test_labels)
    ece = {
        f"{split}_{when}": expected_calibration_error(probs[split], truth[split])
        for when, probs in (("before", raw), ("after", fitted))
        for split in ("valid", "test")
    }
    precision = {
        when: precision_at(probs["test"], test_labels, threshold)
        for when, probs in (("before", raw), ("after", fitted))
    }
    for i, name in enumerate(CELEBA_ATTRIBUTES):
        per_attribute[name].update(
            ece_test_before=float(ece["test_before"][i]),
            ece_test_after=float(ece["test_after"][i]),
        )
    mean = {
        key: float(np.mean([row[key] for row in per_attribute.values()]))
        for key in ("accuracy", "balanced_accuracy", "f1")
    }
    mean.update({f"ece_{key}": float(values.mean()) for key, values in ece.items()})
    mean.update(
        {f"precision_above_{threshold:g}_{k}": float(np.nanmean(v)) for k, v in precision.items()}
        if all(np.isfinite(v).any() for v in precision.values())
        else {}
    )
    return {
        "test_faces": len(test_labels),
        "valid_faces": len(valid_labels),
        "threshold": threshold,
        "mean": mean,
        "per_attribute": per_attribute,
    }


def evaluation_markdown(report: dict, *, label: str = "") -> str:
    """The card's table: per-attribute test metrics, their means, and published baselines."""
    mean = report["mean"]
    lines = [
        f"Test split: {report['test_faces']} faces; calibration fitted on the valid split"
        f" ({report['valid_faces']} faces).{' ' + label if label else ''}",
        "",
        "| attribute | accuracy | balanced accuracy | F1 | positives | ECE before | ECE after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["per_attribute"].items():
        lines.append(
            f"| {name} | {row['accuracy']:.4f} | {row['balanced_accuracy']:.4f} |"
            f" {row['f1']:.4f} | {row['positive_rate']:.3f} | {row['ece_test_before']:.4f} |"
            f" {row['ece_test_after']:.4f} |"
        )
    lines.append(
        f"| **mean** | **{mean['accuracy']:.4f}** | **{mean['balanced_accuracy']:.4f}** |"
        f" **{mean['f1']:.4f}** | | **{mean['ece_test_before']:.4f}** |"
        f" **{mean['ece_test_after']:.4f}** |"
    )
    lines += [
        "",
        f"Calibration error (mean ECE over the 40 attributes, {ECE_BINS} bins): valid"
        f" {mean['ece_valid_before']:.4f} -> {mean['ece_valid_after']:.4f} (fitted there),"
        f" test {mean['ece_test_before']:.4f} -> {mean['ece_test_after']:.4f}.",
    ]
    key = f"precision_above_{report['threshold']:g}"
    if f"{key}_after" in mean:
        lines.append(
            f"Labels with p > {report['threshold']:g} (the paper's rule) that are true, mean"
            f" over attributes: {mean[f'{key}_before']:.4f} before calibration,"
            f" {mean[f'{key}_after']:.4f} after."
        )
    lines += [
        "",
        "| published CelebA-40 model | mean accuracy |",
        "|---|---:|",
        *(f"| {name} | {value:.4f} |" for name, value in PUBLISHED_BASELINES),
        f"| this model | {mean['accuracy']:.4f} |",
    ]
    return "\n".join(lines) + "\n"
