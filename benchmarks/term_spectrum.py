"""Diagnostic (issue 14, docs/BISECTION.md step 10): is the functional term's stiffness low-rank?

    CL_BAYES_DATA=/work/shared/data .venv/bin/python benchmarks/term_spectrum.py OUT.json

Trains bayes-cl on permuted-mnist, paper protocol, seed 0 (its spec: the exact term). At the first step
of experiences 2, 4, 6, 8 and 10, after the curvature scale is chosen, with D = h + delta + gamma c: the
top K eigenvalues of step * D^-1/2 A D^-1/2 (A the term's Gauss-Newton matrix at the anchors; subspace
iteration, ITERS rounds, then Rayleigh-Ritz), i.e. the stiffness of the mean's step along the K stiffest
modes. If a few modes carried the stiffness, they could be taken exactly and only the rest sampled.
Wraps the plugin's private ``_stabilise_curvature``: a diagnostic, not part of the package. About 20 min
on one core; prints one JSON line per measured experience.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch

from cl_bayes import config as C
from cl_bayes.avalanche import strategies
from cl_bayes.avalanche.benchmarks import build_benchmark
from cl_bayes.avalanche.fromp_plugin import FunctionalRegularisationPlugin, _eval_mode
from cl_bayes.avalanche.models import unwrap
from cl_bayes.avalanche.runner import build_strategy, seed_everything
from cl_bayes.fromp import term_ggn_product

K = 24  # modes
ITERS = 25  # subspace-iteration rounds


def top_stiffness(plugin: FunctionalRegularisationPlugin, strategy) -> dict:
    """step * the top K eigenvalues of D^-1/2 A D^-1/2, with the scale chosen at this experience's start."""
    opt = strategy.optimizer
    step = opt.step_size(max(opt.param_groups, key=opt.step_size))
    root = (opt.hess + opt.prior_precision / opt.ess + plugin._gamma * plugin._curvature).rsqrt()
    net = unwrap(strategy.model)

    def product(x: torch.Tensor) -> torch.Tensor:  # D^-1/2 A D^-1/2, column by column
        return torch.stack([root * term_ggn_product(plugin.prior, net, root * x[:, j]) for j in range(x.shape[1])], 1)

    start = time.perf_counter()
    with _eval_mode(net), torch.no_grad():
        x = torch.linalg.qr(torch.randn(root.numel(), K, generator=torch.Generator().manual_seed(0)))[0]
        for _ in range(ITERS):
            x = torch.linalg.qr(product(x))[0]
        t = x.T @ product(x)
        values = torch.linalg.eigvalsh((t + t.T) / 2).flip(0)
    return {"experience": strategy.experience.current_experience, "gamma": plugin._gamma, "step": step,
            "stiffness": [step * float(v) for v in values], "seconds": time.perf_counter() - start}


def main(out_path: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    found = []
    original = FunctionalRegularisationPlugin._stabilise_curvature

    def measured(plugin, strategy):
        original(plugin, strategy)
        if strategy.experience.current_experience % 2 == 1:
            found.append(top_stiffness(plugin, strategy))
            print(json.dumps(found[-1]), flush=True)

    FunctionalRegularisationPlugin._stabilise_curvature = measured
    spec, path = C.load_spec("bayes-cl")
    cfg = C.resolve(benchmark="permuted-mnist", strategy="bayes-cl", seed=0, protocol="paper",
                    params_cls=strategies.get("bayes-cl").params_cls, spec=spec, spec_path=path)
    bundle = build_benchmark(cfg, data_root=os.environ.get("CL_BAYES_DATA"))
    seed_everything(0)
    strategy, _ = build_strategy(cfg, bundle)
    for experience in bundle.benchmark.train_stream:
        strategy.train(experience)
    with open(out_path, "w") as f:
        json.dump(found, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: term_spectrum.py OUT.json")
    main(sys.argv[1])
