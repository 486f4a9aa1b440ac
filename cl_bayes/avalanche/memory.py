"""A replay memory that keeps a fixed number of chosen examples from every experience.

``PerExperienceMemory`` is an Avalanche storage policy (``ExemplarsBuffer``)
for ``ReplayPlugin``: at the end of each experience (Avalanche's
``after_training_exp``, where ReplayPlugin calls ``post_adapt``) it asks a
*selector* which ``memory_size`` examples of that experience to keep, and
keeps them for the rest of the stream. The selector sees the strategy, so it
can score examples with the model (and posterior) at the end of that
experience. The choice itself is pure maths in ``cl_bayes.memory`` (class
balanced, top scores per class) and ``cl_bayes.sensitivity``; here is only
the glue:

* ``random_selector``: class-balanced uniform choice (seeded);
* ``sensitivity_selector``: top memory-perturbation sensitivity
  ``S_i = sum_c |e_ic lam_ic v_ic|`` under the IVON posterior
  (``strategy.optimizer.posterior``, ``ess`` from the optimizer);
* ``lambda_selector``: top FROMP score ``tr(diag(p) - p p^T)`` at the model's weights
  (the posterior mean for IVON); any strategy;
* ``herding_selector``: iCaRL herding on the (L2-normalised) input of the last
  ``nn.Linear``; any strategy.

``sensitivity_selector(rule=...)`` also chooses from the same scores by the
coverage-keeping rules of ``cl_bayes.memory`` (issue 13): ``stratified`` (one
example per equal-count sensitivity-quantile bin of each class),
``proportional`` (without replacement, probability proportional to S^T),
``trimmed`` (top S after discarding the top q of each class) and ``pruned``
(uniform after discarding the top q of each class). Their parameter
goes in the ``selection`` name after a colon: ``"proportional:0.5"`` is T = 0.5,
``"trimmed:0.25"`` is q = 0.25; bare names take the values chosen on the
validation split (``DEFAULT_PARAMETERS``: proportional T = 0.5, trimmed q = 0.5,
pruned q = 0.1).
``SELECTIONS`` holds the bare names; ``name in SELECTIONS`` accepts a name with
a valid parameter too (``parse_selection``).

Data. Scores need the whole experience at once. ``experience_data`` reads
the experience's tensors straight out of Avalanche's dataset tree (the leaves
of our benchmarks are ``TensorDataset``s; a vectorised replay of Avalanche's
own index arithmetic, spot-checked against ``dataset[i]``), so 10,000 MNIST
examples cost a few ms instead of ~0.2 s of per-sample ``__getitem__``; any
other dataset falls back to a DataLoader with large batches. Scores are then
computed ``batch_size`` examples at a time (bounded memory for CNNs), on the
strategy's device, in eval mode, and the model's mode is restored.

Task-incremental models (``TaskMaskedModel``) are scored as their plain
network with the per-example class mask of their task, so softmax, errors,
curvatures and variances are over the task's classes only.

Cost and accuracy of ``sensitivity_selector`` (N examples, C classes, F = one
example's forward pass, D = width of the last hidden layer, P = parameters):

* ``last_layer`` (default): one forward pass, O(N F + N C D). The variance is
  that of the output layer's weights only (blind to the hidden layers'
  uncertainty). Measured against ``exact`` on 1,000 random examples of
  experience 1 after one quick-protocol epoch of IVON (seed 0, one thread):
  permuted-mnist (MLP 100-100) Spearman 0.96 between the scores, 86% of the
  200 chosen examples the same (random: 20%); split-mnist (MLP 256-256, task
  masks) Spearman 0.997, 92.5% of 40 the same (random: 15%). 5-10 ms there.
* ``exact``: per-example Jacobians, O(N C F) time plus O(N C P) flops: 5-16 s
  for the same 1,000 examples (~1000x ``last_layer``).
* ``samples``: S posterior-sample forward passes, O(S N F); Monte-Carlo noise.

For a whole permuted-mnist experience (10,000 examples) ``last_layer`` takes
~30 ms on one thread, ~10% of the experience's IVON epoch (~300 ms); with
``candidates=10`` (score a seeded, class-balanced random pool of 10 examples per
memory slot) ~10 ms, ~2%. See ``benchmarks/test_selection_speed.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
from avalanche.benchmarks.utils import concat_datasets
from avalanche.benchmarks.utils.flat_data import FlatData
from avalanche.training.storage_policy import ExemplarsBuffer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cl_bayes.avalanche.models import class_mask, unwrap
from cl_bayes.jacobians import masked_softmax
from cl_bayes.memory import select_memory
from cl_bayes.sensitivity import memory_perturbation

# selector(strategy, experience, memory_size) -> indices into experience.dataset
Selector = Callable[[object, object, int], Tensor]
Estimator = Literal["exact", "last_layer", "samples"]

SCORE_BATCH = 4096  # examples scored at once (a 784-256-256 MLP: ~20 MB of activations)
_SPOT_CHECKS = 8  # examples compared with dataset[i] before trusting the fast read


def experience_targets(experience) -> Tensor:
    return torch.as_tensor(list(experience.dataset.targets), dtype=torch.long)


# --- reading an experience's tensors --------------------------------------------


@dataclass
class ExperienceData:
    """An experience's examples for scoring: labels in dataset order, inputs in blocks.

    ``blocks`` are (inputs, positions) pairs: row r of ``inputs`` is example
    ``positions[r]`` of the dataset. A block is a whole leaf tensor of the dataset
    when the experience uses all of it (no copy), else the rows it uses.
    """

    y: Tensor  # (N,) int64, dataset order
    t: Tensor  # (N,) int64 task labels, dataset order
    blocks: list[tuple[Tensor, Tensor]]

    def __len__(self) -> int:
        return len(self.y)

    def x(self) -> Tensor:
        """All inputs in dataset order (a copy)."""
        first = self.blocks[0][0]
        out = first.new_empty((len(self.y), *first.shape[1:]))
        for inputs, positions in self.blocks:
            out[positions] = inputs
        return out


class _NoFastPath(Exception):
    pass


def _leaves(node, idx: np.ndarray, pos: np.ndarray):
    """(TensorDataset leaf, its rows, dataset positions) under a FlatData tree, for dataset indices.

    Mirrors ``FlatData._get_idx`` (subset indices, then concat offsets), vectorised.
    """
    if isinstance(node, TensorDataset):
        yield node, idx, pos
        return
    if not isinstance(node, FlatData):
        raise _NoFastPath(type(node).__name__)
    if node._indices is not None:
        indices = node._indices
        idx = np.fromiter(indices, dtype=np.int64, count=len(indices))[idx]
    if len(node._datasets) == 1:
        yield from _leaves(node._datasets[0], idx, pos)
        return
    bounds = np.asarray(node._cumulative_sizes, dtype=np.int64)
    which = np.searchsorted(bounds, idx, side="right")
    starts = np.concatenate([[0], bounds[:-1]])
    for d in np.unique(which):
        rows = which == d
        yield from _leaves(node._datasets[int(d)], idx[rows] - starts[d], pos[rows])


def _fast_read(dataset) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    flat = getattr(dataset, "_flat_data", None)
    if flat is None:
        raise _NoFastPath("not an AvalancheDataset")
    n = len(dataset)
    y = torch.empty(n, dtype=torch.long)
    blocks = []
    for leaf, rows, pos in _leaves(flat, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)):
        if len(leaf.tensors) < 2:
            raise _NoFastPath("leaves hold no labels")
        x_leaf, y_leaf = leaf.tensors[0], leaf.tensors[1]
        order = np.argsort(rows, kind="stable")
        if len(rows) == len(x_leaf) and np.array_equal(rows[order], np.arange(len(x_leaf))):
            inputs, positions = x_leaf, torch.from_numpy(pos[order])  # all of the leaf: no copy
        else:
            inputs, positions = x_leaf[torch.from_numpy(rows)], torch.from_numpy(pos)
        blocks.append((inputs, positions))
        y[positions] = y_leaf[torch.from_numpy(rows[order] if inputs is x_leaf else rows)].long()
    for i in {0, n - 1, *np.linspace(0, n - 1, _SPOT_CHECKS).astype(int).tolist()}:
        xi, yi = dataset[i][:2]
        inputs, positions = next((b, p) for b, p in blocks if bool((p == i).any()))
        row = int(torch.nonzero(positions == i)[0, 0])
        if not (torch.equal(torch.as_tensor(xi), inputs[row]) and int(yi) == int(y[i])):
            raise _NoFastPath(f"example {i} differs (transforms?)")
    return y, blocks


def _loader_read(dataset) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=SCORE_BATCH, shuffle=False, collate_fn=dataset.collate_fn):
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    y = torch.cat(ys).long()
    return y, [(torch.cat(xs), torch.arange(len(y)))]


def _task_labels(experience, dataset, n: int) -> Tensor:
    labels = getattr(experience, "task_labels", None)
    if labels is not None and len(labels) == 1:
        return torch.full((n,), int(labels[0]), dtype=torch.long)
    return torch.as_tensor(list(dataset.targets_task_labels), dtype=torch.long)


def experience_data(experience) -> ExperienceData:
    """Labels, task labels and inputs of every example of ``experience.dataset``.

    Read in the evaluation transform group (no augmentation); see the module docstring.
    """
    dataset = experience.dataset.eval()
    if len(dataset) == 0:
        raise ValueError("the experience has no training examples")
    try:
        y, blocks = _fast_read(dataset)
    except _NoFastPath:
        y, blocks = _loader_read(dataset)
    return ExperienceData(y=y, t=_task_labels(experience, dataset, len(y)), blocks=blocks)


# --- scoring --------------------------------------------------------------------


class _Scoring:
    """The plain network in eval mode; batches of (x, y, class mask, positions) on its device.

    With ``candidates`` only a class-balanced random pool of ``candidates * memory_size``
    examples (seeded) is scored, and the memory is chosen from it.
    """

    def __init__(self, strategy, experience, *, batch_size: int, memory_size: int, candidates: int | None, seed: int):
        self.model = strategy.model
        self.net = unwrap(self.model)
        self.device = next(self.net.parameters()).device
        self.data = experience_data(experience)
        self.y = self.data.y
        self.batch_size = batch_size
        self.memory_size = memory_size
        self.blocks = self.data.blocks
        self.scored = torch.arange(len(self.y))  # dataset positions that get a score
        if candidates is not None and candidates * memory_size < len(self.y):
            pool = select_memory(labels=self.y, memory_size=candidates * memory_size, mode="random",
                                 seed=seed * 10_007 + experience.current_experience)
            keep = torch.zeros(len(self.y), dtype=torch.bool)
            keep[pool] = True
            self.scored = torch.nonzero(keep).squeeze(-1)
            self.blocks = [(inputs[keep[positions]], positions[keep[positions]]) for inputs, positions in self.blocks]

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return False

    def batches(self):
        for inputs, positions in self.blocks:
            for s in range(0, len(positions), self.batch_size):
                pos = positions[s : s + self.batch_size]
                x = inputs[s : s + self.batch_size].to(self.device)
                t = self.data.t[pos].to(self.device)
                yield x, self.y[pos].to(self.device), class_mask(self.model, t, len(x)), pos

    def collect(self, per_batch) -> Tensor:
        """``per_batch(x, y, mask)`` -> (n, ...) rows of the scored examples, in dataset order, on the CPU."""
        out = None
        for x, y, mask, pos in self.batches():
            rows = per_batch(x, y, mask).detach().cpu()
            if out is None:
                out = rows.new_empty((len(self.y), *rows.shape[1:]))
            out[pos] = rows
        return out[self.scored]

    def select(self, mode: str, **scores) -> Tensor:
        """``cl_bayes.memory.select_memory`` over the scored examples; indices into the dataset."""
        chosen = select_memory(labels=self.y[self.scored], memory_size=self.memory_size, mode=mode, **scores)
        return self.scored[chosen]


def _last_linear(net: nn.Module) -> nn.Linear:
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("herding needs an nn.Linear output layer (its input are the features)")
    return layers[-1]


def _check_candidates(candidates: int | None) -> None:
    if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1):
        raise ValueError(f"candidates must be a positive int or None, got {candidates!r}")


def _ivon(strategy):
    from cl_bayes.ivon import IVON

    if not isinstance(getattr(strategy, "optimizer", None), IVON):
        raise TypeError("the sensitivity selector needs a strategy trained with cl_bayes.ivon.IVON (its posterior)")
    return strategy.optimizer


SENSITIVITY_RULES = ("sensitivity", "stratified", "proportional", "trimmed", "pruned")


def sensitivity_selector(
    *,
    estimator: Estimator = "last_layer",
    num_samples: int = 64,
    seed: int = 0,
    candidates: int | None = None,
    chunk_size: int | None = None,
    batch_size: int = SCORE_BATCH,
    rule: str = "sensitivity",
    temperature: float = 1.0,
    discard: float = 0.1,
    score_dtype: str = "float32",
) -> Selector:
    """Per class, a memory chosen by memory-perturbation sensitivity S (Nickl et al. 2023).

    Scored under the IVON posterior at the end of the experience; ``estimator`` of the
    prediction variance: ``last_layer`` (default, one forward pass), ``exact`` or
    ``samples`` (``num_samples`` posterior samples, seeded from ``seed`` and the experience).
    ``candidates``: score only a class-balanced random pool of ``candidates * memory_size``
    examples (seeded from ``seed`` and the experience) instead of all of them.
    ``rule``: ``sensitivity`` (top S, the default), ``stratified``, ``proportional``
    (``temperature``), ``trimmed`` or ``pruned`` (``discard``), ``cl_bayes.memory``; the random rules
    are seeded from ``seed`` and the experience. ``score_dtype="bfloat16"``: the scoring pass runs under
    torch's bfloat16 autocast (matrix products in bfloat16; scores returned as float32), an approximation
    of the float32 scores. ``benchmarks/test_selection_speed.py`` measures it (row ``last_layer-all-bf16``):
    13.1 ms against 23.3 ms in float32 on a CPU with AVX-512 bf16, keeping 99 % of the memory, but
    282 ms against 61 ms on one without native bf16 (AMD EPYC, AVX2 only, 2026-12-07): use it only
    where the CPU computes bf16 natively.
    """
    _check_candidates(candidates)
    if score_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"score_dtype must be 'float32' or 'bfloat16', got {score_dtype!r}")
    if estimator not in ("exact", "last_layer", "samples"):
        raise ValueError(f"estimator must be 'exact', 'last_layer' or 'samples', got {estimator!r}")
    if rule not in SENSITIVITY_RULES:
        raise ValueError(f"rule must be one of {', '.join(SENSITIVITY_RULES)}, got {rule!r}")
    # check the rule's parameter now, not at the end of the first experience
    select_memory(labels=torch.zeros(1, dtype=torch.long), memory_size=1, mode=rule, scores=torch.ones(1),
                  seed=0, temperature=temperature, discard=discard)

    return partial(_select_by_sensitivity, estimator=estimator, num_samples=num_samples, seed=seed,
                   candidates=candidates, chunk_size=chunk_size, batch_size=batch_size, rule=rule,
                   temperature=temperature, discard=discard, score_dtype=score_dtype)


def _select_by_sensitivity(strategy, experience, memory_size: int, *, estimator, num_samples, seed, candidates,
                           chunk_size, batch_size, rule, temperature, discard, score_dtype) -> Tensor:
    optimizer = _ivon(strategy)
    posterior = optimizer.posterior
    generator = None
    if estimator == "samples":
        generator = torch.Generator(posterior.mean.device)
        generator.manual_seed(seed * 10_007 + experience.current_experience)
    with _Scoring(strategy, experience, batch_size=batch_size, memory_size=memory_size,
                  candidates=candidates, seed=seed) as s:
        n = len(s.y)

        def score(x, y, mask):
            with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=score_dtype == "bfloat16"):
                return memory_perturbation(
                    s.net, posterior, x=x, y=y, class_mask=mask, estimator=estimator, ess=optimizer.ess,
                    n_train=n, num_samples=num_samples, generator=generator, chunk_size=chunk_size,
                ).sensitivity.float()

        extra = {"seed": _rule_seed(seed, experience)} if rule in ("stratified", "proportional", "pruned") else {}
        return s.select(rule, scores=s.collect(score), temperature=temperature, discard=discard, **extra)


def _rule_seed(seed: int, experience) -> int:
    # distinct from the candidate pool's seed * 10_007 + experience
    return seed * 10_007 + 5_003 + experience.current_experience


def lambda_selector(*, candidates: int | None = None, seed: int = 0, batch_size: int = SCORE_BATCH) -> Selector:
    """Per class, the top FROMP scores tr(diag(p) - p p^T) at the model's weights (Pan et al. 2020).

    ``candidates`` as in ``sensitivity_selector``.
    """
    _check_candidates(candidates)
    return partial(_select_by_lambda, candidates=candidates, seed=seed, batch_size=batch_size)


@torch.no_grad()
def _select_by_lambda(strategy, experience, memory_size: int, *, candidates, seed, batch_size) -> Tensor:
    with _Scoring(strategy, experience, batch_size=batch_size, memory_size=memory_size,
                  candidates=candidates, seed=seed) as s:
        return s.select("lambda", probs=s.collect(lambda x, y, mask: masked_softmax(s.net(x), mask)))


def herding_selector(*, batch_size: int = SCORE_BATCH) -> Selector:
    """Per class, iCaRL herding on the input features of the last nn.Linear (Rebuffi et al. 2017)."""
    return partial(_select_by_herding, batch_size=batch_size)


@torch.no_grad()
def _select_by_herding(strategy, experience, memory_size: int, *, batch_size) -> Tensor:
    with _Scoring(strategy, experience, batch_size=batch_size, memory_size=memory_size,
                  candidates=None, seed=0) as s:
        seen: list[Tensor] = []
        handle = _last_linear(s.net).register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))

        def penultimate(x, y, mask):
            seen.clear()
            s.net(x)
            return seen[0].flatten(1)

        try:
            return s.select("herding", features=s.collect(penultimate))
        finally:
            handle.remove()


def random_selector(*, seed: int) -> Selector:
    """Class-balanced random choice, reproducible from ``seed`` and the experience id."""
    return partial(_select_at_random, seed=seed)


def _select_at_random(strategy, experience, memory_size: int, *, seed: int) -> Tensor:
    return select_memory(
        labels=experience_targets(experience),
        memory_size=memory_size,
        mode="random",
        seed=seed * 10_007 + experience.current_experience,
    )


_PARAMETERS = {"proportional": "temperature", "trimmed": "discard", "pruned": "discard"}  # the rules with a parameter
# a bare name's parameter: the best value on the validation split (ivon-replay, quick protocol, seeds 0 and 1,
# split-mnist-ci and permuted-mnist; README's memory section): T 0.5 of {0.5, 1, 2}, trimmed q 0.5 of
# {0.05, 0.2, 0.5}, pruned q 0.1 of {0.1, 0.25, 0.5}
DEFAULT_PARAMETERS = {"proportional": 0.5, "trimmed": 0.5, "pruned": 0.1}


def parse_selection(selection: str) -> tuple[str, dict[str, float]]:
    """``"proportional:0.5"`` -> ``("proportional", {"temperature": 0.5})``; ValueError if invalid.

    A bare name takes its rule's default parameter (``DEFAULT_PARAMETERS``); only
    ``proportional``, ``trimmed`` and ``pruned`` take one.
    """
    if not isinstance(selection, str):
        raise ValueError(f"selection must be a string, got {selection!r}")
    name, colon, value = selection.partition(":")
    if name not in _BASE_SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(_BASE_SELECTIONS)}, got {selection!r}")
    if not colon:
        return name, ({_PARAMETERS[name]: DEFAULT_PARAMETERS[name]} if name in _PARAMETERS else {})
    if name not in _PARAMETERS:
        raise ValueError(f"selection {name!r} takes no parameter, got {selection!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"the parameter of {selection!r} must be a number") from None
    kwargs = {_PARAMETERS[name]: number}
    # the pure functions' own checks (temperature >= 0, discard in [0, 1))
    select_memory(labels=torch.zeros(1, dtype=torch.long), memory_size=1, mode=name, scores=torch.ones(1),
                  seed=0, **kwargs)
    return name, kwargs


class _Selections(tuple):
    """The bare selection names; ``in`` also accepts a name with a valid parameter."""

    def __contains__(self, selection) -> bool:
        try:
            parse_selection(selection)
        except ValueError:
            return False
        return True


_BASE_SELECTIONS = ("sensitivity", "lambda", "random", "herding", "stratified", "proportional", "trimmed", "pruned")
SELECTIONS = _Selections(_BASE_SELECTIONS)


def make_selector(
    selection: str, *, seed: int, estimator: Estimator = "last_layer", candidates: int | None = None
) -> Selector:
    """The selector for a ``selection`` name (one of ``SELECTIONS``, ``"rule:parameter"`` allowed)."""
    name, kwargs = parse_selection(selection)
    if name in SENSITIVITY_RULES:
        return sensitivity_selector(estimator=estimator, seed=seed, candidates=candidates, rule=name, **kwargs)
    if name == "lambda":
        return lambda_selector(seed=seed, candidates=candidates)
    if name == "random":
        return random_selector(seed=seed)
    return herding_selector()


# --- the storage policy ---------------------------------------------------------


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

    def update(self, strategy, **kwargs):
        # ReplayPlugin 0.6 still calls the deprecated ``update``; same effect, without its warning.
        self.post_adapt(strategy, strategy.experience)

    def resize(self, strategy, new_size: int):
        self.max_size = new_size  # the per-experience quota, not the total, decides what is kept
