"""Kernels of discrnn, imported as ``discrnn.kernels``.

``codec`` holds the Triton kernels and their launchers, ``codec_torch`` the pure-torch reference
(also the backend for every non-CUDA device). The public API lives in ``discrnn``.
"""
