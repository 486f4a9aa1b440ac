"""Functional regularisation of the memorable past (FROMP) with the IVON posterior."""
