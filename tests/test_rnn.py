"""DiscreteLSTM / DiscreteGRU: output, final state and every gradient against a plain-autograd
reference of the same discrete cell; torch.nn parity with levels=None; memory actually kept."""

import copy
import gc
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from discrnn import DiscreteGRU, DiscreteLSTM
from discrnn.testing import reference_stack

# (atol, rtol) per dtype for outputs and gradients against the float64-free reference in the
# same dtype. float32: the reference sums gate terms in another order, which moves results by ulps
# and, rarely, a pre-activation across a level boundary; the loss is random, so grads are O(1).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-4)}


def report_worst(name, got, expected, k=3):
    diff = (got.double() - expected.double()).abs().flatten()
    idx = diff.topk(min(k, diff.numel())).indices
    return f"{name}: worst |diff| {[f'{float(diff[i]):.3g}' for i in idx]} at {idx.tolist()}"


def assert_close_all(names, got, expected, dtype):
    atol, rtol = TOL[dtype]
    for name, a, b in zip(names, got, expected):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        ok = torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)
        assert ok, report_worst(name, a, b)


def make_inputs(module, T, B, dtype, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    D = (2 if module.bidirectional else 1) * module.num_layers
    P = module.proj_size or module.hidden_size
    x = torch.randn(T, B, module.input_size, generator=g, dtype=dtype).requires_grad_()
    h0 = (0.5 * torch.randn(D, B, P, generator=g, dtype=dtype)).requires_grad_()
    if isinstance(module, DiscreteLSTM):
        c0 = torch.randn(D, B, module.hidden_size, generator=g, dtype=dtype).requires_grad_()
        return x, (h0, c0), [x, h0, c0]
    return x, h0, [x, h0]


def one_loss(y, hx_out, seed=1):
    """(y * dy).sum() + (h_T * dh_T).sum() [+ (c_T * dc_T).sum()] with fixed random weights."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    outs = [y, *(hx_out if isinstance(hx_out, tuple) else (hx_out,))]
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)


def check_against_reference(module, T, B, dtype, levels):
    module = module.to(dtype)
    x, hx, leaves = make_inputs(module, T, B, dtype)
    params = list(module.parameters())
    y, hx_out = module(x, hx)
    grads = torch.autograd.grad(one_loss(y, hx_out), leaves + params)
    assert module.levels == levels
    y_ref, hx_ref = reference_stack(module, x, hx)
    grads_ref = torch.autograd.grad(one_loss(y_ref, hx_ref), leaves + params)
    outs = [y, *(hx_out if isinstance(hx_out, tuple) else (hx_out,))]
    outs_ref = [y_ref, *(hx_ref if isinstance(hx_ref, tuple) else (hx_ref,))]
    names = ["output", "h_n", "c_n"][: len(outs)]
    assert_close_all(names, outs, outs_ref, dtype)
    grad_names = ["d_input", "d_h0", "d_c0"][: len(leaves)] + [n for n, _ in module.named_parameters()]
    assert_close_all(grad_names, grads, grads_ref, dtype)
    assert all(float(g.abs().sum()) > 0 for g in grads), "a gradient is identically zero"


@pytest.mark.parametrize("grad", ["code", "exact"])
@pytest.mark.parametrize("levels", [2, 64, 256])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_lstm_matches_reference_float64(levels, proj_size, grad):
    module = DiscreteLSTM(5, 7, proj_size=proj_size, levels=levels, chunk_size=4, grad=grad)
    check_against_reference(module, T=11, B=3, dtype=torch.float64, levels=levels)


@pytest.mark.parametrize("grad", ["code", "exact"])
@pytest.mark.parametrize("levels", [3, 64])
def test_lstm_cell_clip_matches_reference_float64(levels, grad):
    """A small cell_clip, so that the clamp is active on many steps and units (forward, the rebuilt
    c_t in backward, and the gradient that stops where it clamps)."""
    torch.manual_seed(1)
    module = DiscreteLSTM(5, 7, levels=levels, chunk_size=4, grad=grad, cell_clip=0.5)
    with torch.no_grad():
        module.bias_ih_l0[7:14] += 3.0  # forget gates near 1: c runs into the clamp
    check_against_reference(module, T=11, B=3, dtype=torch.float64, levels=levels)
    x, hx, _ = make_inputs(module, 11, 3, torch.float64)
    c_all = module(x, hx)[1][1]
    assert float(c_all.detach().abs().max()) == 0.5


@pytest.mark.parametrize("grad", ["code", "exact"])
@pytest.mark.parametrize("levels", [2, 64, 256])
def test_gru_matches_reference_float64(levels, grad):
    module = DiscreteGRU(5, 7, levels=levels, chunk_size=4, grad=grad)
    check_against_reference(module, T=11, B=3, dtype=torch.float64, levels=levels)


@pytest.mark.parametrize("grad", ["code", "exact"])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_multilayer_bidirectional_float64(cls, grad):
    module = cls(4, 6, num_layers=3, bidirectional=True, levels=64, chunk_size=3, grad=grad)
    check_against_reference(module, T=9, B=2, dtype=torch.float64, levels=64)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_grad_modes_differ(cls):
    """grad="exact" and grad="code" give the same forward pass and different gate gradients
    (so a layer that ignored ``grad`` would fail here)."""
    torch.manual_seed(0)
    module = cls(5, 7, levels=16, chunk_size=4).double()
    x, hx, leaves = make_inputs(module, 9, 3, torch.float64)
    results = {}
    for grad in ("code", "exact"):
        module.grad = grad
        y, hx_out = module(x, hx)
        results[grad] = (y, torch.autograd.grad(one_loss(y, hx_out), leaves + list(module.parameters())))
    assert torch.equal(results["code"][0], results["exact"][0])
    assert not torch.allclose(results["code"][1][0], results["exact"][1][0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_float32_matches_reference(cls):
    torch.manual_seed(0)
    module = cls(6, 16, num_layers=2, levels=256, chunk_size=8)
    check_against_reference(module, T=20, B=4, dtype=torch.float32, levels=256)


def test_lstm_proj_bidirectional_multilayer_float64():
    module = DiscreteLSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2, levels=16, chunk_size=5)
    check_against_reference(module, T=7, B=3, dtype=torch.float64, levels=16)


@pytest.mark.parametrize("cls, torch_cls", [(DiscreteLSTM, nn.LSTM), (DiscreteGRU, nn.GRU)])
def test_levels_none_is_torch(cls, torch_cls):
    torch.manual_seed(0)
    ours = cls(5, 8, num_layers=2, bidirectional=True, levels=None)
    theirs = torch_cls(5, 8, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 3, 5)
    y1, h1 = ours(x)
    y2, h2 = theirs(x)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    (y1.sum()).backward()
    (y2.sum()).backward()
    for (n, p1), p2 in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("cls, torch_cls", [(DiscreteLSTM, nn.LSTM), (DiscreteGRU, nn.GRU)])
def test_state_dict_and_init_like_torch(cls, torch_cls):
    kwargs = dict(num_layers=2, bidirectional=True)
    if cls is DiscreteLSTM:
        kwargs["proj_size"] = 3
    ours = cls(5, 8, levels=64, **kwargs)
    theirs = torch_cls(5, 8, **kwargs)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
        assert float(p1.detach().abs().max()) <= 1 / 8**0.5  # uniform(-1/sqrt(H), 1/sqrt(H)) as torch
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_batch_first_and_unbatched(cls):
    torch.manual_seed(0)
    module = cls(4, 6, levels=32)
    bf = cls(4, 6, levels=32, batch_first=True)
    bf.load_state_dict(module.state_dict())
    x = torch.randn(5, 3, 4)
    y, hx = module(x)
    y_bf, hx_bf = bf(x.transpose(0, 1))
    torch.testing.assert_close(y_bf.transpose(0, 1), y, atol=0, rtol=0)
    y1, hx1 = module(x[:, 1])  # unbatched [T, I]
    torch.testing.assert_close(y1, y[:, 1], atol=0, rtol=0)
    h_one = hx1[0] if isinstance(hx1, tuple) else hx1
    h_all = hx[0] if isinstance(hx, tuple) else hx
    assert h_one.shape == (1, 6)
    torch.testing.assert_close(h_one, h_all[:, 1], atol=0, rtol=0)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_matches_per_sequence_runs(cls, bidirectional):
    torch.manual_seed(0)
    module = cls(3, 5, num_layers=2, bidirectional=bidirectional, levels=64, chunk_size=2).double()
    lengths = [4, 7, 2, 7, 5]
    T, B = max(lengths), len(lengths)
    x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, hx = module(packed)
    y, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    loss = one_loss(y, hx)
    (gx,) = torch.autograd.grad(loss, x)
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    dy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    dh = torch.randn((hx[0] if isinstance(hx, tuple) else hx).shape, generator=g, dtype=y.dtype)
    dc = torch.randn(hx[1].shape, generator=g, dtype=y.dtype) if isinstance(hx, tuple) else None
    for b, n in enumerate(lengths):
        xb = x[:n, b].detach().requires_grad_()
        yb, hxb = module(xb)
        torch.testing.assert_close(yb, y[:n, b], atol=1e-12, rtol=0)
        assert (y[n:, b] == 0).all()
        hb = hxb[0] if isinstance(hxb, tuple) else hxb
        h_all = hx[0] if isinstance(hx, tuple) else hx
        torch.testing.assert_close(hb, h_all[:, b], atol=1e-12, rtol=0)
        loss_b = (yb * dy[:n, b]).sum() + (hb * dh[:, b]).sum()
        if dc is not None:
            loss_b = loss_b + (hxb[1] * dc[:, b]).sum()
        (gb,) = torch.autograd.grad(loss_b, xb)
        torch.testing.assert_close(gb, gx[:n, b], atol=1e-10, rtol=1e-10)
        assert (gx[n:, b] == 0).all()


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_packed_sequence_sorted_with_initial_state(cls):
    module = cls(3, 5, levels=64)
    x = torch.randn(4, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([4, 3, 1]))  # enforce_sorted=True
    h0 = torch.randn(1, 3, 5)
    hx = (h0, torch.randn(1, 3, 5)) if cls is DiscreteLSTM else h0
    out, _ = module(packed, hx)
    y, _ = pad_packed_sequence(out)
    torch.testing.assert_close(y[:, 0], module(x[:, 0], tuple(h[:, 0] for h in hx) if cls is DiscreteLSTM else h0[:, 0])[0])


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_dropout_between_layers(cls):
    torch.manual_seed(0)
    module = cls(4, 6, num_layers=2, dropout=0.5, levels=64)
    x = torch.randn(5, 2, 4, requires_grad=True)
    module.eval()
    y_eval, _ = module(x)
    torch.testing.assert_close(module(x)[0], y_eval, atol=0, rtol=0)
    module.train()
    torch.manual_seed(1)
    y1, _ = module(x)
    torch.manual_seed(1)
    y2, _ = module(x)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)  # reproducible under a seed
    assert not torch.equal(y1, y_eval)
    y1.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # p = 1 drops everything: the second layer sees zeros
    module.dropout = 1.0
    y, _ = module(x)
    single = cls(6, 6, levels=64)
    single.load_state_dict({k.replace("_l1", "_l0"): v for k, v in module.state_dict().items() if "_l1" in k})
    torch.testing.assert_close(y, single(torch.zeros(5, 2, 6))[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_half_precision_runs_and_tracks_float32(cls, dtype):
    torch.manual_seed(0)
    module = cls(8, 16, levels=64)
    x = torch.randn(12, 4, 8)
    y32, _ = module(x)
    half = cls(8, 16, levels=64).to(dtype)
    half.load_state_dict(module.state_dict())
    xh = x.to(dtype).requires_grad_()
    y, hx = half(xh)
    assert y.dtype == dtype
    one_loss(y, hx).backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in half.parameters())
    # a few pre-activations land on other levels in half precision; the bulk agrees
    agree = ((y.float() - y32).abs() <= 2 / 63 + 1e-2).float().mean()
    assert agree > 0.9


# ---------------------------------------------------------------------------------------------
# Memory


def kept_bytes(module, x, hx):
    """Bytes of every distinct storage autograd keeps for backward, minus the input x and the
    parameters (which exist anyway)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = module(x, hx)
    excluded = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in excluded), y


