"""DiscreteLSTM and DiscreteGRU: drop-in relatives of torch.nn.LSTM / torch.nn.GRU whose gates are
discrete units and whose backward-pass memory is bit-packed level codes.

Parameters have the names, shapes, gate order and initialisation of torch.nn.LSTM/GRU, so state
dicts load both ways (and ``from_torch`` / ``to_torch`` convert whole modules). ``levels=None`` runs
torch's own continuous LSTM/GRU (for comparison).

Checks, and where they run (``forward``, before any layer runs):

* Shapes, dtypes and devices: always. A mistake torch.nn.LSTM/GRU also reject raises the exception
  type torch raises, through a class that derives from discrnn's documented type as well (see
  ``discrnn._validation``): wrong feature count, h_0/c_0 shape or number of dimensions, or a
  zero-length sequence: ``ShapeError`` (ValueError and RuntimeError); input dtype other than the
  parameters': ``DTypeError`` (TypeError and ValueError); h_0/c_0 dtype other than the input's:
  ``StateDTypeError`` (TypeError and RuntimeError); tensors on different devices: ``DeviceError``
  (ValueError and RuntimeError). An empty batch (B = 0) is not an error: as torch, the outputs have
  0 rows and backward gives zero gradients.
* Values, with ``check_finite=True`` (the default), eager mode (one device sync per call for all
  of them): ``ValueError`` naming each tensor that holds NaN or +-Inf among the input, h_0, c_0 and
  every weight forward actually uses (so also weights substituted by ``torch.func.functional_call``
  or computed by a parametrization); for DiscreteGRU a ``StateRangeWarning`` (a UserWarning) when
  a float h_0 holds values outside [-1, 1], which the first step's snap to the tanh grid saturates
  (see DiscreteGRU). ``check_finite=False`` checks no values and costs no sync.
* Values while torch.compile or torch.export trace the module (``torch.compiler.is_compiling()``,
  also make_fx/FakeTensor tracing), with ``check_finite=True``: the NaN/Inf conditions go into the
  graph as ``torch._assert_async``, so the compiled or exported program raises ``RuntimeError``
  with the same message when it meets them (on CUDA a device-side assert, which is fatal to the
  CUDA context); the h_0 range warning is left out. On meta and fake tensors nothing is checked
  (there are no values). No ``.item()``/``bool()`` runs in any of these.
* torch.jit: ``torch.jit.trace`` and ``torch.jit.script`` of a module with levels set raise a
  ``RuntimeError`` naming the alternatives (torch.export.export, torch.compile).

NaN with ``check_finite=False``: a gate whose pre-activation is NaN takes code 0, its lowest level
(sigmoid 0, tanh -1); +-Inf pre-activations take the end levels. So a NaN input row (or a NaN in
h_0 or in a weight row, which spreads through the matmuls) gives, at that step, i = f = o = 0 and
g = -1 in the LSTM (c and h of the row become 0) and r = z = 0, n = -1 in the GRU (h becomes -1).
A NaN in the LSTM's c_0 stays in that unit's c (and c_n) while its u reads the lowest level
(h = -o). Outputs y and h_n stay finite (they are levels), except through a NaN in weight_hr.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import _validation as V
from . import compile_ops
from .backend import resolve_backend
from ._validation import DeviceError, DTypeError, ShapeError, StateDTypeError, StateRangeWarning
from .codec import PackedTensor
from .kernels import codec as triton_codec
from .kernels import codec_torch, rnn_cpu, rnn_torch
from .kernels import rnn as triton_rnn
from .gru_function import GRULayerFunction
from .lstm_function import LSTMLayerFunction
from .rnn_function import (CodedInput, LayerConfig, PackedDropoutFunction, PackedDropoutMask,
                           release_output_tensors)
from .rnn_state import PackedRNNState

__all__ = ["DiscreteLSTM", "DiscreteGRU", "PackedRNNState", "DEFAULT_CELL_CLIP"]

DEFAULT_CELL_CLIP = 8.0  # DiscreteLSTM keeps |c_t| <= cell_clip; see DiscreteLSTM
# Layer dtypes whose CPU calls load the fused kernels (float32 arithmetic): their value check
# takes the extension's one-call scan too (a float64 layer does not build it for that).
_FUSED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _TorchSteps:
    """Step math on any device (discrnn.kernels.rnn_torch)."""

    lstm_step_forward = staticmethod(rnn_torch.lstm_step_forward)
    lstm_recompute_cell = staticmethod(rnn_torch.lstm_recompute_cell)
    lstm_output = staticmethod(rnn_torch.lstm_output)
    lstm_step_backward = staticmethod(rnn_torch.lstm_step_backward)
    gru_step_forward = staticmethod(rnn_torch.gru_step_forward)
    gru_output = staticmethod(rnn_torch.gru_output)
    gru_step_backward = staticmethod(rnn_torch.gru_step_backward)
    # codec_torch's stream; on CPU in one C++ pass (rnn_cpu.pack / unpack: the same bytes)
    pack = staticmethod(rnn_cpu.pack)
    unpack = staticmethod(rnn_cpu.unpack)


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


def _no_torchscript(module, how: str) -> str:
    """Why torch.jit.<how> cannot compile ``module``, and what to use instead."""
    name = type(module).__name__
    torch_name = "LSTM" if module._n_states == 2 else "GRU"
    if module.levels is None:
        why = ("its forward takes the keyword-only argument packed_state, which TorchScript does "
               f"not support; torch.jit.{how}(module.to_torch()) compiles the same computation "
               f"(torch.nn.{torch_name})")
    else:
        why = ("each layer is a Python autograd Function that keeps Python-side state (the "
               "sequence layout, the packed codes a stacked layer rebuilds its input from), which a "
               "TorchScript graph would freeze or drop. Use torch.export.export(module, args) or "
               "torch.compile(module) instead, or run it eagerly (torch.jit."
               f"{how}(module.to_torch()) compiles the continuous torch.nn.{torch_name})")
    return f"{name} with levels={module.levels} cannot be compiled by torch.jit.{how}: {why}"


class _EmptyBatchFunction(torch.autograd.Function):
    """The outputs of a call on an empty batch (B = 0: every output has 0 rows), connected to every
    input so that backward gives each one a zero gradient of its own shape, as torch.nn.LSTM/GRU
    do."""

    @staticmethod
    def forward(ctx, out_specs, *tensors):
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors]
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in out_specs)

    @staticmethod
    def backward(ctx, *grads):
        zeros = [torch.zeros(shape, dtype=dtype, device=device) if needed else None
                 for (shape, dtype, device), needed in zip(ctx.specs, ctx.needs_input_grad[1:])]
        return (None, *zeros)


_AUTOCAST_DTYPES: dict = {}  # (device type, autocast dtype, states) -> dtype or None


class _FloatDtypes(TorchDispatchMode):
    """Records the floating dtypes of the tensors that the ops below autocast receive."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.update(t.dtype for t in tree_leaves((args, kwargs))
                         if isinstance(t, torch.Tensor) and t.is_floating_point())
        return func(*args, **kwargs)


