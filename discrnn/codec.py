"""Codecs between bounded floats, level indices (codes) and dense bit-packed bytes.

Levels. For ``L`` levels (2 <= L <= 256) the tanh range [-1, 1] holds the values
``(2k - (L - 1)) / (L - 1)`` and the sigmoid range [0, 1] the values ``k / (L - 1)``, k = 0 .. L - 1.
A level index *is* the value: no scale or zero point is stored.

Bit layout. ``bits``-bit codes form one little-endian bit stream: code i occupies stream bits
[i * bits, (i + 1) * bits); byte j holds stream bits [8j, 8j + 8), least significant bit first.
``n`` codes take ``ceil(n * bits / 8)`` bytes and the unused high bits of the last byte are 0.
So 6-bit codes put 4 codes in 3 bytes and 7-bit codes 8 codes in 7 bytes; no byte is wasted.

Golden example (tested): ``pack(tensor([1, 2, 3, 63]), bits=6)`` is ``tensor([0x81, 0x30, 0xFC])``,
because 1 | 2 << 6 | 3 << 12 | 63 << 18 = 0xFC3081, stored low byte first.

NaN and infinities. ``encode`` and ``quantize_pack`` map NaN to code 0 (the lowest level: -1 for
tanh, 0 for sigmoid) and +-Inf, like every out-of-range value, to the nearest end level. A code
cannot hold a NaN; pass ``check_finite=True`` to get a ``ValueError`` instead (one device sync;
while torch.compile / torch.export trace, a ``torch._assert_async`` in the graph instead, which
raises ``RuntimeError`` when the compiled program meets a NaN; nothing is checked on meta tensors).

Saving. A :class:`PackedTensor` pickles to its bytes and fields and loads back through
``torch.load(..., weights_only=True)`` once discrnn is imported (its rebuild function is registered
with ``torch.serialization.add_safe_globals``); loading checks the bytes against shape, bits and
levels and raises ``ValueError``/``TypeError`` for a corrupted or mismatched buffer.
"""

from __future__ import annotations

import torch

from . import _validation as V
from .backend import resolve_backend
from .kernels import codec as triton_codec
from .kernels import codec_torch

__all__ = [
    "PackedTensor",
    "encode",
    "decode",
    "pack",
    "unpack",
    "quantize_pack",
    "unpack_dequantize",
]

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def _flat(x: torch.Tensor) -> torch.Tensor:
    # Kernels and the torch codec read flat contiguous memory; a non-contiguous input is copied once.
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().view(-1)


def _check_finite(name: str, x: torch.Tensor) -> None:
    if V.values_unreadable(x):
        torch._assert_async(torch.isfinite(x).all(), f"{name} must be finite when check_finite=True")
        return
    if x.numel() and not bool(V.all_finite(x)):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name} must be finite when check_finite=True, got {n_nan} NaN and {n_inf} +-Inf "
            f"values out of {x.numel()}"
        )


