"""Triton step kernels of the discrete LSTM and GRU cells: per time step, ONE fused elementwise
kernel for the forward cell update and ONE for the backward one.

Same signatures, return values and dtype rules as :mod:`discrnn.kernels.rnn_torch` (the reference
and test oracle); read its docstring first. The recurrent matmuls (``h W_hh^T``, ``dgates W_hh``)
stay in torch: these kernels do everything between them.

Layout of a launch: a 2-D grid of [BLOCK_B, BLOCK_H] tiles over [bs, H] (batch rows x hidden units).
A program loads, for its tile, every gate plane of the pre-activation matrix (gate q of unit j in
row b sits at column ``q * H + j`` of ``[bs, Q * H]``), so the whole cell update of a unit is
elementwise inside one program: no reductions, nothing shared between programs. Why this layout:

* the tile's H axis is the contiguous axis of every operand (gate planes, states, code planes), so
  loads and stores are coalesced rows; the gate planes are Q such rows per tile row;
* each code plane of the output ``[Q, bs, H]`` is a contiguous block; ``rnn_function.CodeStore``
  pads and packs the step's codes (stored per step as ``[bs, Q, Hp]``) and hands backward strided
  ``[Q, bs, H]`` views of them.

Inputs are read through their strides (row slices of a chunk's input projection ``xproj[rows]``,
state prefixes ``c[:bs]``, unpacked code views), never copied; outputs are fresh contiguous tensors.
Dtypes: the compute dtype ACC is float64 for float64 and float32 otherwise. The LSTM takes ACC from
``c_prev`` (which must be float32 or float64, as in the layers) and reads gates of any float dtype
directly. GRU inputs of mixed dtypes, and ``dm``/``dc``/``dh``/``h_prev``/``gh_n`` of a backward
call that are not in ACC, are converted to ACC on the host first (the layers never need that).

Exactness against the torch reference:

* Given the codes, everything is exact: decoding is a correctly rounded division (``div_rn``), and
  ``c = f * c_prev + i * g``, ``m = o * u``, ``(1 - z) * n + z * h_prev`` and ``gx_n + r * gh_n``
  are evaluated as in torch, one rounding per operation, with fused multiply-add off (every launch
  passes ``enable_fp_fusion=False``). So c, m and h match torch bit for bit, and
  ``lstm_recompute_cell`` reproduces the forward kernel's c exactly, which backward relies on (it
  rebuilds c from the codes between the float32 checkpoints).
* The codes themselves: tanh and sigmoid are written with ``exp`` (no libdevice in the interpreter)
  and may differ from torch's in the last ulp, so an activation that lands on a level boundary can
  move one level. Rare (measured under the interpreter: none in 786k codes of random steps; 4-10% of
  codes placed exactly on a boundary), and the layer stays self-consistent since backward reads the
  codes forward wrote.
* Backward: the straight-through derivative of a code (``_code_derivative``, the mean of f' over the
  level's bin) divides by 3 with Triton's default float32 division, approximate on a GPU; gradients
  are within a few ulp of torch's.

Tiles: on a GPU a program takes ``GPU_TILE.elems`` = 1024 elements, ``BLOCK_H`` = next_pow2(H)
clamped to [16, 128] and ``BLOCK_B = 1024 // BLOCK_H`` (four tile shapes in all, so few compiled
variants per ``levels``). The interpreter pays ~1-10 ms per program, so there a tile covers up to
65536 elements fitted to [bs, H]: most launches are one program.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .codec import INTERPRETING, _code_derivative, _decode, _encode, _round_to, _sigmoid, _tanh

__all__ = [
    "lstm_step_forward",
    "lstm_recompute_cell",
    "lstm_output",
    "lstm_step_backward",
    "gru_step_forward",
    "gru_step_backward",
]

LSTM_CODES = 5  # i, f, g, o, u (as rnn_torch)
GRU_CODES = 4  # r, z, n, h


# Interpreter note: every call of a @triton.jit helper costs the interpreter ~1.5 ms (it re-patches
# triton.language), so tile offsets and loads are written inline rather than in helpers.


@triton.jit(do_not_specialize=["bs"])
def _lstm_step_fwd_kernel(
    GATES,  # [bs, 4H] pre-activations i, f, g, o; any float dtype; strided
    C_PREV,  # [bs, H] float32/64 (its dtype is ACC); strided
    CODES,  # [5, bs, H] uint8 out (i, f, g, o, u), contiguous
    C,  # [bs, H] ACC out, contiguous
    M,  # [bs, H] ACC out (o * u), contiguous
    bs,
    H,
    stride_gb,
    stride_gh,
    stride_cb,
    stride_ch,
    LEVELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if C_PREV.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows[:, None] < bs) & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    gates = GATES + rows[:, None] * stride_gb  # [BLOCK_B, 1]; gate q of unit j is column q*H + j
    # [BLOCK_B, BLOCK_H] each
    z_i = tl.load(gates + cols[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    z_f = tl.load(gates + (cols + H)[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    z_g = tl.load(gates + (cols + 2 * H)[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    z_o = tl.load(gates + (cols + 3 * H)[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    c_prev = tl.load(C_PREV + rows[:, None] * stride_cb + cols[None, :] * stride_ch, mask=mask,
                     other=0.0)

    k_i = _encode(_sigmoid(z_i), LEVELS, "sigmoid")  # [BLOCK_B, BLOCK_H] int32
    k_f = _encode(_sigmoid(z_f), LEVELS, "sigmoid")
    k_g = _encode(_tanh(z_g), LEVELS, "tanh")
    k_o = _encode(_sigmoid(z_o), LEVELS, "sigmoid")
    i = _decode(k_i, LEVELS, "sigmoid", ACC)
    f = _decode(k_f, LEVELS, "sigmoid", ACC)
    g = _decode(k_g, LEVELS, "tanh", ACC)
    o = _decode(k_o, LEVELS, "sigmoid", ACC)
    c = f * c_prev + i * g  # two products and a sum, each rounded (no FMA): as torch
    k_u = _encode(_tanh(c), LEVELS, "tanh")
    m = o * _decode(k_u, LEVELS, "tanh", ACC)

    out = rows[:, None] * H + cols[None, :]  # [BLOCK_B, BLOCK_H] int64 into contiguous [bs, H]
    plane = bs.to(tl.int64) * H  # one code plane of [5, bs, H]
    tl.store(CODES + out, k_i.to(tl.uint8), mask=mask)
    tl.store(CODES + plane + out, k_f.to(tl.uint8), mask=mask)
    tl.store(CODES + 2 * plane + out, k_g.to(tl.uint8), mask=mask)
    tl.store(CODES + 3 * plane + out, k_o.to(tl.uint8), mask=mask)
    tl.store(CODES + 4 * plane + out, k_u.to(tl.uint8), mask=mask)
    tl.store(C + out, c, mask=mask)
    tl.store(M + out, m, mask=mask)


@triton.jit(do_not_specialize=["bs"])
def _lstm_cell_kernel(
    CODES,  # [>=3, bs, H] uint8 (i, f, g, ...); strided
    C_PREV,  # [bs, H] float32/64 (ACC); strided
    C,  # [bs, H] ACC out, contiguous
    bs,
    H,
    stride_kq,
    stride_kb,
    stride_kh,
    stride_cb,
    stride_ch,
    LEVELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if C_PREV.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows[:, None] < bs) & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    # plane q of the codes is at code + q * stride_kq
    code = CODES + rows[:, None] * stride_kb + cols[None, :] * stride_kh
    k_i = tl.load(code, mask=mask, other=0).to(tl.int32)  # widened: uint8 arithmetic wraps
    k_f = tl.load(code + stride_kq, mask=mask, other=0).to(tl.int32)
    k_g = tl.load(code + 2 * stride_kq, mask=mask, other=0).to(tl.int32)
    c_prev = tl.load(C_PREV + rows[:, None] * stride_cb + cols[None, :] * stride_ch, mask=mask,
                     other=0.0)
    i = _decode(k_i, LEVELS, "sigmoid", ACC)
    f = _decode(k_f, LEVELS, "sigmoid", ACC)
    g = _decode(k_g, LEVELS, "tanh", ACC)
    c = f * c_prev + i * g  # the forward kernel's arithmetic, so c is bit-identical
    tl.store(C + rows[:, None] * H + cols[None, :], c, mask=mask)


@triton.jit(do_not_specialize=["bs"])
def _lstm_output_kernel(
    CODES,  # [5, bs, H] uint8; strided
    M,  # [bs, H] out, any float dtype (ACC: float64 for float64, else float32), contiguous
    bs,
    H,
    stride_kq,
    stride_kb,
    stride_kh,
    LEVELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if M.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows[:, None] < bs) & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    code = CODES + rows[:, None] * stride_kb + cols[None, :] * stride_kh
    k_o = tl.load(code + 3 * stride_kq, mask=mask, other=0).to(tl.int32)
    k_u = tl.load(code + 4 * stride_kq, mask=mask, other=0).to(tl.int32)
    m = _decode(k_o, LEVELS, "sigmoid", ACC) * _decode(k_u, LEVELS, "tanh", ACC)
    tl.store(M + rows[:, None] * H + cols[None, :], _round_to(m, M.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["bs"])
def _lstm_step_bwd_kernel(
    CODES,  # [5, bs, H] uint8; strided
    C_PREV,  # [bs, H] ACC; strided
    DM,  # [bs, H] ACC, dL/dm_t; strided
    DC,  # [bs, H] ACC, dL/dc_t from step t+1; strided
    DGATES,  # [bs, 4H] ACC out (i, f, g, o), contiguous
    DC_PREV,  # [bs, H] ACC out, contiguous
    bs,
    H,
    stride_kq,
    stride_kb,
    stride_kh,
    stride_cb,
    stride_ch,
    stride_mb,
    stride_mh,
    stride_db,
    stride_dh,
    LEVELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if C_PREV.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows[:, None] < bs) & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    # plane q of the codes is at code + q * stride_kq
    code = CODES + rows[:, None] * stride_kb + cols[None, :] * stride_kh
    k_i = tl.load(code, mask=mask, other=0).to(tl.int32)  # [BLOCK_B, BLOCK_H]
    k_f = tl.load(code + stride_kq, mask=mask, other=0).to(tl.int32)
    k_g = tl.load(code + 2 * stride_kq, mask=mask, other=0).to(tl.int32)
    k_o = tl.load(code + 3 * stride_kq, mask=mask, other=0).to(tl.int32)
    k_u = tl.load(code + 4 * stride_kq, mask=mask, other=0).to(tl.int32)
    c_prev = tl.load(C_PREV + rows[:, None] * stride_cb + cols[None, :] * stride_ch, mask=mask,
                     other=0.0)
    dm = tl.load(DM + rows[:, None] * stride_mb + cols[None, :] * stride_mh, mask=mask, other=0.0)
    dc = tl.load(DC + rows[:, None] * stride_db + cols[None, :] * stride_dh, mask=mask, other=0.0)

    i = _decode(k_i, LEVELS, "sigmoid", ACC)
    f = _decode(k_f, LEVELS, "sigmoid", ACC)
    g = _decode(k_g, LEVELS, "tanh", ACC)
    o = _decode(k_o, LEVELS, "sigmoid", ACC)
    u = _decode(k_u, LEVELS, "tanh", ACC)
    # Straight-through derivatives from the codes alone; the order of products is torch's.
    dc = dc + dm * o * _code_derivative(k_u, LEVELS, "tanh", ACC)
    d_i = dc * g * _code_derivative(k_i, LEVELS, "sigmoid", ACC)
    d_f = dc * c_prev * _code_derivative(k_f, LEVELS, "sigmoid", ACC)
    d_g = dc * i * _code_derivative(k_g, LEVELS, "tanh", ACC)
    d_o = dm * u * _code_derivative(k_o, LEVELS, "sigmoid", ACC)

    dgate = DGATES + rows[:, None] * 4 * H + cols[None, :]  # gate i's columns of [bs, 4H]
    tl.store(dgate, d_i, mask=mask)
    tl.store(dgate + H, d_f, mask=mask)
    tl.store(dgate + 2 * H, d_g, mask=mask)
    tl.store(dgate + 3 * H, d_o, mask=mask)
    tl.store(DC_PREV + rows[:, None] * H + cols[None, :], dc * f, mask=mask)


@triton.jit(do_not_specialize=["bs"])
def _gru_step_fwd_kernel(
    GX,  # [bs, 3H] x W_ih^T + b_ih (r, z, n); strided
    GH,  # [bs, 3H] h W_hh^T + b_hh; strided
    H_PREV,  # [bs, H]; strided. GX, GH, H_PREV share one float dtype; ACC follows it
    CODES,  # [4, bs, H] uint8 out (r, z, n, h), contiguous
    H_OUT,  # [bs, H] ACC out, contiguous
    bs,
    H,
    stride_xb,
    stride_xh,
    stride_gb,
    stride_gh,
    stride_pb,
    stride_ph,
    LEVELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if H_PREV.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows[:, None] < bs) & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    gx = GX + rows[:, None] * stride_xb  # [BLOCK_B, 1]; gate q of unit j is column q*H + j
    gh = GH + rows[:, None] * stride_gb
    # [BLOCK_B, BLOCK_H] each
    x_r = tl.load(gx + cols[None, :] * stride_xh, mask=mask, other=0.0).to(ACC)
    x_z = tl.load(gx + (cols + H)[None, :] * stride_xh, mask=mask, other=0.0).to(ACC)
    x_n = tl.load(gx + (cols + 2 * H)[None, :] * stride_xh, mask=mask, other=0.0).to(ACC)
    h_r = tl.load(gh + cols[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    h_z = tl.load(gh + (cols + H)[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    h_n = tl.load(gh + (cols + 2 * H)[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    h_prev = tl.load(H_PREV + rows[:, None] * stride_pb + cols[None, :] * stride_ph, mask=mask,
                     other=0.0)
    h_prev = h_prev.to(ACC)

    k_r = _encode(_sigmoid(x_r + h_r), LEVELS, "sigmoid")  # [BLOCK_B, BLOCK_H] int32
    k_z = _encode(_sigmoid(x_z + h_z), LEVELS, "sigmoid")
    r = _decode(k_r, LEVELS, "sigmoid", ACC)
    z = _decode(k_z, LEVELS, "sigmoid", ACC)
    k_n = _encode(_tanh(x_n + r * h_n), LEVELS, "tanh")
    n = _decode(k_n, LEVELS, "tanh", ACC)
    k_h = _encode((1.0 - z) * n + z * h_prev, LEVELS, "tanh")  # snap to the tanh grid

    out = rows[:, None] * H + cols[None, :]  # [BLOCK_B, BLOCK_H] int64 into contiguous [bs, H]
    plane = bs.to(tl.int64) * H  # one code plane of [4, bs, H]
    tl.store(CODES + out, k_r.to(tl.uint8), mask=mask)
    tl.store(CODES + plane + out, k_z.to(tl.uint8), mask=mask)
    tl.store(CODES + 2 * plane + out, k_n.to(tl.uint8), mask=mask)
    tl.store(CODES + 3 * plane + out, k_h.to(tl.uint8), mask=mask)
    tl.store(H_OUT + out, _decode(k_h, LEVELS, "tanh", ACC), mask=mask)


@triton.jit(do_not_specialize=["bs"])
def _gru_step_bwd_kernel(
    CODES,  # [4, bs, H] uint8 (r, z, n, h); strided
    H_PREV,  # [bs, H] ACC; strided
    GH_N,  # [bs, H] ACC, h_prev W_hn^T + b_hn; strided
    DH,  # [bs, H] ACC, dL/dh_t; strided
    DGX,  # [bs, 3H] ACC out, contiguous
    DGH,  # [bs, 3H] ACC out, contiguous
    DH_DIRECT,  # [bs, H] ACC out (dh * z), contiguous
    bs,
    H,
    stride_kq,
    stride_kb,
    stride_kh,
    stride_pb,
    stride_ph,
    stride_nb,
    stride_nh,
    stride_db,
    stride_dh,
    LEVELS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if H_PREV.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows[:, None] < bs) & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    # plane q of the codes is at code + q * stride_kq
    code = CODES + rows[:, None] * stride_kb + cols[None, :] * stride_kh
    k_r = tl.load(code, mask=mask, other=0).to(tl.int32)  # [BLOCK_B, BLOCK_H]
    k_z = tl.load(code + stride_kq, mask=mask, other=0).to(tl.int32)
    k_n = tl.load(code + 2 * stride_kq, mask=mask, other=0).to(tl.int32)
    h_prev = tl.load(H_PREV + rows[:, None] * stride_pb + cols[None, :] * stride_ph, mask=mask,
                     other=0.0)
    gh_n = tl.load(GH_N + rows[:, None] * stride_nb + cols[None, :] * stride_nh, mask=mask,
                   other=0.0)
    dh = tl.load(DH + rows[:, None] * stride_db + cols[None, :] * stride_dh, mask=mask, other=0.0)

    r = _decode(k_r, LEVELS, "sigmoid", ACC)
    z = _decode(k_z, LEVELS, "sigmoid", ACC)
    n = _decode(k_n, LEVELS, "tanh", ACC)
    # snap() passes the gradient straight through; the order of products is torch's.
    dpre_n = dh * (1.0 - z) * _code_derivative(k_n, LEVELS, "tanh", ACC)
    dpre_r = dpre_n * gh_n * _code_derivative(k_r, LEVELS, "sigmoid", ACC)
    dpre_z = dh * (h_prev - n) * _code_derivative(k_z, LEVELS, "sigmoid", ACC)

    gate = rows[:, None] * 3 * H + cols[None, :]  # gate r's columns of [bs, 3H]
    tl.store(DGX + gate, dpre_r, mask=mask)
    tl.store(DGX + gate + H, dpre_z, mask=mask)
    tl.store(DGX + gate + 2 * H, dpre_n, mask=mask)
    tl.store(DGH + gate, dpre_r, mask=mask)
    tl.store(DGH + gate + H, dpre_z, mask=mask)
    tl.store(DGH + gate + 2 * H, dpre_n * r, mask=mask)
    tl.store(DH_DIRECT + rows[:, None] * H + cols[None, :], dh * z, mask=mask)


# ----------------------------------------------------------------------------------------------
# Host launchers: the signatures and return values of discrnn.kernels.rnn_torch. They check shapes,
# dtypes and devices (cheap, no sync) and otherwise trust the caller, as the layers do.


class TileRule(NamedTuple):
    """How a launch picks its [BLOCK_B, BLOCK_H] tile for a [bs, H] step."""

    elems: int  # BLOCK_B * BLOCK_H at most
    min_h: int
    max_h: int
    fit_rows: bool  # shrink BLOCK_B to next_pow2(bs) (interpreter: fewer elements to emulate)

    def tile(self, bs: int, H: int) -> tuple[int, int]:
        block_h = min(max(triton.next_power_of_2(H), self.min_h), self.max_h, self.elems)
        block_b = max(1, self.elems // block_h)
        if self.fit_rows:
            block_b = min(block_b, triton.next_power_of_2(bs))
        return block_b, block_h

    def shapes(self) -> list[tuple[int, int]]:
        """Every tile this rule can give when ``fit_rows`` is off (what the compile test builds)."""
        assert not self.fit_rows
        hs = [1 << p for p in range(self.min_h.bit_length() - 1, self.max_h.bit_length())]
        top = min(self.max_h, self.elems)
        return [(max(1, self.elems // h), h) for h in hs if self.min_h <= h <= top]


# GPU: 1024-element tiles with rows of 16..128 units, four shapes in all (few compiled variants);
# rows of >= 16 units keep loads coalesced, and a step of bs x H = 64 x 512 gets 32 programs.
GPU_TILE = TileRule(elems=1024, min_h=16, max_h=128, fit_rows=False)
# Interpreter: ~1-10 ms per program, so one program per launch up to 65536 elements.
INTERPRETER_TILE = TileRule(elems=1 << 16, min_h=1, max_h=1 << 16, fit_rows=True)
TILE = INTERPRETER_TILE if INTERPRETING else GPU_TILE  # tests swap in small tiles


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the other step tensors, got {t.device}")


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            "the Triton step kernels need CUDA tensors (or TRITON_INTERPRET=1 set before discrnn "
            f"is imported); got tensors on {device}"
        )


def _check_acc(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 (the compute dtype), got {t.dtype}")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _launch(kernel, bs: int, H: int, args, levels: int) -> None:
    block_b, block_h = TILE.tile(bs, H)
    grid = (triton.cdiv(bs, block_b), triton.cdiv(H, block_h))
    kernel[grid](
        *args, LEVELS=levels, BLOCK_B=block_b, BLOCK_H=block_h, enable_fp_fusion=False
    )


def lstm_step_forward(gates: torch.Tensor, c_prev: torch.Tensor, levels: int):
    """gates [bs, 4H] (pre-activations, bias included, any float dtype, any strides), c_prev [bs, H]
    (float32/64: the compute dtype) -> codes [5, bs, H] uint8, c [bs, H], m = o * u [bs, H]
    (compute dtype). One kernel."""
    _check_acc("c_prev", c_prev)
    bs, H = c_prev.shape
    _check("gates", gates, (bs, 4 * H), c_prev.device)
    _check_device(c_prev.device)
    acc, dev = c_prev.dtype, c_prev.device
    codes = torch.empty(LSTM_CODES, bs, H, dtype=torch.uint8, device=dev)
    c = torch.empty(bs, H, dtype=acc, device=dev)
    m = torch.empty(bs, H, dtype=acc, device=dev)
    if bs * H:
        args = (gates, c_prev, codes, c, m, bs, H, *gates.stride(), *c_prev.stride())
        _launch(_lstm_step_fwd_kernel, bs, H, args, levels)
    return codes, c, m


def lstm_recompute_cell(codes: torch.Tensor, c_prev: torch.Tensor, levels: int) -> torch.Tensor:
    """c_t from the saved i, f, g codes ([>=3, bs, H] uint8, any strides) and c_{t-1} [bs, H]
    (float32/64): bit-identical to the c that :func:`lstm_step_forward` returned."""
    _check_acc("c_prev", c_prev)
    bs, H = c_prev.shape
    _check("codes", codes[:3], (3, bs, H), c_prev.device)
    _check_device(c_prev.device)
    c = torch.empty(bs, H, dtype=c_prev.dtype, device=c_prev.device)
    if bs * H:
        args = (codes, c_prev, c, bs, H, *codes.stride(), *c_prev.stride())
        _launch(_lstm_cell_kernel, bs, H, args, levels)
    return c


def lstm_output(codes: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """m = o * u [bs, H] in ``dtype`` from the saved codes [5, bs, H] uint8 (any strides)."""
    _, bs, H = codes.shape
    _check("codes", codes, (LSTM_CODES, bs, H), codes.device)
    _check_device(codes.device)
    m = torch.empty(bs, H, dtype=dtype, device=codes.device)
    if bs * H:
        _launch(_lstm_output_kernel, bs, H, (codes, m, bs, H, *codes.stride()), levels)
    return m


def lstm_step_backward(
    codes: torch.Tensor, c_prev: torch.Tensor, dm: torch.Tensor, dc: torch.Tensor, levels: int
):
    """Backward of one step: codes [5, bs, H], c_prev [bs, H] (float32/64), dm = dL/dm_t and
    dc = dL/dc_t [bs, H] (converted to c_prev's dtype) -> dgates [bs, 4H] (i, f, g, o), dc_prev
    [bs, H], both in c_prev's dtype. One kernel."""
    _check_acc("c_prev", c_prev)
    bs, H = c_prev.shape
    acc, dev = c_prev.dtype, c_prev.device
    for name, t in (("codes", codes), ("dm", dm), ("dc", dc)):
        _check(name, t, (LSTM_CODES, bs, H) if name == "codes" else (bs, H), dev)
    _check_device(dev)
    dm, dc = _as(dm, acc), _as(dc, acc)
    dgates = torch.empty(bs, 4 * H, dtype=acc, device=dev)
    dc_prev = torch.empty(bs, H, dtype=acc, device=dev)
    if bs * H:
        args = (codes, c_prev, dm, dc, dgates, dc_prev, bs, H, *codes.stride(), *c_prev.stride(),
                *dm.stride(), *dc.stride())
        _launch(_lstm_step_bwd_kernel, bs, H, args, levels)
    return dgates, dc_prev


def gru_step_forward(gx: torch.Tensor, gh: torch.Tensor, h_prev: torch.Tensor, levels: int):
    """gx = x W_ih^T + b_ih [bs, 3H], gh = h W_hh^T + b_hh [bs, 3H], h_prev [bs, H] (any float
    dtype, any strides) -> codes [4, bs, H] uint8 and h [bs, H] in the compute dtype (exactly the
    level of codes[3]). One kernel."""
    bs, H = h_prev.shape
    dev = h_prev.device
    _check("gx", gx, (bs, 3 * H), dev)
    _check("gh", gh, (bs, 3 * H), dev)
    _check_device(dev)
    acc = _acc(h_prev.dtype)
    if not gx.dtype == gh.dtype == h_prev.dtype:  # one input dtype per kernel: meet in ACC
        gx, gh, h_prev = _as(gx, acc), _as(gh, acc), _as(h_prev, acc)
    codes = torch.empty(GRU_CODES, bs, H, dtype=torch.uint8, device=dev)
    h = torch.empty(bs, H, dtype=acc, device=dev)
    if bs * H:
        args = (gx, gh, h_prev, codes, h, bs, H, *gx.stride(), *gh.stride(), *h_prev.stride())
        _launch(_gru_step_fwd_kernel, bs, H, args, levels)
    return codes, h


def gru_step_backward(
    codes: torch.Tensor, h_prev: torch.Tensor, gh_n: torch.Tensor, dh: torch.Tensor, levels: int
):
    """Backward of one step: codes [4, bs, H], h_prev [bs, H], gh_n = h_prev W_hn^T + b_hn [bs, H],
    dh = dL/dh_t [bs, H] -> dgx [bs, 3H], dgh [bs, 3H], dh_prev_direct = dh * z [bs, H], in the
    compute dtype of h_prev. One kernel."""
    bs, H = h_prev.shape
    dev = h_prev.device
    for name, t in (("codes", codes), ("gh_n", gh_n), ("dh", dh)):
        _check(name, t, (GRU_CODES, bs, H) if name == "codes" else (bs, H), dev)
    _check_device(dev)
    acc = _acc(h_prev.dtype)
    h_prev, gh_n, dh = _as(h_prev, acc), _as(gh_n, acc), _as(dh, acc)
    dgx = torch.empty(bs, 3 * H, dtype=acc, device=dev)
    dgh = torch.empty(bs, 3 * H, dtype=acc, device=dev)
    dh_direct = torch.empty(bs, H, dtype=acc, device=dev)
    if bs * H:
        args = (codes, h_prev, gh_n, dh, dgx, dgh, dh_direct, bs, H, *codes.stride(),
                *h_prev.stride(), *gh_n.stride(), *dh.stride())
        _launch(_gru_step_bwd_kernel, bs, H, args, levels)
    return dgx, dgh, dh_direct
