"""The fused CPU kernels (kernels/rnn_cpu.cpp) against the aten calls they replace
(rnn_torch.LSTMForwardStep / GRUForwardStep, the chunked backward's calls): bit for bit, step by
step and through whole layers."""

import math
import shutil
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from discrnn import DiscreteGRU, DiscreteLSTM
from discrnn.kernels import rnn_cpu, rnn_torch

if torch.get_default_device().type != "cpu":
    pytest.skip("CPU kernels", allow_module_level=True)


@pytest.fixture(scope="module")
def fused():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the fused CPU step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build or self-check fails here, not skips
        module = rnn_cpu.fused_ops()
    assert module is not None
    return module


def _same_bits(a, b):
    return rnn_cpu._same_bits(a, b)


@pytest.mark.parametrize("levels", [2, 3, 64, 255, 256])
def test_fused_lstm_step_bit_identical_to_aten_step(fused, levels):
    """Codes, c_t and m = o u equal the aten step's bit for bit on odd and even H (the vector
    loop's scalar tail), with activations within ulps of the code boundaries (where one ulp of
    tanh or sigmoid moves a code), NaN / Inf in the pre-activations and the cell state, an active
    clamp, codes written into strided rows (the code store's padded [rows, 4, Hp] layout)."""
    g = torch.Generator().manual_seed(levels)
    for bs, H, clip in [(1, 1, math.inf), (3, 7, 0.5), (16, 33, math.inf), (5, 256, 1.5),
                        (2, 100, math.inf), (4, 65, 0.0), (8, 451, math.inf)]:
        tables = rnn_torch.StepTables(levels, torch.float32, "cpu")
        step = rnn_torch.LSTMForwardStep(tables, bs, H, "cpu", clip)
        gates, c_prev = rnn_cpu.boundary_step_inputs(levels, bs, H, g)
        c_prev[-1, 0] = float("-inf")
        c_prev[0, -1] = float("nan")
        v = step.rows(bs)
        v.gates.copy_(gates)
        k_gates = torch.empty(bs, 4, H, dtype=torch.int32)
        k_u = torch.empty(bs, H, dtype=torch.int32)
        want_c, want_m = step(v, c_prev, k_gates, k_u)

        rows = torch.full((bs, 4, H + 5), 0xA5, dtype=torch.uint8)  # padded rows, strided planes
        got_kg = rows[:, :, :H]
        got_ku = torch.empty(bs, H, dtype=torch.uint8)
        got_c = torch.empty(bs, H)
        got_m = torch.empty(bs, 2 * H)[:, :H]  # m into strided rows (a layer's output y)
        fused.lstm_forward_step(gates, c_prev, got_c, got_m, got_kg, got_ku, levels, clip)
        assert torch.equal(got_kg, k_gates.to(torch.uint8)), (bs, H)
        assert torch.equal(got_ku, k_u.to(torch.uint8)), (bs, H)
        assert _same_bits(got_c, want_c), (bs, H)
        assert _same_bits(got_m, want_m), (bs, H)
        assert (rows[:, :, H:] == 0xA5).all()  # padding untouched


@pytest.mark.parametrize("levels", [2, 3, 64, 255, 256])
def test_backward_chunk_kernels_bit_identical_to_step_kernels(fused, levels):
    """lstm_rebuild_chunk and lstm_backward_chunk (the table terms computed inside the recursion)
    give the per-step kernels' bits: c before its clamp, m, the gate gradients and dc f, in both
    directions' row orders, with an active clamp (clip 0 too), NaN and infinities in the cell
    state, and H and bs H that leave vector tails (the sigmoid's place in aten's one loop)."""
    g = torch.Generator().manual_seed(levels)
    for bs, H, steps, clip in [(1, 1, 1, math.inf), (3, 37, 3, 0.9), (16, 256, 5, math.inf),
                               (4, 33, 4, 0.0), (5, 100, 2, 2.0)]:
        for reverse in (True, False):
            reason = rnn_cpu.check_backward_chunk(fused, levels, bs, H, steps, clip, g, reverse)
            assert reason is None, reason


def test_derivative_tables_are_the_step_tables_and_real(monkeypatch):
    """The fused backward's process-wide derivative tables are StepTables' bit for bit, and stay
    real tensors when first built under FakeTensorMode or inference mode (they are kept)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    monkeypatch.setattr(rnn_cpu, "_DERIVATIVE_TABLES", {})
    for levels, mode in [(2, FakeTensorMode()), (64, torch.inference_mode()), (256, None)]:
        if mode is None:
            got = rnn_cpu.derivative_tables(levels)
        else:
            with mode:
                got = rnn_cpu.derivative_tables(levels)
        tables = rnn_torch.StepTables(levels, torch.float32, "cpu")
        for table, kind in zip(got, ("sigmoid", "tanh")):
            assert not is_fake(table) and not table.is_inference()
            assert _same_bits(table, tables.table("deriv", kind)), (levels, kind)
        assert rnn_cpu.derivative_tables(levels) is got


@pytest.mark.parametrize("levels", [2, 3, 64, 256])
def test_fused_gru_step_bit_identical_to_aten_step(fused, levels):
    """Codes, h_t and the kept pre-activations of the GRU step equal the aten step's, with r, z
    and n within ulps of their code boundaries, on shapes whose bs * H leaves a scalar tail of
    the sigmoid's loop (and some that do not)."""
    g = torch.Generator().manual_seed(levels)
    for bs, H in [(1, 1), (3, 7), (16, 33), (4, 64), (5, 100), (8, 451)]:
        assert rnn_cpu._check_gru_step(fused, bs, H, levels, g) is None, (bs, H)


@pytest.mark.parametrize("levels", [2, 3, 4, 17, 64, 100, 128, 255, 256])
def test_tanh_codes_by_thresholds_equal_aten(fused, levels):
    """The forward step's codes of tanh without tanh (an approximation, and tanh's own code
    thresholds where it is near a boundary) equal the encoding of torch.tanh: on every boundary
    within 3 ulps, 2^16 random values, NaN, infinities, zeros and subnormals, in arrays whose
    length leaves a scalar tail."""
    g = torch.Generator().manual_seed(levels)
    x = rnn_cpu.tanh_code_inputs(levels, 1 << 16, g)
    want = torch.empty(x.shape, dtype=torch.int32)
    rnn_torch.StepTables(levels, torch.float32, "cpu").encode_tanh_(torch.tanh(x), True, want)
    tau = fused.tanh_code_thresholds(levels)
    assert tau.numel() == levels + 1  # the thresholds passed their check here
    assert (tau[1:-1].diff() > 0).all()
    for n in (x.numel(), 15, 33):
        assert torch.equal(fused.tanh_code(x[:n], levels), want[:n])
    old = fused.set_tanh_thresholds(False)
    try:
        assert torch.equal(fused.tanh_code(x, levels), want)
    finally:
        fused.set_tanh_thresholds(old)