@pytest.mark.parametrize(
    "cls, levels, budget",
    [(DiscreteLSTM, 64, 3.25), (DiscreteLSTM, 256, 4.25), (DiscreteGRU, 64, 3.5), (DiscreteGRU, 256, 4.5)],
)
def test_bytes_kept_per_step_and_unit(cls, levels, budget):
    T, B, H = 256, 8, 64
    module = cls(16, H, levels=levels)
    x = torch.randn(T, B, 16, requires_grad=True)
    kept, y = kept_bytes(module, x, None)
    per_unit = kept / (T * B * H)
    assert per_unit <= budget, f"{cls.__name__} at L={levels} keeps {per_unit:.3f} B per step x unit"
    # and more than the codes alone: the test counts real storage
    codes_only = 4 * (levels - 1).bit_length() / 8  # LSTM: i, f, g, o; GRU: r, z, n, h
    assert per_unit >= codes_only


@pytest.mark.parametrize("cls, preacts", [(DiscreteLSTM, 4), (DiscreteGRU, 3)])
def test_exact_grad_keeps_the_preactivations_as_well(cls, preacts):
    """grad="exact" keeps the codes plus the gate pre-activations in float32, nothing else."""
    T, B, H = 64, 4, 32
    x = torch.randn(T, B, 16, requires_grad=True)
    kept = {}
    for grad in ("code", "exact"):
        torch.manual_seed(0)
        kept[grad], _ = kept_bytes(cls(16, H, levels=64, grad=grad), x, None)
    assert kept["exact"] - kept["code"] == T * B * H * preacts * 4


@pytest.mark.parametrize(
    "cls, levels, budget",
    [(DiscreteLSTM, 64, 3.25), (DiscreteLSTM, 100, 3.75), (DiscreteLSTM, 256, 4.25),
     (DiscreteGRU, 64, 3.5), (DiscreteGRU, 256, 4.5)],
)
def test_bytes_kept_triton_path(cls, levels, budget):
    """The Triton step kernels pack into the same code store as the torch path: the same bytes are
    kept, within the same budget (a shorter sequence, for the interpreter; one checkpoint).
    ``pytest -s`` prints the figures the README quotes."""
    T, B, H = 64, 8, 64
    x = torch.randn(T, B, 16, requires_grad=True)
    kept = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        kept[backend], _ = kept_bytes(cls(16, H, levels=levels, backend=backend), x, None)
    per_unit = kept["triton"] / (T * B * H)
    print(f"{cls.__name__} L={levels}: {per_unit:.3f} B per step x unit on both paths")
    assert kept["triton"] == kept["torch"]
    codes_only = 4 * (levels - 1).bit_length() / 8  # LSTM: i, f, g, o; GRU: r, z, n, h
    assert codes_only <= per_unit <= budget, f"{per_unit:.3f} B per step x unit"


@pytest.mark.parametrize("cls, budget", [(DiscreteLSTM, 3.25), (DiscreteGRU, 3.5)])
def test_stacked_layers_keep_inner_outputs_as_codes(cls, budget):
    T, B, H = 128, 4, 32
    module = cls(16, H, num_layers=3, bidirectional=True, dropout=0.25, levels=64)
    x = torch.randn(T, B, 16, requires_grad=True)
    kept, y = kept_bytes(module, x, None)
    per_unit = kept / (T * B * H * 3 * 2)  # per layer and direction
    # + the two 1-bit dropout masks over 2H features: 2 * 2H / 8 bytes per row, over 6 layer-dirs
    assert per_unit <= budget + 2 * (2 * H / 8) / (H * 6), f"{per_unit:.3f} B per step x unit"
    y.sum().backward()
    assert x.grad is not None


