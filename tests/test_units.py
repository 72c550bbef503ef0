"""Discrete units: forward semantics, both straight-through gradient modes, both backends."""

import pytest
import torch

import discrnn
from discrnn import DiscreteSigmoid, DiscreteTanh, decode, discrete_sigmoid, discrete_tanh, encode

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
UNITS = {"tanh": (discrete_tanh, torch.tanh), "sigmoid": (discrete_sigmoid, torch.sigmoid)}
# Gradient tolerances per dtype (atol, rtol): the math is float32 inside, rounded to the dtype.
GRAD_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def inputs(shape, dtype, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("levels", [2, 3, 16, 64, 256])
def test_forward_is_the_snapped_activation(kind, dtype, levels):
    unit, smooth = UNITS[kind]
    x = inputs((7, 33), dtype)
    y = unit(x, levels, backend="torch")
    assert y.dtype == dtype and y.shape == x.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = decode(encode(smooth(x.to(acc)), levels, kind), levels, kind, dtype)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    # every output is one of the L levels, and within half a spacing of the smooth value
    spacing = (2.0 if kind == "tanh" else 1.0) / (levels - 1)
    err = (y.to(torch.float64) - smooth(x.to(torch.float64))).abs().max()
    assert err <= spacing / 2 + 1e-2 * (dtype in (torch.float16, torch.bfloat16)) + 1e-6


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backends_agree(kind, dtype):
    unit, _ = UNITS[kind]
    x = inputs((5000,), dtype, seed=1)
    for levels in (4, 64, 256):
        a = unit(x, levels, backend="torch")
        b = unit(x, levels, backend="triton")
        step = (2.0 if kind == "tanh" else 1.0) / (levels - 1)
        moved = (a.to(torch.float64) - b.to(torch.float64)).abs() > step / 2
        assert moved.float().mean() <= 1e-3  # the last-ulp tanh difference, see test_codec


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_grad_is_derivative_of_smooth_function(kind, dtype, backend):
    unit, smooth = UNITS[kind]
    x = inputs((4, 50), dtype, seed=2).requires_grad_()
    dy = inputs((4, 50), dtype, seed=3)
    (dx,) = torch.autograd.grad(unit(x, 64, grad="exact", backend=backend), x, dy)
    x64 = x.detach().to(torch.float64).requires_grad_()
    (expected,) = torch.autograd.grad(smooth(x64), x64, dy.to(torch.float64))
    atol, rtol = GRAD_TOL[dtype]
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.to(torch.float64), expected, atol=atol, rtol=rtol)