class PackedTensor:
    """Level codes of a float tensor, bit-packed; what :func:`quantize_pack` returns.

    Attributes:
        data: 1-D uint8 tensor of ``ceil(numel * bits / 8)`` bytes (layout: see the module docstring).
        shape: shape of the tensor the codes stand for.
        dtype: float dtype that :meth:`dequantize` returns.
        levels: number of levels L (2..256).
        kind: ``"tanh"`` (values in [-1, 1]) or ``"sigmoid"`` (values in [0, 1]).
        bits: bits per code, ``ceil(log2 L)`` by default.
    """

    __slots__ = ("data", "shape", "dtype", "levels", "kind", "bits")

    def __init__(self, data, shape, dtype, levels, kind, bits=None):
        levels = V.check_levels(levels)
        self.levels = levels
        self.bits = V.check_bits(bits, levels)
        self.kind = V.check_kind(kind)
        self.dtype = V.check_float_dtype("dtype", dtype)
        self.shape = torch.Size(shape)
        self.data = V.check_packed_bytes("data", data, self.shape.numel(), self.bits)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes (the only storage a PackedTensor holds besides a few attributes)."""
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype | None = None, backend: str | None = None):
        """Level values as a tensor of ``self.shape`` (dtype ``self.dtype`` unless given)."""
        return unpack_dequantize(self, dtype=dtype, backend=backend)

    def codes(self, backend: str | None = None) -> torch.Tensor:
        """The level indices as a uint8 tensor of ``self.shape``."""
        return unpack(self.data, self.bits, self.numel(), backend=backend).view(self.shape)

    def to(self, device) -> "PackedTensor":
        return PackedTensor(
            self.data.to(device), self.shape, self.dtype, self.levels, self.kind, self.bits
        )

    def __reduce_ex__(self, protocol):
        # Plain fields and one uint8 tensor, rebuilt (and checked) by an allow-listed function, so
        # that torch.load(weights_only=True) accepts it.
        return _rebuild_packed_tensor, (_FORMAT, self.data, tuple(self.shape), self.dtype,
                                        self.levels, self.kind, self.bits)

    def __repr__(self) -> str:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        dense = self.numel() * itemsize
        share = f", {100.0 * self.nbytes / dense:.1f}% of {_DTYPE_NAMES[self.dtype]}" if dense else ""
        return (
            f"PackedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, kind={self.kind!r}, "
            f"levels={self.levels}, bits={self.bits}, nbytes={self.nbytes}{share}, "
            f"device={self.device})"
        )


_FORMAT = 1  # version of the pickled form of PackedTensor (and of PackedRNNState)


def _rebuild_packed_tensor(version, data, shape, dtype, levels, kind, bits) -> PackedTensor:
    """Rebuild a pickled :class:`PackedTensor` (torch.load, pickle, copy.deepcopy), checking it as
    the constructor does (uint8 bytes, 1-D, exactly ceil(numel * bits / 8) of them, known dtype,
    levels, kind and bits) and that every code lies below ``levels``."""
    if version != _FORMAT:
        raise ValueError(f"PackedTensor: unknown saved format {version!r}, expected {_FORMAT} "
                         "(saved by another version of discrnn?)")
    if not (isinstance(shape, (tuple, list)) and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"PackedTensor: saved shape must be a tuple of ints >= 0, got {shape!r}")
    try:
        packed = PackedTensor(data, shape, dtype, levels, kind, bits)
    except (TypeError, ValueError) as e:
        raise type(e)(f"PackedTensor (saved): {e}") from None
    if packed.numel() and (1 << packed.bits) > packed.levels and not V.values_unreadable(data):
        top = int(packed.codes(backend="torch").max())
        if top >= packed.levels:
            raise ValueError(
                f"PackedTensor: saved codes must lie in [0, {packed.levels - 1}] for "
                f"levels={packed.levels}, got a code {top}: the bytes are corrupted or belong to "
                "other levels"
            )
    return packed


torch.serialization.add_safe_globals([_rebuild_packed_tensor])


def encode(values: torch.Tensor, levels: int, kind: str = "tanh", *, check_finite: bool = False):
    """Snap floats of the ``kind`` range to their nearest level; return the level indices.

    ``k = clamp(floor((v + 1) * (L - 1) / 2 + 0.5), 0, L - 1)`` for tanh and
    ``k = clamp(floor(v * (L - 1) + 0.5), 0, L - 1)`` for sigmoid, computed in float32 (float64 for
    float64 input). Ties round up. Out-of-range values and +-Inf go to the end levels, NaN to code 0.

    Args:
        values: float16/bfloat16/float32/float64 tensor of any shape and device.
        levels: number of levels L, an integer in [2, 256].
        kind: ``"tanh"`` or ``"sigmoid"``.
        check_finite: raise ``ValueError`` if ``values`` holds NaN or +-Inf.
    Returns:
        uint8 tensor of ``values.shape``.
    Raises:
        TypeError: non-float ``values``, non-integer ``levels``.
        ValueError: ``levels`` out of range, unknown ``kind``, non-finite values with check_finite.
    """
    V.check_float_tensor("values", values)
    levels, kind = V.check_levels(levels), V.check_kind(kind)
    if check_finite:
        _check_finite("values", values)
    return codec_torch.torch_encode(values, levels, kind)


def decode(codes: torch.Tensor, levels: int, kind: str = "tanh", dtype=torch.float32):
    """Level indices -> level values: ``(2k - (L - 1)) / (L - 1)`` (tanh) or ``k / (L - 1)``
    (sigmoid), correctly rounded to ``dtype``.

    Args:
        codes: integer tensor of any shape with values in [0, L - 1] (checked: one device sync).
        levels, kind: as for :func:`encode`.
        dtype: float dtype of the result.
    """
    levels, kind = V.check_levels(levels), V.check_kind(kind)
    V.check_float_dtype("dtype", dtype)
    V.check_code_tensor("codes", codes, bits=8)
    if codes.numel() and int(codes.max()) >= levels:
        raise ValueError(
            f"codes must lie in [0, {levels - 1}] for levels={levels}, got max {int(codes.max())}"
        )
    return codec_torch.torch_decode(codes, levels, kind, dtype)


def pack(codes: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    """Pack integer codes, each in [0, 2**bits), into a dense little-endian bit stream.

    Example (the layout's golden case)::

        >>> pack(torch.tensor([1, 2, 3, 63], dtype=torch.uint8), bits=6)
        tensor([129,  48, 252], dtype=torch.uint8)

    Args:
        codes: integer tensor of any shape (read in row-major order), on any device.
        bits: 1..8.
        backend: ``None`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    Returns:
        1-D uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes on ``codes.device``.
    Raises:
        TypeError: non-integer codes. ValueError: bits out of range, codes >= 2**bits or < 0.
    """
    bits = V.check_bits(bits)
    V.check_code_tensor("codes", codes, bits)
    backend = resolve_backend(backend, codes.device)
    flat = _flat(codes)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    if backend == "triton":
        return triton_codec.triton_pack(flat, bits)
    return codec_torch.torch_pack(flat, bits)


def unpack(packed: torch.Tensor, bits: int, numel: int, *, backend: str | None = None):
    """Inverse of :func:`pack`: ``numel`` codes as a 1-D uint8 tensor.

    Raises:
        TypeError: ``packed`` not uint8. ValueError: ``packed`` not 1-D or not exactly
        ``ceil(numel * bits / 8)`` bytes long, bits out of range, negative numel.
    """
    bits, numel = V.check_bits(bits), V.check_numel(numel)
    V.check_packed_bytes("packed", packed, numel, bits)
    backend = resolve_backend(backend, packed.device)
    packed = _flat(packed)
    if backend == "triton":
        return triton_codec.triton_unpack(packed, bits, numel)
    return codec_torch.torch_unpack(packed, bits, numel)


def quantize_pack(
    x: torch.Tensor,
    levels: int,
    kind: str = "tanh",
    bits: int | None = None,
    *,
    activation: bool = False,
    check_finite: bool = False,
    backend: str | None = None,
) -> PackedTensor:
    """Quantize floats to ``levels`` levels and bit-pack the codes, in one pass on the Triton backend.

    Same codes as ``pack(encode(x, levels, kind), bits)`` (bit for bit, given the same values).

    Args:
        x: float16/bfloat16/float32/float64 tensor, any shape, any strides.
        levels: L in [2, 256]. kind: ``"tanh"`` ([-1, 1]) or ``"sigmoid"`` ([0, 1]).
        bits: bits per code, default ``ceil(log2 L)``; must satisfy ``2**bits >= L``.
        activation: treat ``x`` as a pre-activation and apply tanh/sigmoid first (the discrete
            unit's forward). Across backends tanh/sigmoid may differ in the last ulp, which can move
            a value that sits on a level boundary by one level.
        check_finite: raise ``ValueError`` on NaN/+-Inf instead of encoding them (see module doc).
        backend: ``None`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    Returns:
        :class:`PackedTensor` with ``x``'s shape and dtype.
    """
    V.check_float_tensor("x", x)
    levels, kind = V.check_levels(levels), V.check_kind(kind)
    bits = V.check_bits(bits, levels)
    if check_finite:
        _check_finite("x", x)
    backend = resolve_backend(backend, x.device)
    flat = _flat(x)
    if backend == "triton":
        data, _ = triton_codec.triton_quantize_pack(flat, levels, kind, bits, activation=activation)
    else:
        data = codec_torch.torch_quantize_pack(flat, levels, kind, bits, activation=activation)
    return PackedTensor(data, x.shape, x.dtype, levels, kind, bits)


def unpack_dequantize(
    packed: PackedTensor, dtype: torch.dtype | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Unpack and decode a :class:`PackedTensor` in one pass: level values of ``packed.shape``."""
    if not isinstance(packed, PackedTensor):
        raise TypeError(f"packed must be a PackedTensor, got {type(packed).__name__}")
    dtype = packed.dtype if dtype is None else V.check_float_dtype("dtype", dtype)
    backend = resolve_backend(backend, packed.device)
    args = (packed.data, packed.bits, packed.numel(), packed.levels, packed.kind, dtype)
    if backend == "triton":
        values = triton_codec.triton_unpack_dequantize(*args)
    else:
        values = codec_torch.torch_unpack_dequantize(*args)
    return values.view(packed.shape)
