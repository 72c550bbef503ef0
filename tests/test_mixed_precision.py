"""Mixed precision: DiscreteLSTM / DiscreteGRU under torch.autocast and with bfloat16 / float16
parameters, against an independent float64 reference (discrnn.testing.reference_stack) run on the
same low-precision-rounded weights and input.

What differs from that reference is only where the layer rounds to the low-precision dtype (the
matmuls' outputs, the layer outputs); the cell math and the codes stay in float32. A rounding can
move a pre-activation across a level boundary, so a unit's output may differ by a level step, and
the difference travels through the recurrence. Tolerances, with s = 2 / (L - 1) the tanh level
spacing: outputs, mean |diff| <= 0.25 s and max |diff| <= 1.5 s (one level flip, not two);
gradients, ||g - g_ref|| <= 0.1 ||g_ref|| for every input and parameter. Measured on these shapes,
4 seeds: means 0.02-0.04 s (LSTM) and 0.03-0.11 s (GRU), max 0.7 s / 1.05 s, gradient errors
2-6 %. Where autocast leaves torch's module in float32 (GRU on CPU), the layer is exact float32. The outputs are compared after rounding the reference's to the
output dtype, which holds a level value only to its own precision."""

import pytest
import torch

import discrnn.testing as dt
from discrnn import DiscreteGRU, DiscreteLSTM

T, B, I, H, L = 12, 4, 8, 16, 64
SPACING = 2 / (L - 1)


def _reference_on_rounded(m, x, low):
    """float64 copy of module ``m`` whose weights are m's rounded to ``low``; x rounded likewise."""
    ref = type(m)(I, H, num_layers=m.num_layers, levels=L, grad=m.grad).double()
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), m.parameters()):
            p_ref.copy_(p.detach().to(low).double())
    x_ref = x.detach().to(low).double().requires_grad_()
    return ref, x_ref


def _check(y, y_ref, grads, grads_ref, names):
    # The output dtype holds a level value only to its precision: compare with the reference's
    # outputs rounded to it.
    diff = (y.detach().double() - y_ref.detach().to(y.dtype).double()).abs()
    assert diff.mean() <= 0.25 * SPACING, f"mean |diff| {float(diff.mean()):.3g}"
    assert diff.max() <= 1.5 * SPACING, f"max |diff| {float(diff.max()):.3g}"
    for name, g, g_ref in zip(names, grads, grads_ref):
        err = float((g.double() - g_ref).norm() / g_ref.norm())
        assert err <= 0.1, f"{name}: relative gradient error {err:.3g}"


def _torch_module_under_autocast(m, x):
    """torch's module's outputs under the current autocast, or None where it cannot run in the
    autocast dtype on this CPU (oneDNN's bf16 LSTM needs AVX-512: an AVX2 CPU raises)."""
    try:
        return m.to_torch()(x)
    except RuntimeError as exc:
        if "primitive descriptor" not in str(exc) or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise
        return None


@pytest.mark.parametrize("widened", [None, True], ids=["cpu_default", "widened"])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_cpu_autocast_bf16_does_what_torch_does_and_tracks_float64(monkeypatch, cls, widened):
    """``widened``: the bf16 products as float32 products of the widened operands, rounded once
    (rnn_function.widened_products: what CPUs without oneDNN's bf16 kernels run; None: what this
    CPU runs)."""
    from discrnn import rnn_function

    monkeypatch.setattr(rnn_function, "WIDEN_LOW_PRECISION_PRODUCTS", widened)
    torch.manual_seed(0)
    m = cls(I, H, num_layers=2, levels=L)
    x = torch.randn(T, B, I, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, hx = m(x)
        torch_out = _torch_module_under_autocast(m, x)
    states = hx if isinstance(hx, tuple) else (hx,)
    # The dtypes of torch.nn.LSTM / GRU in the same context (CPU: LSTM bf16, GRU float32), where
    # torch's module runs at all.
    if torch_out is not None:
        y_torch, hx_torch = torch_out
        states_torch = hx_torch if isinstance(hx_torch, tuple) else (hx_torch,)
        assert y.dtype == y_torch.dtype
        assert [s.dtype for s in states] == [s.dtype for s in states_torch]
    if cls is DiscreteLSTM:
        assert [s.dtype for s in states] == [torch.bfloat16] * 2
        assert y.dtype == torch.bfloat16
    else:  # torch.nn.GRU stays in float32 under CPU autocast: so does the layer, bit for bit
        assert torch.equal(y, m(x)[0])
    w = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * w).sum(), [x, *m.parameters()])
    assert all(g.dtype == torch.float32 for g in grads)  # float32 parameters, float32 gradients
    ref, x_ref = _reference_on_rounded(m, x, y.dtype if y.dtype != torch.float32 else torch.float32)
    y_ref, _ = dt.reference_stack(ref, x_ref)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x_ref, *ref.parameters()])
    _check(y, y_ref, grads, grads_ref, ["input"] + [n for n, _ in m.named_parameters()])


