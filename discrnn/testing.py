"""What discrnn's own tests check with, for people who write kernels or layers on top of its codecs.

Import it explicitly (``import discrnn.testing``), as ``torch.testing``; nothing here runs on import.

References (plain torch, slow on purpose, every gradient from autograd):

* codecs: :func:`torch_encode`, :func:`torch_decode`, :func:`torch_pack`, :func:`torch_unpack`,
  :func:`torch_code_derivative`, :func:`torch_exact_derivative` (``discrnn.kernels.codec_torch``):
  the oracle the Triton codecs match bit for bit;
* cells: :func:`reference_lstm_layer`, :func:`reference_gru_layer` (padded [T, B, I], one layer and
  direction), :func:`reference_packed_layer` (torch's packed layout, as a layer Function sees it)
  and :func:`reference_stack` (a whole DiscreteLSTM / DiscreteGRU module, every layer and
  direction; no dropout).

Assertions and tools:

* :func:`assert_codes_equal`: bit-exact comparison of code or packed-byte tensors that names the
  first mismatching positions;
* :func:`assert_close_report`: ``torch.testing.assert_close`` over named pairs, whose message adds
  the worst differences and where they are;
* :func:`poison_`: fill a fresh buffer with NaN (floats) or the byte 0xA5 (uint8), so that an output
  element a kernel forgets to write fails a comparison instead of passing by luck;
* :func:`kept_bytes`: bytes autograd keeps for backward while a function runs (saved-tensor hooks,
  distinct storages), minus storages you name (the input, the parameters);
* :class:`HostSyncs`: records the calls that would move values between host and device (what a
  CUDA graph capture forbids, and what stalls a GPU pipeline) while a function runs, on any device,
  so a CPU-only test can show that a forward and backward pass reads no tensor value on the host.

Example, a custom 6-bit kernel checked against the reference::

    import torch, discrnn.testing as dt
    x = torch.randn(1000).tanh()
    codes = dt.torch_encode(x, 64, "tanh")
    packed = dt.poison_(torch.empty(750, dtype=torch.uint8))
    my_pack_kernel(codes, 6, out=packed)             # yours
    dt.assert_codes_equal(packed, dt.torch_pack(codes, 6), name="packed")
"""

from __future__ import annotations

import traceback
from typing import Callable, Iterable, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .kernels.codec_torch import (
    torch_code_derivative,
    torch_decode,
    torch_encode,
    torch_exact_derivative,
    torch_pack,
    torch_unpack,
)
from .rnn_reference import reference_gru_layer, reference_lstm_layer, reference_packed_layer

__all__ = [
    "CODE_POISON",
    "HostSyncs",
    "assert_close_report",
    "assert_codes_equal",
    "kept_bytes",
    "poison_",
    "reference_gru_layer",
    "reference_lstm_layer",
    "reference_packed_layer",
    "reference_stack",
    "torch_code_derivative",
    "torch_decode",
    "torch_encode",
    "torch_exact_derivative",
    "torch_pack",
    "torch_unpack",
    "worst_differences",
]

CODE_POISON = 0xA5  # a byte pattern no correct codec writes everywhere by accident


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floating and complex), CODE_POISON (uint8), -7 (other integers;
    bool is left alone) and return it."""
    with torch.no_grad():  # a requires_grad leaf may be poisoned too
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(CODE_POISON)
        elif t.dtype != torch.bool:
            t.fill_(-7)
    return t


def worst_differences(got: torch.Tensor, expected: torch.Tensor, k: int = 3) -> str:
    """The k largest |got - expected| (compared in float64) and their flat positions, as text."""
    diff = (got.detach().double() - expected.detach().double()).abs().flatten()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return "no elements"
    idx = diff.topk(min(k, diff.numel())).indices
    return f"worst |diff| {[f'{float(diff[i]):.3g}' for i in idx]} at flat positions {idx.tolist()}"


def assert_close_report(names: Sequence[str], got: Iterable, expected: Iterable, *,
                        rtol: float, atol: float) -> None:
    """``torch.testing.assert_close(a, b, rtol=rtol, atol=atol)`` for each named pair (None must
    pair with None); a failure names the pair and adds :func:`worst_differences`."""
    for name, a, b in zip(names, got, expected, strict=True):
        if (a is None) != (b is None):
            raise AssertionError(f"{name}: one side is None ({a is None} / {b is None})")
        if a is None:
            continue
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, check_dtype=False)
        except AssertionError as exc:
            detail = worst_differences(a, b) if a.shape == b.shape else "shapes differ"
            raise AssertionError(f"{name}: {detail}\n{exc}") from None


def assert_codes_equal(got: torch.Tensor, expected: torch.Tensor, *, name: str = "codes",
                       show: int = 5) -> None:
    """Bit-exact equality of two integer tensors (codes, packed bytes): same shape, same dtype,
    same values; a failure names how many elements differ and the first ``show`` of them."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        raise AssertionError(f"{name}: expected {tuple(expected.shape)} {expected.dtype}, got "
                             f"{tuple(got.shape)} {got.dtype}")
    bad = (got != expected).flatten().nonzero().flatten()
    if bad.numel():
        first = bad[:show].tolist()
        flat_got, flat_exp = got.flatten(), expected.flatten()
        pairs = ", ".join(f"[{i}] {int(flat_got[i])} != {int(flat_exp[i])}" for i in first)
        raise AssertionError(f"{name}: {bad.numel()} of {got.numel()} elements differ: {pairs}")


