"""Autograd Functions of the discrete recurrent layers: one Function per layer and direction, over the
whole sequence, keeping only bit-packed level codes (plus sparse cell-state checkpoints) for backward.

Sequences are handled in torch's packed-data form: ``x_data`` is [N, I] with the rows of time step t
at ``offsets[t] : offsets[t] + batch_sizes[t]``; batch sizes never grow with t (a padded batch is
the special case of equal sizes). Forward runs steps in processing order (t = 0..T-1, or T-1..0 for
the reverse direction); the active rows of a step are always a prefix of the batch.

What one layer keeps for backward, per step and active row (``Q`` codes of ``bits`` bits per unit,
see ``discrnn.kernels.rnn_torch``), in one uint8 buffer: ``Q * bits / 8`` bytes per unit; the LSTM
adds its float32 cell state every ``chunk`` steps (``4 / chunk`` bytes per unit and step) and
recomputes c in between from the saved i, f, g codes. Input projections, gate gradients and weight
gradients are computed ``chunk`` steps at a time, so no [T, B, 4H] float tensor ever exists.

Two implementations share the code store and the layer Functions:

* the torch step backend (``ops`` is ``rnn._TorchSteps``) runs a chunked path: per step only the
  truly sequential work remains (the recurrent matmul, the cell update and the dc/dh recursion, a
  few aten calls each); everything else (decoding every code of a chunk by lookup tables, the
  products the gate gradients need, h_{t-1} of every step, weight gradients) is batched per chunk.
  Forward values and codes are bit-identical to ``rnn_torch.lstm_step_forward`` /
  ``gru_step_forward``, and backward rebuilds c with the forward's exact arithmetic;
* any other step backend (the Triton kernels) goes through the per-step ``ops`` functions: each
  forward step kernel packs its codes straight into the code store (a ``CodeRows`` view of the
  step's bytes) and the backward kernels read them there, so no unpacked code tensor exists; the
  outputs h_{t-1} a chunk's weight gradients need come from one output kernel per chunk.
"""

from __future__ import annotations

import bisect

import torch

from .kernels import codec_torch
from .kernels.codec_torch import compute_dtype
from .kernels import rnn_torch

_SIG, _TANH = "sigmoid", "tanh"


def _is_torch_ops(ops) -> bool:
    """True for the torch step backend (``rnn._TorchSteps``), which the chunked path replaces."""
    return getattr(ops, "lstm_step_forward", None) is rnn_torch.lstm_step_forward


