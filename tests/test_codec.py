"""Codecs: bit-exact against an independent oracle and across backends, on odd sizes and every width."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import discrnn
from discrnn import PackedTensor, decode, encode, pack, quantize_pack, unpack, unpack_dequantize
from discrnn.kernels import codec as triton_codec
from discrnn.kernels import codec_torch as ref

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 3, 7, 8, 9, 63, 1000, 4099]
SAMPLED_LEVELS = [2, 3, 4, 5, 17, 63, 64, 65, 100, 128, 200, 255, 256]


def oracle_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit by bit, with numpy: the layout written out, independent of both implementations."""
    n = codes.size
    stream = ((codes[:, None].astype(np.uint16) >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    stream = np.concatenate([stream, np.zeros((-len(stream)) % 8, np.uint8)])
    out = np.packbits(stream, bitorder="little")
    assert out.size == (n * bits + 7) // 8
    return out


def oracle_decode(k: int, levels: int, kind: str) -> Fraction:
    return Fraction(2 * k - (levels - 1), levels - 1) if kind == "tanh" else Fraction(k, levels - 1)


def from_numpy(array):
    return torch.from_numpy(array).to(torch.get_default_device())


def random_codes(n, bits, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_golden_example(backend):
    codes = torch.tensor([1, 2, 3, 63], dtype=torch.uint8)
    packed = pack(codes, 6, backend=backend)
    assert packed.tolist() == [0x81, 0x30, 0xFC]
    assert unpack(packed, 6, 4, backend=backend).tolist() == [1, 2, 3, 63]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_golden_example_7_bits(backend):
    # 8 codes of 7 bits -> 7 bytes: code 0 fills bits 0-6, code 7 = 64 sets stream bit 7 * 7 + 6 = 55,
    # the top bit of byte 6.
    codes = torch.tensor([127, 0, 0, 0, 0, 0, 0, 64], dtype=torch.uint8)
    assert pack(codes, 7, backend=backend).tolist() == [127, 0, 0, 0, 0, 0, 0x80]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", SIZES)
def test_pack_matches_oracle_both_backends(bits, n):
    codes = random_codes(n, bits, seed=bits * 1000 + n)
    expected = from_numpy(oracle_pack(codes.cpu().numpy(), bits))
    for backend in ("torch", "triton"):
        packed = pack(codes, bits, backend=backend)
        assert packed.dtype == torch.uint8 and packed.shape == (len(expected),)
        torch.testing.assert_close(packed, expected, atol=0, rtol=0)
        torch.testing.assert_close(unpack(packed, bits, n, backend=backend), codes, atol=0, rtol=0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_triton_kernels_with_many_small_programs(bits):
    # Small blocks: tails inside a program and across many programs.
    n = 1001
    codes = random_codes(n, bits, seed=bits)
    packed = triton_codec.triton_pack(codes, bits, block_codes=64)
    torch.testing.assert_close(packed, ref.torch_pack(codes, bits), atol=0, rtol=0)
    unpacked = triton_codec.triton_unpack(packed, bits, n, block_codes=32)
    torch.testing.assert_close(unpacked, codes, atol=0, rtol=0)
    # The other two outputs of the unpack kernel (6 and 7 bits read grouped): values and gradient.
    levels = 1 << bits
    values = triton_codec.triton_unpack_dequantize(packed, bits, n, levels, "tanh", torch.float32,
                                                   block_codes=32)
    torch.testing.assert_close(values, ref.torch_decode(codes, levels, "tanh", torch.float32),
                               atol=0, rtol=0)
    dy = torch.randn(n, dtype=torch.float32)
    grad = triton_codec.triton_code_grad(packed, bits, n, levels, "tanh", dy, block_codes=32)
    want = dy * ref.torch_code_derivative(codes, levels, "tanh", torch.float32)
    torch.testing.assert_close(grad, want, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [1, 3, 6, 7, 8])
def test_round_trip_large_odd_size(bits):
    n = 1_000_003
    codes = random_codes(n, bits, seed=7)
    for backend in ("torch", "triton"):
        packed = pack(codes, bits, backend=backend)
        assert packed.numel() == (n * bits + 7) // 8
        torch.testing.assert_close(unpack(packed, bits, n, backend=backend), codes, atol=0, rtol=0)
    torch.testing.assert_close(pack(codes, bits, backend="torch"), packed, atol=0, rtol=0)


def test_pack_accepts_any_integer_dtype_shape_and_strides():
    codes = random_codes(6 * 10, 5).view(6, 10)
    expected = pack(codes.contiguous(), 5)
    for variant in (codes.to(torch.int64), codes.t().contiguous().t(), codes.to(torch.int32)):
        torch.testing.assert_close(pack(variant, 5), expected, atol=0, rtol=0)
    # a slice that starts at an odd byte offset (the torch codec views bytes as int64 words)
    base = random_codes(101, 6)
    torch.testing.assert_close(
        pack(base[1:], 6), from_numpy(oracle_pack(base[1:].cpu().numpy(), 6)), atol=0, rtol=0
    )


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    data=st.data(),
)
def test_pack_unpack_property(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    codes = torch.tensor(values, dtype=torch.uint8)
    expected = from_numpy(oracle_pack(codes.cpu().numpy(), bits))
    for backend in ("torch", "triton"):
        packed = pack(codes, bits, backend=backend)
        assert torch.equal(packed, expected)
        assert torch.equal(unpack(packed, bits, len(values), backend=backend), codes)


# ---------------------------------------------------------------------------------------------
# Levels: encode / decode


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_decode_is_correctly_rounded_for_every_level_count(kind):
    for levels in range(2, 257):
        k = torch.arange(levels, dtype=torch.uint8)
        for dtype in (torch.float32, torch.float64):
            got = decode(k, levels, kind, dtype)
            exact = [float(oracle_decode(i, levels, kind)) for i in range(levels)]
            expected = torch.tensor(exact, dtype=torch.float64).to(dtype)
            assert torch.equal(got, expected), (levels, dtype)
        lo = -1.0 if kind == "tanh" else 0.0
        assert got[0] == lo and got[-1] == 1.0
        # encode of each level value gives back its index
        assert torch.equal(encode(got, levels, kind), k)


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("levels", SAMPLED_LEVELS)
def test_encode_snaps_to_nearest_level(kind, levels):
    k = torch.arange(levels - 1, dtype=torch.float64)
    if kind == "tanh":
        mid = (2 * k + 1 - (levels - 1)) / (levels - 1)
    else:
        mid = (k + 0.5) / (levels - 1)
    assert torch.equal(encode(mid + 1e-9, levels, kind).to(torch.float64), k + 1)
    assert torch.equal(encode(mid - 1e-9, levels, kind).to(torch.float64), k)


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("levels", [2, 3, 5, 9, 17, 65, 129])
def test_encode_exact_ties_round_up(kind, levels):
    # With L - 1 a power of two the midpoints between levels are exact binary fractions.
    k = torch.arange(levels - 1, dtype=torch.float32)
    if kind == "tanh":
        mid = (2 * k + 1 - (levels - 1)) / (levels - 1)
    else:
        mid = (k + 0.5) / (levels - 1)
    assert torch.equal(encode(mid, levels, kind).to(torch.float32), k + 1)
    for backend in ("torch", "triton"):
        assert torch.equal(quantize_pack(mid, levels, kind, backend=backend).codes().float(), k + 1)


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_encode_nan_inf_and_out_of_range(kind):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 7.0, -7.0])
    assert encode(x, 64, kind).tolist() == [0, 63, 0, 63, 0]
    with pytest.raises(ValueError, match="values must be finite.*1 NaN and 2"):
        encode(x, 64, kind, check_finite=True)
    for backend in ("torch", "triton"):
        p = quantize_pack(x, 64, kind, backend=backend)
        assert p.codes(backend=backend).tolist() == [0, 63, 0, 63, 0]
        p = quantize_pack(x, 64, kind, activation=True, backend=backend)
        assert p.codes(backend=backend).tolist() == [0, 63, 0, 63, 0]
    with pytest.raises(ValueError, match="x must be finite"):
        quantize_pack(x, 64, kind, check_finite=True)


# ---------------------------------------------------------------------------------------------
# Fused quantize+pack / unpack+dequantize


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("levels", [2, 5, 64, 100, 256])
def test_quantize_pack_equals_pack_of_encode(dtype, kind, levels):
    g = torch.Generator(torch.get_default_device()).manual_seed(levels)
    x = (torch.rand(3, 337, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
    if kind == "sigmoid":
        x = x * 0.5 + 0.5
    x = x.t()  # non-contiguous
    bits = (levels - 1).bit_length()
    codes = encode(x, levels, kind)
    expected = pack(codes, bits, backend="torch")
    for backend in ("torch", "triton"):
        packed = quantize_pack(x, levels, kind, backend=backend)
        assert packed.shape == x.shape and packed.dtype == dtype and packed.bits == bits
        torch.testing.assert_close(packed.data, expected, atol=0, rtol=0)
        values = packed.dequantize(backend=backend)
        assert values.dtype == dtype and values.shape == x.shape
        torch.testing.assert_close(
            values, decode(codes, levels, kind, dtype), atol=0, rtol=0, equal_nan=False
        )
        torch.testing.assert_close(packed.codes(backend=backend), codes, atol=0, rtol=0)


def test_quantize_pack_with_wider_bits_than_needed():
    x = torch.linspace(-1, 1, 50)
    for backend in ("torch", "triton"):
        p = quantize_pack(x, 5, bits=8, backend=backend)
        assert p.bits == 8 and p.nbytes == 50
        assert torch.equal(p.codes(), encode(x, 5))


def test_quantize_pack_small_blocks_many_programs():
    x = torch.randn(1001, dtype=torch.float32)
    for bits, levels in [(3, 7), (6, 64), (7, 100)]:
        data, values = triton_codec.triton_quantize_pack(
            x, levels, "tanh", bits, activation=True, values_dtype=torch.float32, block_codes=64
        )
        codes = ref.torch_encode(torch.tanh(x), levels, "tanh")
        # Same values in, but tanh differs between backends in the last ulp: compare via decode.
        kernel_codes = ref.torch_unpack(data, bits, x.numel())
        assert (kernel_codes.int() - codes.int()).abs().max() <= 1
        torch.testing.assert_close(
            values, ref.torch_decode(kernel_codes, levels, "tanh", torch.float32), atol=0, rtol=0
        )
        out = triton_codec.triton_unpack_dequantize(data, bits, x.numel(), levels, "tanh",
                                                    torch.float32, block_codes=128)
        torch.testing.assert_close(out, values, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_activation_rounding_across_backends_moves_at_most_one_level_rarely(kind, dtype):
    """tanh/sigmoid in the kernel (written with exp) and in torch may differ in the last ulp; a value
    on a level boundary can then move one level. Measure that fraction and bound it."""
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    x = (torch.randn(200_000, generator=g) * 3).to(dtype)
    moved = 0
    for levels in (64, 256):
        a = quantize_pack(x, levels, kind, activation=True, backend="torch").codes().int()
        b = quantize_pack(x, levels, kind, activation=True, backend="triton").codes().int()
        diff = (a - b).abs()
        assert int(diff.max()) <= 1
        moved += int(diff.sum())
    assert moved / (2 * x.numel()) <= 1e-3, f"{moved} of {2 * x.numel()} codes moved one level"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_tensors(backend):
    x = torch.empty(0, 5)
    p = quantize_pack(x, 64, backend=backend)
    assert p.nbytes == 0 and p.shape == (0, 5)
    assert p.dequantize(backend=backend).shape == (0, 5)
    assert pack(torch.zeros(0, dtype=torch.uint8), 3, backend=backend).numel() == 0
    assert unpack(torch.zeros(0, dtype=torch.uint8), 3, 0, backend=backend).numel() == 0
    assert encode(x, 4).shape == (0, 5) and decode(encode(x, 4), 4).shape == (0, 5)


def test_packed_tensor_object():
    x = torch.linspace(-1, 1, 4000).view(4, 1000)
    p = quantize_pack(x, 64)
    assert p.nbytes == 3000 and p.bits == 6 and p.levels == 64 and p.kind == "tanh"
    assert p.numel() == 4000 and p.device == x.device
    assert repr(p) == (
        "PackedTensor(shape=(4, 1000), dtype=torch.float32, kind='tanh', levels=64, bits=6, "
        f"nbytes=3000, 18.8% of float32, device={x.device})"
    )
    assert p.dequantize(torch.float64).dtype == torch.float64
    assert torch.equal(p.to("cpu").data, p.data.cpu())
    assert torch.equal(unpack_dequantize(p), p.dequantize())
    assert (p.dequantize() - x).abs().max() <= 1 / 63 + 1e-6  # half a level spacing (2/63)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "levels, error, message",
    [
        (1, ValueError, r"levels must be in \[2, 256\], got 1"),
        (257, ValueError, r"levels must be in \[2, 256\], got 257"),
        (64.0, TypeError, "levels must be an integer, got float 64.0"),
        (True, TypeError, "levels must be an integer, got bool"),
        ("64", TypeError, "levels must be an integer, got str"),
    ],
)
def test_bad_levels(levels, error, message):
    x = torch.zeros(4)
    for call in (
        lambda: encode(x, levels),
        lambda: quantize_pack(x, levels),
        lambda: decode(torch.zeros(4, dtype=torch.uint8), levels),
        lambda: discrnn.discrete_tanh(x, levels),
        lambda: discrnn.DiscreteSigmoid(levels),
    ):
        with pytest.raises(error, match=message):
            call()


def test_bad_bits():
    codes = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\], got 0"):
        pack(codes, 0)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\], got 9"):
        unpack(codes, 9, 4)
    with pytest.raises(ValueError, match="bits=5 holds only 32 codes, too few for levels=64; expected bits >= 6"):
        quantize_pack(torch.zeros(4), 64, bits=5)
    with pytest.raises(TypeError, match="bits must be an integer"):
        pack(codes, 6.0)


def test_bad_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 63\] for bits=6, got values in \[0, 64\]"):
        pack(torch.tensor([0, 64], dtype=torch.uint8), 6)
    with pytest.raises(ValueError, match=r"got values in \[-1, 3\]"):
        pack(torch.tensor([-1, 3]), 6)
    with pytest.raises(TypeError, match="codes must have an integer dtype .* got torch.float32"):
        pack(torch.zeros(3), 6)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 9\] for levels=10, got max 12"):
        decode(torch.tensor([12], dtype=torch.uint8), 10)