def test_torch_lstm_keeps_far_more():
    # on the CPU, where torch.nn.LSTM's saved tensors are visible to the hooks (cuDNN's are opaque)
    T, B, H = 64, 8, 64
    x = torch.randn(T, B, 16, requires_grad=True, device="cpu")
    kept_torch, _ = kept_bytes(nn.LSTM(16, H, device="cpu"), x, None)
    kept_ours, _ = kept_bytes(DiscreteLSTM(16, H, levels=64, device="cpu"), x, None)
    assert kept_torch / (T * B * H) > 40
    assert kept_ours * 10 < kept_torch


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input():
    lstm = DiscreteLSTM(4, 6, levels=64)
    gru = DiscreteGRU(4, 6, levels=64)
    x = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match=r"input must have 4 features \(input_size\), got 3"):
        lstm(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="input must be 2-D .* or 3-D, got shape"):
        gru(torch.randn(5))
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        lstm(torch.zeros(5, 2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="input must have dtype torch.float32 like the parameters, got torch.float64"):
        lstm(x.double())
    with pytest.raises(ValueError, match=r"hx \(h_0\) must have shape \(1, 2, 6\), got \(1, 3, 6\)"):
        lstm(x, (torch.zeros(1, 3, 6), torch.zeros(1, 2, 6)))
    with pytest.raises(ValueError, match=r"hx \(c_0\) must have shape \(1, 2, 6\), got \(1, 2, 5\)"):
        lstm(x, (torch.zeros(1, 2, 6), torch.zeros(1, 2, 5)))
    with pytest.raises(TypeError, match=r"hx \(h_0\) must have dtype torch.float32"):
        gru(x, torch.zeros(1, 2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        lstm(x, torch.zeros(1, 2, 6))
    with pytest.raises(ValueError, match="hx must be 3-D for batched input"):
        gru(x, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="zero-length sequence"):
        lstm(torch.randn(0, 2, 4))
    with pytest.raises(ValueError, match=r"levels must be in \[2, 256\], got 300"):
        DiscreteLSTM(4, 6, levels=300)
    with pytest.raises(TypeError, match="hidden_size must be an integer"):
        DiscreteGRU(4, 6.0)
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        DiscreteGRU(4, 6, chunk_size=0)
    with pytest.raises(ValueError, match="DiscreteGRU: proj_size must be 0"):
        DiscreteGRU(4, 6, proj_size=2)


def test_devices_must_match():
    lstm = DiscreteLSTM(4, 6, levels=64)
    x = torch.randn(5, 2, 4, device="meta")
    with pytest.raises(ValueError, match="input must be on .* like the parameters, got meta"):
        lstm(x)
    with pytest.raises(ValueError, match=r"hx \(h_0\) must be on .* like the input, got meta"):
        lstm(torch.randn(5, 2, 4), (torch.zeros(1, 2, 6, device="meta"), torch.zeros(1, 2, 6)))


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_nan_input(cls):
    module = cls(4, 6, levels=64)
    x = torch.randn(5, 2, 4)
    x[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="expected finite values, got NaN or Inf in input"):
        module(x)
    module.check_finite = False
    y, _ = module(x)
    # documented: a NaN pre-activation encodes as code 0, the lowest level. LSTM: i = f = o = 0 and
    # g = -1, so c and h of that row reset to 0; GRU: r = z = 0 and n = -1, so h resets to -1.
    assert torch.isfinite(y).all()
    assert (y[2, 1] == (0 if cls is DiscreteLSTM else -1)).all()
    with torch.no_grad():
        module.weight_hh_l0[0, 0] = float("inf")
    module.check_finite = True
    with pytest.raises(ValueError, match="weight_hh_l0"):
        module(torch.randn(5, 2, 4))


@pytest.mark.parametrize("scan", [True, False], ids=["one-call-scan", "aten"])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_value_check_names_every_bad_tensor(monkeypatch, cls, scan):
    """check_finite names every tensor holding NaN or an infinity (input, states, weights of any
    layer) and no other, through the extension's one-call scan (CPU float32 layers) and through
    aten calls alike."""
    from discrnn.kernels import rnn_cpu

    if scan and rnn_cpu.finite_scan() is None:
        pytest.skip("no fused CPU kernels here (no compiler, or switched off)")
    if not scan:
        monkeypatch.setattr(rnn_cpu, "finite_scan", lambda: None)
    scanned = []
    real_scan = rnn_cpu.finite_scan

    def spy():
        module = real_scan()
        scanned.append(module is not None)
        return module

    monkeypatch.setattr(rnn_cpu, "finite_scan", spy)
    torch.manual_seed(0)
    module = cls(4, 6, levels=64, num_layers=2)
    x = torch.randn(5, 2, 4)
    x[1, 0, 2] = float("inf")
    with torch.no_grad():
        module.weight_hh_l0[2, 3] = float("nan")
        module.bias_ih_l1[0] = float("-inf")
    hx = torch.zeros(2, 2, 6)
    if cls is DiscreteLSTM:
        c0 = torch.zeros(2, 2, 6)
        c0[1, 1, 5] = float("nan")
        hx = (hx, c0)
    with pytest.raises(ValueError, match="expected finite values") as info:
        module(x, hx)
    message = str(info.value)
    bad = ["input", "weight_hh_l0", "bias_ih_l1"] + (["hx (c_0)"] if cls is DiscreteLSTM else [])
    for name in bad:
        assert name in message
    for name in ("weight_ih_l0", "weight_hh_l1", "bias_hh_l0", "hx (h_0)"):
        assert name not in message
    assert scanned and all(s == scan for s in scanned)
    with torch.no_grad():  # mended: the layer runs
        module.weight_hh_l0[2, 3] = 0.0
        module.bias_ih_l1[0] = 0.0
    x[1, 0, 2] = 0.0
    module(x)


# ---------------------------------------------------------------------------------------------
# Packed state: streaming and truncated BPTT


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (DiscreteLSTM, {}),
        (DiscreteLSTM, {"num_layers": 2, "bidirectional": False, "proj_size": 3}),
        (DiscreteGRU, {}),
        (DiscreteGRU, {"num_layers": 2}),
    ],
)
def test_streaming_in_pieces_equals_one_call(cls, kwargs):
    torch.manual_seed(0)
    module = cls(4, 6, levels=64, **kwargs)
    x = torch.randn(23, 3, 4)
    with torch.no_grad():
        y_full, state_full = module(x, packed_state=True)
        pieces, state = [], None
        for lo in range(0, 23, 5):
            y, state = module(x[lo : lo + 5], state, packed_state=True)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces), y_full, atol=0, rtol=0)
    for name in ("h", "o", "u"):
        a, b = getattr(state, name), getattr(state_full, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.data, b.data)
    if state.c is not None:
        torch.testing.assert_close(state.c, state_full.c, atol=0, rtol=0)
    # the float final state and the packed one describe the same h
    y_f, hx_f = module(x)
    h_float = hx_f[0] if isinstance(hx_f, tuple) else hx_f
    h_from_state = module._state_to_tensors(state_full, torch.float32)[0]
    torch.testing.assert_close(h_from_state, h_float.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_packed_final_state_built_only_when_wanted(monkeypatch, cls):
    """A call that returns float states builds no packed final state (no final codes, no copy of
    the LSTM's cell state: small tensors whose frees fragment the heap under checkpointing); the
    outputs, float states and gradients are the same bits either way, and a packed state asked
    for is the one it always was."""
    from discrnn.lstm_function import LSTMLayerFunction
    from discrnn.gru_function import GRULayerFunction

    function = LSTMLayerFunction if cls is DiscreteLSTM else GRULayerFunction
    seen = []
    real_apply = function.apply

    def spy(*args):
        out = real_apply(*args)
        seen.append([t.numel() for t in out[4 if cls is DiscreteLSTM else 3:]])
        return out

    monkeypatch.setattr(function, "apply", spy)
    torch.manual_seed(0)
    module = cls(4, 6, levels=64, num_layers=2)
    x = torch.randn(9, 3, 4, requires_grad=True)
    results, states = {}, {}
    for packed in (False, True):
        seen.clear()
        y, state = module(x, packed_state=packed)
        if packed:
            state = module._state_to_tensors(state, torch.float32)
        states[packed] = [t.detach() for t in (state if isinstance(state, tuple) else (state,))]
        results[packed] = [y, *torch.autograd.grad(y.sum(), [x, *module.parameters()])]
        wanted = [2 * 3 * 6, 3 * 6] if cls is DiscreteLSTM else [3 * 6]
        assert seen == [wanted if packed else [0] * len(wanted)] * 2
    for a, b in zip(results[False] + states[False], results[True] + states[True]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_truncated_bptt_with_packed_state(cls):
    torch.manual_seed(0)
    module = cls(4, 8, levels=64)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(40, 2, 4)
    state = None
    for lo in range(0, 40, 10):
        y, state = module(x[lo : lo + 10], state, packed_state=True)
        assert state.c is None or not state.c.requires_grad
        y.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert state.shape == (1, 2, 8)
    expected = 2 * 2 * 8 * 6 // 8 + 2 * 8 * 4 if cls is DiscreteLSTM else 2 * 8 * 6 // 8
    assert state.nbytes == expected


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_inference_keeps_no_codes(cls, monkeypatch):
    """Under torch.no_grad and inference_mode nothing is saved and no code buffer is even made
    (the layer Functions' needs_input_grad says True there: the parameters require grad)."""
    from discrnn.rnn_function import CodeStore

    module = cls(4, 8, levels=64, num_layers=2)
    x = torch.randn(50, 2, 4)
    buffers = []
    new_buffer = CodeStore.new_buffer
    monkeypatch.setattr(CodeStore, "new_buffer", lambda self: buffers.append(1) or new_buffer(self))
    for mode in (torch.no_grad, torch.inference_mode):
        saved = []
        with mode(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                              lambda t: t):
            module(x)
        assert saved == []
    assert buffers == []
    module(x)[0].sum().backward()  # with a graph: one buffer per layer
    assert len(buffers) == 2


def test_packed_state_errors():
    lstm, gru = DiscreteLSTM(4, 6, levels=64), DiscreteGRU(4, 6, levels=64)
    x = torch.randn(5, 2, 4)
    _, gru_state = gru(x, packed_state=True)
    _, lstm_state = lstm(x, packed_state=True)
    with pytest.raises(TypeError, match="hx is a GRU PackedRNNState, expected one for LSTM"):
        lstm(x, gru_state)
    with pytest.raises(ValueError, match="hx has levels=64, expected levels=16"):
        DiscreteGRU(4, 6, levels=16)(x, gru_state)
    with pytest.raises(ValueError, match="hx holds a batch of 2, the input a batch of 3"):
        gru(torch.randn(5, 3, 4), gru_state)
    with pytest.raises(ValueError, match="levels=None"):
        DiscreteGRU(4, 6, levels=None)(x, packed_state=True)
    assert "mode='LSTM'" in repr(lstm_state)


# ---------------------------------------------------------------------------------------------
# The chunked torch path: bit-identical forward, same gradients as the per-step path


def _codec_lstm_step(gates, c_prev, levels):
    """The LSTM step written directly with the codec's encode/decode, one gate plane at a time."""
    from discrnn.kernels.codec_torch import torch_decode, torch_encode

    acc, H = c_prev.dtype, c_prev.shape[1]
    pre = gates.to(acc)
    kinds = ("sigmoid", "sigmoid", "tanh", "sigmoid")
    codes = torch.zeros(5, *c_prev.shape, dtype=torch.uint8)
    for q, kind in enumerate(kinds):
        z = pre[:, q * H : (q + 1) * H]
        codes[q] = torch_encode(torch.tanh(z) if kind == "tanh" else torch.sigmoid(z), levels, kind)
    i, f, g, o = (torch_decode(codes[q], levels, kinds[q], acc) for q in range(4))
    c = f * c_prev + i * g
    codes[4] = torch_encode(torch.tanh(c), levels, "tanh")
    return codes, c, o * torch_decode(codes[4], levels, "tanh", acc)


def _codec_gru_step(gx, gh, h_prev, levels):
    from discrnn.kernels.codec_torch import torch_decode, torch_encode

    acc = torch.float64 if h_prev.dtype == torch.float64 else torch.float32
    gx, gh, h_prev = gx.to(acc), gh.to(acc), h_prev.to(acc)
    H = h_prev.shape[1]
    codes = torch.zeros(4, *h_prev.shape, dtype=torch.uint8)
    codes[0] = torch_encode(torch.sigmoid(gx[:, :H] + gh[:, :H]), levels, "sigmoid")
    codes[1] = torch_encode(torch.sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H]), levels, "sigmoid")
    r, z = (torch_decode(codes[q], levels, "sigmoid", acc) for q in range(2))
    codes[2] = torch_encode(torch.tanh(gx[:, 2 * H :] + r * gh[:, 2 * H :]), levels, "tanh")
    n = torch_decode(codes[2], levels, "tanh", acc)
    codes[3] = torch_encode((1.0 - z) * n + z * h_prev, levels, "tanh")
    return codes, torch_decode(codes[3], levels, "tanh", acc)


