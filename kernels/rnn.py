"""Triton step kernels of the discrete LSTM and GRU cells: per time step, ONE fused elementwise
kernel for the forward cell update, which also bit-packs the step's codes into the layer's code
store, and ONE for the backward one, which reads them packed.

Same math, signatures, return values and dtype rules as :mod:`discrnn.kernels.rnn_torch` (the
reference and test oracle); read its docstring first. The recurrent matmuls (``h W_hh^T``,
``dgates W_hh``) stay in torch: these kernels do everything between them.

Layout of a launch: a 2-D grid of [BLOCK_B, BLOCK_H] tiles over [bs, H] (batch rows x hidden units).
A program loads, for its tile, every gate plane of the pre-activation matrix (gate q of unit j in
row b sits at column ``q * H + j`` of ``[bs, Q * H]``), so the whole cell update of a unit is
elementwise inside one program: no reductions, nothing shared between programs. Why this layout:

* the tile's H axis is the contiguous axis of every operand (gate planes, states, code rows), so
  loads and stores are coalesced rows; the gate planes are Q such rows per tile row;
* codes are addressed as :class:`~discrnn.kernels.rnn_torch.CodeRows`: plane q of row b is a byte
  row, unit j at bits [j * BITS, (j + 1) * BITS). The forward kernel packs each tile row's codes in
  groups of ``G = 8 / gcd(BITS, 8)`` units (G * BITS bits = whole bytes, at most 56 bits: one
  int64 word) and stores the group's bytes; BLOCK_H is a multiple of 8 >= G, so groups never
  straddle tiles and no two programs write one byte. Units hidden..padded-1 of a row (the code
  store pads rows to a multiple of 8 units) are written as code 0 by the programs covering them.
  Readers fetch, per unit, the (at most two) bytes that hold its bits and shift them into place;
* the layers' code store keeps a step's codes as rows [bs, Q, padded] one after another, so a run
  of steps is one :class:`CodeRows` and the GRU's output kernel decodes a whole chunk in one launch.
  The LSTM keeps i, f, g, o (Q = 4): u = discrete_tanh(c_t) needs c_t, so its outputs m = o u come
  from the cell kernel that rebuilds c_t step by step (``lstm_recompute_cell(..., m_out=)``), or
  from the output kernel given c_t (``lstm_output(codes, c, ...)``).

Inputs are read through their strides (row slices of a chunk's input projection ``xproj[rows]``,
state prefixes ``c[:bs]``), never copied; float outputs are fresh contiguous tensors. Dtypes: the
compute dtype ACC is float64 for float64 and float32 otherwise. The LSTM takes ACC from ``c_prev``
(which must be float32 or float64, as in the layers) and reads gates of any float dtype directly.
GRU inputs of mixed dtypes, and ``dc``/``dh``/``h_prev``/``gh_n`` of a backward call that are not
in ACC, are converted to ACC on the host first (the layers never need that); the LSTM's ``dm`` may
be of any float dtype (a bf16 / fp16 layer's backward keeps it so) and is widened in the kernel.
The backward kernels can also write their product operand (``dgates_low_out`` / ``dgh_low_out``)
rounded to a lower float dtype, to nearest even as ``Tensor.to``.

Exactness against the torch reference:

* Given the codes, everything is exact: packing is the codec's bit stream, decoding is a correctly
  rounded division (``div_rn``), and ``c = f * c_prev + i * g``, ``m = o * u``,
  ``(1 - z) * n + z * h_prev`` and ``gx_n + r * gh_n`` are evaluated as in torch, one rounding per
  operation, with fused multiply-add off (every launch passes ``enable_fp_fusion=False``). So c, m
  and h match torch bit for bit, and ``lstm_recompute_cell`` reproduces the forward kernel's c
  exactly, which backward relies on (it rebuilds c from the codes between the float checkpoints).
* u's code is not kept: the cell, output and backward kernels encode ``_tanh(c)`` of the rebuilt
  c_t, the forward kernel's expression on the same value with fusion off, so they get the forward
  kernel's u code (and m) bit for bit; against torch's u code, the same one-level caveat as below.
* The codes themselves: tanh and sigmoid are written with ``exp`` (no libdevice in the interpreter)
  and may differ from torch's in the last ulp, so an activation that lands on a level boundary can
  move one level. Rare (measured under the interpreter: none in 786k codes of random steps; 4-10% of
  codes placed exactly on a boundary), and the layer stays self-consistent since backward reads the
  codes forward wrote.
* Backward: the straight-through derivative of a code (``_code_derivative``, the mean of f' over the
  level's bin) divides by 3 with Triton's default float32 division, approximate on a GPU; the exact
  mode's f'(pre-activation) and u's tanh'(c_t) use the kernels' tanh/sigmoid; gradients are within
  a few ulp of torch's.
* The LSTM's cell clamp (``CELL_CLIP``, a compile-time constant that the layers hold as a float32
  value) is exact in both.

Tiles: on a GPU a program takes ``GPU_TILE.elems`` = 1024 elements, ``BLOCK_H`` = next_pow2(H)
clamped to [16, 128] and ``BLOCK_B = 1024 // BLOCK_H`` (four tile shapes in all, so few compiled
variants per ``levels`` and ``bits``). The interpreter pays ~1-10 ms per program, so there a tile
covers up to 65536 elements fitted to [bs, H]: most launches are one program.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .codec import INTERPRETING, _code_derivative, _decode, _encode, _round_to, _sigmoid, _tanh
from .codec_torch import compute_dtype, group_bytes, group_codes
from .launch import launch
from .rnn_torch import CodeRows, as_code_rows

__all__ = [
    "CodeRows",
    "lstm_step_forward",
    "lstm_recompute_cell",
    "lstm_output",
    "lstm_step_backward",
    "gru_step_forward",
    "gru_output",
    "gru_step_backward",
]

LSTM_CODES = 4  # i, f, g, o (as rnn_torch: u = discrete_tanh(c_t) is rebuilt from c_t)
GRU_CODES = 4  # r, z, n, h


# Interpreter note: every call of a @triton.jit helper costs the interpreter ~1.5 ms (it re-patches
# triton.language), so tile offsets and float loads are written inline; the code loads and stores,
# which would be ten lines each, are helpers.


@triton.jit
def _load_codes(row_ptr, cols, mask, BITS: tl.constexpr):
    """int32 codes [BLOCK_B, BLOCK_H] of units ``cols`` [BLOCK_H] (int64) from the byte rows that
    start at ``row_ptr`` [BLOCK_B] (uint8 pointers)."""
    bit = cols * BITS
    shift = (bit & 7).to(tl.int32)[None, :]
    byte_ptr = row_ptr[:, None] + (bit >> 3)[None, :]
    word = tl.load(byte_ptr, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # only then can a code straddle two bytes (never past the end of its row)
        spill = mask & (shift + BITS > 8)
        word = word | (tl.load(byte_ptr + 1, mask=spill, other=0).to(tl.int32) << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def _store_codes(
    row_ptr,  # [BLOCK_B] uint8 pointers: plane row starts
    code,  # [BLOCK_B, BLOCK_H] int32 codes of units col0 .. col0 + BLOCK_H - 1
    row_ok,  # [BLOCK_B] bool
    col0,
    H,
    H_PAD,
    BITS: tl.constexpr,
    GROUP_CODES: tl.constexpr,
    GROUP_BYTES_POW2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Pack a tile's codes into its byte rows: units >= H become code 0, units >= H_PAD are not
    written. Groups of GROUP_CODES units fill whole bytes, so tiles never share a byte."""
    cols = col0 + tl.arange(0, BLOCK_H)
    code = tl.where((cols < H)[None, :], code, 0)
    if BITS == 8:
        mask = row_ok[:, None] & (cols < H_PAD)[None, :]
        tl.store(row_ptr[:, None] + cols[None, :], code.to(tl.uint8), mask=mask)
    else:
        N_GROUPS: tl.constexpr = BLOCK_H // GROUP_CODES
        GROUP_BYTES: tl.constexpr = GROUP_CODES * BITS // 8
        grouped = tl.reshape(code, (BLOCK_B, N_GROUPS, GROUP_CODES)).to(tl.int64)
        shifts = (tl.arange(0, GROUP_CODES) * BITS).to(tl.int64)
        word = tl.sum(grouped << shifts[None, None, :], axis=2)  # [BLOCK_B, N_GROUPS]; disjoint
        lanes = tl.arange(0, GROUP_BYTES_POW2)  # masked to GROUP_BYTES
        byte = (word[:, :, None] >> (lanes * 8).to(tl.int64)[None, None, :]) & 0xFF
        group = col0 // GROUP_CODES + tl.arange(0, N_GROUPS)  # [N_GROUPS] int64
        ptr = row_ptr[:, None, None] + (group * GROUP_BYTES)[None, :, None] + lanes[None, None, :]
        mask = row_ok[:, None, None] & (group * GROUP_CODES < H_PAD)[None, :, None]
        mask = mask & (lanes < GROUP_BYTES)[None, None, :]
        tl.store(ptr, byte.to(tl.uint8), mask=mask)


