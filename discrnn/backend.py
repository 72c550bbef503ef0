"""Which implementation runs an op: chosen by device, or explicitly, never by a silent fallback."""

from __future__ import annotations

import torch

from ._validation import BACKENDS
from .kernels.codec import INTERPRETING

__all__ = ["resolve_backend", "triton_interpreting"]


def triton_interpreting() -> bool:
    """True when the Triton kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU
    tensors through the interpreter). Fixed when discrnn is first imported."""
    return INTERPRETING


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``None`` picks ``"triton"`` for CUDA tensors and ``"torch"`` for every other device.

    ``"triton"`` on a non-CUDA tensor is allowed only under the Triton interpreter; otherwise it is an
    error rather than a quiet switch to torch, so a broken kernel is never hidden.
    """
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before discrnn is "
            f"imported to run the kernels on the CPU; got tensors on {device}"
        )
    return backend
