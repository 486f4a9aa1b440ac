"""``make bench``: run a suite into a fresh run folder, then compare every cell with the reference.

A *cell* is one (benchmark, strategy) of the suite: the mean over seeds of the final
average accuracy. The reference is the committed results root (``results``) holding
the same suite's files; the run folder (``runs/<date-time>/``, ignored by git) is a
results root of its own, laid out like ``results``.

A cell passes when this run's mean is at least ``reference mean - tolerance``, with

    tolerance = max(K_STD * reference std over seeds, FLOOR_POINTS)   (accuracy points)

so a noisy cell gets room in proportion to its seed spread and a steady one still
gets ``FLOOR_POINTS`` for thread-count and library nondeterminism (the same runs on
2 cores reproduce the committed numbers exactly in most cells and within 0.33 points
in the rest). A mean above ``reference + tolerance`` is reported as ``better``; it
does not fail, but it means the reference should be refreshed on purpose. A cell
with no runs in this folder (its runs failed) is ``missing`` and fails; a cell with
no reference is ``no reference`` and does not fail.

Pure pandas: no torch or Avalanche import.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path

import pandas as pd

from cl_bayes.results import write_bytes_atomic
from cl_bayes.suite import Suite, summary_frame

K_STD = 3.0  # tolerance in reference standard deviations over seeds
FLOOR_POINTS = 0.5  # the smallest tolerance, in accuracy points
FAILING = ("regressed", "missing")

COMPARISON_COLUMNS = (
    "benchmark", "strategy", "ref_seeds", "ref_mean", "ref_std", "run_seeds", "run_mean", "run_std",
    "delta", "tolerance", "status",
)  # fmt: skip


def tolerance(ref_std: float, *, k_std: float = K_STD, floor: float = FLOOR_POINTS) -> float:
    """Accuracy points a cell may fall below its reference mean (``ref_std`` NaN for one seed: the floor)."""
    if ref_std is None or not math.isfinite(ref_std):
        return floor
    return max(k_std * ref_std, floor)


def new_run_dir(runs_root: str | os.PathLike = "runs", *, now: datetime | None = None) -> Path:
    """A fresh folder ``<runs_root>/<YYYY-mm-dd-HHMMSS>`` (a suffix if that second is taken)."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d-%H%M%S")
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(100):
        path = root / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a fresh run folder under {root}")


def compare(run_root: str | os.PathLike, reference_root: str | os.PathLike, suite: Suite, *,
            k_std: float = K_STD, floor: float = FLOOR_POINTS) -> pd.DataFrame:
    """One row per (benchmark, strategy) of ``suite``: reference and run statistics (percent) and a status."""
    ref = summary_frame(reference_root, suite)
    run = summary_frame(run_root, suite)

    def index(frame):
        if frame.empty:
            return {}
        return {(r.benchmark, r.strategy): r for r in frame.itertuples(index=False)}

    ref_by, run_by = index(ref), index(run)
    rows = []
    for benchmark in suite.benchmarks:
        for strategy in suite.strategies:
            a, b = ref_by.get((benchmark, strategy)), run_by.get((benchmark, strategy))
            row = {
                "benchmark": benchmark, "strategy": strategy,
                "ref_seeds": 0 if a is None else int(a.seeds),
                "ref_mean": math.nan if a is None else a.accuracy,
                "ref_std": math.nan if a is None else a.accuracy_std,
                "run_seeds": 0 if b is None else int(b.seeds),
                "run_mean": math.nan if b is None else b.accuracy,
                "run_std": math.nan if b is None else b.accuracy_std,
            }  # fmt: skip
            row["tolerance"] = tolerance(row["ref_std"], k_std=k_std, floor=floor) if a is not None else math.nan
            row["delta"] = row["run_mean"] - row["ref_mean"]
            if b is None:
                status = "missing"
            elif a is None:
                status = "no reference"
            elif row["delta"] < -row["tolerance"]:
                status = "regressed"
            elif row["delta"] > row["tolerance"]:
                status = "better"
            else:
                status = "pass"
            row["status"] = status
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def failed(comparison: pd.DataFrame) -> pd.DataFrame:
    return comparison[comparison["status"].isin(FAILING)]


def _f(value: float, digits: int = 2) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def comparison_markdown(comparison: pd.DataFrame, *, reference: str, run: str,
                        k_std: float = K_STD, floor: float = FLOOR_POINTS) -> str:
    """The comparison as markdown, one table per benchmark, then a one-line verdict."""
    lines = [
        f"Final average accuracy (%), mean over seeds: this run (`{run}`) against the reference (`{reference}`).",
        f"A cell fails when it falls more than max({k_std:g} x reference std, {floor:g} points) below the "
        "reference mean, or has no runs.",
        "",
    ]
    for benchmark, part in comparison.groupby("benchmark", sort=False):
        lines += [f"### {benchmark}", "",
                  "| strategy | reference | seeds | this run | seeds | delta | tolerance | status |",
                  "|---|--:|--:|--:|--:|--:|--:|---|"]
        for r in part.itertuples(index=False):
            ref = _f(r.ref_mean) + ("" if r.ref_std != r.ref_std else f" ± {r.ref_std:.2f}")
            this = _f(r.run_mean) + ("" if r.run_std != r.run_std else f" ± {r.run_std:.2f}")
            delta = "—" if r.delta != r.delta else f"{r.delta:+.2f}"
            status = f"**{r.status.upper()}**" if r.status in FAILING else r.status
            lines.append(f"| {r.strategy} | {ref} | {r.ref_seeds} | {this} | {r.run_seeds} | {delta} | "
                         f"{_f(r.tolerance)} | {status} |")
        lines.append("")
    lines.append(verdict(comparison))
    return "\n".join(lines) + "\n"


def verdict(comparison: pd.DataFrame) -> str:
    bad = failed(comparison)
    counts = comparison["status"].value_counts()
    parts = ", ".join(f"{counts[s]} {s}" for s in ("pass", "better", "no reference", "regressed", "missing")
                      if s in counts)
    if bad.empty:
        return f"PASS: {len(comparison)} cells ({parts})."
    names = "; ".join(f"{r.strategy} on {r.benchmark} ({r.status})" for r in bad.itertuples(index=False))
    return f"FAIL: {len(bad)} of {len(comparison)} cells ({parts}): {names}."


def write_comparison(run_root: str | os.PathLike, comparison: pd.DataFrame, markdown: str) -> list[Path]:
    """``COMPARISON.md`` and ``comparison.csv`` in the run folder (atomic, replacing older ones)."""
    root = Path(run_root)
    md = write_bytes_atomic(root / "COMPARISON.md", ("# Comparison with the reference\n\n" + markdown).encode(),
                            overwrite=True)
    csv = write_bytes_atomic(root / "comparison.csv",
                             comparison.to_csv(index=False, lineterminator="\n").encode(), overwrite=True)
    return [md, csv]
