"""Triton step kernels of the recurrent layers (discrnn.kernels.rnn) against the torch step math
(discrnn.kernels.rnn_torch), launcher by launcher, then DiscreteLSTM/DiscreteGRU end to end with
backend="triton" against backend="torch".

What is exact and what is not (see the kernels' module docstring):
* a code that is an activation of the inputs (LSTM i, f, g, o, u; GRU r, z, n) may move one level
  where torch's and the kernel's tanh/sigmoid straddle a level boundary: checked at most one level,
  exactly equal away from boundaries, and rare (measured on a large step);
* everything computed from codes is bit-exact: c, m, the GRU's snapped h code and h are compared
  with the torch math applied to the kernel's OWN codes;
* backward kernels, given the same codes, match torch within a few ulp.

Shapes are small and odd (the interpreter costs ~10-30 ms per launch): each launcher runs a list of
cases that together cover bs in {1, 3, 5}, H in {1, 7, 16, 33}, levels in {2, 64, 256}, four input
dtypes and contiguous, sliced and transposed inputs. Fresh buffers come poisoned from conftest, and
sliced inputs sit in NaN-filled (codes: out-of-range-filled) storage, so an unwritten output or an
out-of-bounds read fails.
"""

import math

import pytest
import torch
import triton
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from discrnn import DiscreteGRU, DiscreteLSTM
from discrnn.kernels import rnn as K
from discrnn.kernels import rnn_torch as R
from discrnn.kernels.codec_torch import (compute_dtype, torch_code_derivative, torch_decode,
                                         torch_encode)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SIG, TANH = "sigmoid", "tanh"

# (bs, H, levels, input dtype, layout): every value of each axis appears, and odd tiles everywhere.
CASES = [
    (1, 1, 2, F32, "contiguous"),
    (3, 7, 64, F64, "slice"),
    (5, 33, 256, BF16, "slice"),
    (3, 16, 256, F16, "transposed"),
    (5, 7, 2, F32, "transposed"),
    (1, 33, 64, BF16, "contiguous"),
    (5, 16, 64, F64, "transposed"),
    (3, 1, 256, F16, "slice"),
]
CASE_IDS = [f"bs{b}-H{h}-L{lv}-{str(d)[6:]}-{lay}" for b, h, lv, d, lay in CASES]

# Backward outputs are in the compute dtype; (atol, rtol) per compute dtype. The code derivative
# divides by 3 with Triton's default division, approximate on a GPU (a few ulp).
BWD_TOL = {F32: (1e-6, 1e-5), F64: (1e-14, 1e-12)}


def gen(seed):
    return torch.Generator(torch.get_default_device()).manual_seed(seed)


def as_layout(x, layout):
    """The values of x [rows, cols] as a view with the given layout: "slice" is a block inside a
    larger NaN-filled matrix (like xproj[rows] or c[:bs]), "transposed" is column-major."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":
        return x.t().contiguous().t()
    rows, cols = x.shape
    big = torch.full((rows + 3, cols + 5), float("nan"), dtype=x.dtype)
    big[1 : rows + 1, 2 : cols + 2] = x
    return big[1 : rows + 1, 2 : cols + 2]


def codes_view(codes, layout):
    """Codes [Q, bs, H] as CodeStore.read returns them ([Q, bs, Hp][:, :, :H]) or with planes
    interleaved by row; the padding holds 0xEE, which no valid code equals."""
    q, bs, h = codes.shape
    if layout == "transposed":
        return codes.transpose(0, 1).contiguous().transpose(0, 1)
    big = torch.full((q, bs, h + 3), 0xEE, dtype=torch.uint8)
    big[:, :, :h] = codes
    return big[:, :, :h]


def random_codes(q, bs, h, levels, seed):
    return torch.randint(0, levels, (q, bs, h), generator=gen(seed), dtype=torch.uint8)


def near_boundary(v, levels, kind, margin=1e-3):
    """True where v (an activation) lies within ``margin`` of a level (of the encode scale) of a
    rounding boundary: there an ulp of difference in tanh/sigmoid may move the code."""
    v = v.double()
    u = (v + 1.0) * ((levels - 1) / 2) if kind == TANH else v * (levels - 1)
    return ((u - u.floor()) - 0.5).abs() < margin


def check_activation_codes(got, pre, levels, kind, what):
    """Codes from the kernel against torch's encode(activation(pre)); returns how many moved."""
    v = torch.tanh(pre) if kind == TANH else torch.sigmoid(pre)
    expected = torch_encode(v, levels, kind)
    diff = (got.int() - expected.int()).abs()
    assert int(diff.max()) <= 1, f"{what}: a code moved {int(diff.max())} levels"
    safe = ~near_boundary(v, levels, kind)
    assert torch.equal(got[safe], expected[safe]), f"{what}: codes differ away from boundaries"
    return int(diff.sum())


def assert_bitwise(name, got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape, (name, got.dtype, got.shape)
    torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=False, msg=name)


# ---------------------------------------------------------------------------------------------
# LSTM


