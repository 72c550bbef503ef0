"""DiscreteLSTM and DiscreteGRU: drop-in relatives of torch.nn.LSTM / torch.nn.GRU whose gates are
discrete units and whose backward-pass memory is bit-packed level codes.

Parameters have the names, shapes, gate order and initialisation of torch.nn.LSTM/GRU, so state
dicts load both ways. ``levels=None`` runs torch's own continuous LSTM/GRU (for comparison).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _validation as V
from .backend import resolve_backend
from .codec import PackedTensor
from .kernels import codec as triton_codec
from .kernels import codec_torch, rnn_torch
from .kernels import rnn as triton_rnn
from .gru_function import GRULayerFunction
from .lstm_function import LSTMLayerFunction
from .rnn_function import CodedInput, LayerConfig, PackedDropoutFunction, PackedDropoutMask
from .rnn_state import PackedRNNState

__all__ = ["DiscreteLSTM", "DiscreteGRU", "PackedRNNState", "DEFAULT_CELL_CLIP"]

DEFAULT_CELL_CLIP = 8.0  # DiscreteLSTM keeps |c_t| <= cell_clip; see DiscreteLSTM


class _TorchSteps:
    """Step math on any device (discrnn.kernels.rnn_torch)."""

    lstm_step_forward = staticmethod(rnn_torch.lstm_step_forward)
    lstm_recompute_cell = staticmethod(rnn_torch.lstm_recompute_cell)
    lstm_output = staticmethod(rnn_torch.lstm_output)
    lstm_step_backward = staticmethod(rnn_torch.lstm_step_backward)
    gru_step_forward = staticmethod(rnn_torch.gru_step_forward)
    gru_output = staticmethod(rnn_torch.gru_output)
    gru_step_backward = staticmethod(rnn_torch.gru_step_backward)
    pack = staticmethod(codec_torch.torch_pack)
    unpack = staticmethod(codec_torch.torch_unpack)


class _TritonSteps:
    """One fused Triton kernel per step for the forward cell update (which packs the step's codes
    into the code store) and one for the backward one (which reads them packed), from
    discrnn.kernels.rnn, and the Triton codec; CUDA tensors, or CPU under the interpreter."""

    lstm_step_forward = staticmethod(triton_rnn.lstm_step_forward)
    lstm_recompute_cell = staticmethod(triton_rnn.lstm_recompute_cell)
    lstm_output = staticmethod(triton_rnn.lstm_output)
    lstm_step_backward = staticmethod(triton_rnn.lstm_step_backward)
    gru_step_forward = staticmethod(triton_rnn.gru_step_forward)
    gru_output = staticmethod(triton_rnn.gru_output)
    gru_step_backward = staticmethod(triton_rnn.gru_step_backward)
    pack = staticmethod(triton_codec.triton_pack)  # (codes, bits)
    unpack = staticmethod(triton_codec.triton_unpack)  # (packed, bits, numel)


def _step_ops(backend: str):
    """The step math of a resolved backend ("torch" or "triton", see backend.resolve_backend)."""
    return _TritonSteps if backend == "triton" else _TorchSteps


class _DiscreteRNNBase(nn.RNNBase):
    _mode: str
    _n_states: int  # 2 for LSTM (h, c), 1 for GRU

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        levels: int | None = 256,
        *,
        grad: str = "code",
        cell_clip: float = DEFAULT_CELL_CLIP,
        chunk_size: int = 32,
        check_finite: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        V.check_positive_int("input_size", input_size)
        V.check_positive_int("hidden_size", hidden_size)
        V.check_positive_int("num_layers", num_layers)
        self_levels = None if levels is None else V.check_levels(levels)
        chunk_size = V.check_positive_int("chunk_size", chunk_size)
        grad = V.check_grad_mode(grad)
        cell_clip = V.check_cell_clip(cell_clip)
        if backend is not None and backend not in V.BACKENDS:
            raise ValueError(f"backend must be one of {V.BACKENDS} or None, got {backend!r}")
        super().__init__(
            self._mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, proj_size, device=device, dtype=dtype,
        )
        self.levels = self_levels
        self.bits = None if self_levels is None else V.default_bits(self_levels)
        self.grad = grad
        self.cell_clip = cell_clip  # LSTM only (DiscreteGRU rejects it)
        self.chunk_size = chunk_size
        self.check_finite = check_finite
        self.backend = backend

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", levels={self.levels}"
        if self.grad != "code":
            s += f", grad={self.grad!r}"
        if self._n_states == 2 and self.cell_clip != DEFAULT_CELL_CLIP:
            s += f", cell_clip={self.cell_clip}"
        if self.chunk_size != 32:
            s += f", chunk_size={self.chunk_size}"
        return s

    # -- input handling -------------------------------------------------------------------------

    def _parse_input(self, input, hx):
        """-> x_data [N, I], batch_sizes, hx tuple of [L*D, B, *] tensors or None, restore info."""
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_idx, unsorted_idx = input
            V.check_float_tensor("input", data)
            batch_sizes = [int(b) for b in batch_sizes]
            info = ("packed", input, sorted_idx, unsorted_idx)
            if hx is not None:
                hx = self._as_tuple(hx)
                if sorted_idx is not None:
                    hx = tuple(h.index_select(1, sorted_idx) for h in hx)
            return data, batch_sizes, hx, info
        V.check_float_tensor("input", input)
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{name}: input must be 2-D (unbatched) or 3-D, got shape {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(1)
            if hx is not None:
                hx = tuple(self._check_state_dim(h, 2, "unbatched").unsqueeze(1) for h in self._as_tuple(hx))
        elif hx is not None:
            hx = tuple(self._check_state_dim(h, 3, "batched") for h in self._as_tuple(hx))
        if self.batch_first and batched:
            input = input.transpose(0, 1)
        T, B = input.shape[0], input.shape[1]
        if T == 0:
            raise ValueError(f"{name}: input has a zero-length sequence (shape {tuple(input.shape)})")
        if B == 0:
            raise ValueError(f"{name}: input has an empty batch (shape {tuple(input.shape)})")
        x_data = input.reshape(T * B, input.shape[2])
        return x_data, [B] * T, hx, ("padded", batched, T, B)

    def _as_tuple(self, hx):
        if self._n_states == 2:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError(f"hx must be a tuple (h_0, c_0) for {type(self).__name__}, got {type(hx).__name__}")
            return tuple(hx)
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx must be a tensor for {type(self).__name__}, got {type(hx).__name__}")
        return (hx,)

    @staticmethod
    def _check_state_dim(h, dim, what):
        V.check_tensor("hx", h)
        if h.dim() != dim:
            raise ValueError(f"hx must be {dim}-D for {what} input, got shape {tuple(h.shape)}")
        return h

    def _initial_states(self, hx, batch, dtype, device):
        D = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        shapes = [(self.num_layers * D, batch, out_size)]
        if self._n_states == 2:
            shapes.append((self.num_layers * D, batch, self.hidden_size))
        if hx is None:
            return [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        names = ["h_0", "c_0"]
        for h, shape, name in zip(hx, shapes, names):
            V.check_float_tensor(f"hx ({name})", h)
            if tuple(h.shape) != shape:
                raise ValueError(f"hx ({name}) must have shape {shape}, got {tuple(h.shape)}")
            if h.dtype != dtype:
                raise TypeError(f"hx ({name}) must have dtype {dtype} like the input, got {h.dtype}")
            if h.device != device:
                raise ValueError(f"hx ({name}) must be on {device} like the input, got {h.device}")
        return list(hx)

    def _validate(self, x_data, states):
        name = type(self).__name__
        w = self.weight_ih_l0
        if x_data.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input must have {self.input_size} features (input_size), got {x_data.shape[-1]}"
            )
        if x_data.dtype != w.dtype:
            raise TypeError(f"input must have dtype {w.dtype} like the parameters, got {x_data.dtype}")
        if x_data.device != w.device:
            raise ValueError(f"input must be on {w.device} like the parameters, got {x_data.device}")
        if self.check_finite:
            tensors = [x_data, *states, *self._flat_weights]
            finite = torch.stack([torch.isfinite(t).all() for t in tensors if t is not None])
            if not bool(finite.all()):  # one device sync for all of them
                bad = [n for n, t, ok in zip(["input", "hx", "cx"][: 1 + len(states)] + self._flat_weights_names,
                                               tensors, finite.tolist()) if not ok]
                raise ValueError(
                    f"{name}: expected finite values, got NaN or Inf in {', '.join(bad)} "
                    "(codes cannot hold NaN; pass check_finite=False to map NaN to code 0 instead)"
                )

    def _layer_weights(self, layer, direction):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih = getattr(self, "weight_ih" + suffix)
        w_hh = getattr(self, "weight_hh" + suffix)
        b_ih = getattr(self, "bias_ih" + suffix) if self.bias else None
        b_hh = getattr(self, "bias_hh" + suffix) if self.bias else None
        w_hr = getattr(self, "weight_hr" + suffix) if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def _restore(self, y_data, finals, info):
        if info[0] == "packed":
            _, packed, sorted_idx, unsorted_idx = info
            out = PackedSequence(y_data, packed.batch_sizes, sorted_idx, unsorted_idx)
            if unsorted_idx is not None:
                finals = [f.index_select(1, unsorted_idx) for f in finals]
            return out, finals
        _, batched, T, B = info
        y = y_data.view(T, B, -1)
        if self.batch_first and batched:
            y = y.transpose(0, 1)
        if not batched:
            y = y.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        return y, finals

    def _state_to_tensors(self, state: PackedRNNState, dtype):
        """Float h_0 (and c_0) of a packed state, exactly as the call that produced it left them."""
        mode = "LSTM" if self._n_states == 2 else "GRU"
        if state.mode != mode:
            raise TypeError(f"hx is a {state.mode} PackedRNNState, expected one for {mode}")
        if state.levels != self.levels:
            raise ValueError(f"hx has levels={state.levels}, expected levels={self.levels} like the module")
        if state.h is not None:
            return (state.h.dequantize(dtype),)
        acc = codec_torch.compute_dtype(dtype)
        m = (state.o.dequantize(acc) * state.u.dequantize(acc)).to(dtype)
        if self.proj_size > 0:
            D = 2 if self.bidirectional else 1
            m = torch.stack([m[i] @ self._layer_weights(i // D, i % D)[4].t() for i in range(m.shape[0])])
        # c stays in the compute dtype: the layers take c_0 in any float dtype.
        return (m, state.c)

    def _pack_state(self, final_codes, c_states, info, ops):
        """PackedRNNState from each layer-direction's last-step codes [Qs, B, H] (and c)."""
        codes = torch.stack(final_codes, dim=1)  # [Qs, L*D, B, H]
        if info[0] == "packed" and info[3] is not None:
            codes = codes.index_select(2, info[3])
            c_states = [c.index_select(0, info[3]) for c in c_states] if c_states else c_states
        dtype = self.weight_ih_l0.dtype
        shape = codes.shape[1:]

        def packed(plane, kind):
            return PackedTensor(ops.pack(plane.reshape(-1), self.bits), shape, dtype, self.levels,
                                kind, self.bits)

        if self._n_states == 1:
            return PackedRNNState(h=packed(codes[0], "tanh"))
        return PackedRNNState(o=packed(codes[0], "sigmoid"), u=packed(codes[1], "tanh"),
                              c=torch.stack(c_states))

    def forward(self, input, hx=None, *, packed_state: bool | None = None):
        """As torch.nn.LSTM/GRU's forward. ``hx`` may also be a :class:`PackedRNNState`; the final
        state is returned packed (and detached) when ``hx`` is one or ``packed_state=True``."""
        is_packed_hx = isinstance(hx, PackedRNNState)
        want_packed = is_packed_hx if packed_state is None else bool(packed_state)
        if self.levels is None:
            if want_packed:
                raise ValueError("packed states need discrete levels; this module has levels=None")
            torch_rnn = nn.LSTM if self._n_states == 2 else nn.GRU
            return torch_rnn.forward(self, input, hx)
        if is_packed_hx:
            hx = self._state_to_tensors(hx, self.weight_ih_l0.dtype)
            if not isinstance(input, PackedSequence) and input.dim() == 2:
                hx = tuple(h.squeeze(1) for h in hx)
            hx = hx if self._n_states == 2 else hx[0]
        x_data, batch_sizes, hx, info = self._parse_input(input, hx)
        dtype, device = x_data.dtype, x_data.device
        if is_packed_hx:
            states = list(hx)  # built by _state_to_tensors: shapes right by construction
            if states[0].shape[1] != batch_sizes[0]:
                raise ValueError(f"hx holds a batch of {states[0].shape[1]}, the input a batch of {batch_sizes[0]}")
        else:
            states = self._initial_states(hx, batch_sizes[0], dtype, device)
        self._validate(x_data, states)
        backend = resolve_backend(self.backend, device)
        ops = _step_ops(backend)
        grad = V.check_grad_mode(self.grad)  # attributes may have been changed since __init__
        cell_clip = V.check_cell_clip(self.cell_clip) if self._n_states == 2 else None
        D = 2 if self.bidirectional else 1
        finals = [[] for _ in states]
        final_codes, c_states = [], []
        layer_input, source = x_data, None
        for layer in range(self.num_layers):
            outputs, cfgs, codes = [], [], []
            for direction in range(D):
                idx = layer * D + direction
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(layer, direction)
                cfg = LayerConfig(batch_sizes, self.levels, self.bits, self.chunk_size,
                                  bool(direction), ops, input_source=source, grad=grad,
                                  cell_clip=cell_clip)
                if self._n_states == 2:
                    b = b_ih + b_hh if self.bias else None
                    y, h_n, c_n, layer_codes, last_codes, c_state = LSTMLayerFunction.apply(
                        layer_input, states[0][idx], states[1][idx], w_ih, w_hh, b, w_hr, cfg
                    )
                    finals[1].append(c_n)
                    c_states.append(c_state)
                else:
                    y, h_n, layer_codes, last_codes = GRULayerFunction.apply(
                        layer_input, states[0][idx], w_ih, w_hh, b_ih, b_hh, cfg
                    )
                finals[0].append(h_n)
                final_codes.append(last_codes)
                outputs.append(y)
                cfgs.append(cfg)
                codes.append(layer_codes)
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=1)
            mask = None
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                mask = PackedDropoutMask(layer_input.shape, self.dropout, layer_input.device)
                layer_input = PackedDropoutFunction.apply(layer_input, mask.packed, mask)
            # The next layer rebuilds its input from these codes instead of keeping the floats.
            source = CodedInput(cfgs, codes, mask)
        finals = [torch.stack(f) for f in finals]
        y, finals = self._restore(layer_input, finals, info)
        if want_packed:
            return y, self._pack_state(final_codes, c_states, info, ops)
        return (y, tuple(finals)) if self._n_states == 2 else (y, finals[0])