@pytest.mark.parametrize("rows, n", [(1, 1), (3, 37), (16, 256), (5, 1000)])
def test_bfloat16_conversions_bit_identical_to_aten(fused, rows, n):
    """The chunk loops' own float32 <-> bfloat16 conversions and float32 + bfloat16 sum give
    aten's bits: rounding ties, subnormals, NaN (aten's NaN is 0xFFFF), infinities, rows whose
    length leaves a vector tail, and strided rows."""
    g = torch.Generator().manual_seed(rows * n)
    x = rnn_cpu.special_floats(rows * 2 * n, g).view(rows, 2 * n)[:, ::2]  # strided rows
    x = x.contiguous() if n == 1 else x[:, :n]
    for src in (x, x.contiguous()):
        got = torch.empty(rows, n, dtype=torch.bfloat16)
        fused.convert_rows(src, got)
        assert _same_bits(got, src.to(torch.bfloat16))
        wide = torch.full((rows, n), 7.0)
        fused.convert_rows(got, wide)
        assert _same_bits(wide, got.float())
        c = torch.randn(rows, n, generator=g)
        assert _same_bits(fused.add_bfloat16(c, got), torch.add(c, got))


@pytest.mark.parametrize("lengths", [None, [11, 7, 11, 2, 4]], ids=["full", "packed"])
@pytest.mark.parametrize("proj_size, autocast, widened", [
    (0, False, None), (4, False, None), (0, True, None), (4, True, None), (4, True, True)])
def test_chunk_calls_bit_identical_to_step_calls(monkeypatch, fused, proj_size, autocast, widened,
                                                 lengths):
    """Each run of a chunk's steps with one batch size in one call (lstm_forward_steps) or two
    (lstm_rebuild_chunk and lstm_backward_chunk, which compute the table terms inside the
    recursion) gives the bits of one call per step, with the reverse direction, a projection, bf16
    products (also widened to float32 and rounded once, as on CPUs without fast bf16 products:
    rnn_function.widened_products), carried states and packed sequences (runs of 1-3 steps; the
    batch shrinks and, in the reverse direction, grows within chunks and across them)."""
    from discrnn import rnn_function

    monkeypatch.setattr(rnn_function, "WIDEN_LOW_PRECISION_PRODUCTS", widened)
    torch.manual_seed(0)
    module = DiscreteLSTM(6, 10, levels=64, bidirectional=True, chunk_size=3, proj_size=proj_size,
                          cell_clip=0.75)
    P = proj_size or 10
    B = 4 if lengths is None else len(lengths)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, B, 6, generator=g).requires_grad_()
    hx = ((0.5 * torch.randn(2, B, P, generator=g)).clamp(-1, 1).requires_grad_(),
          torch.randn(2, B, 10, generator=g).requires_grad_())
    lengths = torch.tensor(lengths) if lengths is not None else None
    one_call = _run(module, x, hx, lengths, autocast)
    monkeypatch.setattr(rnn_cpu, "CHUNK_CALLS", False)
    per_step = _run(module, x, hx, lengths, autocast)
    for a, b in zip(one_call, per_step):
        assert _same_bits(a, b)


def test_fused_lstm_step_checks_its_arguments(fused):
    c = torch.zeros(2, 8)
    codes = torch.empty(2, 4, 8, dtype=torch.uint8)
    k_u = torch.empty(2, 8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="gates must be"):
        fused.lstm_forward_step(torch.zeros(2, 30), c, c.clone(), c.clone(), codes, k_u, 64, 1.0)
    with pytest.raises(RuntimeError, match="gates must be Float"):
        fused.lstm_forward_step(torch.zeros(2, 32).double(), c, c.clone(), c.clone(), codes, k_u,
                                64, 1.0)
    with pytest.raises(RuntimeError, match="levels must be in"):
        fused.lstm_forward_step(torch.zeros(2, 32), c, c.clone(), c.clone(), codes, k_u, 300, 1.0)
    tables = torch.zeros(300 * 300)  # tables that fit the bogus level count: the check is on levels
    with pytest.raises(RuntimeError, match="levels must be in"):
        fused.lstm_backward_finish(codes, c, c.clone(), c.clone(), c.clone(), torch.zeros(3, 2, 8),
                                   c.clone(), tables, tables, c.clone(), c.clone(), c.clone(), 300,
                                   1.0)
    with pytest.raises(RuntimeError, match="levels must be in"):
        fused.tanh_code(torch.zeros(4), 1)
    with pytest.raises(RuntimeError, match="levels must be in"):
        fused.lstm_rebuild_chunk(codes, c, [0], 2, c.clone(), c.clone(), k_u, 300, 1.0)
    with pytest.raises(RuntimeError, match="outside the chunk"):
        fused.lstm_rebuild_chunk(codes, c, [1], 2, c.clone(), c.clone(), k_u, 64, 1.0)
    with pytest.raises(RuntimeError, match="deriv_tanh must be"):
        fused.lstm_backward_chunk(codes, k_u, c, c, [0], 2, c, c, c, torch.empty(2, 32),
                                  torch.zeros(64), torch.zeros(63), torch.zeros(32, 8), None, None,
                                  torch.float32, None, None, 64, 1.0)


def _run(module, x, hx, lengths, autocast=False):
    params = list(module.parameters())
    leaves = [x, *hx]
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, (h_n, c_n) = module(inp, hx)
    y = pad_packed_sequence(out)[0] if lengths is not None else out
    g = torch.Generator().manual_seed(5)
    loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in (y, h_n, c_n))
    grads = torch.autograd.grad(loss, leaves + params)
    return [y.detach(), h_n.detach(), c_n.detach(), *grads]


