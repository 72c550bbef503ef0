"""DiscreteLSTM / DiscreteGRU under torch.compile and torch.export: a whole stack of layers as two
torch custom ops, ``discrnn::rnn_stack`` (forward) and ``discrnn::rnn_stack_backward`` (its
gradient, registered with ``torch.library.register_autograd``).

While torch.compile or torch.export trace a module (or make_fx / FakeTensor tracing runs it; see
:func:`tracing`), the modules' forward (``_DiscreteRNNBase._forward``) hands every layer and
direction to ``rnn_stack`` instead of applying the per-layer autograd Functions itself. Dynamo and
AOTAutograd then see one opaque node with a fake implementation for shapes and dtypes, not the
Python step loop, so ``torch.compile(model, fullgraph=True)`` traces and inductor leaves the layer
alone (it calls the op, as it calls any fallback kernel).

Inputs and outputs are plain tensors, ints, floats, bools and strings:

* ``x`` [N, I] (the packed-data rows of the input, see ``discrnn.rnn_function``); ``states``: h_0
  [L*D, B, P] (and c_0 [L*D, B, H] for the LSTM); ``weights``: each layer and direction's w_ih,
  w_hh, then b_ih, b_hh (``bias``) and w_hr (``proj``), flat; ``masks``: the packed 1-bit dropout
  masks between layers (drawn by the caller, so the op itself is deterministic);
* the configuration: ``cell`` ("lstm" / "gru"), the ``batch_sizes`` of the time steps, ``levels``,
  ``bits``, ``chunk_size``, ``num_layers``, ``bidirectional``, ``grad``, ``cell_clip``, ``dropout``,
  ``backend`` ("torch" / "triton") and ``keep`` (keep codes for backward);
* out: y [N, D*P]; ``finals``: h_n [L*D, B, P] (LSTM: also c_n [L*D, B, H] and c in the compute
  dtype, for a packed state); ``final_codes`` [Qs, L*D, B, H] uint8 (the codes of a packed final
  state); ``saved``: per layer and direction the uint8 code buffer, with ``grad="exact"`` the
  pre-activations, and (LSTM) the cell-state checkpoints stacked [n, B, H]. Nothing else is kept
  for backward but the op's inputs, so the memory is eager mode's.

Both ops run the eager code, so their results are eager mode's, bit for bit (tested, also under
inductor): ``rnn_stack`` calls ``LSTMLayerFunction.forward`` / ``GRULayerFunction.forward`` (and
``PackedDropoutFunction``) with a stand-in ctx (:class:`_Ctx`) and returns what they saved;
``rnn_stack_backward`` rebuilds what forward left in each ctx (layer configs, code stores, the coded
inputs of inner layers) from its arguments and calls the Functions' ``backward`` from the top layer
down, as autograd would. Either backend ("torch", "triton") runs inside. The fake implementations
compute shapes only (the batch sizes may be symbolic); ``torch.library.opcheck`` in
tests/test_compile.py holds them to the real ops. ``discrnn::pack`` (``codec_torch.torch_pack``)
packs the dropout masks and a packed final state while tracing.

Why only while tracing, and not always: eager mode keeps the autograd Functions because
``backward(create_graph=True)`` (double backward) goes through each Function's
``rnn_function.create_graph_backward``, which an op's backward cannot do, and because an op buys
nothing without a graph. Limits under tracing: no double backward (torch.compile has none anyway);
the number of time steps is specialised (a new T traces again; a new batch size is symbolic after
the first change); a ``PackedSequence`` input graph-breaks on its batch sizes before the op (no
``fullgraph``); ``torch.compile(..., dynamic=True)`` of a DiscreteLSTM stops at the cell_clip check,
which dynamo then sees as a symbolic float (``torch._dynamo.config.specialize_float = True`` avoids
it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .gru_function import GRULayerFunction, _gru_output_rows_fn, _gru_output_rows_fn_tables
from .kernels import codec_torch, rnn_torch
from .kernels.codec_torch import compute_dtype
from .lstm_function import LSTMLayerFunction, _lstm_output_rows_fn, _lstm_output_rows_fn_tables
from .rnn_function import (
    CodedInput,
    CodeStore,
    LayerConfig,
    PackedDropoutFunction,
    PackedDropoutMask,
    keep_input,
)

__all__ = ["tracing", "run_stack"]

LSTM, GRU = "lstm", "gru"


def tracing(*tensors: Tensor) -> bool:
    """True while torch.compile or torch.export trace (``torch.compiler.is_compiling()``), under
    make_fx's proxy tracing (non-strict export, AOTAutograd) and for FakeTensors: then the layers run
    as the custom ops of this module. False in eager mode (also on meta tensors)."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None or any(is_fake(t) for t in tensors)


