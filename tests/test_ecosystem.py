"""DiscreteLSTM / DiscreteGRU in the rest of the PyTorch toolbox (issue "Drop-in in the whole PyTorch
toolbox"): empty batches, meta/fake tensors, torch.export and torch.compile, torch.func and
parametrizations, torch's exception types, initial states, torch.save/load, TorchScript,
from_torch/to_torch, determinism and dropout's scaling."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from discrnn import (
    DiscreteGRU,
    DiscreteLSTM,
    PackedRNNState,
    PackedTensor,
    StateRangeWarning,
    quantize_pack,
)
from discrnn.backend import triton_interpreting
from discrnn.rnn_reference import reference_lstm_layer

CLASSES = [(DiscreteLSTM, nn.LSTM), (DiscreteGRU, nn.GRU)]


def _states(hx):
    return hx if isinstance(hx, tuple) else (hx,)


def _loss(y, hx, seed=1):
    g = torch.Generator(y.device).manual_seed(seed)
    outs = [y, *_states(hx)]
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype, device=o.device)).sum() for o in outs)


# ---------------------------------------------------------------------------------------------
# Empty batch and zero-length sequences: as torch


@pytest.mark.parametrize("cls, torch_cls", CLASSES)
@pytest.mark.parametrize("config", [{}, dict(num_layers=2, bidirectional=True), dict(batch_first=True),
                                    dict(proj_size=2)])
def test_empty_batch_like_torch(cls, torch_cls, config):
    if cls is DiscreteGRU and "proj_size" in config:
        pytest.skip("the GRU has no projection")
    torch.manual_seed(0)
    ours = cls(3, 4, levels=64, **config)
    theirs = ours.to_torch()
    D = (2 if ours.bidirectional else 1) * ours.num_layers
    shape = (0, 5, 3) if ours.batch_first else (5, 0, 3)
    for with_hx in (False, True):
        results = []
        for module in (ours, theirs):
            module.zero_grad()
            x = torch.zeros(shape, requires_grad=True)
            hx = None
            leaves = [x]
            if with_hx:
                h0 = torch.zeros(D, 0, ours.proj_size or 4, requires_grad=True)
                c0 = torch.zeros(D, 0, 4, requires_grad=True)
                hx = (h0, c0) if cls is DiscreteLSTM else h0
                leaves += list(_states(hx))
            y, hn = module(x, hx)
            _loss(y, hn).backward()
            results.append((y, _states(hn), [t.grad for t in leaves],
                            [p.grad for p in module.parameters()]))
        (y, hn, g_in, g_p), (y_t, hn_t, g_in_t, g_p_t) = results
        assert y.shape == y_t.shape
        assert [h.shape for h in hn] == [h.shape for h in hn_t]
        assert [h.dtype for h in hn] == [h.dtype for h in hn_t]
        for a, b in zip(g_in + g_p, g_in_t + g_p_t):
            assert a is not None and a.shape == b.shape and not a.any()
    # a packed final state of an empty batch, and carrying it on
    y, state = ours(torch.zeros(shape), packed_state=True)
    assert state.shape == (D, 0, 4) and state.nbytes == 0
    y2, _ = ours(torch.zeros(shape), state)
    assert y2.shape == y.shape


@pytest.mark.parametrize("cls, torch_cls", CLASSES)
@pytest.mark.parametrize("shape", [(0, 2, 3), (0, 3), (0, 0, 3)])
def test_zero_length_sequence_raises_like_torch(cls, torch_cls, shape):
    with pytest.raises(RuntimeError) as theirs:
        torch_cls(3, 4)(torch.zeros(shape))
    assert "sequence length" in str(theirs.value)
    with pytest.raises(RuntimeError, match="sequence length > 0") as ours:
        cls(3, 4, levels=64)(torch.zeros(shape))
    assert isinstance(ours.value, ValueError)  # discrnn's documented type as well


# ---------------------------------------------------------------------------------------------
# The finite check under tracing: meta, fake tensors, torch.export, torch.compile


@pytest.mark.parametrize("cls, torch_cls", CLASSES)
def test_meta_device_forward_gives_shapes(cls, torch_cls):
    kwargs = dict(num_layers=2, bidirectional=True)
    ours = cls(3, 4, levels=64, device="meta", **kwargs)
    assert ours.check_finite
    theirs = torch_cls(3, 4, device="meta", **kwargs)
    x = torch.randn(5, 2, 3, device="meta")
    y, hn = ours(x)
    y_t, hn_t = theirs(x)
    assert y.device.type == "meta" and y.shape == y_t.shape == (5, 2, 8)
    assert [h.shape for h in _states(hn)] == [h.shape for h in _states(hn_t)]
    _, state = ours(x, packed_state=True)
    assert state.shape == (4, 2, 4) and state.device.type == "meta"


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_fake_tensor_forward(cls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        module = cls(3, 4, levels=64)
        y, hn = module(torch.randn(5, 2, 3))
    assert y.shape == (5, 2, 4) and _states(hn)[0].shape == (1, 2, 4)


class _Model(nn.Module):
    """A recurrent layer inside a model, as torch.export meets it."""

    def __init__(self, cls):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.rnn = cls(5, 4, num_layers=2, levels=64)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.rnn(self.inp(x))[0])


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_export_keeps_the_finite_check_in_the_graph(cls):
    """torch.export.export of a model holding the layer (levels=64, check_finite=True): the same
    outputs as eager (for inference), and the NaN check as torch._assert_async in the graph."""
    torch.manual_seed(0)
    model = _Model(cls).eval()
    x = torch.randn(6, 2, 3)
    program = torch.export.export(model, (x,))
    asserts = [n for n in program.graph.nodes if "_assert_async" in str(n.target)]
    assert asserts, "the finite check is not in the exported graph"
    exported = program.module()
    x2 = torch.randn(6, 2, 3)
    with torch.no_grad():  # the exported layer is the forward pass only (out= ops inside)
        torch.testing.assert_close(exported(x2), model(x2), atol=0, rtol=0)
        if x2.device.type == "cpu":  # on CUDA the assert is a device-side one: fatal to the context
            bad = x2.clone()
            bad[3, 1, 0] = float("nan")
            with pytest.raises(RuntimeError, match="expected finite values, got NaN or Inf in input"):
                exported(bad)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_compile_runs_and_checks(cls):
    """torch.compile: same outputs and gradients as eager, NaN still caught. fullgraph=True traces
    too: the layers are a custom op there (discrnn/compile_ops.py, tests/test_compile.py)."""
    torch.manual_seed(0)
    module = cls(3, 4, levels=64)
    x = torch.randn(6, 2, 3, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="eager")
    y, hn = compiled(x)
    y_e, hn_e = module(x)
    torch.testing.assert_close(y, y_e, atol=0, rtol=0)
    g = torch.autograd.grad(_loss(y, hn), [x, *module.parameters()])
    g_e = torch.autograd.grad(_loss(y_e, hn_e), [x, *module.parameters()])
    for a, b in zip(g, g_e):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if x.device.type == "cpu":  # on CUDA the assert is a device-side one: fatal to the context
        bad = x.detach().clone()
        bad[0, 0, 0] = float("inf")
        with pytest.raises((ValueError, RuntimeError), match="expected finite values"):
            compiled(bad)
    torch._dynamo.reset()
    try:
        y_full, _ = torch.compile(module, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(y_full, y_e, atol=0, rtol=0)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# The weights actually used: torch.func.functional_call, parametrizations


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_nan_weights_of_functional_call_are_caught(cls):
    module = cls(3, 4, levels=64)
    x = torch.randn(5, 2, 3)
    w = module.weight_hh_l0.detach().clone()
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in weight_hh_l0"):
        torch.func.functional_call(module, {"weight_hh_l0": w}, (x,))
    # and the substituted weights are the ones used
    w_ok = 2 * module.weight_hh_l0.detach()
    y_fc, _ = torch.func.functional_call(module, {"weight_hh_l0": w_ok}, (x,))
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.weight_hh_l0.copy_(w_ok)
    torch.testing.assert_close(y_fc, twin(x)[0], atol=0, rtol=0)


class _Poison(nn.Module):
    def forward(self, w):
        return w * float("nan")


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_nan_of_a_parametrization_is_caught(cls):
    module = cls(3, 4, levels=64, num_layers=2)
    parametrize.register_parametrization(module, "weight_ih_l1", _Poison())
    with pytest.raises(ValueError, match="NaN or Inf in weight_ih_l1"):
        module(torch.randn(5, 2, 3))


# ---------------------------------------------------------------------------------------------
# Exception types: torch's for the same mistake


def _lstm_hx(*shape, **kw):
    return (torch.zeros(*shape, **kw), torch.zeros(*shape, **kw))


MISTAKES = {
    # name: (call(module, is_lstm), part of our message)
    "features": (lambda m, lstm: m(torch.randn(5, 2, 3)), "input must have 4 features"),
    "1-D input": (lambda m, lstm: m(torch.randn(5)), "must be 2-D .* or 3-D"),
    "4-D input": (lambda m, lstm: m(torch.randn(5, 2, 4, 1)), "must be 2-D .* or 3-D"),
    "integer input": (lambda m, lstm: m(torch.zeros(5, 2, 4, dtype=torch.int64)),
                      "input must have a floating dtype torch.float32 like the parameters"),
    "float64 input": (lambda m, lstm: m(torch.randn(5, 2, 4, dtype=torch.float64)),
                      "input must have dtype torch.float32 like the parameters, got torch.float64"),
    "h_0 batch": (lambda m, lstm: m(torch.randn(5, 2, 4), _lstm_hx(1, 3, 6) if lstm else torch.zeros(1, 3, 6)),
                  r"hx \(h_0\) must have shape \(1, 2, 6\), got \(1, 3, 6\)"),
    "h_0 layers": (lambda m, lstm: m(torch.randn(5, 2, 4), _lstm_hx(2, 2, 6) if lstm else torch.zeros(2, 2, 6)),
                   r"hx \(h_0\) must have shape \(1, 2, 6\), got \(2, 2, 6\)"),
    "h_0 2-D for batched": (lambda m, lstm: m(torch.randn(5, 2, 4), _lstm_hx(2, 6) if lstm else torch.zeros(2, 6)),
                            "hx must be 3-D for batched input"),
    "h_0 3-D for unbatched": (lambda m, lstm: m(torch.randn(5, 4), _lstm_hx(1, 1, 6) if lstm else torch.zeros(1, 1, 6)),
                              "hx must be 2-D for unbatched input"),
    "h_0 dtype": (lambda m, lstm: m(torch.randn(5, 2, 4), _lstm_hx(1, 2, 6, dtype=torch.float64) if lstm
                                    else torch.zeros(1, 2, 6, dtype=torch.float64)),
                  r"hx \(h_0\) must have dtype torch.float32 like the input, got torch.float64"),
    "zero-length": (lambda m, lstm: m(torch.randn(0, 2, 4)), "sequence length > 0"),
    "input device": (lambda m, lstm: m(torch.randn(5, 2, 4, device="meta")),
                     "input must be on .* like the parameters, got meta"),
    "h_0 device": (lambda m, lstm: m(torch.randn(5, 2, 4), _lstm_hx(1, 2, 6, device="meta") if lstm
                                     else torch.zeros(1, 2, 6, device="meta")),
                   r"hx \(h_0\) must be on .* like the input, got meta"),
}


@pytest.mark.parametrize("cls, torch_cls", CLASSES)
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_forward_mistakes_raise_what_torch_raises(cls, torch_cls, mistake):
    call, message = MISTAKES[mistake]
    lstm = cls is DiscreteLSTM
    with pytest.raises(Exception) as theirs:
        call(torch_cls(4, 6), lstm)
    with pytest.raises(Exception, match=message) as ours:
        call(cls(4, 6, levels=64), lstm)
    assert isinstance(ours.value, type(theirs.value)), (
        f"{mistake}: torch raises {type(theirs.value).__name__}, we raise {type(ours.value).__mro__}"
    )


def test_c0_mistakes_raise_what_torch_raises():
    x = torch.randn(5, 2, 4)
    for c0, message in [(torch.zeros(1, 2, 5), r"hx \(c_0\) must have shape \(1, 2, 6\)"),
                        (torch.zeros(1, 2, 6, dtype=torch.float64), r"hx \(c_0\) must have dtype")]:
        with pytest.raises(Exception) as theirs:
            nn.LSTM(4, 6)(x, (torch.zeros(1, 2, 6), c0))
        with pytest.raises(Exception, match=message) as ours:
            DiscreteLSTM(4, 6, levels=64)(x, (torch.zeros(1, 2, 6), c0))
        assert isinstance(ours.value, type(theirs.value))


CONSTRUCTOR_MISTAKES = [
    (nn.GRU, DiscreteGRU, dict(proj_size=2), "proj_size must be 0"),
    (nn.LSTM, DiscreteLSTM, dict(proj_size=6), "proj_size has to be smaller than hidden_size"),
    (nn.LSTM, DiscreteLSTM, dict(dropout=2.0), "dropout should be a number in range"),
    (nn.GRU, DiscreteGRU, dict(num_layers=0), "num_layers must be > 0"),
    (nn.GRU, DiscreteGRU, dict(hidden_size=0), "hidden_size must be > 0"),
    (nn.LSTM, DiscreteLSTM, dict(hidden_size=6.0), "hidden_size must be an integer"),
]


@pytest.mark.parametrize("torch_cls, cls, kwargs, message", CONSTRUCTOR_MISTAKES)
def test_constructor_mistakes_raise_what_torch_raises(torch_cls, cls, kwargs, message):
    args = dict(input_size=4, hidden_size=6)
    args.update(kwargs)
    with pytest.raises(Exception) as theirs:
        torch_cls(**args)
    with pytest.raises(Exception, match=message) as ours:
        cls(**args, levels=64)
    assert isinstance(ours.value, type(theirs.value))
    DiscreteGRU(4, 6, proj_size=0)  # as torch.nn.GRU, proj_size=0 is accepted


# ---------------------------------------------------------------------------------------------
# Initial states: used as given, never clamped silently


def test_gru_h0_outside_the_state_range_warns():
    module = DiscreteGRU(3, 4, levels=256)
    x = torch.randn(5, 2, 3)
    h0 = torch.zeros(1, 2, 4)
    h0[0, 1, 2] = 9.0
    with pytest.warns(StateRangeWarning, match=r"hx \(h_0\) holds values outside \[-1, 1\] \(in \[0, 9\]\)"):
        module(x, h0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x, h0.clamp(-1, 1))  # in range: silent
        module(x, module(x)[1])  # h_n of a previous call: silent
        module.check_finite = False
        module(x, h0)  # no value checks at all


@pytest.mark.parametrize("levels", [16, 256])
def test_lstm_states_are_used_as_given(levels):
    """h_0 and c_0 far outside the bounds (|h| <= 1, |c| <= cell_clip) enter the cell unchanged: the
    layer equals the plain-autograd reference fed the same values."""
    torch.manual_seed(0)
    module = DiscreteLSTM(3, 5, levels=levels, cell_clip=2.0).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0 = 3 * torch.randn(1, 2, 5, dtype=torch.float64)
    c0 = 20 * torch.randn(1, 2, 5, dtype=torch.float64)
    y, (hn, cn) = module(x, (h0, c0))
    w = module._layer_weights(0, 0)
    y_ref, hn_ref, cn_ref = reference_lstm_layer(x, h0[0], c0[0], *w, levels, cell_clip=2.0)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(cn[0], cn_ref, atol=1e-12, rtol=0)


def test_packed_state_parts_are_checked():
    o = quantize_pack(torch.rand(1, 2, 4), 64, "sigmoid")
    u = quantize_pack(torch.rand(1, 2, 4), 64, "tanh")
    with pytest.raises(ValueError, match="h must be a PackedTensor of kind 'tanh', got 'sigmoid'"):
        PackedRNNState(h=o)
    with pytest.raises(ValueError, match="o and u must agree"):
        PackedRNNState(o=o, u=quantize_pack(torch.rand(1, 2, 4), 16, "tanh"), c=torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="c must have a floating dtype"):
        PackedRNNState(o=o, u=u, c=torch.zeros(1, 2, 4, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# torch.save / torch.load(weights_only=True), .to(device)


def _save_load(obj, **kwargs):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, **kwargs)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_packed_state_saves_and_loads_weights_only(cls):
    torch.manual_seed(0)
    module = cls(3, 4, num_layers=2, levels=64)
    x = torch.randn(10, 2, 3)
    with torch.no_grad():
        _, state = module(x[:5], packed_state=True)
        loaded = _save_load({"state": state, "step": 5})
        assert loaded["step"] == 5
        got = loaded["state"]
        assert isinstance(got, PackedRNNState) and got.mode == state.mode
        for name in ("h", "o", "u"):
            a, b = getattr(got, name), getattr(state, name)
            assert (a is None) == (b is None)
            if a is not None:
                assert isinstance(a, PackedTensor) and torch.equal(a.data, b.data)
                assert (a.shape, a.dtype, a.levels, a.kind, a.bits) == (b.shape, b.dtype, b.levels, b.kind, b.bits)
        # carrying on from the loaded state = carrying on from the original
        torch.testing.assert_close(module(x[5:], got)[0], module(x[5:], state)[0], atol=0, rtol=0)
        # moved, deep-copied
        moved = got.to(torch.device("cpu"))
        torch.testing.assert_close(module(x[5:], moved)[0], module(x[5:], state)[0], atol=0, rtol=0)
        assert got.to("meta").device.type == "meta"
        assert copy.deepcopy(state).nbytes == state.nbytes


def test_packed_tensor_saves_and_loads_weights_only():
    p = quantize_pack(torch.randn(3, 7), 100, "tanh")
    q = _save_load([p])[0]
    assert torch.equal(q.dequantize(), p.dequantize()) and q.shape == p.shape and q.bits == 7
    assert _save_load(p, map_location="meta").device.type == "meta"


def _corrupt(p, field, value):
    q = PackedTensor(p.data.clone(), p.shape, p.dtype, p.levels, p.kind, p.bits)
    setattr(q, field, value)  # past the constructor's checks, as a damaged file would be
    return q


def test_corrupted_packed_tensor_is_rejected_on_load():
    p = quantize_pack(torch.rand(10), 50, "sigmoid")  # 6 bits, codes up to 49
    cases = [
        (_corrupt(p, "data", p.data[:-1]), ValueError, r"8 bytes for numel=10 at bits=6, got 7"),
        (_corrupt(p, "data", p.data.to(torch.int16)), TypeError, "data must have dtype torch.uint8"),
        (_corrupt(p, "levels", 3), ValueError, r"codes must lie in \[0, 2\] for levels=3, got a code"),
        (_corrupt(p, "shape", torch.Size([11])), ValueError, "bytes for numel=11"),
        (_corrupt(p, "bits", 2), ValueError, "bits=2 holds only 4 codes, too few for levels=50"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            _save_load(bad)
    _, state = DiscreteLSTM(3, 4, levels=64)(torch.randn(5, 2, 3), packed_state=True)
    state.c = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"PackedRNNState \(saved\): c must have the shape of o and u"):
        _save_load(state)


# ---------------------------------------------------------------------------------------------
# TorchScript: a clear error naming the alternatives


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_torchscript_raises_a_clear_error(cls):
    model = _Model(cls)
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch.jit.trace: .*torch.export.export"):
        torch.jit.trace(model, (x,))
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch.jit.script: .*torch.compile"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match=r"torch.jit.script\(module.to_torch\(\)\)"):
        torch.jit.script(cls(3, 4, levels=None))
    continuous = cls(3, 4, levels=None)  # torch's own computation traces as torch's does
    traced = torch.jit.trace(continuous, (x,))
    torch.testing.assert_close(traced(x)[0], continuous(x)[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# from_torch / to_torch


TORCH_CONFIGS = [
    dict(),
    dict(num_layers=2, bias=False, batch_first=True, dropout=0.3, bidirectional=True),
    dict(num_layers=2, bidirectional=True, proj_size=3),
]


@pytest.mark.parametrize("cls, torch_cls", CLASSES)
@pytest.mark.parametrize("config", TORCH_CONFIGS)
def test_from_torch_with_levels_none_is_the_torch_module(cls, torch_cls, config):
    if cls is DiscreteGRU and "proj_size" in config:
        pytest.skip("the GRU has no projection")
    torch.manual_seed(0)
    theirs = torch_cls(5, 6, **config).double().eval()
    ours = cls.from_torch(theirs, levels=None)
    assert not ours.training and ours.weight_ih_l0.dtype == torch.float64
    for key in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional", "proj_size"):
        assert getattr(ours, key) == getattr(theirs, key), key
    x = torch.randn(4, 7, 5, dtype=torch.float64, requires_grad=True)
    y, hn = ours(x)
    y_t, hn_t = theirs(x)
    torch.testing.assert_close(y, y_t, atol=0, rtol=0)
    for a, b in zip(_states(hn), _states(hn_t)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    g = torch.autograd.grad(_loss(y, hn), [x, *ours.parameters()])
    g_t = torch.autograd.grad(_loss(y_t, hn_t), [x, *theirs.parameters()])
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a copy, not a view: training one leaves the other alone
    with torch.no_grad():
        ours.weight_hh_l0.add_(1.0)
    assert not torch.equal(ours.weight_hh_l0, theirs.weight_hh_l0)


@pytest.mark.parametrize("cls, torch_cls", CLASSES)
@pytest.mark.parametrize("config", TORCH_CONFIGS)
def test_to_torch_round_trips_weights_and_config(cls, torch_cls, config):
    if cls is DiscreteGRU and "proj_size" in config:
        pytest.skip("the GRU has no projection")
    torch.manual_seed(0)
    ours = cls(5, 6, levels=16, grad="exact", chunk_size=3, **config)
    theirs = ours.to_torch()
    assert type(theirs) is torch_cls and theirs.training
    back = cls.from_torch(theirs, levels=16, grad="exact", chunk_size=3)
    for module in (theirs, back):
        sd, sd_ours = module.state_dict(), ours.state_dict()
        assert list(sd) == list(sd_ours)
        for key in sd:
            assert torch.equal(sd[key], sd_ours[key]), key
    assert repr(back) == repr(ours)
    x = torch.randn(4, 3, 5)
    if ours.batch_first:
        x = x.transpose(0, 1)
    ours.eval(), back.eval()
    torch.testing.assert_close(back(x)[0], ours(x)[0], atol=0, rtol=0)


def test_from_torch_rejects_other_modules_and_settings():
    with pytest.raises(TypeError, match=r"module must be a torch.nn.LSTM, got GRU"):
        DiscreteLSTM.from_torch(nn.GRU(3, 4))
    with pytest.raises(TypeError, match=r"module must be a torch.nn.GRU, got DiscreteGRU"):
        DiscreteGRU.from_torch(DiscreteGRU(3, 4))
    with pytest.raises(TypeError, match="takes dropout from the module"):
        DiscreteLSTM.from_torch(nn.LSTM(3, 4), dropout=0.5)


# ---------------------------------------------------------------------------------------------
# Determinism


def _run(module, x, hx, seed):
    torch.manual_seed(seed)
    y, hn = module(x, hx)
    grads = torch.autograd.grad(_loss(y, hn), [x, *_states(hx), *module.parameters()])
    return [y.detach(), *(h.detach() for h in _states(hn)), *grads]


@pytest.mark.parametrize(
    "cls, kwargs, backend",
    [
        (DiscreteLSTM, dict(num_layers=2, bidirectional=True, dropout=0.4, proj_size=3), "torch"),
        (DiscreteGRU, dict(num_layers=2, bidirectional=True, dropout=0.4), "torch"),
        (DiscreteLSTM, dict(grad="exact"), "torch"),
        (DiscreteLSTM, dict(num_layers=2), "triton"),
        (DiscreteGRU, dict(num_layers=2), "triton"),
    ],
)
def test_forward_and_backward_are_bitwise_deterministic(cls, kwargs, backend):
    if backend == "triton" and not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    module = cls(5, 8, levels=64, chunk_size=3, backend=backend, **kwargs)
    D = (2 if module.bidirectional else 1) * module.num_layers
    x = torch.randn(7, 3, 5, requires_grad=True)
    h0 = (0.5 * torch.rand(D, 3, module.proj_size or 8) - 0.25).requires_grad_()
    hx = (h0, torch.randn(D, 3, 8, requires_grad=True)) if cls is DiscreteLSTM else h0
    first = _run(module, x, hx, seed=3)
    for _ in range(2):
        for a, b in zip(first, _run(module, x, hx, seed=3)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Dropout between layers: kept values are scaled by 1 / (1 - p)


def _identity_like(cls, H, p, levels=64):
    """A 2-layer stack where every unit of layer 2 reads only its own input unit and nothing of the
    past: layer 1 outputs one constant a everywhere, layer 2's unit k is F(x2_k) for one increasing
    function F. So layer 2's output shows, element by element, what dropout passed to it."""
    module = cls(H, H, num_layers=2, dropout=p, levels=levels).double()
    G = 4 if cls is DiscreteLSTM else 3
    with torch.no_grad():
        for param in module.parameters():
            param.zero_()
        for layer in range(2):
            b = getattr(module, f"bias_ih_l{layer}").view(G, H)
            if cls is DiscreteLSTM:
                b[0], b[1], b[3] = 30.0, -30.0, 30.0  # i = 1, f = 0, o = 1: h = dtanh(dtanh(pre_g))
            else:
                b[1] = -30.0  # z = 0: h = dtanh(pre_n) (h W_hh = 0)
        module.bias_ih_l0.view(G, H)[2] = 0.5  # layer 1: the constant a
        module.weight_ih_l1.view(G, H, H)[2] = torch.eye(H)  # layer 2: unit k reads input k
    return module


