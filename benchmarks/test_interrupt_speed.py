"""How fast Ctrl-C stops a running suite (issue 15: within 2 s, finished runs listed, no partial file).

    CL_BAYES_DATA=/work/shared/data .venv/bin/python -m pytest benchmarks/test_interrupt_speed.py \
        --benchmark-only -s

Setting: ``cl-bayes suite benchmarks/suites/default.toml --jobs 2`` into a fresh results folder,
started in its own process group as a shell starts a foreground job. Once three runs have finished
(two workers are then in the middle of runs), SIGINT goes to the whole group, which is what a
terminal's Ctrl-C does. The timed part is from that signal to the exit of the ``cl-bayes`` process
(its workers are stopped before it exits). The test also checks the exit status (130), the
"interrupted after ..." line that lists the finished runs, and that no temporary results file
(``.NAME.json.*.tmp``) is left. Needs MNIST (skipped without it). Not collected by ``pytest tests/``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cl_bayes.data import data_root

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("cl-bayes")
TARGET_S = 2.0


def _start(results: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(CLI), "suite", str(REPO / "benchmarks/suites/default.toml"), "--results", str(results), "--jobs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO,
    )
    for line in proc.stdout:
        if line.startswith("[3/"):  # three runs done: both workers are now mid-run
            return proc
    raise AssertionError(f"the suite ended before three runs finished (status {proc.wait()})")


@pytest.mark.skipif(not (data_root() / "MNIST" / "raw").is_dir(), reason="needs MNIST under the data root")
def test_ctrl_c_stops_a_suite(benchmark, tmp_path):
    results = tmp_path / "results"
    outcome = {}

    def setup():
        outcome["proc"] = _start(results)
        return (), {}

    def interrupt():
        proc = outcome["proc"]
        os.killpg(proc.pid, signal.SIGINT)
        outcome["rest"] = proc.communicate(timeout=30)[0]
        outcome["code"] = proc.returncode

    benchmark.pedantic(interrupt, setup=setup, rounds=1, iterations=1)
    stop_s = benchmark.stats.stats.max
    benchmark.extra_info["stop_s"] = stop_s
    print(f"\nCtrl-C to exit: {stop_s:.2f} s (target <= {TARGET_S} s)")
    assert outcome["code"] == 130, outcome["rest"]
    assert "interrupted after" in outcome["rest"] and "runs finished in this call" in outcome["rest"]
    assert list(results.rglob(".*.tmp")) == []
    assert stop_s <= TARGET_S