class _Ctx:
    """What the layer Functions' forward and backward use of an autograd ctx."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors = ()

    def set_materialize_grads(self, value):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


class _GivenMask(PackedDropoutMask):
    """A :class:`PackedDropoutMask` around bits drawn before (an input of the op)."""

    def __init__(self, packed: Tensor, shape, p: float):
        self.c = shape[1]
        self.cols = -(-self.c // 8) * 8
        self.scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
        self.packed = packed


class _Stack:
    """The static configuration of one op call, and what follows from it."""

    def __init__(self, cell, batch_sizes, levels, bits, chunk_size, num_layers, bidirectional,
                 bias, proj, grad, cell_clip, dropout, backend):
        from .rnn import _step_ops  # (rnn imports this module)

        if cell not in (LSTM, GRU):
            raise ValueError(f"cell must be {LSTM!r} or {GRU!r}, got {cell!r}")
        self.lstm = cell == LSTM
        self.batch_sizes, self.chunk = list(batch_sizes), chunk_size
        self.levels, self.bits = levels, bits
        self.num_layers, self.D = num_layers, 2 if bidirectional else 1
        self.bias, self.proj, self.grad, self.dropout = bias, proj, grad, dropout
        self.cell_clip = cell_clip if self.lstm else None  # as the module passes it
        self.ops = _step_ops(backend)
        self.n_weights = 2 + 2 * bias + proj  # per layer and direction
        n_steps = len(self.batch_sizes)
        self.n_checkpoints = -(-n_steps // chunk_size) - 1 if self.lstm else 0

    def layer_weights(self, weights, idx):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of layer-direction ``idx``, None where absent."""
        ws = list(weights[idx * self.n_weights : (idx + 1) * self.n_weights])
        w_ih, w_hh = ws[:2]
        b_ih, b_hh = (ws[2], ws[3]) if self.bias else (None, None)
        w_hr = ws[-1] if self.proj else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def config(self, direction, source):
        return LayerConfig(self.batch_sizes, self.levels, self.bits, self.chunk, bool(direction),
                           self.ops, input_source=source, grad=self.grad, cell_clip=self.cell_clip)

    def function_inputs(self, states, weights, idx):
        """The Function's inputs after x (h_0, c_0 and weights as the module passes them)."""
        w_ih, w_hh, b_ih, b_hh, w_hr = self.layer_weights(weights, idx)
        if self.lstm:
            b = b_ih + b_hh if self.bias else None
            return [states[0][idx], states[1][idx], w_ih, w_hh, b, w_hr]
        return [states[0][idx], w_ih, w_hh, b_ih, b_hh]

    def mask(self, masks, layer, shape):
        if masks and layer < self.num_layers - 1:
            return _GivenMask(masks[layer], shape, self.dropout)
        return None


def _function(spec):
    return LSTMLayerFunction if spec.lstm else GRULayerFunction


def _saved_order(spec, inputs):
    """The tensors a layer Function saves after its input (see its forward), as this module
    reads them: the Function's own inputs but x, in the order :meth:`_Stack.function_inputs` gives
    (LSTM: h_0, c_0, w_ih, w_hh, w_hr, b; GRU: h_0, w_ih, w_hh, b_ih, b_hh)."""
    if spec.lstm:
        h0, c0, w_ih, w_hh, b, w_hr = inputs
        return [h0, c0, w_ih, w_hh, w_hr, b]
    return list(inputs)


