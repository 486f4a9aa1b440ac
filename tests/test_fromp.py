"""FROMP's functional regulariser against brute-force references (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_bayes.fromp import (
    FunctionalPrior,
    fromp_kernel,
    reference_gradient_jacobian_loop,
    regulariser_gradient,
)
from cl_bayes.jacobians import class_kernels, flat_parameters, masked_softmax, model_outputs
from cl_bayes.posterior import DiagonalGaussian

D_IN, HIDDEN, C = 3, 6, 4


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)


def _mlp(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, classes))


def _posterior(model: nn.Module, seed: int = 1) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    mean = flat_parameters(model)
    precision = 1.0 + 20.0 * torch.rand(mean.shape, generator=g)
    return DiagonalGaussian(mean, precision)


def _task_masks(n: int, classes: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(n, C, dtype=torch.bool)
    mask[:, list(classes)] = True
    return mask


def _perturb(model: nn.Module, scale: float = 0.3, seed: int = 2) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _brute_jacobian(model, posterior, x, mask):
    """d masked_softmax / d w at the posterior mean, (M, C, P), by autograd.functional."""

    def f(flat):
        return model_outputs(model, x, params=flat, output="probs", class_mask=mask)

    return torch.autograd.functional.jacobian(f, posterior.mean)


def _two_task_prior(form: str, tau: float = 3.0):
    model = _mlp()
    posterior = _posterior(model)
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(5, D_IN, generator=g), torch.randn(4, D_IN, generator=g)
    prior = FunctionalPrior(tau=tau, kernel=form, eps=1e-3)
    prior.add_task(model, posterior, x1, class_mask=_task_masks(5, (0, 1)))
    prior.add_task(model, posterior, x2, class_mask=_task_masks(4, (2, 3)))
    return model, posterior, prior


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_gradient_matches_per_output_jacobian_reference(form):
    model, _, prior = _two_task_prior(form)
    _perturb(model)
    ours = regulariser_gradient(prior, model)
    reference = reference_gradient_jacobian_loop(prior, model)
    assert ours.abs().max() > 1e-3  # non-trivial residuals
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_gradient_matches_reference_without_mask():
    model = _mlp(seed=4)
    posterior = _posterior(model, seed=5)
    prior = FunctionalPrior(tau=0.7, kernel="block", eps=1e-3)
    prior.add_task(model, posterior, torch.randn(6, D_IN, generator=torch.Generator().manual_seed(6)))
    _perturb(model, seed=7)
    torch.testing.assert_close(
        regulariser_gradient(prior, model),
        reference_gradient_jacobian_loop(prior, model),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("masked", [False, True])
def test_block_kernel_matches_brute_force(masked):
    model = _mlp()
    posterior = _posterior(model)
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(8))
    mask = _task_masks(5, (1, 3)) if masked else None
    eps = 1e-4
    kernel = fromp_kernel(model, posterior, x=x, form="block", class_mask=mask, eps=eps, chunk_size=2)
    jac = _brute_jacobian(model, posterior, x, mask)
    for c in range(C):
        expected = jac[:, c] @ torch.diag(posterior.variance) @ jac[:, c].T + eps * torch.eye(5)
        if masked and c not in (1, 3):
            expected = (1.0 + eps) * torch.eye(5)  # masked class: identity, contributes nothing
        torch.testing.assert_close(kernel[c], expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("max_elements", [1, 200, 2**26])
def test_class_kernels_blockwise_recomputation_matches_brute_force(max_elements):
    model = _mlp()
    posterior = _posterior(model)
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(11))
    mask = _task_masks(7, (0, 2))
    mask[5:] = _task_masks(2, (1, 2))  # classes used by some examples only
    kernel = class_kernels(
        model,
        x,
        variance=posterior.variance,
        params=posterior.mean,
        output="probs",
        class_mask=mask,
        max_elements=max_elements,
    )
    jac = _brute_jacobian(model, posterior, x, mask)
    expected = torch.einsum("icp,p,jcp->cij", jac, posterior.variance, jac)
    torch.testing.assert_close(kernel, expected, atol=1e-12, rtol=1e-9)


def test_full_kernel_matches_brute_force():
    model = _mlp()
    posterior = _posterior(model)
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(9))
    eps = 1e-4
    kernel = fromp_kernel(model, posterior, x=x, form="full", eps=eps)
    jac = _brute_jacobian(model, posterior, x, None)
    for i in range(5):
        expected = jac[i] @ torch.diag(posterior.variance) @ jac[i].T + eps * torch.eye(C)
        torch.testing.assert_close(kernel[i], expected, atol=1e-12, rtol=1e-9)


def test_identity_form_is_plain_l2_on_softmax_outputs():
    model, posterior, prior = _two_task_prior("identity", tau=2.5)
    targets = [masked_softmax(model(t.inputs), t.class_mask).detach() for t in prior.tasks]
    _perturb(model)
    expected = sum(
        (masked_softmax(model(t.inputs), t.class_mask) - m).square().sum()
        for t, m in zip(prior.tasks, targets, strict=True)
    )
    torch.testing.assert_close(prior(model), 0.5 * 2.5 * expected)


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_zero_loss_and_gradient_at_stored_weights(form):
    model, _, prior = _two_task_prior(form)
    assert prior(model).item() == pytest.approx(0.0, abs=1e-20)
    assert regulariser_gradient(prior, model).abs().max().item() < 1e-12
    _perturb(model)
    assert prior(model).item() > 0


def test_no_task_gives_zero_loss():
    model = _mlp()
    assert FunctionalPrior(tau=1.0)(model).item() == 0.0


@pytest.mark.parametrize("form", ["block", "full"])
def test_masked_classes_are_absent(form):
    """A task-incremental memory on classes {0, 1} of a 4-class head equals an
    unmasked memory on a 2-class head holding the same weights."""
    model4 = _mlp()
    posterior4 = _posterior(model4)
    model2 = _mlp(classes=2)
    # flat layout: W1 (6x3), b1 (6), W2 (Cx6), b2 (C); keep the rows of classes 0 and 1
    keep = torch.cat(
        [
            torch.ones(HIDDEN * D_IN + HIDDEN, dtype=torch.bool),
            torch.tensor([True, True, False, False]).repeat_interleave(HIDDEN),
            torch.tensor([True, True, False, False]),
        ]
    )
    posterior2 = DiagonalGaussian(posterior4.mean[keep], posterior4.precision[keep])
    torch.nn.utils.vector_to_parameters(posterior2.mean, model2.parameters())
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(10))
    prior4 = FunctionalPrior(tau=1.3, kernel=form, eps=1e-3)
    prior4.add_task(model4, posterior4, x, class_mask=_task_masks(6, (0, 1)))
    prior2 = FunctionalPrior(tau=1.3, kernel=form, eps=1e-3)
    prior2.add_task(model2, posterior2, x)
    _perturb(model4)
    with torch.no_grad():  # the perturbed 4-class weights, restricted to classes 0 and 1
        torch.nn.utils.vector_to_parameters(flat_parameters(model4)[keep], model2.parameters())
        before = prior4(model4)
        model4[2].weight[2:].add_(5.0)  # masked classes' logits change a lot ...
        model4[2].bias[2:].sub_(7.0)
    loss4 = prior4(model4)
    assert torch.isfinite(loss4) and loss4.item() > 0
    torch.testing.assert_close(loss4, before)  # ... and the loss does not see it
    torch.testing.assert_close(loss4, prior2(model2))
    assert torch.isfinite(regulariser_gradient(prior4, model4)).all()


def test_one_forward_over_all_memories():
    model, _, prior = _two_task_prior("block")
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    prior(model).backward()
    handle.remove()
    assert len(calls) == 1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kernel form"):
        FunctionalPrior(tau=1.0, kernel="diag")
    with pytest.raises(ValueError, match="tau"):
        FunctionalPrior(tau=-1.0)
    model = _mlp()
    bad = DiagonalGaussian(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="parameters"):
        FunctionalPrior(tau=1.0).add_task(model, bad, torch.randn(2, D_IN))
    with pytest.raises(ValueError, match="class_mask"):
        FunctionalPrior(tau=1.0).add_task(
            model,
            _posterior(model),
            torch.randn(2, D_IN),
            class_mask=torch.zeros(2, C, dtype=torch.bool),
        )


def _explicit_term(prior: FunctionalPrior, model: nn.Module, flat: torch.Tensor) -> torch.Tensor:
    """tau/2 sum_s r_s^T K_s^{-1} r_s written out per form, differentiable twice."""
    total = flat.new_zeros(())
    for t in prior.tasks:
        r = model_outputs(model, t.inputs, params=flat, output="probs", class_mask=t.class_mask) - t.probs
        if prior.kernel == "block":
            total = total + torch.einsum("ic,cij,jc->", r, t.kernel_inverse, r)
        elif prior.kernel == "full":
            total = total + torch.einsum("ic,icd,id->", r, t.kernel_inverse, r)
        else:
            total = total + r.square().sum()
    return 0.5 * prior.tau * total


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_curvature_is_the_diagonal_of_the_terms_hessian_at_the_anchor(form):
    model, posterior, prior = _two_task_prior(form)
    hessian = torch.autograd.functional.hessian(lambda w: _explicit_term(prior, model, w), posterior.mean)
    ours = prior.curvature(model)
    assert ours.shape == posterior.mean.shape and ours.min() >= 0 and ours.max() > 1e-3
    torch.testing.assert_close(ours, torch.diagonal(hessian), atol=1e-8, rtol=1e-6)
    assert prior.curvature(model) is not ours and torch.equal(prior.curvature(model), ours)  # cached, copied
    prior.tau = 2 * prior.tau
    torch.testing.assert_close(prior.curvature(model), 2 * ours)


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_curvature_at_other_weights_is_the_gauss_newton_diagonal_there(form):
    """curvature(at=w): tau sum_s diag(J_s(w)^T K_s^-1 J_s(w)) with the Jacobians at w, not at the anchor."""
    model, posterior, prior = _two_task_prior(form)
    torch.testing.assert_close(prior.curvature(model, at=posterior.mean), prior.curvature(model))
    w = posterior.mean + 0.3 * torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    expected = torch.zeros_like(w)
    for t in prior.tasks:
        jac = torch.autograd.functional.jacobian(
            lambda v, t=t: model_outputs(model, t.inputs, params=v, output="probs", class_mask=t.class_mask), w)
        if form == "block":
            expected += torch.einsum("cij,icp,jcp->p", t.kernel_inverse, jac, jac)
        elif form == "full":
            expected += torch.einsum("icd,icp,idp->p", t.kernel_inverse, jac, jac)
        else:
            expected += jac.square().sum((0, 1))
    ours = prior.curvature(model, at=w)
    torch.testing.assert_close(ours, prior.tau * expected, atol=1e-8, rtol=1e-5)
    assert not torch.allclose(ours, prior.curvature(model))


def test_curvature_follows_reanchoring_and_is_zero_without_tasks():
    model, posterior, prior = _two_task_prior("block")
    before = prior.curvature(model)
    moved = DiagonalGaussian(posterior.mean + 0.3, posterior.precision * 4.0)  # a more certain, shifted posterior
    prior.reanchor(model, moved)
    after = prior.curvature(model)
    hessian = torch.autograd.functional.hessian(lambda w: _explicit_term(prior, model, w), moved.mean)
    torch.testing.assert_close(after, torch.diagonal(hessian), atol=1e-8, rtol=1e-6)
    assert not torch.allclose(after, before)
    empty = FunctionalPrior(tau=1.0)
    assert torch.equal(empty.curvature(model), torch.zeros_like(posterior.mean))


# ----------------------------------------------------------------------------- sampled term


def _blocked_prior(
    block_size: int | None, form: str = "block", tau: float = 2.0, *, points: int = 7, seed: int = 3
) -> tuple[FunctionalPrior, nn.Module]:
    """Two experiences of ``points`` memorable points each (classes {0, 1} then {2, 3}), then the weights move."""
    model = _mlp()
    prior = FunctionalPrior(tau=tau, kernel=form, eps=1e-4, block_size=block_size)
    g = torch.Generator().manual_seed(seed)
    for classes in ((0, 1), (2, 3)):
        x = torch.randn(points, D_IN, generator=g)
        prior.add_task(model, _posterior(model), x, class_mask=_task_masks(points, classes))
        _perturb(model, scale=0.1)
    _perturb(model, scale=0.3, seed=seed + 2)
    return prior, model


def test_blocks_split_each_memory_strided_and_a_block_as_large_as_the_memory_is_exact():
    exact, model = _blocked_prior(None)
    same, _ = _blocked_prior(7)
    blocked, _ = _blocked_prior(3)
    assert len(exact) == len(same) == 2 and len(blocked) == 6  # ceil(7 / 3) = 3 blocks per experience
    assert torch.allclose(exact(model), same(model), rtol=1e-12)
    first = torch.cat([t.inputs for t in blocked.tasks[:3]])
    assert sorted(first.sum(1).tolist()) == sorted(exact.tasks[0].inputs.sum(1).tolist())  # each point once
    assert torch.equal(blocked.tasks[1].inputs, exact.tasks[0].inputs[1::3])
    # dropping the kernel's cross-block correlations changes the term: an approximation, not the same value
    assert not torch.allclose(exact(model), blocked(model), rtol=1e-3)


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_sampled_term_is_unbiased_for_the_blocked_term(form):
    """Average over every 2-subset of the 6 blocks = the full blocked term, value and gradient (exactly);
    and over 3,000 random draws (draw_blocks), within 4 standard errors."""
    from itertools import combinations

    prior, model = _blocked_prior(3, form)
    params = list(model.parameters())

    def value_and_grad(blocks):
        value = prior(model, blocks=blocks)
        grads = torch.autograd.grad(value, params)
        return value.detach(), torch.cat([g.reshape(-1) for g in grads])

    full_value, full_grad = value_and_grad(None)
    pairs = [value_and_grad(list(c)) for c in combinations(range(len(prior)), 2)]
    assert torch.allclose(torch.stack([v for v, _ in pairs]).mean(), full_value, rtol=1e-10)
    assert torch.allclose(torch.stack([g for _, g in pairs]).mean(0), full_grad, rtol=1e-8, atol=1e-12)

    gen = torch.Generator().manual_seed(0)
    draws = [value_and_grad(prior.draw_blocks(2, gen)) for _ in range(3000)]
    values = torch.stack([v for v, _ in draws])
    grads = torch.stack([g for _, g in draws])
    assert (values.mean() - full_value).abs() < 4 * values.std() / 3000**0.5
    err = (grads.mean(0) - full_grad).abs()
    assert (err <= 4 * grads.std(0) / 3000**0.5 + 1e-12).all()


def _equal_blocks_prior(form: str = "block") -> tuple[FunctionalPrior, nn.Module]:
    """Two experiences of 6 memorable points, block_size 2: three equal blocks each; then the weights move."""
    return _blocked_prior(2, form, points=6, seed=4)


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_per_experience_draw_is_stratified_and_unbiased(form):
    """One block of each experience per draw, weighted 3 (its experience's block count): the average over the
    9 equally likely draws is the blocked term, value and gradient; random draws cover every pair."""
    from itertools import product

    prior, model = _equal_blocks_prior(form)
    assert prior.experiences == [[0, 1, 2], [3, 4, 5]]
    params = list(model.parameters())

    def value_and_grad(blocks, weights):
        value = prior(model, blocks=blocks, weights=weights)
        return value.detach(), torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])

    full_value, full_grad = value_and_grad(None, None)
    draws = [value_and_grad([a, b], [3.0, 3.0]) for a, b in product(range(3), range(3, 6))]
    assert torch.allclose(torch.stack([v for v, _ in draws]).mean(), full_value, rtol=1e-10)
    assert torch.allclose(torch.stack([g for _, g in draws]).mean(0), full_grad, rtol=1e-8, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        blocks, weights = prior.draw(1, gen, per_experience=True)
        assert len(blocks) == 2 and blocks[0] in (0, 1, 2) and blocks[1] in (3, 4, 5) and weights == [3.0, 3.0]
        seen.add(tuple(blocks))
    assert len(seen) == 9
    assert prior.draw(5, gen, per_experience=True) == ([0, 1, 2, 3, 4, 5], [1.0] * 6)  # all: the exact term
    blocks, weights = prior.draw(2, gen)  # uniform: 2 of 6, weighted 3
    assert len(set(blocks)) == 2 and weights == [3.0, 3.0]


@pytest.mark.parametrize("form", ["block", "full"])
def test_batched_sum_over_equal_blocks_equals_the_loop_over_blocks(form):
    prior, model = _equal_blocks_prior(form)
    params = list(model.parameters())
    blocks, weights = [0, 4, 5], [3.0, 1.5, 0.5]
    batched = prior(model, blocks=blocks, weights=weights)  # equal sizes: the batched path
    looped = sum(w * t for w, t in zip(weights, prior.block_terms(model, blocks), strict=True))
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-14)
    for a, b in zip(torch.autograd.grad(batched, params), torch.autograd.grad(looped, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-14)
    with pytest.raises(ValueError, match="weights"):
        prior(model, blocks=[0, 1], weights=[1.0])


def test_draw_blocks_is_uniform_and_validates():
    prior, model = _blocked_prior(3)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(len(prior))
    for _ in range(6000):
        chosen = prior.draw_blocks(2, gen)
        assert len(set(chosen)) == 2
        counts[chosen] += 1
    assert torch.allclose(counts / 6000, torch.full((6,), 2 / 6), atol=0.02)
    assert prior.draw_blocks(10) == list(range(6))
    with pytest.raises(ValueError, match="count"):
        prior.draw_blocks(0)
    with pytest.raises(ValueError, match="distinct"):
        prior(model, blocks=[1, 1])
    with pytest.raises(ValueError, match="block_size"):
        FunctionalPrior(tau=1.0, block_size=0)


def test_sampled_stiffness_is_the_random_gains_equivalent_along_the_stiffest_modes():
    """One of two blocks drawn per step, weighted 2: the gain along a mode u is 2 g_0 or 2 g_1 (g_b = u^T B_b u,
    B_b = D^-1/2 A_b D^-1/2 from the dense Hessians); s is random_gain_stiffness of that gain's mean and second
    moment, maximised over the modes of B_0 + B_1, 2 B_0 and 2 B_1; every block drawn is the exact term."""
    import copy

    from cl_bayes.fromp import random_gain_stiffness, stable_curvature_scale

    model, posterior, prior = _two_task_prior("block", tau=50.0)
    c = prior.curvature(model)
    base = torch.full_like(c, 1e-2)
    root = (base + c).rsqrt()
    scaled = []
    for task in prior.tasks:  # each block's dense Hessian at its anchor, from the explicit term
        alone = copy.copy(prior)
        alone.tasks = [task]
        hessian = torch.autograd.functional.hessian(
            lambda w, alone=alone: _explicit_term(alone, model, w), posterior.mean
        )
        scaled.append(root[:, None] * hessian * root[None, :])
    step = 1e-9
    expected = 0.0
    for matrix in (scaled[0] + scaled[1], 2 * scaled[0], 2 * scaled[1]):
        u = torch.linalg.eigh(matrix).eigenvectors[:, -1]
        g0, g1 = (step * float(u @ b @ u) for b in scaled)
        expected = max(expected, random_gain_stiffness(g0 + g1, (g0 + g1) ** 2 + (g0 - g1) ** 2, 0.9))
    full = stable_curvature_scale(prior, model, base=base, curvature=c, step_size=step, beta1=0.9, iters=300)
    drawn = stable_curvature_scale(prior, model, base=base, curvature=c, step_size=step, beta1=0.9, iters=300,
                                   blocks_per_step=1)
    assert drawn[1] == pytest.approx(expected, rel=1e-3)
    assert full[1] == pytest.approx(step * float(torch.linalg.eigvalsh(scaled[0] + scaled[1]).max()), rel=1e-4)
    assert drawn[1] > 2 * full[1]  # two blocks with different stiff directions: the random gain is far stiffer
    every = stable_curvature_scale(prior, model, base=base, curvature=c, step_size=step, beta1=0.9, iters=300,
                                   blocks_per_step=2)  # every block drawn: the exact term
    assert every[1] == pytest.approx(full[1], rel=1e-9)
    big = 20.0 * (38.0 / 4.0) / (drawn[1] / step)  # 20x past the target for the sampled term
    gamma_drawn = stable_curvature_scale(prior, model, base=base, curvature=c, step_size=big, beta1=0.9,
                                         blocks_per_step=1)[0]
    gamma_full = stable_curvature_scale(prior, model, base=base, curvature=c, step_size=big, beta1=0.9)[0]
    assert gamma_drawn > gamma_full
    with pytest.raises(ValueError, match="blocks_per_step"):
        stable_curvature_scale(prior, model, base=base, curvature=c, step_size=big, beta1=0.9, blocks_per_step=0)


def test_random_gain_stiffness_of_a_constant_gain_is_the_gain_and_grows_with_the_spread():
    """(The mean-square bound itself is checked by Monte Carlo through sampled_stability_bound.)"""
    from cl_bayes.fromp import random_gain_stiffness

    assert random_gain_stiffness(5.0, 25.0, 0.9) == 5.0
    assert random_gain_stiffness(0.0, 0.0, 0.9) == 0.0
    spreads = [random_gain_stiffness(1.0, m, 0.9) for m in (1.0, 1.5, 2.0, 4.0)]
    assert spreads[0] == 1.0 and all(a < b for a, b in zip(spreads, spreads[1:], strict=False))
    assert random_gain_stiffness(2.0, 8.0, 0.9) == pytest.approx(2.0 * random_gain_stiffness(1.0, 2.0, 0.9))
    for q in (1e3, 1e6, 1e9):  # a gain q 1 step in q: s(1, q) = 19 q - 18 at beta1 0.9 (the bracket must reach it)
        assert random_gain_stiffness(1.0, q, 0.9) == pytest.approx(19 * q - 18, rel=1e-6)
    with pytest.raises(ValueError, match="second moment"):
        random_gain_stiffness(2.0, 1.0, 0.9)


def test_saga_gradient_is_unbiased_and_exact_once_every_block_was_seen_at_fixed_weights():
    """Table at 0 (the anchors) then the weights move: E over the draw = the exact blocked gradient.

    At fixed weights, once every block has been drawn the table holds every block's gradient
    and the estimate equals the exact gradient whatever is drawn (the variance vanishes).
    """
    from cl_bayes.fromp import SagaGradient

    prior, model = _blocked_prior(3)
    params = list(model.parameters())
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(prior(model), params)])
    # first step from an all-zero table: unbiased over the draw (average over many fresh tables)
    gen = torch.Generator().manual_seed(0)
    firsts = torch.stack([SagaGradient(prior, blocks_per_step=2, generator=gen)(model, params)[1] for _ in range(3000)])
    assert ((firsts.mean(0) - exact).abs() <= 4 * firsts.std(0) / 3000**0.5 + 1e-12).all()
    saga = SagaGradient(prior, blocks_per_step=2, generator=gen)
    for _ in range(40):  # 40 draws of 2 of 6 blocks: all seen (probability 1 - 6 * (2/3)^40)
        value, grad = saga(model, params)
    assert torch.allclose(grad, exact, rtol=1e-8, atol=1e-12)
    assert torch.allclose(value, prior(model).detach(), rtol=1e-10)
    with pytest.raises(ValueError, match="blocks_per_step"):
        SagaGradient(prior, blocks_per_step=0)


def test_saga_table_starts_at_zero_for_new_blocks_and_after_reanchoring():
    """At its anchor a block's gradient is zero, so a new block enters the table as 0 and re-anchoring zeroes it."""
    from cl_bayes.fromp import SagaGradient

    model = _mlp()
    prior = FunctionalPrior(tau=2.0, kernel="block", eps=1e-4, block_size=3)
    g = torch.Generator().manual_seed(3)
    prior.add_task(model, _posterior(model), torch.randn(6, D_IN, generator=g), class_mask=_task_masks(6, (0, 1)))
    params = list(model.parameters())
    saga = SagaGradient(prior, blocks_per_step=1, generator=g)
    value, grad = saga(model, params)  # at the anchor: zero
    assert value.abs() < 1e-12 and grad.abs().max() < 1e-12
    _perturb(model)
    for _ in range(30):
        saga(model, params)
    prior.reanchor(model, _posterior(model))
    value, grad = saga(model, params)
    assert value.abs() < 1e-12 and grad.abs().max() < 1e-10


# ----------------------------------------------------------------------------- refreshed term


def _exact_value_and_grad(prior, model, params):
    value = prior(model)
    return value.detach(), torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])


