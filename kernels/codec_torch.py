"""Pure-torch codec: the reference every Triton kernel is tested against, and the backend for
every device that is not CUDA.

Semantics (shared bit for bit with ``discrnn.kernels.codec``):

* Arithmetic is float64 for float64 inputs and float32 for everything else.
* ``encode`` (tanh range): k = clamp(floor((v + 1) * (L - 1) / 2 + 0.5), 0, L - 1);
  (sigmoid range): k = clamp(floor(v * (L - 1) + 0.5), 0, L - 1). NaN gives code 0, +-Inf the end codes.
* ``decode`` (tanh): (2k - (L - 1)) / (L - 1); (sigmoid): k / (L - 1), each one correctly rounded
  division, so the end levels are exactly -1/0 and +1 and tanh levels are symmetric about 0.
* Bit stream: code i occupies bits [i * b, (i + 1) * b) of a little-endian stream; byte j holds
  stream bits [8j, 8j + 8), least significant bit first; unused high bits of the last byte are 0.

All functions here take and return flat (1-D) tensors; shapes are the public layer's business.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "group_codes",
    "group_bytes",
    "torch_encode",
    "torch_decode",
    "torch_pack",
    "torch_unpack",
    "torch_quantize_pack",
    "torch_unpack_dequantize",
    "torch_activation",
    "torch_code_derivative",
    "torch_exact_derivative",
]


def group_codes(bits: int) -> int:
    """Codes in the smallest whole-byte group: 8 / gcd(bits, 8) (6 bits: 4 codes)."""
    return 8 // math.gcd(bits, 8)


def group_bytes(bits: int) -> int:
    """Bytes in the smallest whole-byte group: bits / gcd(bits, 8) (6 bits: 3 bytes)."""
    return bits // math.gcd(bits, 8)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    x = x.to(compute_dtype(x.dtype))
    return torch.tanh(x) if kind == "tanh" else torch.sigmoid(x)


def torch_encode(values: torch.Tensor, levels: int, kind: str) -> torch.Tensor:
    """Floats in the ``kind`` range -> uint8 level indices (see module docstring)."""
    v = values.to(compute_dtype(values.dtype))
    # One fresh temporary, then in place: the same roundings as (v + 1) * s + 0.5, without paging in
    # four full-size temporaries (which dominated the CPU time).
    if kind == "tanh":
        u = torch.add(v, 1.0).mul_((levels - 1) / 2)
    else:
        u = torch.mul(v, float(levels - 1))
    k = u.add_(0.5).floor_().clamp_(0.0, float(levels - 1)).nan_to_num_(nan=0.0)
    return k.to(torch.uint8)


def torch_decode(codes: torch.Tensor, levels: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 level indices -> level values in ``dtype``."""
    acc = compute_dtype(dtype)
    numerator = codes.to(acc, copy=True)
    if kind == "tanh":
        numerator.mul_(2.0).sub_(float(levels - 1))  # exact: small integers
    # A device tensor as divisor: CUDA turns division by a Python scalar into a multiplication
    # by its reciprocal, which is not correctly rounded and would break bit-exactness.
    denominator = torch.full((), levels - 1, dtype=acc, device=codes.device)
    return numerator.div_(denominator).to(dtype)


def _repeat(pattern: int, period: int) -> int:
    out = 0
    for shift in range(0, 64, period):
        out |= pattern << shift
    return out


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _swar_steps(bits: int) -> list[tuple[int, int, int]]:
    """(shift, keep_mask, moved_mask) for the three halving steps that squeeze eight byte lanes of an
    int64 word into its low 8 * bits bits. Step s joins lanes of 8 * 2**s bits that each hold a field
    of bits * 2**s bits: the odd field moves down by the gap between them."""
    steps = []
    for s in range(3):
        lane, field = 8 << s, bits << s
        steps.append(
            (
                lane - field,
                _as_int64(_repeat((1 << field) - 1, 2 * lane)),
                _as_int64(_repeat(((1 << field) - 1) << field, 2 * lane)),
            )
        )
    return steps


def _copy_columns(dst: torch.Tensor, src: torch.Tensor, width: int) -> None:
    # One strided copy per column: far faster on CPU than one copy of a [N, width] slice, whose
    # inner loop is only `width` long. Even widths move int16 pairs, halving the element count.
    if width % 2 == 0:
        dst, src, width = dst.view(torch.int16), src.view(torch.int16), width // 2
    for col in range(width):
        dst[:, col].copy_(src[:, col])


