"""Fused CPU kernels (``rnn_cpu.cpp``, a C++ extension built on first use) for the torch path of
the discrete layers on the CPU.

On the CPU the step's element-wise work costs more in aten calls than in arithmetic: the LSTM
forward step (:class:`rnn_torch.LSTMForwardStep`) makes about twenty of them per step, the GRU's
about fifteen, and backward more per chunk. The kernels here do the same work in one call each and
reproduce those calls bit for bit (how: the top of ``rnn_cpu.cpp``). That equality depends on how
this torch build evaluates tanh, sigmoid and addcmul, so it is checked once per process on load
against the aten calls, on inputs within ulps of the code boundaries (:func:`_self_check`); where it
does not hold, or the extension cannot be built (no C++ compiler), :func:`fused_ops` returns None,
warns once saying why, and the layers keep the aten calls: same results, slower.

``ENABLED`` (or the environment variable ``DISCRNN_FUSED_CPU=0``) turns the kernels off. The build
lands in torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``)
and takes about 45 s the first time on a 2-core CPU (built with OpenMP where the compiler has it,
so that at::parallel_for splits rows across torch's threads).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch

from .codec_torch import torch_pack, torch_unpack

ENABLED = os.environ.get("DISCRNN_FUSED_CPU", "1") != "0"
# The layers run a chunk's steps in one call (lstm_forward_steps, ...) where its steps have one
# batch size; False keeps one call per step (the same results: tests compare the two).
CHUNK_CALLS = True

_SOURCE = Path(__file__).with_name("rnn_cpu.cpp")
# The per-step matrix products on a prepacked weight (rnn_function.StepProduct's panels).
_PANEL_SOURCE = Path(__file__).with_name("panel_gemm.cpp")
# The code store's pack / unpack (codec_torch's stream).
_CODEC_SOURCE = Path(__file__).with_name("codec_cpu.cpp")
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}

_state: dict = {}


def _build():
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
    flags += _CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])
    # One build per torch version and capability: a cached build for another torch would load
    # against the wrong ABI.
    tag = re.sub(r"\W", "_", f"{torch.__version__}_{capability}")
    sources = [str(_SOURCE), str(_PANEL_SOURCE), str(_CODEC_SOURCE)]
    if torch.backends.openmp.is_available():
        # at::parallel_for splits work across torch's threads only in code compiled with OpenMP
        # (without it, it runs serially); the extension then shares torch's libgomp, which the
        # process has already loaded under the same soname.
        try:
            return cpp_extension.load(name=f"discrnn_rnn_cpu_{tag}_omp", sources=sources,
                                      extra_cflags=flags + ["-fopenmp"],
                                      extra_ldflags=["-fopenmp"], verbose=False)
        except Exception:  # a compiler without OpenMP: the serial build below
            pass
    return cpp_extension.load(name=f"discrnn_rnn_cpu_{tag}", sources=sources, extra_cflags=flags,
                              verbose=False)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes, shapes and bits, NaN where the other has NaN (of any sign and payload: which
    NaN an operation on two NaNs returns is the compiler's choice of operand order), -0.0 differs
    from +0.0."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan = a.isnan()
        if not torch.equal(nan, b.isnan()):
            return False
        a, b = (t.masked_fill(nan, 0).contiguous().view(_BITS[t.element_size()]) for t in (a, b))
    return torch.equal(a, b)


def _near(x: torch.Tensor, ulps: int = 3) -> torch.Tensor:
    """float64 points -> float32, each with its neighbours up to ``ulps`` ulps either side."""
    x = x.float()
    out = [x]
    up, down = x, x
    for _ in range(ulps):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        out += [up, down]
    return torch.cat(out)


def boundary_step_inputs(levels: int, bs: int, H: int, generator: torch.Generator):
    """(gates [bs, 4H], c_prev [bs, H]) float32 that put activations within a few ulps of the
    code boundaries, where one ulp of tanh or sigmoid moves a code: random inputs almost never
    get there. The first half of the rows hold the gates' pre-images of their boundaries; in the
    other half f saturates to 1 and i to 0 (so c_t = c_prev exactly) and c_prev holds tanh's
    pre-images of u's boundaries. The rest is random, with a NaN and infinities."""
    span = levels - 1
    k = torch.arange(span, dtype=torch.float64)
    sig_b = _near(torch.logit((k + 0.5) / span))
    tanh_b = _near(torch.atanh((2 * k + 1) / span - 1))

    def fill(values, n):
        perm = torch.randperm(values.numel(), generator=generator)
        return values[perm].repeat(-(-n // values.numel()))[:n]

    gates = 3 * torch.randn(bs, 4, H, generator=generator)
    c_prev = 2 * torch.randn(bs, H, generator=generator)
    top = (bs + 1) // 2
    for q, values in enumerate((sig_b, sig_b, tanh_b, sig_b)):
        gates[:top, q] = fill(values, top * H).view(top, H)
    gates[top:, 0], gates[top:, 1] = -30.0, 30.0  # i -> code 0, f -> code L - 1
    gates[top:, 3] = fill(sig_b, (bs - top) * H).view(-1, H)
    c_prev[top:] = fill(tanh_b, (bs - top) * H).view(-1, H)
    gates[0, 0, 0], gates[-1, 2, -1], gates[-1, 3, 0] = float("nan"), float("inf"), float("-inf")
    return gates.view(bs, 4 * H), c_prev


def _self_check(module) -> str | None:
    """None if the kernel reproduces ``LSTMForwardStep`` bit for bit here, else what differs."""
    from .rnn_torch import LSTMForwardStep, StepTables

    g = torch.Generator().manual_seed(0)
    for bs, H, levels, clip in ((8, 451, 256, math.inf), (6, 37, 64, 0.7), (4, 64, 2, math.inf)):
        gates, c_prev = boundary_step_inputs(levels, bs, H, g)
        step = LSTMForwardStep(StepTables(levels, torch.float32, "cpu"), bs, H, "cpu", clip)
        v = step.rows(bs)
        v.gates.copy_(gates)
        k_gates = torch.empty(bs, 4, H, dtype=torch.int32)
        k_u = torch.empty(bs, H, dtype=torch.int32)
        want_c, want_m = step(v, c_prev, k_gates, k_u)
        got_c, got_m = torch.empty(bs, H), torch.empty(bs, H)
        got_kg = torch.empty(bs, 4, H, dtype=torch.uint8)
        got_ku = torch.empty(bs, H, dtype=torch.uint8)
        module.lstm_forward_step(gates, c_prev, got_c, got_m, got_kg, got_ku, levels, clip)
        pairs = {"c": (got_c, want_c), "m": (got_m, want_m),
                 "gate codes": (got_kg, k_gates.to(torch.uint8)),
                 "u codes": (got_ku, k_u.to(torch.uint8))}
        for name, (got, want) in pairs.items():
            if not _same_bits(got, want):
                return f"{name} differ from the aten step at bs={bs}, H={H}, levels={levels}"
        reason = (_check_backward_steps(module, bs, H, clip, g)
                  or check_backward_chunk(module, levels, bs, H, 3, clip, g)
                  or _check_gru_step(module, bs, H, levels, g))
        if reason is not None:
            return reason
    return _check_tanh_codes(module, g) or _check_bfloat16_rows(module, g)


def tanh_code_inputs(levels: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """float32 [n + boundary points]: tanh's pre-images of every code boundary of ``levels`` with
    their neighbours within 3 ulps, random values over tanh's whole unsaturated range and beyond,
    NaN, infinities, zeros and subnormals."""
    span = levels - 1
    k = torch.arange(span, dtype=torch.float64)
    boundaries = _near(torch.atanh(((2 * k + 1) / span - 1).clamp(-1 + 1e-7, 1 - 1e-7)))
    spread = torch.randn(n, generator=generator) * torch.rand(n, generator=generator) * 6
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40,
                            20.0, -20.0, 3e38, -3e38])
    return torch.cat([boundaries, spread, special])


def _check_tanh_codes(module, g) -> str | None:
    """The forward step's codes of tanh (g and u; by thresholds, see rnn_cpu.cpp) against
    StepTables' encoding of torch.tanh, on every boundary and random values."""
    from .rnn_torch import StepTables

    for levels in (2, 3, 64, 255, 256):
        x = tanh_code_inputs(levels, 1 << 14, g)
        want = torch.empty(x.shape, dtype=torch.int32)
        StepTables(levels, torch.float32, "cpu").encode_tanh_(torch.tanh(x), True, want)
        if not torch.equal(module.tanh_code(x, levels), want):
            return f"the codes of tanh differ from the aten step's at levels={levels}"
    return None


def special_floats(n: int, generator: torch.Generator) -> torch.Tensor:
    """n float32 values of random bit patterns (NaNs, infinities and subnormals among them), with
    the values whose bfloat16 rounding ties or nearly ties, [n]."""
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=generator, dtype=torch.int64)
    bits[: n // 4] = (bits[: n // 4] & ~0xFFFF) | 0x8000  # ties
    bits[n // 4: n // 2] = (bits[n // 4: n // 2] & ~0xFFFF) | 0x7FFF  # just below a tie
    x = bits.to(torch.int32).view(torch.float32)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40])[:n]
    x[: specials.numel()] = specials
    return x


