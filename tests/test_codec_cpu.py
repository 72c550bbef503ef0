"""The CPU codec of the layers' code store (kernels/codec_cpu.cpp, through rnn_cpu.pack / unpack)
against codec_torch's torch_pack / torch_unpack: the same bytes and codes, bit for bit."""

import shutil
import warnings

import pytest
import torch

from discrnn.kernels import rnn_cpu
from discrnn.kernels.codec_torch import torch_pack, torch_unpack

if torch.get_default_device().type != "cpu":
    pytest.skip("CPU kernels", allow_module_level=True)


@pytest.fixture(scope="module")
def codec():
    """The extension module; a failed build or check fails here, not skips."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the CPU codec")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = rnn_cpu.codec_ops()
    assert module is not None
    return module


# Around a group of eight codes and a vector block of 64, and past one parallel task (2^17 codes).
LENGTHS = [0, 1, 7, 8, 9, 63, 64, 65, 511, 513, 4099, (1 << 17) + 77]


@pytest.fixture(params=[True, False], ids=["pdep", "shifts"])
def pdep(request, codec):
    """With BMI2's pext / pdep where this CPU has them fast (else the shift loops run either way),
    and with the shift loops only."""
    old = codec.set_pdep(request.param)
    yield request.param
    codec.set_pdep(old)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_and_unpack_equal_torch_codec(codec, pdep, bits):
    """Codes of every byte value (the bits past ``bits`` are dropped, as torch_pack drops them)."""
    g = torch.Generator().manual_seed(bits)
    for n in LENGTHS:
        codes = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        stream = torch_pack(codes, bits)
        got = codec.pack_codes(codes, bits)
        assert torch.equal(got, stream), n
        assert torch.equal(codec.unpack_codes(stream, bits, n), torch_unpack(stream, bits, n)), n
        out = torch.full_like(stream, 0xA5)
        assert codec.pack_codes(codes, bits, out) is out and torch.equal(out, stream)
        if n:  # the first codes of a longer stream
            mask = (1 << bits) - 1
            assert torch.equal(codec.unpack_codes(stream, bits, n - 1), codes[:n - 1] & mask)


@pytest.mark.parametrize("bits", [3, 6, 7])
def test_same_bytes_on_any_thread_count(codec, bits):
    codes = torch.randint(0, 1 << bits, (1 << 20,), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = codec.pack_codes(codes, bits)
        torch.set_num_threads(2)
        two = codec.pack_codes(codes, bits)
        back = codec.unpack_codes(two, bits, codes.numel())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(back, codes)


def test_layer_codec_takes_any_codes_torch_pack_takes(codec):
    """rnn_cpu.pack / unpack (the layers' codec on CPU): any shape, dtype and strides of codes, a
    stream that is a slice of the code store."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 64, (6, 10, 7), generator=g)  # int64, 3-D
    assert torch.equal(rnn_cpu.pack(codes, 6), torch_pack(codes, 6))
    assert torch.equal(rnn_cpu.pack(codes.transpose(0, 2), 6), torch_pack(codes.transpose(0, 2), 6))
    store = torch.randint(0, 256, (1000,), generator=g, dtype=torch.uint8)
    part = store[14:14 + 6 * 40]
    assert torch.equal(rnn_cpu.unpack(part, 6, 320), torch_unpack(part, 6, 320))
    odd = store[13:13 + 7 * 40]  # torch_unpack cannot view an odd offset as int16 pairs
    assert torch.equal(rnn_cpu.unpack(odd, 7, 320), torch_unpack(odd.clone(), 7, 320))


def test_codec_checks_its_arguments(codec):
    codes = torch.zeros(16, dtype=torch.uint8)
    for bits in (0, 9):
        with pytest.raises(RuntimeError, match="bits must be in"):
            codec.pack_codes(codes, bits)
        with pytest.raises(RuntimeError, match="bits must be in"):
            codec.unpack_codes(codes, bits, 8)
    with pytest.raises(RuntimeError, match="codes must be a contiguous 1-D uint8"):
        codec.pack_codes(codes.view(4, 4), 6)
    with pytest.raises(RuntimeError, match="codes must be a contiguous 1-D uint8"):
        codec.pack_codes(codes.long(), 6)
    with pytest.raises(RuntimeError, match="out must be a contiguous 1-D uint8 CPU tensor of 12"):
        codec.pack_codes(codes, 6, torch.zeros(11, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="need 12 bytes, the stream has 11"):
        codec.unpack_codes(torch.zeros(11, dtype=torch.uint8), 6, 16)


def test_codec_off_with_the_kernels(monkeypatch):
    """DISCRNN_FUSED_CPU=0 (ENABLED) leaves the layers on codec_torch."""
    monkeypatch.setattr(rnn_cpu, "ENABLED", False)
    assert rnn_cpu.codec_ops() is None
    codes = torch.randint(0, 8, (100,), dtype=torch.uint8)
    assert torch.equal(rnn_cpu.unpack(rnn_cpu.pack(codes, 3), 3, 100), codes)