def _new_saved(spec, ctx, inputs) -> list:
    """What a layer Function saved that is not an input of the op: the code buffer, the
    pre-activations (grad="exact") and the LSTM's cell-state checkpoints, stacked [n, B, H] (padded
    to B rows where the batch shrinks: readers take the rows they need)."""
    rest = ctx.saved_tensors[ctx.n_kept :]
    expected = _saved_order(spec, inputs)
    n = len(expected)
    # then the code buffer, the pre-activations (or None) and the checkpoints
    if len(rest) != n + 2 + spec.n_checkpoints or any(a is not b for a, b in zip(rest, expected)):
        raise RuntimeError(
            "discrnn.compile_ops: the layer Function saves other tensors than this module expects; "
            "update compile_ops._saved_order / _new_saved with the Function's forward"
        )
    codes, preact, *checkpoints = rest[n:]
    saved = [codes]
    if spec.grad == "exact":
        saved.append(preact)
    if spec.lstm:
        B, H = inputs[1].shape
        stacked = torch.zeros(spec.n_checkpoints, B, H, dtype=compute_dtype(inputs[0].dtype),
                              device=codes.device)
        for k, c in enumerate(checkpoints):
            stacked[k, : c.shape[0]] = c
        saved.append(stacked)
    return saved


def _stack_forward(x, states, weights, masks, spec, keep):
    """The module's layer loop (``_DiscreteRNNBase._layers``) with stand-in ctxs: -> y, finals,
    final_codes, saved (see the module docstring)."""
    D, fn = spec.D, _function(spec)
    finals = [[] for _ in range(3 if spec.lstm else 1)]
    final_codes, saved = [], []
    layer_input, source = x, None
    for layer in range(spec.num_layers):
        outputs, cfgs = [], []
        for direction in range(D):
            idx = layer * D + direction
            cfg = spec.config(direction, source)
            inputs = spec.function_inputs(states, weights, idx)
            ctx = _Ctx([keep] * (len(inputs) + 2))  # keep: codes are kept (any input needs a grad)
            out = fn.forward(ctx, layer_input, *inputs, cfg)
            finals[0].append(out[1])
            if spec.lstm:
                finals[1].append(out[2])
                finals[2].append(out[5])
            final_codes.append(out[4] if spec.lstm else out[3])
            outputs.append(out[0])
            cfgs.append(cfg)
            if keep:
                saved += _new_saved(spec, ctx, inputs)
        layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=1)
        mask = spec.mask(masks, layer, layer_input.shape)
        if mask is not None:
            layer_input = PackedDropoutFunction.forward(_Ctx(()), layer_input, mask.packed, mask)
        source = CodedInput(cfgs, mask)
    return layer_input, [torch.stack(f) for f in finals], torch.stack(final_codes, dim=1), saved


def _rebuild_ctxs(x, states, weights, masks, saved, spec, needs):
    """Per layer, per direction (ctx, inputs) as each Function's forward left them, rebuilt from the
    op's arguments; per layer the dropout mask after it (or None)."""
    D, lstm = spec.D, spec.lstm
    dtype, device = x.dtype, x.device
    needs_x, needs_states = needs[0], needs[1 : 1 + len(states)]
    needs_weights = needs[1 + len(states) :]
    pos = 0
    layers, layer_masks = [], []
    source, upstream = None, needs_x  # upstream: something below this layer needs a gradient
    in_shape = x.shape
    for layer in range(spec.num_layers):
        cfgs, entries = [], []
        for direction in range(D):
            idx = layer * D + direction
            cfg = spec.config(direction, source)
            inputs = spec.function_inputs(states, weights, idx)
            w_ih, w_hh, _, _, w_hr = spec.layer_weights(weights, idx)
            codes = saved[pos]
            preact = saved[pos + 1] if spec.grad == "exact" else None
            pos += 2 if spec.grad == "exact" else 1
            checkpoints = []
            if lstm:
                checkpoints = list(saved[pos].unbind(0))
                pos += 1
            # What the Function's forward sets on the config (the layer's code store, and how a
            # next layer rebuilds this layer's outputs from its codes), as it sets them.
            if lstm:
                hidden = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
                cfg.store = CodeStore(cfg.layout, rnn_torch.LSTM_CODES, hidden, spec.bits, device,
                                      spec.ops)
                cfg.output_rows = (
                    _lstm_output_rows_fn_tables(cfg, cfg.store, dtype, w_hr)
                    if cfg.chunked else
                    _lstm_output_rows_fn(cfg, cfg.store, spec.ops, spec.levels, dtype, w_hr))
                cfg.output_tensors = [codes, inputs[1].detach(), *checkpoints]
            else:
                cfg.store = CodeStore(cfg.layout, rnn_torch.GRU_CODES, w_hh.shape[1], spec.bits,
                                      device, spec.ops)
                cfg.output_rows = (
                    _gru_output_rows_fn_tables(cfg.store, cfg.table_cache, dtype)
                    if cfg.chunked else
                    _gru_output_rows_fn(cfg.store, spec.ops, spec.levels, dtype))
                cfg.output_tensors = [codes]
            w_slice = needs_weights[idx * spec.n_weights : (idx + 1) * spec.n_weights]
            # Backward reads needs_input_grad[0] only (whether to compute dx).
            ctx = _Ctx([upstream] + [True] * len(inputs) + [False])
            ctx.run = upstream or any(needs_states) or any(w_slice)  # autograd would call backward
            ctx.cfg = cfg
            ctx.has_bias = spec.bias
            x_in = x if source is None else x.new_empty(()).expand(in_shape[0], in_shape[1])
            kept = keep_input(ctx, x_in, cfg)
            ctx.saved_tensors = (*kept, *_saved_order(spec, inputs), codes, preact, *checkpoints)
            entries.append((ctx, inputs))
            cfgs.append(cfg)
        upstream = upstream or any(needs_states) or any(
            needs_weights[layer * D * spec.n_weights : (layer + 1) * D * spec.n_weights])
        in_shape = (x.shape[0], D * weights[1].shape[1])  # w_hh: [G * H, P]
        mask = spec.mask(masks, layer, in_shape)
        layers.append(entries)
        layer_masks.append(mask)
        source = CodedInput(cfgs, mask)
    return layers, layer_masks