def lstm_forward_checked(gates, c_prev, levels, cell_clip=math.inf):
    """Run the kernel, check it against torch, return (number of moved codes, codes checked)."""
    bs, H = c_prev.shape
    final = torch.empty(2, bs, H, dtype=torch.uint8)  # o, u of every row (done=0)
    codes, c, m = K.lstm_step_forward(gates, c_prev, levels, final=final, cell_clip=cell_clip)
    ref_codes, ref_c, ref_m = R.lstm_step_forward(gates, c_prev, levels, cell_clip=cell_clip)
    assert codes.shape == (4, bs, H)  # i, f, g, o: u is not kept
    assert codes.dtype == torch.uint8 and codes.shape == ref_codes.shape
    assert c.dtype == ref_c.dtype and m.dtype == ref_m.dtype
    acc, H = c_prev.dtype, c_prev.shape[1]
    pre = gates.to(acc)
    moved = 0
    for q, kind in enumerate((SIG, SIG, TANH, SIG)):
        z = pre[:, q * H : (q + 1) * H]
        moved += check_activation_codes(codes[q], z, levels, kind, f"gate {q}")
    # From the kernel's own codes, torch's arithmetic gives c and m bit for bit...
    assert_bitwise("c", c, R.lstm_recompute_cell(codes, c_prev, levels, cell_clip))
    assert_bitwise("c (recompute kernel)", K.lstm_recompute_cell(codes, c_prev, levels, cell_clip), c)
    assert float(c.abs().max()) <= cell_clip
    assert_bitwise("final o", final[0], codes[3])
    moved += check_activation_codes(final[1], c, levels, TANH, "u = tanh(c)")
    # m from u's code rebuilt from c: the output kernel, the cell kernel's m_out and torch's
    assert_bitwise("m", m, R.lstm_output(codes, c, levels, acc))
    assert_bitwise("m (output kernel)", K.lstm_output(codes, c, levels, acc), m)
    m_out = torch.empty_like(m)
    K.lstm_recompute_cell(codes, c_prev, levels, cell_clip, m_out=m_out)
    assert_bitwise("m (recompute kernel)", m_out, m)
    # the backward kernel rebuilds u too: with dm = 1, the o gate's gradient is u d_o, u the
    # forward kernel's level (torch's step: where torch's tanh gives the same code, see above)
    u = torch_decode(final[1], levels, TANH, acc)
    d_o = torch_code_derivative(codes[3], levels, SIG, acc)
    same = torch_encode(torch.tanh(c), levels, TANH) == final[1]
    for step, where in ((K, torch.ones_like(same)), (R, same)):
        dgates, _ = step.lstm_step_backward(codes, c_prev, torch.ones_like(c), torch.zeros_like(c),
                                            levels, cell_clip=cell_clip)
        torch.testing.assert_close(dgates[:, 3 * H :][where], (u * d_o)[where], atol=1e-7,
                                   rtol=1e-6, msg=f"u d_o ({step.__name__})")
    # ... and where no code moved, the whole step is torch's.
    if torch.equal(codes, ref_codes):
        assert_bitwise("c vs torch", c, ref_c)
        assert_bitwise("m vs torch", m, ref_m)
    return moved, codes.numel()


@pytest.mark.parametrize("cell_clip", [math.inf, 1.5])
@pytest.mark.parametrize("bs, H, levels, dtype, layout", CASES, ids=CASE_IDS)
def test_lstm_step_forward(bs, H, levels, dtype, layout, cell_clip):
    g = gen(bs * 100 + H)
    gates = as_layout((3 * torch.randn(bs, 4 * H, generator=g, dtype=F64)).to(dtype), layout)
    c_prev = as_layout(2 * torch.randn(bs, H, generator=g, dtype=compute_dtype(dtype)), layout)
    lstm_forward_checked(gates, c_prev, levels, cell_clip)


@pytest.mark.parametrize("bs, H, levels, dtype, layout", CASES, ids=CASE_IDS)
def test_lstm_recompute_cell_and_output(bs, H, levels, dtype, layout):
    acc = compute_dtype(dtype)
    codes = codes_view(random_codes(4, bs, H, levels, seed=H), layout)
    c_prev = as_layout(torch.randn(bs, H, generator=gen(bs), dtype=acc), layout)
    c = R.lstm_recompute_cell(codes, c_prev, levels)
    assert_bitwise("c", K.lstm_recompute_cell(codes, c_prev, levels), c)
    for out_dtype in (dtype, acc):
        m = R.lstm_output(codes, as_layout(c, layout), levels, out_dtype)
        assert_bitwise(f"m {out_dtype}", K.lstm_output(codes, as_layout(c, layout), levels, out_dtype), m)
        for step in (K, R):  # the cell kernel's m_out: the same m from the c it rebuilds
            m_out = torch.empty(bs, H, dtype=out_dtype)
            assert_bitwise("c with m_out", step.lstm_recompute_cell(codes, c_prev, levels, m_out=m_out), c)
            assert_bitwise(f"m_out {out_dtype}", m_out, m)


@pytest.mark.parametrize("exact, cell_clip", [(False, math.inf), (True, math.inf), (False, 2.0)])
@pytest.mark.parametrize("bs, H, levels, dtype, layout", CASES, ids=CASE_IDS)
def test_lstm_step_backward(bs, H, levels, dtype, layout, exact, cell_clip):
    acc = compute_dtype(dtype)
    g = gen(bs + 7 * H)
    codes = codes_view(random_codes(4, bs, H, levels, seed=levels + H), layout)
    c_prev = as_layout(3 * torch.randn(bs, H, generator=g, dtype=acc), layout)  # tanh' of c fades
    # dm in the input dtype: both convert it to the compute dtype
    dm = as_layout(torch.randn(bs, H, generator=g, dtype=F64).to(dtype), layout)
    dc = as_layout(torch.randn(bs, H, generator=g, dtype=acc), layout)
    pre = as_layout(4 * torch.randn(bs, 4 * H, generator=g, dtype=acc), layout) if exact else None
    got = K.lstm_step_backward(codes, c_prev, dm, dc, levels, preact=pre, cell_clip=cell_clip)
    expected = R.lstm_step_backward(codes, c_prev, dm, dc, levels, preact=pre, cell_clip=cell_clip)
    atol, rtol = BWD_TOL[acc]
    for name, a, b in zip(("dgates", "dc_prev"), got, expected):
        assert a.dtype == b.dtype == acc and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)


# ---------------------------------------------------------------------------------------------
# GRU


def gru_forward_checked(gx, gh, h_prev, levels):
    codes, h = K.gru_step_forward(gx, gh, h_prev, levels)
    ref_codes, ref_h = R.gru_step_forward(gx, gh, h_prev, levels)
    assert codes.dtype == torch.uint8 and codes.shape == ref_codes.shape and h.dtype == ref_h.dtype
    acc, H = ref_h.dtype, h_prev.shape[1]
    gx, gh, hp = gx.to(acc), gh.to(acc), h_prev.to(acc)
    moved = check_activation_codes(codes[0], gx[:, :H] + gh[:, :H], levels, SIG, "r")
    moved += check_activation_codes(codes[1], gx[:, H : 2 * H] + gh[:, H : 2 * H], levels, SIG, "z")
    # n from the kernel's own r code; then h's code and value from its own z and n codes, exactly.
    r, z = torch_decode(codes[0], levels, SIG, acc), torch_decode(codes[1], levels, SIG, acc)
    pre_n = gx[:, 2 * H :] + r * gh[:, 2 * H :]
    moved += check_activation_codes(codes[2], pre_n, levels, TANH, "n")
    n = torch_decode(codes[2], levels, TANH, acc)
    assert_bitwise("h code", codes[3], torch_encode((1.0 - z) * n + z * hp, levels, TANH))
    assert_bitwise("h", h, torch_decode(codes[3], levels, TANH, acc))
    if torch.equal(codes, ref_codes):
        assert_bitwise("h vs torch", h, ref_h)
    return moved, codes[:3].numel()


