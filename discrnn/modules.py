"""nn.Module wrappers of the discrete units."""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as V
from .units import discrete_activation

__all__ = ["DiscreteTanh", "DiscreteSigmoid"]


class _DiscreteActivation(nn.Module):
    kind: str

    def __init__(self, levels: int, grad: str = "exact", backend: str | None = None):
        super().__init__()
        self.levels = V.check_levels(levels)
        self.grad = V.check_grad_mode(grad)
        if backend is not None and backend not in V.BACKENDS:
            raise ValueError(f"backend must be one of {V.BACKENDS} or None, got {backend!r}")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return discrete_activation(x, self.levels, self.kind, grad=self.grad, backend=self.backend)

    def extra_repr(self) -> str:
        extra = f", backend={self.backend!r}" if self.backend is not None else ""
        return f"levels={self.levels}, grad={self.grad!r}{extra}"


class DiscreteTanh(_DiscreteActivation):
    """tanh snapped to ``levels`` uniform levels in [-1, 1]; see :func:`discrnn.discrete_tanh`.

    Same output in train and eval mode. ``grad="code"`` keeps only bit-packed codes for backward.
    """

    kind = "tanh"


class DiscreteSigmoid(_DiscreteActivation):
    """sigmoid snapped to ``levels`` uniform levels in [0, 1]; see :func:`discrnn.discrete_sigmoid`."""

    kind = "sigmoid"