def _stack_backward(x, states, weights, masks, saved, dy, dstates, spec, needs):
    """The gradients of :func:`_stack_forward`: [dx, d states..., d weights...] (an empty tensor
    where ``needs`` is False), the layer Functions' backward called from the top layer down."""
    layers, layer_masks = _rebuild_ctxs(x, states, weights, masks, saved, spec, needs)
    D, fn = spec.D, _function(spec)
    n_states = len(states)
    d_states = [[None] * (spec.num_layers * D) for _ in range(n_states)]
    d_weights = [None] * len(weights)
    d_input = dy  # the gradient of the current layer's output (the op's y for the top layer)
    for layer in range(spec.num_layers - 1, -1, -1):
        entries = layers[layer]
        if layer < spec.num_layers - 1 and layer_masks[layer] is not None and d_input is not None:
            ctx = _Ctx(())
            ctx.mask = layer_masks[layer]
            ctx.saved_tensors = (layer_masks[layer].packed,)
            d_input = PackedDropoutFunction.backward(ctx, d_input)[0]
        width = None if d_input is None else d_input.shape[1] // D
        dx = None
        for direction in range(D - 1, -1, -1):  # as autograd: the later Function first
            idx = layer * D + direction
            ctx, inputs = entries[direction]
            if not ctx.run:
                continue
            d_y = d_input  # and as torch.cat's backward, a slice per direction
            if d_input is not None and D > 1:
                d_y = d_input.narrow(1, direction * width, width)
            d_finals = [None if d is None else d[idx] for d in dstates]
            extra = (None, None, None) if spec.lstm else (None, None)  # codes, final codes (, c)
            grads = fn.backward(ctx, d_y, *d_finals, *extra)
            if grads[0] is not None:
                dx = grads[0] if dx is None else dx + grads[0]
            for k in range(n_states):
                d_states[k][idx] = grads[1 + k]
            w_grads = grads[1 + n_states : -1]
            if spec.lstm:  # (w_ih, w_hh, b, w_hr): b = b_ih + b_hh passes d_b to both
                d_w_ih, d_w_hh, d_b, d_w_hr = w_grads
                w_grads = [d_w_ih, d_w_hh] + ([d_b, d_b.clone()] if spec.bias else [])
                w_grads += [d_w_hr] if spec.proj else []
            else:  # (w_ih, w_hh, b_ih, b_hh)
                w_grads = list(w_grads if spec.bias else w_grads[:2])
            d_weights[idx * spec.n_weights : (idx + 1) * spec.n_weights] = w_grads
        d_input = dx
    out = [d_input if needs[0] and d_input is not None else None]
    for k in range(n_states):
        per = d_states[k]
        out.append(None if not needs[1 + k] or any(g is None for g in per) else torch.stack(per))
    out += [g if need else None for g, need in zip(d_weights, needs[1 + n_states :])]
    return [x.new_empty(0) if g is None else g for g in out]  # outputs may not alias each other