@pytest.mark.parametrize(
    "kwargs, dtype, autocast, lengths",
    [
        (dict(num_layers=2, bidirectional=True, chunk_size=3, cell_clip=0.5), torch.float32, False,
         [20, 13, 20, 3]),
        (dict(num_layers=2, bidirectional=True, chunk_size=3, cell_clip=0.5), torch.float32, False,
         None),
        (dict(cell_clip=0.5, levels=256), torch.float32, False, None),
        (dict(proj_size=4, grad="exact", chunk_size=5), torch.float32, False, [20, 7, 11, 20]),
        (dict(num_layers=2), torch.bfloat16, False, None),
        (dict(num_layers=2, bidirectional=True, chunk_size=4), torch.float32, True,
         [20, 13, 20, 3]),
    ],
    ids=["stack-packed", "stack", "clip-256", "proj-exact", "bf16", "autocast"],
)
def test_layers_bit_identical_with_and_without_fused_step(monkeypatch, fused, kwargs, dtype,
                                                          autocast, lengths):
    """Outputs, final states and every gradient of DiscreteLSTM are the same bits with the fused
    kernels as with the aten calls, and the fused kernels really ran."""
    kwargs = {"levels": 64, **kwargs}
    torch.manual_seed(0)
    module = DiscreteLSTM(6, 10, **kwargs).to(dtype)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    P = kwargs.get("proj_size") or 10
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, 6, generator=g).to(dtype).requires_grad_()
    hx = ((0.5 * torch.randn(layers, 4, P, generator=g)).clamp(-1, 1).to(dtype).requires_grad_(),
          torch.randn(layers, 4, 10, generator=g).to(dtype).requires_grad_())
    lengths = torch.tensor(lengths) if lengths is not None else None

    # Each run of steps with one batch size runs in one call (forward) or two (backward: the
    # *_chunk kernels), with lengths too (the batch shrinks and grows within chunks).
    expected = {"lstm_forward_steps"}
    if kwargs.get("grad", "code") == "code":  # grad="exact" keeps the aten backward
        expected |= {"lstm_rebuild_chunk", "lstm_backward_chunk"}
    _assert_fused_changes_no_bit(monkeypatch, fused, lambda: _run(module, x, hx, lengths, autocast),
                                 expected)


def _assert_fused_changes_no_bit(monkeypatch, fused, run, expected_kernels):
    """``run()``'s results are the same bits with the fused kernels as with the aten calls, and
    exactly ``expected_kernels`` ran."""
    calls = set()

    class Counting:
        def __getattr__(self, name):
            calls.add(name)
            return getattr(fused, name)

    monkeypatch.setattr(rnn_cpu, "fused_ops", Counting)
    with_fused = run()
    assert calls == expected_kernels
    monkeypatch.setattr(rnn_cpu, "fused_ops", lambda: None)
    without = run()
    assert len(with_fused) == len(without)
    for a, b in zip(with_fused, without):
        assert _same_bits(a, b)


def _run_gru(module, x, h0, lengths, autocast=False):
    params = list(module.parameters())
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, h_n = module(inp, h0)
    y = pad_packed_sequence(out)[0] if lengths is not None else out
    g = torch.Generator().manual_seed(5)
    loss = sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in (y, h_n))
    return [y.detach(), h_n.detach(), *torch.autograd.grad(loss, [x, h0] + params)]


@pytest.mark.parametrize(
    "kwargs, dtype, autocast, lengths",
    [
        (dict(num_layers=2, bidirectional=True, chunk_size=3), torch.float32, False, [20, 13, 20, 3]),
        (dict(grad="exact", levels=256, chunk_size=5), torch.float32, False, [20, 7, 11, 20]),
        (dict(num_layers=2), torch.bfloat16, False, None),
        (dict(num_layers=2), torch.float32, True, None),
    ],
    ids=["stack-packed", "exact-256", "bf16", "autocast"],
)
def test_gru_layers_bit_identical_with_and_without_fused_step(monkeypatch, fused, kwargs, dtype,
                                                              autocast, lengths):
    kwargs = {"levels": 64, **kwargs}
    torch.manual_seed(0)
    module = DiscreteGRU(6, 10, **kwargs).to(dtype)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, 6, generator=g).to(dtype).requires_grad_()
    h0 = (0.5 * torch.randn(layers, 4, 10, generator=g)).clamp(-1, 1).to(dtype).requires_grad_()
    lengths = torch.tensor(lengths) if lengths is not None else None
    expected = {"gru_forward_step"}
    if kwargs.get("grad", "code") == "code":  # grad="exact" keeps the aten backward
        expected |= {"lookup_plane", "gru_backward_prep"}
    _assert_fused_changes_no_bit(monkeypatch, fused,
                                 lambda: _run_gru(module, x, h0, lengths, autocast), expected)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_fused_kernels_split_across_threads_keep_the_bits(monkeypatch, fused, cls):
    """With two threads the kernels split a chunk's rows (and a step's, at H=1024) across them
    (the extension is built with OpenMP): still the aten path's bits. H a multiple of 32, so that
    aten's own splits keep its vector loops whole."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        module = cls(8, 1024, levels=64)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 16, 8, generator=g).requires_grad_()

        def run():
            out, _ = module(x)
            loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum()
            return [out.detach(), *torch.autograd.grad(loss, [x, *module.parameters()])]

        with_fused = run()
        monkeypatch.setattr(rnn_cpu, "fused_ops", lambda: None)
        without = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(with_fused, without):
        assert _same_bits(a, b)


def test_fused_step_off_by_switch(monkeypatch):
    monkeypatch.setattr(rnn_cpu, "ENABLED", False)
    assert rnn_cpu.fused_ops() is None


@pytest.mark.parametrize("failure", ["build", "self-check", "self-check raises"])
def test_refused_fused_step_warns_once_and_layers_still_run(monkeypatch, failure):
    """No compiler, or a torch build whose tanh / sigmoid the kernel does not reproduce: one
    RuntimeWarning saying so, and the layers run the aten step."""
    monkeypatch.setattr(rnn_cpu, "_state", {})
    if failure == "build":
        def no_compiler():
            raise RuntimeError("Error building extension: c++ not found")
        monkeypatch.setattr(rnn_cpu, "_build", no_compiler)
        expected = "could not be built"
    elif failure == "self-check":
        monkeypatch.setattr(rnn_cpu, "_build", lambda: object())
        monkeypatch.setattr(rnn_cpu, "_self_check", lambda module: "c differ from the aten step")
        expected = "c differ"
    else:  # a module without the kernels the check calls: the check raises
        monkeypatch.setattr(rnn_cpu, "_build", lambda: object())
        expected = "failed its self-check .AttributeError"
    module = DiscreteLSTM(3, 5, levels=64)
    x = torch.randn(4, 2, 3)
    with pytest.warns(RuntimeWarning, match=expected):
        module(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, _ = module(x)  # no second warning
    assert y.shape == (4, 2, 5)


# ---------------------------------------------------------------------------------------------
# Small-batch products on prepacked panels (kernels/panel_gemm.cpp, rnn_function.StepProduct)

PANEL_DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=[False, True], ids=["vectors", "amx"])
def amx(request):
    """bfloat16 panel products on AVX512-BF16's vectors (AMX off), and on AMX's tiles (skipped
    where the CPU has no AMX; float32 products have no AMX path and run once)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the panel products")
    module = rnn_cpu._built()
    old = module.set_amx(request.param)
    try:
        if request.param and not module.uses_amx():
            pytest.skip("no AMX-BF16 on this CPU (or the build or Linux does not give it)")
        yield request.param
    finally:
        module.set_amx(old)


