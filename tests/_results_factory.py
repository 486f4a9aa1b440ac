"""Internally consistent fake results files for the leaderboard and plot tests.

Accuracy matrices and probability tables are random but valid, and every
metric is computed from them with ``cl_bayes.metrics``, exactly as a real run
would, so a freshly made result passes ``leaderboard.submit`` unchanged.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np

from cl_bayes import metrics as M
from cl_bayes.results import SCHEMA_VERSION, result_path, write_atomic

# strategy -> (skill, forgetting rate, replay memory size, single-row joint run?)
PROFILES: dict[str, tuple[float, float, int, bool]] = {
    "naive": (0.95, 0.8, 0, False),
    "ewc": (0.93, 0.45, 0, False),
    "vcl": (0.92, 0.3, 0, False),
    "replay": (0.94, 0.2, 200, False),
    "joint": (0.97, 0.0, 0, True),
}


def make_result(
    benchmark: str = "split-mnist",
    strategy: str = "naive",
    seed: int = 0,
    protocol: str = "quick",
    *,
    n_experiences: int = 5,
    n_classes: int = 10,
    n_examples: int = 400,
    joint: bool | None = None,
    skill: float | None = None,
    forget: float | None = None,
    memory_size: int | None = None,
) -> dict[str, Any]:
    """One results dict; random but deterministic in (benchmark, strategy, seed, protocol)."""
    p_skill, p_forget, p_memory, p_joint = PROFILES.get(strategy, (0.9, 0.5, 0, False))
    skill = p_skill if skill is None else skill
    forget = p_forget if forget is None else forget
    memory_size = p_memory if memory_size is None else memory_size
    joint = p_joint if joint is None else joint
    key = [seed, sum(map(ord, benchmark)), sum(map(ord, strategy)), sum(map(ord, protocol))]
    rng = np.random.default_rng(key)
    t = n_experiences

    if joint:
        matrix = np.clip(skill * rng.uniform(0.95, 1.0, size=(1, t)), 0, 1)
    else:
        matrix = np.empty((t, t))
        learned = skill * rng.uniform(0.9, 1.0, size=t)
        for i in range(t):
            for j in range(t):
                if j <= i:
                    decay = forget * (i - j) / max(t - 1, 1) * rng.uniform(0.7, 1.3)
                    matrix[i, j] = learned[j] * (1 - decay) + rng.normal(0, 0.01)
                else:  # not trained on yet: about chance
                    matrix[i, j] = rng.uniform(0.5, 1.5) / n_classes
        matrix = np.clip(matrix, 0, 1)
    matrix = np.round(matrix, 6)  # stored as JSON; metrics are computed from what is stored

    # A final model whose predictions are right about as often as its final average accuracy,
    # with confidences that are not quite calibrated.
    final_acc = float(matrix[-1].mean())
    labels = rng.integers(0, n_classes, size=n_examples)
    logits = rng.normal(0, 1.0, size=(n_examples, n_classes))
    right = rng.random(n_examples) < final_acc
    boost = rng.uniform(1.0, 4.0, size=n_examples)
    logits[np.arange(n_examples), labels] += np.where(right, boost + 2.0, -1.0)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    table = M.reliability(probs, labels)

    matrix_list = matrix.tolist()
    per_exp = [float(round(x, 3)) for x in rng.uniform(5, 15, size=1 if joint else t) * (3 if joint else 1)]
    cost = 1.0 + memory_size / 400 + (0.5 if strategy in ("vcl", "ewc") else 0.0)
    per_exp = [round(x * cost, 3) for x in per_exp]
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "strategy": strategy,
        "seed": seed,
        "protocol": protocol,
        # Only keys every spec leaves at their defaults, so a factory run sits in its spec's leaderboard row.
        "config": {"model": "mlp", "seed": seed},
        "spec": f"strategies/{strategy}.yaml",
        "versions": {"torch": "2.5.1", "avalanche-lib": "0.6.0", "cl-bayes": "0.1.0", "python": "3.12.3"},
        "git_sha": "0123456789abcdef0123456789abcdef01234567",
        "device": "cpu",
        "data_source": "/data/fake",
        "accuracy_matrix": matrix_list,
        "metrics": {
            **M.matrix_metrics(matrix_list),
            "nll": M.nll(probs, labels),
            "ece": M.ece_from_reliability(table),
        },
        "calibration": {"bins": M.ECE_BINS, **table},
        "time_s": {"per_experience": per_exp, "total": round(sum(per_exp) + 0.5, 3)},
        "peak_memory_mb": round(float(rng.uniform(100, 300)) + memory_size / 10, 1),
        "memory_size": memory_size,
        "created": "2026-11-28T20:13:21+00:00",
    }


def write_results(root: str | os.PathLike, results: list[dict[str, Any]]) -> list[Path]:
    """Store results dicts at their conventional paths under ``root``."""
    paths = []
    for r in results:
        path = result_path(root, r["protocol"], r["benchmark"], r["strategy"], r["seed"])
        paths.append(write_atomic(path, r))
    return paths


def make_tree(
    root: str | os.PathLike,
    *,
    benchmarks: tuple[str, ...] = ("split-mnist", "permuted-mnist"),
    protocols: tuple[str, ...] = ("quick",),
    strategies: tuple[str, ...] = tuple(PROFILES),
    seeds: tuple[int, ...] = (0, 1, 2),
) -> list[dict[str, Any]]:
    """Write a full grid of fake runs under ``root``; return the results dicts."""
    results = [
        make_result(b, s, k, p) for p in protocols for b in benchmarks for s in strategies for k in seeds
    ]
    write_results(root, results)
    return results


def write_json_file(path: str | os.PathLike, data: Any) -> Path:
    """A submission file outside the results tree (plain write; may hold anything)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def clone(data: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(data)


def snapshot(root: str | os.PathLike) -> dict[str, bytes | None]:
    """Every file and folder under ``root`` with its bytes (None for folders)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }
