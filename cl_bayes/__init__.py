"""cl-bayes: Bayesian continual learning benchmarks.

Layout: the maths (``ivon``, ``natural``, ``posterior``, ``sensitivity``,
``memory``, ``fromp``, ``metrics``) needs torch only; ``cl_bayes.avalanche``
holds the Avalanche glue (benchmarks, strategies, runner); ``protocols``,
``config``, ``data`` and ``results`` describe runs; ``suite``, ``leaderboard``,
``plots`` and ``cli`` are the tools around them.
"""

__version__ = "0.1.0"
