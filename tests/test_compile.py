"""DiscreteLSTM / DiscreteGRU under torch.compile(fullgraph=True) and torch.export, through the
custom ops of discrnn/compile_ops.py (``discrnn::rnn_stack``, ``discrnn::rnn_stack_backward``,
``discrnn::pack``): outputs, final states and every gradient equal eager mode's bit for bit, the
same bytes are kept for backward, and torch.library.opcheck passes on the ops. Eager mode keeps the
autograd Functions."""

import math

import pytest
import torch
from torch import nn

from discrnn import DiscreteGRU, DiscreteLSTM, compile_ops
from discrnn.testing import assert_close_report, kept_bytes

T, B, I, H = 5, 2, 3, 4
CLASSES = [DiscreteLSTM, DiscreteGRU]

# Dynamo maps torch functions to its handlers by identity, in a table it builds on first use. Build
# it at import, before conftest's fixture replaces torch.empty / torch.empty_like with poisoning
# wrappers: otherwise the table holds the first test's wrapper as torch.empty, and later tests'
# wrappers call a torch.empty that dynamo no longer recognises.
torch._dynamo.trace_rules.get_torch_obj_rule_map()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _states(hx):
    return hx if isinstance(hx, tuple) else (hx,)


def _initial(module, batch=B, device=None):
    """h_0 (and c_0) that need gradients, h_0 inside [-1, 1] (the GRU's state range)."""
    D = module.num_layers * (2 if module.bidirectional else 1)
    hidden = module.hidden_size
    h0 = (torch.rand(D, batch, module.proj_size or hidden, device=device) - 0.5).requires_grad_()
    if isinstance(module, DiscreteLSTM):
        return h0, torch.randn(D, batch, hidden, device=device, requires_grad=True)
    return h0


def _run(module, call, x, hx, seed=0):
    """Outputs and final states of ``call(x, hx)`` (with ``module``'s parameters), then the
    gradients of one loss over all of them, (y * dy).sum() + (h_n * dh_n).sum() (+ c_n), with
    respect to x, h_0, c_0 and every parameter."""
    torch.manual_seed(seed)  # the dropout masks
    y, hn = call(x, hx) if hx is not None else call(x)
    outs = [y, *_states(hn)]
    g = torch.Generator(y.device).manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype, device=o.device)).sum()
               for o in outs)
    leaves = [t for t in [x, *(_states(hx) if hx is not None else ())] if t.requires_grad]
    leaves += [p for p in module.parameters() if p.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


def _names(module, hx):
    """Names of what :func:`_run` returns."""
    states = ["h", "c"][: 2 if isinstance(module, DiscreteLSTM) else 1]
    return (["y"] + [s + "_n" for s in states] + ["dx"]
            + (["d_" + s + "_0" for s in states] if hx is not None else [])
            + ["d_" + n for n, _ in module.named_parameters()])


def _assert_bitwise(module, got, expected, hx=None):
    assert len(got) == len(expected)
    assert_close_report(_names(module, hx), got, expected, rtol=0, atol=0)


class _GraphRecorder:
    """A torch.compile backend that records dynamo's graph and runs it through AOTAutograd (as
    inductor does, without code generation)."""

    def __init__(self):
        self.targets = []

    def __call__(self, gm, example_inputs):
        self.targets += [str(n.target) for n in gm.graph.nodes]
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): training, bit for bit


@pytest.mark.parametrize("cls", CLASSES)
def test_compiled_layer_trains_bit_for_bit_and_keeps_what_eager_keeps(cls):
    """The default compiler (inductor), fullgraph: a 2-layer bidirectional layer with h_0 (c_0)
    given and 3 chunks per sequence gives eager's outputs, final states and gradients (x, h_0, c_0,
    every weight) bit for bit, and keeps no more bytes for backward than eager mode."""
    torch.manual_seed(0)
    module = cls(I, H, num_layers=2, bidirectional=True, levels=64, chunk_size=2)
    x = torch.randn(T, B, I, requires_grad=True)
    hx = _initial(module)
    compiled = torch.compile(module, fullgraph=True)
    got = _run(module, compiled, x, hx)
    expected = _run(module, module, x, hx)
    _assert_bitwise(module, got, expected, hx)
    params = list(module.parameters())
    kept_compiled, _ = kept_bytes(lambda: compiled(x, hx), exclude=[x, *_states(hx), *params])
    kept_eager, _ = kept_bytes(lambda: module(x, hx), exclude=[x, *_states(hx), *params])
    assert 0 < kept_compiled <= kept_eager, (kept_compiled, kept_eager)