def test_refreshed_gradient_is_exact_at_refreshes_and_the_quadratic_model_between():
    from cl_bayes.fromp import RefreshedGradient

    prior, model = _blocked_prior(None)
    params = list(model.parameters())
    curvature = prior.curvature(model)
    lazy = RefreshedGradient(prior, refresh_every=3)
    value_r, grad_r = _exact_value_and_grad(prior, model, params)
    w_r = torch.cat([p.detach().reshape(-1) for p in params])
    value, grad = lazy(model, params, curvature)  # step 1: a refresh
    torch.testing.assert_close(grad, grad_r)
    torch.testing.assert_close(value, value_r)
    for step in (2, 3):  # steps 2 and 3: the model around w_r
        _perturb(model, scale=0.01, seed=10 + step)
        d = torch.cat([p.detach().reshape(-1) for p in params]) - w_r
        value, grad = lazy(model, params, curvature)
        torch.testing.assert_close(grad, grad_r + curvature * d, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(value, value_r + grad_r @ d + 0.5 * d @ (curvature * d), rtol=1e-12, atol=1e-14)
    value, grad = lazy(model, params, curvature)  # step 4: refresh again, exact at the new weights
    exact_value, exact_grad = _exact_value_and_grad(prior, model, params)
    torch.testing.assert_close(grad, exact_grad)
    torch.testing.assert_close(value, exact_value)
    every_step = RefreshedGradient(prior, refresh_every=1)
    _perturb(model, scale=0.05, seed=30)
    torch.testing.assert_close(every_step(model, params, curvature)[1], _exact_value_and_grad(prior, model, params)[1])


def test_refreshed_gradient_is_second_order_accurate_along_one_weight_at_the_anchor():
    """At the anchor the term's Hessian diagonal is the curvature, so along one weight the model's error is O(d^2)."""
    from cl_bayes.fromp import RefreshedGradient

    model, posterior, prior = _two_task_prior("block")
    params = list(model.parameters())
    curvature = prior.curvature(model)
    i = int(curvature.argmax())
    errors = []
    for d in (1e-2, 5e-3):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(posterior.mean, params)
        lazy = RefreshedGradient(prior, refresh_every=10)
        lazy(model, params, curvature)  # refresh at the anchor
        shifted = posterior.mean.clone()
        shifted[i] += d
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(shifted, params)
        approx = lazy(model, params, curvature)[1][i]
        exact = _exact_value_and_grad(prior, model, params)[1][i]
        assert abs(approx - curvature[i] * d) < 1e-14  # the gradient at the anchor is zero
        errors.append(abs(float(approx - exact)))
    assert errors[1] < 0.3 * errors[0]  # halving d at least ~quarters the error (2nd order)


def test_refreshed_gradient_refreshes_on_a_new_task_or_reanchoring_and_validates():
    from cl_bayes.fromp import RefreshedGradient

    model = _mlp()
    prior = FunctionalPrior(tau=2.0, kernel="block", eps=1e-4)
    params = list(model.parameters())
    lazy = RefreshedGradient(prior, refresh_every=100)
    value, grad = lazy(model, params, None)
    assert value == 0 and not grad.any()  # no task yet
    g = torch.Generator().manual_seed(3)
    prior.add_task(model, _posterior(model), torch.randn(6, D_IN, generator=g), class_mask=_task_masks(6, (0, 1)))
    _perturb(model)
    torch.testing.assert_close(lazy(model, params, None)[1], _exact_value_and_grad(prior, model, params)[1])
    _perturb(model, seed=4)
    stale = lazy(model, params, None)[1]  # no curvature: the last refresh's gradient
    assert not torch.allclose(stale, _exact_value_and_grad(prior, model, params)[1])
    prior.reanchor(model, _posterior(model))
    value, grad = lazy(model, params, None)  # re-anchored here: exact again, zero at the new anchor
    assert value.abs() < 1e-12 and grad.abs().max() < 1e-10
    with pytest.raises(ValueError, match="refresh_every"):
        RefreshedGradient(prior, refresh_every=0)
    with pytest.raises(ValueError, match="curvature must have"):
        _perturb(model, seed=6)
        lazy(model, params, torch.zeros(3))


# --- the term's dense curvature and the stability of the preconditioned step ---------------------------


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_term_ggn_product_is_the_terms_hessian_at_the_anchor(form):
    """At the anchor the residual is 0, so R's Hessian is its Gauss-Newton matrix A; A v against the dense one."""
    from cl_bayes.fromp import term_ggn_product

    model, posterior, prior = _two_task_prior(form)
    hessian = torch.autograd.functional.hessian(lambda w: _explicit_term(prior, model, w), posterior.mean)
    v = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(term_ggn_product(prior, model, v), hessian @ v, atol=1e-8, rtol=1e-6)
    elsewhere = posterior.mean + 0.1  # at other weights: J there, K^-1 kept
    assert not torch.allclose(term_ggn_product(prior, model, v, at=elsewhere), term_ggn_product(prior, model, v))


@pytest.mark.parametrize("form", ["block", "full", "identity"])
def test_block_quadratic_forms_are_each_blocks_v_a_v(form):
    from cl_bayes.fromp import block_quadratic_forms, term_ggn_product

    prior, model = _equal_blocks_prior(form)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64)
    expected = torch.stack([v @ term_ggn_product(prior, model, v, blocks=[b]) for b in range(len(prior))])
    torch.testing.assert_close(block_quadratic_forms(prior, model, v), expected, rtol=1e-8, atol=1e-14)


