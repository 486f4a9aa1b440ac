"""Memory rule x use of the memory x benchmark (issue 13): the table and the plot.

    .venv/bin/python benchmarks/memory_ablation.py            # prints the markdown table
    .venv/bin/python benchmarks/memory_ablation.py --plot results/ablations/memory-functional/rules.png

Reads committed results files only (nothing is run). Uses of the memory:

* IVON replay: the ``ivon-replay*`` presets of ``benchmarks/suites/memory.toml`` (``results/quick/``);
* ``bayes-cl`` and ``ivon-fromp``, FROMP's functional term over the memory: one run per rule with
  ``--set selection='"RULE"'`` into ``results/ablations/memory-functional/RULE/`` (test set) and, with
  ``--set evaluate_on='"validation"'``, into ``validation-RULE/`` (the commands are in that folder's SUMMARY.md);
* IVON replay on split MNIST's paper protocol: ``ivon-replay`` with ``--set selection='"RULE"'`` into
  ``results/ablations/memory-replay-paper/RULE/`` (test set, seeds 0-2);
* ``bayes-cl`` on split MNIST's paper protocol: on the test set, the committed ``results/paper/`` runs
  (sensitivity, the spec) and the other rules (``results/ablations/bayes-cl-selection/test-RULE/``); on the
  validation split, every rule with the recipe before docs/BISECTION.md step 7, "old recipe"
  (``results/ablations/bayes-cl-selection/validation-RULE/``);
* ``ivon-fromp`` on split MNIST's paper protocol, test set: the committed ``results/paper/`` runs (sensitivity,
  the spec) and the other rules (``results/ablations/memory-functional-paper/RULE/``).

Per cell (use, benchmark) and rule: average accuracy, mean ± std over the seeds, and the mean of the
per-seed differences to ``random`` (same seed) with their min and max. A missing seed is left out of
that cell and said so in the table (``seeds`` column); a malformed results file is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RULES = ("sensitivity", "lambda", "herding", "stratified", "random")  # random last: the reference
SEEDS = (0, 1, 2)
IVON_REPLAY = {"sensitivity": "ivon-replay-sensitivity", "lambda": "ivon-replay-lambda", "herding": "ivon-replay",
               "stratified": "ivon-replay-stratified", "random": "ivon-replay-random"}


@dataclass(frozen=True)
class Cell:
    use: str  # how the memory is used
    benchmark: str  # benchmark label (with protocol and split where not quick/test)
    paths: dict[str, str]  # rule -> results file template with {seed}


def _functional(strategy: str, benchmark: str, validation: bool = False) -> Cell:
    folder = "validation-{rule}" if validation else "{rule}"
    base = f"results/ablations/memory-functional/{folder}/quick/{benchmark}/{strategy}/seed{{{{seed}}}}.json"
    return Cell(strategy, f"{benchmark} (validation)" if validation else benchmark,
                {r: base.format(rule=r) for r in RULES})


CELLS = [
    *(Cell("IVON replay", b, {r: f"results/quick/{b}/{IVON_REPLAY[r]}/seed{{seed}}.json" for r in RULES})
      for b in ("split-mnist-ci", "permuted-mnist")),
    *(_functional(s, b) for s in ("bayes-cl", "ivon-fromp") for b in ("split-mnist-ci", "permuted-mnist")),
    Cell("IVON replay", "split-mnist paper (test)",
         {r: f"results/ablations/memory-replay-paper/{r}/paper/split-mnist/ivon-replay/seed{{seed}}.json"
          for r in RULES}),
    Cell("bayes-cl", "split-mnist paper (test)",
         {r: "results/paper/split-mnist/bayes-cl/seed{seed}.json" if r == "sensitivity" else
          f"results/ablations/bayes-cl-selection/test-{r}/paper/split-mnist/bayes-cl/seed{{seed}}.json"
          for r in RULES}),
    Cell("ivon-fromp", "split-mnist paper (test)",
         {r: "results/paper/split-mnist/ivon-fromp/seed{seed}.json" if r == "sensitivity" else
          f"results/ablations/memory-functional-paper/{r}/paper/split-mnist/ivon-fromp/seed{{seed}}.json"
          for r in RULES}),
    *(_functional(s, b, validation=True)
      for s in ("bayes-cl", "ivon-fromp") for b in ("split-mnist-ci", "permuted-mnist")),
    Cell("bayes-cl", "split-mnist paper (val., old recipe)",
         {r: f"results/ablations/bayes-cl-selection/validation-{r}/paper/split-mnist/bayes-cl/seed{{seed}}.json"
          for r in RULES}),
]


def accuracy(path: Path) -> float:
    """Final average accuracy (%) of one results file."""
    try:
        return 100.0 * float(json.loads(path.read_text())["metrics"]["average_accuracy"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a results file with metrics.average_accuracy ({e})") from None


def load(cell: Cell, root: Path = ROOT) -> dict[str, dict[int, float]]:
    """rule -> {seed: accuracy %} for the files that exist."""
    out: dict[str, dict[int, float]] = {}
    for rule, template in cell.paths.items():
        files = {s: root / template.format(seed=s) for s in SEEDS}
        found = {s: accuracy(f) for s, f in files.items() if f.exists()}
        if found:
            out[rule] = found
    return out


def differences(values: dict[int, float], reference: dict[int, float]) -> np.ndarray:
    """Per-seed differences to the reference, over the seeds both have."""
    return np.array([values[s] - reference[s] for s in sorted(values) if s in reference])


def table(cells: list[Cell] = CELLS, root: Path = ROOT) -> str:
    lines = ["| use | benchmark | rule | seeds | accuracy % | vs random (min, max) |", "|---|---|---|--:|--:|--:|"]
    for cell in cells:
        data = load(cell, root)
        for rule in RULES:
            if rule not in data:
                continue
            v = np.array(list(data[rule].values()))
            std = f" ± {v.std(ddof=1):.2f}" if len(v) > 1 else ""
            vs = ""
            if rule != "random" and "random" in data:
                d = differences(data[rule], data["random"])
                if len(d):
                    vs = f"{d.mean():+.2f} ({d.min():+.2f}, {d.max():+.2f})"
            lines.append(f"| {cell.use} | {cell.benchmark} | {rule} | {len(v)} | {v.mean():.2f}{std} | {vs} |")
    return "\n".join(lines)


def figure(cells: list[Cell] = CELLS, root: Path = ROOT):
    """One panel per cell: each rule's per-seed difference to random (dots) and their mean (bar)."""
    from matplotlib.figure import Figure

    cols = 4
    rows = -(-len(cells) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    rules = [r for r in RULES if r != "random"]
    colors = dict(zip(rules, ("tab:red", "tab:orange", "tab:blue", "tab:green"), strict=True))
    for ax, cell in zip(axes, cells, strict=False):
        data = load(cell, root)
        ax.axhline(0.0, color="black", lw=0.8)
        for i, rule in enumerate(rules):
            if rule not in data or "random" not in data:
                continue
            d = differences(data[rule], data["random"])
            ax.bar(i, d.mean(), color=colors[rule], alpha=0.6)
            ax.scatter(np.full(len(d), i), d, color=colors[rule], s=14, zorder=3)
        ref = data.get("random", {})
        ax.set_title(f"{cell.use}, {cell.benchmark}\nrandom: {np.mean(list(ref.values())):.1f} %" if ref
                     else f"{cell.use}, {cell.benchmark}", fontsize=9)
        ax.set_xticks(range(len(rules)), rules, rotation=30, fontsize=8)
        ax.set_ylabel("accuracy - random (points)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(cells):]:
        ax.set_visible(False)
    fig.suptitle("Memory rule against a random memory of the same size, per seed (dots) and mean (bar)")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plot", metavar="PNG", help="also write the figure here")
    args = parser.parse_args(argv)
    print(table())
    if args.plot:
        sys.path.insert(0, str(ROOT))
        from cl_bayes.plots import save_figure

        print(f"wrote {save_figure(figure(), args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
