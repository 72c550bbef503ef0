"""The recurrent state of a DiscreteLSTM / DiscreteGRU between calls, kept as level codes.

Format (``D`` = 2 if bidirectional else 1, ``B`` = batch, ``H`` = hidden_size):

* GRU: ``h`` — :class:`~discrnn.PackedTensor` of shape [num_layers * D, B, H], kind ``"tanh"``:
  the hidden state itself (a GRU's state is one code per unit).
* LSTM: ``o`` — PackedTensor [num_layers * D, B, H], kind ``"sigmoid"``: the output gate of the last
  step; ``u`` — PackedTensor of the same shape, kind ``"tanh"``: discrete_tanh(c) of the last step,
  so that h = o * u (then ``h @ weight_hr.T`` with proj_size); ``c`` — the cell state as a float32
  tensor [num_layers * D, B, H] (float64 for float64 models), since c is not bounded.

A state is always detached from autograd: carrying it between chunks is truncated BPTT. Running a
sequence in pieces, passing the state on, gives the same forward results as running it whole.
"""

from __future__ import annotations

import torch

from .codec import PackedTensor

__all__ = ["PackedRNNState"]


class PackedRNNState:
    __slots__ = ("h", "o", "u", "c")

    def __init__(self, *, h: PackedTensor | None = None, o: PackedTensor | None = None,
                 u: PackedTensor | None = None, c: torch.Tensor | None = None):
        lstm = (o, u, c)
        if h is not None and any(t is not None for t in lstm):
            raise ValueError("PackedRNNState holds either h (GRU) or o, u and c (LSTM), not both")
        if h is None and any(t is None for t in lstm):
            raise ValueError("an LSTM PackedRNNState needs all of o, u and c")
        for name, t in (("h", h), ("o", o), ("u", u)):
            if t is not None and not isinstance(t, PackedTensor):
                raise TypeError(f"{name} must be a PackedTensor, got {type(t).__name__}")
        if c is not None:
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"c must be a torch.Tensor, got {type(c).__name__}")
            if tuple(c.shape) != tuple(o.shape):
                raise ValueError(f"c must have the shape of o and u {tuple(o.shape)}, got {tuple(c.shape)}")
        self.h, self.o, self.u, self.c = h, o, u, c

    @property
    def mode(self) -> str:
        return "GRU" if self.h is not None else "LSTM"

    @property
    def shape(self) -> torch.Size:
        """[num_layers * num_directions, batch, hidden_size]."""
        return (self.h if self.h is not None else self.u).shape

    @property
    def levels(self) -> int:
        return (self.h if self.h is not None else self.u).levels

    @property
    def nbytes(self) -> int:
        if self.h is not None:
            return self.h.nbytes
        return self.o.nbytes + self.u.nbytes + self.c.numel() * self.c.element_size()

    def to(self, device) -> "PackedRNNState":
        if self.h is not None:
            return PackedRNNState(h=self.h.to(device))
        return PackedRNNState(o=self.o.to(device), u=self.u.to(device), c=self.c.to(device))

    def __repr__(self) -> str:
        return (f"PackedRNNState(mode={self.mode!r}, shape={tuple(self.shape)}, levels={self.levels}, "
                f"nbytes={self.nbytes})")