@pytest.mark.parametrize("bs, H, levels, dtype, layout", CASES, ids=CASE_IDS)
def test_gru_step_forward(bs, H, levels, dtype, layout):
    g = gen(bs * 10 + H)
    gx = as_layout((2 * torch.randn(bs, 3 * H, generator=g, dtype=F64)).to(dtype), layout)
    gh = as_layout(torch.randn(bs, 3 * H, generator=g, dtype=F64).to(dtype), layout)
    h_prev = torch_decode(random_codes(1, bs, H, levels, seed=bs)[0], levels, TANH, dtype)
    gru_forward_checked(gx, gh, as_layout(h_prev, layout), levels)


@pytest.mark.parametrize("dtype", [F64, BF16])
def test_gru_step_forward_keeps_preactivations(dtype):
    """grad="exact": the forward kernel writes the pre-activations of r, z and n (n's from the
    kernel's own r code), as the torch step does."""
    g = gen(11)
    bs, H, levels = 5, 12, 16
    gx = (2 * torch.randn(bs, 3 * H, generator=g, dtype=F64)).to(dtype)
    gh = torch.randn(bs, 3 * H, generator=g, dtype=F64).to(dtype)
    h_prev = torch_decode(random_codes(1, bs, H, levels, seed=2)[0], levels, TANH, dtype)
    acc = compute_dtype(dtype)
    pre = torch.empty(bs, 3 * H, dtype=acc)
    codes, _ = K.gru_step_forward(gx, gh, h_prev, levels, preact_out=pre)
    ref_pre = torch.empty(bs, 3 * H, dtype=acc)
    ref_codes, _ = R.gru_step_forward(gx, gh, h_prev, levels, preact_out=ref_pre)
    assert_bitwise("pre r, z", pre[:, : 2 * H], ref_pre[:, : 2 * H])
    r = torch_decode(codes[0], levels, SIG, acc)
    assert_bitwise("pre n", pre[:, 2 * H :], gx[:, 2 * H :].to(acc) + r * gh[:, 2 * H :].to(acc))


@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16, F64])
def test_gru_step_forward_adds_the_recurrent_bias_in_the_kernel(dtype):
    """b_hh= (the layers pass h W_hh^T and the bias apart: one launch a step less) gives the bits
    of passing gh += b_hh, rounded to gh's dtype, codes, h and pre-activations, in both
    implementations; with mixed input dtypes the bias is added in gh's dtype first."""
    g = gen(17)
    bs, H, levels = 5, 12, 64
    gx = (2 * torch.randn(bs, 3 * H, generator=g, dtype=F64)).to(dtype)
    gh = as_layout(torch.randn(bs, 3 * H, generator=g, dtype=F64).to(dtype), "slice")
    b_hh = torch.randn(3 * H, generator=g, dtype=F64).to(dtype)
    h_prev = torch_decode(random_codes(1, bs, H, levels, seed=3)[0], levels, TANH, dtype)
    acc = compute_dtype(dtype)
    summed = gh.clone()
    summed += b_hh
    for impl in (K, R):
        for gx_in in (gx, gx.to(F64 if dtype == F64 else torch.float32)):  # one dtype, mixed
            outs = []
            for gh_in, bias in ((gh, b_hh), (summed, None)):
                pre = torch.empty(bs, 3 * H, dtype=acc)
                codes, h = impl.gru_step_forward(gx_in, gh_in, h_prev, levels, preact_out=pre,
                                                 b_hh=bias)
                outs.append((codes, h, pre))
            for name, a, b in zip(("codes", "h", "pre"), *outs):
                assert_bitwise(f"{name} ({impl.__name__}, gx {gx_in.dtype})", a, b)
    with pytest.raises(ValueError, match=r"b_hh must have shape \(36,\)"):
        K.gru_step_forward(gx, gh, h_prev, levels, b_hh=b_hh[:5])
    other = torch.float64 if dtype != F64 else torch.float32
    with pytest.raises(TypeError, match="b_hh must have gh's dtype"):
        K.gru_step_forward(gx, gh, h_prev, levels, b_hh=b_hh.to(other))


def test_gru_step_forward_mixed_input_dtypes():
    # gx in bfloat16 with gh and h_prev in float32: torch converts everything to float32 first.
    g = gen(3)
    gx = torch.randn(3, 21, generator=g).to(BF16)
    gh, h_prev = torch.randn(3, 21, generator=g), torch.rand(3, 7, generator=g) * 2 - 1
    gru_forward_checked(gx, as_layout(gh, "slice"), h_prev, 64)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("bs, H, levels, dtype, layout", CASES, ids=CASE_IDS)
def test_gru_step_backward(bs, H, levels, dtype, layout, exact):
    acc = compute_dtype(dtype)
    g = gen(bs + 5 * H)
    codes = codes_view(random_codes(4, bs, H, levels, seed=levels * H), layout)
    h_prev = as_layout(torch.rand(bs, H, generator=g, dtype=acc) * 2 - 1, layout)
    gh_n = as_layout(torch.randn(bs, H, generator=g, dtype=acc), layout)
    dh = as_layout(torch.randn(bs, H, generator=g, dtype=acc), layout)
    pre = as_layout(4 * torch.randn(bs, 3 * H, generator=g, dtype=acc), layout) if exact else None
    got = K.gru_step_backward(codes, h_prev, gh_n, dh, levels, preact=pre)
    expected = R.gru_step_backward(codes, h_prev, gh_n, dh, levels, preact=pre)
    atol, rtol = BWD_TOL[acc]
    for name, a, b in zip(("dgx", "dgh", "dh_direct"), got, expected):
        assert a.dtype == b.dtype == acc and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)


# ---------------------------------------------------------------------------------------------
# Launch geometry, rare code moves, edge cases


