"""Triton kernels for rewritten attention; each kernel's plain-torch reference is in reference.py."""
