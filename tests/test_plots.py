"""Comparison plots: every PNG written and valid, one colour per strategy everywhere, legends clear of data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _results_factory import PROFILES, make_result, make_tree, write_results
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import Collection, LineCollection
from matplotlib.colors import to_hex, to_rgb, to_rgba_array
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Text

from cl_bayes import plots
from cl_bayes.leaderboard import load_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BENCHMARKS = ("split-mnist", "permuted-mnist")
PROTOCOLS = ("quick", "paper")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plots") / "results"
    make_tree(root, benchmarks=BENCHMARKS, protocols=PROTOCOLS)
    # a strategy that only exists in one group still gets its colour from the global list
    write_results(root, [make_result("split-mnist", "si", k, "paper") for k in (0, 1)])
    return root


@pytest.fixture(scope="module")
def written(root, tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("out")
    return out, plots.make_plots(root, out)


def _expected(out: Path, protocols, benchmarks) -> set[Path]:
    return {out / p / f"{b}-{kind}.png" for p in protocols for b in benchmarks for kind in plots.FIGURE_KINDS}


def test_every_expected_png_is_written_and_valid(written):
    out, paths = written
    assert len(paths) == len(set(paths))
    assert set(paths) == _expected(out, PROTOCOLS, BENCHMARKS)
    assert {p for p in out.rglob("*") if p.is_file()} == set(paths)  # nothing else, no temporary files
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] >= 400 and image.shape[1] >= 400


def test_filters(tmp_path):
    root = tmp_path / "results"
    make_tree(root, benchmarks=BENCHMARKS, protocols=PROTOCOLS, strategies=("naive", "joint"), seeds=(0,))
    paths = plots.make_plots(root, tmp_path, benchmark="permuted-mnist")
    assert set(paths) == _expected(tmp_path, PROTOCOLS, ["permuted-mnist"])
    paths = plots.make_plots(root, tmp_path / "q", benchmark="split-mnist", protocol="quick")
    assert set(paths) == _expected(tmp_path / "q", ["quick"], ["split-mnist"])
    assert plots.make_plots(root, tmp_path / "none", benchmark="split-cifar10") == []
    assert not (tmp_path / "none").exists()


def test_empty_results_root(tmp_path):
    assert plots.make_plots(tmp_path / "results", tmp_path / "plots") == []


def test_strategy_colors_are_fixed_and_distinct():
    names = ["vcl", "naive", "ewc", "joint", "replay"]
    colors = plots.strategy_colors(names)
    assert colors == plots.strategy_colors(reversed(names + names))  # order and duplicates do not matter
    assert list(colors) == sorted(names)
    assert len(set(colors.values())) == len(names)
    many = plots.strategy_colors(f"s{i:02d}" for i in range(60))
    assert len(set(many.values())) == 60


def _strategy_colors_in(fig) -> dict[str, set[str]]:
    """Colours of every artist tagged gid='strategy:<name>' (alpha ignored)."""
    found: dict[str, set[str]] = {}
    for artist in fig.findobj(lambda a: (a.get_gid() or "").startswith("strategy:")):
        name = artist.get_gid().removeprefix("strategy:")
        if isinstance(artist, Text):  # heatmap panel titles: a coloured box
            rgba = [artist.get_bbox_patch().get_facecolor()]
        elif isinstance(artist, Line2D):
            rgba = [artist.get_color()]
        elif isinstance(artist, LineCollection):  # error bars
            rgba = artist.get_color()
        elif isinstance(artist, (Collection, Patch)):  # bands, scatter dots, bars
            rgba = np.atleast_2d(artist.get_facecolor())
        else:
            raise AssertionError(f"unexpected tagged artist {artist!r}")
        found.setdefault(name, set()).update(to_hex(to_rgb(tuple(c))) for c in np.atleast_2d(to_rgba_array(rgba)))
    return found


def test_colour_mapping_is_identical_across_figures(root):
    runs = load_runs(root)
    colors = plots.strategy_colors(r["strategy"] for r in runs)
    assert set(colors) == {*PROFILES, "si"}
    seen: dict[str, set[str]] = {}
    for (protocol, benchmark), group in plots.group_runs(runs).items():
        strategies = {r["strategy"] for r in group}
        for kind, build in plots.FIGURES.items():
            fig = build(group, colors)
            found = _strategy_colors_in(fig)
            # joint runs have no forgetting bar; every other strategy appears in every figure
            must = strategies - {"joint"} if kind == "forgetting" else strategies
            assert must <= set(found) <= strategies, (protocol, benchmark, kind)
            for name, hexes in found.items():
                assert hexes == {colors[name]}, (protocol, benchmark, kind, name, hexes)
                seen.setdefault(name, set()).update(hexes)
    assert all(len(v) == 1 for v in seen.values())


@pytest.mark.parametrize("kind", ["curve", "cost", "reliability", "forgetting"])
def test_saved_pngs_show_each_strategy_colour(written, root, kind):
    """End to end: the strategy's exact colour is present in the saved image's pixels."""
    out, _ = written
    colors = plots.strategy_colors(r["strategy"] for r in load_runs(root))
    for protocol in PROTOCOLS:
        pixels = imread(out / protocol / f"split-mnist-{kind}.png")[..., :3].reshape(-1, 3)
        strategies = {*PROFILES, "si"} if protocol == "paper" else set(PROFILES)
        if kind == "forgetting":
            strategies -= {"joint"}
        for name in strategies:
            distance = np.abs(pixels - np.array(to_rgb(colors[name]))).max(axis=1)
            assert (distance < 2.5 / 255).sum() >= 20, (protocol, kind, name)


@pytest.mark.parametrize("kind", ["curve", "cost"])
def test_legend_is_outside_the_axes(root, kind):
    runs = [r for r in load_runs(root) if r["benchmark"] == "split-mnist" and r["protocol"] == "paper"]
    fig = plots.FIGURES[kind](runs, plots.strategy_colors(r["strategy"] for r in runs))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (ax,) = fig.axes
    assert not ax.get_legend()
    (legend,) = fig.legends
    box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert not box.overlaps(axes_box)
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1 - 1, box.y1 - 1)  # not cut off
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0].startswith("joint") and len(labels) == 6


def test_reliability_titles_show_ece(root):
    runs = [r for r in load_runs(root) if r["benchmark"] == "split-mnist" and r["protocol"] == "quick"]
    fig = plots.reliability_figure(runs, plots.strategy_colors(r["strategy"] for r in runs))
    titles = {ax.get_title().split(" (")[0]: ax.get_title() for ax in fig.axes if ax.get_visible()}
    assert set(titles) == set(PROFILES)
    for name, title in titles.items():
        eces = [r["metrics"]["ece"] for r in runs if r["strategy"] == name]
        assert f"ECE {np.mean(eces) * 100:.1f} ± {np.std(eces, ddof=1) * 100:.1f} %" in title


def test_no_pyplot_torch_or_avalanche_import():
    code = (
        "import sys, cl_bayes.plots, cl_bayes.leaderboard; "
        "bad = [m for m in ('matplotlib.pyplot', 'torch', 'avalanche') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
