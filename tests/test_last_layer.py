"""The last-layer what-if estimator (``cl_bayes.last_layer``) against explicit Newton steps and retraining."""

from __future__ import annotations

import pytest
import torch
from test_sensitivity import PRIOR_PRECISION, fit_map, make_problem
from torch import nn

from cl_bayes.jacobians import flat_parameters, masked_log_softmax, masked_softmax, model_outputs
from cl_bayes.last_layer import ggn_block, last_layer_logits, last_layer_removal, output_layer_slices


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def rest_objective(model, x, y, class_mask=None):
    def loss(w):
        logits = model_outputs(model, x, params=w)
        ce = -masked_log_softmax(logits, class_mask).gather(-1, y.unsqueeze(-1)).sum()
        return ce + 0.5 * PRIOR_PRECISION * w.square().sum()

    return loss


def test_softmax_regression_step_is_the_exact_newton_step_of_the_remaining_data():
    # For a linear softmax model the GGN is the Hessian, so the estimate must equal one Newton step of the
    # remaining data's objective from the full-data MAP (where its gradient is minus the group's).
    x, y, _, _ = make_problem(classes=3, seed=5)
    model = nn.Linear(x.shape[1], 3)
    w, _ = fit_map(model, x, y)
    group = torch.arange(8)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[group] = False
    loss = rest_objective(model, x[keep], y[keep])
    newton = -torch.linalg.solve(torch.func.hessian(loss)(w), torch.func.grad(loss)(w))
    delta = last_layer_removal(model, w, group_x=x[group], group_y=y[group], rest_x=x[keep], rest_y=y[keep],
                               prior_precision=PRIOR_PRECISION)
    torch.testing.assert_close(delta, newton, rtol=1e-8, atol=1e-10)


def test_removing_one_example_lands_near_retraining():
    x, y, _, _ = make_problem(classes=3, seed=6)
    model = nn.Linear(x.shape[1], 3)
    w, _ = fit_map(model, x, y)
    errors = []
    for i in range(10):
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[i] = False
        retrained, _ = fit_map(model, x[keep], y[keep], init=w)
        delta = last_layer_removal(model, w, group_x=x[i:i + 1], group_y=y[i:i + 1], rest_x=x[keep],
                                   rest_y=y[keep], prior_precision=PRIOR_PRECISION)
        errors.append(float((w + delta - retrained).norm() / (w - retrained).norm()))
    assert max(errors) < 0.1  # the Newton step from the MAP is close to the leave-one-out MAP


def masked_mlp_problem():
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    tasks = torch.tensor([[True, True, False, False], [False, False, True, True]])
    x = torch.randn(40, 4, generator=g)
    t = torch.arange(40) % 2
    mask = tasks[t]
    y = 2 * t + torch.randint(0, 2, (40,), generator=g)
    return model, x, y, mask


def test_masked_rows_equal_the_dense_ggn_solve_and_nothing_else_moves():
    model, x, y, mask = masked_mlp_problem()
    w = flat_parameters(model).detach()
    group = (y == 3)  # class 3: task 1's rows 2, 3
    rest = ~group
    delta = last_layer_removal(model, w, group_x=x[group], group_y=y[group], rest_x=x[rest], rest_y=y[rest],
                               prior_precision=0.5, omega=2.0, group_class_mask=mask[group],
                               rest_class_mask=mask[rest])
    w_slice, b_slice = output_layer_slices(model, model[2])
    head = torch.cat([torch.arange(w_slice.start, w_slice.stop), torch.arange(b_slice.start, b_slice.stop)])

    # the explicit version over every output parameter: J^T Lam J from per-example Jacobians (weights at w)
    def logits_of_head(theta, xs):
        full = w.clone()
        full[head] = theta
        return model_outputs(model, xs, params=full)

    def ce_sum(theta, xs, ys, ms):
        return -masked_log_softmax(logits_of_head(theta, xs), ms).gather(-1, ys.unsqueeze(-1)).sum()

    theta = w[head]
    ggn = torch.zeros(len(head), len(head))
    for n in torch.nonzero(rest).flatten():
        jac = torch.func.jacrev(logits_of_head)(theta, x[n:n + 1])[0]  # (C, |head|)
        p = masked_softmax(logits_of_head(theta, x[n:n + 1]), mask[n:n + 1])[0]
        lam = torch.diag(p) - torch.outer(p, p)
        ggn += jac.T @ lam @ jac
    grad_g = torch.func.grad(ce_sum)(theta, x[group], y[group], mask[group])
    expected = 2.0 * torch.linalg.solve(0.5 * torch.eye(len(head)) + 2.0 * ggn, grad_g)
    torch.testing.assert_close(delta[head], expected, rtol=1e-8, atol=1e-10)
    body = torch.ones_like(delta, dtype=torch.bool)
    body[head] = False
    assert not bool(delta[body].any())
    w_rows = delta[w_slice].view(4, 5)
    assert not bool(w_rows[:2].any()) and bool(w_rows[2:].abs().min() > 0)  # task 0's rows stay


def test_logits_after_equal_the_network_at_the_shifted_mean_and_body_moves_are_refused():
    model, x, y, mask = masked_mlp_problem()
    w = flat_parameters(model).detach()
    group = y == 0
    delta = last_layer_removal(model, w, group_x=x[group], group_y=y[group], rest_x=x[~group], rest_y=y[~group],
                               prior_precision=1.0, group_class_mask=mask[group], rest_class_mask=mask[~group])
    before, after = last_layer_logits(model, w, delta, x)
    torch.testing.assert_close(before, model_outputs(model, x, params=w))
    torch.testing.assert_close(after, model_outputs(model, x, params=w + delta))
    with pytest.raises(ValueError, match="outside the output layer"):
        last_layer_logits(model, w, delta + 1e-3, x)
    with pytest.raises(ValueError, match="omega"):
        last_layer_removal(model, w, group_x=x, group_y=y, rest_x=x, rest_y=y, prior_precision=1.0, omega=0.0)