def _panels(dtype, amx=False):
    """The module with the panel products; skips only where the CPU lacks them (a failed build
    or check fails here), and the AMX case of float32 (the same products as without)."""
    if amx and dtype != torch.bfloat16:
        pytest.skip("AMX runs the bfloat16 products only")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the panel products")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if not rnn_cpu._built().panel_products_supported(dtype):
            pytest.skip(f"no panel products for {dtype} on this CPU (float32: AVX-512 or AVX2; "
                        "bfloat16: AVX512-BF16)")
        module = rnn_cpu.panel_products(dtype)
    assert module is not None, "the panel products failed their check"
    return module


def _assert_product_close(got, a, w, c, dtype):
    """got against the float64 product: each output within the rounding of K float32 sums of
    |terms| (and one bfloat16 rounding); NaN and infinities where the float64 product has them."""
    exact = a.double() @ w.double().t()
    scale = a.double().abs() @ w.double().abs().t()
    if c is not None:
        exact, scale = exact + c.double(), scale + c.double().abs()
    assert got.dtype == dtype and got.shape == exact.shape
    got = got.double()
    assert torch.equal(got.isnan(), exact.isnan())
    finite = exact.isfinite()
    assert torch.equal(got[~finite & ~exact.isnan()], exact[~finite & ~exact.isnan()])
    bound = 2e-7 * (a.shape[1] + 2) * scale
    if dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * exact.abs()
    err = (got - exact).abs()[finite]
    assert bool((err <= bound[finite] + 1e-37).all()), f"max excess {(err - bound[finite]).max()}"


# (M, K, N): rows below, at and past a tile of 8 and the layers' limit of 64; K odd (a bfloat16
# pair with zero); N below, at and past a panel of 48 columns and a vector of 16, and last panels
# of 1-3 vectors (the tiles that compute 16 or 32 columns: 49, 97, 1024, 256; 65, 80; 130).
PANEL_SHAPES = [(1, 1, 1), (3, 5, 47), (7, 33, 48), (8, 64, 49), (16, 256, 1024), (17, 100, 97),
                (64, 31, 130), (5, 9, 65), (9, 40, 80), (16, 300, 256)]


@pytest.mark.parametrize("dtype", PANEL_DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("M, K, N", PANEL_SHAPES)
def test_panel_linear_matches_float64_product(amx, dtype, M, K, N):
    """a @ W^T and c + a @ W^T against the float64 product, new or into out (out may be c)."""
    ops = _panels(dtype, amx)
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    a = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    c = torch.randn(M, N, generator=g).to(dtype)
    panels = ops.pack_panels(w)
    _assert_product_close(ops.panel_linear(a, panels, N), a, w, None, dtype)
    _assert_product_close(ops.panel_linear(a, panels, N, c), a, w, c, dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    assert ops.panel_linear(a, panels, N, c, out) is out
    _assert_product_close(out, a, w, c, dtype)
    acc = c.clone()
    ops.panel_linear(a, panels, N, acc, acc)
    assert torch.equal(acc, out)


@pytest.mark.parametrize("N, K", [(1, 1), (16, 16), (47, 17), (48, 33), (100, 37), (1024, 256)])
def test_pack_panels_float32_layout(N, K):
    """float32 panels hold W[p 48 + j, k] at [p, k, j], zeros past N, whatever W's strides
    (row-major weights take the 16 x 16 register transposes: tails of rows and of k)."""
    ops = _panels(torch.float32)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N + K))
    P = (N + 47) // 48
    expected = torch.zeros(P * 48, K)
    expected[:N] = w
    expected = expected.view(P, 48, K).transpose(1, 2)
    for given in (w, w.t().contiguous().t(), torch.cat([w, w], 1)[:, :K]):
        # the zeros are written, not left from the allocation (freed NaNs of the same size first)
        nans = torch.full((P, K, 48), float("nan"))
        del nans
        assert torch.equal(ops.pack_panels(given), expected)


@pytest.mark.parametrize("dtype", PANEL_DTYPES, ids=["float32", "bfloat16"])
def test_panel_linear_strided_rows_and_transposed_weights(amx, dtype):
    """Rows of a wider tensor (a, c, out), a weight given transposed (W_hh^T for backward's dh) or
    as a column slice: the same panels and the same bits."""
    ops = _panels(dtype, amx)
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(16, 300, generator=g).to(dtype)
    a = wide[:, 7:7 + 129]
    w_t = torch.randn(129, 70, generator=g).to(dtype)  # W^T stored: W = w_t.t() is [70, 129]
    panels = ops.pack_panels(w_t.t())
    assert torch.equal(panels, ops.pack_panels(w_t.t().contiguous()))
    wide_w = torch.randn(70, 200, generator=g).to(dtype)
    assert torch.equal(ops.pack_panels(wide_w[:, 3:3 + 129]),
                       ops.pack_panels(wide_w[:, 3:3 + 129].contiguous()))
    c_wide = torch.randn(16, 90, generator=g).to(dtype)
    out_wide = torch.zeros(16, 80, dtype=dtype)
    ops.panel_linear(a, panels, 70, c_wide[:, 10:80], out_wide[:, 5:75])
    expected = ops.panel_linear(a.contiguous(), panels, 70, c_wide[:, 10:80].contiguous())
    assert torch.equal(out_wide[:, 5:75], expected)
    assert not out_wide[:, :5].any() and not out_wide[:, 75:].any()  # nothing outside out
    _assert_product_close(expected, a, w_t.t(), c_wide[:, 10:80], dtype)


@pytest.mark.parametrize("dtype", PANEL_DTYPES, ids=["float32", "bfloat16"])
def test_panel_linear_propagates_nan_and_inf(amx, dtype):
    """NaN in a row of a makes that row NaN; an infinity makes its products infinite (or NaN where
    infinities of both signs meet), as the float64 product; the zero padding past N and past an odd
    K adds no NaN."""
    ops = _panels(dtype, amx)
    g = torch.Generator().manual_seed(4)
    a = torch.randn(9, 33, generator=g).to(dtype)
    w = torch.randn(50, 33, generator=g).to(dtype)
    a[2, 5] = float("nan")
    a[4, 32] = float("inf")  # the last, unpaired k of the bfloat16 panels
    w[49, 0] = float("-inf")  # the last column, next to the panel's zero padding
    got = ops.panel_linear(a, ops.pack_panels(w), 50)
    _assert_product_close(got, a, w, None, dtype)
    assert got[2].isnan().all() and got[4].isinf().sum() > 0