def test_preconditioned_stiffness_is_the_top_eigenvalue():
    from cl_bayes.fromp import preconditioned_stiffness

    model, posterior, prior = _two_task_prior("block")
    hessian = torch.autograd.functional.hessian(lambda w: _explicit_term(prior, model, w), posterior.mean)
    d = 0.5 + torch.rand(posterior.mean.shape, generator=torch.Generator().manual_seed(6))
    root = d.rsqrt()
    top = torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :]).max()
    assert preconditioned_stiffness(prior, model, d, iters=200) == pytest.approx(float(top), rel=1e-4)
    assert preconditioned_stiffness(FunctionalPrior(tau=1.0), model, d) == 0.0
    with pytest.raises(ValueError, match="positive"):
        preconditioned_stiffness(prior, model, d - 10.0)


@pytest.mark.parametrize("beta1", [0.0, 0.9, 0.99])
def test_momentum_stability_bound_separates_decay_from_growth(beta1):
    """The EMA-momentum step on 0.5 * lam * m^2: bounded just below alpha * lam = bound, growing just above."""
    from cl_bayes.fromp import momentum_stability_bound

    bound = momentum_stability_bound(beta1)

    def final(alpha_lam: float) -> float:
        m, g = 1.0, 0.0
        for _ in range(20_000):
            g = beta1 * g + (1 - beta1) * m  # lam = 1
            m = m - alpha_lam * g
            if abs(m) > 1e6:
                break
        return abs(m)

    assert final(0.97 * bound) < 1.0 < final(1.03 * bound)
    with pytest.raises(ValueError):
        momentum_stability_bound(1.0)


