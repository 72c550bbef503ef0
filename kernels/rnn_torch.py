"""Pure-torch step math of the discrete LSTM and GRU cells: the reference for the Triton step kernels
and the backend for every non-CUDA device.

Shapes: ``bs`` active rows, ``H`` hidden units. Gate pre-activations come in torch's gate order
(LSTM: i, f, g, o; GRU: r, z, n). Math runs in the compute dtype (float64 for float64, else float32).

What one step keeps for backward is the level codes: a uint8 tensor ``[Q, bs, H]``, or bit-packed
rows of the layers' code store described by :class:`CodeRows` (forward steps write there when given
``out``; every reader takes either form):

* LSTM, Q = 4: i, f, g, o. h_t = o * u with u = discrete_tanh(c_t) (a product of two levels); u's
  code is not kept but rebuilt wherever it is needed (backward, the next layer's input) from c_t,
  which is itself rebuilt from a float checkpoint with the forward's arithmetic: ``tanh`` of the
  rebuilt c_t, called with the forward's loop shape (one call on a contiguous [bs, H] tensor per
  step, see below), encoded, gives the forward's u code bit for bit. The final-state codes (o, u of
  each row's last step) still come from the forward step (``final``).
* GRU, Q = 4: r, z, n and h_t itself (the GRU state is one code per unit).

The LSTM cell state is clamped, c_t = clamp(f c_{t-1} + i g, -cell_clip, cell_clip) (``cell_clip``
defaults to inf here; the layers pass theirs). Straight-through derivatives of the gates come from
the codes alone (``torch_code_derivative``: the mean of f' over the level's bin), as in
``discrete_*(..., grad="code")``, or, given the pre-activations (``preact``), are f' there
(``grad="exact"``). The LSTM's u uses tanh'(c_t) of the rebuilt c_t, and no gradient passes where
the clamp was active.

The per-step functions below keep their signatures (they are the reference of the Triton kernels;
``check`` is the Triton launchers' switch for their argument checks, accepted and unused here);
the forward ones run through :class:`LSTMForwardStep` / :class:`GRUForwardStep`, which the layers
(``discrnn.lstm_function`` / ``gru_function``, torch backend) call directly with preallocated
buffers, a few aten calls per step. They are bit-identical to encoding and decoding each gate with
``codec_torch``:

* all LSTM gate planes (both GRU r, z planes) are encoded in one pass with per-plane constants:
  ``(act + a) * m`` with ``a`` 1 for the tanh plane, 0 otherwise, and ``m`` = (L - 1) / 2 or
  L - 1 gives exactly the floats of ``torch_encode``; the floor is a truncating cast to int32 of
  u + 0.5 >= 0 after the clamp (which cannot change an activation's code, so activations skip it);
  decoding multiplies the code by 1 or 2 and adds 0 or -(L - 1) (small integers: exact) and divides
  by L - 1 held as a tensor (one correctly rounded division), exactly ``torch_decode``;
* tanh and sigmoid are evaluated on tensors whose innermost loop has the same length as in a
  plane-by-plane evaluation (H for LSTM gate planes, bs * H for contiguous [bs, H] operands):
  torch's CPU kernels vectorise the body of that loop and evaluate its tail in scalar code, which
  can differ in the last ulp, so the loop shape is part of being bit-identical.

On the CPU the layers run the fused kernels of ``kernels/rnn_cpu.cpp`` in place of these calls
where they can: the same arithmetic in fewer passes, bit-identical to the calls here (MKL's tanh, as
torch.tanh, does not depend on the loop shape; the sigmoid loops follow aten's).

Backward (:class:`StepTables`) decodes a whole chunk of codes at once by lookup tables of the L level
values and straight-through derivatives, and of the products of two codes' values / derivatives
(computed once with ``torch_decode`` and ``torch_code_derivative``: the same numbers as decoding
each step, and the products torch would compute from them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .codec_torch import (
    compute_dtype,
    torch_code_derivative,
    torch_decode,
    torch_exact_derivative,
    torch_pack,
    torch_unpack,
)

LSTM_CODES = 4  # i, f, g, o (u = discrete_tanh(c_t) is rebuilt from c_t)
GRU_CODES = 4  # r, z, n, h

_SIG, _TANH = "sigmoid", "tanh"
_LSTM_KINDS = (_SIG, _SIG, _TANH, _SIG, _TANH)
_GRU_KINDS = (_SIG, _SIG, _TANH, _TANH)
LSTM_GATE_KINDS = _LSTM_KINDS[:4]  # the activations of the gate pre-activations i, f, g, o
GRU_GATE_KINDS = _GRU_KINDS[:3]  # r, z, n


class StepTables:
    """Constants of the fast step math for one (levels, dtype, device): encode/decode constants as
    0-dim tensors (cheaper per call than Python scalars, same values), and (built on first use)
    lookup tables of the level values and straight-through derivatives.

    ``dtype`` is the layer's dtype; the arithmetic runs in its compute dtype ``acc``. The layers keep
    one instance per call (``LayerConfig.tables``), so nothing here is global state.
    """

    def __init__(self, levels: int, dtype: torch.dtype, device):
        acc = compute_dtype(dtype)
        span = levels - 1
        self.levels, self.dtype, self.acc, self.device = levels, dtype, acc, device

        def const(value):
            return torch.full((), value, dtype=acc, device=device)

        # A device tensor as divisor (see codec_torch.torch_decode): one correctly rounded division.
        self.den = const(span)
        self.span = const(span)
        self.neg_span = const(-span)
        self.half_span = const(span / 2)  # (L - 1) / 2: exact in every float dtype for L <= 256
        self.one, self.two, self.half = const(1.0), const(2.0), const(0.5)
        # Per-plane constants of the LSTM gate planes i, f, g, o: encode (v + [0, 0, 1, 0]) * mul,
        # decode (k * dec_mul + dec_add) / (L - 1).
        def column(values):
            return torch.tensor(values, dtype=acc, device=device).view(4, 1)

        self.gate_mul = column([span, span, span / 2, span])
        self.gate_dec_mul = column([1.0, 1.0, 2.0, 1.0])
        self.gate_dec_add = column([0.0, 0.0, -span, 0.0])
        self._tables = None

    def _build_tables(self):
        k = torch.arange(self.levels, device=self.device).to(torch.uint8)
        value = {kind: torch_decode(k, self.levels, kind, self.acc) for kind in (_SIG, _TANH)}
        deriv = {kind: torch_code_derivative(k, self.levels, kind, self.acc) for kind in (_SIG, _TANH)}
        # The level as the layer's dtype holds it (h_t fed to the next step), back in acc.
        output = {kind: v.to(self.dtype).to(self.acc) for kind, v in value.items()}
        self._tables = {"value": value, "deriv": deriv, "output": output}

    def table(self, which: str, kind: str) -> torch.Tensor:
        """[L] level values (``which`` = "value"), straight-through derivatives ("deriv") or values
        as the layer's dtype rounds them ("output"), in acc: computed with ``torch_decode`` /
        ``torch_code_derivative``, so a gather from them is bit-identical to decoding each code."""
        if self._tables is None:
            self._build_tables()
        return self._tables[which][kind]

    def pair_table(self, name: str) -> torch.Tensor:
        """[L * L] products of two codes' values / derivatives, indexed by ``a * L + b`` (see
        :meth:`pair_index`), each entry the product torch computes elementwise (one rounding).
        ``a`` is a sigmoid code, ``b`` a tanh code:

        "ab" = a * b (LSTM i g, o u), "b_da" = b * d_a (g d_i, u d_o), "a_db" = a * d_b (i d_g,
        o d_u), "a_n" = (1 - a) * d_b (GRU (1 - z) d_n).
        """
        if self._tables is None:
            self._build_tables()
        pairs = self._tables.setdefault("pair", {})
        if name not in pairs:
            val, der = self._tables["value"], self._tables["deriv"]
            a, b = val[_SIG][:, None], val[_TANH][None, :]
            products = {
                "ab": lambda: a * b,
                "b_da": lambda: b * der[_SIG][:, None],
                "a_db": lambda: a * der[_TANH][None, :],
                "a_n": lambda: torch.rsub(a, 1.0) * der[_TANH][None, :],
            }
            pairs[name] = products[name]().reshape(-1)
        return pairs[name]

    def indices(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes [R, Q, H] (any strides) -> int32 indices [Q, R * H], plane by plane."""
        R, Q, H = codes.shape
        idx = torch.empty(Q, R, H, dtype=torch.int32, device=codes.device)
        idx.copy_(codes.permute(1, 0, 2))
        return idx.view(Q, R * H)

    def pair_index(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Indices of code pairs into a :meth:`pair_table`: a * L + b (int32)."""
        return torch.add(b, a, alpha=self.levels)

    def gather(self, table: torch.Tensor, idx: torch.Tensor, shape) -> torch.Tensor:
        """table[idx] for int32 indices ``idx`` (1-D), viewed as ``shape``."""
        return table.index_select(0, idx).view(shape)

    def lookup(self, which: str, kind: str, codes: torch.Tensor) -> torch.Tensor:
        """:meth:`table` gathered at uint8 ``codes`` of any shape and strides."""
        idx = codes.to(torch.int32).reshape(-1)
        return self.table(which, kind).index_select(0, idx).view(codes.shape)

    # Encode in place, then to integer codes. torch_encode computes k = floor(u + 0.5) with
    # u = (v + 1) * (L - 1) / 2 (tanh) or v * (L - 1) (sigmoid), clamps k to [0, L - 1] and maps NaN
    # to 0. Here u + 0.5 goes to int32 with a truncating cast, which is the same floor once u + 0.5 is
    # clamped (clamp and floor commute for integer bounds), and needs no clamp at all for outputs of
    # tanh / sigmoid (``activation=True``): u + 0.5 then lies in [0.5, L - 0.5].

    def encode_tanh_(self, v: torch.Tensor, activation: bool, codes: torch.Tensor) -> torch.Tensor:
        """v (tanh range, overwritten) -> int32 codes into ``codes``."""
        v.add_(self.one).mul_(self.half_span).add_(self.half)
        if not activation:
            v.clamp_(0.0, float(self.levels - 1))
        return codes.copy_(v.nan_to_num_(nan=0.0))

    def decode_tanh(self, k: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """int32 tanh codes -> level values (2k - (L - 1)) / (L - 1) into ``out`` (the sum exact)."""
        return torch.add(self.neg_span, k, alpha=2, out=out).div_(self.den)


def _padded_planes(bs: int, planes: int, H: int, acc, device) -> torch.Tensor:
    """A [bs, planes, H] view into a buffer whose rows are one element longer: elementwise results
    written there keep an innermost loop of H (see the module docstring)."""
    return torch.empty(bs, planes, H + 1, dtype=acc, device=device)[:, :, :H]


def _plane_pair(bs: int, H: int, acc, device) -> torch.Tensor:
    """[2, bs, H]: two contiguous [bs, H] planes with a gap between them, so that an elementwise op
    over both keeps the innermost loop of bs * H of one contiguous plane (see the module docstring)."""
    n = bs * H
    return torch.empty(2 * n + 1, dtype=acc, device=device).as_strided((2, bs, H), (n + 1, H, 1))


class _Rows:
    """Views of a step workspace for one batch size (built once per size)."""


class LSTMForwardStep:
    """Buffers of the fast LSTM forward step for up to ``B`` rows, and their views per batch size.

    ``rows(bs).gates`` is where the caller may put the step's pre-activations in acc (then
    ``gates=None`` in :meth:`__call__`), e.g. ``torch.addmm(..., out=rows(bs).gates)``.
    """

    def __init__(self, tables: StepTables, B: int, H: int, device, cell_clip: float = math.inf):
        acc = tables.acc
        self.tables, self.H, self.cell_clip = tables, H, cell_clip
        self._gates = torch.empty(B, 4 * H, dtype=acc, device=device)
        self._act = _padded_planes(B, 4, H, acc, device)
        self._vals = torch.empty(B, 4, H, dtype=acc, device=device)
        self._ig = torch.empty(B, H, dtype=acc, device=device)
        self._rows = {}

    def rows(self, bs: int) -> _Rows:
        v = self._rows.get(bs)
        if v is None:
            v = self._rows[bs] = _Rows()
            v.gates = self._gates[:bs]
            v.pre, v.pre_g = self._gate_views(v.gates, bs)
            v.act = self._act[:bs]
            v.act_g = v.act[:, 2]
            v.ig = self._ig[:bs]
            v.vals = self._vals[:bs]
            v.i, v.f, v.g, v.o = v.vals.unbind(1)
        return v

    def _gate_views(self, gates, bs):
        H = self.H
        return gates.view(bs, 4, H), gates[:, 2 * H : 3 * H]

    def __call__(self, v: _Rows, c_prev, k_gates, k_u, m_out=None, gates=None):
        """One step for the rows of ``v``: c_prev [bs, H] (acc) -> c [bs, H], m = o * u [bs, H];
        the codes, as int32, into ``k_gates`` ([bs, 4, H]: i, f, g, o) and ``k_u`` ([bs, H])."""
        t = self.tables
        if gates is None:
            pre, pre_g = v.pre, v.pre_g
        else:
            gates = gates if gates.dtype == t.acc else gates.to(t.acc)
            pre, pre_g = self._gate_views(gates, c_prev.shape[0])
        act = v.act
        torch.sigmoid(pre, out=act)  # planes i, f, o (g is overwritten next)
        torch.tanh(pre_g, out=v.act_g)
        v.act_g.add_(t.one)  # (v + 1) * (L - 1) / 2 for g, v * (L - 1) for i, f, o
        act.mul_(t.gate_mul).add_(t.half).nan_to_num_(nan=0.0)
        k_gates.copy_(act)  # truncation = floor (see StepTables)
        torch.mul(k_gates, t.gate_dec_mul, out=v.vals).add_(t.gate_dec_add).div_(t.den)  # exact sum
        c = torch.mul(v.f, c_prev)
        c.add_(torch.mul(v.i, v.g, out=v.ig)).clamp_(-self.cell_clip, self.cell_clip)
        u = torch.tanh(c)
        t.decode_tanh(t.encode_tanh_(u, True, k_u), out=u)
        return c, torch.mul(v.o, u, out=m_out)


class GRUForwardStep:
    """Buffers of the fast GRU forward step for up to ``B`` rows, and their views per batch size.

    ``rows(bs).gh`` is where the caller may put h W_hh^T + b_hh in acc (then ``gh=None``)."""

    def __init__(self, tables: StepTables, B: int, H: int, device):
        acc = tables.acc
        self.tables, self.H, self.device = tables, H, device
        self._gh = torch.empty(B, 3 * H, dtype=acc, device=device)
        self._n = torch.empty(B, H, dtype=acc, device=device)
        self._zh = torch.empty(B, H, dtype=acc, device=device)
        self._rows = {}

    def rows(self, bs: int) -> _Rows:
        v = self._rows.get(bs)
        if v is None:
            v = self._rows[bs] = _Rows()
            v.gh = self._gh[:bs]
            v.gh_rz, v.gh_n = self._gh_views(v.gh, bs)
            # r and z as two contiguous [bs, H] planes: the sigmoid runs the loops of torch's
            # sigmoid(gx[:, :H] + gh[:, :H]) on a fresh [bs, H] tensor
            v.rz = _plane_pair(bs, self.H, self.tables.acc, self.device)
            v.rz_rows = v.rz.transpose(0, 1)
            v.r, v.z = v.rz.unbind(0)
            v.n, v.zh = self._n[:bs], self._zh[:bs]
        return v

    def _gh_views(self, gh, bs):
        H = self.H
        return gh[:, : 2 * H].view(bs, 2, H), gh[:, 2 * H :]

    def __call__(self, v: _Rows, gx_rz, gx_n, h_prev, k_rz, k_n, k_h, h_out=None, gh=None,
                 pre_out=None):
        """One step: gx_rz [bs, 2, H] and gx_n [bs, H] (x W_ih^T + b_ih, acc), h_prev [bs, H] ->
        h [bs, H] (acc; into ``h_out`` when given); the codes, as int32, into ``k_rz`` ([2, bs, H]:
        r, z), ``k_n`` and ``k_h`` ([bs, H]); the pre-activations of r, z and n into ``pre_out``
        ([bs, 3H], acc) when given (``grad="exact"`` keeps them)."""
        t = self.tables
        if gh is None:
            gh_rz, gh_n = v.gh_rz, v.gh_n
        else:
            gh = gh if gh.dtype == t.acc else gh.to(t.acc)
            gh_rz, gh_n = self._gh_views(gh, h_prev.shape[0])
        if h_prev.dtype != t.acc:
            h_prev = h_prev.to(t.acc)
        torch.add(gx_rz, gh_rz, out=v.rz_rows)
        if pre_out is not None:
            pre_out[:, : 2 * self.H].view(-1, 2, self.H).copy_(v.rz_rows)
        v.rz.sigmoid_().mul_(t.span).add_(t.half).nan_to_num_(nan=0.0)
        k_rz.copy_(v.rz)  # truncation = floor (see StepTables)
        torch.div(k_rz, t.den, out=v.rz)
        r, z = v.r, v.z
        n = torch.mul(r, gh_n, out=v.n).add_(gx_n)
        if pre_out is not None:
            pre_out[:, 2 * self.H :].copy_(n)
        n = n.tanh_()
        n = t.decode_tanh(t.encode_tanh_(n, True, k_n), out=n)
        h = torch.sub(t.one, z).mul_(n).add_(torch.mul(z, h_prev, out=v.zh))  # (1 - z) n + z h_prev
        t.encode_tanh_(h, False, k_h)  # snap to the tanh grid
        return t.decode_tanh(k_h, out=h if h_out is None else h_out)


def padded_units(hidden: int) -> int:
    """Units per stored code row: ``hidden`` rounded up to a multiple of 8, whole bytes at any width
    (the padding units hold code 0)."""
    return -(-hidden // 8) * 8


class CodeRows(NamedTuple):
    """Where the codes of ``rows`` batch rows of a step (or of a run of steps) live in a uint8 buffer.

    Plane q of row r is a byte row starting at byte ``offset + q * plane_stride + r * row_stride`` of
    ``data``'s storage view; it holds units 0..padded-1, unit j in bits [j * bits, (j + 1) * bits),
    the codec's little-endian bit stream; units hidden..padded-1 hold code 0. ``padded * bits`` is a
    multiple of 8, so every byte row is whole bytes and no two rows share a byte.

    Two forms: :meth:`packed`, the layers' code store (``discrnn.rnn_function.CodeStore``: the rows'
    [planes, padded] codes one after another, so consecutive steps are one run of rows), and
    :meth:`of_tensor`, a plain uint8 tensor [planes, rows, hidden] (bits = 8, any plane and row
    strides), the form the step functions return when no ``out`` is given.
    """

    data: torch.Tensor
    offset: int
    rows: int
    planes: int
    hidden: int
    padded: int
    bits: int
    plane_stride: int
    row_stride: int

    @property
    def row_bytes(self) -> int:
        return self.padded * self.bits // 8

    @classmethod
    def packed(cls, data: torch.Tensor, offset: int, rows: int, planes: int, hidden: int, bits: int):
        """Rows of the code store: row r's planes at ``offset + (r * planes + q) * row_bytes``."""
        padded = padded_units(hidden)
        row_bytes = padded * bits // 8
        return cls(data, offset, rows, planes, hidden, padded, bits, row_bytes, planes * row_bytes)

    @classmethod
    def of_tensor(cls, codes: torch.Tensor):
        """A uint8 tensor [planes, rows, hidden] as 8-bit code rows (copied if units are strided)."""
        planes, rows, hidden = codes.shape
        if codes.stride(2) != 1:
            codes = codes.contiguous()
        return cls(codes, 0, rows, planes, hidden, hidden, 8, codes.stride(0), codes.stride(1))

    def byte_rows(self) -> torch.Tensor:
        """The byte rows as a [planes, rows, row_bytes] uint8 view of ``data``'s storage."""
        return self.data.as_strided(
            (self.planes, self.rows, self.row_bytes),
            (self.plane_stride, self.row_stride, 1),
            self.data.storage_offset() + self.offset,
        )

    def check(self, name: str, planes: int, rows: int, hidden: int, device) -> None:
        """ValueError unless these rows hold at least ``planes`` planes of ``rows`` x ``hidden`` codes
        on ``device``, inside ``data``'s storage (the kernels write through raw pointers)."""
        if self.data.dtype != torch.uint8:
            raise TypeError(f"{name}.data must be uint8, got {self.data.dtype}")
        if not 1 <= self.bits <= 8 or (self.padded * self.bits) % 8 or self.padded < self.hidden:
            raise ValueError(f"{name}: bits={self.bits}, padded={self.padded} do not make whole-byte "
                             f"rows of {self.hidden} units")
        if self.planes < planes or self.rows != rows or self.hidden != hidden:
            raise ValueError(f"{name} must hold >= {planes} planes of ({rows}, {hidden}) codes, got "
                             f"{self.planes} planes of ({self.rows}, {self.hidden})")
        if self.data.device != torch.device(device):
            raise ValueError(f"{name} must be on {device} like the other step tensors, got "
                             f"{self.data.device}")
        if rows and hidden:
            end = self.offset + (self.planes - 1) * self.plane_stride
            end += (self.rows - 1) * self.row_stride + self.row_bytes
            if self.data.dim() == 1 and self.data.is_contiguous():  # a code buffer: its extent
                room = self.data.numel()
            else:  # a strided tensor's rows: its storage from the first element on
                room = self.data.untyped_storage().nbytes() - self.data.storage_offset()
            if self.offset < 0 or min(self.plane_stride, self.row_stride) < 0 or end > room:
                raise ValueError(f"{name} reaches byte {end} of a buffer of {room} bytes")


