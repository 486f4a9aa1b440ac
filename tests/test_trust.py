"""make bench's comparison, configuration rows, verification records, external methods, the HTML page."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from _results_factory import clone, make_result, make_tree, snapshot, write_json_file, write_results

from cl_bayes import bench, verify
from cl_bayes import leaderboard as lb
from cl_bayes import metrics as M
from cl_bayes.cli import main
from cl_bayes.suite import Suite

SUITE = Suite(protocol="quick", seeds=[0, 1, 2], benchmarks=["split-mnist"], strategies=["naive", "ewc"])


def _suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text('protocol = "quick"\nseeds = [0, 1, 2]\nbenchmarks = ["split-mnist"]\n'
                    'strategies = ["naive", "ewc"]\n')
    return path


# --------------------------------------------------------------------------- bench comparison


def test_tolerance_is_three_std_with_a_floor():
    assert bench.tolerance(1.0) == 3.0
    assert bench.tolerance(0.1) == 0.5
    assert bench.tolerance(math.nan) == 0.5


def test_compare_passes_identical_runs_and_flags_a_regression(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_tree(ref, benchmarks=("split-mnist",), strategies=("naive", "ewc"))
    make_tree(run, benchmarks=("split-mnist",), strategies=("naive", "ewc"))
    table = bench.compare(run, ref, SUITE)
    assert table["status"].tolist() == ["pass", "pass"] and bench.failed(table).empty
    # naive's runs with a much lower skill: far outside max(3 std, 0.5 points)
    worse = [make_result("split-mnist", "naive", k, skill=0.70) for k in range(3)]
    shutil.rmtree(run / "quick" / "split-mnist" / "naive")
    write_results(run, worse)
    table = bench.compare(run, ref, SUITE).set_index("strategy")
    assert table.loc["naive", "status"] == "regressed" and table.loc["ewc", "status"] == "pass"
    assert table.loc["naive", "delta"] < -table.loc["naive", "tolerance"]
    md = bench.comparison_markdown(table.reset_index(), reference="ref", run="run")
    assert "**REGRESSED**" in md and md.strip().endswith("naive on split-mnist (regressed).")


def test_compare_cli_exit_status_and_missing_cells(tmp_path, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_tree(ref, benchmarks=("split-mnist",), strategies=("naive", "ewc"))
    make_tree(run, benchmarks=("split-mnist",), strategies=("naive",))  # ewc's runs are missing
    assert main(["compare", str(run), str(_suite_file(tmp_path)), "--reference", str(ref)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 1 of 2 cells" in out and "ewc on split-mnist (missing)" in out
    assert (run / "COMPARISON.md").exists() and (run / "comparison.csv").exists()
    assert not (ref / "COMPARISON.md").exists()  # the reference is never written
    make_tree(run, benchmarks=("split-mnist",), strategies=("ewc",))
    assert main(["compare", str(run), str(_suite_file(tmp_path)), "--reference", str(ref)]) == 0
    assert main(["compare", str(ref), str(_suite_file(tmp_path)), "--reference", str(ref)]) == 2
    assert "is the reference itself" in capsys.readouterr().err


def test_new_run_dirs_are_fresh(tmp_path):
    a = bench.new_run_dir(tmp_path / "runs")
    b = bench.new_run_dir(tmp_path / "runs")
    assert a != b and a.is_dir() and b.is_dir() and a.parent == tmp_path / "runs"


# --------------------------------------------------------------------------- configuration rows


def _with_config(result, **changes):
    r = clone(result)
    r["config"].update(changes)
    return r


def test_a_run_with_another_configuration_is_its_own_row(tmp_path):
    root = tmp_path / "results"
    make_tree(root, benchmarks=("split-mnist",), strategies=("naive",))
    spec_lr = lb.SpecConfigs()("naive", "split-mnist", "quick")["lr"]
    other = _with_config(make_result("split-mnist", "naive", 3, skill=0.99), epochs=6, lr=spec_lr)
    write_results(root, [other])
    board = lb.build_leaderboard(root)
    assert sorted(board["row"]) == ["naive", "naive (epochs=6)"]
    spec_row = board[board["row"] == "naive"].iloc[0]
    assert spec_row.n_seeds == 3 and spec_row.seeds == "0,1,2"  # the epochs=6 run is not averaged in
    six = board[board["row"] == "naive (epochs=6)"].iloc[0]
    assert six.n_seeds == 1 and six.config == "epochs=6"
    assert six.accuracy_mean == pytest.approx(other["metrics"]["average_accuracy"])


def test_config_difference_ignores_keys_a_file_predates_and_the_device():
    spec = {"epochs": 1, "lr": 0.001, "hidden": [256, 256], "term_curvature": True}
    recorded = {"epochs": 1, "lr": 0.001, "hidden": [100, 100], "device": "cuda", "seed": 4,
                "params": {"ewc_lambda": 3.0}}
    assert lb.config_difference(recorded, spec) == {"hidden": [100, 100]}
    assert lb.config_label({"hidden": [100, 100], "mode": "online"}) == 'hidden=[100, 100], mode="online"'


# --------------------------------------------------------------------------- verification records


def _records(root, data, ok=True):
    rerun = clone(data)
    if not ok:
        rerun["accuracy_matrix"] = [[max(0.0, v - 0.05) for v in row] for row in data["accuracy_matrix"]]
        rerun["metrics"] = {**rerun["metrics"], **M.matrix_metrics(rerun["accuracy_matrix"])}
    record = verify.make_record(data, rerun, verify.TOLERANCE, command="test")
    verify.store_records(root, {verify.record_key(data): record})
    return record


def _forge(data, points=2.0):
    """Raise every accuracy-matrix entry and recompute the metrics: internally consistent, but false."""
    forged = clone(data)
    forged["accuracy_matrix"] = [[min(1.0, v + points / 100) for v in row] for row in data["accuracy_matrix"]]
    forged["metrics"] = {**forged["metrics"], **M.matrix_metrics(forged["accuracy_matrix"])}
    return forged


def test_verified_counts_and_a_forged_file_loses_its_record(tmp_path):
    root = tmp_path / "results"
    runs = make_tree(root, benchmarks=("split-mnist",), strategies=("naive", "ewc"))
    naive0 = next(r for r in runs if r["strategy"] == "naive" and r["seed"] == 0)
    naive1 = next(r for r in runs if r["strategy"] == "naive" and r["seed"] == 1)
    assert _records(root, naive0)["verified"] and not _records(root, naive1, ok=False)["verified"]
    board = lb.build_leaderboard(root).set_index("row")
    assert board.loc["naive", "n_verified"] == 1 and board.loc["naive", "n_failed"] == 1
    assert board.loc["naive", "status"] == "verification failed"
    assert board.loc["ewc", "status"] == "unverified" and board.loc["ewc", "n_verified"] == 0

    # only ewc's seed 0 verified: ewc is listed first even if naive were more accurate
    root2 = tmp_path / "results2"
    runs2 = make_tree(root2, benchmarks=("split-mnist",), strategies=("naive", "ewc"))
    ewc0 = next(r for r in runs2 if r["strategy"] == "ewc" and r["seed"] == 0)
    _records(root2, ewc0)
    board2 = lb.build_leaderboard(root2)
    assert board2["row"].tolist()[0] == "ewc" and board2["status"].tolist() == ["verified", "unverified"]
    assert board2["rank"].tolist() == [1, 2]

    # forge the verified file afterwards: internally consistent, so submit's checks would pass, but the
    # record no longer matches its content and the run is unverified again
    forged = _forge(ewc0)
    path = root2 / "quick" / "split-mnist" / "ewc" / "seed0.json"
    path.write_text(json.dumps(forged))
    assert lb.check_submission(path)  # "valid" means only "internally consistent"
    assert verify.status_of(forged, verify.load_records(root2)) == "unverified"
    assert lb.build_leaderboard(root2).set_index("row").loc["ewc", "status"] == "unverified"


def test_compare_matrices_tolerance():
    assert verify.compare_matrices([[0.9, 0.8]], [[0.905, 0.795]]) == (True, pytest.approx(0.005))
    ok, diff = verify.compare_matrices([[0.9, 0.8]], [[0.92, 0.8]])
    assert not ok and diff == pytest.approx(0.02)
    assert verify.compare_matrices([[0.9, 0.8]], [[0.9]]) == (False, None)


# --------------------------------------------------------------------------- external methods


def test_an_external_method_needs_a_description_and_is_listed_apart(tmp_path, capsys):
    root = tmp_path / "results"
    make_tree(root, benchmarks=("split-mnist",), strategies=("naive",))
    outside = make_result("split-mnist", "my-method", 0, skill=0.99, forget=0.0)
    bare = write_json_file(tmp_path / "sub" / "bare.json", outside)
    before = snapshot(root)
    assert main(["submit", str(bare), "--results", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a 'description' field" in err
    assert snapshot(root) == before
    described = write_json_file(tmp_path / "sub" / "described.json",
                                {**outside, "description": "Our method: replay with a learnt prior"})
    assert main(["submit", str(described), "--results", str(root)]) == 0
    board = lb.build_leaderboard(root)
    assert board["row"].tolist() == ["naive", "my-method"]  # listed after the registered row, though better
    ext = board.iloc[1]
    assert ext.status == "external, unverified" and ext.description == "Our method: replay with a learnt prior"
    md = (root / "LEADERBOARD.md").read_text()
    assert "my-method — Our method: replay with a learnt prior" in md and "| external, unverified |" in md
    # it cannot be rerun here: one error line, no record
    assert main(["verify", str(described), "--results", str(root)]) == 2
    assert "not registered" in capsys.readouterr().err and not (root / "verified.json").exists()


def test_verify_rejects_malformed_and_missing_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["verify", str(bad), "--results", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nope.json"), "--results", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "verified.json").exists()


# --------------------------------------------------------------------------- the HTML page


def _page(tmp_path) -> tuple[Path, str]:
    root = tmp_path / "results"
    make_tree(root, benchmarks=("split-mnist", "permuted-mnist"), strategies=("naive", "ewc", "replay"))
    write_results(root, [_with_config(make_result("split-mnist", "naive", 5), epochs=6)])
    path = lb.write_leaderboard_html(root)
    return path, path.read_text()


def test_the_html_page_has_every_table_row_and_plot(tmp_path):
    path, page = _page(tmp_path)
    assert path.name == "leaderboard.html"
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "src=\"http" not in page  # self-contained
    assert page.count('<table class="board"') == 2
    assert 'data-protocol="quick" data-benchmark="split-mnist"' in page
    assert ">naive (epochs=6)</td>" in page and ">replay</td>" in page
    assert page.count("<tbody>") == 2 and page.count("<tr class=") == 3 + 1 + 3
    assert page.count('src="data:image/png;base64,') >= 8  # curve, matrix, cost, forgetting (+ reliability)
    assert 'data-kind="num"' in page and "addEventListener('click'" in page


@pytest.mark.slow
def test_the_html_page_in_a_headless_browser(tmp_path):
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser is None:
        pytest.skip("no headless browser (chromium) installed")
    path, _ = _page(tmp_path)
    url = path.resolve().as_uri() + "#sort=accuracy:asc"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom  # the script ran without an error
    first = dom.split('<table class="board"')[1].split("</table>")[0]
    import re

    keys = [float(v) for v in re.findall(r'data-key="accuracy" data-sort="([^"]+)"', first)]
    assert len(keys) == 4 and keys == sorted(keys)  # sorted ascending by the page's own JavaScript
    assert 'aria-sort="ascending"' in first
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000",
                    f"--screenshot={shot}", path.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_verify_reruns_a_real_run_and_catches_a_forged_copy(tmp_path, mnist_root, capsys):
    from conftest import tiny_set_args

    root = tmp_path / "results"
    assert main(["-q", "run", "--strategy", "naive", "--benchmark", "split-mnist", "--seed", "0", "--threads", "1",
                 "--results", str(root), *tiny_set_args()]) == 0
    path = root / "quick" / "split-mnist" / "naive" / "seed0.json"
    capsys.readouterr()
    assert main(["-q", "verify", str(path), "--results", str(root)]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert verify.status_of(data, verify.load_records(root)) == "verified"
    board = lb.build_leaderboard(root)
    assert board.iloc[0].status == "verified" and board.iloc[0].n_verified == 1

    forged_root = tmp_path / "forged"
    forged = write_json_file(tmp_path / "forged.json", _forge(data))
    assert main(["-q", "verify", str(forged), "--results", str(forged_root)]) == 1
    out = capsys.readouterr()
    assert "MISMATCH" in out.out and "did not reproduce" in out.err
    assert main(["submit", str(forged), "--results", str(forged_root)]) == 0  # consistent, so accepted ...
    row = lb.build_leaderboard(forged_root).iloc[0]
    assert row.status == "verification failed" and row.n_verified == 0  # ... but marked as failed
