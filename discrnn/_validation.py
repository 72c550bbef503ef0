"""Argument checks shared by the public API.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (right kind, bad
value) with the argument's name, what was expected and what was given, before any kernel launch.

Where a discrnn class mirrors a torch one (DiscreteLSTM/GRU and torch.nn.LSTM/GRU), a mistake that
torch reports with another exception type raises one of the classes below, which derive from both
discrnn's documented type and torch's, so that ``except ValueError`` and ``except RuntimeError``
written for either library both catch it.
"""

from __future__ import annotations

import math
import operator
import struct

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
KINDS = ("tanh", "sigmoid")
GRAD_MODES = ("exact", "code")
BACKENDS = ("torch", "triton")
MIN_LEVELS, MAX_LEVELS = 2, 256


class ShapeError(ValueError, RuntimeError):
    """A tensor of the wrong shape or size: a ``ValueError`` (discrnn's rule) that is also the
    ``RuntimeError`` torch.nn.LSTM/GRU raise for the same mistake (wrong number of features, h_0 of
    the wrong shape or number of dimensions, a zero-length sequence)."""


class DeviceError(ValueError, RuntimeError):
    """Tensors on different devices: a ``ValueError`` that is also the ``RuntimeError`` torch.nn.LSTM
    /GRU raise for input and parameters (or input and h_0) on different devices."""


class DTypeError(TypeError, ValueError):
    """An input whose dtype is not the parameters' dtype: a ``TypeError`` (discrnn's rule) that is
    also the ``ValueError`` torch.nn.LSTM/GRU raise ("RNN input dtype ... does not match weight
    dtype")."""


class StateDTypeError(TypeError, RuntimeError):
    """An initial state (h_0, c_0) whose dtype is not the input's: a ``TypeError`` that is also the
    ``RuntimeError`` torch.nn.LSTM/GRU end in for the same mistake."""


class StateRangeWarning(UserWarning):
    """An initial state outside the range the layer can hold (DiscreteGRU: h_0 outside [-1, 1]),
    used as given but saturated by the first step."""


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: no NaN or Inf in ``t``. One reduction pass (``aminmax`` propagates NaN,
    and an Inf is the min or the max) where ``torch.isfinite(t).all()`` makes four: 0.24 ms against
    6.7 ms for 2M float32 values on one CPU thread, which mattered in a layer's forward."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if not t.is_floating_point():
        return torch.isfinite(t).all()
    lo_hi = torch.stack(torch.aminmax(t.detach()))
    return torch.isfinite(lo_hi).all()


def values_unreadable(*tensors) -> bool:
    """True where a check that reads tensor values (NaN/Inf, ranges) must not bring them to the
    host: while torch.compile / torch.export trace (``torch.compiler.is_compiling()``), under
    torch.jit.trace, under make_fx's proxy tracing, for meta or fake tensors (no values), and
    while a CUDA graph is being captured on the current stream (``torch.cuda.graph``,
    ``torch.cuda.make_graphed_callables``: a device-to-host copy there is an error).
    Callers then use ``torch._assert_async`` (checked when the compiled or exported program, or the
    graph, runs) instead of ``bool(tensor)`` (a graph break, or an error on data-dependent
    values)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if any(t.device.type == "meta" for t in tensors):
        return True
    if any(t.device.type == "cuda" for t in tensors) and torch.cuda.is_current_stream_capturing():
        return True
    from torch._subclasses.fake_tensor import is_fake
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None or any(is_fake(t) for t in tensors)


def _as_int(name: str, value) -> int:
    # bool is an int subclass, but levels=True is certainly a mistake.
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None


def check_levels(levels) -> int:
    levels = _as_int("levels", levels)
    if not MIN_LEVELS <= levels <= MAX_LEVELS:
        raise ValueError(f"levels must be in [{MIN_LEVELS}, {MAX_LEVELS}], got {levels}")
    return levels


def default_bits(levels: int) -> int:
    """Fewest bits that hold ``levels`` codes: ceil(log2(levels))."""
    return max(1, math.ceil(math.log2(levels)))


def check_bits(bits, levels: int | None = None) -> int:
    if bits is None:
        if levels is None:
            raise TypeError("bits must be an integer in [1, 8], got None")
        return default_bits(levels)
    bits = _as_int("bits", bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if levels is not None and (1 << bits) < levels:
        raise ValueError(
            f"bits={bits} holds only {1 << bits} codes, too few for levels={levels}; "
            f"expected bits >= {default_bits(levels)}"
        )
    return bits


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_grad_mode(grad) -> str:
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    return grad


def check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(name: str, x) -> torch.Tensor:
    check_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (one of float16, bfloat16, float32, float64), "
            f"got {x.dtype}"
        )
    return x


def check_float_dtype(name: str, dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be one of torch.float16, bfloat16, float32, float64, got {dtype!r}"
        )
    return dtype


def check_code_tensor(name: str, codes, bits: int) -> torch.Tensor:
    """Integer codes, each in [0, 2**bits). The range check reads the data (one device sync)."""
    check_tensor(name, codes)
    if codes.dtype not in INTEGER_DTYPES:
        raise TypeError(
            f"{name} must have an integer dtype (uint8 preferred), got {codes.dtype}"
        )
    if codes.numel():
        lo, hi = (int(v) for v in torch.aminmax(codes))  # one pass, one sync
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(
                f"{name} must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
                f"got values in [{lo}, {hi}]"
            )
    return codes


def check_packed_bytes(name: str, packed, numel: int, bits: int) -> torch.Tensor:
    check_tensor(name, packed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype torch.uint8, got {packed.dtype}")
    if packed.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(packed.shape)}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"{name} must hold ceil({numel} * {bits} / 8) = {expected} bytes for numel={numel} "
            f"at bits={bits}, got {packed.numel()}"
        )
    return packed


def check_positive_int(name: str, value) -> int:
    value = _as_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_cell_clip(cell_clip) -> float:
    """A finite float > 0, held as float32 (what the Triton kernels compile in): a value float32
    cannot hold exactly is an error rather than quietly moved."""
    if isinstance(cell_clip, bool) or not isinstance(cell_clip, (int, float)):
        raise TypeError(f"cell_clip must be a float, got {type(cell_clip).__name__} {cell_clip!r}")
    value = float(cell_clip)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"cell_clip must be finite and > 0, got {cell_clip!r}")
    try:  # struct, not a tensor: no host sync, and torch.compile traces it without a graph break
        as_float32 = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        as_float32 = math.inf
    if as_float32 != value:
        raise ValueError(f"cell_clip must be exactly representable in float32 (the kernels hold it "
                         f"so), got {cell_clip!r}; the nearest float32 is {as_float32!r}")
    return value


def check_numel(numel) -> int:
    numel = _as_int("numel", numel)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return numel


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of a dense stream of ``numel`` codes of ``bits`` bits: ceil(numel * bits / 8)."""
    return (numel * bits + 7) // 8
