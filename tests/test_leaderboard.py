"""Leaderboard, submissions and the results-file schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _results_factory import clone, make_result, make_tree, snapshot, write_json_file, write_results

from cl_bayes import leaderboard as lb
from cl_bayes import results
from cl_bayes.leaderboard import SubmissionError, build_leaderboard, submit, write_leaderboard

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "results" / "schema" / "result.schema.json"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path / "results"
    runs = make_tree(root, benchmarks=("split-mnist", "permuted-mnist"), protocols=("quick", "paper"))
    return root, runs


def _files_by_group(root: Path) -> dict[tuple[str, str], pd.DataFrame]:
    """Read the files with plain json, independently of cl_bayes.leaderboard."""
    rows = []
    for path in root.glob("*/*/*/seed*.json"):
        d = json.loads(path.read_text())
        rows.append(
            {
                "protocol": d["protocol"],
                "benchmark": d["benchmark"],
                "strategy": d["strategy"],
                "seed": d["seed"],
                "acc": d["metrics"]["average_accuracy"],
                "forgetting": np.nan if d["metrics"]["forgetting"] is None else d["metrics"]["forgetting"],
                "ece": d["metrics"]["ece"],
                "nll": d["metrics"]["nll"],
                "time": d["time_s"]["total"],
                "peak": d["peak_memory_mb"],
                "memory_size": d["memory_size"],
                "spec": d["spec"],
            }
        )
    df = pd.DataFrame(rows)
    return {key: g for key, g in df.groupby(["protocol", "benchmark"])}


# --------------------------------------------------------------------------- leaderboard


def test_leaderboard_ranks_by_mean_accuracy_and_matches_files(tree):
    root, _ = tree
    board = build_leaderboard(root)
    groups = _files_by_group(root)
    assert list(board.columns) == list(lb.COLUMNS)
    assert len(board) == sum(g["strategy"].nunique() for g in groups.values())
    # sections in registry order: protocols, then benchmarks
    order = list(dict.fromkeys(zip(board["protocol"], board["benchmark"], strict=True)))
    assert order == [("quick", "split-mnist"), ("quick", "permuted-mnist"),
                     ("paper", "split-mnist"), ("paper", "permuted-mnist")]  # fmt: skip
    for (protocol, benchmark), files in groups.items():
        sub = board[(board["protocol"] == protocol) & (board["benchmark"] == benchmark)]
        expected_order = files.groupby("strategy")["acc"].mean().sort_values(ascending=False).index.tolist()
        assert sub["strategy"].tolist() == expected_order
        assert sub["rank"].tolist() == list(range(1, len(sub) + 1))
        assert sub["accuracy_mean"].is_monotonic_decreasing
        for row in sub.itertuples():
            f = files[files["strategy"] == row.strategy]
            acc = f["acc"].to_numpy()
            assert row.n_seeds == len(f) == 3
            assert row.seeds == "0,1,2"
            assert row.accuracy_mean == pytest.approx(np.mean(acc), abs=1e-12)
            assert row.accuracy_std == pytest.approx(np.std(acc, ddof=1), abs=1e-12)
            assert row.ece_mean == pytest.approx(f["ece"].mean(), abs=1e-12)
            assert row.nll_mean == pytest.approx(f["nll"].mean(), abs=1e-12)
            assert row.time_total_mean == pytest.approx(f["time"].mean(), abs=1e-9)
            assert row.peak_memory_mb == pytest.approx(f["peak"].max())
            assert row.memory_size == f["memory_size"].iloc[0]
            assert row.spec == f["spec"].iloc[0]
            if f["forgetting"].isna().all():  # joint runs
                assert row.strategy == "joint" and np.isnan(row.forgetting_mean) and np.isnan(row.bwt_mean)
            else:
                assert row.forgetting_mean == pytest.approx(f["forgetting"].mean(), abs=1e-12)
                assert row.forgetting_std == pytest.approx(np.std(f["forgetting"], ddof=1), abs=1e-12)


def test_leaderboard_ties_share_rank_and_single_seed_has_no_std(tmp_path):
    root = tmp_path / "results"
    a = make_result(strategy="alpha", seed=0)
    b = clone(a) | {"strategy": "beta"}
    c = make_result(strategy="gamma", seed=0, skill=0.3)
    write_results(root, [a, b, c])
    board = build_leaderboard(root)
    assert board["strategy"].tolist() == ["alpha", "beta", "gamma"]
    assert board["rank"].tolist() == [1, 1, 3]
    assert board["accuracy_std"].isna().all()
    md = lb.leaderboard_markdown(board)
    assert f"| {a['metrics']['average_accuracy'] * 100:.2f} |" in md  # no "±" for one seed


def test_write_leaderboard_markdown_and_csv(tree):
    root, _ = tree
    md_path, csv_path = write_leaderboard(root, root / "LEADERBOARD.md", root / "leaderboard.csv")
    board = build_leaderboard(root)
    md = md_path.read_text()
    assert md.startswith("# cl-bayes leaderboard")
    assert f"```sh\n{lb.REGENERATE_COMMAND}\n```" in md
    headers = re.findall(r"^## (\S+) / (\S+)$", md, flags=re.M)
    assert headers == list(dict.fromkeys(zip(board["protocol"], board["benchmark"], strict=True)))
    # tables: every row has as many cells as the header; rows in rank order with percent ± std
    for section in md.split("\n## ")[1:]:
        protocol, benchmark = section.splitlines()[0].split(" / ")
        table = [line for line in section.splitlines() if line.startswith("|")]
        assert {line.count("|") - line.count("\\|") for line in table} == {14}
        sub = board[(board["protocol"] == protocol) & (board["benchmark"] == benchmark)]
        body = table[2:]
        assert len(body) == len(sub)
        for line, row in zip(body, sub.itertuples(), strict=True):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[0] == str(row.rank) and cells[1] == row.strategy
            assert cells[2] == f"{row.accuracy_mean * 100:.2f} ± {row.accuracy_std * 100:.2f}"
            assert cells[3] == "3"
            assert cells[4] == "0/3"  # nothing verified in a fresh tree
    csv = pd.read_csv(csv_path)
    assert csv["strategy"].tolist() == board["strategy"].tolist()
    np.testing.assert_allclose(csv["accuracy_mean"], board["accuracy_mean"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(csv["accuracy_std"], board["accuracy_std"], rtol=0, atol=1e-12)
    assert not list(root.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_write_leaderboard_defaults_and_overwrites(tree):
    root, _ = tree
    first = write_leaderboard(root)
    assert first == [root / "LEADERBOARD.md", root / "leaderboard.csv"]
    write_results(root, [make_result("split-mnist-ci", "naive", 0, "quick")])
    write_leaderboard(root, command="make leaderboard")
    md = first[0].read_text()
    assert "## quick / split-mnist-ci" in md and "make leaderboard" in md


def test_empty_leaderboard(tmp_path):
    md, csv = write_leaderboard(tmp_path / "results", tmp_path / "out" / "LB.md", tmp_path / "out" / "lb.csv")
    assert "No results yet." in md.read_text()
    assert pd.read_csv(csv).columns.tolist() == list(lb.COLUMNS)


def test_file_at_the_wrong_path_is_an_error(tree):
    root, _ = tree
    src = results.result_path(root, "quick", "split-mnist", "naive", 0)
    dst = results.result_path(root, "quick", "split-mnist", "ewc", 7)
    dst.write_bytes(src.read_bytes())
    with pytest.raises(results.ResultsError, match="seed7.json: contents belong at"):
        build_leaderboard(root)


# --------------------------------------------------------------------------- submissions


def _submission(tmp_path: Path, name: str, data: Any) -> Path:
    return write_json_file(tmp_path / "incoming" / name, data)


def test_submit_valid_files(tree, tmp_path):
    root, _ = tree
    new = [make_result("split-mnist", "vcl", seed, "quick") for seed in (3, 4)]
    joint = make_result("split-fmnist", "joint", 0, "paper")
    files = [_submission(tmp_path, f"r{i}.json", d) for i, d in enumerate([*new, joint])]
    written = submit(files, root)
    assert written == [results.result_path(root, d["protocol"], d["benchmark"], d["strategy"], d["seed"])
                       for d in [*new, joint]]  # fmt: skip
    for path, data in zip(written, [*new, joint], strict=True):
        assert results.load(path) == data
    board = build_leaderboard(root)
    row = board[(board["protocol"] == "quick") & (board["benchmark"] == "split-mnist") & (board["strategy"] == "vcl")]
    assert row["n_seeds"].item() == 5
    assert submit([], root) == []


def test_submit_accepts_metrics_within_tolerance(tmp_path):
    d = make_result()
    d["metrics"]["average_accuracy"] += 5e-7
    d["metrics"]["ece"] -= 5e-7
    assert submit([_submission(tmp_path, "ok.json", d)], tmp_path / "results")


def _corrupt(kind: str) -> tuple[Any, str]:
    """A rejected submission of the given kind and a regex its error message must match."""
    d = make_result("split-mnist", "ewc", 9, "quick")
    if kind == "malformed-json":
        return '{"schema_version": 1, "benchmark": ', "not valid JSON"
    if kind == "nan":
        text = json.dumps(d).replace(str(d["metrics"]["nll"]), "NaN")
        return text, "not valid JSON"
    if kind == "not-an-object":
        return [d], "expected a JSON object"
    if kind == "schema-version":
        d["schema_version"] = 2
    elif kind == "metric-missing":
        del d["metrics"]["nll"]
        return d, "metrics lacks 'nll'"
    elif kind.startswith("missing-"):
        del d[kind.removeprefix("missing-")]
        return d, f"missing field '{kind.removeprefix('missing-')}'"
    elif kind == "wrong-type-seed":
        d["seed"] = "9"
        return d, "field 'seed' has the wrong type"
    elif kind == "forged-accuracy":
        d["metrics"]["average_accuracy"] += 0.01
        return d, "metrics.average_accuracy is .* but the accuracy matrix gives"
    elif kind == "forged-forgetting":
        d["metrics"]["forgetting"] -= 0.05
        return d, "metrics.forgetting"
    elif kind == "bwt-null":
        d["metrics"]["backward_transfer"] = None
        return d, "metrics.backward_transfer"
    elif kind == "forged-ece":
        d["metrics"]["ece"] = max(0.0, d["metrics"]["ece"] - 0.02)
        return d, "metrics.ece is .* but the calibration table gives"
    elif kind == "forged-calibration":
        d["calibration"]["accuracy"] = [min(1.0, a + 0.1) if n else a
                                        for a, n in zip(d["calibration"]["accuracy"], d["calibration"]["count"],
                                                        strict=True)]  # fmt: skip
        return d, "metrics.ece is .* but the calibration table gives"
    elif kind == "calibration-length":
        d["calibration"]["count"] = d["calibration"]["count"][:-1]
        return d, "calibration.count must be a list of 15 entries"
    elif kind == "unknown-benchmark":
        d["benchmark"] = "split-imagenet"
        return d, "unknown benchmark 'split-imagenet'"
    elif kind == "unknown-protocol":
        d["protocol"] = "fast"
        return d, "unknown protocol 'fast'"
    elif kind == "path-in-strategy":
        d["strategy"] = "../../../etc"
        return d, "strategy name"
    elif kind == "matrix-shape":
        d["accuracy_matrix"] = d["accuracy_matrix"][:2]
        return d, "accuracy_matrix is 2 x 5"
    elif kind == "bad-created":
        d["created"] = "yesterday"
        return d, "created"
    elif kind == "negative-memory":
        d["memory_size"] = -1
        return d, "memory_size"
    return d, kind.split("-")[0]


CORRUPTIONS = [
    "malformed-json", "nan", "not-an-object", "schema-version", "missing-accuracy_matrix", "missing-metrics",
    "missing-calibration", "missing-spec", "missing-memory_size", "missing-created", "missing-data_source",
    "metric-missing", "wrong-type-seed", "forged-accuracy", "forged-forgetting", "bwt-null", "forged-ece",
    "forged-calibration", "calibration-length", "unknown-benchmark", "unknown-protocol", "path-in-strategy",
    "matrix-shape", "bad-created", "negative-memory",
]  # fmt: skip


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_rejected_submission_changes_nothing(tree, tmp_path, kind):
    root, _ = tree
    bad, reason = _corrupt(kind)
    good = _submission(tmp_path, "good.json", make_result("split-mnist", "vcl", 5, "quick"))
    bad_file = tmp_path / "incoming" / "bad.json"
    bad_file.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    before = snapshot(root)
    with pytest.raises(SubmissionError) as err:
        submit([good, bad_file], root)  # the good file comes first: it must not be written either
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{bad_file}: ")
    assert re.search(reason, message), message
    assert snapshot(root) == before


def test_duplicate_seed_within_submission(tree, tmp_path):
    root, _ = tree
    d = make_result("split-mnist", "vcl", 7, "quick")
    a = _submission(tmp_path, "a.json", d)
    b = _submission(tmp_path, "b.json", d)
    before = snapshot(root)
    with pytest.raises(SubmissionError, match=rf"^{re.escape(str(b))}: duplicate seed: .*seed 7 is also in .*a\.json"):
        submit([a, b], root)
    assert snapshot(root) == before
    # the same seed for another strategy, benchmark or protocol is a different run
    others = [clone(d) | {"strategy": "ewc"}, clone(d) | {"protocol": "paper"}]
    submit([a, *[_submission(tmp_path, f"o{i}.json", o) for i, o in enumerate(others)]], root)


def test_duplicate_seed_versus_existing(tree, tmp_path):
    root, runs = tree
    existing = results.result_path(root, "quick", "split-mnist", "naive", 1)
    d = make_result("split-mnist", "naive", 1, "quick", skill=0.99)  # different numbers, same run
    f = _submission(tmp_path, "again.json", d)
    before = snapshot(root)
    with pytest.raises(SubmissionError, match=r"already exists .*nothing is overwritten"):
        submit([f], root)
    assert snapshot(root) == before
    assert results.load(existing)["metrics"] != d["metrics"]


def test_failed_write_is_rolled_back(tree, tmp_path, monkeypatch):
    root, _ = tree
    files = [_submission(tmp_path, f"n{i}.json", make_result("split-cifar10", "vcl", i, "paper")) for i in range(3)]
    before = snapshot(root)
    calls = []

    def flaky(path, data, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return results.write_atomic(path, data, **kw)

    monkeypatch.setattr(lb, "write_atomic", flaky)
    with pytest.raises(SubmissionError, match=r"n2\.json: write failed, nothing added \(disk full\)"):
        submit(files, root)
    assert len(calls) == 3
    assert snapshot(root) == before  # the two written files and the new folders are gone


# --------------------------------------------------------------------------- schema


def _check(instance: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """The subset of JSON Schema 2020-12 the results schema uses (no jsonschema dependency)."""
    errors = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = {
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "null": lambda v: v is None,
        }
        if not any(ok[t](instance) for t in types):
            return [f"{where}: type {type(instance).__name__} is not {types}"]
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{where}: not {schema['const']}")
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{where}: not in enum")
    if "pattern" in schema and isinstance(instance, str) and not re.search(schema["pattern"], instance):
        errors.append(f"{where}: does not match pattern")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{where}: below minimum")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{where}: above maximum")
    if isinstance(instance, dict):
        errors += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in instance]
        for k, sub in schema.get("properties", {}).items():
            if k in instance:
                errors += _check(instance[k], sub, f"{where}.{k}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{where}: too few items")
        if "items" in schema:
            for i, v in enumerate(instance):
                errors += _check(v, schema["items"], f"{where}[{i}]")
    return errors


def test_schema_documents_every_field():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    required = set(schema["required"])
    assert set(results.REQUIRED_FIELDS) <= required
    assert required == set(make_result())  # the factory writes exactly the documented fields
    assert schema["properties"]["schema_version"]["const"] == results.SCHEMA_VERSION
    assert schema["properties"]["benchmark"]["enum"] == list(lb.BENCHMARKS)
    assert schema["properties"]["protocol"]["enum"] == list(lb.PROTOCOLS)
    assert set(schema["properties"]["metrics"]["required"]) == set(results.METRIC_FIELDS)

    def described(node: dict[str, Any], where: str) -> None:
        for key, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{where}.{key} has no description"
            described(sub, f"{where}.{key}")

    described(schema, "$")


def test_schema_accepts_valid_results_and_rejects_broken_ones():
    schema = json.loads(SCHEMA_PATH.read_text())
    for d in [make_result(), make_result("split-cifar10", "joint", 3, "paper"), make_result(strategy="replay")]:
        assert _check(d, schema) == []
    for kind in ["schema-version", "missing-calibration", "wrong-type-seed", "unknown-benchmark",
                 "unknown-protocol", "path-in-strategy", "negative-memory"]:  # fmt: skip
        bad, _ = _corrupt(kind)
        assert _check(bad, schema), kind
