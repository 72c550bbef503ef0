"""Pure-torch step math of the discrete LSTM and GRU cells: the reference for the Triton step kernels
and the backend for every non-CUDA device.

Shapes: ``bs`` active rows, ``H`` hidden units. Gate pre-activations come in torch's gate order
(LSTM: i, f, g, o; GRU: r, z, n). Math runs in the compute dtype (float64 for float64, else float32).

What one step keeps for backward is the level codes, as uint8 ``[Q, bs, H]``:

* LSTM, Q = 5: i, f, g, o and u = discrete_tanh(c_t). h_t = o * u (a product of two levels).
* GRU, Q = 4: r, z, n and h_t itself (the GRU state is one code per unit).

Straight-through derivatives come from the codes alone (``torch_code_derivative``: the mean of f'
over the level's bin), as in ``discrete_*(..., grad="code")``.
"""

from __future__ import annotations

import torch

from .codec_torch import torch_code_derivative, torch_decode, torch_encode

LSTM_CODES = 5  # i, f, g, o, u
GRU_CODES = 4  # r, z, n, h

_SIG, _TANH = "sigmoid", "tanh"
_LSTM_KINDS = (_SIG, _SIG, _TANH, _SIG, _TANH)
_GRU_KINDS = (_SIG, _SIG, _TANH, _TANH)


def lstm_step_forward(gates: torch.Tensor, c_prev: torch.Tensor, levels: int):
    """gates [bs, 4H] (pre-activations, bias included), c_prev [bs, H] (compute dtype) ->
    codes [5, bs, H] uint8, c [bs, H], m = o * u [bs, H] (compute dtype)."""
    acc = c_prev.dtype
    pre = gates.to(acc)
    H = c_prev.shape[1]
    codes = torch.empty(LSTM_CODES, *c_prev.shape, dtype=torch.uint8, device=c_prev.device)
    for q in range(4):
        z = pre[:, q * H : (q + 1) * H]
        kind = _LSTM_KINDS[q]
        codes[q] = torch_encode(torch.tanh(z) if kind == _TANH else torch.sigmoid(z), levels, kind)
    i, f, g, o = (torch_decode(codes[q], levels, _LSTM_KINDS[q], acc) for q in range(4))
    c = f * c_prev + i * g
    codes[4] = torch_encode(torch.tanh(c), levels, _TANH)
    m = o * torch_decode(codes[4], levels, _TANH, acc)
    return codes, c, m


def lstm_recompute_cell(codes: torch.Tensor, c_prev: torch.Tensor, levels: int) -> torch.Tensor:
    """c_t from the saved i, f, g codes and c_{t-1}: the same arithmetic as the forward step."""
    acc = c_prev.dtype
    i, f, g = (torch_decode(codes[q], levels, _LSTM_KINDS[q], acc) for q in range(3))
    return f * c_prev + i * g


def lstm_output(codes: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """m = o * u from the saved codes (the unprojected h_t)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch_decode(codes[3], levels, _SIG, acc) * torch_decode(codes[4], levels, _TANH, acc)).to(dtype)


def lstm_step_backward(
    codes: torch.Tensor, c_prev: torch.Tensor, dm: torch.Tensor, dc: torch.Tensor, levels: int
):
    """Backward of one step. dm = dL/dm_t [bs, H], dc = dL/dc_t from step t+1 [bs, H] ->
    dgates [bs, 4H] (pre-activation gradients, gate order i, f, g, o), dc_prev [bs, H]."""
    acc = c_prev.dtype
    dm = dm.to(acc)
    i, f, g, o, u = (torch_decode(codes[q], levels, _LSTM_KINDS[q], acc) for q in range(5))
    d = [torch_code_derivative(codes[q], levels, _LSTM_KINDS[q], acc) for q in range(5)]
    dc = dc + dm * o * d[4]
    dgates = torch.cat(
        [dc * g * d[0], dc * c_prev * d[1], dc * i * d[2], dm * u * d[3]], dim=1
    )
    return dgates, dc * f


def gru_step_forward(gx: torch.Tensor, gh: torch.Tensor, h_prev: torch.Tensor, levels: int):
    """gx = x W_ih^T + b_ih [bs, 3H], gh = h W_hh^T + b_hh [bs, 3H], h_prev [bs, H] ->
    codes [4, bs, H] uint8 and h [bs, H] (compute dtype; exactly the level of codes[3])."""
    acc = torch.float64 if h_prev.dtype == torch.float64 else torch.float32
    gx, gh, h_prev = gx.to(acc), gh.to(acc), h_prev.to(acc)
    H = h_prev.shape[1]
    codes = torch.empty(GRU_CODES, *h_prev.shape, dtype=torch.uint8, device=h_prev.device)
    codes[0] = torch_encode(torch.sigmoid(gx[:, :H] + gh[:, :H]), levels, _SIG)
    codes[1] = torch_encode(torch.sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H]), levels, _SIG)
    r = torch_decode(codes[0], levels, _SIG, acc)
    z = torch_decode(codes[1], levels, _SIG, acc)
    codes[2] = torch_encode(torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :]), levels, _TANH)
    n = torch_decode(codes[2], levels, _TANH, acc)
    codes[3] = torch_encode((1.0 - z) * n + z * h_prev, levels, _TANH)  # snap to the tanh grid
    return codes, torch_decode(codes[3], levels, _TANH, acc)


def gru_step_backward(
    codes: torch.Tensor, h_prev: torch.Tensor, gh_n: torch.Tensor, dh: torch.Tensor, levels: int
):
    """Backward of one step. h_prev [bs, H], gh_n = h_prev W_hn^T + b_hn [bs, H] (recomputed),
    dh = dL/dh_t [bs, H] -> dgx [bs, 3H], dgh [bs, 3H], dh_prev_direct = dh * z [bs, H]."""
    acc = torch.float64 if h_prev.dtype == torch.float64 else torch.float32
    dh, h_prev, gh_n = dh.to(acc), h_prev.to(acc), gh_n.to(acc)
    r, z, n = (torch_decode(codes[q], levels, _GRU_KINDS[q], acc) for q in range(3))
    d_r, d_z, d_n = (torch_code_derivative(codes[q], levels, _GRU_KINDS[q], acc) for q in range(3))
    # snap() passes the gradient straight through.
    dpre_n = dh * (1.0 - z) * d_n
    dpre_r = dpre_n * gh_n * d_r
    dpre_z = dh * (h_prev - n) * d_z
    dgx = torch.cat([dpre_r, dpre_z, dpre_n], dim=1)
    dgh = torch.cat([dpre_r, dpre_z, dpre_n * r], dim=1)
    return dgx, dgh, dh * z
