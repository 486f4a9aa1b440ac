r"""IVON's update of one parameter group as one fused loop (opt-in: ``IVON(fused=True)``).

The eager step (``IVON._update``) runs the update as ~10 element-wise torch calls, each a pass
over multi-megabyte flat buffers; on a CPU those passes, not the arithmetic, are its cost. Here
the same equations, with the same symbols as ``cl_bayes.ivon``'s module docstring, are one
function that ``torch.compile`` (inductor, C++ on the CPU) turns into a single loop:

    e      = h - hhat,            hhat = hhat_scale * (sum_k sign_k g_k z_k) * r
    g      = g + (1 - beta1) (ghat - g)                                     (momentum)
    h'     = h - (1 - beta2) e + 0.5 (1 - beta2)^2 (e / r)^2                 (as 1 / r^2 = 1 / (h + delta))
    m'     = m - (alpha / debias) clip((g + debias delta (m - m0)) / (h' + delta + c), debias clip_radius)
    r     <- h' + delta                                                     (its sqrt: the next noise scale)

with r = sqrt(h + delta) the noise scale of the step's samples. It reads h, m, g, ghat, the
g * z sum, r, delta and m0 once and writes h, m, g and h' + delta (in r's buffer) once. The scalars travel in one
tensor, so a changing learning rate or debias factor does not recompile.

Compiling costs seconds once per process and per buffer size (inductor caches the kernel on
disk), which is why it is opt-in: it pays off for long runs, not for the quick protocol's
one-epoch experiences. Where compilation fails (no C++ compiler, an unsupported torch), the
first call warns once and the eager step is used from then on. Results agree with the eager
step to float rounding (the compiled loop may reorder operations); ``tests/test_ivon.py``
checks it. Pure torch, no Avalanche import.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["group_update", "fused_group_update"]


def group_update(
    hess: Tensor, mean: Tensor, momentum: Tensor, ghat: Tensor, gz: Tensor, root: Tensor,
    delta: Tensor, prior_mean: Tensor, scalars: Tensor, curvature: Tensor | None = None, from_noise: bool = False,
) -> None:
    """The equations above, in place on ``hess``, ``mean``, ``momentum`` and ``root`` (r -> h' + delta).

    ``scalars`` = [hhat_scale, beta1, beta2, alpha, debias, clip_radius] (clip_radius may be inf).
    ``curvature``: c of a loss term of the mean (``IVON.mean_curvature``), added to the mean's
    denominator only. ``from_noise``: ``gz`` holds the noise z of the step's one sample, and g * z = ghat * z is formed
    here (one pass fewer than forming it when the sample is recorded).
    """
    hhat_scale, beta1, beta2, alpha, debias, clip = scalars.unbind(0)
    if from_noise:
        gz = ghat * gz
    e = hess - hhat_scale * gz * root
    new_momentum = momentum + (1.0 - beta1) * (ghat - momentum)
    u = e / root
    new_hess = hess - (1.0 - beta2) * e + 0.5 * (1.0 - beta2) * (1.0 - beta2) * u * u
    h_plus_delta = new_hess + delta
    numerator = new_momentum + debias * delta * (mean - prior_mean)
    denominator = h_plus_delta if curvature is None else h_plus_delta + curvature
    direction = torch.clamp(numerator / denominator, -debias * clip, debias * clip)
    mean.sub_(alpha / debias * direction)
    hess.copy_(new_hess)
    momentum.copy_(new_momentum)
    root.copy_(h_plus_delta)


_compiled = None
_failed = False


def fused_group_update(*args: Tensor, curvature: Tensor | None = None, from_noise: bool = False) -> bool:
    """``group_update`` compiled; False (and nothing changed) when compilation is unavailable."""
    global _compiled, _failed
    if _failed:
        return False
    try:
        if _compiled is None:
            _compiled = torch.compile(group_update, dynamic=False, fullgraph=True)
        _compiled(*args, curvature=curvature, from_noise=from_noise)
        return True
    except Exception as error:  # noqa: BLE001 (any compiler failure means: use the eager step)
        _failed = True
        warnings.warn(f"IVON(fused=True): torch.compile failed ({type(error).__name__}: {error}); "
                      "using the eager step", RuntimeWarning, stacklevel=3)
        return False
