"""The guarantee DiscreteLSTM states: |c_t| <= cell_clip for every step, whatever the input,
weights, sequence length, level count and gradient mode; h_t = o * u in [-1, 1]; nothing in forward
or backward becomes Inf or NaN. Tested adversarially: gates saturated by biases of +-20 (forget and
input gates at their top level, so an unclamped cell would grow by up to 1 per step), large
weights (three times torch's initial range), the state carried (detached) across windows for 10^4
steps, float32 and bfloat16. (The state bound holds for any weights; the gradients of a window stay
finite here, but as in any RNN a recurrent weight matrix large enough makes them grow with the
window's length: ten times the initial range overflows float32 within 1000 steps at 2 levels.)

10^4 steps run for a sample of level counts (both ends, powers of two, odd counts), both gradient
modes and both dtypes; a short carried run covers every level count 2..256."""

import math

import pytest
import torch

from discrnn import DiscreteGRU, DiscreteLSTM
from discrnn.rnn import DEFAULT_CELL_CLIP

LEVEL_SAMPLE = (2, 3, 16, 64, 255, 256)


def saturated_lstm(levels, grad, dtype, hidden=8, inputs=4, backend=None, seed=0, **kwargs):
    """Forget and input gates pinned to their top level, g to +-1 (half the units each way), o open;
    recurrent and input weights three times torch's initial range."""
    torch.manual_seed(seed)
    m = DiscreteLSTM(inputs, hidden, levels=levels, grad=grad, chunk_size=64, backend=backend,
                     **kwargs)
    H = hidden
    with torch.no_grad():
        for w in (m.weight_ih_l0, m.weight_hh_l0):
            w.mul_(3.0)
        m.bias_hh_l0.zero_()
        b = m.bias_ih_l0
        b[:H] = 20.0  # i
        b[H : 2 * H] = 20.0  # f
        b[2 * H : 3 * H] = torch.tensor([20.0, -20.0]).repeat(H // 2)  # g, both signs
        b[3 * H :] = 20.0  # o
    return m.to(dtype)


def run_carried(module, steps, window, batch=2, seed=1):
    """Train-style calls: window after window, the state carried detached; forward and backward of
    every window checked finite and bounded. Returns the largest |c| seen."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    dtype = module.weight_ih_l0.dtype
    clip = module.cell_clip
    state, largest = None, 0.0
    for _ in range(steps // window):
        x = (3 * torch.randn(window, batch, module.input_size, generator=g)).to(dtype)
        x.requires_grad_()
        y, (h, c) = module(x, state)
        assert torch.isfinite(y).all() and torch.isfinite(c).all()
        assert float(y.detach().abs().max()) <= 1.0
        largest = max(largest, float(c.detach().abs().max()))
        assert largest <= clip
        loss = y.float().square().sum() + c.float().sum()
        grads = torch.autograd.grad(loss, [x, *module.parameters()])
        for grad in grads:
            assert torch.isfinite(grad).all()
        state = (h.detach(), c.detach())
    return largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", ["code", "exact"])
@pytest.mark.parametrize("levels", LEVEL_SAMPLE)
def test_cell_state_bounded_over_10k_carried_steps(levels, grad, dtype):
    module = saturated_lstm(levels, grad, dtype)
    largest = run_carried(module, steps=10_000, window=1000)
    # the clamp is what holds it: the saturated cell runs into the bound
    assert largest == DEFAULT_CELL_CLIP


@pytest.mark.parametrize("grad", ["code", "exact"])
def test_cell_state_bounded_at_every_level_count(grad):
    """Every L in 2..256, a short carried run each (the clamp is reached within a few steps)."""
    for levels in range(2, 257):
        module = saturated_lstm(levels, grad, torch.float32, hidden=4, inputs=2, seed=levels)
        assert run_carried(module, steps=24, window=12) == DEFAULT_CELL_CLIP, levels


@pytest.mark.parametrize("cell_clip", [0.25, 3.0, 100.0])
def test_cell_clip_is_the_bound(cell_clip):
    module = saturated_lstm(16, "code", torch.float32, cell_clip=cell_clip)
    assert run_carried(module, steps=200, window=100) == cell_clip


def test_cell_state_bounded_triton_path():
    """The Triton step kernels clamp as the torch path does (interpreter on CPU)."""
    module = saturated_lstm(16, "exact", torch.float32, backend="triton")
    assert run_carried(module, steps=64, window=32) == DEFAULT_CELL_CLIP


def test_initial_cell_state_beyond_the_clip_is_clamped_at_the_first_step():
    """c_0 is the caller's and is used as given; c_1 onwards are within the bound."""
    module = saturated_lstm(64, "code", torch.float64)
    c0 = torch.full((1, 2, 8), 50.0, dtype=torch.float64)
    y, (h, c) = module(torch.zeros(3, 2, 4, dtype=torch.float64), (torch.zeros_like(c0), c0))
    assert float(c.detach().abs().max()) <= DEFAULT_CELL_CLIP


def test_unclamped_cell_would_grow():
    """What the clamp prevents: the same saturated cell with a huge bound grows by ~1 per step."""
    module = saturated_lstm(16, "code", torch.float64, cell_clip=1e6)
    _, (_, c) = module(torch.zeros(200, 2, 4, dtype=torch.float64))
    assert float(c.detach().abs().max()) > 150


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                        (math.nan, ValueError), (0.1, ValueError), ("8", TypeError),
                                        (True, TypeError)])
def test_bad_cell_clip(bad, error):
    with pytest.raises(error, match="cell_clip"):
        DiscreteLSTM(3, 4, cell_clip=bad)


def test_gru_has_no_cell_clip():
    with pytest.raises(TypeError, match="cell_clip"):
        DiscreteGRU(3, 4, cell_clip=8.0)