@pytest.mark.parametrize("q", [2.0, 4.0])
def test_sampled_stability_bound_separates_decay_from_growth_in_mean_square(q):
    """Monte Carlo over paths of the momentum step whose gain is q * s 1 step in q: E[m^2] decays below, grows above."""
    from cl_bayes.fromp import momentum_stability_bound, sampled_stability_bound

    beta1 = 0.9
    bound = sampled_stability_bound(beta1, q)
    assert sampled_stability_bound(beta1, 1.0) == momentum_stability_bound(beta1)
    assert 2.0 < bound < momentum_stability_bound(beta1) / 5  # far below the deterministic 38

    def mean_square(per_draw: float, steps: int = 400, paths: int = 20_000) -> float:
        gen = torch.Generator().manual_seed(0)
        m, u = torch.ones(paths, dtype=torch.float64), torch.zeros(paths, dtype=torch.float64)
        for _ in range(steps):
            gain = per_draw * (torch.rand(paths, generator=gen, dtype=torch.float64) < 1.0 / q)
            u = beta1 * u + (1.0 - beta1) * gain * m
            m = m - u
        return float(m.square().mean())

    assert mean_square(0.8 * bound) < 1.0 < mean_square(1.25 * bound)
    with pytest.raises(ValueError, match="q"):
        sampled_stability_bound(beta1, 0.5)


