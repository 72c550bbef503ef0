"""torch's own module tests for nn.LSTM / nn.GRU (``torch.testing._internal.common_modules``:
every ModuleInfo sample and error input) run against DiscreteLSTM / DiscreteGRU.

* ``levels=None``: outputs, final states and every gradient equal torch's, bit for bit;
* 16 / 64 / 256 levels: torch's output structure, shapes and dtypes, finite values and gradients,
  and an unbatched sample equals the same sample as a batch of one;
* error inputs: the same exception type as torch (construction and forward).
"""

import copy

import pytest
import torch

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
ModuleErrorEnum = common_modules.ModuleErrorEnum

from discrnn import DiscreteGRU, DiscreteLSTM  # noqa: E402

# torch's samples draw h_0 from randn: outside the discrete GRU's state range, which it warns about.
pytestmark = pytest.mark.filterwarnings("ignore::discrnn.StateRangeWarning")

OURS = {torch.nn.LSTM: DiscreteLSTM, torch.nn.GRU: DiscreteGRU}
INFOS = [m for m in common_modules.module_db if m.module_cls in OURS]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _samples(info, dtype, training):
    return info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=True,
                                   training=training)


def _ids():
    return [f"{m.module_cls.__name__}" for m in INFOS]


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)]


def _leaves(args):
    return [t for t in _flat(args) if isinstance(t, torch.Tensor) and t.requires_grad]


def _clone(args):
    return copy.deepcopy(args)


def _run(module, args, kwargs):
    out = module(*args, **kwargs)
    flat = _flat(out)
    loss = sum((t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64,
                                            device=t.device).view(t.shape)).sum() for t in flat)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, _leaves(args) + params, allow_unused=True)
    return flat, grads


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("info", INFOS, ids=_ids())
def test_levels_none_is_torch_on_every_sample(info, dtype, training):
    for sample in _samples(info, dtype, training):
        kwargs = sample.constructor_input.kwargs
        torch.manual_seed(0)
        ref = info.module_cls(*sample.constructor_input.args, **kwargs).to(DEVICE, dtype)
        ours = OURS[info.module_cls].from_torch(ref, levels=None)
        ref.train(training), ours.train(training)
        args, fkw = sample.forward_input.args, sample.forward_input.kwargs
        torch.manual_seed(1)
        got, got_grads = _run(ours, _clone(args), fkw)
        torch.manual_seed(1)
        want, want_grads = _run(ref, _clone(args), fkw)
        assert len(got) == len(want), sample.desc
        for a, b in zip(got + list(got_grads), want + list(want_grads)):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), (kwargs, sample.desc)


@pytest.mark.parametrize("levels", [16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("info", INFOS, ids=_ids())
def test_discrete_levels_keep_torch_structure_on_every_sample(info, dtype, levels):
    for sample in _samples(info, dtype, training=True):
        kwargs = sample.constructor_input.kwargs
        torch.manual_seed(0)
        ref = info.module_cls(*sample.constructor_input.args, **kwargs).to(DEVICE, dtype)
        ours = OURS[info.module_cls].from_torch(ref, levels=levels)
        args, fkw = sample.forward_input.args, sample.forward_input.kwargs
        got, grads = _run(ours, _clone(args), fkw)
        want, _ = _run(ref, _clone(args), fkw)
        assert [t.shape for t in got] == [t.shape for t in want], (kwargs, sample.desc)
        assert [t.dtype for t in got] == [t.dtype for t in want]
        assert all(torch.isfinite(t).all() for t in got)
        params = list(ours.parameters())
        assert all(g is not None and torch.isfinite(g).all() for g in grads[-len(params):])
        x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() == 2:  # unbatched: as a batch of one
            hx = args[1] if len(args) > 1 else None
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
            bdim = 0 if ours.batch_first else 1  # the batch dimension of input and output
            with torch.no_grad():
                batched = _flat(ours(x.detach().unsqueeze(bdim), hx))
                single = _flat(ours(x.detach(), args[1] if len(args) > 1 else None))
            assert torch.equal(single[0], batched[0].squeeze(bdim)), sample.desc
            for a, b in zip(single[1:], batched[1:]):  # final states: batch in dimension 1
                assert torch.equal(a, b.squeeze(1)), sample.desc


@pytest.mark.parametrize("info", INFOS, ids=_ids())
def test_error_inputs_raise_what_torch_raises(info):
    errors = info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float32,
                                           requires_grad=False, training=True)
    assert errors
    for error in errors:
        sample = error.module_error_input
        cargs, ckw = sample.constructor_input.args, sample.constructor_input.kwargs
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type):
                OURS[info.module_cls](*cargs, **ckw, levels=64)
            continue
        ours = OURS[info.module_cls](*cargs, **ckw, levels=64).to(DEVICE)
        with pytest.raises(error.error_type):
            ours(*sample.forward_input.args, **sample.forward_input.kwargs)