def bin_mean_derivative(levels, kind, samples=200_001):
    """Independent oracle: average f' numerically over the outputs that round to each level."""
    lo_end = -1.0 if kind == "tanh" else 0.0
    v = torch.linspace(lo_end, 1.0, samples, dtype=torch.float64)
    fprime = 1 - v * v if kind == "tanh" else v * (1 - v)
    k = encode(v, levels, kind).long()
    total = torch.zeros(levels, dtype=torch.float64).index_add_(0, k, fprime)
    count = torch.zeros(levels, dtype=torch.float64).index_add_(0, k, torch.ones_like(v))
    return total / count


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
@pytest.mark.parametrize("levels", [2, 3, 8, 64, 256])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_code_grad_is_bin_mean_derivative(kind, levels, backend):
    unit, _ = UNITS[kind]
    # pre-activations hitting every level, including both ends
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64).requires_grad_()
    y = unit(x, levels, grad="code", backend=backend)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    oracle = bin_mean_derivative(levels, kind)
    codes = encode(y.detach(), levels, kind).long()
    torch.testing.assert_close(dx, oracle[codes], atol=2e-4, rtol=1e-3)
    assert (dx > 0).all()  # never the dead 0 of 1 - y^2 at the end levels
    if kind == "tanh" and levels == 2:
        torch.testing.assert_close(dx, torch.full_like(dx, 2 / 3))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_code_grad_backends_agree_in_every_dtype(dtype):
    x = inputs((3, 101), dtype, seed=4).requires_grad_()
    dy = inputs((3, 101), dtype, seed=5)
    grads = []
    for backend in ("torch", "triton"):
        (dx,) = torch.autograd.grad(discrete_tanh(x, 64, grad="code", backend=backend), x, dy)
        assert dx.dtype == dtype
        grads.append(dx)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(grads[0], grads[1], atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("levels, bits", [(2, 1), (64, 6), (100, 7), (256, 8)])
def test_code_mode_keeps_only_packed_codes(backend, levels, bits):
    x = torch.randn(37, 29, requires_grad=True)
    saved = []

    def pack_hook(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        y = discrete_tanh(x * 1.0, levels, grad="code", backend=backend)
    assert len(saved) == 1
    assert saved[0].dtype == torch.uint8
    assert saved[0].numel() == (x.numel() * bits + 7) // 8
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_code_mode_packs_nothing_without_a_graph(monkeypatch, backend):
    """Under torch.no_grad / inference_mode, grad="code" packs no codes (no backward can read
    them), though x requires grad; the values are the same."""
    from discrnn import units

    packed = []
    torch_pack, quantize_pack = units.ref.torch_pack, units.triton_codec.triton_quantize_pack
    monkeypatch.setattr(units.ref, "torch_pack", lambda *a: packed.append(1) or torch_pack(*a))
    monkeypatch.setattr(units.triton_codec, "triton_quantize_pack",
                        lambda *a, **k: packed.append(k["want_packed"]) or quantize_pack(*a, **k))
    x = torch.randn(37, 29, requires_grad=True)
    want = discrete_tanh(x, 64, grad="code", backend=backend)
    assert packed in ([1], [True])
    for mode in (torch.no_grad, torch.inference_mode):
        packed.clear()
        with mode():
            y = discrete_tanh(x, 64, grad="code", backend=backend)
        assert packed in ([], [False]), mode
        assert torch.equal(y, want.detach())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_and_inf(backend):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3], requires_grad=True)
    y = discrete_tanh(x, 16, backend=backend)
    assert torch.isnan(y[0]) and y[1] == 1 and y[2] == -1
    y.backward(torch.ones_like(y))
    assert torch.isnan(x.grad[0]) and x.grad[1] == 0 and x.grad[2] == 0
    x.grad = None
    y = discrete_sigmoid(x, 16, grad="code", backend=backend)
    assert torch.isnan(y[0]) and y[1] == 1 and y[2] == 0
    y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all()  # code mode: the NaN's saved code is code 0


def test_modules_are_deterministic_and_mode_independent():
    x = torch.randn(8, 16)
    for module in (DiscreteTanh(64), DiscreteSigmoid(5, grad="code")):
        train = module.train()(x)
        evaluated = module.eval()(x)
        torch.testing.assert_close(train, evaluated, atol=0, rtol=0)
        torch.testing.assert_close(module(x), train, atol=0, rtol=0)
    assert repr(DiscreteTanh(64)) == "DiscreteTanh(levels=64, grad='exact')"
    assert repr(DiscreteSigmoid(8, grad="code", backend="torch")) == (
        "DiscreteSigmoid(levels=8, grad='code', backend='torch')"
    )


def test_forward_does_not_depend_on_grad_mode():
    x = torch.randn(1000)
    for backend in ("torch", "triton"):
        exact = discrete_tanh(x, 64, grad="exact", backend=backend)
        code = discrete_tanh(x.clone().requires_grad_(), 64, grad="code", backend=backend)
        torch.testing.assert_close(exact, code.detach(), atol=0, rtol=0)


def test_empty_and_noncontiguous():
    for backend in ("torch", "triton"):
        x = torch.empty(0, 3, requires_grad=True)
        y = discrete_tanh(x, 8, grad="code", backend=backend)
        y.sum().backward()
        assert y.shape == (0, 3) and x.grad.shape == (0, 3)
        base = torch.randn(6, 10)
        x = base.t().requires_grad_()
        y = discrete_sigmoid(x, 8, grad="code", backend=backend)
        torch.testing.assert_close(y, discrete_sigmoid(x.contiguous(), 8, backend="torch"))
        y.backward(torch.ones(6, 10).t())  # a non-contiguous upstream gradient too
        assert x.grad.shape == (10, 6)


def test_bad_arguments():
    x = torch.randn(3)
    with pytest.raises(ValueError, match=r"grad must be one of \('exact', 'code'\), got 'ste'"):
        discrete_tanh(x, 8, grad="ste")
    with pytest.raises(ValueError, match=r"grad must be one of"):
        DiscreteTanh(8, grad="none")
    with pytest.raises(ValueError, match="backend must be one of"):
        DiscreteSigmoid(8, backend="cuda")
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got float"):
        discrete_sigmoid(0.5, 8)
    with pytest.raises(TypeError, match="levels must be an integer, got float"):
        discrnn.discrete_sigmoid(x, 8.5)
