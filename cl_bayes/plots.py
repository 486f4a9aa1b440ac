"""Comparison plots from results files (matplotlib, Agg canvas, no pyplot, no display).

Entry point: ``make_plots(results_root, out_dir, *, benchmark=None, protocol=None)``
writes, for every protocol and benchmark with results,

    <out_dir>/<protocol>/<benchmark>-curve.png        average accuracy on seen experiences vs experience
    <out_dir>/<protocol>/<benchmark>-matrix.png       accuracy-matrix heatmaps (mean over seeds)
    <out_dir>/<protocol>/<benchmark>-cost.png         final average accuracy vs total wall time
    <out_dir>/<protocol>/<benchmark>-reliability.png  reliability diagrams with ECE
    <out_dir>/<protocol>/<benchmark>-forgetting.png   average forgetting per strategy

and returns the paths written. A strategy has the same colour in every figure:
``strategy_colors`` maps the sorted names of *all* strategies under the results
root (whatever the filter) to a fixed palette. Strategy-coloured artists carry
``gid="strategy:<name>"`` so tests can check the mapping.

The ``*_figure(runs, colors)`` functions build one ``Figure`` from the runs of
one protocol and benchmark (results dicts as returned by
``cl_bayes.leaderboard.load_runs``) and can be used on their own.
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cl_bayes import metrics as M
from cl_bayes.leaderboard import BENCHMARKS, PROTOCOLS, _order, load_runs
from cl_bayes.results import write_bytes_atomic

DPI = 150
FIGURE_KINDS = ("curve", "matrix", "cost", "reliability", "forgetting")

Runs = list[dict[str, Any]]


# --------------------------------------------------------------------------- colours and helpers


def _palette() -> list[str]:
    """tab20 with its strong shades first (0, 2, .., 18), then the light ones, then tab20b/tab20c."""
    tab20 = colormaps["tab20"].colors
    colors = [tab20[i] for i in range(0, 20, 2)] + [tab20[i] for i in range(1, 20, 2)]
    colors += list(colormaps["tab20b"].colors) + list(colormaps["tab20c"].colors)
    return [to_hex(c) for c in colors]


def strategy_colors(names: Iterable[str]) -> dict[str, str]:
    """A fixed strategy -> hex colour mapping from the sorted, de-duplicated names."""
    palette = _palette()
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(set(names)))}


def _gid(strategy: str) -> str:
    return f"strategy:{strategy}"


def _by_strategy(runs: Runs) -> dict[str, Runs]:
    """Runs grouped per strategy, strategies ordered by mean final accuracy (best first), then name."""
    groups: dict[str, Runs] = defaultdict(list)
    for r in runs:
        groups[r["strategy"]].append(r)
    mean_acc = {s: float(np.mean([r["metrics"]["average_accuracy"] for r in rs])) for s, rs in groups.items()}
    order = sorted(groups, key=lambda s: (-mean_acc[s], s))
    return {s: sorted(groups[s], key=lambda r: r["seed"]) for s in order}


def _is_joint(r: dict[str, Any]) -> bool:
    m = r["accuracy_matrix"]
    return len(m) == 1 and len(m[0]) > 1


def _title(runs: Runs) -> str:
    return f"{runs[0]['benchmark']} ({runs[0]['protocol']} protocol)"


def _std(values: Iterable[float]) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _legend_outside(fig: Figure, handles: list, labels: list[str], title: str | None = None) -> None:
    fig.legend(handles, labels, loc="outside right upper", title=title, frameon=False, fontsize=9)


def _grid(fig: Figure, n: int, max_cols: int = 3) -> tuple[list, int, int]:
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return flat[:n], nrows, ncols


# --------------------------------------------------------------------------- figures


def curve_figure(runs: Runs, colors: dict[str, str]) -> Figure:
    """(a) Average accuracy on the experiences seen so far after each experience; mean and ± s.d. band."""
    groups = _by_strategy(runs)
    n_exp = max(len(r["accuracy_matrix"][0]) for r in runs)
    x = np.arange(1, n_exp + 1)
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.subplots()
    handles, labels = [], []
    for strategy, rs in groups.items():
        color = colors[strategy]
        label = f"{strategy} (n={len(rs)})"
        if all(_is_joint(r) for r in rs):  # joint upper bound: one value, drawn across the x range
            values = np.array([M.average_accuracy(r["accuracy_matrix"]) for r in rs]) * 100
            mean, std = values.mean(), _std(values)
            (line,) = ax.plot(x[[0, -1]], [mean, mean], "--", color=color, lw=2, gid=_gid(strategy))
            ax.fill_between(x[[0, -1]], mean - std, mean + std, color=color, alpha=0.15, lw=0, gid=_gid(strategy))
            label += ": final, all exps"
        else:
            curves = np.full((len(rs), n_exp), np.nan)
            for k, r in enumerate(rs):
                c = M.accuracy_curve(r["accuracy_matrix"])
                curves[k, : len(c)] = c
            curves *= 100
            mean = np.nanmean(curves, axis=0)
            std = np.nan_to_num(np.nanstd(curves, axis=0, ddof=1)) if len(rs) > 1 else np.zeros(n_exp)
            (line,) = ax.plot(x, mean, "-o", color=color, lw=2, ms=5, gid=_gid(strategy))
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0, gid=_gid(strategy))
        handles.append(line)
        labels.append(label)
    ax.set_xticks(x)
    ax.set_xlim(x[0] - 0.2, x[-1] + 0.2)
    ax.set_xlabel("after training on experience")
    ax.set_ylabel("average accuracy on seen experiences (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{_title(runs)}: accuracy on experiences seen so far")
    _legend_outside(fig, handles, labels, title="mean ± s.d. over seeds")
    return fig


def matrix_figure(runs: Runs, colors: dict[str, str]) -> Figure:
    """(b) Accuracy-matrix heatmaps, mean over seeds, one panel per strategy."""
    groups = _by_strategy(runs)
    n = len(groups)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols + 1.2, 3.4 * nrows + 0.6), layout="constrained")
    axes, _, _ = _grid(fig, n)
    image = None
    for ax, (strategy, rs) in zip(axes, groups.items(), strict=True):
        shapes = {np.shape(r["accuracy_matrix"]) for r in rs}
        if len(shapes) != 1:
            raise ValueError(f"{strategy}: accuracy matrices of different shapes across seeds: {sorted(shapes)}")
        mean = np.mean([r["accuracy_matrix"] for r in rs], axis=0) * 100
        rows, cols = mean.shape
        image = ax.imshow(mean, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        if rows * cols <= 100:
            for i in range(rows):
                for j in range(cols):
                    ax.text(j, i, f"{mean[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="black" if mean[i, j] > 60 else "white")  # fmt: skip
        ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
        ax.set_xlabel("evaluated on experience")
        if _is_joint(rs[0]):
            ax.set_yticks([0], ["all"])
            ax.set_ylabel("after joint training on")
        else:
            ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
            ax.set_ylabel("after training on experience")
        ax.set_title(
            f"{strategy} (n={len(rs)})",
            fontsize=10,
            bbox={"boxstyle": "round,pad=0.25", "facecolor": colors[strategy], "alpha": 0.35, "edgecolor": "none"},
            gid=_gid(strategy),
        )
    fig.colorbar(image, ax=axes, label="test accuracy (%)", shrink=0.9)
    fig.suptitle(f"{_title(runs)}: accuracy matrices (mean over seeds)")
    return fig


def cost_figure(runs: Runs, colors: dict[str, str]) -> Figure:
    """(c) Final average accuracy against total wall time per run; mean ± s.d., seeds as small dots."""
    groups = _by_strategy(runs)
    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax = fig.subplots()
    handles, labels = [], []
    all_times = []
    for strategy, rs in groups.items():
        color = colors[strategy]
        acc = np.array([r["metrics"]["average_accuracy"] for r in rs]) * 100
        time = np.array([r["time_s"]["total"] for r in rs], dtype=float)
        all_times.extend(time)
        ax.scatter(time, acc, s=12, color=color, alpha=0.45, lw=0, gid=_gid(strategy))
        container = ax.errorbar(time.mean(), acc.mean(), xerr=_std(time), yerr=_std(acc), fmt="o", ms=8,
                                color=color, mec="black", mew=0.6, capsize=4, elinewidth=1.5)  # fmt: skip
        for artist in container.get_children():
            artist.set_gid(_gid(strategy))
        handles.append(container)
        labels.append(f"{strategy} (n={len(rs)})")
    positive = [t for t in all_times if t > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("total wall time per run (s)")
    ax.set_ylabel("final average accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{_title(runs)}: accuracy vs cost")
    _legend_outside(fig, handles, labels, title="mean ± s.d. over seeds")
    return fig


def _pooled_table(rs: Runs) -> dict[str, np.ndarray] | None:
    tables = [r["calibration"] for r in rs if isinstance(r.get("calibration"), dict)]
    if not tables:
        return None
    count = np.sum([t["count"] for t in tables], axis=0).astype(float)
    safe = np.maximum(count, 1)
    acc = np.sum([np.multiply(t["count"], t["accuracy"]) for t in tables], axis=0) / safe
    conf = np.sum([np.multiply(t["count"], t["confidence"]) for t in tables], axis=0) / safe
    return {"count": count, "accuracy": acc, "confidence": conf}


def reliability_figure(runs: Runs, colors: dict[str, str]) -> Figure | None:
    """(d) Reliability diagrams (bins pooled over seeds), one panel per strategy, ECE in the title.

    ``None`` when no run has a calibration table.
    """
    groups = {s: rs for s, rs in _by_strategy(runs).items() if _pooled_table(rs) is not None}
    if not groups:
        return None
    n = len(groups)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.4 * ncols + 0.4, 3.4 * nrows + 1.1), layout="constrained")
    axes, _, _ = _grid(fig, n)
    for ax, (strategy, rs) in zip(axes, groups.items(), strict=True):
        table = _pooled_table(rs)
        bins = len(table["count"])
        width = 1.0 / bins
        centers = (np.arange(bins) + 0.5) * width
        full = table["count"] > 0
        color = colors[strategy]
        ax.bar(centers[full], table["accuracy"][full], width=width, color=color, edgecolor="black", lw=0.5,
               gid=_gid(strategy))  # fmt: skip
        gap_low = np.minimum(table["accuracy"], table["confidence"])[full]
        gap = np.abs(table["accuracy"] - table["confidence"])[full]
        ax.bar(centers[full], gap, bottom=gap_low, width=width, facecolor=(1, 1, 1, 0.45), edgecolor="crimson",
               hatch="///", lw=0.5)  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        eces = [r["metrics"]["ece"] for r in rs if r["metrics"].get("ece") is not None]
        ece = f"ECE {np.mean(eces) * 100:.1f}" + (f" ± {_std(eces) * 100:.1f}" if len(eces) > 1 else "") + " %"
        ax.set_title(f"{strategy} (n={len(rs)})\n{ece}", fontsize=10)
    handles = [
        Patch(facecolor="lightgrey", edgecolor="black", lw=0.5, label="accuracy in bin (strategy colour)"),
        Patch(facecolor="white", edgecolor="crimson", hatch="///", label="gap to mean confidence"),
        Line2D([], [], ls="--", color="grey", label="perfect calibration"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    fig.suptitle(f"{_title(runs)}: reliability of the final model (ECE: mean ± s.d. over seeds)")
    return fig


def forgetting_figure(runs: Runs, colors: dict[str, str]) -> Figure:
    """(e) Average forgetting per strategy: mean ± s.d. over seeds (bars), seeds as dots."""
    groups = _by_strategy(runs)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(groups)), 4.6), layout="constrained")
    ax = fig.subplots()
    names = list(groups)
    for x, (strategy, rs) in enumerate(groups.items()):
        values = [r["metrics"]["forgetting"] for r in rs if r["metrics"].get("forgetting") is not None]
        if not values:  # joint runs: no forgetting defined
            ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=9, color="dimgrey",
                    transform=ax.get_xaxis_transform())  # fmt: skip
            continue
        v = np.asarray(values) * 100
        ax.bar(x, v.mean(), yerr=_std(v), width=0.7, color=colors[strategy], edgecolor="black", lw=0.5,
               capsize=4, gid=_gid(strategy))  # fmt: skip
        jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(1)
        ax.scatter(x + jitter, v, s=10, color="black", alpha=0.6, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 5 else 0,
                  ha="right" if len(names) > 5 else "center")  # fmt: skip
    ax.set_ylabel("average forgetting (percentage points)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{_title(runs)}: forgetting (lower is better;\nbars mean ± s.d. over seeds, dots seeds)",
                 fontsize=10)  # fmt: skip
    return fig


FIGURES: dict[str, Callable[[Runs, dict[str, str]], Figure | None]] = {
    "curve": curve_figure,
    "matrix": matrix_figure,
    "cost": cost_figure,
    "reliability": reliability_figure,
    "forgetting": forgetting_figure,
}


# --------------------------------------------------------------------------- writing


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to a PNG at ``path`` atomically (replacing an older plot)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return write_bytes_atomic(path, buffer.getvalue(), overwrite=True)


def group_runs(runs: Runs) -> dict[tuple[str, str], Runs]:
    """Runs per (protocol, benchmark), in registry order."""
    groups: dict[tuple[str, str], Runs] = defaultdict(list)
    for r in runs:
        groups[(r["protocol"], r["benchmark"])].append(r)
    protocols = _order({p for p, _ in groups}, PROTOCOLS)
    benchmarks = _order({b for _, b in groups}, BENCHMARKS)
    return {(p, b): groups[(p, b)] for p in protocols for b in benchmarks if (p, b) in groups}


def make_plots(
    results_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    benchmark: str | None = None,
    protocol: str | None = None,
) -> list[Path]:
    """Write the comparison PNGs for one benchmark / protocol, or all; return the paths written.

    Returns an empty list when no results match.
    """
    all_runs = load_runs(results_root)
    colors = strategy_colors(r["strategy"] for r in all_runs)
    selected = [
        r
        for r in all_runs
        if (benchmark is None or r["benchmark"] == benchmark) and (protocol is None or r["protocol"] == protocol)
    ]
    written = []
    for (prot, bench), runs in group_runs(selected).items():
        for kind, build in FIGURES.items():
            fig = build(runs, colors)
            if fig is not None:
                written.append(save_figure(fig, Path(out_dir) / prot / f"{bench}-{kind}.png"))
    return written
