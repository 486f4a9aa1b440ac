"""A replay memory that keeps a fixed number of chosen examples from every experience.

``PerExperienceMemory`` is an Avalanche storage policy (``ExemplarsBuffer``)
for ``ReplayPlugin``: at the end of each experience (Avalanche's
``after_training_exp``, where ReplayPlugin calls ``post_adapt``) it asks a
*selector* which ``memory_size`` examples of that experience to keep, and
keeps them for the rest of the stream. The selector sees the strategy, so it
can score examples with the model (and posterior) at the end of that
experience: random, sensitivity (memory-perturbation equation), FROMP's
lambda, herding. The choice itself is pure maths in ``cl_bayes.memory``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from avalanche.benchmarks.utils import concat_datasets
from avalanche.training.storage_policy import ExemplarsBuffer
from torch import Tensor

from cl_bayes.memory import select_memory

# selector(strategy, experience, memory_size) -> indices into experience.dataset
Selector = Callable[[object, object, int], Tensor]


def experience_targets(experience) -> Tensor:
    return torch.as_tensor(list(experience.dataset.targets), dtype=torch.long)


def random_selector(*, seed: int) -> Selector:
    """Class-balanced random choice, reproducible from ``seed`` and the experience id."""

    def select(strategy, experience, memory_size: int) -> Tensor:
        return select_memory(
            labels=experience_targets(experience),
            memory_size=memory_size,
            mode="random",
            seed=seed * 10_007 + experience.current_experience,
        )

    return select


class PerExperienceMemory(ExemplarsBuffer):
    """Keeps ``memory_size`` examples of each experience, chosen by ``selector``."""

    def __init__(self, *, memory_size: int, total_size: int, selector: Selector):
        if memory_size <= 0:
            raise ValueError(f"memory_size must be positive, got {memory_size}")
        super().__init__(max_size=total_size)
        self.memory_size = memory_size
        self.selector = selector
        self.groups: list = []  # one dataset per experience, in stream order
        self.indices: list[Tensor] = []  # what was kept of each experience

    def post_adapt(self, agent_state, exp):
        chosen = self.selector(agent_state, exp, self.memory_size)
        self.indices.append(chosen)
        self.groups.append(exp.dataset.eval().subset(chosen.tolist()).train())
        self.buffer = concat_datasets(self.groups)

    def resize(self, strategy, new_size: int):
        self.max_size = new_size  # the per-experience quota, not the total, decides what is kept