def test_ggn_block_is_lambda_kron_feature_outer_products():
    g = torch.Generator().manual_seed(8)
    phit = torch.randn(6, 3, generator=g)
    probs = torch.softmax(torch.randn(6, 4, generator=g), -1)
    rows = torch.tensor([1, 3])
    expected = torch.zeros(6, 6)
    for n in range(6):
        lam = torch.diag(probs[n]) - torch.outer(probs[n], probs[n])
        expected += torch.kron(lam[rows][:, rows], torch.outer(phit[n], phit[n]))
    torch.testing.assert_close(ggn_block(phit, probs, rows), expected)


# --- retrain_output_layer (the head-retrain estimator) ---------------------------------


def _separable(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    y = torch.randint(0, 3, (n,), generator=g)
    phi = centres[y] + 0.5 * torch.randn(n, 3, generator=g)
    return phi, y


def test_retrained_head_learns_the_data_and_masked_rows_only_decay():
    from cl_bayes.last_layer import HeadTraining, retrain_output_layer

    phi, y = _separable(600, 0)
    mask = torch.zeros(600, 4, dtype=torch.bool)
    mask[:, :3] = True  # class 3 is never allowed: its row gets no gradient
    w0 = 0.1 * torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    b0 = torch.zeros(4)
    training = HeadTraining(lr=0.1, epochs=3, batch_size=32, hess_init=0.1, beta2=0.999, weight_decay=1e-2)
    w, b = retrain_output_layer(w0, b0, [(phi, y, mask)], training)
    logits = (phi @ w.T + b).masked_fill(~mask, float("-inf"))
    assert (logits.argmax(-1) == y).double().mean() > 0.95
    # the masked row: IVON's prior pulls it towards 0 (delta (m - 0) / (h + delta)), nothing else moves it
    assert torch.all(w[3].abs() <= w0[3].abs()) and torch.all(torch.sign(w[3]) == torch.sign(w0[3]))
    assert torch.all(w[3].abs() < w0[3].abs())


def test_retraining_is_seeded_restores_the_global_generator_and_skips_empty_experiences():
    from cl_bayes.last_layer import HeadTraining, retrain_output_layer

    phi, y = _separable(200, 2)
    w0, b0 = torch.zeros(3, 3), torch.zeros(3)
    training = HeadTraining(lr=0.1, epochs=1, batch_size=16, hess_init=0.1, accumulate=True, seed=5)
    empty = (phi[:0], y[:0], None)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = retrain_output_layer(w0, b0, [(phi, y, None), empty], training)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    again = retrain_output_layer(w0, b0, [empty, (phi, y, None)], training)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = retrain_output_layer(w0, b0, [(phi, y, None)], HeadTraining(**{**training.__dict__, "seed": 6}))
    assert not torch.equal(first[0], other[0])
    # no data at all: the initial weights, as retraining without any of the rows' examples
    w, b = retrain_output_layer(w0 + 1.0, b0, [empty], training)
    assert torch.equal(w, w0 + 1.0) and torch.equal(b, b0)


def test_accumulation_makes_a_second_experience_keep_the_first():
    from cl_bayes.last_layer import HeadTraining, retrain_output_layer

    # two experiences of the same 3-class problem, the second with classes 0 and 1 swapped in half the data:
    # with the first posterior as prior, the head moves less on the second than without it
    phi, y = _separable(400, 3)
    flipped = y.clone()
    flipped[:200] = torch.where(y[:200] == 0, 1, torch.where(y[:200] == 1, 0, y[:200]))
    experiences = [(phi, y, None), (phi, flipped, None)]
    base = dict(lr=0.1, epochs=2, batch_size=32, hess_init=0.1, beta2=0.999, weight_decay=1e-3)
    w_acc, _ = retrain_output_layer(torch.zeros(3, 3), torch.zeros(3), experiences,
                                    HeadTraining(**base, accumulate=True))
    w_first, _ = retrain_output_layer(torch.zeros(3, 3), torch.zeros(3), experiences[:1], HeadTraining(**base))
    w_plain, _ = retrain_output_layer(torch.zeros(3, 3), torch.zeros(3), experiences, HeadTraining(**base))
    assert (w_acc - w_first).norm() < (w_plain - w_first).norm()


def test_retraining_rejects_bad_input():
    from cl_bayes.last_layer import HeadTraining, retrain_output_layer

    phi, y = _separable(10, 0)
    good = HeadTraining(lr=0.1, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="epochs"):
        HeadTraining(lr=0.1, epochs=0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        HeadTraining(lr=0.1, epochs=1, batch_size=True)
    with pytest.raises(ValueError, match="lr_schedule"):
        retrain_output_layer(torch.zeros(3, 3), None, [(phi, y, None)], HeadTraining(**{**good.__dict__,
                                                                                         "lr_schedule": "step"}))
    with pytest.raises(ValueError, match="phi"):
        retrain_output_layer(torch.zeros(3, 4), None, [(phi, y, None)], good)
    with pytest.raises(ValueError, match="class_mask"):
        retrain_output_layer(torch.zeros(3, 3), None, [(phi, y, torch.ones(10, 2, dtype=torch.bool))], good)
    with pytest.raises(ValueError, match="bias"):
        retrain_output_layer(torch.zeros(3, 3), torch.zeros(2), [(phi, y, None)], good)