def test_autocast_dtype_found_where_torch_module_cannot_run(monkeypatch):
    """On a CPU where torch.nn.LSTM cannot run in bf16 (autocast casts its inputs, then oneDNN
    raises: AVX2 CPUs), the layer still takes autocast's dtype, read off the ops below autocast;
    a module that autocast leaves alone stays in float32."""
    from discrnn import rnn

    def failing_forward(self, input, hx=None):
        torch.mm(input[0], self.weight_ih_l0.t())  # cast to bf16 by autocast, as torch's lstm
        raise RuntimeError("could not create a primitive descriptor for the LSTM forward "
                           "propagation primitive")

    monkeypatch.setattr(rnn, "_AUTOCAST_DTYPES", {})
    monkeypatch.setattr(torch.nn.LSTM, "forward", failing_forward)
    m = DiscreteLSTM(I, H, levels=L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = m(torch.randn(T, B, I))
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16

    class Untouched(torch.nn.Module):
        def forward(self, x):
            torch.exp(x)  # not on autocast's CPU lists
            raise RuntimeError("fails in float32")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rnn._dtype_reached(Untouched(), torch.zeros(2), torch.bfloat16) == torch.float32


def test_autocast_leaves_float64_alone_and_nothing_outside_it():
    m = DiscreteLSTM(I, H, levels=L).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x)[0].dtype == torch.float64
    assert DiscreteLSTM(I, H, levels=L)(x.float())[0].dtype == torch.float32


@pytest.mark.parametrize("widened", [None, True], ids=["cpu_default", "widened"])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_bf16_parameters_track_float64(monkeypatch, cls, widened):
    from discrnn import rnn_function

    monkeypatch.setattr(rnn_function, "WIDEN_LOW_PRECISION_PRODUCTS", widened)
    torch.manual_seed(1)
    m = cls(I, H, num_layers=2, levels=L).to(torch.bfloat16)
    x = torch.randn(T, B, I, dtype=torch.bfloat16, requires_grad=True)
    y, _ = m(x)
    assert y.dtype == torch.bfloat16
    w = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * w).sum(), [x, *m.parameters()])
    ref, x_ref = _reference_on_rounded(m, x, torch.bfloat16)
    y_ref, _ = dt.reference_stack(ref, x_ref)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x_ref, *ref.parameters()])
    # bf16 gradients: rounded to 8 bits of mantissa on top of the level flips
    _check(y, y_ref, grads, grads_ref, ["input"] + [n for n, _ in m.named_parameters()])


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_cuda_autocast_tracks_float64(cls, amp):
    torch.manual_seed(2)
    m = cls(I, H, num_layers=2, levels=L).cuda()
    x = torch.randn(T, B, I, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=amp):
        y, _ = m(x)
        y_torch, _ = m.to_torch()(x)
    assert y.dtype == y_torch.dtype
    w = torch.randn(y.shape, dtype=torch.float64, device="cuda")
    grads = torch.autograd.grad((y.double() * w).sum(), [x, *m.parameters()])
    ref, x_ref = _reference_on_rounded(m, x, y.dtype)
    y_ref, _ = dt.reference_stack(ref, x_ref)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x_ref, *ref.parameters()])
    _check(y, y_ref, grads, grads_ref, ["input"] + [n for n, _ in m.named_parameters()])