def _single_layer(module, layer):
    single = type(module)(module.hidden_size, module.hidden_size, levels=module.levels).double()
    single.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in module.state_dict().items()
                            if f"_l{layer}" in k})
    return single


@pytest.mark.parametrize("p", [0.5, 0.2])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_dropout_scales_kept_values_by_one_over_one_minus_p(cls, p):
    """Forward: every element of layer 2's input is 0 (dropped) or a / (1 - p) (kept), about a
    share 1 - p kept; a layer without the scaling passes a instead and fails here. Backward: the
    gradients equal those of the same computation written out with the mask recovered from the
    output (layer 1, times mask / (1 - p), layer 2)."""
    H, T, B = 64, 6, 4
    module = _identity_like(cls, H, p)
    layer1, layer2 = _single_layer(module, 0), _single_layer(module, 1)
    x = torch.zeros(T, B, H, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        a = layer1(x)[0]
        assert (a == a.flatten()[0]).all() and 0.2 < float(a.flatten()[0]) < 0.8
        kept_value = layer2(a / (1 - p))[0]
        dropped_value = layer2(torch.zeros_like(a))[0]
        unscaled_value = layer2(a)[0]
    assert not torch.equal(kept_value, unscaled_value)  # the test can tell scaled from unscaled
    module.train()
    torch.manual_seed(0)
    y, hn = module(x)
    kept = y == kept_value
    assert (kept | (y == dropped_value)).all(), "an element is neither dropped nor scaled by 1/(1-p)"
    share = float(kept.double().mean())
    assert abs(share - (1 - p)) < 0.05, share
    # backward against the computation written out
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad((y * dy).sum(), list(module.parameters()))
    y1, _ = layer1(x)
    y2, _ = layer2(y1 * kept.double() / (1 - p))
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    grads_ref = torch.autograd.grad((y2 * dy).sum(), list(layer1.parameters()) + list(layer2.parameters()))
    names = [n for n, _ in module.named_parameters()]
    assert names == [n for n, _ in layer1.named_parameters()] + [
        n.replace("_l0", "_l1") for n, _ in layer2.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in grads[: len(grads) // 2]), "no gradient reached layer 1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_matches_isfinite(dtype):
    # the single-pass check the layers and codecs use in eager mode (aminmax propagates NaN)
    from discrnn._validation import all_finite

    x = torch.randn(1000).to(dtype)
    assert bool(all_finite(x)) and bool(all_finite(torch.empty(0, dtype=dtype)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 500, 999):
            y = x.clone()
            y[where] = bad
            assert not bool(all_finite(y)), (bad, where)
    assert bool(all_finite(torch.arange(5)))  # integers are always finite
