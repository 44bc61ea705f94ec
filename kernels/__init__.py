"""Triton kernels for the service's hot paths, each beside the torch code it replaces (its reference)."""
