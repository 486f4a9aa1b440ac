"""Avalanche glue: benchmarks, strategies, plugins and the runner.

Everything that imports Avalanche lives in this subpackage; the maths in
``cl_bayes`` proper (IVON, natural parameters, sensitivity, FROMP, metrics)
does not.
"""

from cl_bayes.avalanche.ivon_strategy import IVONStrategy, NaturalParameterAccumulation

__all__ = ["IVONStrategy", "NaturalParameterAccumulation"]
