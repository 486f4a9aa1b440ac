"""Learning-rate schedules within one experience (torch only, no Avalanche).

IVON's paper trains with a learning rate annealed to zero by a cosine (Shen et al., 2024,
their experiments' recipe): with a constant rate the mean ends each experience at a noisy
iterate of the posterior's sampling, and what an experience has learnt is read there. In
continual learning the schedule restarts with every experience (each experience is its own
training run from the previous posterior).

``lr_at(schedule, base_lr, step, total)``: the rate of training step ``step`` (0-based) of
``total`` steps in the experience.

* ``constant``: ``base_lr``;
* ``cosine``: ``base_lr * (1 + cos(pi * step / total)) / 2``, from ``base_lr`` at the first
  step towards 0 after the last one (it never reaches 0 on a step that is taken).
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str) -> str:
    """``schedule`` if it is one of ``SCHEDULES``, else a ValueError naming them."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return schedule


def cosine_factor(step: int, total: int) -> float:
    """``(1 + cos(pi * step / total)) / 2``: 1 at step 0, decreasing, > 0 for step < total."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0 <= step <= total:
        raise ValueError(f"step must be in [0, {total}], got {step}")
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def lr_at(schedule: str, base_lr: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` of ``total`` under ``schedule`` (see the module docstring)."""
    check_schedule(schedule)
    if schedule == "constant":
        return base_lr
    return base_lr * cosine_factor(min(step, total), total)


__all__ = ["SCHEDULES", "check_schedule", "cosine_factor", "lr_at"]
