"""Triton codec kernels: quantize + pack, and unpack + dequantize, in one pass each.

Bit-for-bit the semantics of :mod:`discrnn.kernels.codec_torch` (the reference and test oracle):
the same level formulas, the same dense little-endian bit stream, NaN -> code 0.

Layout of a launch (``n`` codes, ``b`` bits):

* pack: a program owns ``BLOCK_GROUPS`` groups of ``G = 8 / gcd(b, 8)`` codes, loads them as a
  [BLOCK_GROUPS, G] tile, ORs each group's codes into one int64 word (G * b <= 56 bits) and stores
  the word's ``b * G / 8`` bytes. Groups never share a byte, so programs never share a byte.
* unpack: a program owns ``BLOCK`` codes. For 6 and 7 bits it reads them as the pack wrote them:
  [groups, bytes] tiles, one int64 word per group, [groups, G] codes out (wide stores). For other
  widths code i reads the (at most two) bytes that hold stream bits [i * b, i * b + b).

Launch shapes per width (:data:`CUDA_LAUNCH`) were measured on an H200 by scripts/tune_codec.py
(2^28 float32 values, share of a float32 copy's bandwidth): 6-bit pack 74% -> 88% with 8 warps,
6-bit unpack 66% -> 94% and 7-bit unpack 62% -> 86% with the grouped read.

Quantizers are launched with ``enable_fp_fusion=False``: a fused multiply-add in
``(v + 1) * (L - 1) / 2 + 0.5`` rounds differently from the separate torch ops exactly at ties.
Decoding divides with ``div_rn`` (IEEE), because Triton's default float32 division is approximate.
The interpreter has no libdevice, so tanh and sigmoid are written with ``exp``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .codec_torch import group_bytes, group_codes

__all__ = [
    "INTERPRETING",
    "triton_quantize_pack",
    "triton_unpack",
    "triton_unpack_dequantize",
    "triton_code_grad",
    "triton_pack",
]

# Fixed when the kernels below are decorated (see shared/TRITON_NOTES.md): read once, here.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Codes per program. The interpreter pays ~1-10 ms per program, so it gets few, large programs.
DEFAULT_BLOCK_CODES = 65536 if INTERPRETING else 4096

# bits -> (pack warps, unpack codes per program, unpack warps, grouped unpack) on a GPU, from
# scripts/tune_codec.py on an H200 (results/gpu_check/tune_codec_*.csv); other widths keep
# Triton's default of 4 warps and DEFAULT_BLOCK_CODES, which reach 93-103% of a copy at 8 bits.
CUDA_LAUNCH = {6: (8, 4096, 8, True), 7: (8, 8192, 16, True)}


@triton.jit
def _tanh(x):
    # exp(-2|x|) never overflows; tanh(+-inf) = +-1, tanh(nan) = nan.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _exact_div(num, den):
    # float64 division is IEEE in Triton; float32 `/` is not, so ask for round-to-nearest.
    if num.dtype == tl.float64:
        return num / den
    else:
        return tl.math.div_rn(num, den)


@triton.jit
def _encode(v, LEVELS: tl.constexpr, KIND: tl.constexpr):
    """Values in the KIND range (float32/64) -> codes (int32). NaN -> 0, +-Inf -> end codes."""
    if KIND == "tanh":
        u = (v + 1.0) * ((LEVELS - 1) / 2)
    else:
        u = v * (LEVELS - 1.0)
    k = tl.floor(u + 0.5)
    k = tl.minimum(tl.maximum(k, 0.0), LEVELS - 1.0)
    k = tl.where(v != v, 0.0, k)
    return k.to(tl.int32)


@triton.jit
def _decode(code, LEVELS: tl.constexpr, KIND: tl.constexpr, ACC: tl.constexpr):
    """Codes -> level values in ACC (float32/64), correctly rounded."""
    k = code.to(ACC)
    if KIND == "tanh":
        num = 2.0 * k - (LEVELS - 1.0)
    else:
        num = k
    den = tl.zeros_like(num) + (LEVELS - 1.0)
    return _exact_div(num, den)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """Round float32/64 values to DTYPE, to nearest even as torch does. bfloat16 is rounded by hand:
    the interpreter's float32 -> bfloat16 cast truncates."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, 0x7FC0, bits)  # the carry could turn a NaN payload into 0
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _code_derivative(code, LEVELS: tl.constexpr, KIND: tl.constexpr, ACC: tl.constexpr):
    """Mean of f' over the bin of outputs that round to each level (see torch_code_derivative)."""
    center = _decode(code, LEVELS, KIND, ACC)
    if KIND == "tanh":
        lo = tl.maximum(center - 1.0 / (LEVELS - 1), -1.0)
        hi = tl.minimum(center + 1.0 / (LEVELS - 1), 1.0)
    else:
        lo = tl.maximum(center - 0.5 / (LEVELS - 1), 0.0)
        hi = tl.minimum(center + 0.5 / (LEVELS - 1), 1.0)
    mean_sq = (hi * hi + hi * lo + lo * lo) / 3.0
    if KIND == "tanh":
        d = 1.0 - mean_sq
    else:
        d = 0.5 * (lo + hi) - mean_sq
    return d