def test_bad_packed_buffers():
    with pytest.raises(ValueError, match=r"packed must hold ceil\(10 \* 6 / 8\) = 8 bytes .* got 7"):
        unpack(torch.zeros(7, dtype=torch.uint8), 6, 10)
    with pytest.raises(TypeError, match="packed must have dtype torch.uint8, got torch.int32"):
        unpack(torch.zeros(8, dtype=torch.int32), 6, 10)
    with pytest.raises(ValueError, match="packed must be 1-D"):
        unpack(torch.zeros(2, 4, dtype=torch.uint8), 6, 10)
    with pytest.raises(ValueError, match="numel must be >= 0, got -1"):
        unpack(torch.zeros(0, dtype=torch.uint8), 6, -1)
    with pytest.raises(ValueError, match=r"data must hold ceil\(4 \* 6 / 8\) = 3 bytes"):
        PackedTensor(torch.zeros(4, dtype=torch.uint8), (4,), torch.float32, 64, "tanh")
    with pytest.raises(TypeError, match="packed must be a PackedTensor, got Tensor"):
        unpack_dequantize(torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_float_input(dtype):
    x = torch.zeros(4, dtype=dtype)
    with pytest.raises(TypeError, match=f"x must have a floating dtype .* got {dtype}"):
        quantize_pack(x, 64)
    with pytest.raises(TypeError, match=f"values must have a floating dtype .* got {dtype}"):
        encode(x, 64)
    with pytest.raises(TypeError, match=f"x must have a floating dtype .* got {dtype}"):
        discrnn.discrete_tanh(x, 64)


def test_bad_kind_backend_dtype_and_objects():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match=r"kind must be one of \('tanh', 'sigmoid'\), got 'relu'"):
        quantize_pack(x, 64, "relu")
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_pack(x, 64, backend="cuda")
    with pytest.raises(TypeError, match="dtype must be one of"):
        decode(torch.zeros(2, dtype=torch.uint8), 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        quantize_pack([0.5], 64)


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    import discrnn.backend as backend_module

    monkeypatch.setattr(backend_module, "INTERPRETING", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors.*got tensors on cpu"):
        quantize_pack(torch.zeros(4, device="cpu"), 64, backend="triton")
    # the default picks torch on CPU; no silent switch happens for an explicit request
    assert quantize_pack(torch.zeros(4, device="cpu"), 64).nbytes == 3


@pytest.mark.gpu
def test_cuda_default_backend_is_triton_and_matches_torch():
    x = torch.randn(100_003, device="cuda")
    for bits, levels in [(6, 64), (7, 128), (8, 256), (3, 5)]:
        p = quantize_pack(x.clamp(-1, 1), levels, bits=bits)
        expected = quantize_pack(x.clamp(-1, 1), levels, bits=bits, backend="torch")
        assert torch.equal(p.data, expected.data)
        assert torch.equal(p.dequantize(), expected.dequantize(backend="torch"))
