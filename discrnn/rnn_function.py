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
"""

from __future__ import annotations

import torch

from .kernels import codec_torch
from .kernels import rnn_torch

PAD_UNITS = 8  # rows of codes are padded to a multiple of 8 units: whole bytes for every width


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class SequenceLayout:
    """Step sizes and row offsets of a packed batch, and the processing order of one direction."""

    def __init__(self, batch_sizes: list[int], reverse: bool):
        self.batch_sizes = batch_sizes
        self.offsets = [0] * len(batch_sizes)
        for t in range(1, len(batch_sizes)):
            self.offsets[t] = self.offsets[t - 1] + batch_sizes[t - 1]
        self.total_rows = self.offsets[-1] + batch_sizes[-1] if batch_sizes else 0
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


class CodeStore:
    """Packed codes of every step of one layer and direction, in processing order.

    Step s holds codes [Q, bs, Hp] (Hp = H padded to a multiple of 8 with zero codes), packed as one
    dense bit stream; since Hp * bits is a multiple of 8, every step starts on a byte boundary.
    """

    def __init__(self, layout: SequenceLayout, n_codes: int, hidden: int, bits: int, device):
        self.layout, self.n_codes, self.hidden, self.bits = layout, n_codes, hidden, bits
        self.padded = -(-hidden // PAD_UNITS) * PAD_UNITS
        self.step_bytes = [
            n_codes * layout.batch_sizes[t] * self.padded * bits // 8 for t in layout.order
        ]
        self.step_offsets = [0] * len(self.step_bytes)
        for s in range(1, len(self.step_bytes)):
            self.step_offsets[s] = self.step_offsets[s - 1] + self.step_bytes[s - 1]
        total = self.step_offsets[-1] + self.step_bytes[-1] if self.step_bytes else 0
        self.data = torch.empty(total, dtype=torch.uint8, device=device)

    def _span(self, first: int, last: int) -> slice:
        return slice(self.step_offsets[first], self.step_offsets[last] + self.step_bytes[last])

    def write(self, first: int, codes: list[torch.Tensor]) -> None:
        """Store steps first .. first + len(codes) - 1 (processing order), each [Q, bs, H] uint8."""
        pad = self.padded - self.hidden
        flat = torch.cat(
            [(torch.nn.functional.pad(c, (0, pad)) if pad else c).reshape(-1) for c in codes]
        )
        self.data[self._span(first, first + len(codes) - 1)] = codec_torch.torch_pack(
            flat, self.bits
        )

    def read(self, first: int, last: int) -> list[torch.Tensor]:
        """Codes of steps first..last (processing order) as a list of [Q, bs, H] uint8 views."""
        sizes = [self.layout.batch_sizes[t] for t in self.layout.order[first : last + 1]]
        n = self.n_codes * sum(sizes) * self.padded
        flat = codec_torch.torch_unpack(self.data[self._span(first, last)], self.bits, n)
        out, pos = [], 0
        for bs in sizes:
            k = self.n_codes * bs * self.padded
            out.append(flat[pos : pos + k].view(self.n_codes, bs, self.padded)[:, :, : self.hidden])
            pos += k
        return out


class LayerConfig:
    """Static arguments of one layer call (not tensors, so autograd ignores them)."""

    def __init__(self, batch_sizes, levels, bits, chunk, reverse, ops):
        self.layout = SequenceLayout(batch_sizes, reverse)
        self.levels, self.bits, self.chunk, self.ops = levels, bits, chunk, ops

    def chunks(self):
        order = self.layout.order
        for first in range(0, len(order), self.chunk):
            yield first, order[first : first + self.chunk]


def _previous_output(codes_prev, bs, h0, out_fn):
    """h_{s-1} for the bs active rows of processing step s: the previous step's output where that
    step had the row active (rebuilt from its codes), h0 for rows that start at step s (all rows at
    s = 0, and rows of shorter sequences in the reverse direction)."""
    h_prev = h0[:bs].clone()
    if codes_prev is not None:
        n = min(bs, codes_prev.shape[1])
        h_prev[:n] = out_fn(codes_prev)[:n]
    return h_prev


def _chunk_codes(store, first, last):
    """Codes of steps first..last, and of step first - 1 (whose output is h_{first-1}) or None."""
    if first == 0:
        return None, store.read(first, last)
    codes = store.read(first - 1, last)
    return codes[0], codes[1:]


class LSTMLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b, w_hr, cfg: LayerConfig):
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype, acc = x.dtype, _acc(x.dtype)
        hidden = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
        h = h0.clone()
        c = c0.to(acc).clone()
        y = torch.empty(layout.total_rows, h0.shape[1], dtype=dtype, device=x.device)
        store = CodeStore(layout, rnn_torch.LSTM_CODES, hidden, cfg.bits, x.device)
        checkpoints = []
        for first, steps in cfg.chunks():
            if first:
                checkpoints.append(c.clone())
            lo, hi = layout.row_span(steps)
            xproj = x[lo:hi] @ w_ih.t()
            if b is not None:
                xproj += b
            chunk_codes = []
            for t in steps:
                bs, rows = layout.batch_sizes[t], layout.rows(t)
                gates = torch.addmm(xproj[rows.start - lo : rows.stop - lo], h[:bs], w_hh.t())
                codes, c_new, m = ops.lstm_step_forward(gates, c[:bs], levels)
                h_new = m.to(dtype) if w_hr is None else m.to(dtype) @ w_hr.t()
                y[rows] = h_new
                h[:bs] = h_new
                c[:bs] = c_new
                chunk_codes.append(codes)
            store.write(first, chunk_codes)
        ctx.cfg, ctx.store = cfg, store
        ctx.has_bias, ctx.has_proj = b is not None, w_hr is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, store.data, *checkpoints)
        return y, h, c.to(dtype)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, w_hr, _, *checkpoints = ctx.saved_tensors
        cfg, store = ctx.cfg, ctx.store
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype, acc = x.dtype, _acc(x.dtype)
        w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
        w_hr_a = w_hr.to(acc) if w_hr is not None else None

        def out_fn(codes):
            m = ops.lstm_output(codes, levels, dtype)
            return m if w_hr is None else m @ w_hr.t()

        dh_state = torch.zeros_like(h0, dtype=acc) if dh_n is None else dh_n.to(acc).clone()
        dc_state = torch.zeros_like(c0, dtype=acc) if dc_n is None else dc_n.to(acc).clone()
        if dy is None:
            dy = torch.zeros(layout.total_rows, h0.shape[1], dtype=dtype, device=x.device)
        d_w_ih = torch.zeros_like(w_ih, dtype=acc)
        d_w_hh = torch.zeros_like(w_hh, dtype=acc)
        d_b = torch.zeros(w_ih.shape[0], dtype=acc, device=x.device) if ctx.has_bias else None
        d_w_hr = torch.zeros_like(w_hr, dtype=acc) if w_hr is not None else None
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None

        chunks = list(cfg.chunks())
        for k in range(len(chunks) - 1, -1, -1):
            first, steps = chunks[k]
            last = first + len(steps) - 1
            before, codes = _chunk_codes(store, first, last)
            # Cell states before each step, recomputed from the checkpoint with the saved codes.
            c_full = (c0.to(acc) if k == 0 else checkpoints[k - 1]).clone()
            c_prevs = []
            for s, t in enumerate(steps):
                bs = layout.batch_sizes[t]
                c_prevs.append(c_full[:bs].clone())
                c_full[:bs] = ops.lstm_recompute_cell(codes[s], c_full[:bs], levels)
            lo, hi = layout.row_span(steps)
            d_gates = torch.empty(hi - lo, w_ih.shape[0], dtype=acc, device=x.device)
            h_prev_rows = torch.empty(hi - lo, h0.shape[1], dtype=acc, device=x.device)
            for s in range(len(steps) - 1, -1, -1):
                t = steps[s]
                bs, rows = layout.batch_sizes[t], layout.rows(t)
                local = slice(rows.start - lo, rows.stop - lo)
                dh = dh_state[:bs] + dy[rows].to(acc)
                if w_hr is not None:
                    m = ops.lstm_output(codes[s], levels, acc)
                    d_w_hr += dh.t() @ m
                    dm = dh @ w_hr_a
                else:
                    dm = dh
                dg, dc_prev = ops.lstm_step_backward(codes[s], c_prevs[s], dm, dc_state[:bs], levels)
                d_gates[local] = dg
                dh_state[:bs] = dg @ w_hh_a
                dc_state[:bs] = dc_prev
                prev_codes = codes[s - 1] if s > 0 else before
                h_prev_rows[local] = _previous_output(prev_codes, bs, h0, out_fn).to(acc)
            d_w_hh += d_gates.t() @ h_prev_rows
            d_w_ih += d_gates.t() @ x[lo:hi].to(acc)
            if d_b is not None:
                d_b += d_gates.sum(0)
            if dx is not None:
                dx[lo:hi] = (d_gates @ w_ih_a).to(dtype)

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return (
            dx,
            dh_state.to(dtype),
            dc_state.to(dtype),
            cast(d_w_ih, w_ih),
            cast(d_w_hh, w_hh),
            None if d_b is None else d_b.to(dtype),
            cast(d_w_hr, w_hr) if w_hr is not None else None,
            None,
        )


class GRULayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, cfg: LayerConfig):
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype = x.dtype
        hidden = w_hh.shape[1]
        h = h0.clone()
        y = torch.empty(layout.total_rows, hidden, dtype=dtype, device=x.device)
        store = CodeStore(layout, rnn_torch.GRU_CODES, hidden, cfg.bits, x.device)
        for first, steps in cfg.chunks():
            lo, hi = layout.row_span(steps)
            gx = x[lo:hi] @ w_ih.t()
            if b_ih is not None:
                gx += b_ih
            chunk_codes = []
            for t in steps:
                bs, rows = layout.batch_sizes[t], layout.rows(t)
                gh = h[:bs] @ w_hh.t()
                if b_hh is not None:
                    gh += b_hh
                codes, h_new = ops.gru_step_forward(
                    gx[rows.start - lo : rows.stop - lo], gh, h[:bs], levels
                )
                h_new = h_new.to(dtype)
                y[rows] = h_new
                h[:bs] = h_new
                chunk_codes.append(codes)
            store.write(first, chunk_codes)
        ctx.cfg, ctx.store = cfg, store
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_hh, store.data)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_n):
        x, h0, w_ih, w_hh, b_hh, _ = ctx.saved_tensors
        cfg, store = ctx.cfg, ctx.store
        layout, levels = cfg.layout, cfg.levels
        ops = cfg.ops
        dtype, acc = x.dtype, _acc(x.dtype)
        H = w_hh.shape[1]
        w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
        w_hn_a = w_hh_a[2 * H :]
        b_hn_a = b_hh[2 * H :].to(acc) if b_hh is not None else None

        def out_fn(codes):  # h_t exactly as the forward pass fed it to the next step
            return codec_torch.torch_decode(codes[3], levels, "tanh", acc).to(dtype)

        dh_state = torch.zeros_like(h0, dtype=acc) if dh_n is None else dh_n.to(acc).clone()
        if dy is None:
            dy = torch.zeros(layout.total_rows, H, dtype=dtype, device=x.device)
        d_w_ih = torch.zeros_like(w_ih, dtype=acc)
        d_w_hh = torch.zeros_like(w_hh, dtype=acc)
        d_b_ih = torch.zeros(3 * H, dtype=acc, device=x.device) if ctx.has_bias else None
        d_b_hh = torch.zeros(3 * H, dtype=acc, device=x.device) if ctx.has_bias else None
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None

        chunks = list(cfg.chunks())
        for k in range(len(chunks) - 1, -1, -1):
            first, steps = chunks[k]
            before, codes = _chunk_codes(store, first, first + len(steps) - 1)
            lo, hi = layout.row_span(steps)
            h_prev_rows = torch.empty(hi - lo, H, dtype=acc, device=x.device)
            for s, t in enumerate(steps):
                rows = layout.rows(t)
                prev_codes = codes[s - 1] if s > 0 else before
                h_prev_rows[rows.start - lo : rows.stop - lo] = _previous_output(
                    prev_codes, layout.batch_sizes[t], h0, out_fn
                ).to(acc)
            # h W_hn^T + b_hn, needed for dr, is recomputed for the whole chunk in one matmul.
            gh_n_rows = h_prev_rows @ w_hn_a.t()
            if b_hn_a is not None:
                gh_n_rows += b_hn_a
            d_gx = torch.empty(hi - lo, 3 * H, dtype=acc, device=x.device)
            d_gh = torch.empty(hi - lo, 3 * H, dtype=acc, device=x.device)
            for s in range(len(steps) - 1, -1, -1):
                t = steps[s]
                bs, rows = layout.batch_sizes[t], layout.rows(t)
                local = slice(rows.start - lo, rows.stop - lo)
                dh = dh_state[:bs] + dy[rows].to(acc)
                dgx, dgh, dh_direct = ops.gru_step_backward(
                    codes[s], h_prev_rows[local], gh_n_rows[local], dh, levels
                )
                d_gx[local] = dgx
                d_gh[local] = dgh
                dh_state[:bs] = torch.addmm(dh_direct, dgh, w_hh_a)
            d_w_ih += d_gx.t() @ x[lo:hi].to(acc)
            d_w_hh += d_gh.t() @ h_prev_rows
            if d_b_ih is not None:
                d_b_ih += d_gx.sum(0)
                d_b_hh += d_gh.sum(0)
            if dx is not None:
                dx[lo:hi] = (d_gx @ w_ih_a).to(dtype)

        return (
            dx,
            dh_state.to(dtype),
            d_w_ih.to(w_ih.dtype),
            d_w_hh.to(w_hh.dtype),
            None if d_b_ih is None else d_b_ih.to(dtype),
            None if d_b_hh is None else d_b_hh.to(dtype),
            None,
        )