@pytest.mark.parametrize("K", [31, 63, 33, 1])
def test_panel_linear_reads_nothing_past_a_row(amx, K):
    """Rows of a wider tensor whose next value is NaN: an odd K's last pair (bfloat16: AMX reads
    32 k per tile product, the vectors two per step) must not read it; neither may the last row
    (NaN past it in the same buffer)."""
    ops = _panels(torch.bfloat16, amx)
    g = torch.Generator().manual_seed(K)
    wide = torch.full((5, K + 1), float("nan"), dtype=torch.bfloat16)
    wide[:, :K] = torch.randn(5, K, generator=g).bfloat16()
    flat = torch.full((5 * K + 8,), float("nan"), dtype=torch.bfloat16)
    flat[: 5 * K] = wide[:, :K].reshape(-1)
    w = torch.randn(20, K, generator=g).bfloat16()
    panels = ops.pack_panels(w)
    for a in (wide[:, :K], flat[: 5 * K].view(5, K)):
        got = ops.panel_linear(a, panels, 20)
        assert not got.isnan().any()
        _assert_product_close(got, a, w, None, torch.bfloat16)


@pytest.mark.parametrize("dtype", PANEL_DTYPES, ids=["float32", "bfloat16"])
def test_panel_linear_same_bits_on_any_thread_count(amx, dtype):
    """Threads split the panels, never a sum."""
    ops = _panels(dtype, amx)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 256, generator=g).to(dtype)
    panels = ops.pack_panels(torch.randn(1024, 256, generator=g).to(dtype))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.panel_linear(a, panels, 1024)
        torch.set_num_threads(2)
        two = ops.panel_linear(a, panels, 1024)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("M", [16, 5, 17])
def test_panel_prefetch_keeps_the_bits(M):
    """A float32 weight over 1 MiB prefetches its next panel during each panel's last row tile:
    the same bits as without, on one and two threads, and close to the float64 product."""
    ops = _panels(torch.float32)
    g = torch.Generator().manual_seed(M)
    w = torch.randn(700, 512, generator=g)  # 15 panels of 512 x 48 floats: 1.4 MiB
    a = torch.randn(M, 512, generator=g)
    c = torch.randn(M, 700, generator=g)
    panels = ops.pack_panels(w)
    threads = torch.get_num_threads()
    old = ops.set_panel_prefetch(True)
    try:
        results = []
        for on in (True, False):
            ops.set_panel_prefetch(on)
            for n in (1, 2):
                torch.set_num_threads(n)
                results.append(ops.panel_linear(a, panels, 700, c))
    finally:
        ops.set_panel_prefetch(old)
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    _assert_product_close(results[0], a, w, c, torch.float32)


# (M, R, N) of weight gradients acc [M, N] += grads [R, M]^T @ rows [R, N]: M below, at and past
# a tile of 8 and a group of 64 outputs; R 0, 1 and below, at and past the blocks of 512 rows; N
# with last panels of 1-3 vectors.
WEIGHT_GRAD_SHAPES = [(1, 1, 1), (7, 0, 5), (8, 511, 48), (13, 512, 49), (64, 513, 100),
                      (70, 1100, 64), (1024, 368, 256), (129, 2049, 17)]


@pytest.mark.parametrize("M, R, N", WEIGHT_GRAD_SHAPES)
def test_panel_weight_grad_matches_float64_product(M, R, N):
    """acc += grads^T @ rows in place, grads read where they lie: against the float64 product; up
    to one block of 512 rows the bits of panel_linear on grads^T (the same sum), past it block sums;
    the same bits on any thread count and for rows given transposed or as a column slice."""
    ops = _panels(torch.float32)
    gen = torch.Generator().manual_seed(M * 7 + R * 3 + N)
    grads = torch.randn(R, M, generator=gen)
    rows = torch.randn(R, N, generator=gen)
    acc0 = torch.randn(M, N, generator=gen)
    acc = acc0.clone()
    assert ops.panel_weight_grad(acc, grads, rows) is acc
    _assert_product_close(acc, grads.t(), rows.t(), acc0, torch.float32)
    if R <= 512:
        same_sum = ops.panel_linear(grads.t().contiguous(), ops.pack_panels(rows.t()), N, acc0)
        assert torch.equal(acc, same_sum)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            again = ops.panel_weight_grad(acc0.clone(), grads, rows)
            assert torch.equal(again, acc)
    finally:
        torch.set_num_threads(threads)
    wide = torch.randn(R, N + 7, generator=gen)
    wide[:, 3:3 + N] = rows
    assert torch.equal(ops.panel_weight_grad(acc0.clone(), grads, wide[:, 3:3 + N]), acc)
    assert torch.equal(ops.panel_weight_grad(acc0.clone(), grads, rows.t().contiguous().t()), acc)


def test_panel_weight_grad_checks_its_arguments():
    ops = _panels(torch.float32)
    acc, grads, rows = torch.zeros(6, 5), torch.randn(9, 6), torch.randn(9, 5)
    with pytest.raises(RuntimeError, match="grads must be a 2-D float32 CPU tensor"):
        ops.panel_weight_grad(acc, grads.double(), rows)
    with pytest.raises(RuntimeError, match=r"acc \[M, N\] \+= grads \[R, M\]\^T @ rows"):
        ops.panel_weight_grad(acc, grads, rows[:8])
    with pytest.raises(RuntimeError, match="unit stride along their last dimension"):
        ops.panel_weight_grad(acc, grads.t().contiguous().t(), rows)
    shared = torch.zeros(9, 11)
    with pytest.raises(RuntimeError, match="acc overlaps grads or rows"):
        ops.panel_weight_grad(shared[:6, 6:], shared[:, :6], rows)


