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
