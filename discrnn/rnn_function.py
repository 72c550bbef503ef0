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


class CodeStore:
    """Packed codes of every step of one layer and direction, in processing order.

    Step s holds codes [Q, bs, Hp] (Hp = H padded to a multiple of 8 with zero codes), packed as one
    dense bit stream; since Hp * bits is a multiple of 8, every step starts on a byte boundary.
    """

    def __init__(self, layout: SequenceLayout, n_codes: int, hidden: int, bits: int, device, ops):
        self.layout, self.n_codes, self.hidden, self.bits = layout, n_codes, hidden, bits
        self.pack, self.unpack = ops.pack, ops.unpack  # the codec of the layer's backend
        self.padded = -(-hidden // PAD_UNITS) * PAD_UNITS
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

    def _span(self, first: int, last: int) -> slice:
        return slice(self.step_offsets[first], self.step_offsets[last] + self.step_bytes[last])

    def write(self, data: torch.Tensor, first: int, codes: list[torch.Tensor]) -> None:
        """Store steps first .. first + len(codes) - 1 (processing order), each [Q, bs, H] uint8,
        into ``data`` (a buffer from :meth:`new_buffer`)."""
        pad = self.padded - self.hidden
        flat = torch.cat(
            [(torch.nn.functional.pad(c, (0, pad)) if pad else c).reshape(-1) for c in codes]
        )
        data[self._span(first, first + len(codes) - 1)] = self.pack(flat, self.bits)

    def read(self, data: torch.Tensor, first: int, last: int) -> list[torch.Tensor]:
        """Codes of steps first..last (processing order) as a list of [Q, bs, H] uint8 views."""
        sizes = [self.layout.batch_sizes[t] for t in self.layout.order[first : last + 1]]
        n = self.n_codes * sum(sizes) * self.padded
        flat = self.unpack(data[self._span(first, last)], self.bits, n)
        out, pos = [], 0
        for bs in sizes:
            k = self.n_codes * bs * self.padded
            out.append(flat[pos : pos + k].view(self.n_codes, bs, self.padded)[:, :, : self.hidden])
            pos += k
        return out


class LayerConfig:
    """Static arguments of one layer call (not tensors, so autograd ignores them).

    ``input_source``: None when the layer keeps its input tensor for backward (the first layer), or
    a :class:`CodedInput` that rebuilds the input from the previous layer's codes (inner layers).
    After forward, ``store`` and ``output_from_codes`` describe this layer's codes to the next layer.
    """

    def __init__(self, batch_sizes, levels, bits, chunk, reverse, ops, input_source=None):
        self.layout = SequenceLayout(batch_sizes, reverse)
        self.levels, self.bits, self.chunk, self.ops = levels, bits, chunk, ops
        self.input_source = input_source
        self.store = None
        self.output_from_codes = None

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


def _chunk_codes(store, data, first, last):
    """Codes of steps first..last, and of step first - 1 (whose output is h_{first-1}) or None."""
    if first == 0:
        return None, store.read(data, first, last)
    codes = store.read(data, first - 1, last)
    return codes[0], codes[1:]


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
        layout = self.prev_cfgs[0].layout
        times = [t for t in range(len(layout.batch_sizes)) if lo <= layout.offsets[t] < hi]
        T = len(layout.batch_sizes)
        parts = []
        for cfg, data in zip(self.prev_cfgs, kept):
            # processing indices of these times in that direction form one contiguous run
            idx = [T - 1 - t if cfg.layout.reverse else t for t in times]
            codes = cfg.store.read(data, min(idx), max(idx))
            by_time = codes if idx[0] <= idx[-1] else codes[::-1]
            parts.append(torch.cat([cfg.output_from_codes(c) for c in by_time]))
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


def _lstm_output_fn(ops, levels, dtype, w_hr):
    def output_from_codes(codes):
        m = ops.lstm_output(codes, levels, dtype)
        return m if w_hr is None else m @ w_hr.t()

    return output_from_codes


def _gru_output_fn(levels, dtype):
    def output_from_codes(codes):  # h_t exactly as the forward pass fed it to the next step
        return codec_torch.torch_decode(codes[3], levels, "tanh", _acc(dtype)).to(dtype)

    return output_from_codes


class LSTMLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b, w_hr, cfg: LayerConfig):
        # Unused outputs (the code buffer, the packed final state) must not get zero-filled
        # gradients of their full size in backward: that would double the peak.
        ctx.set_materialize_grads(False)
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype, acc = x.dtype, _acc(x.dtype)
        hidden = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
        h = h0.clone()
        c = c0.to(acc).clone()
        y = torch.empty(layout.total_rows, h0.shape[1], dtype=dtype, device=x.device)
        store = CodeStore(layout, rnn_torch.LSTM_CODES, hidden, cfg.bits, x.device, ops)
        # Nothing is kept when no input needs a gradient (inference, e.g. streaming).
        keep_codes = any(ctx.needs_input_grad)
        codes_data = store.new_buffer() if keep_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
        # o and u codes of each row's last step: the packed final state (h = o * u)
        final_codes = torch.empty(2, *c0.shape, dtype=torch.uint8, device=x.device)
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
                final_codes[:, :bs] = codes[3:5]
                if keep_codes:
                    chunk_codes.append(codes)
            if keep_codes:
                store.write(codes_data, first, chunk_codes)
        cfg.store = store
        cfg.output_from_codes = _lstm_output_fn(ops, levels, dtype, w_hr)
        ctx.cfg = cfg
        ctx.has_bias = b is not None
        kept = _keep_input(ctx, x, cfg)
        ctx.save_for_backward(*kept, h0, c0, w_ih, w_hh, w_hr, codes_data, *checkpoints)
        c_state = c.clone()  # the compute-dtype cell state, for the packed (detached) final state
        ctx.mark_non_differentiable(codes_data, final_codes, c_state)
        return y, h, c.to(dtype), codes_data, final_codes, c_state

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _codes, _final, _c):
        saved = ctx.saved_tensors
        kept = saved[: ctx.n_kept]
        h0, c0, w_ih, w_hh, w_hr, codes_data, *checkpoints = saved[ctx.n_kept :]
        cfg = ctx.cfg
        store, layout, levels, ops = cfg.store, cfg.layout, cfg.levels, cfg.ops
        dtype, acc, device = ctx.x_dtype, _acc(ctx.x_dtype), ctx.x_device
        w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
        w_hr_a = w_hr.to(acc) if w_hr is not None else None
        out_fn = cfg.output_from_codes

        dh_state = torch.zeros_like(h0, dtype=acc) if dh_n is None else dh_n.to(acc).clone()
        dc_state = torch.zeros_like(c0, dtype=acc) if dc_n is None else dc_n.to(acc).clone()
        if dy is None:
            dy = torch.zeros(layout.total_rows, h0.shape[1], dtype=dtype, device=device)
        d_w_ih = torch.zeros_like(w_ih, dtype=acc)
        d_w_hh = torch.zeros_like(w_hh, dtype=acc)
        d_b = torch.zeros(w_ih.shape[0], dtype=acc, device=device) if ctx.has_bias else None
        d_w_hr = torch.zeros_like(w_hr, dtype=acc) if w_hr is not None else None
        dx = torch.empty(ctx.x_shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None

        chunks = list(cfg.chunks())
        for k in range(len(chunks) - 1, -1, -1):
            first, steps = chunks[k]
            last = first + len(steps) - 1
            before, codes = _chunk_codes(store, codes_data, first, last)
            # Cell states before each step, recomputed from the checkpoint with the saved codes.
            c_full = (c0.to(acc) if k == 0 else checkpoints[k - 1]).clone()
            c_prevs = []
            for s, t in enumerate(steps):
                bs = layout.batch_sizes[t]
                c_prevs.append(c_full[:bs].clone())
                c_full[:bs] = ops.lstm_recompute_cell(codes[s], c_full[:bs], levels)
            lo, hi = layout.row_span(steps)
            d_gates = torch.empty(hi - lo, w_ih.shape[0], dtype=acc, device=device)
            h_prev_rows = torch.empty(hi - lo, h0.shape[1], dtype=acc, device=device)
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
            d_w_ih += d_gates.t() @ _input_rows(ctx, cfg, kept, lo, hi).to(acc)
            if d_b is not None:
                d_b += d_gates.sum(0)
            if dx is not None:
                dx[lo:hi] = (d_gates @ w_ih_a).to(dtype)

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return (
            dx,
            dh_state.to(h0.dtype),
            dc_state.to(c0.dtype),
            cast(d_w_ih, w_ih),
            cast(d_w_hh, w_hh),
            None if d_b is None else d_b.to(dtype),
            cast(d_w_hr, w_hr) if w_hr is not None else None,
            None,
        )


class GRULayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, cfg: LayerConfig):
        ctx.set_materialize_grads(False)  # see LSTMLayerFunction.forward
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype = x.dtype
        hidden = w_hh.shape[1]
        h = h0.clone()
        y = torch.empty(layout.total_rows, hidden, dtype=dtype, device=x.device)
        store = CodeStore(layout, rnn_torch.GRU_CODES, hidden, cfg.bits, x.device, ops)
        keep_codes = any(ctx.needs_input_grad)
        codes_data = store.new_buffer() if keep_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
        final_codes = torch.empty(1, *h0.shape, dtype=torch.uint8, device=x.device)
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
                final_codes[0, :bs] = codes[3]
                if keep_codes:
                    chunk_codes.append(codes)
            if keep_codes:
                store.write(codes_data, first, chunk_codes)
        cfg.store = store
        cfg.output_from_codes = _gru_output_fn(levels, dtype)
        ctx.cfg = cfg
        ctx.has_bias = b_ih is not None
        kept = _keep_input(ctx, x, cfg)
        ctx.save_for_backward(*kept, h0, w_ih, w_hh, b_hh, codes_data)
        ctx.mark_non_differentiable(codes_data, final_codes)
        return y, h, codes_data, final_codes

    @staticmethod
    def backward(ctx, dy, dh_n, _codes, _final):
        saved = ctx.saved_tensors
        kept = saved[: ctx.n_kept]
        h0, w_ih, w_hh, b_hh, codes_data = saved[ctx.n_kept :]
        cfg = ctx.cfg
        store, layout, levels, ops = cfg.store, cfg.layout, cfg.levels, cfg.ops
        dtype, acc, device = ctx.x_dtype, _acc(ctx.x_dtype), ctx.x_device
        H = w_hh.shape[1]
        w_ih_a, w_hh_a = w_ih.to(acc), w_hh.to(acc)
        w_hn_a = w_hh_a[2 * H :]
        b_hn_a = b_hh[2 * H :].to(acc) if b_hh is not None else None

        out_fn = cfg.output_from_codes
        dh_state = torch.zeros_like(h0, dtype=acc) if dh_n is None else dh_n.to(acc).clone()
        if dy is None:
            dy = torch.zeros(layout.total_rows, H, dtype=dtype, device=device)
        d_w_ih = torch.zeros_like(w_ih, dtype=acc)
        d_w_hh = torch.zeros_like(w_hh, dtype=acc)
        d_b_ih = torch.zeros(3 * H, dtype=acc, device=device) if ctx.has_bias else None
        d_b_hh = torch.zeros(3 * H, dtype=acc, device=device) if ctx.has_bias else None
        dx = torch.empty(ctx.x_shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None

        chunks = list(cfg.chunks())
        for k in range(len(chunks) - 1, -1, -1):
            first, steps = chunks[k]
            before, codes = _chunk_codes(store, codes_data, first, first + len(steps) - 1)
            lo, hi = layout.row_span(steps)
            h_prev_rows = torch.empty(hi - lo, H, dtype=acc, device=device)
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
            d_gx = torch.empty(hi - lo, 3 * H, dtype=acc, device=device)
            d_gh = torch.empty(hi - lo, 3 * H, dtype=acc, device=device)
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
            d_w_ih += d_gx.t() @ _input_rows(ctx, cfg, kept, lo, hi).to(acc)
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