@pytest.mark.parametrize("large", [True, False], ids=["large_on_panels", "large_on_mkl"])
def test_weight_grad_on_panels_and_elsewhere(monkeypatch, large):
    """rnn_function.weight_grad_: acc += grads^T rows on the panels (float32, the same bits as
    panel_weight_grad) where they take products of many rows (AVX-512:
    rnn_cpu.panels_for_large_products), torch.addmm where they do not run (float64, a product
    dtype, switched off, AVX2)."""
    from discrnn import rnn_function

    ops = _panels(torch.float32)
    monkeypatch.setattr(rnn_cpu, "panels_for_large_products", lambda: large)
    gen = torch.Generator().manual_seed(8)
    grads, rows = torch.randn(600, 96, generator=gen), torch.randn(600, 40, generator=gen)
    acc0 = torch.randn(96, 40, generator=gen)
    acc = acc0.clone()
    assert rnn_function.weight_grad_(acc, grads, rows) is acc
    expected = (ops.panel_weight_grad(acc0.clone(), grads, rows) if large
                else acc0.addmm(grads.t(), rows))
    assert torch.equal(acc, expected)
    _assert_product_close(acc, grads.t(), rows.t(), acc0, torch.float32)
    acc64 = acc0.double()
    rnn_function.weight_grad_(acc64, grads.double(), rows.double())
    assert torch.equal(acc64, acc0.double().addmm(grads.double().t(), rows.double()))
    acc = acc0.clone()
    rnn_function.weight_grad_(acc, grads, rows, torch.bfloat16)
    assert torch.equal(acc, acc0 + grads.t().bfloat16() @ rows.bfloat16())
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", False)
    acc = acc0.clone()
    rnn_function.weight_grad_(acc, grads, rows)
    assert torch.equal(acc, acc0.addmm(grads.t(), rows))


def test_first_nonfinite_finds_what_isfinite_finds(fused):
    """The layers' one-call NaN/Inf scan (finite_scan; its load check passes here) against
    torch.isfinite: float32 vectors and tails, other dtypes, strided and empty tensors, integers;
    the first bad tensor's index, -1 for none; CPU tensors only."""
    scan = rnn_cpu.finite_scan()
    assert scan is not None and rnn_cpu._check_finite_scan(scan) is None
    g = torch.Generator().manual_seed(9)
    big = torch.randn(1000, 33, generator=g)
    tensors = [big, torch.empty(0), torch.arange(7), big.t(), big.double(), big.bfloat16(),
               big[:, 1:]]
    assert scan.first_nonfinite(tensors) == -1
    for i in (0, 3, 4, 5, 6):
        for bad in (float("nan"), float("inf"), float("-inf")):
            for where in ((0, 0), (-1, -1), (16, 17)):
                ts = [t.clone() if k == i else t for k, t in enumerate(tensors)]
                ts[i][where] = bad
                want = i if ts[i].isfinite().all() == 0 else -1
                assert scan.first_nonfinite(ts) == want, (i, bad, where)
    huge = torch.full((100,), torch.finfo(torch.float32).max)
    assert scan.first_nonfinite([huge, -huge]) == -1
    with pytest.raises(RuntimeError, match="not the CPU"):
        scan.first_nonfinite([torch.zeros(2, device="meta")])


