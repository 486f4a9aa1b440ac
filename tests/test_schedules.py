"""Learning-rate schedules: endpoints, monotonicity, bad input."""

from __future__ import annotations

import math

import pytest

from cl_bayes.schedules import cosine_factor, lr_at


def test_cosine_starts_at_the_base_rate_halves_midway_and_ends_near_zero():
    total = 10
    rates = [lr_at("cosine", 0.2, k, total) for k in range(total)]
    assert rates[0] == 0.2
    assert rates[5] == pytest.approx(0.1)
    assert rates[-1] == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.9)) / 2)
    assert all(a > b > 0 for a, b in zip(rates, rates[1:], strict=False))
    assert lr_at("cosine", 0.2, total, total) == pytest.approx(0.0, abs=1e-15)


def test_cosine_is_symmetric_about_its_midpoint():
    for k in range(11):
        assert cosine_factor(k, 10) + cosine_factor(10 - k, 10) == pytest.approx(1.0)


def test_constant_is_the_base_rate():
    assert {lr_at("constant", 0.3, k, 7) for k in range(7)} == {0.3}


@pytest.mark.parametrize(("step", "total"), [(-1, 10), (11, 10), (0, 0)])
def test_bad_steps_are_errors(step, total):
    with pytest.raises(ValueError):
        cosine_factor(step, total)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, got 'linear'"):
        lr_at("linear", 0.1, 0, 10)