@triton.jit
def _quantize_pack_kernel(
    X,  # [n] input: uint8 codes (INPUT="codes") or floats
    PACKED,  # [n_bytes] uint8 out, when WRITE_PACKED
    Y,  # [n] level values out (dtype of Y), when WRITE_VALUES
    n,
    n_bytes,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    KIND: tl.constexpr,  # "tanh" | "sigmoid": the value range
    INPUT: tl.constexpr,  # "codes" | "values" (already in range) | "preactivation" (apply KIND)
    WRITE_PACKED: tl.constexpr,
    WRITE_VALUES: tl.constexpr,
    GROUP_CODES: tl.constexpr,
    GROUP_BYTES: tl.constexpr,
    GROUP_BYTES_POW2: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    groups = pid * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)  # [BG]
    lanes = tl.arange(0, GROUP_CODES)  # [G]
    idx = groups[:, None] * GROUP_CODES + lanes[None, :]  # [BG, G]
    in_bounds = idx < n
    if INPUT == "codes":
        code = tl.load(X + idx, mask=in_bounds, other=0).to(tl.int32)
    else:
        x = tl.load(X + idx, mask=in_bounds, other=0.0)
        if x.dtype == tl.float64:
            v = x
        else:
            v = x.to(tl.float32)
        if INPUT == "preactivation":
            if KIND == "tanh":
                v = _tanh(v)
            else:
                v = _sigmoid(v)
        code = _encode(v, LEVELS, KIND)
        if WRITE_VALUES:
            value = _decode(code, LEVELS, KIND, v.dtype)
            if INPUT == "preactivation":
                value = tl.where(v != v, v, value)  # a unit's output stays NaN, as torch.tanh's
            tl.store(Y + idx, _round_to(value, Y.dtype.element_ty), mask=in_bounds)
        code = tl.where(in_bounds, code, 0)  # padding bits of the last byte are 0
    if WRITE_PACKED:
        shifts = (lanes * BITS).to(tl.int64)  # [G]
        word = tl.sum(code.to(tl.int64) << shifts[None, :], axis=1)  # [BG], fields are disjoint
        byte_lanes = tl.arange(0, GROUP_BYTES_POW2)  # [BP] (power of two, masked to GROUP_BYTES)
        out = (word[:, None] >> (byte_lanes * 8).to(tl.int64)[None, :]) & 0xFF  # [BG, BP]
        byte_idx = groups[:, None] * GROUP_BYTES + byte_lanes[None, :]
        byte_mask = (byte_lanes[None, :] < GROUP_BYTES) & (byte_idx < n_bytes)
        tl.store(PACKED + byte_idx, out.to(tl.uint8), mask=byte_mask)