def kept_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """(bytes, fn's result): the bytes of every distinct storage autograd saves for backward while
    ``fn()`` runs, without the storages of ``exclude`` (tensors that exist anyway: the input, the
    parameters)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(n for ptr, n in storages.items() if ptr not in excluded), result


# aten ops that read a tensor's value on the host (item, bool, int, float), have a data-dependent
# output size (nonzero, masked_select, unique), or compare values into a Python bool; and lift_fresh,
# the op behind torch.tensor(python data), whose result a CUDA program must then copy to the device.
_SYNC_ATEN = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
              "unique_consecutive", "is_nonzero", "equal", "allclose", "lift_fresh")
# Tensor methods that hand values to Python without an aten op on CPU tensors (on CUDA tensors they
# copy to the host first).
_SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__,
                 torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
                 torch.Tensor.__float__, torch.Tensor.__index__}
# Calls made inside the Triton interpreter (which emulates kernels on CPU tensors through numpy)
# are not the caller's: on a GPU the same launch reads no value.
_IGNORED_FRAMES = ("triton/runtime/interpreter", "triton\\runtime\\interpreter")


class HostSyncs(TorchFunctionMode):
    """Context manager that records every call that would bring a tensor value to the host or host
    data to a device while it is active: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``,
    ``.tolist()``, ``.numpy()``, ops with a data-dependent output size (``nonzero``, boolean
    indexing, ``unique``), ``torch.equal``, ``torch.tensor(python data)``, and copies between
    devices. On a CUDA device each is a synchronisation and an error inside a CUDA graph capture;
    recorded here on any device, so CPU tests see them too. ``calls`` lists ``(name, stack)``;
    :meth:`assert_none` raises naming the first few. Calls made by the Triton interpreter itself
    are ignored (a GPU launch reads no values)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self._dispatch = _SyncDispatch(self)

    def _record(self, name: str) -> None:
        stack = traceback.extract_stack()[:-3]
        if any(any(ign in frame.filename for ign in _IGNORED_FRAMES) for frame in stack):
            return
        self.calls.append((name, "".join(traceback.format_list(stack[-6:]))))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_METHODS:
            self._record(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        super().__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        return super().__exit__(*exc)

    def assert_none(self, what: str = "the call") -> None:
        if self.calls:
            shown = "\n".join(f"{name} at\n{stack}" for name, stack in self.calls[:3])
            raise AssertionError(f"{what} made {len(self.calls)} host-device value transfers "
                                 f"(first {min(3, len(self.calls))}):\n{shown}")


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_ATEN:
            self.owner._record(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] if len(args) > 1 else ()) or ()):
            self.owner._record(f"aten.{name} with a boolean mask")  # a nonzero inside
        elif name in ("_to_copy", "copy_"):
            sides = [args[0].device, (kwargs or {}).get("device")]
            if name == "copy_":
                sides.append(args[1].device)
            if len({torch.device(d).type for d in sides if d is not None}) > 1:
                self.owner._record(f"aten.{name} between devices")
        return func(*args, **(kwargs or {}))


def reference_stack(module, x: torch.Tensor, hx=None):
    """A whole DiscreteLSTM / DiscreteGRU forward through the single-layer references: every layer
    and direction, the module's levels, grad mode and cell_clip, no dropout. ``x`` is [T, B, I]
    (sequence-first, batched); ``hx`` as the module takes it, or None for zeros. -> (y, h_n) or
    (y, (h_n, c_n)), differentiable by autograd."""
    from .rnn import DiscreteLSTM

    is_lstm = isinstance(module, DiscreteLSTM)
    D = 2 if module.bidirectional else 1
    B = x.shape[1]
    P = getattr(module, "proj_size", 0) or module.hidden_size
    if hx is None:
        zeros = x.new_zeros(module.num_layers * D, B, P)
        hx = (zeros, x.new_zeros(module.num_layers * D, B, module.hidden_size)) if is_lstm else zeros
    finals_h, finals_c = [], []
    layer_input = x
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            idx = layer * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = module._layer_weights(layer, d)
            if is_lstm:
                y, h, c = reference_lstm_layer(layer_input, hx[0][idx], hx[1][idx], w_ih, w_hh,
                                               b_ih, b_hh, w_hr, module.levels, reverse=bool(d),
                                               grad=module.grad, cell_clip=module.cell_clip)
                finals_c.append(c)
            else:
                y, h = reference_gru_layer(layer_input, hx[idx], w_ih, w_hh, b_ih, b_hh,
                                           module.levels, reverse=bool(d), grad=module.grad)
            finals_h.append(h)
            outs.append(y)
        layer_input = torch.cat(outs, dim=2)
    if is_lstm:
        return layer_input, (torch.stack(finals_h), torch.stack(finals_c))
    return layer_input, torch.stack(finals_h)
