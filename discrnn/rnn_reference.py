"""Plain-autograd references of the discrete LSTM and GRU cells: the test oracle.

Written step by step with the public discrete units, on padded [T, B, I] input, one direction, one
layer. ``grad`` is the gates' straight-through rule (as the layers' ``grad``); the LSTM's cell output
u = discrete_tanh(c) always uses tanh'(c) (``grad="exact"``: the layers rebuild c in backward).
Slow and memory-hungry on purpose: autograd keeps everything, and every gradient comes from autograd.
"""

from __future__ import annotations

import math

import torch

from .units import discrete_sigmoid, discrete_tanh


def _units(levels, grad="code"):
    if levels is None:
        return torch.sigmoid, torch.tanh
    return (
        lambda v: discrete_sigmoid(v, levels, grad=grad, backend="torch"),
        lambda v: discrete_tanh(v, levels, grad=grad, backend="torch"),
    )


class _SnapStraightThrough(torch.autograd.Function):
    """Round a value of [-1, 1] to the tanh level grid; identity gradient."""

    @staticmethod
    def forward(ctx, v, levels):
        from .kernels.codec_torch import torch_decode, torch_encode

        return torch_decode(torch_encode(v, levels, "tanh"), levels, "tanh", v.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reference_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, levels, reverse=False,
                         grad="code", cell_clip=math.inf):
    """x [T, B, I], h0 [B, P or H], c0 [B, H] -> (y [T, B, P or H], h_T, c_T). With discrete
    levels, c_t = clamp(f c_{t-1} + i g, -cell_clip, cell_clip) (torch.clamp's gradient)."""
    sig, tanh = _units(levels, grad)
    cell_tanh = _units(levels, "exact")[1]
    H = w_hh.shape[0] // 4
    h, c, ys = h0, c0, []
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        gates = x[t] @ w_ih.t() + h @ w_hh.t()
        if b_ih is not None:
            gates = gates + b_ih + b_hh
        i, f = sig(gates[:, :H]), sig(gates[:, H : 2 * H])
        g, o = tanh(gates[:, 2 * H : 3 * H]), sig(gates[:, 3 * H :])
        c = f * c + i * g
        if levels is not None:
            c = c.clamp(-cell_clip, cell_clip)
        h = o * cell_tanh(c)
        if w_hr is not None:
            h = h @ w_hr.t()
        ys.append(h)
    if reverse:
        ys.reverse()
    return torch.stack(ys), h, c


def reference_gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, levels, reverse=False, grad="code"):
    """x [T, B, I], h0 [B, H] -> (y [T, B, H], h_T)."""
    sig, tanh = _units(levels, grad)
    H = w_hh.shape[0] // 3
    h, ys = h0, []
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        gx = x[t] @ w_ih.t()
        gh = h @ w_hh.t()
        if b_ih is not None:
            gx, gh = gx + b_ih, gh + b_hh
        r = sig(gx[:, :H] + gh[:, :H])
        z = sig(gx[:, H : 2 * H] + gh[:, H : 2 * H])
        n = tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
        h = (1 - z) * n + z * h
        if levels is not None:
            h = _SnapStraightThrough.apply(h, levels)
        ys.append(h)
    if reverse:
        ys.reverse()
    return torch.stack(ys), h


def reference_packed_layer(cell, x_data, batch_sizes, reverse, states, weights, levels,
                           grad="code", cell_clip=math.inf):
    """The reference cell math over torch's packed layout, as one layer Function sees it: x_data
    [N, I] with the rows of step t at their offsets, batch sizes never growing with t, steps taken
    in processing order (T-1..0 when ``reverse``). ``cell`` "lstm": states (h0, c0), weights
    (w_ih, w_hh, b, w_hr) with b = b_ih + b_hh or None; "gru": states (h0,), weights (w_ih, w_hh,
    b_ih, b_hh). -> (y_data [N, P or H], final states, each [B, ...]: a row's state after its last
    step). Every operation is differentiable: the layers' backward with ``create_graph=True``."""
    from .rnn_function import SequenceLayout, finish_rows, step_input

    layout = SequenceLayout(list(batch_sizes), reverse)
    sig, tanh = _units(levels, grad)
    cell_tanh = _units(levels, "exact")[1]
    finish = finish_rows(layout)
    ys, pieces = [None] * len(batch_sizes), [[] for _ in states]
    current, prev_bs = [None] * len(states), 0
    for s, t in enumerate(layout.order):
        bs = batch_sizes[t]
        current = [step_input(p, prev_bs, bs, init) for p, init in zip(current, states)]
        xt = x_data[layout.rows(t)]
        if cell == "lstm":
            w_ih, w_hh, b, w_hr = weights
            h, c = current
            H = w_hh.shape[0] // 4
            gates = xt @ w_ih.t() + h @ w_hh.t()
            if b is not None:
                gates = gates + b
            i, f = sig(gates[:, :H]), sig(gates[:, H : 2 * H])
            g, o = tanh(gates[:, 2 * H : 3 * H]), sig(gates[:, 3 * H :])
            c = (f * c + i * g).clamp(-cell_clip, cell_clip)
            h = o * cell_tanh(c)
            if w_hr is not None:
                h = h @ w_hr.t()
            current = [h, c]
        else:
            w_ih, w_hh, b_ih, b_hh = weights
            (h,) = current
            H = w_hh.shape[0] // 3
            gx, gh = xt @ w_ih.t(), h @ w_hh.t()
            if b_ih is not None:
                gx, gh = gx + b_ih, gh + b_hh
            r = sig(gx[:, :H] + gh[:, :H])
            z = sig(gx[:, H : 2 * H] + gh[:, H : 2 * H])
            n = tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :])
            current = [_SnapStraightThrough.apply((1 - z) * n + z * h, levels)]
        ys[t] = current[0]
        if finish[s] < bs:
            for piece, state in zip(pieces, current):
                piece.append((finish[s], state[finish[s] : bs]))
        prev_bs = bs
    finals = [torch.cat([p for _, p in sorted(piece, key=lambda item: item[0])]) for piece in pieces]
    return torch.cat(ys), finals
