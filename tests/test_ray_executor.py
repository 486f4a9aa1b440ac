"""The Ray executor on a local 2-CPU Ray: same results files as the local executor, retries, no double writes."""

from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray")

from cl_bayes import ray_executor  # noqa: E402
from cl_bayes.data import data_root  # noqa: E402
from cl_bayes.suite import RunRequest, Suite, execute, plan, run_local  # noqa: E402

OVERRIDES = (("train_per_experience", 200), ("test_per_experience", 100), ("hidden", [32]))
SUITE = Suite(protocol="quick", seeds=[0], benchmarks=["split-mnist"], strategies=["naive", "ewc"])
pytestmark = pytest.mark.skipif(not (data_root() / "MNIST" / "raw").is_dir(),
                                reason="MNIST not found (set CL_BAYES_DATA to a data root)")
VARYING = ("time_s", "peak_memory_mb", "created")  # differ from run to run by nature


def _request(root, strategy="naive", **changes) -> RunRequest:
    fields = {"strategy": strategy, "benchmark": "split-mnist", "seed": 0, "protocol": "quick",
              "results_root": str(root), "overrides": OVERRIDES, **changes}
    return RunRequest(**fields)


def _collect():
    outcomes = []
    return outcomes, outcomes.append


def test_existing_file_is_not_written_again_and_own_ray_is_shut_down(tmp_path):
    assert not ray.is_initialized()
    r = _request(tmp_path)
    r.path.parent.mkdir(parents=True)
    r.path.write_text("{}")
    before = os.stat(r.path)
    outcomes, on_result = _collect()
    ray_executor.run_ray([r], on_result=on_result, num_cpus=1)
    assert [o["status"] for o in outcomes] == ["exists"]
    assert outcomes[0]["attempts"] == 1
    after = os.stat(r.path)
    assert (after.st_ino, after.st_mtime_ns, r.path.read_text()) == (before.st_ino, before.st_mtime_ns, "{}")
    assert not ray.is_initialized()  # started by run_ray, so shut down by it


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_same_results_files_as_the_local_executor(tmp_path, local_ray):
    roots = {name: tmp_path / name for name in ("local", "ray")}
    todo, _ = plan(SUITE, results_root=str(roots["local"]), overrides=OVERRIDES, threads=1)
    local, on_local = _collect()
    run_local(todo, jobs=1, on_result=on_local)
    todo, _ = plan(SUITE, results_root=str(roots["ray"]), overrides=OVERRIDES, threads=4)  # run_ray uses 1
    remote, on_remote = _collect()
    ray_executor.run_ray(todo, on_result=on_remote)
    assert [o["status"] for o in local] == ["ok", "ok"]
    assert sorted(o["label"] for o in remote) == sorted(o["label"] for o in local)
    assert all(o["status"] == "ok" and o["attempts"] == 1 for o in remote)
    files = {name: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) for name, root in roots.items()}
    assert files["ray"] == files["local"] and len(files["local"]) == 2  # no temporary files left either
    for rel in files["local"]:
        a, b = (json.loads((roots[name] / rel).read_text()) for name in ("local", "ray"))
        assert b["accuracy_matrix"] == a["accuracy_matrix"]
        assert b["metrics"] == a["metrics"]
        assert {k: v for k, v in b.items() if k not in VARYING} == {k: v for k, v in a.items() if k not in VARYING}


def test_failing_run_is_retried_once_and_reported_once(tmp_path, local_ray):
    bad = _request(tmp_path, overrides=(*OVERRIDES, ("epochs", 0)))  # invalid config: fails on every attempt
    good = _request(tmp_path, strategy="ewc")
    outcomes, on_result = _collect()
    ray_executor.run_ray([bad, good], on_result=on_result)
    by_label = {o["label"]: o for o in outcomes}
    assert len(outcomes) == 2 and set(by_label) == {bad.label, good.label}
    assert by_label[bad.label]["status"] == "failed" and by_label[bad.label]["attempts"] == 2
    assert "epochs" in by_label[bad.label]["error"]
    assert by_label[good.label]["status"] == "ok" and by_label[good.label]["attempts"] == 1
    assert not bad.path.exists() and good.path.exists()


def _flaky(marker_dir, how):
    """A task whose first attempt fails: "returns failed", "dies" before running, or "dies after writing" its file."""

    def run_one(request):
        first = not os.path.exists(marker_dir / "attempted")
        (marker_dir / "attempted").touch()
        if first and how == "returns failed":
            return {"label": request.label, "status": "failed", "error": "RuntimeError: flaky"}
        if first and how == "dies":
            os._exit(1)
        with open(marker_dir / "executed", "a") as f:
            f.write("x")
        outcome = execute(request)
        if first and how == "dies after writing":
            os._exit(1)
        return outcome

    return run_one


@pytest.mark.parametrize("how", ["returns failed", "dies"])
def test_run_failing_its_first_attempt_is_retried(tmp_path, local_ray, monkeypatch, how):
    monkeypatch.setattr(ray_executor, "_run_one", _flaky(tmp_path, how))
    r = _request(tmp_path / "results")
    outcomes, on_result = _collect()
    ray_executor.run_ray([r], on_result=on_result)
    assert [(o["status"], o["attempts"]) for o in outcomes] == [("ok", 2)]
    assert r.path.exists() and (tmp_path / "executed").read_text() == "x"


@pytest.mark.parametrize("overwrite", [False, True])
def test_worker_dying_after_writing_is_not_run_again(tmp_path, local_ray, monkeypatch, overwrite):
    monkeypatch.setattr(ray_executor, "_run_one", _flaky(tmp_path, "dies after writing"))
    r = _request(tmp_path / "results", overwrite=overwrite)
    if overwrite:
        r.path.parent.mkdir(parents=True)
        r.path.write_text("{}")  # the old file that overwrite replaces
    outcomes, on_result = _collect()
    ray_executor.run_ray([r], on_result=on_result)
    assert len(outcomes) == 1
    outcome = outcomes[0]
    assert (outcome["status"], outcome["attempts"]) == ("ok", 1), outcome
    assert "WorkerCrashedError" in outcome["note"] and "not run again" in outcome["note"]
    assert 0 <= outcome["accuracy"] <= 1
    assert (tmp_path / "executed").read_text() == "x"  # executed (and written) once
    assert json.loads(r.path.read_text())["accuracy_matrix"]


def test_missing_ray_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RuntimeError, match=r"pip install 'cl-bayes\[ray\]'"):
        ray_executor.run_ray([], on_result=print)
