"""Resumable runs (``cl_bayes.avalanche.checkpoint``): a run killed after an experience and resumed
from its checkpoint ends with the same results as a run never stopped."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS, TINY

from cl_bayes import suite as S
from cl_bayes.avalanche import checkpoint as ckpt
from cl_bayes.avalanche.runner import run


class Killed(Exception):
    """Stands in for the end of a session after an experience."""


def _kill_after(n: int):
    def progress(done, total):
        if done == n:
            raise Killed

    return progress


@pytest.mark.parametrize(("strategy", "bench_name"), [
    ("vcl", "split-mnist"),  # priors, BBB parameters, the Adam state over them
    ("ewc", "split-mnist-ci"),  # importances of past experiences
    ("ivon-replay", "split-mnist-ci"),  # IVON's Hessian and momentum, a herding memory
    ("agem", "split-mnist-ci"),  # a memory with an iterator over it (pickled without the generator)
])
def test_a_killed_run_resumed_from_its_checkpoint_equals_an_uninterrupted_run(strategy, bench_name, make_config,
                                                                               mnist_root, tmp_path):
    config = make_config(strategy, benchmark=bench_name, experiences=3)
    whole = run(config, data_root=mnist_root)

    path = tmp_path / "seed0.ckpt"
    with pytest.raises(Killed):
        run(config, data_root=mnist_root, checkpoint=path, progress=_kill_after(2))
    saved = ckpt.load(path, config.to_dict())
    assert saved.done == 2 and len(saved.rows) == 2 and len(saved.times) == 2

    seen = []
    resumed = run(config, data_root=mnist_root, checkpoint=path, progress=lambda d, t: seen.append(d))
    assert seen == [2, 3]  # told where it starts, then the one experience left
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["time_s"]["per_experience"][:2] == saved.times


def test_the_last_experience_is_not_checkpointed(make_config, mnist_root, tmp_path):
    path = tmp_path / "seed0.ckpt"
    config = make_config("naive", experiences=2)
    run(config, data_root=mnist_root, checkpoint=path)
    assert ckpt.load(path, config.to_dict()).done == 1  # the caller deletes it once the results are written


def test_a_checkpoint_of_another_configuration_is_refused(make_config, mnist_root, tmp_path):
    path = tmp_path / "seed0.ckpt"
    with pytest.raises(Killed):
        run(make_config("naive", experiences=2), data_root=mnist_root, checkpoint=path, progress=_kill_after(1))
    with pytest.raises(ckpt.CheckpointError, match=r"different configuration \(lr\)"):
        run(make_config("naive", experiences=2, lr=0.5), data_root=mnist_root, checkpoint=path)


def test_a_damaged_checkpoint_is_one_clear_error(make_config, mnist_root, tmp_path):
    path = tmp_path / "seed0.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read.*delete it"):
        run(make_config("naive", experiences=2), data_root=mnist_root, checkpoint=path)


def test_execute_resumes_then_deletes_the_checkpoint(mnist_root, tmp_path):
    overrides = tuple({**TINY, "experiences": 2}.items())
    request = S.RunRequest(strategy="naive", benchmark="split-mnist", seed=0, protocol="quick",
                           results_root=str(tmp_path), data_root=str(mnist_root), specs=str(SPECS),
                           overrides=overrides, resumable=True)
    cfg, _ = S.resolve_request(request)
    path = ckpt.checkpoint_path(request.path)
    assert path.name == "seed0.ckpt" and path.parent == request.path.parent
    with pytest.raises(Killed):
        run(cfg, data_root=mnist_root, checkpoint=path, progress=_kill_after(1))
    starts = []
    outcome = S.execute(request, progress=lambda d, t: starts.append(d))
    assert outcome["status"] == "ok", outcome
    assert starts == [1, 2] and request.path.exists() and not path.exists()
    torch.set_num_threads(1)
