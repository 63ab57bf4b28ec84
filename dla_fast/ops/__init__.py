"""Fused DLA operators: one module per op, each with its eager reference, kernels and autograd."""