@pytest.mark.parametrize("levels", [2, 3, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_step_math_bit_identical_to_codec(levels, dtype):
    """rnn_torch's fused steps (all gate planes encoded in one pass, decode without the codec,
    no clamp for activations) give the codec's codes and values bit for bit, NaN and Inf included."""
    from discrnn.kernels import rnn_torch

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(levels)
    for bs, H in [(1, 1), (3, 7), (16, 33), (5, 256)]:
        gates = (4 * torch.randn(bs, 4 * H, generator=g, dtype=torch.float64)).to(dtype)
        gates[0, 0], gates[-1, -1] = float("nan"), float("inf")
        c_prev = 2 * torch.randn(bs, H, generator=g, dtype=acc)
        c_prev[-1, 0] = float("-inf")
        final = torch.empty(2, bs, H, dtype=torch.uint8)  # o, u of every row
        codes, c, m = rnn_torch.lstm_step_forward(gates, c_prev, levels, final=final)
        ref_codes, ref_c, ref_m = _codec_lstm_step(gates, c_prev, levels)
        assert torch.equal(codes, ref_codes[:4])  # i, f, g, o kept; u only in the final state
        assert torch.equal(final, ref_codes[3:5])
        for got, expected in ((c, ref_c), (m, ref_m)):
            assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))
        gx = (3 * torch.randn(bs, 3 * H, generator=g, dtype=torch.float64)).to(dtype)
        gh = torch.randn(bs, 3 * H, generator=g, dtype=torch.float64).to(dtype)
        h_prev = (3 * torch.rand(bs, H, generator=g, dtype=torch.float64) - 1.5).to(dtype)
        gx[0, -1], h_prev[-1, 0] = float("nan"), float("inf")
        for got, expected in zip(rnn_torch.gru_step_forward(gx, gh, h_prev, levels),
                                 _codec_gru_step(gx, gh, h_prev, levels)):
            assert torch.equal(got, expected)