def _dtype_reached(probe: nn.Module, x: torch.Tensor, amp: torch.dtype) -> torch.dtype:
    """``amp`` where autocast cast the probe's call to it (whether or not the call then ran), else
    float32."""
    recorder = _FloatDtypes()
    try:
        with torch.no_grad(), recorder:
            probe(x)
    except RuntimeError:
        pass
    return amp if amp in recorder.seen else torch.float32


def _to_amp(value, amp: torch.dtype):
    """float32 tensors (alone, in a tuple or in a PackedSequence) cast to ``amp``; the rest as is
    (autocast leaves float64 alone, and a PackedRNNState keeps its codes and float32 cell)."""
    if isinstance(value, PackedSequence):
        return value._replace(data=_to_amp(value.data, amp))
    if isinstance(value, tuple):
        return tuple(_to_amp(v, amp) for v in value)
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(amp)
    return value


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

    # -- conversion to and from torch.nn --------------------------------------------------------

    @classmethod
    def _torch_config(cls, module) -> dict:
        config = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                      dropout=module.dropout, bidirectional=module.bidirectional)
        if cls._n_states == 2:
            config["proj_size"] = module.proj_size
        return config

    @classmethod
    def from_torch(cls, module, levels: int | None = 256, **kwargs):
        """A new layer with ``module``'s configuration (input_size, hidden_size, num_layers, bias,
        batch_first, dropout, bidirectional and, for the LSTM, proj_size), a copy of its parameters
        (same device and dtype) and its training mode. ``module`` is a torch.nn.LSTM for
        DiscreteLSTM, a torch.nn.GRU for DiscreteGRU. ``levels`` and ``kwargs`` (grad, cell_clip,
        chunk_size, check_finite, backend) as for the constructor; with ``levels=None`` the result
        computes exactly what ``module`` does.

        Raises:
            TypeError: ``module`` is not a torch.nn.LSTM / GRU, or ``kwargs`` repeats a setting
                taken from it.
        """
        torch_cls = nn.LSTM if cls._n_states == 2 else nn.GRU
        if not isinstance(module, torch_cls):
            raise TypeError(f"{cls.__name__}.from_torch: module must be a torch.nn.{torch_cls.__name__}, "
                            f"got {type(module).__name__}")
        config = cls._torch_config(module)
        taken = sorted(set(kwargs) & (set(config) | {"device", "dtype", "input_size", "hidden_size"}))
        if taken:
            raise TypeError(f"{cls.__name__}.from_torch takes {', '.join(taken)} from the module; "
                            "set them on the torch module instead")
        first = next(module.parameters())
        new = cls(module.input_size, module.hidden_size, **config, levels=levels, device=first.device,
                  dtype=first.dtype, **kwargs)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new

    def to_torch(self):
        """A torch.nn.LSTM (DiscreteLSTM) or torch.nn.GRU (DiscreteGRU) with this layer's
        configuration, a copy of its parameters (same device and dtype) and its training mode. It
        computes torch's continuous cell: the same as this layer only with ``levels=None``."""
        torch_cls = nn.LSTM if self._n_states == 2 else nn.GRU
        first = self.weight_ih_l0
        module = torch_cls(self.input_size, self.hidden_size, **self._torch_config(self),
                           device=first.device, dtype=first.dtype)
        module.load_state_dict(self.state_dict())
        module.train(self.training)
        return module

    def __prepare_scriptable__(self):
        # torch.jit.script calls this (on submodules too) before compiling anything.
        raise RuntimeError(_no_torchscript(self, "script"))

    # -- input handling -------------------------------------------------------------------------

    def _parse_input(self, input, hx):
        """-> x_data [N, I], batch_sizes, hx tuple of [L*D, B, *] tensors or None, restore info."""
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_idx, unsorted_idx = input
            V.check_tensor("input", data)
            batch_sizes = [int(b) for b in batch_sizes]
            info = ("packed", input, sorted_idx, unsorted_idx)
            if hx is not None:
                hx = tuple(V.check_tensor("hx", h) for h in self._as_tuple(hx))
                if sorted_idx is not None:
                    hx = tuple(h.index_select(1, sorted_idx) for h in hx)
            return data, batch_sizes, hx, info
        V.check_tensor("input", input)
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
            # torch: RuntimeError "Expected sequence length to be larger than 0 in RNN"
            raise ShapeError(f"{name}: input must have a sequence length > 0, got a zero-length "
                             f"sequence (shape {tuple(input.shape)})")
        # An empty batch (B = 0) is valid, as in torch: forward returns empty outputs.
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
            raise ShapeError(f"hx must be {dim}-D for {what} input, got shape {tuple(h.shape)}")
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
            if h.dtype not in V.FLOAT_DTYPES:
                raise StateDTypeError(f"hx ({name}) must have a floating dtype, {dtype} like the input, "
                                      f"got {h.dtype}")
            if tuple(h.shape) != shape:
                raise ShapeError(f"hx ({name}) must have shape {shape}, got {tuple(h.shape)}")
            if h.dtype != dtype:
                raise StateDTypeError(f"hx ({name}) must have dtype {dtype} like the input, got {h.dtype}")
            if h.device != device:
                raise DeviceError(f"hx ({name}) must be on {device} like the input, got {h.device}")
        return list(hx)

    def _weights(self):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of every layer and direction, read once per call exactly
        as forward uses them (a parametrization is evaluated, a functional_call's tensors are
        seen), and their names."""
        D = 2 if self.bidirectional else 1
        weights, names = [], []
        for layer in range(self.num_layers):
            for direction in range(D):
                weights.append(self._layer_weights(layer, direction))
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                names.append([n + suffix for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                   "weight_hr")])
        return weights, names

    def _check_input(self, x_data, weights):
        """The input's dtype, features and device against the parameters (torch's order)."""
        name = type(self).__name__
        w = weights[0][0]
        if x_data.dtype != w.dtype:
            what = "dtype" if x_data.dtype in V.FLOAT_DTYPES else "a floating dtype"
            raise DTypeError(f"{name}: input must have {what} {w.dtype} like the parameters, got "
                             f"{x_data.dtype} (convert the input, or the module with .to(dtype))")
        if x_data.shape[-1] != self.input_size:
            raise ShapeError(
                f"{name}: input must have {self.input_size} features (input_size), got {x_data.shape[-1]}"
            )
        if x_data.device != w.device:
            raise DeviceError(f"input must be on {w.device} like the parameters, got {x_data.device}")

    def _check_values(self, x_data, states, weights, weight_names, user_h0):
        """The value checks, with ``check_finite`` (see the module docstring): NaN/Inf in every
        tensor forward reads (an error), and, for the GRU, an h_0 from the caller (``user_h0``: a
        tensor, not a packed state) outside [-1, 1] (a warning)."""
        if not self.check_finite:
            return
        name = type(self).__name__
        named = [("input", x_data)] + list(zip(["hx (h_0)", "hx (c_0)"], states))
        named += [(n, t) for ws, ns in zip(weights, weight_names) for n, t in zip(ns, ws)
                  if t is not None]
        h0 = states[0] if (self._n_states == 1 and user_h0) else None
        finite_msg = ("{name}: expected finite values, got NaN or Inf in {bad} (codes cannot hold "
                      "NaN; pass check_finite=False to map NaN to code 0 instead)")
        if V.values_unreadable(x_data, *states, weights[0][0]):
            # Tracing (torch.compile / export / fake tensors) or meta: no value may reach Python;
            # the checks go into the graph (the h_0 warning has no graph form and is left out).
            for n, t in named:
                torch._assert_async(torch.isfinite(t).all(), finite_msg.format(name=name, bad=n))
            return
        scan = None
        if (x_data.device.type == "cpu" and x_data.dtype in _FUSED_CPU_DTYPES
                and all(t.device.type == "cpu" for _, t in named)):
            scan = rnn_cpu.finite_scan()  # one C++ call where the layer's kernels are built
        if scan is not None:
            ok = [True] * len(named)
            first_bad = scan.first_nonfinite([t for _, t in named])
            if first_bad >= 0:
                ok = [i < first_bad or (i > first_bad and bool(V.all_finite(t)))
                      for i, (_, t) in enumerate(named)]
            if h0 is not None:
                ok.append(not bool((h0.abs() > 1).any()))
        else:
            flags = [V.all_finite(t) for _, t in named]
            if h0 is not None:
                flags.append(torch.logical_not((h0.abs() > 1).any()))
            ok = torch.stack(flags).tolist()  # one device sync for all of them
        bad = [n for (n, _), good in zip(named, ok) if not good]
        if bad:
            raise ValueError(finite_msg.format(name=name, bad=", ".join(bad)))
        if h0 is not None and not ok[-1]:
            lo, hi = (float(v) for v in torch.aminmax(h0.detach()))
            warnings.warn(
                f"{name}: hx (h_0) holds values outside [-1, 1] (in [{lo:.4g}, {hi:.4g}]): they are "
                "used as given, but h_1 = snap((1 - z) n + z h_0) lies on the tanh grid, so h_1 "
                "saturates at -1 / +1 where torch.nn.GRU's would not (and backward passes the "
                "gradient straight through that saturation). Keep h_0 in [-1, 1], e.g. a previous "
                "h_n; pass check_finite=False to skip the value checks.",
                StateRangeWarning, stacklevel=2,
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
        y = y_data.view(T, B, y_data.shape[-1])  # not -1: B may be 0
        if self.batch_first and batched:
            y = y.transpose(0, 1)
        if not batched:
            y = y.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        return y, finals

    def _state_to_tensors(self, state: PackedRNNState, dtype, weights=None):
        """Float h_0 (and c_0) of a packed state, exactly as the call that produced it left them.
        ``weights``: as :meth:`_weights` returns them (read here when not given)."""
        if weights is None:
            weights = self._weights()[0]
        mode = "LSTM" if self._n_states == 2 else "GRU"
        if state.mode != mode:
            raise TypeError(f"hx is a {state.mode} PackedRNNState, expected one for {mode}")
        if state.levels != self.levels:
            raise ValueError(f"hx has levels={state.levels}, expected levels={self.levels} like the module")
        D = 2 if self.bidirectional else 1
        if state.shape[0] != self.num_layers * D or state.shape[2] != self.hidden_size:
            raise ShapeError(f"hx holds a state of shape {tuple(state.shape)}, expected "
                             f"({self.num_layers * D}, batch, {self.hidden_size})")
        if state.device != weights[0][0].device:
            raise DeviceError(f"hx (a PackedRNNState) must be on {weights[0][0].device} like the "
                              f"parameters, got {state.device}")
        if state.h is not None:
            return (state.h.dequantize(dtype),)
        acc = codec_torch.compute_dtype(dtype)
        m = (state.o.dequantize(acc) * state.u.dequantize(acc)).to(dtype)
        if self.proj_size > 0:
            m = torch.stack([m[i] @ weights[i][4].t() for i in range(m.shape[0])])
        # c stays in the compute dtype: the layers take c_0 in any float dtype.
        return (m, state.c)

    def _pack_state(self, final_codes, c_states, info, ops, dtype):
        """PackedRNNState from each layer-direction's last-step codes [Qs, B, H] (and c)."""
        codes = torch.stack(final_codes, dim=1)  # [Qs, L*D, B, H]
        if info[0] == "packed" and info[3] is not None:
            codes = codes.index_select(2, info[3])
            c_states = [c.index_select(0, info[3]) for c in c_states] if c_states else c_states
        shape = codes.shape[1:]

        def packed(plane, kind):
            return PackedTensor(ops.pack(plane.reshape(-1), self.bits), shape, dtype, self.levels,
                                kind, self.bits)

        if self._n_states == 1:
            return PackedRNNState(h=packed(codes[0], "tanh"))
        return PackedRNNState(o=packed(codes[0], "sigmoid"), u=packed(codes[1], "tanh"),
                              c=torch.stack(c_states))

    def _empty_batch(self, x_data, states, weights, info, want_packed):
        """forward on a batch of 0 rows: torch's output shapes, zero gradients for every input."""
        D = 2 if self.bidirectional else 1
        T, dtype, device = info[2], x_data.dtype, x_data.device
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        specs = [((T * 0, D * out_size), dtype, device)] + [(tuple(s.shape), dtype, device) for s in states]
        inputs = [x_data, *states] + [t for ws in weights for t in ws if t is not None]
        y_data, *finals = _EmptyBatchFunction.apply(specs, *inputs)
        y, finals = self._restore(y_data, finals, info)
        if want_packed:
            shape = (self.num_layers * D, 0, self.hidden_size)

            def empty(kind):
                return PackedTensor(torch.zeros(0, dtype=torch.uint8, device=device), shape, dtype,
                                    self.levels, kind, self.bits)

            if self._n_states == 1:
                return y, PackedRNNState(h=empty("tanh"))
            c = torch.zeros(shape, dtype=codec_torch.compute_dtype(dtype), device=device)
            return y, PackedRNNState(o=empty("sigmoid"), u=empty("tanh"), c=c)
        return (y, tuple(finals)) if self._n_states == 2 else (y, finals[0])

    def _autocast_dtype(self, device: torch.device):
        """The dtype torch.nn.LSTM / GRU computes in under the autocast state of ``device``'s type,
        or None (autocast off, or it leaves them in float32: torch.nn.GRU on CPU). Found once per
        (device type, autocast dtype, cell) by a one-unit probe of torch's own module, so that
        this layer does what torch's does."""
        if not torch.is_autocast_enabled(device.type):
            return None
        amp = torch.get_autocast_dtype(device.type)
        key = (device.type, amp, self._n_states)
        if key not in _AUTOCAST_DTYPES:
            probe = (nn.LSTM if self._n_states == 2 else nn.GRU)(1, 1, device=device)
            x = torch.zeros(1, 1, 1, device=device)
            try:
                with torch.no_grad():
                    out_dtype = probe(x)[0].dtype
            except RuntimeError:
                # torch's module cast to the autocast dtype and then could not run in it: oneDNN's
                # bf16 LSTM needs AVX-512 (on an AVX2 CPU it cannot create its primitive). The
                # dtype is autocast's choice, which the ops below it saw.
                out_dtype = _dtype_reached(probe, x, amp)
            _AUTOCAST_DTYPES[key] = None if out_dtype == torch.float32 else out_dtype
        return _AUTOCAST_DTYPES[key]

    def forward(self, input, hx=None, *, packed_state: bool | None = None):
        """As torch.nn.LSTM/GRU's forward. ``hx`` may also be a :class:`PackedRNNState`; the final
        state is returned packed (and detached) when ``hx`` is one or ``packed_state=True``.
        Errors and value checks: see the module docstring.

        Under ``torch.autocast`` the layer computes as torch.nn.LSTM / GRU do in the same context:
        where torch's runs in the autocast dtype (LSTM on CPU and CUDA, GRU on CUDA), float32
        input, states and weights are cast to it (the casts are differentiable, so the float32
        parameters get their gradients), the matmuls run in it, the cell math and the codes in
        float32 as always, and the outputs come back in it. Where torch's stays in float32 (GRU on
        CPU), so does this layer, entirely (autocast is off inside it)."""
        if self.levels is not None and torch.jit.is_tracing():
            raise RuntimeError(_no_torchscript(self, "trace"))
        data = input.data if isinstance(input, PackedSequence) else input
        if (self.levels is not None and isinstance(data, torch.Tensor)
                and torch.amp.is_autocast_available(data.device.type)
                and torch.is_autocast_enabled(data.device.type)):
            # Autocast decides the dtype of the whole layer here, not op by op inside it.
            amp = self._autocast_dtype(data.device)
            if amp is not None:
                input, hx = _to_amp(input, amp), _to_amp(hx, amp)
            with torch.autocast(data.device.type, enabled=False):
                return self._forward(input, hx, packed_state, amp)
        return self._forward(input, hx, packed_state, None)

    def _forward(self, input, hx, packed_state, amp):
        is_packed_hx = isinstance(hx, PackedRNNState)
        want_packed = is_packed_hx if packed_state is None else bool(packed_state)
        if self.levels is None:
            if want_packed:
                raise ValueError("packed states need discrete levels; this module has levels=None")
            torch_rnn = nn.LSTM if self._n_states == 2 else nn.GRU
            return torch_rnn.forward(self, input, hx)
        weights, weight_names = self._weights()
        if amp is not None:
            weights = [[_to_amp(t, amp) for t in ws] for ws in weights]
        if is_packed_hx:
            hx = self._state_to_tensors(hx, weights[0][0].dtype, weights)
            if isinstance(input, torch.Tensor) and input.dim() == 2:
                hx = tuple(h.squeeze(1) for h in hx)
            hx = hx if self._n_states == 2 else hx[0]
        x_data, batch_sizes, hx, info = self._parse_input(input, hx)
        self._check_input(x_data, weights)
        dtype, device = x_data.dtype, x_data.device
        if is_packed_hx:
            states = list(hx)  # built by _state_to_tensors: shapes right by construction
            if states[0].shape[1] != batch_sizes[0]:
                raise ShapeError(f"hx holds a batch of {states[0].shape[1]}, the input a batch of {batch_sizes[0]}")
        else:
            states = self._initial_states(hx, batch_sizes[0], dtype, device)
        self._check_values(x_data, states, weights, weight_names,
                           user_h0=hx is not None and not is_packed_hx)
        if batch_sizes[0] == 0:
            return self._empty_batch(x_data, states, weights, info, want_packed)
        backend = resolve_backend(self.backend, device)
        ops = _step_ops(backend)
        grad = V.check_grad_mode(self.grad)  # attributes may have been changed since __init__
        cell_clip = V.check_cell_clip(self.cell_clip) if self._n_states == 2 else None
        args = (x_data, states, weights, batch_sizes, backend, grad, cell_clip)
        if compile_ops.tracing(x_data):  # torch.compile / torch.export: one custom op, see there
            layer_input, finals, final_codes, c_states = compile_ops.run_stack(self, *args)
            ops = compile_ops.TracedCodec
        else:
            layer_input, finals, final_codes, c_states = self._layers(*args,
                                                                      want_packed=want_packed)
        y, finals = self._restore(layer_input, finals, info)
        if want_packed:
            return y, self._pack_state(final_codes, c_states, info, ops, dtype)
        return (y, tuple(finals)) if self._n_states == 2 else (y, finals[0])

    def _layers(self, x_data, states, weights, batch_sizes, backend, grad, cell_clip,
                want_packed=True):
        """Every layer and direction, one autograd Function each (eager mode; while torch.compile
        or torch.export trace, ``compile_ops.run_stack`` runs them as one custom op instead) ->
        the last layer's output, the final states stacked over layers and directions, and each
        layer-direction's final-state codes and (LSTM) cell state in the compute dtype (empty
        where ``want_packed`` is False: no packed final state is built from them)."""
        ops = _step_ops(backend)
        D = 2 if self.bidirectional else 1
        finals = [[] for _ in states]
        final_codes, c_states = [], []
        layer_input, source = x_data, None
        all_cfgs = []
        for layer in range(self.num_layers):
            outputs, cfgs = [], []
            # The next layer rebuilds its input from this layer's codes in its backward (for its
            # d w_ih): keep them whenever that backward will run, even where this layer needs no
            # gradient itself (frozen lower layers, an input without requires_grad).
            following = [t for d in range(D) for t in weights[(layer + 1) * D + d]
                         ] if layer + 1 < self.num_layers else []
            following += [s[(layer + 1) * D + d] for s in states for d in range(D)] if following else []
            read_by_next = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in following)
            for direction in range(D):
                idx = layer * D + direction
                w_ih, w_hh, b_ih, b_hh, w_hr = weights[idx]
                cfg = LayerConfig(batch_sizes, self.levels, self.bits, self.chunk_size,
                                  bool(direction), ops, input_source=source, grad=grad,
                                  cell_clip=cell_clip)
                cfg.read_by_next_layer = read_by_next
                cfg.records_graph = torch.is_grad_enabled()
                cfg.keeps_final_state = want_packed
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
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=1)
            mask = None
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                mask = PackedDropoutMask(layer_input.shape, self.dropout, layer_input.device)
                layer_input = PackedDropoutFunction.apply(layer_input, mask.packed, mask)
            # The next layer rebuilds its input from these codes instead of keeping the floats.
            all_cfgs += cfgs
            source = CodedInput(cfgs, mask)
        release_output_tensors(all_cfgs)
        return layer_input, [torch.stack(f) for f in finals], final_codes, c_states