def _check_bfloat16_rows(module, g) -> str | None:
    """The chunk loops' conversions (bfloat16 products under autocast) against aten's: rounding
    to bfloat16 (ties, subnormals, NaN, infinities, vector tails), widening, the mixed add."""
    for rows, n in ((3, 37), (16, 256), (2, 1)):
        x = special_floats(rows * n, g).view(rows, n)
        got = torch.empty(rows, n, dtype=torch.bfloat16)
        module.convert_rows(x, got)
        if not _same_bits(got, x.to(torch.bfloat16)):
            return f"the float32 -> bfloat16 conversion differs from aten's at [{rows}, {n}]"
        wide = torch.empty(rows, n)
        module.convert_rows(got, wide)
        if not _same_bits(wide, got.float()):
            return f"the bfloat16 -> float32 conversion differs from aten's at [{rows}, {n}]"
        c = torch.randn(rows, n, generator=g)
        if not _same_bits(module.add_bfloat16(c, got), torch.add(c, got)):
            return f"float32 + bfloat16 differs from torch.add at [{rows}, {n}]"
    return None


def _check_gru_step(module, bs, H, levels, g) -> str | None:
    """The GRU forward step against ``GRUForwardStep``, with the pre-activations of r, z and n
    within ulps of their code boundaries (gh = 0 there, so they are gx exactly)."""
    from .rnn_torch import GRUForwardStep, StepTables

    span = levels - 1
    k = torch.arange(span, dtype=torch.float64)
    sig_b = _near(torch.logit((k + 0.5) / span))
    tanh_b = _near(torch.atanh((2 * k + 1) / span - 1))

    def fill(values, shape):
        n = math.prod(shape)
        perm = torch.randperm(values.numel(), generator=g)
        return values[perm].repeat(-(-n // values.numel()))[:n].view(shape)

    gx = 2 * torch.randn(bs, 3, H, generator=g)
    gh = torch.randn(bs, 3 * H, generator=g)
    top = (bs + 1) // 2
    gx[:top, :2] = fill(sig_b, (top, 2, H))
    gx[:top, 2] = fill(tanh_b, (top, H))
    gh[:top] = 0.0
    h_prev = 2 * torch.rand(bs, H, generator=g) - 1
    # The other rows: z and n at the centre of a random level each (codes known), and h_prev such
    # that h = (1 - z) n + z h_prev lands on a code boundary of h, where its roundings matter.
    rest = (bs - top, H)
    if levels > 2 and rest[0]:
        kz = torch.randint(1, span, rest, generator=g, dtype=torch.float64)
        kn = torch.randint(0, levels, rest, generator=g, dtype=torch.float64)
        gx[top:, 1] = torch.logit(kz / span).float()
        gx[top:, 2] = torch.atanh(((2 * kn - span) / span).clamp(-1 + 1e-6, 1 - 1e-6)).float()
        gh[top:, H:] = 0.0
        z_v = (kz.float() / span).double()
        n_v = ((2 * kn - span).float() / span).double()
        b = (2 * torch.randint(0, span, rest, generator=g, dtype=torch.float64) + 1) / span - 1
        h_prev[top:] = ((b - (1 - z_v) * n_v) / z_v).float()
    gx[-1, 0, 0] = float("nan")
    h_prev[-1, -1] = float("inf")
    step = GRUForwardStep(StepTables(levels, torch.float32, "cpu"), bs, H, "cpu")
    v = step.rows(bs)
    v.gh.copy_(gh)
    gx_rz, gx_n = gx[:, :2], gx[:, 2]
    want_k = torch.empty(4, bs, H, dtype=torch.int32)
    want_pre = torch.empty(bs, 3 * H)
    want_h = step(v, gx_rz, gx_n, h_prev, want_k[:2], want_k[2], want_k[3], pre_out=want_pre)
    got_k = torch.empty(4, bs, H, dtype=torch.uint8)
    got_h, got_pre = torch.empty(bs, H), torch.empty(bs, 3 * H)
    module.gru_forward_step(gx_rz, gx_n, gh, h_prev, got_k[:2], got_k[2], got_k[3], got_h,
                            got_pre, levels)
    if not (torch.equal(got_k, want_k.to(torch.uint8)) and _same_bits(got_h, want_h)
            and _same_bits(got_pre, want_pre)):
        return f"the GRU step differs from the aten step at bs={bs}, H={H}, levels={levels}"
    return None


def _check_backward_steps(module, bs, H, clip, g) -> str | None:
    """The per-step backward kernels against the aten calls of ``_lstm_backward_chunked``: the
    rebuild (mul, add, clamp) and the recursion (addcmul, whose rounding, one or two, is the
    build's choice, and three products); tanh' of c (rnn_torch.tanh_derivative) through the
    chunk's finishing kernel."""
    from .rnn_torch import StepTables, tanh_derivative

    f, ig, c_prev = torch.rand(bs, H, generator=g), torch.randn(bs, H, generator=g), torch.randn(bs, H, generator=g)
    raw = torch.mul(f, c_prev).add_(ig)
    c = torch.clamp(raw, -clip, clip)
    got = [torch.empty(bs, H) for _ in range(3)]
    module.lstm_rebuild_step(f, ig, c_prev, *got, clip)
    if not all(_same_bits(a, b) for a, b in zip(got, (raw, c, c))):
        return f"the cell rebuild differs from the aten calls at bs={bs}, H={H}"
    # o tanh'(c) from the finishing kernel, o = 1 (its other outputs: the layer tests), on c
    # spread over tanh's whole range, saturation and beyond
    levels = 64
    c_all = torch.cat([8 * torch.randn(bs, H, generator=g), c]).contiguous()
    c_all[0, 0], c_all[-1, -1] = float("inf"), float("nan")
    R = c_all.shape[0]
    tables = StepTables(levels, torch.float32, "cpu")
    codes = torch.randint(0, levels, (R, 4, H), generator=g, dtype=torch.uint8)
    o_du = torch.empty(R, H)
    module.lstm_backward_finish(codes, torch.zeros(R, H), c_all, torch.ones(R, H), torch.ones(R, H),
                                torch.ones(3, R, H), torch.ones(R, H), tables.pair_table("b_da"),
                                tables.pair_table("ab"), o_du, torch.empty(R, H), torch.empty(R, H),
                                levels, math.inf)
    if not _same_bits(o_du, tanh_derivative(c_all)):
        return f"tanh' differs from rnn_torch.tanh_derivative at [{R}, {H}]"
    dm, dc, odu, udo = (torch.randn(bs, H, generator=g) for _ in range(4))
    p = torch.randn(3, bs, H, generator=g)
    d = torch.addcmul(dc, dm, odu)
    want_dg = torch.cat([d * p[0], d * p[1], d * p[2], dm * udo], dim=1)
    got_dg, got_dcf = torch.empty(bs, 4 * H), torch.empty(bs, H)
    module.lstm_backward_step(dm, dc, odu, udo, p, f, got_dg, got_dcf)
    if not (_same_bits(got_dg, want_dg) and _same_bits(got_dcf, d * f)):
        return f"the backward recursion differs from the aten calls at bs={bs}, H={H}"
    return None


_DERIVATIVE_TABLES: dict = {}


def derivative_tables(levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The straight-through derivative tables [L] (sigmoid, tanh) of float32 layers on the CPU,
    as ``StepTables.table("deriv", ...)`` builds them, built once per level count: the fused
    backward's only tables (it decodes values by division), which per layer call cost about as
    much as a short chunk's element-wise work. Real tensors whatever mode the caller is in (the
    fused kernels only ever read real CPU tensors)."""
    tables = _DERIVATIVE_TABLES.get(levels)
    if tables is None:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from .rnn_torch import StepTables

        with unset_fake_temporarily(), torch.inference_mode(False), torch.no_grad():
            step_tables = StepTables(levels, torch.float32, "cpu")
            tables = tuple(step_tables.table("deriv", kind) for kind in ("sigmoid", "tanh"))
        _DERIVATIVE_TABLES[levels] = tables
    return tables


def check_backward_chunk(module, levels, bs, H, steps, clip, g, reverse=True) -> str | None:
    """``lstm_rebuild_chunk`` and ``lstm_backward_chunk`` against the per-step kernels they replace
    (lstm_backward_gather, lstm_rebuild_step, lstm_backward_finish, lstm_backward_step: checked
    against the aten calls above) on one chunk of ``steps`` steps of [bs, H] rows: c_t before its
    clamp, m = o u, the gate gradients and dc f. Random codes, c_first with NaN and infinities,
    the reverse direction's row offsets by default; the recurrent product through aten's addmm."""
    from .rnn_torch import StepTables

    R = bs * steps
    tables = StepTables(levels, torch.float32, "cpu")
    val, der = tables.table("value", "sigmoid"), tables.table("deriv", "sigmoid")
    b_da, a_db, ab = (tables.pair_table(name) for name in ("b_da", "a_db", "ab"))
    codes = torch.randint(0, levels, (R, 4, H), generator=g, dtype=torch.uint8)
    c_first = 3 * torch.randn(bs, H, generator=g)
    c_first[0, 0], c_first[-1, -1], c_first[0, -1] = float("nan"), float("inf"), -float("inf")
    offsets = [bs * (steps - 1 - j if reverse else j) for j in range(steps)]
    w_t = 0.3 * torch.randn(4 * H, H, generator=g)  # W_hh: dh = dgates W_hh
    dys = torch.randn(R, H, generator=g)
    dm_last, dc_last = torch.randn(bs, H, generator=g), torch.randn(bs, H, generator=g)

    f_v, d_f, ig, o_v, c_raw, c_all, o_du, u_do, m = (torch.empty(R, H) for _ in range(9))
    p = torch.empty(3, R, H)
    module.lstm_backward_gather(codes, val, der, b_da, a_db, ab, f_v, d_f, p[0], p[2], ig, o_v,
                                levels)
    c_prev = c_first
    for o in offsets:
        p[1, o:o + bs] = c_prev
        c_t = torch.empty(bs, H)
        module.lstm_rebuild_step(f_v[o:o + bs], ig[o:o + bs], p[1, o:o + bs], c_raw[o:o + bs], c_t,
                                 c_all[o:o + bs], clip)
        c_prev = c_t
    want_raw = c_raw.clone()
    module.lstm_backward_finish(codes, c_raw, c_all, o_v, d_f, p, f_v, b_da, ab, o_du, u_do, m,
                                levels, clip)
    want_dg = torch.empty(R, 4 * H)
    dm, dc = dm_last, dc_last
    for j in range(steps - 1, -1, -1):
        o = offsets[j]
        if j < steps - 1:
            n = offsets[j + 1]
            dm = torch.addmm(dys[o:o + bs], want_dg[n:n + bs], w_t)
        dcf = torch.empty(bs, H)
        module.lstm_backward_step(dm, dc, o_du[o:o + bs], u_do[o:o + bs], p[:, o:o + bs],
                                  f_v[o:o + bs], want_dg[o:o + bs], dcf)
        dc = dcf

    got_raw, got_m = torch.empty(R, H), torch.empty(R, H)
    k_u = torch.empty(R, H, dtype=torch.uint8)
    module.lstm_rebuild_chunk(codes, c_first, offsets, bs, got_raw, got_m, k_u, levels, clip)
    got_dg = torch.empty(R, 4 * H)
    got_dcf = module.lstm_backward_chunk(
        codes, k_u, got_raw, c_first, offsets, bs, dys, dm_last, dc_last, got_dg,
        *derivative_tables(levels), w_t, None, None, w_t.dtype, None, None, levels, clip)
    pairs = {"c before the clamp": (got_raw, want_raw), "m": (got_m, m),
             "the gate gradients": (got_dg, want_dg), "dc f": (got_dcf, dc)}
    for name, (got, want) in pairs.items():
        if not _same_bits(got, want):
            return (f"{name} of the chunk kernels differ from the step kernels' at levels={levels}, "
                    f"bs={bs}, H={H}, steps={steps}, clip={clip}")
    return None


def _check_panel_products(module, dtype: torch.dtype) -> str | None:
    """None if ``panel_linear`` agrees with a float64 product here (to the rounding of its float32
    sums, and of one bfloat16 rounding), else what differs. Shapes with row and column tails; in
    float32 also ``panel_weight_grad`` (a = grads^T, W = rows^T, c = acc), past one block of rows
    and one group of outputs."""
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 256, 100, False), (7, 33, 49, False), (1, 5, 1, False)]
    if dtype == torch.float32:
        shapes.append((70, 1030, 50, True))
    for M, K, N, weight_grad in shapes:
        a = torch.randn(M, K, generator=g).to(dtype)
        w = torch.randn(N, K, generator=g).to(dtype)
        c = torch.randn(M, N, generator=g).to(dtype)
        if weight_grad:  # acc [M, N] += grads [K, M]^T @ rows [K, N]
            got = module.panel_weight_grad(c.clone(), a.t().contiguous(), w.t()).double()
        else:
            got = module.panel_linear(a, module.pack_panels(w), N, c).double()
        exact = torch.addmm(c.double(), a.double(), w.double().t())
        bound = 1e-6 * K * torch.addmm(c.double().abs(), a.double().abs(), w.double().abs().t())
        if dtype == torch.bfloat16:
            bound = bound + exact.abs() * 2.0 ** -8
        if not bool(((got - exact).abs() <= bound + 1e-30).all()):
            return (f"panel_linear differs from the float64 product at M={M}, K={K}, N={N}"
                    + (" (panel_weight_grad)" if weight_grad else ""))
    return None


def panel_products(dtype: torch.dtype):
    """The extension module where its small-batch products on prepacked panels (``panel_gemm.cpp``)
    run for ``dtype`` on this CPU (float32: AVX-512 or AVX2; bfloat16: AVX512-BF16) and pass their
    check, else
    None (then the layers keep torch.addmm / oneDNN). Independent of :func:`fused_ops`'s check of
    the element-wise kernels: these products do not reproduce aten's, they replace them."""
    module = _built() if ENABLED else None
    if module is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    key = ("panels", dtype)
    if key not in _state:
        try:
            supported = module.panel_products_supported(dtype)
            reason = _check_panel_products(module, dtype) if supported else None
        except Exception as exc:  # a kernel that raises on this build: keep torch's products
            supported = True
            reason = (f"panel_linear failed its check ({type(exc).__name__}: "
                      f"{str(exc).strip()[:300]})")
        if reason is not None:
            warnings.warn(f"discrnn: {reason}; the layers use torch's products instead",
                          RuntimeWarning, stacklevel=2)
        _state[key] = module if supported and reason is None else None
    return _state[key]


def amx_products() -> bool:
    """Whether the bfloat16 panel products run on AMX's tiles here (Intel Sapphire Rapids and
    later; ``panel_gemm.cpp``): then they beat oneDNN's prepacked products at any number of rows
    (measured on a 2-core Xeon with AMX, one thread, us per product, AMX panels / oneDNN
    prepacked / AVX512-BF16 panels: 16 x 256 @ 256 x 1024 9.6 / 35.7 / 83.1, 512 x 64 @ 64 x 1024
    180 / 310 / 838), so the layers' bfloat16 chunk-wide products take them too."""
    module = panel_products(torch.bfloat16)
    return module is not None and bool(module.uses_amx())


def cpu_vendor() -> str:
    """The CPU's vendor string as Linux reports it ("GenuineIntel", "AuthenticAMD"), or "" where
    /proc/cpuinfo does not say."""
    if "vendor" not in _state:
        vendor = ""
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
                for line in info:
                    if line.startswith("vendor_id"):
                        vendor = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        _state["vendor"] = vendor
    return _state["vendor"]


def panels_for_large_products() -> bool:
    """Whether the float32 panels also take products of hundreds of rows (the chunk-wide products
    and the weight gradients): with AVX-512's 16-float vectors on AMD's cores they beat MKL there;
    with AVX2's 8 (4 x 24 tiles) only the few-row per-step products do, and on Intel's cores MKL's
    own kernels win at hundreds of rows. Measured on a 2-core AMD EPYC Zen 3 (AVX2), one thread,
    against torch.addmm: 16 x 256 @ 256 x 1024 114-155 against 148-210 us, but 512 x 64 @ 64 x 1024
    1372 against 1227 us and the LSTM's weight gradient at H=256 over 512 rows 6730 against 4743
    us. On a 2-core Intel Xeon (AVX-512, Sapphire Rapids class), 2 layers, H=256, B=16, input 64,
    one process alternating: the forward without a graph at T=46 took 1.08x with these products on
    the panels, forward + backward 1.07x (1.00x at T=512)."""
    module = panel_products(torch.float32)
    return (module is not None and module.panel_vector_floats() >= 16
            and cpu_vendor() != "GenuineIntel")


def _check_finite_scan(module) -> str | None:
    """None if ``first_nonfinite`` finds what torch.isfinite finds here: NaN and infinities at the
    start, in the middle and in a vector tail of float32, in bfloat16 / float64 / strided tensors,
    none in finite ones (the largest float32 among them) or in integers."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 17, 1000):
        for where in sorted({0, n // 2, n - 1}):
            for bad in (float("nan"), float("inf"), float("-inf")):
                for dtype in (torch.float32, torch.bfloat16, torch.float64):
                    t = torch.randn(n, generator=g).to(dtype)
                    t[where] = bad
                    ok = torch.full((3,), torch.finfo(torch.float32).max)
                    every_other = t[::2]  # holds the bad value where its place is even
                    cases = (([ok, t], 1), ([every_other], 0 if where % 2 == 0 else -1),
                             ([ok, torch.arange(5), t.clone().fill_(1)], -1))
                    for tensors, want in cases:
                        got = module.first_nonfinite(tensors)
                        if got != want:
                            return (f"first_nonfinite gave {got} where {want} is right "
                                    f"(n={n}, {bad} at {where}, {dtype})")
    return None


def finite_scan():
    """The extension module where its one-call NaN/Inf scan (``first_nonfinite``, the layers' value
    check on CPU) is built and passes its check, else None (then the layers check with aten
    calls). Independent of :func:`fused_ops`'s check of the element-wise kernels."""
    return _checked_part("finite_scan", _check_finite_scan, "CPU NaN/Inf scan",
                         "the layers check with aten calls instead")


def _checked_part(key: str, check, what: str, instead: str):
    """The extension module where the part ``check`` tests passes it here (checked once per
    process, cached under ``key``), else None with one warning naming ``what`` failed and what
    runs ``instead``."""
    module = _built() if ENABLED else None
    if module is None:
        return None
    if key not in _state:
        try:
            reason = check(module)
        except Exception as exc:  # a build without the part, or one that raises
            reason = f"failed its check ({type(exc).__name__}: {str(exc).strip()[:300]})"
        if reason is not None:
            warnings.warn(f"discrnn: the {what} {reason}; {instead}", RuntimeWarning,
                          stacklevel=3)
        _state[key] = module if reason is None else None
    return _state[key]


def _check_codec(module) -> str | None:
    """None if ``pack_codes`` / ``unpack_codes`` give codec_torch's streams and codes here."""
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for n in (0, 1, 7, 8, 9, 17, 1000):
            codes = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
            stream = torch_pack(codes, bits)
            if not torch.equal(module.pack_codes(codes, bits), stream):
                return f"pack_codes differs from torch_pack at bits={bits}, n={n}"
            if not torch.equal(module.unpack_codes(stream, bits, n), torch_unpack(stream, bits, n)):
                return f"unpack_codes differs from torch_unpack at bits={bits}, n={n}"
    return None


def codec_ops():
    """The extension module where its ``pack_codes`` / ``unpack_codes`` (``codec_cpu.cpp``) give
    codec_torch's bits here, else None (with one warning where they differ)."""
    return _checked_part("codec", _check_codec, "CPU codec", "the layers use codec_torch's")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`codec_torch.torch_pack` (the same bytes), in one C++ pass over CPU codes."""
    module = codec_ops() if codes.device.type == "cpu" else None
    if module is None:
        return torch_pack(codes, bits)
    flat = codes.reshape(-1)
    return module.pack_codes(flat.to(torch.uint8).contiguous(), bits)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """:func:`codec_torch.torch_unpack` (the same codes), in one C++ pass over a CPU stream."""
    module = codec_ops() if packed.device.type == "cpu" else None
    if module is None or packed.dim() != 1 or packed.dtype != torch.uint8:
        return torch_unpack(packed, bits, numel)
    return module.unpack_codes(packed.contiguous(), bits, numel)


def _built():
    """The extension module, built or loaded once per process; None where it cannot be built
    (then with one warning saying why) or ``ENABLED`` is off."""
    if not ENABLED:
        return None
    if "built" not in _state:
        module = None
        try:
            module = _build()
        except Exception as exc:  # no compiler, a failed build: the aten step still works
            warnings.warn(f"discrnn: the fused CPU kernels could not be built "
                          f"({type(exc).__name__}: {str(exc).strip()[:300]}); the layers use the "
                          "aten calls instead (same results, slower)", RuntimeWarning,
                          stacklevel=3)
        _state["built"] = module
    return _state["built"]


def fused_ops():
    """The loaded extension module, or None where the fused kernel is off, cannot be built, or does
    not reproduce the aten step on this machine (then with one warning saying why)."""
    if not ENABLED:
        return None
    if "module" not in _state:
        module = _built()
        if module is not None:
            try:
                reason = _self_check(module)
            except Exception as exc:  # a kernel that raises on this build: keep the aten calls
                reason = f"failed its self-check ({type(exc).__name__}: {str(exc).strip()[:300]})"
            if reason is not None:
                module = None
                warnings.warn(f"discrnn: the fused CPU step kernel {reason}; the layers use the "
                              "aten step instead (same results, slower)", RuntimeWarning,
                              stacklevel=2)
        _state["module"] = module
    return _state["module"]