class _StepwiseTorchOps:
    """The torch step math under other function objects: the layers do not recognise it as the
    torch backend and run their per-step path (one ``ops`` call per step) with it."""

    from discrnn.kernels import codec_torch as _codec
    from discrnn.kernels import rnn_torch as _steps

    lstm_step_forward = staticmethod(lambda *a, **k: _StepwiseTorchOps._steps.lstm_step_forward(*a, **k))
    lstm_recompute_cell = staticmethod(lambda *a, **k: _StepwiseTorchOps._steps.lstm_recompute_cell(*a, **k))
    lstm_output = staticmethod(lambda *a, **k: _StepwiseTorchOps._steps.lstm_output(*a, **k))
    lstm_step_backward = staticmethod(lambda *a, **k: _StepwiseTorchOps._steps.lstm_step_backward(*a, **k))
    gru_step_forward = staticmethod(lambda *a, **k: _StepwiseTorchOps._steps.gru_step_forward(*a, **k))
    gru_output = staticmethod(lambda *a, **k: _StepwiseTorchOps._steps.gru_output(*a, **k))
    gru_step_backward = staticmethod(lambda *a, **k: _StepwiseTorchOps._steps.gru_step_backward(*a, **k))
    pack = staticmethod(lambda *a: _StepwiseTorchOps._codec.torch_pack(*a))
    unpack = staticmethod(lambda *a: _StepwiseTorchOps._codec.torch_unpack(*a))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ops", ["triton", "stepwise-torch"])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_low_precision_step_grads_keep_the_bits(monkeypatch, cls, ops, dtype):
    """A bf16 / fp16 layer's per-step backward product reads its operand rounded by the step
    function, and the LSTM keeps dh in that dtype between steps
    (rnn_function.LOW_PRECISION_STEP_GRADS): outputs and every gradient bit for bit as through
    float32 buffers with a cast before and after each product. Packed batches (rows join as
    backward goes), two bidirectional layers, carried states."""
    import discrnn.rnn as rnn_module
    from discrnn import rnn_function

    if ops == "stepwise-torch":
        monkeypatch.setattr(rnn_module, "_step_ops", lambda backend: _StepwiseTorchOps)
    torch.manual_seed(0)
    module = cls(5, 9, num_layers=2, bidirectional=True, levels=64, chunk_size=3,
                 backend="triton" if ops == "triton" else None).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 5, generator=g).to(dtype).requires_grad_()
    hx = tuple((0.9 * torch.rand(4, 4, 9, generator=g) - 0.45).to(dtype).requires_grad_()
               for _ in range(2 if cls is DiscreteLSTM else 1))
    hx = hx if cls is DiscreteLSTM else hx[0]
    lengths = torch.tensor([5, 8, 2, 8])
    results = {}
    for on in (True, False):
        monkeypatch.setattr(rnn_function, "LOW_PRECISION_STEP_GRADS", on)
        outs, _, grads = _run_for_paths(module, x, hx, lengths)
        results[on] = outs + grads
    names = ["output", "h_n", "c_n", "d_input", "d_h0", "d_c0"] if cls is DiscreteLSTM else [
        "output", "h_n", "d_input", "d_h0"]
    names += [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, results[True], results[False]):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def _run_for_paths(module, x, hx, lengths, seed=3):
    """Outputs, packed final state and gradients of one call (packed input when ``lengths``)."""
    params = list(module.parameters())
    leaves = [x] + [h for h in (hx if isinstance(hx, tuple) else (hx,))]
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, hx_out = module(inp, hx)
    y = pad_packed_sequence(out)[0] if lengths is not None else out
    outs = [y, *(hx_out if isinstance(hx_out, tuple) else (hx_out,))]
    grads = torch.autograd.grad(one_loss(y, hx_out, seed), leaves + params)
    with torch.no_grad():
        _, state = module(inp, hx, packed_state=True)
    packed = [t.data for t in (state.h, state.o, state.u) if t is not None]
    packed += [state.c] if state.c is not None else []
    return [o.detach() for o in outs], packed, list(grads)


@pytest.mark.parametrize(
    "cls, kwargs, chunk, packed, dtype",
    [
        (DiscreteLSTM, dict(num_layers=2, bidirectional=True), 3, True, torch.float64),
        (DiscreteLSTM, dict(proj_size=3, bidirectional=True), 4, True, torch.float64),
        (DiscreteLSTM, dict(num_layers=2, dropout=0.3), 1, False, torch.float32),
        (DiscreteLSTM, dict(bidirectional=True), 50, True, torch.float32),
        (DiscreteLSTM, dict(proj_size=4), 5, False, torch.bfloat16),
        (DiscreteGRU, dict(num_layers=2, bidirectional=True), 3, True, torch.float64),
        (DiscreteGRU, dict(num_layers=2, dropout=0.3), 1, False, torch.float32),
        (DiscreteGRU, dict(bidirectional=True), 50, True, torch.float32),
        (DiscreteGRU, dict(), 4, False, torch.bfloat16),
        (DiscreteLSTM, dict(bidirectional=True, grad="exact"), 3, True, torch.float64),
        (DiscreteLSTM, dict(proj_size=4, grad="exact"), 5, False, torch.bfloat16),
        (DiscreteGRU, dict(bidirectional=True, grad="exact"), 3, True, torch.float64),
        (DiscreteGRU, dict(grad="exact"), 4, False, torch.bfloat16),
    ],
)
def test_chunked_torch_path_matches_per_step_path(monkeypatch, cls, kwargs, chunk, packed, dtype):
    """The chunked torch path (whole-chunk decoding, per-step work cut to the recursion) against
    the per-step ops path with the same step math: outputs, final and packed states bit for bit;
    gradients to rounding. Packed batches make the active rows shrink (forward direction) and grow
    (reverse direction) between steps and inside chunks."""
    import discrnn.rnn as rnn_module

    torch.manual_seed(0)
    module = cls(5, 9, levels=64, chunk_size=chunk, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(1)
    T, B = 11, 5
    D = (2 if module.bidirectional else 1) * module.num_layers
    x = torch.randn(T, B, 5, generator=g).to(dtype).requires_grad_()
    h0 = (0.5 * torch.randn(D, B, module.proj_size or 9, generator=g)).to(dtype).requires_grad_()
    hx = h0
    if cls is DiscreteLSTM:
        hx = (h0, torch.randn(D, B, 9, generator=g).to(dtype).requires_grad_())
    lengths = torch.tensor([7, 11, 2, 11, 5]) if packed else None
    results = {}
    for path in ("chunked", "per-step"):
        if path == "per-step":
            monkeypatch.setattr(rnn_module, "_step_ops", lambda backend: _StepwiseTorchOps)
        torch.manual_seed(5)  # the same dropout masks
        results[path] = _run_for_paths(module, x, hx, lengths)
    (outs_a, packed_a, grads_a), (outs_b, packed_b, grads_b) = results["chunked"], results["per-step"]
    for a, b in zip(outs_a + packed_a, outs_b + packed_b):
        assert torch.equal(a, b)
    atol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    names = ["d_input", "d_h0", "d_c0"][: 1 + (2 if cls is DiscreteLSTM else 1)]
    names += [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=name)


# ---------------------------------------------------------------------------------------------
# The recurrent per-step products through oneDNN's prepacked linear (rnn_function.StepProduct)

_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
    reason="needs torch built with oneDNN",
)


@pytest.fixture
def always_packed(monkeypatch):
    """Prepack every CPU float32 / bfloat16 recurrent weight for oneDNN, however small or few the
    products (discrnn's own panel products off)."""
    from discrnn import rnn_function

    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", False)
    monkeypatch.setattr(rnn_function, "_MIN_PACKED_WEIGHT_BYTES", 0)
    monkeypatch.setattr(rnn_function, "_MIN_PACKED_PRODUCTS", 1)


@_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_product_matches_torch_products(monkeypatch, always_packed, dtype):
    """Every product of StepProduct against torch's: bit for bit in bfloat16 (the same oneDNN
    kernels), to float32 rounding in float32 (MKL sums in another order); the product dtype rules
    (a cast to W's dtype, a rounded product added in the accumulator's dtype) as torch's."""
    from discrnn import rnn_function
    from discrnn.rnn_function import StepProduct

    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 kernels for this CPU (AVX-512 needed)")
    monkeypatch.setattr(rnn_function, "WIDEN_LOW_PRECISION_PRODUCTS", False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 20, generator=g).to(dtype)
    prod = StepProduct(w, 16, 100)
    assert prod.packed is not None

    def check(got, expected):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if dtype == torch.bfloat16:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    for rows in (16, 5, 1):
        a = torch.randn(rows, 20, generator=g)
        c = torch.randn(rows, 48, generator=g)
        a_w, c_w = a.to(dtype), c.to(dtype)
        check(prod.mm(a_w), a_w @ w.t())
        check(prod.mm(a), a.to(dtype) @ w.t())  # a is cast to W's dtype
        out = torch.empty(rows, 48, dtype=dtype)
        assert prod.mm(a_w, out=out) is out
        check(out, a_w @ w.t())
        check(prod.addmm(c_w, a_w), torch.addmm(c_w, a_w, w.t()))
        out = torch.empty(rows, 48, dtype=dtype)
        assert prod.addmm(c_w, a_w, out=out) is out
        check(out, torch.addmm(c_w, a_w, w.t()))
        # a float32 accumulator with a bf16 weight: the product rounded to bf16, then added
        check(prod.addmm(c, a), c + (a.to(dtype) @ w.t()).float())
        acc = c.clone()
        prod.addmm_(acc, a)
        check(acc, c + (a.to(dtype) @ w.t()).float())