class SequenceLayout:
    """Step sizes and row offsets of a packed batch, and the processing order of one direction."""

    def __init__(self, batch_sizes: list[int], reverse: bool):
        self.batch_sizes = batch_sizes
        self.offsets = [0] * len(batch_sizes)
        for t in range(1, len(batch_sizes)):
            self.offsets[t] = self.offsets[t - 1] + batch_sizes[t - 1]
        self.total_rows = self.offsets[-1] + batch_sizes[-1] if batch_sizes else 0
        self.reverse = reverse
        self.order = list(range(len(batch_sizes)))
        if reverse:
            self.order.reverse()

    def rows(self, t: int) -> slice:
        return slice(self.offsets[t], self.offsets[t] + self.batch_sizes[t])

    def row_span(self, steps: list[int]) -> tuple[int, int]:
        """The rows of a run of consecutive time steps form one contiguous range."""
        lo = min(self.offsets[t] for t in steps)
        hi = max(self.offsets[t] + self.batch_sizes[t] for t in steps)
        return lo, hi

    def times_in(self, lo: int, hi: int) -> tuple[int, int]:
        """First and last time step whose rows start in [lo, hi)."""
        return bisect.bisect_left(self.offsets, lo), bisect.bisect_left(self.offsets, hi) - 1

    def proc_sizes(self, first: int, last: int) -> list[int]:
        return [self.batch_sizes[t] for t in self.order[first : last + 1]]

    def to_time_order(self, block: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Rows of processing steps first..last (``block``, in processing order) in time order, the
        order of their rows in the packed data: the same tensor for the forward direction, the step
        blocks reversed (a copy) for the reverse one."""
        if not self.reverse or first == last:
            return block
        sizes = self.proc_sizes(first, last)
        if all(bs == sizes[0] for bs in sizes):
            return block.view(len(sizes), sizes[0], *block.shape[1:]).flip(0).view(block.shape)
        return torch.cat(list(reversed(block.split(sizes))))


class CodeStore:
    """Packed codes of every step of one layer and direction, in processing order.

    Step s holds codes [bs, Q, Hp] (row by row: the Q codes of a row, each plane padded to Hp = H
    rounded up to a multiple of 8 with zero codes), packed as one dense bit stream; since
    Hp * bits is a multiple of 8, every step starts on a byte boundary, and the steps of a chunk
    unpack to one [rows, Q, Hp] tensor whatever their batch sizes.
    """

    def __init__(self, layout: SequenceLayout, n_codes: int, hidden: int, bits: int, device, ops):
        self.layout, self.n_codes, self.hidden, self.bits = layout, n_codes, hidden, bits
        self.pack, self.unpack = ops.pack, ops.unpack  # the codec of the layer's backend
        self.padded = rnn_torch.padded_units(hidden)
        self.step_bytes = [
            n_codes * layout.batch_sizes[t] * self.padded * bits // 8 for t in layout.order
        ]
        self.step_offsets = [0] * len(self.step_bytes)
        for s in range(1, len(self.step_bytes)):
            self.step_offsets[s] = self.step_offsets[s - 1] + self.step_bytes[s - 1]
        self.nbytes = self.step_offsets[-1] + self.step_bytes[-1] if self.step_bytes else 0
        self.device = device

    def new_buffer(self) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)

    def rows_buffer(self, rows: int) -> torch.Tensor:
        """Unpacked codes of ``rows`` step rows, [rows, Q, Hp] uint8 with zero padding units."""
        shape = (rows, self.n_codes, self.padded)
        if self.padded == self.hidden:
            return torch.empty(shape, dtype=torch.uint8, device=self.device)
        return torch.zeros(shape, dtype=torch.uint8, device=self.device)

    def _span(self, first: int, last: int) -> slice:
        return slice(self.step_offsets[first], self.step_offsets[last] + self.step_bytes[last])

    def write_rows(self, data: torch.Tensor, first: int, last: int, rows: torch.Tensor) -> None:
        """Store steps first..last (processing order) from ``rows``: their [bs, Q, Hp] blocks one
        after another (a contiguous [sum bs, Q, Hp] uint8 tensor)."""
        data[self._span(first, last)] = self.pack(rows.reshape(-1), self.bits)

    def read_rows(self, data: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Codes of steps first..last (processing order) as one [sum bs, Q, Hp] uint8 tensor (the
        torch path: it decodes whole chunks by lookup tables)."""
        rows = sum(self.layout.proc_sizes(first, last))
        flat = self.unpack(data[self._span(first, last)], self.bits, rows * self.n_codes * self.padded)
        return flat.view(rows, self.n_codes, self.padded)

    def rows_at(self, data: torch.Tensor, first: int, last: int) -> rnn_torch.CodeRows:
        """Steps first..last (processing order) of ``data`` as one run of packed code rows, which
        the Triton step kernels write and read in place."""
        rows = sum(self.layout.proc_sizes(first, last))
        return rnn_torch.CodeRows.packed(
            data, self.step_offsets[first], rows, self.n_codes, self.hidden, self.bits
        )


class LayerConfig:
    """Static arguments of one layer call (not tensors, so autograd ignores them).

    ``input_source``: None when the layer keeps its input tensor for backward (the first layer), or
    a :class:`CodedInput` that rebuilds the input from the previous layer's codes (inner layers).
    After forward, ``store`` and ``output_rows`` describe this layer's codes to the next layer:
    ``output_rows(data, first, last)`` rebuilds the outputs of processing steps first..last (rows in
    processing order, the layer's dtype) from the code buffer ``data``.
    """

    def __init__(self, batch_sizes, levels, bits, chunk, reverse, ops, input_source=None):
        self.layout = SequenceLayout(batch_sizes, reverse)
        self.levels, self.bits, self.chunk, self.ops = levels, bits, chunk, ops
        self.input_source = input_source
        self.store = None
        self.output_rows = None
        self.chunked = _is_torch_ops(ops)  # the chunked torch path (see the module docstring)
        self._tables = {}

    def tables(self, dtype, device) -> rnn_torch.StepTables:
        """Constants and level lookup tables of the torch path, built once per layer call."""
        key = (dtype, torch.device(device))
        if key not in self._tables:
            self._tables[key] = rnn_torch.StepTables(self.levels, dtype, device)
        return self._tables[key]

    def chunks(self):
        order = self.layout.order
        for first in range(0, len(order), self.chunk):
            yield first, order[first : first + self.chunk]


def _chunk_rows(store, data, first, last):
    """Codes of steps first..last as [rows, Q, H] in time order (the rows of the packed data), and
    the codes [bs, Q, H] of processing step first - 1 (whose output is h_{first-1}) or None."""
    layout, H = store.layout, store.hidden
    if first == 0:
        before, rows = None, store.read_rows(data, first, last)
    else:
        rows = store.read_rows(data, first - 1, last)
        n = layout.batch_sizes[layout.order[first - 1]]
        before, rows = rows[:n, :, :H], rows[n:]
    return layout.to_time_order(rows, first, last)[:, :, :H], before


def _step_input(prev, prev_bs, bs, init):
    """The state rows a step reads: the previous step's (a prefix where the batch shrinks), then
    ``init`` rows for rows that start at this step (the batch grows: the reverse direction)."""
    if prev is None:
        return init[:bs]
    if bs == prev_bs:
        return prev
    if bs < prev_bs:
        return prev[:bs]
    return torch.cat([prev, init[prev_bs:bs].to(prev.dtype)])


def _previous_rows(out_rows, before, h_init, cfg, steps, lo, acc):
    """h_{t-1} of every step of a chunk as [rows, P] in time order: each step's rows come from the
    output rows ``out_rows`` (time order) of the step processed before it, or from ``before`` (the
    output of the step processed before the chunk), and from ``h_init`` where a row starts."""
    layout = cfg.layout
    h_prev = torch.empty(out_rows.shape, dtype=acc, device=out_rows.device)
    bs = layout.batch_sizes[steps[0]]
    if all(layout.batch_sizes[t] == bs for t in steps) and (before is None or before.shape[0] == bs):
        # Equal batch sizes: every step reads the whole previous step, two copies in all.
        start = before if before is not None else h_init[:bs]
        if layout.reverse:  # time order: the step processed before a step is the one after it
            h_prev[:-bs] = out_rows[bs:]
            h_prev[-bs:] = start
        else:
            h_prev[bs:] = out_rows[:-bs]
            h_prev[:bs] = start
        return h_prev
    prev = before
    for t in steps:
        rows, bs = layout.rows(t), layout.batch_sizes[t]
        start = rows.start - lo
        n = 0 if prev is None else min(bs, prev.shape[0])
        if n:
            h_prev[start : start + n] = prev[:n]
        if n < bs:
            h_prev[start + n : start + bs] = h_init[n:bs]
        prev = out_rows[start : start + bs]
    return h_prev


class CodedInput:
    """An inner layer's input rebuilt from the previous layer's codes instead of kept as floats:
    the concatenated outputs of its directions, times the packed dropout mask if any."""

    def __init__(self, prev_cfgs, prev_codes, mask=None):
        self.prev_cfgs = prev_cfgs  # one LayerConfig per direction of the previous layer
        self.prev_codes = prev_codes  # their code buffers (saved by this layer, too)
        self.mask = mask  # PackedDropoutMask or None

    def tensors(self):
        return list(self.prev_codes) + ([self.mask.packed] if self.mask is not None else [])

    def rows(self, kept, lo: int, hi: int) -> torch.Tensor:
        t_first, t_last = self.prev_cfgs[0].layout.times_in(lo, hi)
        T = len(self.prev_cfgs[0].layout.batch_sizes)
        parts = []
        for cfg, data in zip(self.prev_cfgs, kept):
            # processing indices of these times in that direction form one contiguous run
            a, b = (T - 1 - t_last, T - 1 - t_first) if cfg.layout.reverse else (t_first, t_last)
            parts.append(cfg.layout.to_time_order(cfg.output_rows(data, a, b), a, b))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.mask is not None:
            x = x * self.mask.scaled_rows(kept[-1], lo, hi, x.dtype)
        return x


class PackedDropoutMask:
    """Dropout mask of an [N, C] tensor kept as 1-bit codes, rows padded to whole bytes."""

    def __init__(self, shape, p, device, generator=None):
        n, c = shape
        self.cols = -(-c // 8) * 8
        self.c = c
        self.scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
        keep = torch.empty(n, self.cols, device=device).bernoulli_(1.0 - p, generator=generator)
        self.packed = codec_torch.torch_pack(keep.to(torch.uint8), 1)

    def scaled_rows(self, packed, lo, hi, dtype):
        bytes_per_row = self.cols // 8
        bits = codec_torch.torch_unpack(
            packed[lo * bytes_per_row : hi * bytes_per_row], 1, (hi - lo) * self.cols
        )
        return bits.view(hi - lo, self.cols)[:, : self.c].to(dtype) * self.scale


class PackedDropoutFunction(torch.autograd.Function):
    """y * mask * scale, keeping only the 1-bit mask for backward."""

    @staticmethod
    def forward(ctx, y, packed, mask: PackedDropoutMask):
        ctx.mask = mask
        ctx.save_for_backward(packed)
        return y * mask.scaled_rows(packed, 0, y.shape[0], y.dtype)

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        return dy * ctx.mask.scaled_rows(packed, 0, dy.shape[0], dy.dtype), None, None


def _keep_input(ctx, x, cfg):
    """Save what rebuilds the input in backward: x itself, or the previous layer's codes."""
    kept = [x] if cfg.input_source is None else cfg.input_source.tensors()
    ctx.n_kept = len(kept)
    ctx.x_shape, ctx.x_dtype, ctx.x_device = x.shape, x.dtype, x.device
    return kept


def _input_rows(ctx, cfg, kept, lo, hi):
    if cfg.input_source is None:
        return kept[0][lo:hi]
    return cfg.input_source.rows(kept, lo, hi)


def _lstm_output_rows_fn(store, ops, levels, dtype, w_hr):
    """``LayerConfig.output_rows`` of the Triton path: one output kernel over the packed rows."""

    def output_rows(data, first, last):
        m = ops.lstm_output(store.rows_at(data, first, last), levels, dtype)
        return m if w_hr is None else m @ w_hr.t()

    return output_rows


def _gru_output_rows_fn(store, ops, levels, dtype):
    def output_rows(data, first, last):  # h_t exactly as the forward pass fed it to the next step
        return ops.gru_output(store.rows_at(data, first, last), levels, dtype)

    return output_rows


def _lstm_output_rows_fn_tables(store, tables, w_hr):
    """As :func:`_lstm_output_rows_fn` for the torch path, decoding by the layer's lookup tables
    (bit-identical)."""

    def output_rows(data, first, last):
        codes = store.read_rows(data, first, last)
        m = tables.lookup("value", _SIG, codes[:, 3, : store.hidden])
        m = (m * tables.lookup("value", _TANH, codes[:, 4, : store.hidden])).to(tables.dtype)
        return m if w_hr is None else m @ w_hr.t()

    return output_rows


def _gru_output_rows_fn_tables(store, tables):
    def output_rows(data, first, last):
        codes = store.read_rows(data, first, last)
        return tables.lookup("value", _TANH, codes[:, 3, : store.hidden]).to(tables.dtype)

    return output_rows


def _finish_rows(layout: SequenceLayout) -> list[int]:
    """Per processing step s, the first row that takes its last step there: rows [done, bs) finish
    at step s (done = the batch size of step s + 1, or 0 after the last step)."""
    sizes = [layout.batch_sizes[t] for t in layout.order]
    return sizes[1:] + [0]


def _split_steps(rows: torch.Tensor, cfg, steps: list[int], lo: int, dim: int = 0) -> list:
    """Views of the rows of each step of a chunk (``steps``, processing order) in ``rows``, whose
    dimension ``dim`` runs over the chunk's rows lo.. in time order, as in the packed data."""
    sizes, offsets = cfg.layout.batch_sizes, cfg.layout.offsets
    bs = sizes[steps[0]]
    if all(sizes[t] == bs for t in steps):
        views = rows.unflatten(dim, (len(steps), bs)).unbind(dim)  # one call for all steps
        t0 = min(steps)
        return [views[t - t0] for t in steps]
    return [rows.narrow(dim, offsets[t] - lo, sizes[t]) for t in steps]


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b, without a temporary where the dtypes agree."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _split_proc(rows: torch.Tensor, sizes: list[int], dim: int = 0) -> list[torch.Tensor]:
    """Views of consecutive blocks of ``sizes`` rows along ``dim`` (steps in processing order)."""
    if all(bs == sizes[0] for bs in sizes):
        return list(rows.unflatten(dim, (len(sizes), sizes[0])).unbind(dim))
    return list(rows.split(sizes, dim))


def _backward_buffers(ctx, acc, states, state_grads, weights, bias_rows):
    """Gradient accumulators of one layer's backward, in the compute dtype ``acc``: per state the
    incoming dL/d(final state) (a copy: backward updates it in place) or zeros; zeros per weight
    (None stays None) and per bias (``bias_rows`` each; None without biases); and dx, None when the
    input needs no gradient."""
    device = ctx.x_device
    d_states = [
        torch.zeros_like(s, dtype=acc) if g is None else g.to(acc).clone()
        for s, g in zip(states, state_grads)
    ]
    d_weights = [None if w is None else torch.zeros_like(w, dtype=acc) for w in weights]
    d_biases = [torch.zeros(n, dtype=acc, device=device) if ctx.has_bias else None for n in bias_rows]
    dx = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=device) if ctx.needs_input_grad[0] else None
    return d_states, d_weights, d_biases, dx


# ------------------------------------------------------------------------------------------------
# LSTM, torch backend: chunked forward and backward


def _lstm_forward_chunked(x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes):
    """-> y, h_n, c_n (compute dtype), final o/u codes, checkpoints. Bit-identical to stepping
    ``rnn_torch.lstm_step_forward``."""
    layout, sizes = cfg.layout, cfg.layout.batch_sizes
    dtype, device = x.dtype, x.device
    acc = compute_dtype(dtype)
    B, P = h0.shape
    H = c0.shape[1]
    step = rnn_torch.LSTMForwardStep(cfg.tables(dtype, device), B, H, device)
    y = torch.empty(layout.total_rows, P, dtype=dtype, device=device)
    h_n = torch.empty(B, P, dtype=dtype, device=device)
    c_n = torch.empty(B, H, dtype=acc, device=device)
    final_codes = torch.empty(2, B, H, dtype=torch.uint8, device=device)
    c_init = c0.to(acc)
    w_hh_t = w_hh.t()
    w_hr_t = None if w_hr is None else w_hr.t()
    direct = w_hr is None and dtype == acc  # m goes straight into y
    max_rows = min(cfg.chunk, len(sizes)) * B
    rows_buf = store.rows_buffer(max_rows)  # the chunk's codes, uint8, as the store packs them
    k_buf = torch.empty(max_rows, rnn_torch.LSTM_CODES, H, dtype=torch.int32, device=device)
    finish = _finish_rows(layout)
    checkpoints = []
    h_prev = c_prev = None
    prev_bs = 0
    for first, steps in cfg.chunks():
        lo, hi = layout.row_span(steps)
        xproj = x[lo:hi] @ w_ih.t()
        if b is not None:
            xproj += b
        psizes = [sizes[t] for t in steps]
        xps = _split_steps(xproj, cfg, steps, lo)
        outs = _split_steps(y[lo:hi], cfg, steps, lo)
        k_gates = _split_proc(k_buf[: hi - lo, :4], psizes)
        k_u = _split_proc(k_buf[: hi - lo, 4], psizes)
        for j, bs in enumerate(psizes):
            h_in = _step_input(h_prev, prev_bs, bs, h0)
            c_in = _step_input(c_prev, prev_bs, bs, c_init)
            if j == 0 and first:
                checkpoints.append(c_in if c_in is c_prev else c_in.clone())
            v = step.rows(bs)
            if dtype == acc:
                torch.addmm(xps[j], h_in, w_hh_t, out=v.gates)
            else:
                v.gates.copy_(torch.addmm(xps[j], h_in, w_hh_t))
            out = outs[j]
            c_new, m = step(v, c_in, k_gates[j], k_u[j], out if direct else None)
            if not direct:
                m = m.to(dtype)
                if w_hr_t is None:
                    out.copy_(m)
                else:
                    torch.mm(m, w_hr_t, out=out)
            done = finish[first + j]
            if done < bs:
                h_n[done:bs] = out[done:bs]
                c_n[done:bs] = c_new[done:bs]
                final_codes[0, done:bs] = k_gates[j][done:bs, 3]
                final_codes[1, done:bs] = k_u[j][done:bs]
            h_prev, c_prev, prev_bs = out, c_new, bs
        if keep_codes:
            rows_buf[: hi - lo, :, :H] = k_buf[: hi - lo]
            store.write_rows(codes_data, first, first + len(steps) - 1, rows_buf[: hi - lo])
    return y, h_n, c_n, final_codes, checkpoints


def _lstm_backward_chunked(
    ctx, kept, h0, c0, w_ih, w_hh, w_hr, codes_data, checkpoints, dy, dh_n, dc_n
):
    cfg = ctx.cfg
    store, layout, sizes = cfg.store, cfg.layout, cfg.layout.batch_sizes
    dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
    tables = cfg.tables(dtype, device)
    H, P = c0.shape[1], h0.shape[1]
    w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
    w_hr_a = w_hr.to(acc) if w_hr is not None else None
    c_init, h_init = c0.to(acc), h0.to(acc)

    (dh_state, dc_state), (d_w_ih, d_w_hh, d_w_hr), (d_b,), dx = _backward_buffers(
        ctx, acc, (h0, c0), (dh_n, dc_n), (w_ih, w_hh, w_hr), (w_ih.shape[0],)
    )

    # The step processed after the current one hands back its dgates (dh = dy + dgates @ W_hh) and
    # dc * f; where the batch size changes they go through dh_state / dc_state instead.
    pend_dg = pend_dcf = None
    pend_bs = 0

    def flush():
        torch.mm(pend_dg, w_hh_a, out=dh_state[:pend_bs])
        dc_state[:pend_bs] = pend_dcf

    chunks = list(cfg.chunks())
    for k in range(len(chunks) - 1, -1, -1):
        first, steps = chunks[k]
        last = first + len(steps) - 1
        lo, hi = layout.row_span(steps)
        R = hi - lo
        psizes = [sizes[t] for t in steps]
        codes, before = _chunk_rows(store, codes_data, first, last)

        def split(rows, dim=0):
            return _split_steps(rows, cfg, steps, lo, dim)

        def as_output(m):  # h_t exactly as the forward pass fed it to the next step, in acc
            m = m.to(dtype)
            return (m if w_hr is None else m @ w_hr.t()).to(acc)

        m_before = None
        if before is not None:
            o_b = tables.lookup("value", _SIG, before[:, 3])
            u_b = tables.lookup("value", _TANH, before[:, 4])
            m_before = as_output(o_b * u_b)
        # What the gate gradients need, for the whole chunk, gathered from tables of the codes'
        # values, derivatives and products of two codes' (i and g; o and u):
        # p = [g d_i, c_prev d_f, i d_g] plane by plane, o d_u, u d_o, m = o u, i g.
        idx = tables.indices(codes)
        del codes, before
        i_g, o_u = tables.pair_index(idx[0], idx[2]), tables.pair_index(idx[3], idx[4])
        f_v = tables.gather(tables.table("value", _SIG), idx[1], (R, H))
        d_f = tables.gather(tables.table("deriv", _SIG), idx[1], (R, H))
        del idx
        p = torch.empty(3, R, H, dtype=acc, device=device)
        torch.index_select(tables.pair_table("b_da"), 0, i_g, out=p[0].view(-1))
        torch.index_select(tables.pair_table("a_db"), 0, i_g, out=p[2].view(-1))
        ig = tables.gather(tables.pair_table("ab"), i_g, (R, H))
        del i_g
        o_du = tables.gather(tables.pair_table("a_db"), o_u, (R, H))
        u_do = tables.gather(tables.pair_table("b_da"), o_u, (R, H))
        m_all = tables.gather(tables.pair_table("ab"), o_u, (R, H))
        del o_u

        # c_{t-1} of every step, rebuilt from the checkpoint with the forward's arithmetic (a mul,
        # then an add: bit-identical), into p[1]; then times d_f.
        f_s, ig_s, cp_s = split(f_v), split(ig), split(p[1])
        cp_s[0].copy_(c_init[: psizes[0]] if k == 0 else checkpoints[k - 1])
        for j in range(len(steps) - 1):
            bs, bs_next = psizes[j], psizes[j + 1]
            if bs == bs_next:
                torch.mul(f_s[j], cp_s[j], out=cp_s[j + 1]).add_(ig_s[j])
            else:
                n = min(bs, bs_next)
                torch.mul(f_s[j][:n], cp_s[j][:n], out=cp_s[j + 1][:n]).add_(ig_s[j][:n])
                if bs_next > bs:
                    cp_s[j + 1][bs:] = c_init[bs:bs_next]
        del ig, ig_s, cp_s
        p[1].mul_(d_f)
        del d_f

        # The sequential recursion: per step dh (one matmul), dc, dgates, dc * f.
        dgates = torch.empty(R, 4 * H, dtype=acc, device=device)
        dg4 = dgates.view(R, 4, H)
        dys = torch.zeros(R, P, dtype=acc, device=device) if dy is None else dy[lo:hi].to(acc)
        dhs = torch.empty(R, P, dtype=acc, device=device) if w_hr is not None else None
        dy_s, odu_s, udo_s = split(dys), split(o_du), split(u_do)
        p_s, dgifg_s = split(p, dim=1), split(dg4[:, :3].transpose(0, 1), dim=1)  # [3, bs, H]
        dg_s, dgo_s = split(dgates), split(dg4[:, 3])
        dh_s = split(dhs) if dhs is not None else [None] * len(steps)
        for j in range(len(steps) - 1, -1, -1):
            bs = psizes[j]
            if pend_dg is not None and pend_bs == bs:
                dh = torch.addmm(dy_s[j], pend_dg, w_hh_a, out=dh_s[j])
                dc = pend_dcf
            else:
                if pend_dg is not None:
                    flush()
                dh = torch.add(dy_s[j], dh_state[:bs], out=dh_s[j])
                dc = dc_state[:bs]
            dm = dh if w_hr_a is None else dh @ w_hr_a
            dc = torch.addcmul(dc, dm, odu_s[j])
            torch.mul(dc, p_s[j], out=dgifg_s[j])
            torch.mul(dm, udo_s[j], out=dgo_s[j])
            pend_dg, pend_dcf, pend_bs = dg_s[j], dc.mul_(f_s[j]), bs
        pend_dg = pend_dg.clone()  # not a view into this chunk's buffer
        del p, o_du, u_do, f_v, f_s, p_s, odu_s, udo_s, dy_s, dys

        # Chunk-wide: h_{t-1} rows, weight gradients, dx.
        h_prev = _previous_rows(as_output(m_all), m_before, h_init, cfg, steps, lo, acc)
        d_w_hh.addmm_(dgates.t(), h_prev)
        del h_prev
        d_w_ih.addmm_(dgates.t(), _input_rows(ctx, cfg, kept, lo, hi).to(acc))
        if d_b is not None:
            d_b += dgates.sum(0)
        if d_w_hr is not None:
            d_w_hr.addmm_(dhs.t(), m_all)
        if dx is not None:
            _mm_into(dgates, w_ih_a, dx[lo:hi])
        del dgates, dg4, dg_s, dgifg_s, dgo_s, dh_s, dhs, m_all, m_before  # before the next chunk's
    if pend_dg is not None:
        flush()
    return dx, dh_state, dc_state, d_w_ih, d_w_hh, d_b, d_w_hr


# ------------------------------------------------------------------------------------------------
# GRU, torch backend: chunked forward and backward


def _gru_forward_chunked(x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes):
    """-> y, h_n, final h codes. Bit-identical to stepping ``rnn_torch.gru_step_forward``."""
    layout, sizes = cfg.layout, cfg.layout.batch_sizes
    dtype, device = x.dtype, x.device
    acc = compute_dtype(dtype)
    B, H = h0.shape
    step = rnn_torch.GRUForwardStep(cfg.tables(dtype, device), B, H, device)
    y = torch.empty(layout.total_rows, H, dtype=dtype, device=device)
    h_n = torch.empty(B, H, dtype=dtype, device=device)
    final_codes = torch.empty(1, B, H, dtype=torch.uint8, device=device)
    w_hh_t = w_hh.t()
    direct = dtype == acc
    max_rows = min(cfg.chunk, len(sizes)) * B
    rows_buf = store.rows_buffer(max_rows)  # the chunk's codes, uint8, as the store packs them
    k_buf = torch.empty(max_rows, rnn_torch.GRU_CODES, H, dtype=torch.int32, device=device)
    finish = _finish_rows(layout)
    h_prev = None
    prev_bs = 0
    for first, steps in cfg.chunks():
        lo, hi = layout.row_span(steps)
        gx = x[lo:hi] @ w_ih.t()
        if b_ih is not None:
            gx += b_ih
        gx3 = gx.to(acc).view(hi - lo, 3, H)
        psizes = [sizes[t] for t in steps]
        gx_rz = _split_steps(gx3[:, :2], cfg, steps, lo)
        gx_n = _split_steps(gx3[:, 2], cfg, steps, lo)
        outs = _split_steps(y[lo:hi], cfg, steps, lo)
        k_chunk = k_buf[: hi - lo]
        k_rz = _split_proc(k_chunk[:, :2].transpose(0, 1), psizes, dim=1)
        k_n, k_h = _split_proc(k_chunk[:, 2], psizes), _split_proc(k_chunk[:, 3], psizes)
        for j, bs in enumerate(psizes):
            h_in = _step_input(h_prev, prev_bs, bs, h0)
            v = step.rows(bs)
            if dtype == acc:
                gh = torch.mm(h_in, w_hh_t, out=v.gh)
            else:
                gh = h_in @ w_hh_t
            if b_hh is not None:
                gh += b_hh
            if dtype != acc:
                v.gh.copy_(gh)
            out = outs[j]
            h = step(v, gx_rz[j], gx_n[j], h_in, k_rz[j], k_n[j], k_h[j], out if direct else None)
            if not direct:
                out.copy_(h)
            done = finish[first + j]
            if done < bs:
                h_n[done:bs] = out[done:bs]
                final_codes[0, done:bs] = k_h[j][done:bs]
            h_prev, prev_bs = out, bs
        if keep_codes:
            rows_buf[: hi - lo, :, :H] = k_chunk
            store.write_rows(codes_data, first, first + len(steps) - 1, rows_buf[: hi - lo])
    return y, h_n, final_codes


def _gru_backward_chunked(ctx, kept, h0, w_ih, w_hh, b_hh, codes_data, dy, dh_n):
    cfg = ctx.cfg
    store, layout, sizes = cfg.store, cfg.layout, cfg.layout.batch_sizes
    dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
    tables = cfg.tables(dtype, device)
    H = w_hh.shape[1]
    w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
    w_hn_a = w_hh_a[2 * H :]
    b_hn_a = b_hh[2 * H :].to(acc) if b_hh is not None else None
    h_init = h0.to(acc)

    (dh_state,), (d_w_ih, d_w_hh), (d_b_ih, d_b_hh), dx = _backward_buffers(
        ctx, acc, (h0,), (dh_n,), (w_ih, w_hh), (3 * H, 3 * H)
    )

    # dh_{t-1} = dh_t * z_t + dgh_t @ W_hh, handed over from the step processed after the current
    # one (through dh_state where the batch size changes).
    pend_dh = pend_z = pend_dgh = None
    pend_bs = 0

    def flush():
        torch.addmm(pend_dh * pend_z, pend_dgh, w_hh_a, out=dh_state[:pend_bs])

    chunks = list(cfg.chunks())
    for k in range(len(chunks) - 1, -1, -1):
        first, steps = chunks[k]
        last = first + len(steps) - 1
        lo, hi = layout.row_span(steps)
        R = hi - lo
        psizes = [sizes[t] for t in steps]
        codes, before = _chunk_rows(store, codes_data, first, last)

        def split(rows, dim=0):
            return _split_steps(rows, cfg, steps, lo, dim)

        h_before = None if before is None else tables.lookup("output", _TANH, before[:, 3])
        idx = tables.indices(codes)
        del codes, before

        def gather(which, kind, q):
            return tables.gather(tables.table(which, kind), idx[q], (R, H))

        h_prev = _previous_rows(gather("output", _TANH, 3), h_before, h_init, cfg, steps, lo, acc)
        # h W_hn^T + b_hn, needed for dr, is recomputed for the whole chunk in one matmul.
        gh_n = h_prev @ w_hn_a.t()
        if b_hn_a is not None:
            gh_n += b_hn_a
        # dgh = dh * kk with kk = [(1 - z) d_n gh_n d_r, (h_prev - n) d_z, (1 - z) d_n r]; dgx is the
        # same with (1 - z) d_n as its last plane.
        a_n = tables.gather(tables.pair_table("a_n"), tables.pair_index(idx[1], idx[2]), (R, H))
        kk = torch.empty(3, R, H, dtype=acc, device=device)  # plane by plane
        torch.mul(a_n, gh_n, out=kk[0]).mul_(gather("deriv", _SIG, 0))
        del gh_n
        torch.sub(h_prev, gather("value", _TANH, 2), out=kk[1]).mul_(gather("deriv", _SIG, 1))
        torch.mul(a_n, gather("value", _SIG, 0), out=kk[2])
        z_v = gather("value", _SIG, 1)
        del idx

        dhs = torch.empty(R, H, dtype=acc, device=device)
        dg = torch.empty(R, 3 * H, dtype=acc, device=device)
        dys = torch.zeros(R, H, dtype=acc, device=device) if dy is None else dy[lo:hi].to(acc)
        dy_s, z_s, kk_s = split(dys), split(z_v), split(kk, dim=1)
        dh_s, dg_s = split(dhs), split(dg)
        dg3_s = split(dg.view(R, 3, H).transpose(0, 1), dim=1)  # [3, bs, H]
        for j in range(len(steps) - 1, -1, -1):
            bs = psizes[j]
            if pend_dh is not None and pend_bs == bs:
                base = torch.addcmul(dy_s[j], pend_dh, pend_z)
                torch.addmm(base, pend_dgh, w_hh_a, out=dh_s[j])
            else:
                if pend_dh is not None:
                    flush()
                torch.add(dy_s[j], dh_state[:bs], out=dh_s[j])
            torch.mul(dh_s[j], kk_s[j], out=dg3_s[j])
            pend_dh, pend_z, pend_dgh, pend_bs = dh_s[j], z_s[j], dg_s[j], bs
        pend_dh, pend_z, pend_dgh = pend_dh.clone(), pend_z.clone(), pend_dgh.clone()
        del kk, z_v, dy_s, z_s, kk_s, dys

        d_w_hh.addmm_(dg.t(), h_prev)
        del h_prev
        if d_b_hh is not None:
            d_b_hh += dg.sum(0)
        torch.mul(dhs, a_n, out=dg.view(R, 3, H)[:, 2])  # dg is now d_gx
        d_w_ih.addmm_(dg.t(), _input_rows(ctx, cfg, kept, lo, hi).to(acc))
        if d_b_ih is not None:
            d_b_ih += dg.sum(0)
        if dx is not None:
            _mm_into(dg, w_ih_a, dx[lo:hi])
        del dg, dhs, dh_s, dg_s, dg3_s, a_n  # before the next chunk's
    if pend_dh is not None:
        flush()
    return dx, dh_state, d_w_ih, d_w_hh, d_b_ih, d_b_hh


class LSTMLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b, w_hr, cfg: LayerConfig):
        # Unused outputs (the code buffer, the packed final state) must not get zero-filled
        # gradients of their full size in backward: that would double the peak.
        ctx.set_materialize_grads(False)
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype = x.dtype
        hidden = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
        store = CodeStore(layout, rnn_torch.LSTM_CODES, hidden, cfg.bits, x.device, ops)
        # Nothing is kept when no input needs a gradient (inference, e.g. streaming).
        keep_codes = any(ctx.needs_input_grad)
        codes_data = store.new_buffer() if keep_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
        if cfg.chunked:
            y, h, c, final_codes, checkpoints = _lstm_forward_chunked(
                x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes
            )
            cfg.output_rows = _lstm_output_rows_fn_tables(store, cfg.tables(dtype, x.device), w_hr)
        else:
            y, h, c, final_codes, checkpoints = LSTMLayerFunction._forward_steps(
                x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes
            )
            cfg.output_rows = _lstm_output_rows_fn(store, ops, levels, dtype, w_hr)
        cfg.store = store
        ctx.cfg = cfg
        ctx.has_bias = b is not None
        kept = _keep_input(ctx, x, cfg)
        ctx.save_for_backward(*kept, h0, c0, w_ih, w_hh, w_hr, codes_data, *checkpoints)
        c_state = c.clone()  # the compute-dtype cell state, for the packed (detached) final state
        ctx.mark_non_differentiable(codes_data, final_codes, c_state)
        return y, h, c.to(dtype), codes_data, final_codes, c_state

    @staticmethod
    def _forward_steps(x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes):
        """Forward through the per-step ``ops`` functions (the Triton kernels): per step one matmul
        and one kernel, which packs the step's codes straight into the code store, updates c in
        place and writes m into the output rows (the next step's h_{t-1})."""
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype, acc = x.dtype, compute_dtype(x.dtype)
        B, P = h0.shape
        c = c0.to(acc).clone()  # every row's latest cell state, updated in place
        y = torch.empty(layout.total_rows, P, dtype=dtype, device=x.device)
        h_n = torch.empty_like(h0)
        # o and u codes of each row's last step: the packed final state (h = o * u)
        final_codes = torch.empty(2, *c0.shape, dtype=torch.uint8, device=x.device)
        finish = _finish_rows(layout)
        w_hh_t = w_hh.t()
        checkpoints = []
        h_prev, prev_bs = None, 0
        for first, steps in cfg.chunks():
            if first:
                checkpoints.append(c.clone())
            lo, hi = layout.row_span(steps)
            xproj = x[lo:hi] @ w_ih.t()
            if b is not None:
                xproj += b
            for s, t in enumerate(steps, start=first):
                bs, rows = layout.batch_sizes[t], layout.rows(t)
                h_in = _step_input(h_prev, prev_bs, bs, h0)
                gates = torch.addmm(xproj[rows.start - lo : rows.stop - lo], h_in, w_hh_t)
                out = store.rows_at(codes_data, s, s) if keep_codes else None
                _, _, m = ops.lstm_step_forward(
                    gates, c[:bs], levels, out=out, final=final_codes, done=finish[s],
                    store=keep_codes, c_out=c[:bs], m_out=y[rows] if w_hr is None else None,
                )
                if w_hr is not None:
                    torch.mm(m.to(dtype), w_hr.t(), out=y[rows])
                h_prev, prev_bs = y[rows], bs
                if finish[s] < bs:
                    h_n[finish[s] : bs] = h_prev[finish[s] :]
        return y, h_n, c, final_codes, checkpoints

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _codes, _final, _c):
        saved = ctx.saved_tensors
        kept = saved[: ctx.n_kept]
        h0, c0, w_ih, w_hh, w_hr, codes_data, *checkpoints = saved[ctx.n_kept :]
        if ctx.cfg.chunked:
            grads = _lstm_backward_chunked(
                ctx, kept, h0, c0, w_ih, w_hh, w_hr, codes_data, checkpoints, dy, dh_n, dc_n
            )
        else:
            grads = LSTMLayerFunction._backward_steps(
                ctx, kept, h0, c0, w_ih, w_hh, w_hr, codes_data, checkpoints, dy, dh_n, dc_n
            )
        dx, dh_state, dc_state, d_w_ih, d_w_hh, d_b, d_w_hr = grads

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return (
            dx,
            dh_state.to(h0.dtype),
            dc_state.to(c0.dtype),
            cast(d_w_ih, w_ih),
            cast(d_w_hh, w_hh),
            None if d_b is None else d_b.to(ctx.x_dtype),
            cast(d_w_hr, w_hr) if w_hr is not None else None,
            None,
        )

    @staticmethod
    def _backward_steps(ctx, kept, h0, c0, w_ih, w_hh, w_hr, codes_data, checkpoints, dy, dh_n, dc_n):
        """Backward through the per-step ``ops`` functions (the Triton kernels), which read the
        packed codes in place; h_{t-1} of a whole chunk comes from one output launch."""
        cfg = ctx.cfg
        store, layout, levels, ops = cfg.store, cfg.layout, cfg.levels, cfg.ops
        sizes = layout.batch_sizes
        dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
        P = h0.shape[1]
        w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
        w_hr_a = w_hr.to(acc) if w_hr is not None else None
        c_init, h_init = c0.to(acc), h0.to(acc)

        (dh_state, dc_state), (d_w_ih, d_w_hh, d_w_hr), (d_b,), dx = _backward_buffers(
            ctx, acc, (h0, c0), (dh_n, dc_n), (w_ih, w_hh, w_hr), (w_ih.shape[0],)
        )

        def as_output(m):  # h_t exactly as the forward pass fed it to the next step, in acc
            m = m.to(dtype)
            return (m if w_hr is None else m @ w_hr.t()).to(acc)

        chunks = list(cfg.chunks())
        for k in range(len(chunks) - 1, -1, -1):
            first, steps = chunks[k]
            last = first + len(steps) - 1
            lo, hi = layout.row_span(steps)
            psizes = [sizes[t] for t in steps]
            step_codes = [store.rows_at(codes_data, s, s) for s in range(first, last + 1)]

            # Cell states before each step, rebuilt from the checkpoint with the saved codes.
            c_prevs = [(checkpoints[k - 1] if k else c_init)[: psizes[0]]]
            for j in range(len(steps) - 1):
                c_next = ops.lstm_recompute_cell(step_codes[j], c_prevs[j], levels)
                c_prevs.append(_step_input(c_next, psizes[j], psizes[j + 1], c_init))

            # m = o * u of every step of the chunk and of the step before it, one launch.
            m_rows = ops.lstm_output(store.rows_at(codes_data, max(first - 1, 0), last), levels, acc)
            n_before = sizes[layout.order[first - 1]] if first else 0
            m_chunk = layout.to_time_order(m_rows[n_before:], first, last)
            before = as_output(m_rows[:n_before]) if first else None
            del m_rows

            def split(rows):
                return _split_steps(rows, cfg, steps, lo)

            dgates = torch.empty(hi - lo, w_ih.shape[0], dtype=acc, device=device)
            dhs = torch.empty(hi - lo, P, dtype=acc, device=device) if w_hr is not None else None
            dg_s, dh_s = split(dgates), split(dhs) if dhs is not None else None
            dy_s = split(dy[lo:hi]) if dy is not None else None
            for j in range(len(steps) - 1, -1, -1):
                bs = psizes[j]
                dh = dh_state[:bs] if dy_s is None else dh_state[:bs] + dy_s[j].to(acc)
                if w_hr is not None:
                    dh_s[j].copy_(dh)
                    dm = dh @ w_hr_a
                else:
                    dm = dh
                ops.lstm_step_backward(step_codes[j], c_prevs[j], dm, dc_state[:bs], levels,
                                       dgates_out=dg_s[j], dc_prev_out=dc_state[:bs])
                torch.mm(dg_s[j], w_hh_a, out=dh_state[:bs])
            del c_prevs

            h_prev = _previous_rows(as_output(m_chunk), before, h_init, cfg, steps, lo, acc)
            d_w_hh.addmm_(dgates.t(), h_prev)
            del h_prev
            d_w_ih.addmm_(dgates.t(), _input_rows(ctx, cfg, kept, lo, hi).to(acc))
            if d_b is not None:
                d_b += dgates.sum(0)
            if d_w_hr is not None:
                d_w_hr.addmm_(dhs.t(), m_chunk)
            if dx is not None:
                _mm_into(dgates, w_ih_a, dx[lo:hi])
        return dx, dh_state, dc_state, d_w_ih, d_w_hh, d_b, d_w_hr


class GRULayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, cfg: LayerConfig):
        ctx.set_materialize_grads(False)  # see LSTMLayerFunction.forward
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype = x.dtype
        hidden = w_hh.shape[1]
        store = CodeStore(layout, rnn_torch.GRU_CODES, hidden, cfg.bits, x.device, ops)
        keep_codes = any(ctx.needs_input_grad)
        codes_data = store.new_buffer() if keep_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
        if cfg.chunked:
            y, h, final_codes = _gru_forward_chunked(
                x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes
            )
            cfg.output_rows = _gru_output_rows_fn_tables(store, cfg.tables(dtype, x.device))
        else:
            y, h, final_codes = GRULayerFunction._forward_steps(
                x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes
            )
            cfg.output_rows = _gru_output_rows_fn(store, ops, levels, dtype)
        cfg.store = store
        ctx.cfg = cfg
        ctx.has_bias = b_ih is not None
        kept = _keep_input(ctx, x, cfg)
        ctx.save_for_backward(*kept, h0, w_ih, w_hh, b_hh, codes_data)
        ctx.mark_non_differentiable(codes_data, final_codes)
        return y, h, codes_data, final_codes

    @staticmethod
    def _forward_steps(x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes):
        """Forward through the per-step ``ops`` functions (the Triton kernels): per step one matmul
        and one kernel, which packs the codes straight into the code store and writes h into the
        output rows (see :meth:`LSTMLayerFunction._forward_steps`)."""
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype = x.dtype
        y = torch.empty(layout.total_rows, w_hh.shape[1], dtype=dtype, device=x.device)
        h_n = torch.empty_like(h0)
        final_codes = torch.empty(1, *h0.shape, dtype=torch.uint8, device=x.device)
        finish = _finish_rows(layout)
        w_hh_t = w_hh.t()
        h_prev, prev_bs = None, 0
        for first, steps in cfg.chunks():
            lo, hi = layout.row_span(steps)
            gx = x[lo:hi] @ w_ih.t()
            if b_ih is not None:
                gx += b_ih
            for s, t in enumerate(steps, start=first):
                bs, rows = layout.batch_sizes[t], layout.rows(t)
                h_in = _step_input(h_prev, prev_bs, bs, h0)
                gh = torch.mm(h_in, w_hh_t)
                if b_hh is not None:
                    gh += b_hh  # as the torch path (addmm rounds differently in bfloat16)
                out = store.rows_at(codes_data, s, s) if keep_codes else None
                ops.gru_step_forward(
                    gx[rows.start - lo : rows.stop - lo], gh, h_in, levels, out=out,
                    final=final_codes, done=finish[s], store=keep_codes, h_out=y[rows],
                )
                h_prev, prev_bs = y[rows], bs
                if finish[s] < bs:
                    h_n[finish[s] : bs] = h_prev[finish[s] :]
        return y, h_n, final_codes

    @staticmethod
    def backward(ctx, dy, dh_n, _codes, _final):
        saved = ctx.saved_tensors
        kept = saved[: ctx.n_kept]
        h0, w_ih, w_hh, b_hh, codes_data = saved[ctx.n_kept :]
        if ctx.cfg.chunked:
            grads = _gru_backward_chunked(ctx, kept, h0, w_ih, w_hh, b_hh, codes_data, dy, dh_n)
        else:
            grads = GRULayerFunction._backward_steps(
                ctx, kept, h0, w_ih, w_hh, b_hh, codes_data, dy, dh_n
            )
        dx, dh_state, d_w_ih, d_w_hh, d_b_ih, d_b_hh = grads
        dtype = ctx.x_dtype
        return (
            dx,
            dh_state.to(dtype),
            d_w_ih.to(w_ih.dtype),
            d_w_hh.to(w_hh.dtype),
            None if d_b_ih is None else d_b_ih.to(dtype),
            None if d_b_hh is None else d_b_hh.to(dtype),
            None,
        )

    @staticmethod
    def _backward_steps(ctx, kept, h0, w_ih, w_hh, b_hh, codes_data, dy, dh_n):
        """Backward through the per-step ``ops`` functions (the Triton kernels), which read the
        packed codes in place; h_{t-1} of a whole chunk comes from one output launch."""
        cfg = ctx.cfg
        store, layout, levels, ops = cfg.store, cfg.layout, cfg.levels, cfg.ops
        sizes = layout.batch_sizes
        dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
        H = w_hh.shape[1]
        w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
        w_hn_a = w_hh_a[2 * H :]
        b_hn_a = b_hh[2 * H :].to(acc) if b_hh is not None else None
        h_init = h0.to(acc)

        (dh_state,), (d_w_ih, d_w_hh), (d_b_ih, d_b_hh), dx = _backward_buffers(
            ctx, acc, (h0,), (dh_n,), (w_ih, w_hh), (3 * H, 3 * H)
        )

        chunks = list(cfg.chunks())
        for k in range(len(chunks) - 1, -1, -1):
            first, steps = chunks[k]
            last = first + len(steps) - 1
            lo, hi = layout.row_span(steps)
            psizes = [sizes[t] for t in steps]

            # h_t of every step of the chunk and of the step before it, as forward fed them on.
            h_rows = ops.gru_output(store.rows_at(codes_data, max(first - 1, 0), last), levels, dtype)
            h_rows = h_rows.to(acc)
            n_before = sizes[layout.order[first - 1]] if first else 0
            out_rows = layout.to_time_order(h_rows[n_before:], first, last)
            before = h_rows[:n_before] if first else None
            h_prev = _previous_rows(out_rows, before, h_init, cfg, steps, lo, acc)
            del h_rows, out_rows, before
            # h W_hn^T + b_hn, needed for dr, is recomputed for the whole chunk in one matmul.
            gh_n = h_prev @ w_hn_a.t()
            if b_hn_a is not None:
                gh_n += b_hn_a

            def split(rows):
                return _split_steps(rows, cfg, steps, lo)

            d_gx = torch.empty(hi - lo, 3 * H, dtype=acc, device=device)
            d_gh = torch.empty(hi - lo, 3 * H, dtype=acc, device=device)
            h_prev_s, gh_n_s, d_gx_s, d_gh_s = split(h_prev), split(gh_n), split(d_gx), split(d_gh)
            dy_s = split(dy[lo:hi]) if dy is not None else None
            for j in range(len(steps) - 1, -1, -1):
                bs = psizes[j]
                dh = dh_state[:bs] if dy_s is None else dh_state[:bs] + dy_s[j].to(acc)
                ops.gru_step_backward(
                    store.rows_at(codes_data, first + j, first + j), h_prev_s[j], gh_n_s[j], dh,
                    levels, dgx_out=d_gx_s[j], dgh_out=d_gh_s[j], dh_direct_out=dh_state[:bs],
                )
                dh_state[:bs].addmm_(d_gh_s[j], w_hh_a)
            del gh_n, gh_n_s
            d_w_ih.addmm_(d_gx.t(), _input_rows(ctx, cfg, kept, lo, hi).to(acc))
            d_w_hh.addmm_(d_gh.t(), h_prev)
            if d_b_ih is not None:
                d_b_ih += d_gx.sum(0)
                d_b_hh += d_gh.sum(0)
            if dx is not None:
                _mm_into(d_gx, w_ih_a, dx[lo:hi])
        return dx, dh_state, d_w_ih, d_w_hh, d_b_ih, d_b_hh