def as_code_rows(codes) -> CodeRows:
    return codes if isinstance(codes, CodeRows) else CodeRows.of_tensor(codes)


def read_codes(codes) -> torch.Tensor:
    """Codes (a uint8 tensor [Q, rows, H] or :class:`CodeRows`) as a uint8 tensor [Q, rows, H]."""
    if isinstance(codes, torch.Tensor):
        return codes
    view = codes.byte_rows()
    if codes.bits == 8:
        return view[:, :, : codes.hidden]
    flat = torch_unpack(view.reshape(-1), codes.bits, codes.planes * codes.rows * codes.padded)
    return flat.view(codes.planes, codes.rows, codes.padded)[:, :, : codes.hidden]


def write_codes(out: CodeRows, codes: torch.Tensor) -> None:
    """Store uint8 codes [Q, rows, H] into ``out``'s byte rows, padding units with code 0."""
    view = out.byte_rows()
    if out.bits == 8:
        view[:, :, : out.hidden] = codes
        view[:, :, out.hidden :] = 0
        return
    padded = torch.zeros(out.planes, out.rows, out.padded, dtype=torch.uint8, device=codes.device)
    padded[:, :, : out.hidden] = codes
    view.copy_(torch_pack(padded.view(-1), out.bits).view(view.shape))


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result``, or ``out`` holding it (rounded to ``out``'s dtype) when given."""
    if out is None:
        return result
    out.copy_(result)
    return out


def _emit(codes: torch.Tensor, out, final, done: int, final_planes: slice, store: bool,
          kept: int | None = None):
    """Where a forward step's uint8 codes [Q, bs, H] go: the final-state codes of rows done..bs-1
    into ``final``, then the first ``kept`` planes (all by default) into ``out`` (a
    :class:`CodeRows`) or, without one, the returned tensor."""
    if final is not None:
        final[:, done : codes.shape[1]] = codes[final_planes, done:]
    if not store:
        return None
    codes = codes[:kept]
    if out is None:
        return codes
    write_codes(out, codes)
    return out


def lstm_step_forward(gates, c_prev, levels, out=None, final=None, done=0, store=True,
                      c_out=None, m_out=None, cell_clip: float = math.inf, check: bool = True):
    """gates [bs, 4H] (pre-activations, bias included), c_prev [bs, H] (compute dtype) ->
    codes, c [bs, H], m = o * u [bs, H] (compute dtype). c = clamp(f c_prev + i g, -cell_clip,
    cell_clip).

    The kept codes (i, f, g, o) are a fresh uint8 tensor [4, bs, H], or are written to ``out`` (a
    :class:`CodeRows` of 4 planes and bs rows, e.g. a step of the packed code store), which is
    returned; ``store=False`` writes none and returns None. ``final`` [2, B, H] uint8 (B >= bs)
    receives the o and u codes of rows done..bs-1: the rows whose sequence ends at this step.
    ``c_out`` (compute dtype; may be ``c_prev``) and ``m_out`` (any float dtype: m rounded to it)
    receive c and m instead of fresh tensors, and are returned."""
    bs, H = c_prev.shape
    step = LSTMForwardStep(StepTables(levels, c_prev.dtype, c_prev.device), bs, H, c_prev.device,
                           cell_clip)
    k = torch.empty(LSTM_CODES + 1, bs, H, dtype=torch.int32, device=c_prev.device)  # + u
    c, m = step(step.rows(bs), c_prev, k[:4].transpose(0, 1), k[4], gates=gates)
    codes = _emit(k.to(torch.uint8), out, final, done, slice(3, 5), store, LSTM_CODES)
    return codes, _into(c, c_out), _into(m, m_out)


def lstm_u_codes(c: torch.Tensor, levels: int) -> torch.Tensor:
    """u's codes (int32, [bs, H]) rebuilt from c_t [bs, H] (compute dtype, contiguous: one step's
    rows, the shape the forward step evaluates tanh on): bit-identical to the u codes
    :func:`lstm_step_forward` computed from that c_t."""
    return _encode_u(torch.tanh(c), levels)


def _encode_u(t: torch.Tensor, levels: int) -> torch.Tensor:
    """int32 tanh codes of t = tanh(c_t) (overwritten), as the forward step encodes u."""
    k = torch.empty(t.shape, dtype=torch.int32, device=t.device)
    return StepTables(levels, t.dtype, t.device).encode_tanh_(t, True, k)


def tanh_derivative(c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """tanh'(c) = 1 - tanh(c)^2, as 4 s (1 - s) with s = sigmoid(-2 |c|) (into ``out`` when given,
    which may be c): no cancellation where tanh saturates (1 - t^2 of a float32 t rounds to 0 from
    |c| of about 8.7, and to a few ulps of 1 - t before), and aten's sigmoid, whose loop the fused
    CPU kernels reproduce (rnn_cpu.cpp: one call on a contiguous c runs one loop over all of it).
    NaN gives NaN, +-inf 0."""
    s = torch.abs(c).mul_(-2.0).sigmoid_()
    d = torch.neg(s) if out is None else torch.neg(s, out=out)
    return d.add_(1.0).mul_(s).mul_(4.0)


def lstm_recompute_cell(codes, c_prev: torch.Tensor, levels: int, cell_clip: float = math.inf,
                        m_out=None, steps: int = 1) -> torch.Tensor:
    """c_t from the saved i, f, g codes and c_{t-1}: the same arithmetic as the forward step. With
    ``m_out`` ([bs, H], any float dtype) also m = o * u there, u's code rebuilt from c_t: the m
    (rounded to ``m_out``'s dtype) that the forward step returned, bit for bit. ``steps``: the
    codes hold that many consecutive steps of bs rows each; the result is c after each of them,
    [steps * bs, H], and ``m_out`` is [steps * bs, H]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    acc, codes = c_prev.dtype, read_codes(codes)
    bs = c_prev.shape[0]
    cs = []
    c = c_prev
    for s in range(steps):
        step = codes[:, s * bs : (s + 1) * bs]
        i, f, g = (torch_decode(step[q], levels, _LSTM_KINDS[q], acc) for q in range(3))
        c = (f * c + i * g).clamp_(-cell_clip, cell_clip)
        cs.append(c)
        if m_out is not None:
            m_out[s * bs : (s + 1) * bs].copy_(_cell_output(step, c, levels))
    return cs[0] if steps == 1 else torch.cat(cs)


def _cell_output(codes: torch.Tensor, c: torch.Tensor, levels: int) -> torch.Tensor:
    """m = o * u in c's dtype: o from its code (plane 3), u's code rebuilt from c_t."""
    acc = c.dtype
    o = torch_decode(codes[3], levels, _SIG, acc)
    return o * torch_decode(lstm_u_codes(c, levels), levels, _TANH, acc)


def lstm_output(codes, c: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """m = o * u (the unprojected h_t) in ``dtype`` from the saved codes and c_t [bs, H] (the compute
    dtype of ``dtype``): u's code rebuilt from c_t as the forward step computed it. Rows of c_t that
    are unknown may hold anything (e.g. zeros): each row's m depends on its own c_t only, and c
    keeps the forward step's shape, so the known rows' tanh runs the forward's loop."""
    codes = read_codes(codes)
    return _cell_output(codes, c.to(compute_dtype(dtype)).contiguous(), levels).to(dtype)


def exact_derivatives(preact: torch.Tensor, kinds, acc) -> torch.Tensor:
    """f'(x) at gate pre-activations ``preact`` [bs, Q * H] (planes in gate order, ``kinds`` their
    activations): the ``grad="exact"`` straight-through rule, as [bs, Q, H] in ``acc``."""
    bs = preact.shape[0]
    pre = preact.to(acc).view(bs, len(kinds), -1)
    return torch.stack([torch_exact_derivative(pre[:, q], kind) for q, kind in enumerate(kinds)], 1)


def lstm_step_backward(codes, c_prev: torch.Tensor, dm: torch.Tensor, dc: torch.Tensor, levels: int,
                       dgates_out=None, dc_prev_out=None, preact=None, cell_clip: float = math.inf,
                       check: bool = True, dy=None, dgates_low_out=None):
    """Backward of one step: codes (i, f, g, o), c_prev = c_{t-1} [bs, H].
    dm = dL/dm_t [bs, H], dc = dL/dc_t from step t+1 [bs, H] ->
    dgates [bs, 4H] (pre-activation gradients, gate order i, f, g, o), dc_prev [bs, H]; into
    ``dgates_out`` / ``dc_prev_out`` when given (``dc_prev_out`` may be ``dc``).
    ``dgates_low_out`` ([bs, 4H], a lower float dtype): also receives dgates rounded to its dtype
    (the operand of a bf16 / fp16 backward product).

    The derivative of u = discrete_tanh(c_t) is tanh'(c_t) at c_t rebuilt from the codes and c_prev
    (it fades as |c| grows, as the true one does); where the clamp to [-cell_clip, cell_clip] was
    active, no gradient passes to the gates and c_prev (the clamp's derivative, as torch.clamp).
    The gates' derivatives come from their codes (the bin mean), or with ``preact`` (the step's
    pre-activations [bs, 4H], ``grad="exact"``) are f' at the pre-activation. ``dy`` [bs, H]: the
    step's output gradient, added to dm first (dm + dy is dL/dm_t)."""
    acc, codes = c_prev.dtype, read_codes(codes)
    dm = dm.to(acc)
    if dy is not None:
        dm = dm + dy.to(acc)
    i, f, g, o = (torch_decode(codes[q], levels, _LSTM_KINDS[q], acc) for q in range(4))
    if preact is None:
        d = [torch_code_derivative(codes[q], levels, _LSTM_KINDS[q], acc) for q in range(4)]
    else:
        d = exact_derivatives(preact, LSTM_GATE_KINDS, acc).unbind(1)
    raw = f * c_prev + i * g  # the forward's arithmetic: c_t bit for bit
    c = raw.clamp(-cell_clip, cell_clip)
    t = torch.tanh(c)  # the forward's call on c_t [bs, H]
    u = torch_decode(_encode_u(t, levels), levels, _TANH, acc)  # u's code, rebuilt
    dc = torch.where(raw.abs() <= cell_clip, dc + dm * o * tanh_derivative(c), 0.0)
    dgates = torch.cat(
        [dc * g * d[0], dc * c_prev * d[1], dc * i * d[2], dm * u * d[3]], dim=1
    )
    if dgates_low_out is not None:
        dgates_low_out.copy_(dgates)
    return _into(dgates, dgates_out), _into(dc * f, dc_prev_out)


def gru_step_forward(gx, gh, h_prev, levels, out=None, final=None, done=0, store=True, h_out=None,
                     preact_out=None, check: bool = True, b_hh=None):
    """gx = x W_ih^T + b_ih [bs, 3H], gh = h W_hh^T + b_hh [bs, 3H], h_prev [bs, H] ->
    codes (r, z, n, h), h [bs, H] (compute dtype; exactly the level of the h code). ``out``,
    ``store``: as :func:`lstm_step_forward`; ``final`` [1, B, H] receives the h codes of rows
    done..bs-1; ``h_out`` (any float dtype) receives h; ``preact_out`` ([bs, 3H], compute dtype)
    the pre-activations of r, z and n (what ``grad="exact"`` keeps). ``b_hh`` ([3H], gh's dtype):
    gh is h W_hh^T and the bias is added here, rounded to gh's dtype (as ``gh += b_hh``)."""
    if b_hh is not None:
        gh = gh + b_hh
    acc = compute_dtype(h_prev.dtype)
    gx, gh, h_prev = gx.to(acc), gh.to(acc), h_prev.to(acc)
    bs, H = h_prev.shape
    step = GRUForwardStep(StepTables(levels, acc, h_prev.device), bs, H, h_prev.device)
    k = torch.empty(GRU_CODES, bs, H, dtype=torch.int32, device=h_prev.device)
    gx_rz = gx[:, : 2 * H].view(bs, 2, H)
    h = step(step.rows(bs), gx_rz, gx[:, 2 * H :], h_prev, k[:2], k[2], k[3], gh=gh,
             pre_out=preact_out)
    return _emit(k.to(torch.uint8), out, final, done, slice(3, 4), store), _into(h, h_out)


def gru_output(codes, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """h_t in ``dtype`` from the saved codes (its level, plane 3)."""
    acc, codes = compute_dtype(dtype), read_codes(codes)
    return torch_decode(codes[3], levels, _TANH, acc).to(dtype)


def gru_step_backward(codes, h_prev: torch.Tensor, gh_n: torch.Tensor, dh: torch.Tensor, levels: int,
                      dgx_out=None, dgh_out=None, dh_direct_out=None, preact=None,
                      check: bool = True, dy=None, dgh_low_out=None, dh_add=None):
    """Backward of one step. h_prev [bs, H], gh_n = h_prev W_hn^T + b_hn [bs, H] (recomputed),
    dh = dL/dh_t [bs, H] -> dgx [bs, 3H], dgh [bs, 3H], dh_prev_direct = dh * z [bs, H]; into the
    ``*_out`` tensors when given (``dh_direct_out`` may be ``dh``). The gates' derivatives come from
    their codes, or with ``preact`` (the pre-activations of r, z, n [bs, 3H], ``grad="exact"``) are
    f' at the pre-activation. ``dy`` [bs, H]: the step's output gradient, added to dh first (dh + dy
    is dL/dh_t). ``dgh_low_out`` ([bs, 3H], a lower float dtype): also receives dgh rounded to its
    dtype (the operand of a bf16 / fp16 backward product). ``dh_add`` ([n, H], n <= bs): added to
    dh's first n rows first (``dh[:n] += dh_add``: the later step's product in its own dtype)."""
    acc, codes = compute_dtype(h_prev.dtype), read_codes(codes)
    dh, h_prev, gh_n = dh.to(acc), h_prev.to(acc), gh_n.to(acc)
    if dh_add is not None:
        dh = dh.clone()
        dh[: dh_add.shape[0]] += dh_add
    if dy is not None:
        dh = dh + dy.to(acc)
    r, z, n = (torch_decode(codes[q], levels, _GRU_KINDS[q], acc) for q in range(3))
    if preact is None:
        d_r, d_z, d_n = (torch_code_derivative(codes[q], levels, _GRU_KINDS[q], acc) for q in range(3))
    else:
        d_r, d_z, d_n = exact_derivatives(preact, GRU_GATE_KINDS, acc).unbind(1)
    # snap() passes the gradient straight through.
    dpre_n = dh * (1.0 - z) * d_n
    dpre_r = dpre_n * gh_n * d_r
    dpre_z = dh * (h_prev - n) * d_z
    dgx = torch.cat([dpre_r, dpre_z, dpre_n], dim=1)
    dgh = torch.cat([dpre_r, dpre_z, dpre_n * r], dim=1)
    if dgh_low_out is not None:
        dgh_low_out.copy_(dgh)
    return _into(dgx, dgx_out), _into(dgh, dgh_out), _into(dh * z, dh_direct_out)