def test_step_product_falls_back_to_addmm(monkeypatch):
    """No oneDNN where it cannot or should not run: float64, small weights, few products, oneDNN
    disabled by torch.backends.mkldnn.flags, or switched off for a benchmark."""
    from discrnn import rnn_function
    from discrnn.rnn_function import StepProduct

    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", False)

    big = torch.randn(1024, 512)  # 2 MiB
    assert StepProduct(big.double(), 16, 512).packed is None
    assert StepProduct(big[:256], 16, 512).packed is None  # 0.5 MiB
    assert StepProduct(big, 16, 8).packed is None
    with torch.backends.mkldnn.flags(enabled=False):
        assert StepProduct(big, 16, 512).packed is None
    monkeypatch.setattr(rnn_function, "ONEDNN_STEP_PRODUCTS", False)
    assert StepProduct(big, 16, 512).packed is None
    monkeypatch.setattr(rnn_function, "ONEDNN_STEP_PRODUCTS", True)
    if torch.backends.mkldnn.is_available():
        assert StepProduct(big, 16, 512).packed is not None
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert StepProduct(torch.randn(2048, 512).bfloat16(), 16, 512).packed is not None


@pytest.mark.parametrize("route", ["addmm", "onednn", "panels"])
def test_widened_low_precision_products_round_a_float32_product_once(monkeypatch, route):
    """bfloat16 products where the CPU has no fast ones (rnn_function.widened_products): the
    float32 product of the widened operands on the same route, rounded once to bfloat16, bit for
    bit; within a bfloat16 rounding of torch's own bfloat16 product."""
    from discrnn import rnn_function
    from discrnn.kernels import rnn_cpu
    from discrnn.rnn_function import StepProduct

    monkeypatch.setattr(rnn_function, "WIDEN_LOW_PRECISION_PRODUCTS", True)
    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", route == "panels")
    monkeypatch.setattr(rnn_function, "ONEDNN_STEP_PRODUCTS", route == "onednn")
    monkeypatch.setattr(rnn_function, "_MIN_PACKED_WEIGHT_BYTES", 0)
    if route == "panels" and rnn_cpu.panel_products(torch.float32) is None:
        pytest.skip("no panel products on this CPU")
    if route == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 20, generator=g).bfloat16()
    prod, ref = StepProduct(w, 16, 100), StepProduct(w.float(), 16, 100)
    assert prod.widened and (prod.panels is not None) == (route == "panels")
    assert (prod.packed is not None) == (route == "onednn")
    for rows in (16, 5, 1):
        a, c = torch.randn(rows, 20, generator=g), torch.randn(rows, 48, generator=g)
        a_w, c_w = a.bfloat16(), c.bfloat16()
        product = ref.mm(a_w.float()).bfloat16()
        for got in (prod.mm(a), prod.mm(a_w), prod.mm(a_w, out=torch.empty_like(c_w))):
            assert got.dtype == torch.bfloat16 and torch.equal(got, product)
        assert torch.equal(prod.addmm(c_w, a_w), ref.addmm(c_w.float(), a_w.float()).bfloat16())
        out = torch.empty_like(c_w)
        assert prod.addmm(c_w, a_w, out=out) is out and torch.equal(out, prod.addmm(c_w, a_w))
        assert torch.equal(prod.addmm(c, a), c + product.float())  # rounded, then added
        acc = c.clone()
        assert torch.equal(prod.addmm_(acc, a), c + product.float())
        torch.testing.assert_close(product, a_w @ w.t(), atol=0, rtol=2 ** -7)
    b = torch.randn(20, 48, generator=g).bfloat16()
    assert torch.equal(rnn_function.mm(a_w, b), (a_w.float() @ b.float()).bfloat16())
    monkeypatch.setattr(rnn_function, "WIDEN_LOW_PRECISION_PRODUCTS", False)
    assert not StepProduct(w, 16, 100).widened
    assert torch.equal(rnn_function.mm(a_w, b), a_w @ b)


@pytest.mark.parametrize("panels", [True, False], ids=["panels", "onednn"])
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_short_calls_do_not_prepack(monkeypatch, cls, panels):
    """A call of a few steps (one step at a time in a decoding loop) runs torch.addmm: packing
    a weight costs a product or more. A long call packs every weight it multiplies by, into
    panels (discrnn's products, any size) or for oneDNN (float32 weights over 1 MiB); a chunk
    product's weight over 1 MiB is reordered for oneDNN only where two chunks or more share it
    (rnn_function._MIN_ONEDNN_CHUNKS), else torch.mm."""
    from discrnn import rnn_function
    from discrnn.kernels import rnn_cpu

    monkeypatch.setattr(rnn_function, "PANEL_STEP_PRODUCTS", panels)
    made = []  # (a chunk product's, weight over 1 MiB, packed) per StepProduct
    real_init = rnn_function.StepProduct.__init__

    def spy(self, weight, rows, products, chunk=False, onednn=True):
        real_init(self, weight, rows, products, chunk, onednn)
        made.append((chunk, weight.numel() * weight.element_size() > 2**20,
                     self.panels is not None or self.packed is not None))

    monkeypatch.setattr(rnn_function.StepProduct, "__init__", spy)
    torch.manual_seed(0)
    module = cls(512, 512, levels=64)  # W_ih, W_hh over 1 MiB in float32
    for steps in (1, 15):
        made.clear()
        module(torch.randn(steps, 2, 512, requires_grad=True))[0].sum().backward()
        assert made and not any(p for _, _, p in made), steps
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                               "_reorder_linear_weight")
    can_pack = onednn or (panels and rnn_cpu.panel_products(torch.float32) is not None)
    made.clear()
    # 16 steps, one chunk (chunk_size 32): the per-step products' weights packed, the chunk
    # products' big ones not
    module(torch.randn(16, 2, 512, requires_grad=True))[0].sum().backward()
    assert all(p == can_pack for chunk, _, p in made if not chunk)
    assert not any(p for chunk, big, p in made if chunk and big)
    made.clear()
    module(torch.randn(64, 2, 512, requires_grad=True))[0].sum().backward()  # two chunks
    # forward: W_hh, W_ih; backward: W_hh^T, W_ih^T (and the GRU's W_hn)
    packed = [p for _, _, p in made]
    assert len(packed) == (4 if cls is DiscreteLSTM else 5)
    if (panels and rnn_cpu.panel_products(torch.float32) is not None
            and rnn_cpu.panels_for_large_products()):
        assert all(packed)
    elif onednn:
        assert all(packed[:4]) and not any(packed[4:])  # W_hn (1 MiB) stays below the threshold


@_onednn
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_packed_products_bit_identical_in_bfloat16(monkeypatch, cls):
    """A bfloat16 layer computes the same outputs, states and gradients bit for bit whether its
    recurrent products run through the prepacked weight or torch.addmm; packed sequences change
    the rows per product."""
    from discrnn import rnn_function

    torch.manual_seed(0)
    module = cls(6, 10, levels=64, num_layers=2, bidirectional=True).bfloat16()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, 6, generator=g).bfloat16().requires_grad_()
    hx = torch.randn(4, 4, 10, generator=g).bfloat16().requires_grad_()
    if cls is DiscreteLSTM:
        hx = (hx, torch.randn(4, 4, 10, generator=g).bfloat16().requires_grad_())
    lengths = torch.tensor([20, 13, 20, 3])
    results = {}
    for packed in (True, False):
        monkeypatch.setattr(rnn_function, "ONEDNN_STEP_PRODUCTS", packed)
        results[packed] = _run_for_paths(module, x, hx, lengths)
    for a, b in zip(*(sum(results[p], []) for p in (True, False))):
        assert torch.equal(a, b)


@_onednn
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_float32_with_packed_products_matches_reference(always_packed, cls):
    test_float32_matches_reference(cls)