class DiscreteLSTM(_DiscreteRNNBase):
    """LSTM with discrete gates: i, f, o = discrete_sigmoid, g = discrete_tanh,
    c_t = clamp(f * c_{t-1} + i * g, -cell_clip, cell_clip), h_t = o * discrete_tanh(c_t) (times
    weight_hr when proj_size > 0).

    Guarantee: |c_t| <= cell_clip at every step (c_0 is used as given), and |o * u| <= 1, for any
    input, weights, sequence length, level count and gradient mode. Without the clamp the cell is
    unbounded: the top sigmoid level is exactly 1, so a saturated forget gate never forgets.

    Initial state: h_0 and c_0 (float tensors, or a :class:`PackedRNNState`) are used as given,
    nothing clamped: h_0 enters h_0 W_hh as it is, and c_0 may exceed cell_clip (c_1 = clamp(f c_0
    + i g) is the first bounded cell).

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
        check_finite: check values: raise ValueError on NaN/Inf in the input, h_0, c_0 or any
            weight forward uses (and, DiscreteGRU, warn on h_0 outside [-1, 1]): one device sync
            per call; under torch.compile/export a ``torch._assert_async`` in the graph, on meta
            tensors nothing. With False nothing is checked and NaN pre-activations encode as code
            0 (see the module docstring for what NaN does then).
        backend: None (Triton step kernels on CUDA, torch elsewhere), "torch" or "triton".

    ``DiscreteLSTM.from_torch(lstm, levels=...)`` builds one from a torch.nn.LSTM (configuration
    and a copy of the weights), ``to_torch()`` goes back. Errors: see the module docstring (the
    exception types are torch's where torch rejects the same mistake).

    Kept for backward per time step, batch row and hidden unit: 4 codes of ceil(log2 L) bits
    (i, f, g, o; the code of tanh(c) is rebuilt from c in backward) plus 4 / chunk_size bytes of
    cell-state checkpoint; with
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

    Args as :class:`DiscreteLSTM` (no cell_clip: h is a tanh level; proj_size only 0, as for
    torch.nn.GRU, which raises ValueError for any other). Kept for backward per time step, batch
    row and hidden unit: 4 codes (r, z, n, h) of ceil(log2 L) bits; with grad="exact" also the
    pre-activations of r, z, n (12 bytes in float32).

    Initial state: h_0 is used as given (it need not be a level): in h_0 W_hh and in
    (1 - z) n + z h_0. The state is one tanh level per unit, so h_1 = snap((1 - z) n + z h_0), as
    every step, lies on the grid of [-1, 1]: where h_0 lies outside [-1, 1] that snap saturates at
    -1 / +1 where torch.nn.GRU's h_1 would not, and backward passes the gradient straight through
    it. So h_0 belongs in [-1, 1] (h_n of a previous call always is); with ``check_finite=True``
    (the default) an h_0 outside it gives a ``StateRangeWarning`` naming hx, the range and the
    values found. A PackedRNNState holds levels only.
    """

    _mode = "GRU"
    _n_states = 1

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, levels=256, **kwargs):
        proj_size = kwargs.pop("proj_size", 0)
        if isinstance(proj_size, bool) or proj_size != 0:
            # torch.nn.GRU: ValueError "proj_size argument is only supported for LSTM, not RNN or GRU"
            raise ValueError(f"DiscreteGRU: proj_size must be 0 (a projection is only supported for "
                             f"LSTM, as in torch.nn.GRU), got proj_size={proj_size!r}")
        if "cell_clip" in kwargs:
            raise TypeError("DiscreteGRU has no cell_clip: its state h is a tanh level, in [-1, 1] "
                            "by construction")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, levels, **kwargs)
