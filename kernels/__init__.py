"""Triton kernels for hla-convert, installed as `hla_kernels` (see pyproject.toml)."""