@_onednn
@pytest.mark.parametrize(
    "cls, kwargs, chunk, packed, dtype",
    [
        (DiscreteLSTM, dict(num_layers=2, bidirectional=True), 3, True, torch.float32),
        (DiscreteLSTM, dict(proj_size=4, grad="exact"), 5, False, torch.bfloat16),
        (DiscreteGRU, dict(bidirectional=True), 4, True, torch.float32),
    ],
)
def test_chunked_path_matches_per_step_path_with_packed_products(
    monkeypatch, always_packed, cls, kwargs, chunk, packed, dtype
):
    """The two torch-backend paths stay bit-identical in forward when both run the packed
    products."""
    test_chunked_torch_path_matches_per_step_path(monkeypatch, cls, kwargs, chunk, packed, dtype)


# ---------------------------------------------------------------------------------------------
# The LSTM keeps i, f, g, o: u = discrete_tanh(c_t) is rebuilt from c_t (itself rebuilt from the
# checkpoints) in backward and for the next layer's input. The rebuilt codes must be the forward's.

# (H, batch sizes, reverse, chunk, cell_clip, grad, dtype): H not a multiple of 8 (padded code
# rows) or 32, batches that shrink (forward direction) or grow (reverse, in processing order)
# inside and between chunks, the clamp active (small cell_clip) or not, both gradient modes.
REBUILD_CASES = [
    (11, [5, 5, 4, 4, 2, 1, 1], False, 3, math.inf, "code", torch.float32),
    (11, [5, 5, 4, 4, 2, 1, 1], True, 3, 0.5, "code", torch.float32),
    (33, [3, 3, 3, 3, 3], True, 2, 8.0, "exact", torch.float64),
    (7, [4, 2, 2, 1, 1], False, 1, 0.25, "exact", torch.bfloat16),
    (9, [6, 6, 5, 3, 3, 3, 1], True, 4, 1.0, "code", torch.float32),
]
REBUILD_IDS = [f"H{c[0]}-{'rev' if c[2] else 'fwd'}-chunk{c[3]}-clip{c[4]}-{c[5]}-{str(c[6])[6:]}"
               for c in REBUILD_CASES]


def _lstm_layer_call(ops, H, batch_sizes, reverse, chunk, clip, grad, dtype, levels=64, seed=0):
    """One LSTMLayerFunction call on a packed batch: (its LayerConfig, y, the Function's outputs)."""
    from discrnn._validation import default_bits
    from discrnn.lstm_function import LSTMLayerFunction
    from discrnn.rnn_function import LayerConfig

    g = torch.Generator().manual_seed(seed)
    I, B, N = 5, batch_sizes[0], sum(batch_sizes)
    x = torch.randn(N, I, generator=g).to(dtype).requires_grad_()
    h0 = (0.5 * torch.randn(B, H, generator=g)).to(dtype).requires_grad_()
    c0 = (2 * torch.randn(B, H, generator=g)).to(dtype).requires_grad_()  # beyond small clips
    w_ih = torch.randn(4 * H, I, generator=g).to(dtype).requires_grad_()
    w_hh = (0.5 * torch.randn(4 * H, H, generator=g)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(4 * H, generator=g)).to(dtype).requires_grad_()
    cfg = LayerConfig(batch_sizes, levels, default_bits(levels), chunk, reverse, ops, grad=grad,
                      cell_clip=clip)
    outs = LSTMLayerFunction.apply(x, h0, c0, w_ih, w_hh, b, None, cfg)
    return cfg, outs[0], outs, (x, h0, c0, w_ih, w_hh, b)


def _proc_rows(cfg, y, first, last):
    """The rows of processing steps first..last of ``y`` (time-ordered packed rows), in processing
    order."""
    return torch.cat([y[cfg.layout.rows(t)] for t in cfg.layout.order[first : last + 1]])


def _ops_of(path):
    from discrnn.rnn import _step_ops

    return {"torch": _step_ops("torch"), "per-step": _StepwiseTorchOps,
            "triton": _step_ops("triton")}[path]


@pytest.mark.parametrize("path", ["torch", "per-step", "triton"])
@pytest.mark.parametrize("H, sizes, reverse, chunk, clip, grad, dtype", REBUILD_CASES, ids=REBUILD_IDS)
def test_lstm_output_rows_rebuild_the_outputs_bit_for_bit(path, H, sizes, reverse, chunk, clip,
                                                          grad, dtype):
    """What the next layer of a stack reads as its input: the outputs h_t = o u of any run of
    processing steps, rebuilt from the codes, c_0 and the checkpoints (c rebuilt from the
    checkpoint of the chunk holding the run's first step, which may start mid-chunk, and u's code
    from c), equal the forward's outputs bit for bit."""
    cfg, y, _, _ = _lstm_layer_call(_ops_of(path), H, sizes, reverse, chunk, clip, grad, dtype)
    assert cfg.store.n_codes == 4
    y = y.detach()
    T = len(sizes)
    firsts = range(T) if path != "triton" else sorted({0, 1, chunk - 1, chunk, T - 1} & set(range(T)))
    for first in firsts:
        for last in range(first, T):
            got = cfg.output_rows(cfg.output_tensors, first, last)
            expected = _proc_rows(cfg, y, first, last)
            assert got.dtype == expected.dtype and torch.equal(got, expected), (first, last)


def _record_forward_u(monkeypatch, path):
    """Record the u code of every row of every forward step, keyed by the step's code offset (the
    per-step paths) or in processing order (the chunked torch path)."""
    from discrnn.kernels import rnn_cpu, rnn_torch

    fwd = {}
    if path == "torch":
        real_call = rnn_torch.LSTMForwardStep.__call__

        def call(self, v, c_prev, k_gates, k_u, *args, **kwargs):
            out = real_call(self, v, c_prev, k_gates, k_u, *args, **kwargs)
            fwd[len(fwd)] = k_u.clone()
            return out

        monkeypatch.setattr(rnn_torch.LSTMForwardStep, "__call__", call)
        # The aten step and backward: the fused CPU kernels (kernels/rnn_cpu.cpp) compute the same
        # codes inside C++ (tests/test_rnn_cpu.py holds them to these paths bit for bit).
        monkeypatch.setattr(rnn_cpu, "fused_ops", lambda: None)
        return None, fwd
    base = _ops_of(path)

    class Recording(base):
        @staticmethod
        def lstm_step_forward(gates, c_prev, levels, out=None, cell_clip=math.inf, **kwargs):
            bs, H = c_prev.shape
            every = torch.empty(2, bs, H, dtype=torch.uint8)  # o, u of all rows (done=0)
            base.lstm_step_forward(gates, c_prev.clone(), levels, final=every, store=False,
                                   cell_clip=cell_clip)
            fwd[out.offset] = every[1].clone()
            return base.lstm_step_forward(gates, c_prev, levels, out=out, cell_clip=cell_clip,
                                          **kwargs)

    return Recording, fwd


