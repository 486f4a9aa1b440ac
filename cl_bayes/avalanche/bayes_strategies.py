"""The Bayesian strategies (IVON and friends), registered in ``cl_bayes.avalanche.strategies``."""