def test_small_tiles_many_programs(monkeypatch):
    """Tiles of 2 x 8: a 5 x 19 step runs 3 x 3 programs with tails in both directions."""
    monkeypatch.setattr(K, "TILE", K.TileRule(elems=16, min_h=8, max_h=8, fit_rows=True))
    bs, H, levels = 5, 19, 64
    assert K.TILE.tile(bs, H) == (2, 8)
    g = gen(11)
    gates = as_layout(3 * torch.randn(bs, 4 * H, generator=g), "slice")
    c_prev = as_layout(torch.randn(bs, H, generator=g), "slice")
    lstm_forward_checked(gates, c_prev, levels)
    gx, gh = 2 * torch.randn(bs, 3 * H, generator=g), torch.randn(bs, 3 * H, generator=g)
    h_prev = torch.rand(bs, H, generator=g) * 2 - 1
    gru_forward_checked(as_layout(gx, "transposed"), gh, h_prev, levels)
    codes = codes_view(random_codes(4, bs, H, levels, seed=1), "slice")
    dm, dc = torch.randn(bs, H, generator=g), torch.randn(bs, H, generator=g)
    for a, b in zip(K.lstm_step_backward(codes, c_prev, dm, dc, levels),
                    R.lstm_step_backward(codes, c_prev, dm, dc, levels)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert_bitwise("m", K.lstm_output(codes, c_prev, levels, BF16),
                   R.lstm_output(codes, c_prev, levels, BF16))
    for a, b in zip(K.gru_step_backward(codes[:4], c_prev, dm, dc, levels),
                    R.gru_step_backward(codes[:4], c_prev, dm, dc, levels)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Packed codes: the forward kernels pack into code rows, the others read them packed

BITS_LEVELS = [(1, 2), (2, 3), (3, 8), (4, 16), (5, 17), (6, 64), (7, 100), (8, 256)]


def packed_rows(bs, H, planes, bits, offset=5):
    """Code rows of the store's layout at an odd byte offset inside a buffer filled with 0xEE, one
    spare byte at the end: writes outside the rows, or reads of unwritten bytes, show up."""
    probe = R.CodeRows.packed(torch.empty(0, dtype=torch.uint8), offset, bs, planes, H, bits)
    size = offset + bs * probe.row_stride + 1
    return R.CodeRows.packed(torch.full((size,), 0xEE, dtype=torch.uint8), offset, bs, planes, H, bits)


def expected_bytes(rows, codes):
    """The buffer as the torch reference would leave it with ``codes`` [Q, bs, H] stored in rows."""
    ref = rows._replace(data=rows.data.clone())
    R.write_codes(ref, codes)
    return ref.data


@pytest.mark.parametrize("bits, levels", BITS_LEVELS)
@pytest.mark.parametrize("tiles", ["one", "small"])
def test_forward_kernels_pack_codes_in_place(monkeypatch, bits, levels, tiles):
    """Every width 1-8: the bytes the forward kernels write are the codec's packing of their own
    codes (zero padding units included), nothing outside the rows changes, and the final-state
    codes of rows done..bs-1 land in ``final``. "small" tiles (2 x 8) put several programs on a
    row, so groups of packed codes meet at tile edges."""
    if tiles == "small":
        monkeypatch.setattr(K, "TILE", K.TileRule(elems=16, min_h=8, max_h=8, fit_rows=True))
    bs, H, done = 5, 19, 2
    g = gen(bits)
    gates = as_layout(3 * torch.randn(bs, 4 * H, generator=g), "slice")
    c_prev = torch.randn(bs, H, generator=g)
    final_all = torch.empty(2, bs, H, dtype=torch.uint8)  # o, u of every row
    codes, c, m = K.lstm_step_forward(gates, c_prev, levels, final=final_all)  # checked above
    rows = packed_rows(bs, H, 4, bits)
    final = torch.full((2, bs + 2, H), 0xEE, dtype=torch.uint8)
    expected_final = final.clone()
    expected_final[:, done:bs] = final_all[:, done:]
    out, c2, m2 = K.lstm_step_forward(gates, c_prev, levels, out=rows, final=final, done=done)
    assert out is rows
    assert_bitwise("packed lstm codes", rows.data, expected_bytes(rows, codes))
    assert_bitwise("final o, u", final, expected_final)
    assert_bitwise("c", c2, c)
    assert_bitwise("m", m2, m)
    none, c3, _ = K.lstm_step_forward(gates, c_prev, levels, final=final, done=done, store=False)
    assert none is None
    assert_bitwise("c without codes", c3, c)

    gx, gh = 2 * torch.randn(bs, 3 * H, generator=g), torch.randn(bs, 3 * H, generator=g)
    h_prev = torch.rand(bs, H, generator=g) * 2 - 1
    codes, h = K.gru_step_forward(gx, gh, h_prev, levels)
    rows = packed_rows(bs, H, 4, bits, offset=0)
    final = torch.full((1, bs, H), 0xEE, dtype=torch.uint8)
    expected_final = final.clone()
    expected_final[0, done:bs] = codes[3, done:]
    _, h2 = K.gru_step_forward(gx, gh, h_prev, levels, out=rows, final=final, done=done)
    assert_bitwise("packed gru codes", rows.data, expected_bytes(rows, codes))
    assert_bitwise("final h", final, expected_final)
    assert_bitwise("h", h2, h)


@pytest.mark.parametrize("bits, levels", BITS_LEVELS)
def test_kernels_read_packed_codes(bits, levels):
    """Recompute, output and backward kernels give the same results from packed code rows as from
    the unpacked codes."""
    bs, H = 3, 13
    g = gen(levels)
    codes = random_codes(4, bs, H, levels, seed=bits)
    rows = packed_rows(bs, H, 4, bits)
    R.write_codes(rows, codes)
    assert torch.equal(R.read_codes(rows), codes)
    c_prev, dm, dc = (torch.randn(bs, H, generator=g) for _ in range(3))
    assert_bitwise("c", K.lstm_recompute_cell(rows, c_prev, levels),
                   K.lstm_recompute_cell(codes, c_prev, levels))
    m_rows, m_codes = torch.empty(bs, H, dtype=BF16), torch.empty(bs, H, dtype=BF16)
    K.lstm_recompute_cell(rows, c_prev, levels, m_out=m_rows)
    K.lstm_recompute_cell(codes, c_prev, levels, m_out=m_codes)
    assert_bitwise("m_out", m_rows, m_codes)
    assert_bitwise("m", K.lstm_output(rows, c_prev, levels, BF16),
                   K.lstm_output(codes, c_prev, levels, BF16))
    for name, a, b in zip(("dgates", "dc_prev"), K.lstm_step_backward(rows, c_prev, dm, dc, levels),
                          K.lstm_step_backward(codes, c_prev, dm, dc, levels)):
        assert_bitwise(name, a, b)
    gru_rows = packed_rows(bs, H, 4, bits)
    R.write_codes(gru_rows, codes[:4])
    assert_bitwise("h", K.gru_output(gru_rows, levels, F16), R.gru_output(codes, levels, F16))
    for name, a, b in zip(("dgx", "dgh", "dh_direct"),
                          K.gru_step_backward(gru_rows, c_prev, dm, dc, levels),
                          K.gru_step_backward(codes[:4], c_prev, dm, dc, levels)):
        assert_bitwise(name, a, b)


@pytest.mark.parametrize("step", [K, R], ids=["triton", "torch"])
def test_step_outputs_into_given_tensors(step):
    """The layers' per-step path hands the step functions its own buffers: c updated in place,
    m / h written into the output rows in the layer's dtype (rounded as ``.to`` rounds), gradients
    into slices of the chunk's buffers, dc and dh updated in place. Same values as fresh outputs."""
    bs, H, levels = 3, 10, 64
    g = gen(21)
    gates = torch.randn(bs, 4 * H, generator=g)
    c_state = torch.randn(bs + 2, H, generator=g)  # c[:bs] of a larger state
    _, c_ref, m_ref = step.lstm_step_forward(gates, c_state[:bs].clone(), levels)
    y = torch.full((bs + 4, H), float("nan"), dtype=BF16)
    _, c, m = step.lstm_step_forward(gates, c_state[:bs], levels, c_out=c_state[:bs],
                                     m_out=y[2 : 2 + bs])
    assert c.data_ptr() == c_state.data_ptr() and m.data_ptr() == y[2].data_ptr()
    assert_bitwise("c in place", c_state[:bs], c_ref)
    assert_bitwise("m as bfloat16", y[2 : 2 + bs], m_ref.to(BF16))

    codes = random_codes(4, bs, H, levels, seed=2)
    dm, dc = torch.randn(bs, H, generator=g), torch.randn(bs, H, generator=g)
    dg_ref, dcp_ref = step.lstm_step_backward(codes, c_ref, dm, dc.clone(), levels)
    chunk = torch.full((bs + 2, 4 * H), float("nan"))
    step.lstm_step_backward(codes, c_ref, dm, dc, levels, dgates_out=chunk[1 : 1 + bs],
                            dc_prev_out=dc)
    assert_bitwise("dgates into a chunk slice", chunk[1 : 1 + bs], dg_ref)
    assert_bitwise("dc in place", dc, dcp_ref)

    gx, gh = torch.randn(bs, 3 * H, generator=g), torch.randn(bs, 3 * H, generator=g)
    h_prev = torch.rand(bs, H, generator=g) * 2 - 1
    _, h_ref = step.gru_step_forward(gx, gh, h_prev, levels)
    h_out = torch.empty(bs, H, dtype=F16)
    step.gru_step_forward(gx, gh, h_prev, levels, h_out=h_out)
    assert_bitwise("h as float16", h_out, h_ref.to(F16))
    dh = torch.randn(bs, H, generator=g)
    refs = step.gru_step_backward(codes[:4], h_prev, gh[:, :H], dh.clone(), levels)
    dgx, dgh = torch.empty(bs, 3 * H), torch.empty(bs, 3 * H)
    step.gru_step_backward(codes[:4], h_prev, gh[:, :H], dh, levels, dgx_out=dgx, dgh_out=dgh,
                           dh_direct_out=dh)
    for name, got, ref in zip(("dgx", "dgh", "dh_direct in place"), (dgx, dgh, dh), refs):
        assert_bitwise(name, got, ref)


def test_code_rows_bad_arguments():
    bs, H = 2, 5
    rows = packed_rows(bs, H, 5, 6)
    short = rows._replace(data=rows.data[:-3])
    with pytest.raises(ValueError, match="codes reaches byte 65 of a buffer of 63 bytes"):
        K.lstm_output(short, torch.zeros(bs, H), 64, F32)
    with pytest.raises(ValueError, match=r"out must hold >= 4 planes of \(2, 5\) codes, got 3"):
        K.lstm_step_forward(torch.zeros(bs, 4 * H), torch.zeros(bs, H), 64,
                            out=packed_rows(bs, H, 3, 6))
    with pytest.raises(ValueError, match=r"final must be a contiguous uint8 tensor \[2, >= 2, 5\]"):
        K.lstm_step_forward(torch.zeros(bs, 4 * H), torch.zeros(bs, H), 64,
                            final=torch.zeros(2, 1, H, dtype=torch.uint8))
    with pytest.raises(TypeError, match="c_out must be torch.float32 .*, got torch.float64"):
        K.lstm_step_forward(torch.zeros(bs, 4 * H), torch.zeros(bs, H), 64,
                            c_out=torch.zeros(bs, H, dtype=F64))
    with pytest.raises(ValueError, match="dgates_out must be contiguous"):
        K.lstm_step_backward(torch.zeros(5, bs, H, dtype=torch.uint8), torch.zeros(bs, H),
                             torch.zeros(bs, H), torch.zeros(bs, H), 64,
                             dgates_out=torch.zeros(4 * H, bs).t())
    with pytest.raises(ValueError, match="cannot hold whole groups"):
        K.TILE, old = K.TileRule(elems=16, min_h=4, max_h=4, fit_rows=True), K.TILE
        try:
            K.lstm_step_forward(torch.zeros(bs, 4 * H), torch.zeros(bs, H), 100,
                                out=packed_rows(bs, H, 5, 7))  # groups of 8 codes
        finally:
            K.TILE = old


def test_gpu_tiles_are_few_and_cover_every_width():
    tiles = K.GPU_TILE.shapes()
    assert tiles == [(64, 16), (32, 32), (16, 64), (8, 128)]
    for H in (1, 7, 16, 33, 100, 128, 129, 4096):
        for bs in (1, 5, 300):
            assert K.GPU_TILE.tile(bs, H) in tiles


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_forward_codes_move_at_most_one_level_rarely(dtype):
    """Over a large step (65k activation codes per launch), the share of codes that moved one level
    against torch stays below 1e-3, as for the codec's fused activation (test_codec)."""
    moved = total = 0
    g = gen(0)
    for levels in (64, 256):
        gates = (3 * torch.randn(64, 4 * 256, generator=g, dtype=F64)).to(dtype)
        c_prev = 2 * torch.randn(64, 256, generator=g, dtype=compute_dtype(dtype))
        m, n = lstm_forward_checked(gates, c_prev, levels)
        moved, total = moved + m, total + n
        gx = (2 * torch.randn(64, 3 * 256, generator=g, dtype=F64)).to(dtype)
        gh = torch.randn(64, 3 * 256, generator=g, dtype=F64).to(dtype)
        h_prev = (torch.rand(64, 256, generator=g, dtype=F64) * 2 - 1).to(dtype)
        m, n = gru_forward_checked(gx, gh, h_prev, levels)
        moved, total = moved + m, total + n
    print(f"{dtype}: {moved} of {total} activation codes moved one level ({moved / total:.2e})")
    assert moved / total <= 1e-3, f"{moved} of {total} codes moved one level"


def boundary_preactivations(shape, levels, kind, g):
    """Pre-activations whose activation lies on a rounding boundary between two levels (up to the
    rounding of the pre-activation itself), where the two backends may disagree by one level."""
    k = torch.randint(0, levels - 1, shape, generator=g, dtype=F64) + 0.5
    if kind == SIG:
        return torch.logit(k / (levels - 1))
    return torch.atanh((2 * k - (levels - 1)) / (levels - 1))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_forward_codes_on_level_boundaries_move_at_most_one_level(dtype):
    """Activations placed on level boundaries exercise the one-level moves the checks allow."""
    bs, H, levels = 16, 64, 256
    g = gen(5)
    kinds = (SIG, SIG, TANH, SIG)
    gates = torch.cat([boundary_preactivations((bs, H), levels, kind, g) for kind in kinds], 1)
    moved, total = lstm_forward_checked(gates.to(dtype), torch.zeros(bs, H, dtype=dtype), levels)
    print(f"{dtype}: {moved} of {total} codes on level boundaries moved one level")


def test_empty_batch():
    codes, c, m = K.lstm_step_forward(torch.zeros(0, 12), torch.zeros(0, 3), 64)
    assert codes.shape == (4, 0, 3) and c.shape == m.shape == (0, 3)
    codes, h = K.gru_step_forward(torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0, 3), 64)
    assert codes.shape == (4, 0, 3) and h.shape == (0, 3)


def test_bad_arguments():
    with pytest.raises(TypeError, match="c_prev must be float32 or float64 .*, got torch.bfloat16"):
        K.lstm_step_forward(torch.zeros(2, 12), torch.zeros(2, 3, dtype=BF16), 64)
    with pytest.raises(ValueError, match=r"gates must have shape \(2, 12\), got \(2, 11\)"):
        K.lstm_step_forward(torch.zeros(2, 11), torch.zeros(2, 3), 64)
    with pytest.raises(ValueError, match=r"gh must have shape \(2, 9\), got \(3, 9\)"):
        K.gru_step_forward(torch.zeros(2, 9), torch.zeros(3, 9), torch.zeros(2, 3), 64)


# ---------------------------------------------------------------------------------------------
# End to end: the layers with backend="triton" against backend="torch"

STATE_TOL = (2e-4, 2e-4)  # float32 (atol, rtol), as tests/test_rnn.py


@pytest.mark.parametrize(
    "cls, kwargs",
    [(DiscreteLSTM, {}), (DiscreteLSTM, dict(grad="exact")), (DiscreteLSTM, dict(cell_clip=0.5)),
     (DiscreteGRU, {}), (DiscreteGRU, dict(grad="exact"))],
)
def test_layers_triton_backend_matches_torch(cls, kwargs):
    """Bidirectional, 2 layers, an unsorted packed batch of lengths 4, 6, 3 (active rows shrink over
    time), two chunks of cell-state checkpoints: output, final states and every gradient; both
    gradient modes, and a cell clip that is active on many steps."""
    torch.manual_seed(0)
    module = cls(5, 8, num_layers=2, bidirectional=True, levels=64, chunk_size=4, **kwargs)
    g = gen(0)
    x = torch.randn(6, 3, 5, generator=g, requires_grad=True)
    h0 = (0.5 * torch.randn(4, 3, 8, generator=g)).requires_grad_()
    leaves = [x, h0]
    hx = h0
    if cls is DiscreteLSTM:
        c0 = torch.randn(4, 3, 8, generator=g).requires_grad_()
        leaves, hx = [x, h0, c0], (h0, c0)
    lengths = torch.tensor([4, 6, 3], device="cpu")
    results = {}
    for backend in ("torch", "triton"):
        module.backend = backend
        out, hx_out = module(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        y, _ = pad_packed_sequence(out)
        outs = [y, *(hx_out if isinstance(hx_out, tuple) else (hx_out,))]
        gl = gen(1)
        loss = sum((o * torch.randn(o.shape, generator=gl)).sum() for o in outs)
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
        results[backend] = [o.detach() for o in outs] + list(grads)
    names = ["output", "h_n", "c_n"][: len(outs)] + ["d_input", "d_h0", "d_c0"][: len(leaves)]
    names += [n for n, _ in module.named_parameters()]
    atol, rtol = STATE_TOL
    for name, a, b in zip(names, results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)
    assert all(float(t.abs().sum()) > 0 for t in results["triton"][len(outs):]), "a zero gradient"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("levels, bits", [(64, 6), (100, 7), (256, 8)])
def test_layer_code_buffers_match_torch_path(cell, levels, bits):
    """The Triton path packs each step's codes into the code store from its step kernel; the torch
    path packs whole chunks with the torch codec. Both leave the same bytes (and final-state
    codes): reverse direction over a batch that grows, H padded from 11 to 16 units."""
    from discrnn.rnn import _step_ops
    from discrnn.gru_function import GRULayerFunction
    from discrnn.lstm_function import LSTMLayerFunction
    from discrnn.rnn_function import LayerConfig

    I, H = 4, 11
    batch_sizes = [3, 3, 2, 2, 1]
    g = gen(levels)
    x = torch.randn(sum(batch_sizes), I, generator=g, requires_grad=True)
    h0 = torch.randn(3, H, generator=g) * 0.5
    Q = 4 if cell == "lstm" else 3
    w_ih = torch.randn(Q * H, I, generator=g) * 0.5
    w_hh = torch.randn(Q * H, H, generator=g) * 0.5
    b = torch.randn(Q * H, generator=g) * 0.1
    results = {}
    for backend in ("torch", "triton"):
        cfg = LayerConfig(batch_sizes, levels, bits, 2, True, _step_ops(backend))
        if cell == "lstm":
            outs = LSTMLayerFunction.apply(x, h0, torch.randn(3, H, generator=gen(1)), w_ih, w_hh,
                                           b, None, cfg)
        else:
            outs = GRULayerFunction.apply(x, h0, w_ih, w_hh, b, b.flip(0), cfg)
        results[backend] = [o.detach() for o in outs]
    for k, (a, b_) in enumerate(zip(results["triton"], results["torch"])):
        assert_bitwise(f"output {k}", a, b_)
    codes = results["torch"][-3 if cell == "lstm" else -2]
    padded = 16
    planes = Q if cell == "lstm" else Q + 1  # LSTM: i, f, g, o (u is rebuilt); GRU: r, z, n, h
    assert codes.numel() == sum(batch_sizes) * planes * padded * bits // 8


@pytest.mark.parametrize("cls, kwargs, dtype, tol", [
    (DiscreteLSTM, dict(proj_size=3, batch_first=True), F64, 1e-12),
    (DiscreteGRU, dict(batch_first=True), BF16, 0.0),
    # bf16 backward: both backends run the matrix products in bf16, the sums in float32
    (DiscreteLSTM, dict(batch_first=True), BF16, 0.0),
])
def test_layers_triton_backend_matches_torch_proj_and_dtypes(cls, kwargs, dtype, tol):
    """proj_size (m goes through weight_hr before the output rows) in float64, and bfloat16
    outputs written by the step kernel itself: Triton against torch, outputs and gradients. On the
    CPU both take the same codes here (bfloat16: bit-identical); on a GPU torch's own tanh/sigmoid
    may move a code one level (module docstring), hence the slack there."""
    if torch.cuda.is_available():
        tol = 2e-2
    torch.manual_seed(1)
    module = cls(4, 6, levels=256, chunk_size=2, **kwargs).to(dtype)
    x = torch.randn(2, 5, 4, generator=gen(3), dtype=F64).to(dtype).requires_grad_()
    results = {}
    for backend in ("torch", "triton"):
        module.backend = backend
        y, hx = module(x)
        outs = [y, *(hx if isinstance(hx, tuple) else (hx,))]
        gl = gen(4)
        loss = sum((o.double() * torch.randn(o.shape, generator=gl, dtype=F64)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [x, *module.parameters()])
        results[backend] = [o.detach() for o in outs] + list(grads)
    for k, (a, b) in enumerate(zip(results["triton"], results["torch"])):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"result {k}")


def test_host_helpers_match_triton_and_torch():
    """The launchers' plain-Python helpers (run per time step; Triton's are slow host calls in
    recent versions) give what triton.next_power_of_2 and a float32 tensor give."""
    for n in range(1, 5000):
        assert K._next_pow2(n) == triton.next_power_of_2(n), n
    for v in (1.0, 0.1, 2.5, 1e-46, 2.0**-149, 123456789.0, 3.4e38, 3.4028235677973366e38,
              3.5e38, math.inf, -1e39):
        assert K._as_float32(v) == float(torch.tensor(v, dtype=torch.float32)), v
    assert K.cell_clip_value(2.0) == 2.0 and K.cell_clip_value(math.inf) == math.inf
    for bad in (0.1, 0.0, -1.0, math.nan, 3.5e38):
        with pytest.raises(ValueError, match="cell_clip must be > 0 and a float32 value"):
            K.cell_clip_value(bad)


@pytest.mark.parametrize("bits, levels", [(3, 8), (6, 64), (7, 100), (8, 256)])
@pytest.mark.parametrize("cell_clip", [math.inf, 1.5])
def test_recompute_cell_over_a_run_of_steps(bits, levels, cell_clip):
    """steps=n rebuilds n consecutive steps in one launch (c in registers): bit for bit the c and m
    of n one-step calls chained, from packed rows and from unpacked codes, in both
    implementations."""
    bs, H, n = 3, 13, 5
    g = gen(bits)
    codes = random_codes(4, n * bs, H, levels, seed=levels)
    rows = packed_rows(n * bs, H, 4, bits)
    R.write_codes(rows, codes)
    c_first = 2 * torch.randn(bs, H, generator=g)
    c, chained_c, chained_m = c_first, [], []
    for s in range(n):
        m = torch.empty(bs, H, dtype=BF16)
        c = R.lstm_recompute_cell(codes[:, s * bs : (s + 1) * bs], c, levels, cell_clip, m_out=m)
        chained_c.append(c)
        chained_m.append(m)
    expected_c, expected_m = torch.cat(chained_c), torch.cat(chained_m)
    for impl in (K, R):
        for src in (rows, codes):
            m_out = torch.empty(n * bs, H, dtype=BF16)
            got = impl.lstm_recompute_cell(src, c_first, levels, cell_clip, m_out=m_out, steps=n)
            assert_bitwise(f"c ({impl.__name__})", got, expected_c)
            assert_bitwise(f"m ({impl.__name__})", m_out, expected_m)
            assert_bitwise("c without m", impl.lstm_recompute_cell(src, c_first, levels,
                                                                   cell_clip, steps=n), expected_c)
    with pytest.raises(ValueError, match=r"codes must hold >= 3 planes of \(15, 13\) codes"):
        K.lstm_recompute_cell(codes[:, : 4 * bs], c_first, levels, steps=n)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            K.lstm_recompute_cell(codes, c_first, levels, steps=bad)


def test_unchecked_launches_match_checked_ones():
    """check=False (the layers' later steps) launches the same kernels on the same arguments: the
    same bits as a checked call, for every per-step launcher, in both implementations."""
    bs, H, levels, bits = 3, 13, 64, 6
    g = gen(7)
    gates = 3 * torch.randn(bs, 4 * H, generator=g)
    gx, gh = 3 * torch.randn(bs, 3 * H, generator=g), 3 * torch.randn(bs, 3 * H, generator=g)
    c_prev, dm, dc, h_prev = (torch.randn(bs, H, generator=g) for _ in range(4))
    for impl in (K, R):
        results = []
        for check in (True, False):
            rows = packed_rows(bs, H, 4, bits)
            final = torch.zeros(2, bs, H, dtype=torch.uint8)
            _, c, m = impl.lstm_step_forward(gates, c_prev, levels, out=rows, final=final, done=1,
                                             cell_clip=2.0, check=check)
            dg, dcp = impl.lstm_step_backward(rows, c_prev, dm, dc, levels, cell_clip=2.0,
                                              check=check)
            grows = packed_rows(bs, H, 4, bits)
            _, h = impl.gru_step_forward(gx, gh, h_prev, levels, out=grows, check=check)
            gb = impl.gru_step_backward(grows, h_prev, gh[:, 2 * H :].contiguous(), dm, levels,
                                        check=check)
            results.append([rows.data, final, c, m, dg, dcp, grows.data, h, *gb])
        for i, (a, b) in enumerate(zip(*results)):
            assert_bitwise(f"{impl.__name__} output {i}", a, b)


@pytest.mark.parametrize("dy_dtype", [torch.float32, BF16])
def test_backward_adds_the_output_gradient_in_the_kernel(dy_dtype):
    """dy= (the layers pass the step's output gradient) gives the bits of passing dm + dy (dh + dy)
    computed by torch, in both implementations; a GRU's dh_direct_out may still alias dh."""
    bs, H, levels = 3, 13, 64
    g = gen(11)
    codes = random_codes(4, bs, H, levels, seed=5)
    c_prev, dm, dc, h_prev = (torch.randn(bs, H, generator=g) for _ in range(4))
    gh_n = torch.randn(bs, H, generator=g)
    dy = torch.randn(bs, H, generator=g).to(dy_dtype)
    for impl in (K, R):
        for a, b in zip(impl.lstm_step_backward(codes, c_prev, dm, dc, levels, cell_clip=2.0, dy=dy),
                        impl.lstm_step_backward(codes, c_prev, dm + dy.float(), dc, levels,
                                                cell_clip=2.0)):
            assert_bitwise(f"lstm ({impl.__name__})", a, b)
        expected = impl.gru_step_backward(codes, h_prev, gh_n, dm + dy.float(), levels)
        dh = dm.clone()
        got = impl.gru_step_backward(codes, h_prev, gh_n, dh, levels, dh_direct_out=dh, dy=dy)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_bitwise(f"gru {i} ({impl.__name__})", a, b)
    with pytest.raises(ValueError, match=r"dy must have shape \(3, 13\)"):
        K.lstm_step_backward(codes, c_prev, dm, dc, levels, dy=dy[:2])
    with pytest.raises(TypeError, match="dy must be a floating-point tensor"):
        K.gru_step_backward(codes, h_prev, gh_n, dm, levels, dy=dy.to(torch.int32))


@pytest.mark.parametrize("low", [BF16, torch.float16])
def test_gru_backward_rounds_dgh_for_a_low_precision_product(low):
    """dgh_low_out= (the layers' bf16 / fp16 backward product reads it) receives dgh.to(low) bit
    for bit, the other outputs unchanged, and dh_add= (that product, added by the next step's
    kernel) gives the bits of adding it to dh first, in both implementations."""
    bs, H, levels = 3, 13, 64
    g = gen(13)
    codes = random_codes(4, bs, H, levels, seed=7)
    h_prev, gh_n, dh, dy = (torch.randn(bs, H, generator=g) for _ in range(4))
    for impl in (K, R):
        dgh_low = torch.full((bs, 3 * H), float("nan"), dtype=low)
        got = impl.gru_step_backward(codes, h_prev, gh_n, dh.clone(), levels, dy=dy,
                                     dgh_low_out=dgh_low)
        want = impl.gru_step_backward(codes, h_prev, gh_n, dh.clone(), levels, dy=dy)
        for name, a, b in zip(("dgx", "dgh", "dh_direct"), got, want):
            assert_bitwise(f"{name} ({impl.__name__})", a, b)
        assert_bitwise(f"dgh_low_out ({impl.__name__})", dgh_low, want[1].to(low))
        # dh_add= (the later step's product, in that dtype, over its first rows): the bits of
        # dh[:n] += dh_add first; the other rows' dh as given (a -0.0 stays -0.0)
        product = torch.randn(2, H, generator=g).to(low)
        dh_neg = dh.clone()
        dh_neg[2, :3] = -0.0
        summed = dh_neg.clone()
        summed[:2] += product
        got = impl.gru_step_backward(codes, h_prev, gh_n, dh_neg.clone(), levels, dy=dy,
                                     dh_add=product)
        want = impl.gru_step_backward(codes, h_prev, gh_n, summed, levels, dy=dy)
        for name, a, b in zip(("dgx", "dgh", "dh_direct"), got, want):
            assert_bitwise(f"{name} with dh_add ({impl.__name__})", a, b)
        dh_direct = dh_neg.clone()  # in place, as the layers pass it
        impl.gru_step_backward(codes, h_prev, gh_n, dh_direct, levels, dh_direct_out=dh_direct,
                               dh_add=product)
        assert_bitwise(f"dh_direct in place ({impl.__name__})", dh_direct,
                       impl.gru_step_backward(codes, h_prev, gh_n, summed, levels)[2])
    with pytest.raises(ValueError, match=r"dh_add must have shape \(n, 13\) with n <= 3"):
        K.gru_step_backward(codes, h_prev, gh_n, dh, levels, dh_add=torch.zeros(4, H))
    with pytest.raises(ValueError, match=r"dgh_low_out must have shape \(3, 39\)"):
        K.gru_step_backward(codes, h_prev, gh_n, dh, levels, dgh_low_out=dgh_low[:2])
    with pytest.raises(TypeError, match="dgh_low_out must be a floating-point tensor"):
        K.gru_step_backward(codes, h_prev, gh_n, dh, levels,
                            dgh_low_out=torch.empty(bs, 3 * H, dtype=torch.int16))


@pytest.mark.parametrize("low", [BF16, torch.float16])
def test_lstm_backward_rounds_dgates_for_a_low_precision_product(low):
    """dgates_low_out= (the layers' bf16 / fp16 backward product reads it) receives dgates.to(low)
    bit for bit, and a dm in that dtype gives the bits of its float32 value, in both
    implementations."""
    bs, H, levels = 3, 13, 64
    g = gen(12)
    codes = random_codes(4, bs, H, levels, seed=6)
    c_prev, dc, dy = (torch.randn(bs, H, generator=g) for _ in range(3))
    dm = torch.randn(bs, H, generator=g).to(low)
    for impl in (K, R):
        dg_low = torch.full((bs, 4 * H), float("nan"), dtype=low)
        got = impl.lstm_step_backward(codes, c_prev, dm, dc.clone(), levels, cell_clip=2.0,
                                      dy=dy, dgates_low_out=dg_low)
        want = impl.lstm_step_backward(codes, c_prev, dm.float(), dc.clone(), levels,
                                       cell_clip=2.0, dy=dy)
        for name, a, b in zip(("dgates", "dc_prev"), got, want):
            assert_bitwise(f"{name} ({impl.__name__})", a, b)
        assert_bitwise(f"dgates_low_out ({impl.__name__})", dg_low, want[0].to(low))
    with pytest.raises(ValueError, match=r"dgates_low_out must have shape \(3, 52\)"):
        K.lstm_step_backward(codes, c_prev, dm, dc, levels, dgates_low_out=dg_low[:2])
    with pytest.raises(TypeError, match="dgates_low_out must be a floating-point tensor"):
        K.lstm_step_backward(codes, c_prev, dm, dc, levels,
                             dgates_low_out=torch.empty(bs, 4 * H, dtype=torch.int16))
    with pytest.raises(ValueError, match="dgates_low_out must be contiguous"):
        K.lstm_step_backward(codes, c_prev, dm, dc, levels,
                             dgates_low_out=torch.empty(4 * H, bs, dtype=low).t())