@triton.jit
def _clamp_cell(c, CELL_CLIP: tl.constexpr):
    """clamp(c, -CELL_CLIP, CELL_CLIP), NaN kept (as torch.clamp)."""
    return tl.minimum(tl.maximum(c, -CELL_CLIP, propagate_nan=tl.PropagateNan.ALL), CELL_CLIP,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit(do_not_specialize=["bs", "code_offset", "done"])
def _lstm_step_fwd_kernel(
    GATES,  # [bs, 4H] pre-activations i, f, g, o; any float dtype; strided
    C_PREV,  # [bs, H] float32/64 (its dtype is ACC); strided
    CODES,  # uint8 code rows out (i, f, g, o), when STORE_CODES
    FINAL,  # [2, B, H] uint8 out (o, u of rows done..bs-1), contiguous, when STORE_FINAL
    C,  # [bs, H] ACC out, contiguous; may be C_PREV itself (each element is read, then written)
    M,  # [bs, H] out (o * u), any float dtype (rounded to nearest even from ACC), contiguous
    bs,
    H,
    H_PAD,  # units per code row (>= H); the grid covers them
    code_offset,
    done,
    stride_gb,
    stride_gh,
    stride_cb,
    stride_ch,
    stride_kq,
    stride_kb,
    stride_fq,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_CODES: tl.constexpr,
    GROUP_BYTES_POW2: tl.constexpr,
    STORE_CODES: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    CELL_CLIP: tl.constexpr,  # |c| <= CELL_CLIP (a float32 value; inf: no clamp)
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if C_PREV.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_H
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = col0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    row_ok = rows < bs
    mask = row_ok[:, None] & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

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
    c = _clamp_cell(f * c_prev + i * g, CELL_CLIP)  # products and sum rounded (no FMA): as torch
    k_u = _encode(_tanh(c), LEVELS, "tanh")
    m = o * _decode(k_u, LEVELS, "tanh", ACC)

    out = rows[:, None] * H + cols[None, :]  # [BLOCK_B, BLOCK_H] int64 into contiguous [bs, H]
    tl.store(C + out, c, mask=mask)
    tl.store(M + out, _round_to(m, M.dtype.element_ty), mask=mask)
    if STORE_CODES:
        row = CODES + code_offset + rows * stride_kb  # [BLOCK_B]; plane q at + q * stride_kq
        _store_codes(row, k_i, row_ok, col0, H, H_PAD, BITS, GROUP_CODES, GROUP_BYTES_POW2,
                     BLOCK_B, BLOCK_H)
        _store_codes(row + stride_kq, k_f, row_ok, col0, H, H_PAD, BITS, GROUP_CODES,
                     GROUP_BYTES_POW2, BLOCK_B, BLOCK_H)
        _store_codes(row + 2 * stride_kq, k_g, row_ok, col0, H, H_PAD, BITS, GROUP_CODES,
                     GROUP_BYTES_POW2, BLOCK_B, BLOCK_H)
        _store_codes(row + 3 * stride_kq, k_o, row_ok, col0, H, H_PAD, BITS, GROUP_CODES,
                     GROUP_BYTES_POW2, BLOCK_B, BLOCK_H)
        # u's code is not kept: readers rebuild it from c_t with this expression (_tanh(c)).
    if STORE_FINAL:  # rows whose sequence ends here: their o, u codes are the packed final state
        final_mask = mask & (rows >= done)[:, None]
        tl.store(FINAL + out, k_o.to(tl.uint8), mask=final_mask)
        tl.store(FINAL + stride_fq + out, k_u.to(tl.uint8), mask=final_mask)


@triton.jit(do_not_specialize=["bs", "code_offset", "n_steps"])
def _lstm_cell_kernel(
    CODES,  # uint8 code rows (i, f, g, o) of n_steps steps of bs rows, one after another
    C_PREV,  # [bs, H] float32/64 (ACC): c before the first step; strided
    C,  # [n_steps * bs, H] ACC out: c after each step, contiguous
    M,  # [n_steps * bs, H] out (o * u, u's code rebuilt from c), any float dtype, contiguous;
    # when STORE_M
    bs,
    H,
    code_offset,
    stride_kq,
    stride_kb,
    stride_cb,
    stride_ch,
    n_steps,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    CELL_CLIP: tl.constexpr,
    STORE_M: tl.constexpr,
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

    c = tl.load(C_PREV + rows[:, None] * stride_cb + cols[None, :] * stride_ch, mask=mask,
                other=0.0)
    # The recursion is elementwise, so one launch runs a whole run of steps with c in registers
    # (on a GPU the per-step launches, not the arithmetic, set the backward's time).
    for s in range(n_steps):
        step_rows = s * bs + rows  # [BLOCK_B] int64: this step's rows of the code run and of C, M
        row = CODES + code_offset + step_rows * stride_kb  # plane q at + q * stride_kq
        k_i = _load_codes(row, cols, mask, BITS)
        k_f = _load_codes(row + stride_kq, cols, mask, BITS)
        k_g = _load_codes(row + 2 * stride_kq, cols, mask, BITS)
        i = _decode(k_i, LEVELS, "sigmoid", ACC)
        f = _decode(k_f, LEVELS, "sigmoid", ACC)
        g = _decode(k_g, LEVELS, "tanh", ACC)
        c = _clamp_cell(f * c + i * g, CELL_CLIP)  # the forward kernel's: c bit-identical
        out = step_rows[:, None] * H + cols[None, :]  # [BLOCK_B, BLOCK_H] into contiguous C, M
        tl.store(C + out, c, mask=mask)
        if STORE_M:  # u's code as the forward kernel computed it from the same c: m bit-identical
            o = _decode(_load_codes(row + 3 * stride_kq, cols, mask, BITS), LEVELS, "sigmoid",
                        ACC)
            m = o * _decode(_encode(_tanh(c), LEVELS, "tanh"), LEVELS, "tanh", ACC)
            tl.store(M + out, _round_to(m, M.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["bs", "code_offset"])
def _output_kernel(
    CODES,  # uint8 code rows
    C,  # [bs, H] ACC: c_t, read for "lstm" (u's code rebuilt from it); strided
    OUT,  # [bs, H] out, any float dtype (ACC: float64 for float64, else float32), contiguous
    bs,
    H,
    code_offset,
    stride_kq,
    stride_kb,
    stride_cb,
    stride_ch,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    CELL: tl.constexpr,  # "lstm": m = o * u (plane 3 and C); "gru": h (plane 3)
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if OUT.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    mask = (rows[:, None] < bs) & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    row = CODES + code_offset + rows * stride_kb
    if CELL == "lstm":
        k_o = _load_codes(row + 3 * stride_kq, cols, mask, BITS)
        c = tl.load(C + rows[:, None] * stride_cb + cols[None, :] * stride_ch, mask=mask,
                    other=0.0).to(ACC)
        k_u = _encode(_tanh(c), LEVELS, "tanh")  # the forward kernel's u code
        value = _decode(k_o, LEVELS, "sigmoid", ACC) * _decode(k_u, LEVELS, "tanh", ACC)
    else:
        value = _decode(_load_codes(row + 3 * stride_kq, cols, mask, BITS), LEVELS, "tanh", ACC)
    out = OUT + rows[:, None] * H + cols[None, :]
    tl.store(out, _round_to(value, OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["bs", "code_offset"])
def _lstm_step_bwd_kernel(
    CODES,  # uint8 code rows (i, f, g, o)
    C_PREV,  # [bs, H] ACC; strided
    DM,  # [bs, H] any float dtype, dL/dm_t (widened to ACC exactly); strided
    DY,  # [bs, H] any float dtype, added to DM when HAS_DY (the output's gradient); strided
    DC,  # [bs, H] ACC, dL/dc_t from step t+1; strided
    DGATES,  # [bs, 4H] ACC out (i, f, g, o), contiguous
    DC_PREV,  # [bs, H] ACC out, contiguous; may be DC itself (each element is read, then written)
    DG_LOW,  # [bs, 4H] out when HAS_DG_LOW: DGATES rounded to its dtype (the product's), contiguous
    PRE,  # [bs, 4H] ACC gate pre-activations (i, f, g, o); strided; read when EXACT
    bs,
    H,
    code_offset,
    stride_kq,
    stride_kb,
    stride_cb,
    stride_ch,
    stride_mb,
    stride_mh,
    stride_yb,
    stride_yh,
    stride_db,
    stride_dh,
    stride_pb,
    stride_ph,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    EXACT: tl.constexpr,  # gate derivatives f'(pre-activation) instead of from the codes
    HAS_DY: tl.constexpr,
    HAS_DG_LOW: tl.constexpr,
    CELL_CLIP: tl.constexpr,
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

    row = CODES + code_offset + rows * stride_kb  # [BLOCK_B]; plane q at + q * stride_kq
    k_i = _load_codes(row, cols, mask, BITS)  # [BLOCK_B, BLOCK_H] int32
    k_f = _load_codes(row + stride_kq, cols, mask, BITS)
    k_g = _load_codes(row + 2 * stride_kq, cols, mask, BITS)
    k_o = _load_codes(row + 3 * stride_kq, cols, mask, BITS)
    c_prev = tl.load(C_PREV + rows[:, None] * stride_cb + cols[None, :] * stride_ch, mask=mask,
                     other=0.0)
    dm = tl.load(DM + rows[:, None] * stride_mb + cols[None, :] * stride_mh, mask=mask,
                 other=0.0).to(ACC)
    if HAS_DY:  # one rounding, as torch's dm + dy.to(ACC) (fusion is off)
        dm = dm + tl.load(DY + rows[:, None] * stride_yb + cols[None, :] * stride_yh, mask=mask,
                          other=0.0).to(ACC)
    dc = tl.load(DC + rows[:, None] * stride_db + cols[None, :] * stride_dh, mask=mask, other=0.0)

    i = _decode(k_i, LEVELS, "sigmoid", ACC)
    f = _decode(k_f, LEVELS, "sigmoid", ACC)
    g = _decode(k_g, LEVELS, "tanh", ACC)
    o = _decode(k_o, LEVELS, "sigmoid", ACC)
    if EXACT:  # f' at the pre-activations
        pre = PRE + rows[:, None] * stride_pb
        s_i = _sigmoid(tl.load(pre + cols[None, :] * stride_ph, mask=mask, other=0.0))
        s_f = _sigmoid(tl.load(pre + (cols + H)[None, :] * stride_ph, mask=mask, other=0.0))
        t_g = _tanh(tl.load(pre + (cols + 2 * H)[None, :] * stride_ph, mask=mask, other=0.0))
        s_o = _sigmoid(tl.load(pre + (cols + 3 * H)[None, :] * stride_ph, mask=mask, other=0.0))
        dd_i, dd_f = s_i * (1.0 - s_i), s_f * (1.0 - s_f)
        dd_g, dd_o = 1.0 - t_g * t_g, s_o * (1.0 - s_o)
    else:  # the bin means of the codes
        dd_i = _code_derivative(k_i, LEVELS, "sigmoid", ACC)
        dd_f = _code_derivative(k_f, LEVELS, "sigmoid", ACC)
        dd_g = _code_derivative(k_g, LEVELS, "tanh", ACC)
        dd_o = _code_derivative(k_o, LEVELS, "sigmoid", ACC)
    # u's derivative is tanh'(c_t), c_t rebuilt with the forward's arithmetic: it fades as |c|
    # grows. Where the clamp was active nothing passes to the gates and c_prev (torch.clamp's
    # derivative). The order of products is torch's.
    c_raw = f * c_prev + i * g
    t_c = _tanh(_clamp_cell(c_raw, CELL_CLIP))  # the forward kernel's tanh(c): u's code rebuilt
    u = _decode(_encode(t_c, LEVELS, "tanh"), LEVELS, "tanh", ACC)
    dc = tl.where(tl.abs(c_raw) <= CELL_CLIP, dc + dm * o * (1.0 - t_c * t_c), 0.0)
    d_i = dc * g * dd_i
    d_f = dc * c_prev * dd_f
    d_g = dc * i * dd_g
    d_o = dm * u * dd_o

    dgate = DGATES + rows[:, None] * 4 * H + cols[None, :]  # gate i's columns of [bs, 4H]
    tl.store(dgate, d_i, mask=mask)
    tl.store(dgate + H, d_f, mask=mask)
    tl.store(dgate + 2 * H, d_g, mask=mask)
    tl.store(dgate + 3 * H, d_o, mask=mask)
    tl.store(DC_PREV + rows[:, None] * H + cols[None, :], dc * f, mask=mask)
    if HAS_DG_LOW:  # the backward product's operand, rounded here instead of by a cast launch
        LOW: tl.constexpr = DG_LOW.dtype.element_ty
        dg_low = DG_LOW + rows[:, None] * 4 * H + cols[None, :]
        tl.store(dg_low, _round_to(d_i, LOW), mask=mask)
        tl.store(dg_low + H, _round_to(d_f, LOW), mask=mask)
        tl.store(dg_low + 2 * H, _round_to(d_g, LOW), mask=mask)
        tl.store(dg_low + 3 * H, _round_to(d_o, LOW), mask=mask)


@triton.jit(do_not_specialize=["bs", "code_offset", "done"])
def _gru_step_fwd_kernel(
    GX,  # [bs, 3H] x W_ih^T + b_ih (r, z, n); strided
    GH,  # [bs, 3H] h W_hh^T (+ b_hh: then not HAS_BIAS); strided
    B_HH,  # [3H] in GH's dtype, contiguous: added to GH (rounded to GH's dtype) when HAS_BIAS
    H_PREV,  # [bs, H]; strided. GX, GH, H_PREV share one float dtype; ACC follows it
    CODES,  # uint8 code rows out (r, z, n, h), when STORE_CODES
    FINAL,  # [1, B, H] uint8 out (h codes of rows done..bs-1), contiguous, when STORE_FINAL
    H_OUT,  # [bs, H] out, any float dtype (h is a level: rounded from ACC), contiguous
    PRE,  # [bs, 3H] ACC out: pre-activations of r, z, n, contiguous; written when STORE_PRE
    bs,
    H,
    H_PAD,
    code_offset,
    done,
    stride_xb,
    stride_xh,
    stride_gb,
    stride_gh,
    stride_pb,
    stride_ph,
    stride_kq,
    stride_kb,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    GROUP_CODES: tl.constexpr,
    GROUP_BYTES_POW2: tl.constexpr,
    STORE_CODES: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    STORE_PRE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if H_PREV.dtype.element_ty == tl.float64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_H
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = col0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    row_ok = rows < bs
    mask = row_ok[:, None] & (cols[None, :] < H)  # [BLOCK_B, BLOCK_H]

    gx = GX + rows[:, None] * stride_xb  # [BLOCK_B, 1]; gate q of unit j is column q*H + j
    gh = GH + rows[:, None] * stride_gb
    # [BLOCK_B, BLOCK_H] each
    x_r = tl.load(gx + cols[None, :] * stride_xh, mask=mask, other=0.0).to(ACC)
    x_z = tl.load(gx + (cols + H)[None, :] * stride_xh, mask=mask, other=0.0).to(ACC)
    x_n = tl.load(gx + (cols + 2 * H)[None, :] * stride_xh, mask=mask, other=0.0).to(ACC)
    h_r = tl.load(gh + cols[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    h_z = tl.load(gh + (cols + H)[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    h_n = tl.load(gh + (cols + 2 * H)[None, :] * stride_gh, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:  # torch's gh += b_hh (one launch a step less): summed in ACC, rounded to GH's
        GH_T: tl.constexpr = GH.dtype.element_ty
        col_ok = cols < H
        h_r = _round_to(h_r + tl.load(B_HH + cols, mask=col_ok, other=0.0).to(ACC)[None, :],
                        GH_T).to(ACC)
        h_z = _round_to(h_z + tl.load(B_HH + H + cols, mask=col_ok, other=0.0).to(ACC)[None, :],
                        GH_T).to(ACC)
        h_n = _round_to(h_n + tl.load(B_HH + 2 * H + cols, mask=col_ok,
                                      other=0.0).to(ACC)[None, :], GH_T).to(ACC)
    h_prev = tl.load(H_PREV + rows[:, None] * stride_pb + cols[None, :] * stride_ph, mask=mask,
                     other=0.0)
    h_prev = h_prev.to(ACC)

    pre_r, pre_z = x_r + h_r, x_z + h_z
    k_r = _encode(_sigmoid(pre_r), LEVELS, "sigmoid")  # [BLOCK_B, BLOCK_H] int32
    k_z = _encode(_sigmoid(pre_z), LEVELS, "sigmoid")
    r = _decode(k_r, LEVELS, "sigmoid", ACC)
    z = _decode(k_z, LEVELS, "sigmoid", ACC)
    pre_n = x_n + r * h_n
    k_n = _encode(_tanh(pre_n), LEVELS, "tanh")
    n = _decode(k_n, LEVELS, "tanh", ACC)
    k_h = _encode((1.0 - z) * n + z * h_prev, LEVELS, "tanh")  # snap to the tanh grid

    out = rows[:, None] * H + cols[None, :]  # [BLOCK_B, BLOCK_H] int64 into contiguous [bs, H]
    tl.store(H_OUT + out, _round_to(_decode(k_h, LEVELS, "tanh", ACC), H_OUT.dtype.element_ty),
             mask=mask)
    if STORE_CODES:
        row = CODES + code_offset + rows * stride_kb  # [BLOCK_B]; plane q at + q * stride_kq
        _store_codes(row, k_r, row_ok, col0, H, H_PAD, BITS, GROUP_CODES, GROUP_BYTES_POW2,
                     BLOCK_B, BLOCK_H)
        _store_codes(row + stride_kq, k_z, row_ok, col0, H, H_PAD, BITS, GROUP_CODES,
                     GROUP_BYTES_POW2, BLOCK_B, BLOCK_H)
        _store_codes(row + 2 * stride_kq, k_n, row_ok, col0, H, H_PAD, BITS, GROUP_CODES,
                     GROUP_BYTES_POW2, BLOCK_B, BLOCK_H)
        _store_codes(row + 3 * stride_kq, k_h, row_ok, col0, H, H_PAD, BITS, GROUP_CODES,
                     GROUP_BYTES_POW2, BLOCK_B, BLOCK_H)
    if STORE_FINAL:  # rows whose sequence ends here: their h code is the packed final state
        tl.store(FINAL + out, k_h.to(tl.uint8), mask=mask & (rows >= done)[:, None])
    if STORE_PRE:  # grad="exact" keeps the pre-activations
        pre = PRE + rows[:, None] * 3 * H + cols[None, :]
        tl.store(pre, pre_r, mask=mask)
        tl.store(pre + H, pre_z, mask=mask)
        tl.store(pre + 2 * H, pre_n, mask=mask)


@triton.jit(do_not_specialize=["bs", "code_offset", "add_rows"])
def _gru_step_bwd_kernel(
    CODES,  # uint8 code rows (r, z, n, h)
    H_PREV,  # [bs, H] ACC; strided
    GH_N,  # [bs, H] ACC, h_prev W_hn^T + b_hn; strided
    DH,  # [bs, H] ACC, dL/dh_t; strided
    DY,  # [bs, H] any float dtype, added to DH when HAS_DY (the output's gradient); strided
    DH_ADD,  # [add_rows, H] any float dtype, added to DH's first rows when HAS_DH_ADD; strided
    DGX,  # [bs, 3H] ACC out, contiguous
    DGH,  # [bs, 3H] ACC out, contiguous
    DH_DIRECT,  # [bs, H] ACC out (dh * z), contiguous; may be DH itself
    DGH_LOW,  # [bs, 3H] out when HAS_DGH_LOW: DGH rounded to its dtype (the product's), contiguous
    PRE,  # [bs, 3H] ACC pre-activations of r, z, n; strided; read when EXACT
    bs,
    H,
    code_offset,
    stride_kq,
    stride_kb,
    stride_pb,
    stride_ph,
    stride_nb,
    stride_nh,
    stride_db,
    stride_dh,
    stride_eb,
    stride_eh,
    stride_yb,
    stride_yh,
    add_rows,
    stride_ab,
    stride_ah,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    EXACT: tl.constexpr,  # gate derivatives f'(pre-activation) instead of from the codes
    HAS_DY: tl.constexpr,
    HAS_DH_ADD: tl.constexpr,
    HAS_DGH_LOW: tl.constexpr,
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

    row = CODES + code_offset + rows * stride_kb  # [BLOCK_B]; plane q at + q * stride_kq
    k_r = _load_codes(row, cols, mask, BITS)  # [BLOCK_B, BLOCK_H] int32
    k_z = _load_codes(row + stride_kq, cols, mask, BITS)
    k_n = _load_codes(row + 2 * stride_kq, cols, mask, BITS)
    h_prev = tl.load(H_PREV + rows[:, None] * stride_pb + cols[None, :] * stride_ph, mask=mask,
                     other=0.0)
    gh_n = tl.load(GH_N + rows[:, None] * stride_nb + cols[None, :] * stride_nh, mask=mask,
                   other=0.0)
    dh = tl.load(DH + rows[:, None] * stride_db + cols[None, :] * stride_dh, mask=mask, other=0.0)
    if HAS_DH_ADD:  # the later step's product, as torch's dh[:add_rows] += dh_add; other rows kept
        added = (rows < add_rows)[:, None]
        dh = tl.where(added, dh + tl.load(DH_ADD + rows[:, None] * stride_ab
                                          + cols[None, :] * stride_ah, mask=mask & added,
                                          other=0.0).to(ACC), dh)
    if HAS_DY:  # one rounding, as torch's dh + dy.to(ACC) (fusion is off)
        dh = dh + tl.load(DY + rows[:, None] * stride_yb + cols[None, :] * stride_yh, mask=mask,
                          other=0.0).to(ACC)

    r = _decode(k_r, LEVELS, "sigmoid", ACC)
    z = _decode(k_z, LEVELS, "sigmoid", ACC)
    n = _decode(k_n, LEVELS, "tanh", ACC)
    if EXACT:  # f' at the pre-activations
        pre = PRE + rows[:, None] * stride_eb
        s_r = _sigmoid(tl.load(pre + cols[None, :] * stride_eh, mask=mask, other=0.0))
        s_z = _sigmoid(tl.load(pre + (cols + H)[None, :] * stride_eh, mask=mask, other=0.0))
        t_n = _tanh(tl.load(pre + (cols + 2 * H)[None, :] * stride_eh, mask=mask, other=0.0))
        dd_r, dd_z, dd_n = s_r * (1.0 - s_r), s_z * (1.0 - s_z), 1.0 - t_n * t_n
    else:  # the bin means of the codes
        dd_r = _code_derivative(k_r, LEVELS, "sigmoid", ACC)
        dd_z = _code_derivative(k_z, LEVELS, "sigmoid", ACC)
        dd_n = _code_derivative(k_n, LEVELS, "tanh", ACC)
    # snap() passes the gradient straight through; the order of products is torch's.
    dpre_n = dh * (1.0 - z) * dd_n
    dpre_r = dpre_n * gh_n * dd_r
    dpre_z = dh * (h_prev - n) * dd_z

    gate = rows[:, None] * 3 * H + cols[None, :]  # gate r's columns of [bs, 3H]
    tl.store(DGX + gate, dpre_r, mask=mask)
    tl.store(DGX + gate + H, dpre_z, mask=mask)
    tl.store(DGX + gate + 2 * H, dpre_n, mask=mask)
    tl.store(DGH + gate, dpre_r, mask=mask)
    tl.store(DGH + gate + H, dpre_z, mask=mask)
    tl.store(DGH + gate + 2 * H, dpre_n * r, mask=mask)
    tl.store(DH_DIRECT + rows[:, None] * H + cols[None, :], dh * z, mask=mask)
    if HAS_DGH_LOW:  # the backward product's operand, rounded here instead of by a cast launch
        LOW: tl.constexpr = DGH_LOW.dtype.element_ty
        tl.store(DGH_LOW + gate, _round_to(dpre_r, LOW), mask=mask)
        tl.store(DGH_LOW + gate + H, _round_to(dpre_z, LOW), mask=mask)
        tl.store(DGH_LOW + gate + 2 * H, _round_to(dpre_n * r, LOW), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host launchers: the signatures and return values of discrnn.kernels.rnn_torch. They check shapes,
# dtypes, devices and that code rows lie inside their buffer (cheap, no sync) and otherwise trust
# the caller, as the layers do.


class TileRule(NamedTuple):
    """How a launch picks its [BLOCK_B, BLOCK_H] tile for a [bs, H] step."""

    elems: int  # BLOCK_B * BLOCK_H at most
    min_h: int  # >= 8: a tile row holds whole groups of packed codes
    max_h: int
    fit_rows: bool  # shrink BLOCK_B to next_pow2(bs) (interpreter: fewer elements to emulate)

    def tile(self, bs: int, H: int) -> tuple[int, int]:
        return _tile(self, bs, H)

    def shapes(self) -> list[tuple[int, int]]:
        """Every tile this rule can give when ``fit_rows`` is off (what the compile test builds)."""
        assert not self.fit_rows
        hs = [1 << p for p in range(self.min_h.bit_length() - 1, self.max_h.bit_length())]
        top = min(self.max_h, self.elems)
        return [(max(1, self.elems // h), h) for h in hs if self.min_h <= h <= top]


def _next_pow2(n: int) -> int:
    """triton.next_power_of_2 in plain Python: the launchers run it per time step, and in recent
    Triton that helper is a constexpr function costing a few microseconds per host call."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=1024)
def _tile(rule: TileRule, bs: int, H: int) -> tuple[int, int]:
    block_h = min(max(_next_pow2(H), rule.min_h), rule.max_h, rule.elems)
    block_b = max(1, rule.elems // block_h)
    if rule.fit_rows:
        block_b = min(block_b, _next_pow2(bs))
    return block_b, block_h


# GPU: 1024-element tiles with rows of 16..128 units, four shapes in all (few compiled variants);
# rows of >= 16 units keep loads coalesced, and a step of bs x H = 64 x 512 gets 32 programs.
GPU_TILE = TileRule(elems=1024, min_h=16, max_h=128, fit_rows=False)
# Interpreter: ~1-10 ms per program, so one program per launch up to 65536 elements.
INTERPRETER_TILE = TileRule(elems=1 << 16, min_h=8, max_h=1 << 16, fit_rows=True)
TILE = INTERPRETER_TILE if INTERPRETING else GPU_TILE  # tests swap in small tiles


def _as_float32(value: float) -> float:
    """``value`` rounded to float32 in plain Python (no tensor: nothing a CUDA graph capture or a
    dispatch mode would see); inf beyond float32's range, as torch's conversion."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


CHECK_DOC = """``check=False``: the per-step launchers skip their argument checks (shapes, dtypes,
devices, contiguity, code rows inside their buffer) and launch on what they are given, which must
then be what a checked call accepts: for the layers' step loops, whose first step of each kind is
a checked call and whose later steps are views of the same buffers (the checks cost more host time
than the launch itself, and on a GPU the host's time per step sets the layers' time)."""


@functools.lru_cache(maxsize=64)  # a launch per step asks; the answer depends on the value only
def cell_clip_value(cell_clip: float) -> float:
    """The LSTM cell bound as the kernels take it: a compile-time constant (one compiled variant
    per value), which Triton materialises as float32; the layers hold float32 values only, so the
    float64 kernels clamp at exactly the value the torch path uses."""
    clip = float(cell_clip)
    if not clip > 0 or clip != _as_float32(clip):
        raise ValueError(f"cell_clip must be > 0 and a float32 value (or inf), got {cell_clip!r}")
    return clip


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


def _checkcompute_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 (the compute dtype), got {t.dtype}")


def _check_float(name: str, t) -> None:
    if t is not None and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _code_args(codes, planes: int, bs: int, H: int, device, check: bool = True) -> tuple:
    """Codes (uint8 tensor [Q, bs, H] or CodeRows) -> (kernel args, BITS) after checking them."""
    rows = as_code_rows(codes)
    if check:
        rows.check("codes", planes, bs, H, device)
    return (rows.data, rows.offset, rows.plane_stride, rows.row_stride), rows.bits


def _launch(kernel, bs: int, width: int, args, relaunch: bool = False, **constexprs) -> None:
    """One program per tile of [bs, width] (width: H, or the padded code row when packing).
    ``relaunch``: a later step of a pass (``check=False``), see :mod:`.launch`."""
    block_b, block_h = TILE.tile(bs, width)
    if block_h % constexprs.get("GROUP_CODES", 1):
        raise ValueError(f"tile rows of {block_h} units cannot hold whole groups of "
                         f"{constexprs['GROUP_CODES']} packed codes (TileRule.min_h must be >= 8)")
    grid = (-(-bs // block_b), -(-width // block_h))
    launch(kernel, grid, args, dict(constexprs, BLOCK_B=block_b, BLOCK_H=block_h,
                                    enable_fp_fusion=False), relaunch)


def _out_tensor(name: str, out, shape: tuple, dtype, device, any_float: bool = False,
                check: bool = True) -> torch.Tensor:
    """A kernel's float output: ``out`` (checked: the kernels write [bs, n] row-major) or a fresh
    tensor. ``any_float``: the kernel rounds to ``out``'s float dtype, so any is accepted."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not check:
        return out
    if any_float and not out.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {out.dtype}")
    if not any_float and out.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (the compute dtype), got {out.dtype}")
    _check(name, out, shape, device)
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel writes it row by row)")
    return out


def _forward_target(out, planes: int, bs: int, H: int, device, store: bool, check: bool = True):
    """(CodeRows a forward launch packs its codes into or None, what it returns as codes)."""
    if not store:
        return None, None
    if out is None:  # rnn_torch's return: a fresh uint8 tensor [planes, bs, H]
        codes = torch.empty(planes, bs, H, dtype=torch.uint8, device=device)
        return CodeRows.of_tensor(codes), codes
    rows = as_code_rows(out)
    if check:
        rows.check("out", planes, bs, H, device)
    return rows, out


def _check_final(final, planes: int, bs: int, H: int, device) -> None:
    if final is None:
        return
    if (final.dtype != torch.uint8 or final.dim() != 3 or final.shape[0] != planes
            or final.shape[1] < bs or final.shape[2] != H or not final.is_contiguous()):
        raise ValueError(f"final must be a contiguous uint8 tensor [{planes}, >= {bs}, {H}], got "
                         f"{final.dtype} {tuple(final.shape)}")
    _check("final", final, tuple(final.shape), device)


@functools.lru_cache(maxsize=64)
def _code_constexprs(bits: int, store_codes: bool, store_final: bool) -> dict:
    """A forward launch's code constexprs (read-only: the launchers unpack it, a step each)."""
    return dict(BITS=bits, GROUP_CODES=group_codes(bits),
                GROUP_BYTES_POW2=_next_pow2(group_bytes(bits)), STORE_CODES=store_codes,
                STORE_FINAL=store_final)


def _code_outputs(rows: CodeRows | None, final, H: int, device):
    """(CODES, FINAL, H_PAD, code_offset, stride_kq, stride_kb), constexprs of a forward launch."""
    bits = rows.bits if rows is not None else 8
    constexprs = _code_constexprs(bits, rows is not None, final is not None)
    # A disabled output still needs a pointer (never written): the other output's buffer, if any.
    spare = rows.data if rows is not None else final
    if spare is None:
        spare = torch.empty(1, dtype=torch.uint8, device=device)
    final = spare if final is None else final
    if rows is None:
        return (spare, final, H, 0, 0, 0), constexprs
    return (rows.data, final, rows.padded, rows.offset, rows.plane_stride, rows.row_stride), constexprs


def lstm_step_forward(gates, c_prev, levels, out=None, final=None, done=0, store=True,
                      c_out=None, m_out=None, cell_clip: float = math.inf, check: bool = True):
    """gates [bs, 4H] (pre-activations, bias included, any float dtype, any strides), c_prev [bs, H]
    (float32/64: the compute dtype) -> codes, c [bs, H], m = o * u [bs, H] (compute dtype). One
    kernel. ``out``, ``final``, ``done``, ``store``, ``c_out``, ``m_out``: as
    ``rnn_torch.lstm_step_forward`` (the codes are packed into ``out`` by this kernel; ``c_out``
    may be ``c_prev`` itself, ``m_out`` any float dtype). ``cell_clip``: see :func:`cell_clip_value`.
    ``check=False`` skips the argument checks (:data:`CHECK_DOC`)."""
    bs, H = c_prev.shape
    acc, dev = c_prev.dtype, c_prev.device
    if check:
        _checkcompute_dtype("c_prev", c_prev)
        _check("gates", gates, (bs, 4 * H), dev)
        _check_device(dev)
        _check_final(final, 2, bs, H, dev)
    rows, returned = _forward_target(out, LSTM_CODES, bs, H, dev, store, check)
    c = _out_tensor("c_out", c_out, (bs, H), acc, dev, check=check)
    m = _out_tensor("m_out", m_out, (bs, H), acc, dev, any_float=True, check=check)
    if bs * H:
        (codes, fin, width, offset, stride_kq, stride_kb), constexprs = _code_outputs(rows, final, H, dev)
        args = (gates, c_prev, codes, fin, c, m, bs, H, width, offset, done, *gates.stride(),
                *c_prev.stride(), stride_kq, stride_kb, fin.stride(0) if final is not None else 0)
        _launch(_lstm_step_fwd_kernel, bs, width, args, not check, LEVELS=levels,
                CELL_CLIP=cell_clip_value(cell_clip), **constexprs)
    return returned, c, m


def lstm_recompute_cell(codes, c_prev: torch.Tensor, levels: int, cell_clip: float = math.inf,
                        m_out=None, steps: int = 1) -> torch.Tensor:
    """c_t from the saved i, f, g codes (uint8 [>=3, bs, H] or CodeRows; >= 4 planes with
    ``m_out``) and c_{t-1} [bs, H] (float32/64): bit-identical to the c that
    :func:`lstm_step_forward` returned. With ``m_out`` ([bs, H], any float dtype, contiguous) also
    m = o * u there, u's code rebuilt from c_t as the forward kernel computed it (bit-identical to
    its m). ``steps``: the codes hold that many consecutive steps of bs rows each (steps * bs code
    rows; ``m_out`` [steps * bs, H]), and the result is c after each of them, [steps * bs, H]
    (step s in rows s * bs ..). One kernel, whatever ``steps``."""
    _checkcompute_dtype("c_prev", c_prev)
    bs, H = c_prev.shape
    steps = _check_steps(steps)
    _check_device(c_prev.device)
    rows = steps * bs
    code_args, bits = _code_args(codes, 3 if m_out is None else LSTM_CODES, rows, H,
                                 c_prev.device)
    c = torch.empty(rows, H, dtype=c_prev.dtype, device=c_prev.device)
    if m_out is not None:
        m_out = _out_tensor("m_out", m_out, (rows, H), c_prev.dtype, c_prev.device,
                            any_float=True)
    if bs * H:
        m = c if m_out is None else m_out  # a pointer never written without STORE_M
        args = (code_args[0], c_prev, c, m, bs, H, *code_args[1:], *c_prev.stride(), steps)
        _launch(_lstm_cell_kernel, bs, H, args, LEVELS=levels, BITS=bits,
                CELL_CLIP=cell_clip_value(cell_clip), STORE_M=m_out is not None)
    return c


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


def _decode_output(codes, levels: int, dtype: torch.dtype, cell: str, planes: int,
                   c=None) -> torch.Tensor:
    rows = as_code_rows(codes)
    bs, H = rows.rows, rows.hidden
    _check_device(rows.data.device)
    code_args, bits = _code_args(rows, planes, bs, H, rows.data.device)
    out = torch.empty(bs, H, dtype=dtype, device=rows.data.device)
    if c is not None:
        _check("c", c, (bs, H), rows.data.device)
        c = _as(c, compute_dtype(dtype))
    if bs * H:
        c_arg = out if c is None else c  # a pointer never read for the GRU
        args = (code_args[0], c_arg, out, bs, H, *code_args[1:], *c_arg.stride())
        _launch(_output_kernel, bs, H, args, LEVELS=levels, BITS=bits, CELL=cell)
    return out


def lstm_output(codes, c: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """m = o * u [bs, H] in ``dtype`` from the saved codes (uint8 [4, bs, H] or CodeRows) and c_t
    [bs, H] (converted to the compute dtype of ``dtype``): u's code rebuilt from c_t as the forward
    kernel computed it. One kernel."""
    return _decode_output(codes, levels, dtype, "lstm", LSTM_CODES, c)


def gru_output(codes, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """h_t [bs, H] in ``dtype`` from the saved codes (uint8 [4, bs, H] or CodeRows)."""
    return _decode_output(codes, levels, dtype, "gru", GRU_CODES)


def lstm_step_backward(codes, c_prev, dm, dc, levels: int, dgates_out=None, dc_prev_out=None,
                       preact=None, cell_clip: float = math.inf, check: bool = True, dy=None,
                       dgates_low_out=None):
    """Backward of one step: codes (uint8 [4, bs, H] or CodeRows), c_prev [bs, H] (float32/64),
    dm = dL/dm_t [bs, H] (any float dtype, widened exactly in the kernel) and dc = dL/dc_t [bs, H]
    (converted to c_prev's dtype) -> dgates [bs, 4H] (i, f, g, o), dc_prev [bs, H], both in
    c_prev's dtype, written to ``dgates_out`` / ``dc_prev_out`` when given (``dc_prev_out`` may be
    ``dc`` itself). ``preact`` [bs, 4H]: the gate pre-activations (``grad="exact"``), as
    ``rnn_torch.lstm_step_backward``. ``dy`` [bs, H] (any float dtype): added to dm in the kernel
    (the step's output gradient; dm + dy is dL/dm_t). ``dgates_low_out`` ([bs, 4H] of a lower float
    dtype, contiguous): also receives dgates rounded to its dtype, as ``dgates.to(dtype)`` (the
    operand of a bf16 / fp16 backward product, without a cast launch). One kernel.
    ``check=False`` skips the argument checks (:data:`CHECK_DOC`)."""
    bs, H = c_prev.shape
    acc, dev = c_prev.dtype, c_prev.device
    if check:
        _checkcompute_dtype("c_prev", c_prev)
        for name, t in (("dm", dm), ("dc", dc)) + ((("dy", dy),) if dy is not None else ()):
            _check(name, t, (bs, H), dev)
        _check_float("dm", dm)
        _check_float("dy", dy)
        _check_device(dev)
        if preact is not None:
            _check("preact", preact, (bs, 4 * H), dev)
    code_args, bits = _code_args(codes, LSTM_CODES, bs, H, dev, check)
    dc = _as(dc, acc)
    if preact is not None:
        preact = _as(preact, acc)
    dgates = _out_tensor("dgates_out", dgates_out, (bs, 4 * H), acc, dev, check=check)
    dc_prev = _out_tensor("dc_prev_out", dc_prev_out, (bs, H), acc, dev, check=check)
    if dgates_low_out is not None:
        dgates_low_out = _out_tensor("dgates_low_out", dgates_low_out, (bs, 4 * H),
                                     dgates_low_out.dtype, dev, any_float=True, check=check)
    if bs * H:
        pre = dm if preact is None else preact  # a pointer that is never read without EXACT
        dy_arg = dm if dy is None else dy  # a pointer that is never read without HAS_DY
        low = dgates if dgates_low_out is None else dgates_low_out  # written with HAS_DG_LOW only
        args = (code_args[0], c_prev, dm, dy_arg, dc, dgates, dc_prev, low, pre, bs, H,
                *code_args[1:], *c_prev.stride(), *dm.stride(), *dy_arg.stride(), *dc.stride(),
                *pre.stride())
        _launch(_lstm_step_bwd_kernel, bs, H, args, not check, LEVELS=levels, BITS=bits,
                EXACT=preact is not None, HAS_DY=dy is not None,
                HAS_DG_LOW=dgates_low_out is not None, CELL_CLIP=cell_clip_value(cell_clip))
    return dgates, dc_prev


def gru_step_forward(gx, gh, h_prev, levels, out=None, final=None, done=0, store=True, h_out=None,
                     preact_out=None, check: bool = True, b_hh=None):
    """gx = x W_ih^T + b_ih [bs, 3H], gh = h W_hh^T + b_hh [bs, 3H], h_prev [bs, H] (any float
    dtype, any strides) -> codes, h [bs, H] in the compute dtype (exactly the level of the h code).
    One kernel. ``out``, ``final``, ``done``, ``store``, ``h_out`` (any float dtype),
    ``preact_out`` ([bs, 3H], compute dtype, contiguous), ``b_hh`` ([3H] in gh's dtype: gh is then
    h W_hh^T, and the kernel adds the bias as ``gh += b_hh`` rounds): as
    ``rnn_torch.gru_step_forward``. ``check=False`` skips the argument checks (:data:`CHECK_DOC`)."""
    bs, H = h_prev.shape
    dev = h_prev.device
    if check:
        _check("gx", gx, (bs, 3 * H), dev)
        _check("gh", gh, (bs, 3 * H), dev)
        _check_device(dev)
        _check_final(final, 1, bs, H, dev)
        if b_hh is not None:
            _check("b_hh", b_hh, (3 * H,), dev)
            if b_hh.dtype != gh.dtype:
                raise TypeError(f"b_hh must have gh's dtype {gh.dtype}, got {b_hh.dtype}")
    acc = compute_dtype(h_prev.dtype)
    if b_hh is not None and b_hh.stride(0) != 1:
        b_hh = b_hh.contiguous()
    if not gx.dtype == gh.dtype == h_prev.dtype:  # one input dtype per kernel: meet in ACC
        if b_hh is not None:  # added in gh's own dtype first, as the kernel would
            gh, b_hh = gh + b_hh, None
        gx, gh, h_prev = _as(gx, acc), _as(gh, acc), _as(h_prev, acc)
    rows, returned = _forward_target(out, GRU_CODES, bs, H, dev, store, check)
    h = _out_tensor("h_out", h_out, (bs, H), acc, dev, any_float=True, check=check)
    if preact_out is not None:
        preact_out = _out_tensor("preact_out", preact_out, (bs, 3 * H), acc, dev, check=check)
    if bs * H:
        (codes, fin, width, offset, stride_kq, stride_kb), constexprs = _code_outputs(rows, final, H, dev)
        pre = h if preact_out is None else preact_out  # a pointer never written without STORE_PRE
        bias = gh if b_hh is None else b_hh  # a pointer never read without HAS_BIAS
        args = (gx, gh, bias, h_prev, codes, fin, h, pre, bs, H, width, offset, done,
                *gx.stride(), *gh.stride(), *h_prev.stride(), stride_kq, stride_kb)
        _launch(_gru_step_fwd_kernel, bs, width, args, not check, LEVELS=levels,
                STORE_PRE=preact_out is not None, HAS_BIAS=b_hh is not None, **constexprs)
    return returned, h


def gru_step_backward(codes, h_prev, gh_n, dh, levels: int, dgx_out=None, dgh_out=None,
                      dh_direct_out=None, preact=None, check: bool = True, dy=None,
                      dgh_low_out=None, dh_add=None):
    """Backward of one step: codes (uint8 [4, bs, H] or CodeRows), h_prev [bs, H], gh_n =
    h_prev W_hn^T + b_hn [bs, H], dh = dL/dh_t [bs, H] -> dgx [bs, 3H], dgh [bs, 3H],
    dh_prev_direct = dh * z [bs, H], in the compute dtype of h_prev, written to the ``*_out``
    tensors when given (``dh_direct_out`` may be ``dh`` itself). ``preact`` [bs, 3H]: the
    pre-activations of r, z, n (``grad="exact"``), as ``rnn_torch.gru_step_backward``. ``dy``
    [bs, H] (any float dtype): added to dh in the kernel (the step's output gradient; dh + dy is
    dL/dh_t; ``dh_direct_out`` may still be ``dh``). ``dgh_low_out`` ([bs, 3H] of a lower float
    dtype, contiguous): also receives dgh rounded to its dtype, as ``dgh.to(dtype)`` (the operand
    of a bf16 / fp16 backward product, without a cast launch). ``dh_add`` ([n, H], n <= bs, any
    float dtype): added to dh's first n rows first, as ``dh[:n] += dh_add`` (the later step's
    product dgh W_hh in its own dtype, without an add launch); the sum is what ``dh_direct_out``
    scales. One kernel. ``check=False`` skips the argument checks (:data:`CHECK_DOC`)."""
    bs, H = h_prev.shape
    dev = h_prev.device
    if check:
        for name, t in (("gh_n", gh_n), ("dh", dh)) + ((("dy", dy),) if dy is not None else ()):
            _check(name, t, (bs, H), dev)
        _check_float("dy", dy)
        if dh_add is not None:
            _check_float("dh_add", dh_add)
            if dh_add.dim() != 2 or dh_add.shape[0] > bs or dh_add.shape[1] != H:
                raise ValueError(f"dh_add must have shape (n, {H}) with n <= {bs}, got "
                                 f"{tuple(dh_add.shape)}")
            _check("dh_add", dh_add, tuple(dh_add.shape), dev)
        _check_device(dev)
        if preact is not None:
            _check("preact", preact, (bs, 3 * H), dev)
    code_args, bits = _code_args(codes, GRU_CODES, bs, H, dev, check)
    acc = compute_dtype(h_prev.dtype)
    h_prev, gh_n, dh = _as(h_prev, acc), _as(gh_n, acc), _as(dh, acc)
    if preact is not None:
        preact = _as(preact, acc)
    dgx = _out_tensor("dgx_out", dgx_out, (bs, 3 * H), acc, dev, check=check)
    dgh = _out_tensor("dgh_out", dgh_out, (bs, 3 * H), acc, dev, check=check)
    dh_direct = _out_tensor("dh_direct_out", dh_direct_out, (bs, H), acc, dev, check=check)
    if dgh_low_out is not None:
        dgh_low_out = _out_tensor("dgh_low_out", dgh_low_out, (bs, 3 * H), dgh_low_out.dtype, dev,
                                  any_float=True, check=check)
    if bs * H:
        pre = dh if preact is None else preact  # a pointer that is never read without EXACT
        dy_arg = dh if dy is None else dy  # a pointer that is never read without HAS_DY
        low = dgh if dgh_low_out is None else dgh_low_out  # written with HAS_DGH_LOW only
        add = dh if dh_add is None else dh_add  # a pointer that is never read without HAS_DH_ADD
        args = (code_args[0], h_prev, gh_n, dh, dy_arg, add, dgx, dgh, dh_direct, low, pre, bs, H,
                *code_args[1:], *h_prev.stride(), *gh_n.stride(), *dh.stride(), *pre.stride(),
                *dy_arg.stride(), add.shape[0], *add.stride())
        _launch(_gru_step_bwd_kernel, bs, H, args, not check, LEVELS=levels, BITS=bits,
                EXACT=preact is not None, HAS_DY=dy is not None, HAS_DH_ADD=dh_add is not None,
                HAS_DGH_LOW=dgh_low_out is not None)
    return dgx, dgh, dh_direct
