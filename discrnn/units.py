"""Discrete units: tanh/sigmoid outputs snapped to L uniform levels, straight-through gradients.

``discrete_tanh(x, L)`` is ``decode(encode(tanh(x), L, "tanh"), L, "tanh")`` and
``discrete_sigmoid(x, L)`` the same with sigmoid; no randomness, the same in train and eval, output
dtype = input dtype (math in float32, float64 for float64 input).

Backward passes the gradient straight through the rounding: d value / dx is taken to be f'(x).

* ``grad="exact"`` evaluates f' at the pre-activation; it keeps ``x`` for backward (which autograd
  usually keeps anyway for the op that produced it).
* ``grad="code"`` keeps only the bit-packed level codes (``ceil(log2 L)`` bits per element) and
  estimates f' from the level alone: the mean of f' over the bin of outputs that round to that
  level (tanh: mean of 1 - t^2 over [c - 1/(L-1), c + 1/(L-1)] clipped to [-1, 1]; sigmoid: mean of
  s - s^2 over [c - 1/(2(L-1)), c + 1/(2(L-1))] clipped to [0, 1]). ``1 - y^2`` at the level itself
  would be 0 at the end levels and useless at small L; the bin mean is not (2/3 for tanh at L = 2).

NaN: the unit's output is NaN where ``x`` is NaN (as ``torch.tanh``); the gradient there is NaN in
``exact`` mode and finite in ``code`` mode, where the saved code of a NaN is code 0.
+-Inf: the end levels (tanh: -1/+1, sigmoid: 0/1), with derivative 0 in ``exact`` mode.
"""

from __future__ import annotations

import torch

from . import _validation as V
from .backend import resolve_backend
from .kernels import codec as triton_codec
from .kernels import codec_torch as ref

__all__ = ["discrete_tanh", "discrete_sigmoid", "discrete_activation"]


def _flat(x):
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().view(-1)


class DiscreteActivationFunction(torch.autograd.Function):
    """y = level value of f(x), f in {tanh, sigmoid}; dy/dx = f'(x) (exact) or bin-mean f' (code)."""

    @staticmethod
    def forward(ctx, x, levels, kind, grad, backend, records_graph=True):
        # records_graph: whether autograd records this call (the caller's grad mode: inside
        # forward it is always off, and needs_input_grad ignores it); no codes where it does not.
        bits = V.default_bits(levels)
        keep_codes = grad == "code" and ctx.needs_input_grad[0] and records_graph
        if backend == "triton":
            packed, y = triton_codec.triton_quantize_pack(
                _flat(x), levels, kind, bits, activation=True, values_dtype=x.dtype,
                want_packed=keep_codes,
            )
            y = y.view(x.shape)
        else:
            codes = ref.torch_encode(ref.torch_activation(x, kind), levels, kind)
            y = ref.torch_decode(codes, levels, kind, x.dtype)
            y = y.masked_fill_(torch.isnan(x), float("nan"))
            packed = ref.torch_pack(codes, bits) if keep_codes else None
        ctx.levels, ctx.kind, ctx.grad, ctx.backend, ctx.bits = levels, kind, grad, backend, bits
        ctx.shape = x.shape
        if grad == "exact":
            ctx.save_for_backward(x)
        else:
            ctx.save_for_backward(packed)
        return y

    @staticmethod
    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        if ctx.grad == "exact":
            acc = ref.compute_dtype(saved.dtype)
            dx = (dy.to(acc) * ref.torch_exact_derivative(saved, ctx.kind)).to(saved.dtype)
            return dx, None, None, None, None, None
        n = ctx.shape.numel()
        if ctx.backend == "triton":
            dx = triton_codec.triton_code_grad(
                saved, ctx.bits, n, ctx.levels, ctx.kind, _flat(dy)
            )
        else:
            codes = ref.torch_unpack(saved, ctx.bits, n)
            acc = ref.compute_dtype(dy.dtype)
            dx = dy.reshape(-1).to(acc) * ref.torch_code_derivative(codes, ctx.levels, ctx.kind, acc)
            dx = dx.to(dy.dtype)
        return dx.view(ctx.shape), None, None, None, None, None


def discrete_activation(
    x: torch.Tensor,
    levels: int,
    kind: str,
    *,
    grad: str = "exact",
    backend: str | None = None,
) -> torch.Tensor:
    """``kind`` = ``"tanh"`` or ``"sigmoid"``; see :func:`discrete_tanh`."""
    V.check_float_tensor("x", x)
    levels, kind = V.check_levels(levels), V.check_kind(kind)
    grad = V.check_grad_mode(grad)
    backend = resolve_backend(backend, x.device)
    return DiscreteActivationFunction.apply(x, levels, kind, grad, backend, torch.is_grad_enabled())


def discrete_tanh(x: torch.Tensor, levels: int, *, grad: str = "exact", backend: str | None = None):
    """tanh snapped to ``levels`` uniform levels in [-1, 1] (both ends included).

    ``t = tanh(x); k = clamp(floor((t + 1) * (L - 1) / 2 + 0.5), 0, L - 1); y = -1 + 2k / (L - 1)``.

    Args:
        x: float16/bfloat16/float32/float64 tensor of any shape and device.
        levels: L, an integer in [2, 256].
        grad: ``"exact"`` (f'(x), keeps x) or ``"code"`` (bin-mean f' of the level, keeps only
            packed codes); see the module docstring.
        backend: ``None`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    Returns:
        Tensor of ``x``'s shape and dtype.
    Raises:
        TypeError: non-float ``x``, non-integer ``levels``.
        ValueError: ``levels`` outside [2, 256], unknown ``grad`` or ``backend``.
    """
    return discrete_activation(x, levels, "tanh", grad=grad, backend=backend)


def discrete_sigmoid(
    x: torch.Tensor, levels: int, *, grad: str = "exact", backend: str | None = None
):
    """sigmoid snapped to ``levels`` uniform levels in [0, 1]: ``y = k / (L - 1)`` with
    ``k = clamp(floor(sigmoid(x) * (L - 1) + 0.5), 0, L - 1)``. Arguments as :func:`discrete_tanh`."""
    return discrete_activation(x, levels, "sigmoid", grad=grad, backend=backend)
