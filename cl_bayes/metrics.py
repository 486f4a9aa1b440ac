"""Continual-learning metrics as small pure functions.

The accuracy matrix ``R`` has one row per evaluation point and one column per
experience: ``R[i][j]`` is the test accuracy on experience ``j`` after training
on experience ``i``. Sequential strategies give a square T x T matrix; a joint
(upper-bound) run gives a single row, and the metrics that need the diagonal
(backward transfer, forgetting) are then ``None``.

Calibration metrics take the final model's predicted class probabilities and
the true labels, pooled over the test sets of all experiences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)


def _matrix(accuracy_matrix: Sequence[Sequence[float]]) -> np.ndarray:
    r = np.asarray(accuracy_matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty 2-D array, got shape {r.shape}")
    if r.shape[0] > r.shape[1]:
        raise ValueError(f"accuracy matrix has more rows than experiences: shape {r.shape}")
    if not np.all(np.isfinite(r)) or r.min() < 0 or r.max() > 1:
        raise ValueError("accuracy matrix entries must be finite and in [0, 1]")
    return r


def average_accuracy(accuracy_matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all experiences after the last training step."""
    return float(_matrix(accuracy_matrix)[-1].mean())


def accuracy_curve(accuracy_matrix: Sequence[Sequence[float]]) -> list[float]:
    """After each experience i: mean accuracy over the experiences seen so far (0..i)."""
    r = _matrix(accuracy_matrix)
    if r.shape[0] == 1 and r.shape[1] > 1:  # joint training: one point, all experiences
        return [float(r[0].mean())]
    return [float(r[i, : i + 1].mean()) for i in range(r.shape[0])]


def backward_transfer(accuracy_matrix: Sequence[Sequence[float]]) -> float | None:
    """BWT (Lopez-Paz & Ranzato, 2017): mean of R[T-1, j] - R[j, j] over j < T-1.

    Negative values mean forgetting. ``None`` when the matrix is not square or
    has a single experience.
    """
    r = _matrix(accuracy_matrix)
    t = r.shape[1]
    if r.shape[0] != t or t < 2:
        return None
    return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forgetting(accuracy_matrix: Sequence[Sequence[float]]) -> float | None:
    """Average forgetting (Chaudhry et al., 2018).

    For each experience j < T-1: the best accuracy it ever had before the end,
    max over l in [j, T-2] of R[l, j], minus its final accuracy R[T-1, j].
    """
    r = _matrix(accuracy_matrix)
    t = r.shape[1]
    if r.shape[0] != t or t < 2:
        return None
    return float(np.mean([r[j:-1, j].max() - r[-1, j] for j in range(t - 1)]))


def _probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels, dtype=int)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise ValueError(f"expected probs (N, C) and labels (N,), got {p.shape} and {y.shape}")
    return p, y


def nll(probs, labels, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true labels."""
    p, y = _probs_labels(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], eps, None)).mean())


def reliability(probs, labels, bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin: number of examples, accuracy and mean confidence.

    Bins are equal-width on [0, 1], right-closed (a confidence of exactly 1
    falls in the last bin). Empty bins report accuracy and confidence 0.
    """
    p, y = _probs_labels(probs, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    safe = np.maximum(count, 1)
    acc = np.bincount(index, weights=correct, minlength=bins) / safe
    conf = np.bincount(index, weights=confidence, minlength=bins) / safe
    return {"count": count.tolist(), "accuracy": acc.tolist(), "confidence": conf.tolist()}


def ece_from_reliability(table: dict[str, list]) -> float:
    """Expected calibration error from a reliability table: sum_b n_b / N |acc_b - conf_b|."""
    count = np.asarray(table["count"], dtype=float)
    if count.sum() <= 0:
        raise ValueError("reliability table has no examples")
    gap = np.abs(np.asarray(table["accuracy"]) - np.asarray(table["confidence"]))
    return float((count / count.sum() * gap).sum())


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error with equal-width confidence bins."""
    return ece_from_reliability(reliability(probs, labels, bins))


def matrix_metrics(accuracy_matrix: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """The metrics that are functions of the accuracy matrix alone."""
    return {
        "average_accuracy": average_accuracy(accuracy_matrix),
        "backward_transfer": backward_transfer(accuracy_matrix),
        "forgetting": forgetting(accuracy_matrix),
    }
