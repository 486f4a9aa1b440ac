"""Time of one training step: Adam vs our IVON (1 MC sample; antithetic and/or fused) vs ivon-opt 0.1.3.

    .venv/bin/python -m pytest benchmarks/test_step_speed.py --benchmark-only

A step is zero_grad, forward, backward and the optimizer step; for IVON the forward and backward run
inside ``sampled_params(train=True)``, as in training. One intra-op thread, fixed inputs. Not collected
by ``pytest tests/``. Compare the ``min`` column within a group (the CPU may be shared). The fused rows
compile their update in the warm-up rounds (seconds, once per process), which the timed rounds exclude.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _torch_threads import one_thread  # noqa: F401 (a fixture)

from cl_bayes.ivon import IVON

OPTIMIZERS = ("adam", "ivon", "ivon-antithetic", "ivon-fused", "ivon-fused-antithetic", "ivon-opt")


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 10),
    )


CASES = {
    "mlp": (mlp, (128, 784), 300),
    "cnn": (small_cnn, (256, 3, 32, 32), 30),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_step(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    loss_fn = torch.nn.functional.cross_entropy
    if name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        return step
    if name.startswith("ivon-") and name != "ivon-opt" or name == "ivon":
        # antithetic: opt-in z, -z pairs, half the Gaussian draws; fused: opt-in compiled update (cl_bayes.ivon_fused)
        opt = IVON(model.parameters(), lr=0.1, ess=50_000.0, antithetic="antithetic" in name, fused="fused" in name)
    else:
        ivon = pytest.importorskip("ivon")
        opt = ivon.IVON(model.parameters(), lr=0.1, ess=50_000.0)

    def step() -> None:
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
        opt.step()

    return step


def run(benchmark, case: str, name: str) -> None:
    build, shape, rounds = CASES[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)
    benchmark.pedantic(make_step(name, model, x, y), rounds=rounds, warmup_rounds=max(3, rounds // 10))


@pytest.mark.benchmark(group="step: MLP 784-256-256-10, batch 128")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mlp_step(benchmark, name):
    run(benchmark, "mlp", name)


@pytest.mark.benchmark(group="step: small CNN, 3x32x32, batch 256")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cnn_step(benchmark, name):
    run(benchmark, "cnn", name)
