"""The ``cl-bayes`` command: results files, refusal to overwrite, one-line errors with status 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torchvision
from conftest import TINY, tiny_set_args

from cl_bayes import metrics as M
from cl_bayes.cli import main
from cl_bayes.protocols import BENCHMARKS
from cl_bayes.results import load, result_path, validate

RESULT_KEYS = {"benchmark", "strategy", "seed", "protocol", "config", "versions", "git_sha", "device",
               "accuracy_matrix", "metrics", "time_s", "peak_memory_mb"}


def run_args(root, *extra, strategy="naive", benchmark="split-mnist", seed=0, tiny=True):
    return ["-q", "run", "--strategy", strategy, "--benchmark", benchmark, "--seed", str(seed),
            "--results", str(root), "--threads", "1", *(tiny_set_args() if tiny else []), *extra]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("cl-bayes: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root):
    """One tiny run through the CLI: (results root, path, stdout)."""
    root = tmp_path_factory.mktemp("cli") / "results"
    capture = _Capture()
    with capture:
        code = main(run_args(root, seed=3))
    assert code == 0, capture.err
    return root, result_path(root, "quick", "split-mnist", "naive", 3), capture.out


class _Capture:
    """stdout/stderr capture for module-scoped fixtures (capsys is function-scoped)."""

    def __enter__(self):
        import io

        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._old
        return False


def test_run_writes_a_complete_results_file(finished):
    root, path, out = finished
    assert path == root / "quick" / "split-mnist" / "naive" / "seed3.json"
    assert files_under(root) == [path]  # nothing else, no temporary files left
    assert str(path) in out
    d = json.loads(path.read_text())
    validate(d)
    assert load(path) == d
    assert RESULT_KEYS <= set(d)
    assert (d["benchmark"], d["strategy"], d["seed"], d["protocol"], d["device"]) == (
        "split-mnist", "naive", 3, "quick", "cpu")
    assert d["config"]["seed"] == 3 and d["config"]["strategy"] == "naive"
    for key, value in TINY.items():  # --set values are recorded, resolved
        assert d["config"][key] == value
    assert d["config"]["lr"] == 1e-3 and d["config"]["epochs"] == 1  # spec and protocol values
    for dist in ("torch", "avalanche-lib", "cl-bayes"):
        assert d["versions"][dist] == metadata.version(dist)
    assert d["git_sha"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", d["git_sha"])
    matrix = d["accuracy_matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert set(d["metrics"]) >= {"average_accuracy", "backward_transfer", "forgetting", "nll", "ece"}
    assert d["metrics"]["average_accuracy"] == pytest.approx(M.average_accuracy(matrix))
    assert d["metrics"]["forgetting"] == pytest.approx(M.forgetting(matrix))
    assert d["metrics"]["backward_transfer"] == pytest.approx(M.backward_transfer(matrix))
    assert set(d["time_s"]) >= {"per_experience", "total"} and len(d["time_s"]["per_experience"]) == 5
    assert d["peak_memory_mb"] > 0
    assert f"{100 * d['metrics']['average_accuracy']:.2f}%" in out


def test_a_second_run_refuses_and_keeps_the_file(finished, capsys):
    root, path, _ = finished
    before = path.read_bytes()
    assert main(run_args(root, seed=3)) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "--overwrite" in line
    assert path.read_bytes() == before
    assert files_under(root) == [path]


def test_overwrite_replaces_the_file(tmp_path, mnist_root, capsys):
    root = tmp_path / "results"
    assert main(run_args(root, "--set", "epochs=1")) == 0
    path = result_path(root, "quick", "split-mnist", "naive", 0)
    assert main(run_args(root, "--set", "epochs=2", "--overwrite")) == 0
    assert load(path)["config"]["epochs"] == 2
    assert files_under(root) == [path]


@pytest.fixture
def offline(monkeypatch):
    def no_network(self, *args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"strategy": "nope"}, "unknown strategy 'nope'"),
        ({"benchmark": "split-nmist"}, "unknown benchmark 'split-nmist'"),
        ({"extra": ["--set", "bogus=1"]}, "unknown key 'bogus'"),
        ({"extra": ["--set", "ewc_lambda=1.0"]}, "unknown key 'ewc_lambda'"),  # not naive's parameter
        ({"extra": ["--set", "epochs=true"]}, "'epochs' must be int"),
        ({"extra": ["--set", "lr=fast"]}, "'lr' must be float"),
        ({"extra": ["--set", "hidden=[32, true]"]}, "'hidden'"),
        ({"extra": ["--set", "lr"]}, "key=value"),
        ({"extra": ["--set", "epochs=0"]}, "epochs must be positive"),
        ({"extra": ["--specs", "/nonexistent/specs"]}, "no spec for strategy 'naive'"),
    ],
)
def test_bad_input_is_one_line_and_status_2(change, needle, tmp_path, capsys):
    root = tmp_path / "results"
    args = run_args(root, *change.get("extra", []), strategy=change.get("strategy", "naive"),
                    benchmark=change.get("benchmark", "split-mnist"))
    assert main(args) == 2
    assert needle in one_error_line(capsys)
    assert not root.exists() or files_under(root) == []


def test_missing_data_root_is_one_line_and_status_2(tmp_path, capsys, offline):
    root, empty = tmp_path / "results", tmp_path / "no-data"
    empty.mkdir()
    assert main(run_args(root, "--data-root", str(empty))) == 2
    line = one_error_line(capsys)
    assert "DataError" in line and str(empty / "MNIST" / "raw") in line and "train-images-idx3-ubyte" in line
    assert not root.exists() or files_under(root) == []


def test_a_suite_without_data_is_one_line_before_any_worker_starts(tmp_path, capsys, offline):
    root, empty = tmp_path / "results", tmp_path / "no-data"
    empty.mkdir()
    suite_file = tmp_path / "two.toml"
    suite_file.write_text('protocol = "quick"\nseeds = [0, 1]\nbenchmarks = ["split-mnist"]\nstrategies = ["naive"]\n')
    code = main(["-q", "suite", str(suite_file), "--results", str(root), "--data-root", str(empty), "--jobs", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MNIST not found under data root" in err[0] and str(empty / "MNIST" / "raw") in err[0]
    assert "FAILED" not in "\n".join(err)
    assert not root.exists() or files_under(root) == []


def test_a_diverging_run_is_one_line_and_leaves_no_file(tmp_path, capsys, mnist_root):
    root = tmp_path / "results"
    assert main(run_args(root, "--set", "lr=1e30")) == 2
    line = one_error_line(capsys)
    assert "NonFiniteLossError" in line and "non-finite loss" in line
    assert not root.exists() or files_under(root) == []


# --- leaderboard -------------------------------------------------------------------------


def test_leaderboard_from_a_run(finished, tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(finished[0], root)
    assert main(["leaderboard", "--results", str(root)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(root / "LEADERBOARD.md"), str(root / "leaderboard.csv"), str(root / "leaderboard.html")]
    md = (root / "LEADERBOARD.md").read_text()
    # the run used the TINY settings, not naive's spec: its own row, labelled by the differing keys
    assert "| naive (batch_size=64, " in md and "train_per_experience=200" in md and "| 0/1 |" in md
    assert "naive (batch_size=64, " in (root / "leaderboard.html").read_text()


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"schema_version": 1}', "missing field 'benchmark'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_a_malformed_results_file_stops_the_leaderboard(content, needle, finished, tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(finished[0], root)
    bad = result_path(root, "quick", "split-mnist", "ewc", 0)
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    assert main(["leaderboard", "--results", str(root)]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and needle in line
    assert not (root / "LEADERBOARD.md").exists()


def test_a_results_file_at_the_wrong_path_stops_the_leaderboard(finished, tmp_path, capsys):
    root = tmp_path / "results"
    good = finished[1]
    wrong = result_path(root, "quick", "split-mnist", "naive", 4)  # says seed 3 inside
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(good.read_bytes())
    assert main(["leaderboard", "--results", str(root)]) == 2
    assert "belong at" in one_error_line(capsys)


def test_list_names_every_benchmark_and_strategy(capsys):
    from cl_bayes.avalanche import strategies

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*BENCHMARKS, *strategies.names()]:
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), name


# --- the installed entry point ------------------------------------------------------------


def test_the_entry_point_in_a_subprocess(tmp_path, mnist_root):
    exe = Path(sys.executable).parent / "cl-bayes"
    if not exe.exists():
        exe = shutil.which("cl-bayes")
    assert exe, "the cl-bayes entry point is not installed (pip install -e .)"
    root = tmp_path / "results"
    proc = subprocess.run([str(exe), *run_args(root, strategy="lwf", seed=1)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = result_path(root, "quick", "split-mnist", "lwf", 1)
    assert proc.stdout.startswith(f"{path}: average accuracy ")
    # nothing but warnings (200 examples per experience can leave LwF at chance on one: that is a warning)
    assert all(line.startswith("cl-bayes: warning: ") for line in proc.stderr.splitlines()), proc.stderr
    assert validate(json.loads(path.read_text()))["config"]["train_per_experience"] == TINY["train_per_experience"]


def test_suite_part_outside_the_suite_is_one_error_line(tmp_path, capsys):
    code = main(["suite", str(Path(__file__).parents[1] / "benchmarks/suites/default.toml"), "--results",
                 str(tmp_path), "--only-strategy", "gem", "--only-benchmark", "split-cifar10"])
    assert code == 2
    assert "benchmark 'split-cifar10' is not in the suite" in one_error_line(capsys)
    assert files_under(tmp_path) == []


def test_a_finished_suite_still_writes_its_summary(finished, tmp_path):
    _, path, _ = finished
    root = tmp_path / "results"
    copy = result_path(root, "quick", "split-mnist", "naive", 3)
    copy.parent.mkdir(parents=True)
    shutil.copy(path, copy)
    suite_file = tmp_path / "one.toml"
    suite_file.write_text('protocol = "quick"\nseeds = [3]\nbenchmarks = ["split-mnist"]\nstrategies = ["naive"]\n')
    assert main(["-q", "suite", str(suite_file), "--results", str(root)]) == 0
    summary = (root / "quick" / "SUMMARY-one.md").read_text()
    accuracy = 100 * load(copy)["metrics"]["average_accuracy"]
    assert f"| naive | 1 | {accuracy:.2f} |" in summary


def test_experiences_trains_and_scores_only_the_first_k(make_config, mnist_root):
    from cl_bayes.avalanche import runner
    from cl_bayes.config import ConfigError

    for strategy in ("naive", "joint"):
        result = runner.run(make_config(strategy, experiences=2))
        assert len(result["accuracy_matrix"]) == (2 if strategy == "naive" else 1)
        assert all(len(row) == 2 for row in result["accuracy_matrix"])
        assert result["config"]["experiences"] == 2
    with pytest.raises(ConfigError, match="experiences"):
        make_config("naive", experiences=6)


def test_an_experience_left_at_chance_is_warned_and_recorded(tmp_path, capsys, mnist_root):
    """lr 1e-12: nothing is learnt, the loss stays finite. Each experience, right after its training, scores at chance
    (1 in 2 on split MNIST): one warning line per experience on stderr, the same texts in the results file."""
    import torch

    from cl_bayes.avalanche.runner import CHANCE_MARGIN, chance_level, not_learnt_warning

    assert chance_level(torch.tensor([3, 1, 3, 1])) == 0.5
    assert not_learnt_warning(0, 0.5 + CHANCE_MARGIN + 1e-6, 0.5) is None
    assert "experience 2 scores 52.00 %" in not_learnt_warning(1, 0.52, 0.5)
    root = tmp_path / "results"
    assert main(run_args(root, "--set", "lr=1e-12", "--set", "experiences=2")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "did not learn" in line]
    (path,) = files_under(root)
    data = validate(json.loads(path.read_text()))
    matrix = data["accuracy_matrix"]
    expected = [i for i in range(2) if matrix[i][i] <= 0.5 + CHANCE_MARGIN]
    assert expected, f"lr 1e-12 learnt something: {matrix}"
    assert len(data["warnings"]) == len(err) == len(expected)
    assert all(line.startswith("cl-bayes: warning: naive on split-mnist seed 0: experience ") for line in err)