@triton.jit
def _unpack_kernel(
    PACKED,  # [n_bytes] uint8
    DY,  # [n] upstream gradient, when OUTPUT="grad"
    OUT,  # [n] uint8 codes, level values or gradient
    n,
    n_bytes,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    KIND: tl.constexpr,
    OUTPUT: tl.constexpr,  # "codes" | "values" | "grad" (DY * derivative estimated from the code)
    BLOCK: tl.constexpr,  # codes per program
    GROUPED: tl.constexpr,  # read whole byte groups (see the module docstring) or two bytes a code
    GROUP_CODES: tl.constexpr,
    GROUP_BYTES: tl.constexpr,
    GROUP_BYTES_POW2: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if GROUPED:
        groups = pid * (BLOCK // GROUP_CODES) + tl.arange(0, BLOCK // GROUP_CODES)  # [BG]
        byte_lanes = tl.arange(0, GROUP_BYTES_POW2)  # [BP]
        byte_idx = groups[:, None] * GROUP_BYTES + byte_lanes[None, :]
        byte_ok = (byte_lanes[None, :] < GROUP_BYTES) & (byte_idx < n_bytes)
        b = tl.load(PACKED + byte_idx, mask=byte_ok, other=0).to(tl.int64)
        word = tl.sum(b << (byte_lanes * 8).to(tl.int64)[None, :], axis=1)  # [BG], disjoint bytes
        lanes = tl.arange(0, GROUP_CODES)  # [G]
        idx = groups[:, None] * GROUP_CODES + lanes[None, :]  # [BG, G]
        code = ((word[:, None] >> (lanes * BITS).to(tl.int64)[None, :]) & ((1 << BITS) - 1)).to(
            tl.int32
        )
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        bit = idx * BITS
        byte = bit >> 3
        shift = (bit & 7).to(tl.int32)
        word = tl.load(PACKED + byte, mask=idx < n, other=0).to(tl.int32)
        if 8 % BITS != 0:  # only then can a code straddle two bytes
            nxt = tl.load(PACKED + byte + 1, mask=(idx < n) & (byte + 1 < n_bytes), other=0)
            word = word | (nxt.to(tl.int32) << 8)
        code = (word >> shift) & ((1 << BITS) - 1)  # [BLOCK] int32, non-negative
    in_bounds = idx < n
    if OUTPUT == "codes":
        tl.store(OUT + idx, code.to(tl.uint8), mask=in_bounds)
    else:
        if OUT.dtype.element_ty == tl.float64:
            acc: tl.constexpr = tl.float64
        else:
            acc: tl.constexpr = tl.float32
        if OUTPUT == "values":
            result = _round_to(_decode(code, LEVELS, KIND, acc), OUT.dtype.element_ty)
        else:
            dy = tl.load(DY + idx, mask=in_bounds, other=0.0).to(acc)
            result = (dy * _code_derivative(code, LEVELS, KIND, acc)).to(OUT.dtype.element_ty)
        tl.store(OUT + idx, result, mask=in_bounds)


# ----------------------------------------------------------------------------------------------
# Host launchers. They take flat contiguous tensors on one device and trust their arguments: the
# public functions in discrnn.codec validate before calling them.


def _quantize_pack_launch(x, levels, kind, bits, input_kind, want_packed, values_dtype, block_codes):
    n = x.numel()
    n_bytes = (n * bits + 7) // 8
    packed = torch.empty(n_bytes if want_packed else 0, dtype=torch.uint8, device=x.device)
    values = (
        torch.empty(n, dtype=values_dtype, device=x.device) if values_dtype is not None else None
    )
    if n == 0:
        return packed, values
    g_codes = group_codes(bits)
    block_groups = max(1, (block_codes or DEFAULT_BLOCK_CODES) // g_codes)
    block_groups = triton.next_power_of_2(block_groups)
    grid = (triton.cdiv(triton.cdiv(n, g_codes), block_groups),)
    g_bytes = group_bytes(bits)
    _quantize_pack_kernel[grid](
        x,
        packed if want_packed else x,
        values if values is not None else x,
        n,
        n_bytes,
        LEVELS=levels,
        BITS=bits,
        KIND=kind,
        INPUT=input_kind,
        WRITE_PACKED=want_packed,
        WRITE_VALUES=values is not None,
        GROUP_CODES=g_codes,
        GROUP_BYTES=g_bytes,
        GROUP_BYTES_POW2=triton.next_power_of_2(g_bytes),
        BLOCK_GROUPS=block_groups,
        num_warps=CUDA_LAUNCH.get(bits, (4,))[0],
        enable_fp_fusion=False,
    )
    return packed, values


def triton_pack(codes: torch.Tensor, bits: int, block_codes: int | None = None) -> torch.Tensor:
    """uint8 codes -> packed bytes. ``levels``/``kind`` do not matter for codes."""
    packed, _ = _quantize_pack_launch(codes, 2, "tanh", bits, "codes", True, None, block_codes)
    return packed


def triton_quantize_pack(
    x: torch.Tensor,
    levels: int,
    kind: str,
    bits: int,
    activation: bool = False,
    values_dtype: torch.dtype | None = None,
    want_packed: bool = True,
    block_codes: int | None = None,
):
    """Floats -> (packed bytes, level values or None). ``activation`` applies tanh/sigmoid first;
    ``values_dtype`` also writes the level values (the discrete unit's output) in the same pass."""
    input_kind = "preactivation" if activation else "values"
    return _quantize_pack_launch(
        x, levels, kind, bits, input_kind, want_packed, values_dtype, block_codes
    )


def _unpack_launch(packed, n, bits, levels, kind, output, out_dtype, dy, block_codes):
    out = torch.empty(n, dtype=out_dtype, device=packed.device)
    if n == 0:
        return out
    _, tuned_block, warps, grouped = CUDA_LAUNCH.get(bits, (4, DEFAULT_BLOCK_CODES, 4, False))
    if INTERPRETING:
        tuned_block = DEFAULT_BLOCK_CODES
    g_codes, g_bytes = group_codes(bits), group_bytes(bits)
    block = triton.next_power_of_2(max(block_codes or tuned_block, g_codes))
    grid = (triton.cdiv(n, block),)
    _unpack_kernel[grid](
        packed,
        dy if dy is not None else out,
        out,
        n,
        packed.numel(),
        LEVELS=levels,
        BITS=bits,
        KIND=kind,
        OUTPUT=output,
        BLOCK=block,
        GROUPED=grouped,
        GROUP_CODES=g_codes,
        GROUP_BYTES=g_bytes,
        GROUP_BYTES_POW2=triton.next_power_of_2(g_bytes),
        num_warps=warps,
        enable_fp_fusion=False,
    )
    return out


def triton_unpack(packed, bits, numel, block_codes=None):
    return _unpack_launch(packed, numel, bits, 2, "tanh", "codes", torch.uint8, None, block_codes)


def triton_unpack_dequantize(packed, bits, numel, levels, kind, dtype, block_codes=None):
    return _unpack_launch(packed, numel, bits, levels, kind, "values", dtype, None, block_codes)


def triton_code_grad(packed, bits, numel, levels, kind, dy, block_codes=None):
    """dy * (derivative estimated from each code), in dy's dtype."""
    return _unpack_launch(packed, numel, bits, levels, kind, "grad", dy.dtype, dy, block_codes)