@pytest.mark.parametrize("path", ["torch", "per-step", "triton"])
@pytest.mark.parametrize("H, sizes, reverse, chunk, clip, grad, dtype", REBUILD_CASES, ids=REBUILD_IDS)
def test_lstm_backward_rebuilds_the_forward_u_codes(monkeypatch, path, H, sizes, reverse, chunk,
                                                    clip, grad, dtype):
    """Backward uses u = discrete_tanh(c_t) in u d_o (the o gate's gradient) and m = o u (h_{t-1}
    of the weight gradient, including the step before each chunk): rebuilt from c_t, its codes
    must be the ones the forward step computed. The chunked torch path: every code it rebuilds,
    compared directly; the per-step paths (torch step functions, Triton kernels): the o gate's
    gradient of every step against dm u d_o with the forward's u."""
    from discrnn import lstm_function
    from discrnn.kernels import rnn_torch
    from discrnn.kernels.codec_torch import torch_code_derivative, torch_decode

    Recording, fwd = _record_forward_u(monkeypatch, path)
    rebuilt = []
    if path == "torch":
        real_u_codes = lstm_function._lstm_u_codes

        def u_codes(tables, t, chunk_rows=False):  # a chunk's steps, else the one before
            codes = real_u_codes(tables, t, chunk_rows)
            rebuilt.append((not chunk_rows, codes.clone()))
            return codes

        monkeypatch.setattr(lstm_function, "_lstm_u_codes", u_codes)
        ops = _ops_of(path)
    else:
        class Checking(Recording):
            @staticmethod
            def lstm_step_backward(codes, c_prev, dm, dc, levels, dgates_out=None, preact=None,
                                   **kwargs):
                dm = dm.clone()
                dgates, dc_prev = _ops_of(path).lstm_step_backward(
                    codes, c_prev, dm, dc, levels, dgates_out=dgates_out, preact=preact, **kwargs)
                acc, H_ = c_prev.dtype, c_prev.shape[1]
                k_o = rnn_torch.read_codes(codes)[3]
                if preact is None:
                    d_o = torch_code_derivative(k_o, levels, "sigmoid", acc)
                else:
                    d_o = rnn_torch.exact_derivatives(preact, rnn_torch.LSTM_GATE_KINDS, acc)[:, 3]
                u = torch_decode(fwd[codes.offset], levels, "tanh", acc)
                dy = kwargs.get("dy")  # the step's output gradient, added in the kernel
                dm = dm.to(acc) if dy is None else dm.to(acc) + dy.to(acc)
                rebuilt.append((dgates[:, 3 * H_ :].clone(), dm * u * d_o))
                return dgates, dc_prev

        ops = Checking
    cfg, y, outs, inputs = _lstm_layer_call(ops, H, sizes, reverse, chunk, clip, grad, dtype)
    g = torch.Generator().manual_seed(9)
    loss = (y * torch.randn(y.shape, generator=g).to(dtype)).sum() + outs[1].sum() + outs[2].sum()
    loss.backward()
    assert rebuilt, "backward rebuilt no u codes"
    if path != "torch":
        assert len(rebuilt) == len(sizes)
        # to rounding (Triton's sigmoid in grad="exact"); a u code off by one level moves d_o by
        # 2 / 63 of dm d_o
        tol = 1e-12 if rebuilt[0][1].dtype == torch.float64 else 1e-7
        for d_o, expected in rebuilt:
            torch.testing.assert_close(d_o, expected, atol=tol, rtol=1e-5)
        return
    # The chunked path, chunk by chunk in backward's order: the chunk's rows in time order, after
    # the step processed before the chunk (its rows that also run in the chunk's first step).
    layout = cfg.layout
    expected = []
    for first, steps in list(cfg.chunks())[::-1]:
        if first:
            n = min(sizes[layout.order[first - 1]], sizes[steps[0]])
            expected.append((True, fwd[first - 1][:n], n))
        lo, hi = layout.row_span(steps)
        rows = torch.empty(hi - lo, H, dtype=torch.int32)
        for s, t in enumerate(steps, start=first):
            rows[layout.rows(t).start - lo : layout.rows(t).stop - lo] = fwd[s]
        expected.append((False, rows, hi - lo))
    assert [e[0] for e in expected] == [r[0] for r in rebuilt]
    for (_, want, n), (_, got) in zip(expected, rebuilt):
        assert torch.equal(got[:n], want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bidirectional_lstm_stack_rebuilds_u_for_every_layer(backend):
    """A 2-layer bidirectional stack, grad="exact", H = 11, the clamp active, chunks of 3 over 9
    steps: layer 2 rebuilds its input (layer 1's o u, the reverse direction's runs starting
    mid-chunk) and both layers' backward rebuild u from c. Outputs and every gradient against the
    plain-autograd reference, on both paths (a wrong u code moves them by a whole level)."""
    torch.manual_seed(0)
    module = DiscreteLSTM(5, 11, num_layers=2, bidirectional=True, levels=64, chunk_size=3,
                          grad="exact", cell_clip=0.75, backend=backend)
    with torch.no_grad():
        for layer in range(2):
            for sfx in ("", "_reverse"):
                getattr(module, f"bias_ih_l{layer}{sfx}")[11:22] += 2.0  # c runs into the clamp
    check_against_reference(module, T=9, B=3, dtype=torch.float64, levels=64)


def _garbage_tensors(run):
    """Tensors that ``run()`` leaves in reference cycles: alive until the garbage collector runs,
    which in a long backward pass means memory held far past its last use."""
    gc.collect()
    gc.disable()
    try:
        run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = [o for o in gc.garbage if torch.is_tensor(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return garbage


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_no_reference_cycle_keeps_codes_alive(cls, checkpointed):
    # The LSTM's output_rows closure once held its LayerConfig, which holds the closure: every
    # layer call left its code buffers to the garbage collector, and under torch.utils.checkpoint
    # (whose early-stopped recomputation never releases them) one segment's codes per segment.
    torch.manual_seed(0)
    m = cls(3, 8, num_layers=2, levels=64)
    x = torch.randn(12, 2, 3, requires_grad=True)

    def run():
        if checkpointed:
            ys = [torch.utils.checkpoint.checkpoint(lambda s: m(s)[0], x[i:i + 4],
                                                    use_reentrant=False) for i in (0, 4, 8)]
            y = torch.cat(ys)
        else:
            y = m(x)[0]
        y.sum().backward()

    run()  # first calls leave import-time and lazy-initialisation garbage of their own
    # torch.utils.checkpoint's frames hold the segment inputs and outputs in a cycle of their own
    # (so does nn.LSTM's under it): what the layers must not leave there are their code buffers.
    codes = [t for t in _garbage_tensors(run) if t.dtype == torch.uint8]
    assert not codes, f"{len(codes)} code buffers in reference cycles: {[tuple(t.shape) for t in codes]}"


def _layer_configs(root) -> list:
    """The LayerConfigs of every discrnn layer node in the graph below ``root`` (a grad_fn)."""
    seen, todo, cfgs = set(), [root], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "cfg", None) is not None:
            cfgs.append(node.cfg)
        todo.extend(f for f, _ in node.next_functions)
    return cfgs


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_graph_keeps_no_lookup_tables(cls, checkpointed):
    # Autograd keeps every layer call's LayerConfig (ctx.cfg) until the whole graph is freed. Its
    # lookup tables (the pair tables are L * L values: 256 KiB each at 256 levels) once stayed
    # there, built in forward and again in backward: under torch.utils.checkpoint one set per
    # layer per segment (at T=2048, 64 levels, 2 layers, sqrt(T) segments, 5.8 MiB).
    torch.manual_seed(0)
    m = cls(3, 8, num_layers=2, levels=64, bidirectional=True)
    x = torch.randn(12, 2, 3, requires_grad=True)
    if checkpointed:
        y = torch.cat([torch.utils.checkpoint.checkpoint(lambda s: m(s)[0], x[i:i + 4],
                                                         use_reentrant=False) for i in (0, 4, 8)])
    else:
        y = m(x)[0]
    cfgs = _layer_configs(y.grad_fn)
    assert len(cfgs) == (12 if checkpointed else 4)
    assert not [len(cfg.table_cache) for cfg in cfgs if cfg.table_cache], "after forward"
    y.square().sum().backward(retain_graph=True)
    assert not [len(cfg.table_cache) for cfg in cfgs if cfg.table_cache], "after backward"
    # Tables are rebuilt where needed: a second backward on the kept graph gives the same grads.
    first = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad(set_to_none=True)
    y.square().sum().backward()
    for a, b in zip(first, [x.grad] + [p.grad for p in m.parameters()]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
@pytest.mark.parametrize("frozen, bidirectional", [(("l0",), False), (("l0", "l1"), False),
                                                   (("l0",), True)])
def test_frozen_lower_layers_leave_the_trainable_gradients_unchanged(cls, frozen, bidirectional):
    # Inner layers rebuild their input from the layer below's codes. A frozen layer (and an input
    # without requires_grad) once kept no codes, and the next layer's d w_ih came out wrong
    # (all zeros for the LSTM) without an error.
    torch.manual_seed(0)
    m = cls(3, 8, num_layers=3, levels=64, bidirectional=bidirectional)
    x = torch.randn(7, 2, 3)
    ref = copy.deepcopy(m)
    for name, p in m.named_parameters():
        if name.split("_")[-1] in frozen:
            p.requires_grad_(False)
    m(x)[0].square().sum().backward()
    ref(x)[0].square().sum().backward()
    want = dict(ref.named_parameters())
    trained = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        torch.testing.assert_close(p.grad, want[name].grad, rtol=0, atol=0, msg=name)
