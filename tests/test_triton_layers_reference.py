"""The Triton layers (kernels/rnn.py; under the interpreter without a GPU) against the plain-autograd
reference directly, not only against the torch path: float64, 2 bidirectional layers, several
checkpoint chunks, both gradient modes; output, final states and every gradient."""

import pytest
import torch

import discrnn.testing as dt
from discrnn import DiscreteGRU, DiscreteLSTM

T, B, I, H = 7, 3, 5, 6


@pytest.mark.parametrize("grad", ["code", "exact"])
@pytest.mark.parametrize("cls, kwargs", [(DiscreteLSTM, {}), (DiscreteLSTM, {"proj_size": 4}),
                                         (DiscreteLSTM, {"cell_clip": 0.5}), (DiscreteGRU, {})])
def test_triton_layers_match_the_reference(cls, kwargs, grad):
    torch.manual_seed(0)
    module = cls(I, H, num_layers=2, bidirectional=True, levels=64, chunk_size=3, grad=grad,
                 backend="triton", **kwargs).double()
    # Drawn on the CPU (generators are per device), then moved where the module runs: the default
    # device, CUDA when tests/conftest.py finds one.
    device = torch.get_default_device()
    g = torch.Generator().manual_seed(1)

    def draw(fn, *shape, gen=g):
        return fn(*shape, generator=gen, dtype=torch.float64, device="cpu").to(device)

    P = kwargs.get("proj_size") or H
    x = draw(torch.randn, T, B, I).requires_grad_()
    h0 = (0.9 * draw(torch.rand, 4, B, P) - 0.45).requires_grad_()
    leaves, hx = [x, h0], h0
    if cls is DiscreteLSTM:
        c0 = draw(torch.randn, 4, B, H).requires_grad_()
        leaves, hx = [x, h0, c0], (h0, c0)
    params = list(module.parameters())

    def outputs_and_grads(forward):
        y, hx_out = forward()
        outs = [y, *(hx_out if isinstance(hx_out, tuple) else (hx_out,))]
        gl = torch.Generator().manual_seed(2)
        loss = sum((o * draw(torch.randn, *o.shape, gen=gl).to(o.dtype)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves + params))

    got = outputs_and_grads(lambda: module(x, hx))
    want = outputs_and_grads(lambda: dt.reference_stack(module, x, hx))
    names = ["output", "h_n", "c_n"][: len(got) - len(leaves) - len(params)]
    names += ["d_input", "d_h0", "d_c0"][: len(leaves)] + [n for n, _ in module.named_parameters()]
    dt.assert_close_report(names, got, want, rtol=1e-9, atol=1e-9)
