"""CUDA graphs: the layers' forward and backward read no tensor value on the host (so
``torch.cuda.make_graphed_callables`` / ``torch.cuda.graph`` can capture them), checked on any device
with :class:`discrnn.testing.HostSyncs`; on a GPU, graph replays against eager calls."""

import copy

import pytest
import torch

import discrnn.testing as dt
from discrnn import DiscreteGRU, DiscreteLSTM
from discrnn import _validation as V

CONFIGS = {
    "lstm": (DiscreteLSTM, dict()),
    "lstm-bidir-proj": (DiscreteLSTM, dict(bidirectional=True, proj_size=8)),
    "lstm-dropout-clip": (DiscreteLSTM, dict(dropout=0.5, cell_clip=2.0)),
    "gru": (DiscreteGRU, dict()),
    "gru-bidir": (DiscreteGRU, dict(bidirectional=True)),
    "gru-exact-grad": (DiscreteGRU, dict(grad="exact")),
}


def loss_of(y, state):
    states = state if isinstance(state, tuple) else (state,)
    return y.sum() + sum(s.sum() for s in states)


def forward_backward(module, x, hx=None):
    y, state = module(x, hx)
    loss_of(y, state).backward()
    return y, state


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_triton_layers_read_no_value_on_the_host(name, device):
    """After a first call (which compiles, builds tables and runs the extension's load checks, as a
    capture's warm-up does), forward + backward on the Triton backend, 2 layers and a carried
    state, hand no tensor value to Python."""
    cls, kw = CONFIGS[name]
    torch.manual_seed(0)
    module = cls(8, 16, 2, levels=64, backend="triton", check_finite=False, **kw).to(device)
    x = torch.randn(12, 3, 8, device=device, requires_grad=True)
    _, state = forward_backward(module, x)
    hx = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    with dt.HostSyncs() as syncs:
        forward_backward(module, x, hx)
    syncs.assert_none(f"{name} forward + backward")


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_triton_layers_under_bf16_autocast_read_no_value_on_the_host(cls, device):
    """The same under bf16 autocast (the dtype the layer reads off autocast, its casts and bf16
    products; on the CPU the GRU stays float32, as torch.nn.GRU does there): no value reaches the
    host once warmed up."""
    torch.manual_seed(0)
    module = cls(8, 16, 2, levels=64, backend="triton", check_finite=False).to(device)
    x = torch.randn(12, 3, 8, device=device, requires_grad=True)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y, _ = module(x)
        y.float().sum().backward()

    step()
    with dt.HostSyncs() as syncs:
        step()
    syncs.assert_none(f"{cls.__name__} under bf16 autocast")


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_value_checks_during_a_capture_read_no_value_on_the_host(cls, device, monkeypatch):
    """check_finite=True under a CUDA graph capture (values_unreadable() is then true, as while
    torch.compile traces) puts the NaN/Inf conditions into the graph as torch._assert_async: no
    value reaches the host. Outside a capture on a GPU the same call reads them once (the
    documented sync), which the recorder sees; on the CPU the extension's scan returns its verdict
    as a plain int."""
    torch.manual_seed(0)
    module = cls(8, 16, 2, levels=64, backend="triton").to(device)
    x = torch.randn(12, 3, 8, device=device, requires_grad=True)
    forward_backward(module, x)
    with dt.HostSyncs() as eager:
        forward_backward(module, x)
    if device.type == "cuda":
        assert eager.calls, "the eager value check reads its verdict on the host"
    monkeypatch.setattr(V, "values_unreadable", lambda *tensors: True)
    asserts = []
    real_assert = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda *a: asserts.append(a) or real_assert(*a))
    with dt.HostSyncs() as captured:
        forward_backward(module, x)
    captured.assert_none("forward + backward with check_finite under a capture")
    assert len(asserts) >= 1 + 1 + 2 * 4  # input, h_0 (and c_0) and every layer's weights


def test_host_syncs_sees_what_a_capture_forbids():
    x = torch.randn(6)
    cases = {
        "Tensor.item": lambda: x.sum().item(),
        "Tensor.__bool__": lambda: bool(x.sum() > 0),
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.numpy": lambda: x.numpy(),
        "aten.index with a boolean mask": lambda: x[x > 0],
        "aten.nonzero": lambda: x.nonzero(),
        "aten.lift_fresh": lambda: torch.tensor([1.0, 2.0]),
        "aten.equal": lambda: torch.equal(x, x),
        "aten._to_copy between devices": lambda: x.to("meta"),
        "aten._unique2": lambda: x.unique(),
    }
    for name, fn in cases.items():
        with dt.HostSyncs() as syncs:
            fn()
        assert name in [n for n, _ in syncs.calls], (name, syncs.calls)
    with dt.HostSyncs() as syncs:
        (x * 2 + 1).sum()
        x.new_zeros(3)[1:]
    assert syncs.calls == []
    with dt.HostSyncs() as syncs:
        x.max().item()
    with pytest.raises(AssertionError, match=r"(?s)made 2 host-device value transfers.*Tensor.item"):
        syncs.assert_none("the call")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lstm", "lstm-bidir-proj", "gru-bidir"])
def test_graphed_layer_matches_eager_across_optimizer_steps(name):
    """make_graphed_callables on a 2-layer module with a carried state (check_finite on: inside the
    capture it is the device-side assert): outputs (levels) equal eager's exactly, gradients within
    float32 rounding (cuBLAS may sum in another order under capture), over three SGD steps that
    update the weights in place (a replay reads the new weights)."""
    cls, kw = CONFIGS[name]
    kw = {k: v for k, v in kw.items() if k != "dropout"}
    torch.manual_seed(0)
    eager = cls(8, 32, 2, levels=64, **kw).cuda()
    graphed = copy.deepcopy(eager)
    T, B = 40, 3
    x_static = torch.randn(T, B, 8, device="cuda", requires_grad=True)
    hx = eager(x_static)[1]
    hx = tuple(s.detach() for s in hx) if isinstance(hx, tuple) else hx.detach()
    graphed = torch.cuda.make_graphed_callables(graphed, (x_static, hx))
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.5)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.5)
    for step in range(3):
        x = torch.randn(T, B, 8, device="cuda")
        results = []
        for module, opt in ((eager, opt_e), (graphed, opt_g)):
            opt.zero_grad(set_to_none=False)
            xi = x.clone().requires_grad_()
            y, state = module(xi, hx)
            loss_of(y, state).backward()
            states = state if isinstance(state, tuple) else (state,)
            results.append(([y.detach().clone(), *(s.detach().clone() for s in states)],
                            [xi.grad.clone(), *(p.grad.clone() for p in module.parameters())]))
            opt.step()
        (outs_e, grads_e), (outs_g, grads_g) = results
        for a, b in zip(outs_g, outs_e):
            assert torch.equal(a, b), f"step {step}: graphed outputs differ from eager"
        dt.assert_close_report([f"step {step} grad {i}" for i in range(len(grads_e))], grads_g,
                               grads_e, rtol=1e-5, atol=1e-6)
