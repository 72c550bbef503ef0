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

Nothing in a state is clamped: the codes are levels by construction, and c is used as given (it
may exceed the layer's cell_clip; c_1 on are bounded). ``.to(device)`` moves it, and
``torch.save`` / ``torch.load(..., weights_only=True)`` round-trip it once discrnn is imported (the
rebuild function is registered with ``torch.serialization.add_safe_globals``); loading checks it as
the constructor does and rejects corrupted or mismatched buffers with ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import torch

from . import _validation as V
from .codec import _FORMAT, PackedTensor

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
        kinds = {"h": "tanh", "o": "sigmoid", "u": "tanh"}
        for name, t in (("h", h), ("o", o), ("u", u)):
            if t is None:
                continue
            if not isinstance(t, PackedTensor):
                raise TypeError(f"{name} must be a PackedTensor, got {type(t).__name__}")
            if t.kind != kinds[name]:
                raise ValueError(f"{name} must be a PackedTensor of kind {kinds[name]!r}, got {t.kind!r}")
            if len(t.shape) != 3:
                raise ValueError(f"{name} must have shape [num_layers * D, batch, hidden], got "
                                 f"{tuple(t.shape)}")
        if c is not None:
            if (o.shape, o.levels, o.bits, o.device) != (u.shape, u.levels, u.bits, u.device):
                raise ValueError(
                    f"o and u must agree in shape, levels, bits and device, got {tuple(o.shape)}, "
                    f"levels={o.levels}, bits={o.bits}, {o.device} and {tuple(u.shape)}, "
                    f"levels={u.levels}, bits={u.bits}, {u.device}"
                )
            V.check_float_tensor("c", c)
            if tuple(c.shape) != tuple(o.shape):
                raise ValueError(f"c must have the shape of o and u {tuple(o.shape)}, got {tuple(c.shape)}")
            if c.device != o.device:
                raise ValueError(f"c must be on the device of o and u ({o.device}), got {c.device}")
        self.h, self.o, self.u, self.c = h, o, u, c

    @property
    def mode(self) -> str:
        return "GRU" if self.h is not None else "LSTM"

    @property
    def shape(self) -> torch.Size:
        """[num_layers * num_directions, batch, hidden_size]."""
        return (self.h if self.h is not None else self.u).shape

    @property
    def device(self) -> torch.device:
        return (self.h if self.h is not None else self.u).device

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

    def __reduce_ex__(self, protocol):
        # PackedTensors (which reduce to bytes and plain fields) and c, rebuilt by an allow-listed
        # function: torch.load(weights_only=True) accepts it.
        return _rebuild_packed_rnn_state, (_FORMAT, self.h, self.o, self.u, self.c)

    def __repr__(self) -> str:
        return (f"PackedRNNState(mode={self.mode!r}, shape={tuple(self.shape)}, levels={self.levels}, "
                f"nbytes={self.nbytes})")


def _rebuild_packed_rnn_state(version, h, o, u, c) -> PackedRNNState:
    """Rebuild a pickled :class:`PackedRNNState` (torch.load, pickle, copy.deepcopy), checked as by
    the constructor (its PackedTensors were checked as they were rebuilt)."""
    if version != _FORMAT:
        raise ValueError(f"PackedRNNState: unknown saved format {version!r}, expected {_FORMAT} "
                         "(saved by another version of discrnn?)")
    try:
        return PackedRNNState(h=h, o=o, u=u, c=c)
    except (TypeError, ValueError) as e:
        raise type(e)(f"PackedRNNState (saved): {e}") from None


torch.serialization.add_safe_globals([_rebuild_packed_rnn_state])