def test_panel_linear_checks_its_arguments():
    ops = _panels(torch.float32)
    a = torch.randn(4, 10)
    panels = ops.pack_panels(torch.randn(20, 10))
    with pytest.raises(RuntimeError, match="a must be"):
        ops.panel_linear(a.double(), panels, 20)
    with pytest.raises(RuntimeError, match="a has 9 columns"):
        ops.panel_linear(a[:, :9], panels, 20)
    with pytest.raises(RuntimeError, match="are not pack_panels' of 100 columns"):
        ops.panel_linear(a, panels, 100)
    with pytest.raises(RuntimeError, match="c must be"):
        ops.panel_linear(a, panels, 20, torch.zeros(4, 19))
    with pytest.raises(RuntimeError, match="out must be"):
        ops.panel_linear(a, panels, 20, None, torch.zeros(4, 20, dtype=torch.float64))
    shared = torch.zeros(4, 20)
    with pytest.raises(RuntimeError, match="out overlaps a"):
        ops.panel_linear(shared[:, :10], panels, 20, None, shared)
    with pytest.raises(RuntimeError, match="out overlaps a"):
        ops.panel_linear(shared.view(-1)[:40].view(4, 10), panels, 20, None, shared)
    with pytest.raises(RuntimeError, match="weight must be a 2-D CPU tensor"):
        ops.pack_panels(torch.zeros(3))
    with pytest.raises(RuntimeError, match="no panel products for Double"):
        ops.pack_panels(torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", PANEL_DTYPES, ids=["float32", "bfloat16"])
def test_step_product_on_panels(monkeypatch, dtype):
    """StepProduct takes the panels for up to 64 rows and 16 products or more, unless switched
    off; every product of it (a cast to W's dtype, out, c of another dtype, addmm_) against the
    float64 product, the rounded product added in the accumulator's dtype as torch's."""
    from discrnn import rnn_function
    from discrnn.rnn_function import StepProduct

    _panels(dtype)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(50, 20, generator=g).to(dtype)
    assert StepProduct(w, 64, 16).panels is not None
    assert StepProduct(w, 65, 512).panels is None
    assert StepProduct(w, 16, 15).panels is None
    assert StepProduct(w.double(), 16, 512).panels is None
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", False)
    assert StepProduct(w, 16, 512).panels is None
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", True)
    prod = StepProduct(w, 16, 100)
    for rows in (16, 5, 1):
        a = torch.randn(rows, 20, generator=g)
        c = torch.randn(rows, 50, generator=g)
        a_w, c_w = a.to(dtype), c.to(dtype)
        _assert_product_close(prod.mm(a), a_w, w, None, dtype)  # a is cast to W's dtype
        out = torch.empty(rows, 50, dtype=dtype)
        assert prod.mm(a_w, out=out) is out
        _assert_product_close(out, a_w, w, None, dtype)
        _assert_product_close(prod.addmm(c_w, a_w), a_w, w, c_w, dtype)
        out = torch.empty(rows, 50, dtype=dtype)
        assert prod.addmm(c_w, a_w, out=out) is out
        _assert_product_close(out, a_w, w, c_w, dtype)
        # a float32 accumulator: the product rounded to W's dtype, then added in float32
        assert torch.equal(prod.addmm(c, a), c + prod.mm(a).float())
        acc = c.clone()
        prod.addmm_(acc, a)
        assert torch.equal(acc, c + prod.mm(a).float())
        acc_w = c_w.clone()
        prod.addmm_(acc_w, a_w)
        assert torch.equal(acc_w, prod.addmm(c_w, a_w))


def test_chunk_product_on_panels_at_any_rows(monkeypatch):
    """A chunk's product (hundreds of rows) takes the panels for a float32 weight up to 1 MiB,
    which oneDNN does not take; linear() adds the bias as each output is stored, bit for bit
    mm's result plus the bias, and falls back to mm and the add for a bias it cannot read so."""
    from discrnn import rnn_function
    from discrnn.rnn_function import StepProduct

    _panels(torch.float32)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(100, 40, generator=g)
    # AVX2's panels take the per-step products only (rnn_cpu.panels_for_large_products)
    monkeypatch.setattr(rnn_cpu, "panels_for_large_products", lambda: False)
    assert StepProduct(w, 512, 16, chunk=True).panels is None
    assert StepProduct(w, 16, 16).panels is not None
    monkeypatch.setattr(rnn_cpu, "panels_for_large_products", lambda: True)
    prod = StepProduct(w, 512, 16, chunk=True)
    assert prod.panels is not None and prod.packed is None
    assert StepProduct(w, 512, 16).panels is None  # a step's products: up to 64 rows
    assert StepProduct(w, 512, 15, chunk=True).panels is None  # too few to pay the packing
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", False)
    assert StepProduct(w, 512, 16, chunk=True).panels is None
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", True)
    big = torch.randn(1024, 257, generator=g)  # over 1 MiB: oneDNN's where it runs
    if torch.backends.mkldnn.is_available():
        assert StepProduct(big, 512, 16, chunk=True).packed is not None
    for rows in (517, 64, 3):
        a = torch.randn(rows, 40, generator=g)
        b = torch.randn(100, generator=g)
        _assert_product_close(prod.mm(a), a, w, None, torch.float32)
        y = prod.linear(a, b)
        assert torch.equal(y, prod.mm(a) + b)
        _assert_product_close(y, a, w, b.expand(rows, 100), torch.float32)
        out = torch.empty(rows, 100)
        assert prod.linear(a, b, out=out) is out and torch.equal(out, y)
        assert torch.equal(prod.linear(a, None), prod.mm(a))
        strided = torch.randn(100, 2, generator=g)[:, 0]  # not unit stride: mm, then the add
        assert torch.equal(prod.linear(a, strided), prod.mm(a) + strided)
        expected = prod.mm(a)
        expected += b.double()  # in W's dtype, as the layers added their bias before
        assert torch.equal(prod.linear(a, b.double()), expected)


def test_large_products_stay_on_mkl_on_intel_cpus(monkeypatch):
    """The float32 panels take products of hundreds of rows only with 16-float vectors and not on
    Intel's cores (MKL wins there); the vendor comes from /proc/cpuinfo, once."""
    ops = _panels(torch.float32)
    wide = ops.panel_vector_floats() >= 16
    assert rnn_cpu.cpu_vendor() == rnn_cpu.cpu_vendor()  # cached
    for vendor, expected in (("GenuineIntel", False), ("AuthenticAMD", wide), ("", wide)):
        monkeypatch.setitem(rnn_cpu._state, "vendor", vendor)
        assert rnn_cpu.panels_for_large_products() is expected


def test_amx_products_agree_with_vector_products(monkeypatch):
    """On AMX the bfloat16 panel products sum in float32 as AVX512-BF16's do, so the two agree to
    one bfloat16 rounding of the result and the float32 sums' rounding (they may round a sum's
    last bit differently);
    the chunk-wide bfloat16 products take the AMX panels at any number of rows, oneDNN's without
    AMX."""
    from discrnn import rnn_function
    from discrnn.rnn_function import StepProduct

    ops = _panels(torch.bfloat16)
    if not ops.uses_amx():
        pytest.skip("no AMX-BF16 on this CPU")
    g = torch.Generator().manual_seed(8)
    for M, K, N in [(16, 256, 1024), (33, 77, 130), (512, 64, 96)]:
        a = torch.randn(M, K, generator=g).bfloat16()
        w = torch.randn(N, K, generator=g).bfloat16()
        c = torch.randn(M, N, generator=g).bfloat16()
        panels = ops.pack_panels(w)
        on_amx = ops.panel_linear(a, panels, N, c)
        old = ops.set_amx(False)
        try:
            assert not ops.uses_amx()
            on_vectors = ops.panel_linear(a, panels, N, c)
        finally:
            ops.set_amx(old)
        # a bfloat16 ulp of the result, and the float32 sums' rounding (cancellation near 0)
        ulp = 2.0 ** (torch.frexp(on_vectors.float()).exponent.float() - 8)
        scale = a.float().abs() @ w.float().abs().t() + c.float().abs()
        bound = ulp + 2e-7 * (K + 2) * scale
        assert bool(((on_amx.float() - on_vectors.float()).abs() <= bound).all())
        _assert_product_close(on_amx, a, w, c, torch.bfloat16)
    w = torch.randn(100, 40, generator=g).bfloat16()
    chunk = StepProduct(w, 512, 16, chunk=True)
    assert chunk.panels is not None and chunk.packed is None
    a = torch.randn(517, 40, generator=g)
    _assert_product_close(chunk.mm(a), a.bfloat16(), w, None, torch.bfloat16)
    old = ops.set_amx(False)
    try:
        assert StepProduct(w, 512, 16, chunk=True).panels is None
        assert StepProduct(w, 16, 16).panels is not None  # the vectors' per-step products
    finally:
        ops.set_amx(old)
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", False)
    assert StepProduct(w, 512, 16, chunk=True).panels is None


# (R, M, N) of acc [M, N] += grads [R, M]^T @ rows [R, N]: R 1, odd, below / at / past a block
# of 32; M and N below, at and past tiles of 16 and groups of 64 columns.
AMX_GRAD_SHAPES = [(1, 1, 1), (31, 16, 16), (32, 17, 64), (33, 70, 65), (512, 1024, 256),
                   (1100, 48, 130)]


def _amx_ops():
    ops = _panels(torch.bfloat16)
    if not ops.uses_amx():
        pytest.skip("no AMX-BF16 on this CPU")
    return ops


@pytest.mark.parametrize("R, M, N", AMX_GRAD_SHAPES)
def test_amx_weight_grad_matches_float64_product(R, M, N):
    """acc += bf16(grads^T @ rows) in place: against the float64 product rounded once to bfloat16
    (to the float32 sums' rounding), against aten's bfloat16 mm added to acc, and the same bits on
    any thread count (threads split the outputs, never a sum)."""
    ops = _amx_ops()
    g = torch.Generator().manual_seed(R * 31 + M * 7 + N)
    grads = torch.randn(R, M, generator=g).bfloat16()
    rows = torch.randn(R, N, generator=g).bfloat16()
    acc0 = torch.randn(M, N, generator=g)
    acc = acc0.clone()
    assert ops.amx_weight_grad(acc, grads, rows) is acc
    exact = grads.double().t() @ rows.double()
    scale = grads.double().abs().t() @ rows.double().abs()
    product = (acc - acc0).double()  # the rounded product, up to the float32 add's rounding
    bound = 2.0 ** -8 * exact.abs() + 2e-7 * (R + 2) * scale + 2.0 ** -23 * acc.double().abs()
    assert bool(((product - exact).abs() <= bound + 1e-30).all())
    rounded = torch.zeros(M, N)  # from zero: exactly the product rounded to bfloat16
    ops.amx_weight_grad(rounded, grads, rows)
    assert torch.equal(rounded, rounded.bfloat16().float())
    assert bool(((rounded.double() - exact).abs() <= bound + 1e-30).all())
    aten = acc0 + torch.mm(grads.t(), rows).float()
    near = 2.0 ** -7 * exact.abs() + 4e-7 * (R + 2) * scale + 2.0 ** -22 * acc.double().abs()
    assert bool(((acc - aten).double().abs() <= near + 1e-30).all())
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            again = acc0.clone()
            ops.amx_weight_grad(again, grads, rows)
            assert torch.equal(again, acc)
    finally:
        torch.set_num_threads(threads)


def test_amx_weight_grad_strides_nan_and_errors():
    """Rows of wider tensors (acc, grads, rows); a NaN in grads makes NaN only the output row that
    reads it; no rows: acc unchanged; bad arguments: errors naming them."""
    ops = _amx_ops()
    g = torch.Generator().manual_seed(9)
    grads_wide = torch.randn(40, 90, generator=g).bfloat16()
    rows_wide = torch.randn(40, 50, generator=g).bfloat16()
    acc_wide = torch.randn(70, 60, generator=g)
    grads, rows, acc = grads_wide[:, 5:75], rows_wide[:, 3:43], acc_wide[:, 10:50]
    expected = acc.clone()
    ops.amx_weight_grad(expected, grads.contiguous(), rows.contiguous())
    before = acc_wide.clone()
    ops.amx_weight_grad(acc, grads, rows)
    assert torch.equal(acc, expected)
    assert torch.equal(acc_wide[:, :10], before[:, :10])
    assert torch.equal(acc_wide[:, 50:], before[:, 50:])
    nan_grads = grads.contiguous()
    nan_grads[3, 7] = float("nan")  # output row 7 reads it for every column
    out = torch.zeros(70, 40)
    ops.amx_weight_grad(out, nan_grads, rows.contiguous())
    assert out[7].isnan().all() and not out[torch.arange(70) != 7].isnan().any()
    empty = torch.zeros(70, 40)
    ops.amx_weight_grad(empty, grads[:0], rows[:0])
    assert not empty.any()
    with pytest.raises(RuntimeError, match="grads must be a 2-D BFloat16"):
        ops.amx_weight_grad(torch.zeros(70, 40), grads.float(), rows)
    with pytest.raises(RuntimeError, match="acc must be a 2-D Float"):
        ops.amx_weight_grad(torch.zeros(70, 40).double(), grads, rows)
    with pytest.raises(RuntimeError, match="rows must be .* unit stride"):
        ops.amx_weight_grad(torch.zeros(70, 40), grads, rows_wide.t().contiguous().t()[:, :40])
    with pytest.raises(RuntimeError, match=r"acc \[M, N\] \+= grads"):
        ops.amx_weight_grad(torch.zeros(70, 41), grads, rows)
    shared = torch.zeros(40, 70, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="must be a 2-D Float"):
        ops.amx_weight_grad(shared, shared, rows)
    old = ops.set_amx(False)
    try:
        with pytest.raises(RuntimeError, match="no AMX-BF16"):
            ops.amx_weight_grad(torch.zeros(70, 40), grads, rows)
    finally:
        ops.set_amx(old)


def test_bfloat16_weight_grads_take_amx(monkeypatch):
    """rnn_function.weight_grad_ runs a bfloat16 product into a float32 accumulator on AMX where
    present (aten's route otherwise), the same values as aten's to the sums' rounding."""
    from discrnn import rnn_function

    ops = _amx_ops()
    g = torch.Generator().manual_seed(10)
    grads = torch.randn(96, 64, generator=g)
    rows = torch.randn(96, 20, generator=g)
    acc0 = torch.randn(64, 20, generator=g)
    on_amx = rnn_function.weight_grad_(acc0.clone(), grads, rows, torch.bfloat16)
    old = ops.set_amx(False)
    try:
        on_aten = rnn_function.weight_grad_(acc0.clone(), grads, rows, torch.bfloat16)
    finally:
        ops.set_amx(old)
    assert torch.equal(on_aten, acc0 + torch.mm(grads.t().bfloat16(), rows.bfloat16()).float())
    torch.testing.assert_close(on_amx, on_aten, rtol=2 ** -7, atol=1e-5)
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", False)
    assert torch.equal(rnn_function.weight_grad_(acc0.clone(), grads, rows, torch.bfloat16),
                       on_aten)


def test_bfloat16_lstm_on_amx_matches_vector_products():
    """DiscreteLSTM under bf16 autocast with its products on AMX and on AVX512-BF16's vectors:
    the same outputs and gradients up to the products' last-bit roundings."""
    ops = _panels(torch.bfloat16)
    if not ops.uses_amx():
        pytest.skip("no AMX-BF16 on this CPU")
    torch.manual_seed(0)
    module = DiscreteLSTM(8, 48, levels=64, num_layers=2)
    x = torch.randn(40, 4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    results = []
    for on in (True, False):
        old = ops.set_amx(on)
        try:
            module.zero_grad()
            x.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, (h, c) = module(x)
            (out.float().square().sum() + c.float().sum()).backward()
            results.append([out.float(), c.float(), x.grad.clone()]
                           + [p.grad.clone() for p in module.parameters()])
        finally:
            ops.set_amx(old)
    # a last-bit difference in a product can move a unit to the next of 64 levels (1/32 apart),
    # hence the tolerance; the kernels' own agreement is tested above to the bit's rounding
    for got, want in zip(*results):
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_layers_on_panels_match_layers_on_torch_products(monkeypatch, cls):
    """A float32 layer whose recurrent products run on the panels gives the outputs and gradients
    of the layer on torch.addmm to float32 rounding (the sums' order differs), and really ran
    them."""
    from discrnn import rnn_function

    _panels(torch.float32)
    made = []
    real_init = rnn_function.StepProduct.__init__

    def spy(self, weight, rows, products, chunk=False, onednn=True):
        real_init(self, weight, rows, products, chunk, onednn)
        made.append(self.panels is not None)

    monkeypatch.setattr(rnn_function.StepProduct, "__init__", spy)
    torch.manual_seed(0)
    module = cls(6, 40, levels=256, num_layers=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, 6, generator=g).requires_grad_()
    results = {}
    for panels in (True, False):
        monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", panels)
        made.clear()
        out, _ = module(x)
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum()
        results[panels] = [out.detach(), *torch.autograd.grad(loss, [x, *module.parameters()])]
        assert any(made) == panels
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
