"""Suites (cl_bayes.suite): strict suite files, resumable plans, local execution, summaries."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from conftest import REPO, TINY

from cl_bayes import suite as S
from cl_bayes.avalanche import strategies
from cl_bayes.config import ConfigError
from cl_bayes.results import load, result_path

KNOWN = ["naive", "ewc", "replay"]


def write_suite(tmp_path, text: str):
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


GOOD = """
description = "two strategies"
protocol = "quick"
seeds = [0, 1]
benchmarks = ["split-mnist"]
strategies = ["naive", "ewc"]
"""


def test_load_suite(tmp_path):
    suite = S.load_suite(write_suite(tmp_path, GOOD), KNOWN)
    assert suite == S.Suite(protocol="quick", seeds=[0, 1], benchmarks=["split-mnist"], strategies=["naive", "ewc"],
                            description="two strategies")


def test_the_default_suite_loads():
    suite = S.load_suite(REPO / "benchmarks" / "suites" / "default.toml", strategies.names())
    assert suite.benchmarks and suite.strategies and suite.seeds


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD + 'seed = [3]\n', "unknown key 'seed'"),
        (GOOD.replace('"ewc"', '"ewc2"'), "unknown strategy 'ewc2'"),
        (GOOD.replace('"split-mnist"', '"split-mnits"'), "unknown benchmark 'split-mnits'"),
        (GOOD.replace('"quick"', '"fast"'), "unknown protocol 'fast'"),
        (GOOD.replace("[0, 1]", '"0"'), "'seeds'"),
        (GOOD.replace("[0, 1]", "[0, true]"), "'seeds'"),
        (GOOD.replace("[0, 1]", "[]"), "must not be empty"),
        (GOOD.replace('["naive", "ewc"]', "[]"), "must not be empty"),
        (GOOD + "protocol = = 1\n", "malformed TOML"),
    ],
)
def test_load_suite_is_strict(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        S.load_suite(write_suite(tmp_path, text), KNOWN)


def test_a_missing_suite_file(tmp_path):
    with pytest.raises(ConfigError, match="no suite file"):
        S.load_suite(tmp_path / "nope.toml", KNOWN)


def test_plan_skips_existing_results(tmp_path):
    suite = S.Suite(seeds=[0, 1], benchmarks=["split-mnist", "permuted-mnist"], strategies=["naive", "ewc"])
    root = tmp_path / "results"
    todo, done = S.plan(suite, results_root=str(root))
    assert len(todo) == 2 * 2 * 2 and done == []
    assert {(r.benchmark, r.strategy, r.seed) for r in todo} == {
        (b, s, k) for b in suite.benchmarks for s in suite.strategies for k in suite.seeds}
    existing = result_path(root, "quick", "permuted-mnist", "ewc", 1)
    existing.parent.mkdir(parents=True)
    existing.write_text("{}")
    todo, done = S.plan(suite, results_root=str(root))
    assert [(r.benchmark, r.strategy, r.seed) for r in done] == [("permuted-mnist", "ewc", 1)]
    assert len(todo) == 7 and all(r.path != existing for r in todo)
    assert done[0].path == existing
    todo, done = S.plan(suite, results_root=str(root), overwrite=True)  # overwrite: everything again
    assert len(todo) == 8 and done == []


def test_requests_carry_their_settings():
    suite = S.Suite(protocol="paper", seeds=[2], benchmarks=["split-mnist"], strategies=["naive"])
    (r,), _ = S.plan(suite, results_root="/r", overrides=(("epochs", 2),), threads=3)
    assert (r.protocol, r.overrides, r.threads) == ("paper", (("epochs", 2),), 3)
    assert r.label == "naive on split-mnist seed 2"
    cfg, _ = S.resolve_request(r)
    assert cfg.epochs == 2 and cfg.protocol == "paper"


@pytest.fixture(scope="module")
def tiny_suite_run(tmp_path_factory, mnist_root):
    """2 strategies x 1 benchmark x 2 seeds, run in this process: (suite, root, outcomes)."""
    suite = S.Suite(seeds=[0, 1], benchmarks=["split-mnist"], strategies=["naive", "ewc"])
    root = tmp_path_factory.mktemp("suite") / "results"
    todo, done = S.plan(suite, results_root=str(root), overrides=tuple(TINY.items()))
    assert len(todo) == 4 and done == []
    outcomes = []
    S.run_local(todo, jobs=1, on_result=outcomes.append)
    return suite, root, outcomes


def test_run_local_writes_every_file(tiny_suite_run):
    suite, root, outcomes = tiny_suite_run
    assert [o["status"] for o in outcomes] == ["ok"] * 4, [o.get("error") for o in outcomes]
    for strategy in suite.strategies:
        for seed in suite.seeds:
            d = load(result_path(root, "quick", "split-mnist", strategy, seed))
            assert (d["strategy"], d["seed"]) == (strategy, seed)
            assert d["config"]["train_per_experience"] == TINY["train_per_experience"]
    paths = {o["path"] for o in outcomes}
    assert len(paths) == 4
    for o in outcomes:
        assert o["accuracy"] == load(o["path"])["metrics"]["average_accuracy"]


def test_summary_frame_is_mean_and_std_over_the_files(tiny_suite_run):
    suite, root, _ = tiny_suite_run
    frame = S.summary_frame(root, suite)
    assert len(frame) == 2 and set(frame["strategy"]) == {"naive", "ewc"}
    for _, row in frame.iterrows():
        paths = [result_path(root, "quick", row.benchmark, row.strategy, k) for k in suite.seeds]
        files = [json.loads(p.read_text()) for p in paths]
        acc = np.array([100 * f["metrics"]["average_accuracy"] for f in files])
        assert row.seeds == 2
        assert row.accuracy == pytest.approx(acc.mean())
        assert row.accuracy_std == pytest.approx(acc.std(ddof=1))  # sample std over seeds
        assert row.forgetting == pytest.approx(np.mean([100 * f["metrics"]["forgetting"] for f in files]))
        assert row.ece == pytest.approx(np.mean([100 * f["metrics"]["ece"] for f in files]))
        assert row.nll == pytest.approx(np.mean([f["metrics"]["nll"] for f in files]))
        assert row.time_s == pytest.approx(np.mean([f["time_s"]["total"] for f in files]))
    text = S.summary_markdown(frame, command="cl-bayes suite x.toml")
    ranked = frame.sort_values("accuracy", ascending=False).strategy.tolist()
    assert text.index(f"| {ranked[0]} |") < text.index(f"| {ranked[1]} |")
    assert "### split-mnist" in text and "± " in text


def test_the_suite_resumes(tiny_suite_run):
    suite, root, _ = tiny_suite_run
    before = {p: p.read_bytes() for p in root.rglob("*.json")}
    todo, done = S.plan(suite, results_root=str(root), overrides=tuple(TINY.items()))
    assert todo == [] and len(done) == 4
    # executing a finished request again does not touch its file
    outcome = S.execute(done[0])
    assert outcome["status"] == "exists"
    assert {p: p.read_bytes() for p in root.rglob("*.json")} == before


def test_summary_of_missing_and_joint_runs(tiny_suite_run, tmp_path):
    suite, root, _ = tiny_suite_run
    one_seed = S.Suite(seeds=[0, 7], benchmarks=["split-mnist"], strategies=["naive"])  # seed 7 never ran
    frame = S.summary_frame(root, one_seed)
    assert frame.loc[0, "seeds"] == 1 and math.isnan(frame.loc[0, "accuracy_std"])
    assert S.summary_frame(tmp_path, suite).empty
    assert S.summary_markdown(S.summary_frame(tmp_path, suite), command="x") == "No results.\n"


def test_a_failed_run_is_reported_and_leaves_no_file(tmp_path, mnist_root):
    root = tmp_path / "results"
    bad = S.RunRequest(strategy="naive", benchmark="split-mnist", seed=0, protocol="quick", results_root=str(root),
                       overrides=(*TINY.items(), ("lr", 1e30)))
    typo = dataclasses.replace(bad, overrides=(("bogus", 1),), seed=1)
    outcomes = []
    S.run_local([bad, typo], jobs=1, on_result=outcomes.append)
    assert [o["status"] for o in outcomes] == ["failed", "failed"]
    assert "NonFiniteLossError" in outcomes[0]["error"]
    assert "ConfigError" in outcomes[1]["error"] and "bogus" in outcomes[1]["error"]
    assert not root.exists() or not list(root.rglob("*.json"))


def test_restrict_keeps_the_suite_order_and_refuses_names_outside_it():
    suite = S.Suite(protocol="paper", seeds=[0, 1, 2], benchmarks=["split-mnist", "permuted-mnist"],
                    strategies=["naive", "ewc", "replay"])
    part = S.restrict(suite, strategies=["replay", "naive"], seeds=[2])
    assert part == dataclasses.replace(suite, strategies=["naive", "replay"], seeds=[2])
    assert S.restrict(suite) == suite
    todo, _ = S.plan(S.restrict(suite, benchmarks=["permuted-mnist"], strategies=["ewc"]), results_root="r")
    assert [(r.benchmark, r.strategy, r.seed) for r in todo] == [("permuted-mnist", "ewc", k) for k in (0, 1, 2)]
    with pytest.raises(ConfigError, match="strategy 'lwf' is not in the suite"):
        S.restrict(suite, strategies=["lwf"])
    with pytest.raises(ConfigError, match="seed 7 is not in the suite"):
        S.restrict(suite, seeds=[7])


SETTINGS = GOOD.replace('["split-mnist"]', '["split-mnist", "permuted-mnist"]') + """
[settings.permuted-mnist]
epochs = 3
batch_size = 64
"""


def test_suite_settings_apply_per_benchmark_and_the_command_line_wins(tmp_path):
    suite = S.load_suite(write_suite(tmp_path, SETTINGS), KNOWN)
    assert suite.settings == {"permuted-mnist": {"epochs": 3, "batch_size": 64}}
    todo, _ = S.plan(suite, results_root=str(tmp_path), overrides=(("epochs", 5), ("lr", 0.01)))
    by_benchmark = {r.benchmark: dict(r.overrides) for r in todo}
    assert by_benchmark == {"split-mnist": {"epochs": 5, "lr": 0.01},
                            "permuted-mnist": {"epochs": 5, "batch_size": 64, "lr": 0.01}}
    (r,) = [r for r in todo if r.benchmark == "permuted-mnist" and r.strategy == "naive" and r.seed == 0]
    cfg, _ = S.resolve_request(r)
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (5, 64, 0.01)


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD + "[settings.permuted-mnist]\nepochs = 3\n", "benchmark the suite does not run"),
        (GOOD + "[settings]\nsplit-mnist = 3\n", "must be a table"),
        (GOOD + "settings = 3\n", "'settings'"),
    ],
)
def test_suite_settings_are_strict(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        S.load_suite(write_suite(tmp_path, text), KNOWN)


def test_an_unknown_key_in_suite_settings_fails_when_resolved(tmp_path):
    suite = S.load_suite(write_suite(tmp_path, GOOD + "[settings.split-mnist]\nepoch = 3\n"), KNOWN)
    (r, *_), _ = S.plan(suite, results_root=str(tmp_path))
    with pytest.raises(ConfigError, match="epoch"):
        S.resolve_request(r)


def test_the_vcl_protocol_suite_resolves_to_the_committed_runs_settings():
    suite = S.load_suite(REPO / "benchmarks" / "suites" / "vcl-protocol.toml", strategies.names())
    todo, done = S.plan(suite, results_root=str(REPO / "results" / "ablations" / "vcl-protocol"))
    for r in todo + done:
        cfg, _ = S.resolve_request(r)
        if r.benchmark == "split-mnist":
            assert (cfg.epochs, cfg.batch_size, cfg.params["test_samples"]) == (120, 20000, 100)
        else:
            assert (cfg.epochs, cfg.batch_size, cfg.params["test_samples"]) == (100, 256, 100)
    assert done, "the committed VCL-protocol runs are in results/ablations/vcl-protocol"
    for r in done:  # the committed files were made by cl-bayes run with the same settings as --set
        cfg, _ = S.resolve_request(r)
        assert json.loads(r.path.read_text())["config"] == cfg.to_dict(), r.label


def test_a_suite_run_logs_every_experience(tmp_path, mnist_root, capsys):
    r = S.RunRequest(strategy="naive", benchmark="split-mnist", seed=0, protocol="quick",
                     results_root=str(tmp_path), overrides=(*TINY.items(), ("experiences", 2)))
    outcomes = []
    S.run_local([r], jobs=1, on_result=outcomes.append, log_experiences=True)
    assert outcomes[0]["status"] == "ok"
    lines = [line for line in capsys.readouterr().err.splitlines() if "experiences done" in line]
    assert [line.split(":")[1].split(",")[0].strip() for line in lines] == ["1/2 experiences done",
                                                                            "2/2 experiences done"]
    assert all(line.startswith("naive on split-mnist seed 0: ") for line in lines)
    S.run_local([dataclasses.replace(r, seed=1)], jobs=1, on_result=outcomes.append)  # off by default
    assert "experiences done" not in capsys.readouterr().err