def test_stable_curvature_scale_is_the_least_stable_scale():
    from cl_bayes.fromp import momentum_stability_bound, preconditioned_stiffness, stable_curvature_scale

    model, posterior, prior = _two_task_prior("block", tau=50.0)
    c = prior.curvature(model)
    base = torch.full_like(c, 1e-2)
    target = momentum_stability_bound(0.9) / 4.0

    def s(gamma: float, step: float) -> float:
        return step * preconditioned_stiffness(prior, model, base + gamma * c, iters=200)

    stable_step = 0.5 * target / s(1.0, 1.0)
    assert stable_curvature_scale(prior, model, base=base, curvature=c, step_size=stable_step, beta1=0.9)[0] == 1.0
    step = 20.0 * target / s(1.0, 1.0)  # 20x past the target at gamma 1
    gamma, before, after = stable_curvature_scale(prior, model, base=base, curvature=c, step_size=step, beta1=0.9,
                                                  iters=200)
    assert gamma > 1.0 and before == pytest.approx(s(1.0, step), rel=1e-3)
    assert after == pytest.approx(s(gamma, step), rel=1e-3) and after <= target * (1 + 1e-6)
    assert s(gamma / 1.12, step) > target  # least: within the bisection's resolution (2^(1/64) ~ 1.011 per halving)
    with pytest.raises(ValueError, match="margin"):
        stable_curvature_scale(prior, model, base=base, curvature=c, step_size=step, beta1=0.9, margin=0.5)