def torch_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (each < 2**bits) -> dense bit stream of ceil(n * bits / 8) bytes.

    Eight codes (one int64 word, little-endian) become ``bits`` bytes: three SWAR steps squeeze the
    fields together inside the word, then the low ``bits`` bytes of every word are copied out.
    """
    codes = codes.reshape(-1)
    if codes.dtype != torch.uint8:
        codes = codes.to(torch.uint8)
    n = codes.numel()
    nbytes = (n * bits + 7) // 8
    if bits == 8:
        return codes.clone()
    n_words = -(-n // 8)
    if n % 8 or codes.storage_offset() % 8:
        padded = codes.new_zeros(n_words * 8)
        padded[:n] = codes
        codes = padded
    src = codes.view(torch.int64)
    moved = torch.empty_like(src)
    word = None  # the first step reads the caller's codes; later steps work in place
    for shift, keep, move in _swar_steps(bits):
        torch.bitwise_right_shift(src if word is None else word, shift, out=moved)
        moved.bitwise_and_(move)
        word = torch.bitwise_and(src, keep) if word is None else word.bitwise_and_(keep)
        word.bitwise_or_(moved)
    out = torch.empty(n_words, bits, dtype=torch.uint8, device=codes.device)
    _copy_columns(out, word.view(torch.uint8).view(n_words, 8), bits)
    return out.view(-1)[:nbytes]


def torch_unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Dense bit stream -> ``numel`` uint8 codes. Inverse of :func:`torch_pack`."""
    if bits == 8:
        return packed[:numel].clone()
    n_words = -(-numel // 8)
    if packed.numel() != n_words * bits:
        padded = packed.new_zeros(n_words * bits)
        padded[: packed.numel()] = packed
        packed = padded
    wide = torch.zeros(n_words, 8, dtype=torch.uint8, device=packed.device)
    _copy_columns(wide, packed.view(n_words, bits), bits)
    word = wide.view(-1).view(torch.int64)
    moved = torch.empty_like(word)
    for shift, keep, move in reversed(_swar_steps(bits)):
        torch.bitwise_and(word, move, out=moved).bitwise_left_shift_(shift)
        word.bitwise_and_(keep).bitwise_or_(moved)
    return word.view(torch.uint8)[:numel]


def torch_quantize_pack(
    x: torch.Tensor, levels: int, kind: str, bits: int, activation: bool = False
) -> torch.Tensor:
    """Floats -> packed codes. ``activation=True`` applies tanh/sigmoid first."""
    values = torch_activation(x, kind) if activation else x
    return torch_pack(torch_encode(values, levels, kind), bits)


def torch_unpack_dequantize(
    packed: torch.Tensor, bits: int, numel: int, levels: int, kind: str, dtype: torch.dtype
) -> torch.Tensor:
    return torch_decode(torch_unpack(packed, bits, numel), levels, kind, dtype)


def torch_code_derivative(codes: torch.Tensor, levels: int, kind: str, dtype: torch.dtype):
    """Straight-through derivative estimated from the level index alone.

    Level k stands for the bin of outputs [c - h, c + h] (clipped to the range) that rounds to it,
    with c the level value and h half the level spacing. The estimate is the mean of f' over that bin,
    with f' written in terms of the output: tanh' = 1 - t^2, sigmoid' = s - s^2. Unlike f'(c) it is
    never 0 at the end levels (tanh: 1 - 1^2 = 0), and at L = 2 it is 2/3 (tanh) rather than 0.
    """
    acc = compute_dtype(dtype)
    k = codes.to(acc)
    if kind == "tanh":
        center = (2.0 * k - float(levels - 1)) / float(levels - 1)
        half, low_end = 1.0 / (levels - 1), -1.0
    else:
        center = k / float(levels - 1)
        half, low_end = 0.5 / (levels - 1), 0.0
    lo = (center - half).clamp_(min=low_end)
    hi = (center + half).clamp_(max=1.0)
    mean_sq = (hi * hi + hi * lo + lo * lo) / 3.0
    if kind == "tanh":
        return (1.0 - mean_sq).to(dtype)
    return (0.5 * (lo + hi) - mean_sq).to(dtype)


def torch_exact_derivative(x: torch.Tensor, kind: str) -> torch.Tensor:
    """f'(x) at the pre-activation, in the compute dtype."""
    y = torch_activation(x, kind)
    return 1.0 - y * y if kind == "tanh" else y * (1.0 - y)
