"""Double backward (``backward(create_graph=True)``, e.g. a gradient penalty) through DiscreteLSTM /
DiscreteGRU: the gradients are differentiable and their own gradients match plain autograd through
the reference cells (discrnn.rnn_reference) on the same weights."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from discrnn import DiscreteGRU, DiscreteLSTM
from discrnn.rnn_reference import reference_gru_layer, reference_lstm_layer

T, B, I, H = 6, 3, 4, 5


def _reference(m, x, grad):
    """Output of a single-layer module through the plain-autograd reference (both directions)."""
    outs = []
    for d, suffix in enumerate(["_l0", "_l0_reverse"][: 2 if m.bidirectional else 1]):
        w = {n: getattr(m, n + suffix) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        h0 = torch.zeros(B, m.proj_size or H, dtype=x.dtype) if isinstance(m, DiscreteLSTM) else None
        if isinstance(m, DiscreteLSTM):
            w_hr = getattr(m, "weight_hr" + suffix) if m.proj_size else None
            y, _, _ = reference_lstm_layer(x, h0, torch.zeros(B, H, dtype=x.dtype), w["weight_ih"],
                                           w["weight_hh"], w["bias_ih"], w["bias_hh"], w_hr,
                                           m.levels, reverse=bool(d), grad=grad,
                                           cell_clip=m.cell_clip)
        else:
            y, _ = reference_gru_layer(x, torch.zeros(B, H, dtype=x.dtype), w["weight_ih"],
                                       w["weight_hh"], w["bias_ih"], w["bias_hh"], m.levels,
                                       reverse=bool(d), grad=grad)
        outs.append(y)
    return torch.cat(outs, -1)


def _penalty_grads(forward, params, x):
    """d/d(params, x) of sum of squared first-order gradients of a loss on the output."""
    y = forward(x)
    loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum()
    first = torch.autograd.grad(loss, [x, *params], create_graph=True)
    penalty = sum((g * g).sum() for g in first)
    return [g.detach() for g in first], torch.autograd.grad(penalty, [x, *params])


@pytest.mark.parametrize("cls, extra", [(DiscreteLSTM, {}), (DiscreteLSTM, {"proj_size": 3}),
                                        (DiscreteLSTM, {"bidirectional": True}),
                                        (DiscreteGRU, {}), (DiscreteGRU, {"bidirectional": True})])
@pytest.mark.parametrize("grad", ["code", "exact"])
def test_double_backward_matches_the_reference(cls, extra, grad):
    torch.manual_seed(0)
    m = cls(I, H, levels=16, grad=grad, **extra).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    params = [p for p in m.parameters()]
    first, second = _penalty_grads(lambda v: m(v)[0], params, x)
    ref_first, ref_second = _penalty_grads(lambda v: _reference(m, v, grad), params, x)
    for a, b in zip(first + list(second), ref_first + list(ref_second)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in second)


def test_double_backward_on_packed_sequences_and_states():
    """Unequal lengths (the batch shrinks) and given initial states: the penalty's gradients reach
    h0 and c0, and first-order gradients equal those of the ordinary backward."""
    torch.manual_seed(1)
    m = DiscreteLSTM(I, H, levels=64).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    x.requires_grad_()

    def loss_of():
        packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]))
        out, (h_n, c_n) = m(packed, (h0, c0))
        return (out.data * out.data).sum() + (h_n * c_n).sum()

    plain = torch.autograd.grad(loss_of(), [x, h0, c0, *m.parameters()])
    first = torch.autograd.grad(loss_of(), [x, h0, c0, *m.parameters()], create_graph=True)
    for a, b in zip(first, plain):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)
    second = torch.autograd.grad(sum((g * g).sum() for g in first), [h0, c0])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in second)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_double_backward_of_a_stacked_module_names_the_way_out(cls):
    m = cls(I, H, num_layers=2, levels=16)
    y = m(torch.randn(T, B, I))[0]
    with pytest.raises(RuntimeError, match="stack single-layer modules"):
        y.sum().backward(create_graph=True)