class DiscreteLSTM(_DiscreteRNNBase):
    """LSTM with discrete gates: i, f, o = discrete_sigmoid, g = discrete_tanh,
    c_t = clamp(f * c_{t-1} + i * g, -cell_clip, cell_clip), h_t = o * discrete_tanh(c_t) (times
    weight_hr when proj_size > 0).

    Guarantee: |c_t| <= cell_clip at every step (c_0 is used as given), and |o * u| <= 1, for any
    input, weights, sequence length, level count and gradient mode. Without the clamp the cell is
    unbounded: the top sigmoid level is exactly 1, so a saturated forget gate never forgets.

    Backward: the gates' straight-through derivatives follow ``grad``; the cell output
    u = discrete_tanh(c_t) always uses tanh'(c_t), from c_t rebuilt in backward, so it fades as |c|
    grows; where the clamp was active, nothing passes to the gates and c_{t-1} (torch.clamp's
    derivative).

    Args are those of :class:`torch.nn.LSTM` plus:
        levels: L in [2, 256] (default 256), or None for torch's continuous LSTM (no clamp).
        grad: the gates' straight-through derivative, "code" (default: the mean of f' over the
            level's bin, from the kept codes alone) or "exact" (f' at the pre-activation, which is
            then kept too: 4 floats per step and unit in the compute dtype).
        cell_clip: the bound on |c_t| (default 8.0; a finite float > 0 that float32 holds exactly).
        chunk_size: time steps per input-projection / weight-gradient chunk and per float32 cell-state
            checkpoint (default 32).
        check_finite: raise ValueError on NaN/Inf in input, states or weights (one device sync per
            call); with False, non-finite pre-activations encode as code 0.
        backend: None (Triton step kernels on CUDA, torch elsewhere), "torch" or "triton".

    Kept for backward per time step, batch row and hidden unit: 5 codes of ceil(log2 L) bits
    (i, f, g, o and tanh(c)) plus 4 / chunk_size bytes of cell-state checkpoint; with
    grad="exact" also the 4 gate pre-activations (16 bytes in float32).
    """

    _mode = "LSTM"
    _n_states = 2
    # levels=None runs nn.LSTM.forward, which calls these LSTM-specific helpers.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden


class DiscreteGRU(_DiscreteRNNBase):
    """GRU with discrete gates: r, z = discrete_sigmoid, n = discrete_tanh(x W_in + b_in +
    r * (h W_hn + b_hn)), h_t = snap((1 - z) * n + z * h_{t-1}) on the tanh level grid, with a
    straight-through gradient through snap. The whole state is one code per unit.

    Args as :class:`DiscreteLSTM` (no proj_size, no cell_clip: h is a tanh level). Kept for
    backward per time step, batch row and hidden unit: 4 codes (r, z, n, h) of ceil(log2 L) bits;
    with grad="exact" also the pre-activations of r, z, n (12 bytes in float32).
    """

    _mode = "GRU"
    _n_states = 1

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, levels=256, **kwargs):
        if "proj_size" in kwargs:
            raise TypeError("DiscreteGRU has no proj_size (torch.nn.GRU has none either)")
        if "cell_clip" in kwargs:
            raise TypeError("DiscreteGRU has no cell_clip: its state h is a tanh level, in [-1, 1] "
                            "by construction")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, levels, **kwargs)