# -- the ops ---------------------------------------------------------------------------------------


@torch.library.custom_op("discrnn::pack", mutates_args=())
def pack(codes: Tensor, bits: int) -> Tensor:
    """``codec_torch.torch_pack`` (codes -> ceil(n * bits / 8) bytes) as an op: dynamo cannot trace
    its int64 view of the codes. For the dropout masks and the packed final state while tracing."""
    return codec_torch.torch_pack(codes, bits)


@pack.register_fake
def _(codes, bits):
    return codes.new_empty((codes.numel() * bits + 7) // 8, dtype=torch.uint8)


class TracedCodec:
    """The codec of ``_DiscreteRNNBase._pack_state`` while tracing (the op above; the same bytes as
    either backend's codec)."""

    pack = staticmethod(lambda codes, bits: torch.ops.discrnn.pack(codes, bits))


@torch.library.custom_op("discrnn::rnn_stack", mutates_args=())
def rnn_stack(
    x: Tensor, states: list[Tensor], weights: list[Tensor], masks: list[Tensor], cell: str,
    batch_sizes: list[int], levels: int, bits: int, chunk_size: int, num_layers: int,
    bidirectional: bool, bias: bool, proj: bool, grad: str, cell_clip: float, dropout: float,
    backend: str, keep: bool,
) -> tuple[Tensor, list[Tensor], Tensor, list[Tensor]]:
    """All layers and directions of a DiscreteLSTM / DiscreteGRU: -> y, finals, final_codes, saved
    (see the module docstring)."""
    spec = _Stack(cell, batch_sizes, levels, bits, chunk_size, num_layers, bidirectional, bias, proj,
                  grad, cell_clip, dropout, backend)
    with torch.no_grad():
        return _stack_forward(x, states, weights, masks, spec, keep)


@rnn_stack.register_fake
def _(x, states, weights, masks, cell, batch_sizes, levels, bits, chunk_size, num_layers,
      bidirectional, bias, proj, grad, cell_clip, dropout, backend, keep):
    # Shapes only (batch sizes may be symbolic); opcheck's test_faketensor holds them to the real op.
    spec = _Stack(cell, batch_sizes, levels, bits, chunk_size, num_layers, bidirectional, bias, proj,
                  grad, cell_clip, dropout, "torch")
    rows, (LD, B, P) = x.shape[0], states[0].shape
    G, Q = (4, rnn_torch.LSTM_CODES) if spec.lstm else (3, rnn_torch.GRU_CODES)
    H = weights[1].shape[0] // G  # w_hh: [G * H, P]
    acc = compute_dtype(x.dtype)
    y = x.new_empty(rows, spec.D * P)
    finals = [x.new_empty(LD, B, P)]
    if spec.lstm:
        finals += [x.new_empty(LD, B, H), x.new_empty(LD, B, H, dtype=acc)]
    final_codes = x.new_empty(2 if spec.lstm else 1, LD, B, H, dtype=torch.uint8)
    saved = []
    if keep:
        store = CodeStore(spec.config(0, None).layout, Q, H, bits, x.device, spec.ops)
        for _ in range(LD):
            saved.append(x.new_empty(store.nbytes, dtype=torch.uint8))
            if spec.grad == "exact":
                saved.append(x.new_empty(rows, G * H, dtype=acc))
            if spec.lstm:
                saved.append(x.new_empty(spec.n_checkpoints, B, H, dtype=acc))
    return y, finals, final_codes, saved


@torch.library.custom_op("discrnn::rnn_stack_backward", mutates_args=())
def rnn_stack_backward(
    x: Tensor, states: list[Tensor], weights: list[Tensor], masks: list[Tensor],
    saved: list[Tensor], dy: Optional[Tensor], dstates: list[Optional[Tensor]], cell: str,
    batch_sizes: list[int], levels: int, bits: int, chunk_size: int, num_layers: int,
    bidirectional: bool, bias: bool, proj: bool, grad: str, cell_clip: float, dropout: float,
    backend: str, needs_input_grad: list[bool],
) -> list[Tensor]:
    """The gradients of :func:`rnn_stack` (``saved``: its last output; ``dy``, ``dstates``: the
    gradients of y and h_n (, c_n)): [dx, d states..., d weights...], each an empty tensor where
    ``needs_input_grad`` (x, states, weights) is False."""
    spec = _Stack(cell, batch_sizes, levels, bits, chunk_size, num_layers, bidirectional, bias, proj,
                  grad, cell_clip, dropout, backend)
    with torch.no_grad():
        return _stack_backward(x, states, weights, masks, saved, dy, dstates, spec, needs_input_grad)


@rnn_stack_backward.register_fake
def _(x, states, weights, masks, saved, dy, dstates, cell, batch_sizes, levels, bits, chunk_size,
      num_layers, bidirectional, bias, proj, grad, cell_clip, dropout, backend, needs_input_grad):
    # Each gradient has its input's shape, dtype and layout.
    return [torch.empty_like(t) if need else x.new_empty(0)
            for t, need in zip([x, *states, *weights], needs_input_grad, strict=True)]


def _setup_context(ctx, inputs, output):
    x, states, weights, masks, *config = inputs
    _, finals, final_codes, saved = output
    ctx.config = config  # cell .. keep
    ctx.counts = (len(states), len(weights), len(masks))
    ctx.save_for_backward(x, *states, *weights, *masks, *saved)
    # the codes, the pre-activations and checkpoints, and the LSTM's c for a packed state
    ctx.mark_non_differentiable(final_codes, *saved, *finals[2:])


def _backward(ctx, dy, dfinals, _final_codes, _saved):
    n_states, n_weights, n_masks = ctx.counts
    tensors = list(ctx.saved_tensors)
    x, tensors = tensors[0], tensors[1:]
    states, tensors = tensors[:n_states], tensors[n_states:]
    weights, tensors = tensors[:n_weights], tensors[n_weights:]
    masks, saved = tensors[:n_masks], tensors[n_masks:]
    *config, keep = ctx.config
    if not keep:
        raise RuntimeError("discrnn::rnn_stack ran with keep=False (no input needed a gradient "
                           "when it was traced), so it kept nothing to differentiate")
    need_x, need_states, need_weights = ctx.needs_input_grad[:3]
    needs = [bool(need_x), *map(bool, need_states), *map(bool, need_weights)]
    grads = torch.ops.discrnn.rnn_stack_backward(
        x, states, weights, masks, saved, dy, list(dfinals[:n_states]), *config, needs
    )

    def pick(g, need):
        return g if need else None

    return (
        pick(grads[0], needs[0]),
        [pick(g, n) for g, n in zip(grads[1 : 1 + n_states], needs[1 : 1 + n_states])],
        [pick(g, n) for g, n in zip(grads[1 + n_states :], needs[1 + n_states :])],
        [None] * n_masks,
        *([None] * (len(config) + 1)),
    )


rnn_stack.register_autograd(_backward, setup_context=_setup_context)


def run_stack(module, x, states, weights, batch_sizes, backend, grad, cell_clip):
    """``module``'s layers (``_DiscreteRNNBase._layers``) as :func:`rnn_stack`, with the arguments
    of ``_layers``: -> the layers' output y, finals (h_n [, c_n] stacked over layers and
    directions), the final-state codes and (LSTM) c of each layer and direction."""
    lstm = module._n_states == 2
    flat = [t for ws in weights for t in ws if t is not None]
    D = 2 if module.bidirectional else 1
    masks = []
    if module.dropout > 0 and module.training:
        # Drawn here as PackedDropoutMask draws them in the eager loop, in the same order (nothing
        # else draws in between), packed by the op below (dynamo cannot trace torch_pack).
        out_size = module.proj_size if module.proj_size > 0 else module.hidden_size
        cols = -(-D * out_size // 8) * 8
        for _ in range(module.num_layers - 1):
            keep_bits = torch.empty(x.shape[0], cols, device=x.device)
            keep_bits.bernoulli_(1.0 - module.dropout)
            masks.append(torch.ops.discrnn.pack(keep_bits.to(torch.uint8), 1))
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in [x, *states, *flat])
    y, finals, final_codes, _ = torch.ops.discrnn.rnn_stack(
        x, list(states), flat, masks, LSTM if lstm else GRU, list(batch_sizes),
        module.levels, module.bits, module.chunk_size, module.num_layers, module.bidirectional,
        module.bias, module.proj_size > 0, grad, math.inf if cell_clip is None else cell_clip,
        float(module.dropout), backend, keep,
    )
    c_states = list(finals[2].unbind(0)) if lstm else []
    return y, finals[: module._n_states], list(final_codes.unbind(1)), c_states