def test_secant_stiffness_is_the_hessians_rayleigh_quotient_along_a_short_step():
    """dw . (g(w + dw) - g(w)) / dw . D dw -> dw^T H dw / dw^T D dw as dw -> 0, with H the term's full Hessian at w
    (here away from the anchors, where it is not the Gauss-Newton matrix); at most the stiffest mode; 0 for dw = 0."""
    from cl_bayes.fromp import secant_stiffness

    model, posterior, prior = _two_task_prior("block")
    gen = torch.Generator().manual_seed(11)
    w = posterior.mean + 0.3 * torch.randn(posterior.mean.shape, generator=gen)
    d = 0.5 + torch.rand(w.shape, generator=gen)

    def grad(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.detach().requires_grad_(True)
        return torch.autograd.grad(_explicit_term(prior, model, flat), flat)[0]

    hessian = torch.autograd.functional.hessian(lambda v: _explicit_term(prior, model, v), w)
    direction = torch.randn(w.shape, generator=gen)
    dw = 1e-4 * direction / direction.norm()
    s = secant_stiffness(step_size=0.2, step=dw, gradient_change=grad(w + dw) - grad(w), preconditioner=d)
    expected = 0.2 * float(dw @ hessian @ dw) / float(dw @ (d * dw))
    assert s == pytest.approx(expected, rel=1e-2, abs=1e-6)
    root = d.rsqrt()
    top = float(torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :]).max())
    assert s <= 0.2 * top * (1 + 1e-2)
    assert secant_stiffness(step_size=0.2, step=torch.zeros_like(w), gradient_change=grad(w), preconditioner=d) == 0.0