CONFIGS = [
    (DiscreteLSTM, dict(proj_size=2, num_layers=2, bias=False, batch_first=True)),
    (DiscreteLSTM, dict(grad="exact", num_layers=2, chunk_size=2)),
    (DiscreteLSTM, dict(dropout=0.5, num_layers=3, bidirectional=True, chunk_size=3)),
    (DiscreteLSTM, dict(num_layers=2, dtype=torch.float64, cell_clip=0.5)),
    (DiscreteGRU, dict(grad="exact", num_layers=2, bidirectional=True, chunk_size=2)),
    (DiscreteGRU, dict(dropout=0.5, num_layers=3, bias=False, chunk_size=3)),
]


@pytest.mark.parametrize("cls, config", CONFIGS, ids=lambda v: getattr(v, "__name__", None) or
                         ",".join(f"{k}={v}" for k, v in v.items()))
def test_compiled_configurations_match_eager_bit_for_bit(cls, config):
    """Projection, no bias, batch_first, grad="exact", float64, a small cell_clip, dropout between
    layers (the masks are drawn outside the op, by the same generator calls as in eager mode):
    fullgraph through AOTAutograd, bit for bit; the graph holds the op, the step loop is not
    traced."""
    torch.manual_seed(0)
    module = cls(I, H, levels=64, **config)
    dtype = config.get("dtype", torch.float32)
    x = torch.randn((B, T, I) if module.batch_first else (T, B, I), dtype=dtype, requires_grad=True)
    recorder = _GraphRecorder()
    got = _run(module, torch.compile(module, fullgraph=True, backend=recorder), x, None)
    expected = _run(module, module, x, None)
    _assert_bitwise(module, got, expected)
    assert any("discrnn.rnn_stack" in t for t in recorder.targets), recorder.targets
    assert not any("addmm" in t or "sigmoid" in t for t in recorder.targets), recorder.targets


@pytest.mark.parametrize("cls", CLASSES)
def test_compiled_packed_state_carries_on_as_eager(cls):
    """packed_state=True (the final-state codes packed by ``discrnn::pack``) and carrying a
    PackedRNNState into the next call, under fullgraph: the same outputs and bytes."""
    torch.manual_seed(0)
    module = cls(I, H, num_layers=2, levels=64)
    x = torch.randn(2 * T, B, I)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        results = []
        for call in (module, compiled):
            y1, state = call(x[:T], packed_state=True)
            y2, state2 = call(x[T:], state)
            parts = [getattr(state2, n) for n in ("h", "o", "u", "c")]
            parts = [p for p in parts if p is not None]
            results.append([y1, y2] + [p if isinstance(p, torch.Tensor) else p.data for p in parts])
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("cls", CLASSES)
def test_compiled_module_takes_new_batch_sizes_and_lengths(cls):
    """One compiled module called with other batch sizes (the op takes them symbolically after
    the first change) and lengths (they are specialised: a new length traces again): eager's
    outputs and input gradients each time."""
    torch.manual_seed(0)
    module = cls(I, H, num_layers=2, levels=64, chunk_size=2)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for steps, batch in [(T, 2), (T, 3), (T, 5), (T + 2, 3)]:
        x = torch.randn(steps, batch, I, requires_grad=True)
        results = []
        for call in (compiled, module):
            y, _ = call(x)
            results.append([y, *torch.autograd.grad(y.square().sum(), [x])])
        for got, expected in zip(*results, strict=True):
            assert torch.equal(got, expected), (steps, batch)


# ---------------------------------------------------------------------------------------------
# torch.export


class _Model(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.inp = nn.Linear(I, 5)
        self.rnn = cls(5, H, num_layers=2, levels=64, chunk_size=2)
        self.out = nn.Linear(H, 2)

    def forward(self, x):
        return self.out(self.rnn(self.inp(x))[0])


@pytest.mark.parametrize("cls", CLASSES)
def test_export_matches_eager_forward_and_backward(cls):
    """torch.export.export of a model holding a 2-layer layer: one ``discrnn.rnn_stack`` node;
    the exported module's output equals eager's bit for bit, and (exported from a model that needs
    gradients) so do the parameters' gradients through it. Exported under no_grad it is an
    inference program: backward through it raises a clear error."""
    torch.manual_seed(0)
    model = _Model(cls)
    x = torch.randn(T, B, I)
    program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes]
    assert sum("discrnn.rnn_stack" in t for t in targets) == 1, targets
    exported = program.module()
    x2 = torch.randn(T, B, I)
    with torch.no_grad():
        assert torch.equal(exported(x2), model(x2))
    params = list(model.parameters())
    got = torch.autograd.grad(exported(x2).square().sum(), list(exported.parameters()))
    expected = torch.autograd.grad(model(x2).square().sum(), params)
    assert_close_report([n for n, _ in model.named_parameters()], got, expected, rtol=0, atol=0)

    with torch.no_grad():
        inference = torch.export.export(model.eval(), (x,)).module()
    assert torch.equal(inference(x2), model(x2))
    with pytest.raises(RuntimeError, match="kept nothing to differentiate"):
        inference(x2).sum().backward()