def test_restabilising_scale_brings_the_steps_stiffness_to_the_target():
    """With gamma' the same step's secant stiffness (gradient change fixed) is exactly the target; below the target,
    or with no curvature along the step, gamma is kept."""
    from cl_bayes.fromp import restabilising_scale, secant_stiffness

    gen = torch.Generator().manual_seed(12)
    dw, dg = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    base, c = 0.1 + torch.rand(50, generator=gen), torch.rand(50, generator=gen)
    dg = dg + 40.0 * c * dw  # a stiff step: dw . dg > 0

    def s(gamma: float) -> float:
        return secant_stiffness(step_size=0.5, step=dw, gradient_change=dg, preconditioner=base + gamma * c)

    forms = {"base_form": float(dw @ (base * dw)), "curvature_form": float(dw @ (c * dw))}
    assert s(2.0) > 3.0
    gamma = restabilising_scale(gamma=2.0, stiffness=s(2.0), target=3.0, **forms)
    assert gamma > 2.0 and s(gamma) == pytest.approx(3.0, rel=1e-6)
    assert restabilising_scale(gamma=2.0, stiffness=s(2.0), target=2 * s(2.0), **forms) == 2.0
    assert restabilising_scale(gamma=2.0, stiffness=s(2.0), target=3.0, base_form=forms["base_form"],
                               curvature_form=0.0) == 2.0
    with pytest.raises(ValueError, match="target"):
        restabilising_scale(gamma=2.0, stiffness=1.0, target=0.0, **forms)