# ---------------------------------------------------------------------------------------------
# The ops themselves, and eager mode


def _op_args(cell, keep=True):
    torch.manual_seed(0)
    G, D, layers = (4 if cell == "lstm" else 3), 2, 2
    x = torch.randn(3 * B, I, requires_grad=True)
    states = [(0.5 * torch.randn(layers * D, B, H)).requires_grad_()]
    if cell == "lstm":
        states.append(torch.randn(layers * D, B, H, requires_grad=True))
    weights = []
    for layer in range(layers):
        for _ in range(D):
            n_in = I if layer == 0 else D * H
            weights += [torch.randn(G * H, n_in), torch.randn(G * H, H), torch.randn(G * H),
                        torch.randn(G * H)]
    weights = [(0.5 * w).requires_grad_() for w in weights]
    mask = torch.ops.discrnn.pack(torch.randint(0, 2, (3 * B, 8), dtype=torch.uint8), 1)
    clip = 8.0 if cell == "lstm" else math.inf
    return (x, states, weights, [mask], cell, [B] * 3, 64, 6, 2, layers, True, True, False, "code",
            clip, 0.5, "torch", keep)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck(cell):
    """torch.library.opcheck: schema (no mutation, no aliasing), autograd registration, the fake
    implementation against the real one, and AOTAutograd with dynamic shapes (forward and
    backward) on a 2-layer bidirectional stack with a dropout mask; the backward op and the pack
    op too."""
    args = _op_args(cell)
    torch.library.opcheck(torch.ops.discrnn.rnn_stack.default, args)
    y, finals, _, saved = torch.ops.discrnn.rnn_stack(*args)
    x, states, weights, masks, *config, _ = args
    dstates = [torch.randn_like(f) for f in finals[: len(states)]]
    needs = [True] * (1 + len(states) + len(weights))
    torch.library.opcheck(torch.ops.discrnn.rnn_stack_backward.default,
                          (x, states, weights, masks, saved, torch.randn_like(y), dstates, *config,
                           needs),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.discrnn.pack.default,
                          (torch.randint(0, 64, (13,), dtype=torch.uint8), 6))


@pytest.mark.parametrize("cls", CLASSES)
def test_eager_mode_keeps_the_autograd_functions(cls, monkeypatch):
    """Eager calls never reach the op (double backward needs the Functions), and a call under
    FakeTensorMode does, giving the shapes."""
    def fail(*args, **kwargs):
        raise AssertionError("eager mode ran the custom op")

    monkeypatch.setattr(compile_ops, "run_stack", fail)
    x = torch.randn(T, B, I, requires_grad=True)
    y, _ = cls(H, H, levels=64)(cls(I, H, levels=64)(x)[0])  # stacked single layers
    (g,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)  # the Functions' path
    g.square().sum().backward()
    assert x.grad is not None
    monkeypatch.undo()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = cls(I, H, num_layers=2, levels=64)
        monkeypatch.setattr(compile_ops, "run_stack", fail)
        with pytest.raises(AssertionError, match="eager mode ran the custom op"):
            fake(torch.randn(T, B, I))
        monkeypatch.undo()
        y, _ = fake(torch.randn(T, B, I))
    assert y.shape == (T, B, H)


# ---------------------------------------------------------------------------------------------
# The Triton step kernels inside the op


@pytest.mark.parametrize("cls", CLASSES)
def test_compiled_triton_backend_matches_eager(cls):
    """backend="triton" (under the interpreter without a GPU): the op runs the per-step Triton
    kernels; bit for bit against eager."""
    from discrnn.backend import triton_interpreting

    if not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    module = cls(I, H, num_layers=2, bidirectional=True, levels=64, chunk_size=2, backend="triton")
    x = torch.randn(T, B, I, requires_grad=True)
    hx = _initial(module)
    got = _run(module, torch.compile(module, fullgraph=True, backend="aot_eager"), x, hx)
    _assert_bitwise(module, got, _run(module, module, x, hx), hx)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", CLASSES)
def test_compiled_on_cuda_matches_eager(cls):
    """On a GPU: inductor, fullgraph, the default backend (the Triton step kernels inside the
    op); outputs, final states and gradients bit for bit."""
    torch.manual_seed(0)
    module = cls(32, 64, num_layers=2, bidirectional=True, levels=64, chunk_size=8, device="cuda")
    x = torch.randn(40, 8, 32, device="cuda", requires_grad=True)
    hx = _initial(module, batch=8, device="cuda")
    got = _run(module, torch.compile(module, fullgraph=True), x, hx)
    _assert_bitwise(module, got, _run(module, module, x, hx), hx)
