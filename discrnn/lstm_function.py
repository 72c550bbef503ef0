"""The discrete LSTM layer as one autograd Function per layer and direction (see
:mod:`discrnn.rnn_function` for the sequence layout, the code store and the two paths): the chunked
torch path (``_lstm_forward_chunked`` / ``_lstm_backward_chunked``) and the per-step path through
the Triton step kernels (``LSTMLayerFunction._forward_steps`` / ``_backward_steps``).

Kept per step and unit: the codes of i, f, g and o (4 planes), plus c every ``chunk`` steps (the
checkpoints) and c_0. u = discrete_tanh(c_t) is not kept: wherever it is needed (u d_o and
m = o u in this layer's backward, the outputs h_t = o u the next layer of a stack rebuilds as its
input) c_t is rebuilt from the checkpoint before it with the forward's arithmetic and u's code is
encoded from tanh(c_t) as the forward computed it: on the torch path one ``torch.tanh`` per step
on a contiguous [bs, H] tensor (the forward's loop shape, see ``kernels.rnn_torch``), in the
kernels the forward kernel's expression. The final-state codes (o, u of each row's last step) are
kept apart, as before (``final_codes``).

On the CPU in float32 / bf16 (float32 arithmetic), the chunked torch path hands its element-wise
work to the fused kernels of ``kernels/rnn_cpu.cpp``: one call per forward step instead of about
twenty aten calls, and in backward one call per chunk for the table lookups, one per step for the
cell rebuild and for the recursion, one per chunk for the u terms. They reproduce those aten calls
bit for bit (checked when the extension loads); where they cannot be built, the aten calls run."""

from __future__ import annotations

import torch

from . import rnn_function
from .kernels import rnn_cpu, rnn_torch
from .kernels.codec_torch import compute_dtype
from .rnn_function import (
    as_dtype,
    SIG,
    TANH,
    LayerConfig,
    CodeStore,
    StepProduct,
    chunk_product,
    weight_grad_,
    backward_buffers,
    backward_gemm_dtype,
    chunk_rows,
    create_graph_backward,
    release_backward_tables,
    finish_rows,
    mm,
    input_rows,
    keep_input,
    previous_rows,
    split_proc,
    split_steps,
    step_input,
    uniform_runs,
)


def _rebuild_start(layout, chunk, tensors, first, acc):
    """(code buffer, c_0 in ``acc``, the first processing step s0 of the chunk that holds step
    ``first``, c_{s0-1} [bs, H] in ``acc``) from a layer's ``output_tensors`` (code buffer, c_0,
    checkpoints): rebuilding c starts at the chunk's checkpoint (a reverse direction's next layer
    may start mid-chunk)."""
    data, c0, *checkpoints = tensors
    c_init = c0.to(acc)
    k = first // chunk
    s0 = k * chunk
    bs = layout.batch_sizes[layout.order[s0]]
    return data, c_init, s0, (checkpoints[k - 1] if k else c_init)[:bs].to(acc)


def _lstm_output_rows_fn(cfg, store, ops, levels, dtype, w_hr):
    """``LayerConfig.output_rows`` of the Triton path: c rebuilt step by step from the checkpoint
    before ``first`` by the cell kernel, one launch per run of steps with one batch size, which
    also writes m = o u from the rebuilt c."""
    # The closure must not hold ``cfg``: cfg holds the closure, and a reference cycle keeps the
    # code buffers in cfg.output_tensors alive until the garbage collector runs (under
    # torch.utils.checkpoint, whose early-stopped recomputation never releases them, that was one
    # segment's codes per segment).
    layout, chunk, cell_clip = cfg.layout, cfg.chunk, cfg.cell_clip

    def output_rows(tensors, first, last):
        data, c_init, s0, c = _rebuild_start(layout, chunk, tensors, first, compute_dtype(dtype))
        sizes = layout.proc_sizes(s0, last)
        skip = sum(sizes[: first - s0])
        m = torch.empty(sum(sizes) - skip, store.hidden, dtype=dtype, device=data.device)
        # one cell launch per run of steps with one batch size, split where m starts (``first``)
        bounds = sorted({0, first - s0, len(sizes)} | {j0 for j0, _ in uniform_runs(sizes)})
        for j0, j1 in zip(bounds, bounds[1:]):
            bs, n = sizes[j0], j1 - j0
            m_run = None
            if s0 + j0 >= first:
                row = sum(sizes[first - s0 : j0])
                m_run = m[row : row + n * bs]
            c_run = ops.lstm_recompute_cell(store.rows_at(data, s0 + j0, s0 + j1 - 1), c, levels,
                                            cell_clip, m_out=m_run, steps=n)
            c = c_run[(n - 1) * bs :]
            if j1 < len(sizes):
                c = step_input(c, bs, sizes[j1], c_init)
        return m if w_hr is None else mm(m, w_hr.t())

    return output_rows


def _lstm_output_rows_fn_tables(cfg, store, dtype, w_hr):
    """As :func:`_lstm_output_rows_fn` for the torch path, decoding by the layer's lookup tables
    and rebuilding c with the forward step's arithmetic (bit-identical)."""
    layout, chunk, cell_clip = cfg.layout, cfg.chunk, cfg.cell_clip  # not cfg: see above
    table_cache, levels = cfg.table_cache, cfg.levels
    H, acc = store.hidden, compute_dtype(dtype)

    def output_rows(tensors, first, last):
        data, c_init, s0, c = _rebuild_start(layout, chunk, tensors, first, acc)
        sizes = layout.proc_sizes(s0, last)
        R = sum(sizes)
        codes = store.read_rows(data, s0, last)[:, :, :H]  # [R, 4, H]: i, f, g, o
        skip = sum(sizes[: first - s0])
        fused = None
        if data.device.type == "cpu" and acc == torch.float32 and rnn_cpu.CHUNK_CALLS:
            fused = rnn_cpu.fused_ops()
        if fused is not None:
            # Each run of steps with one batch size through the backward chunk's rebuild kernel
            # (the same bits; of its other outputs only the run's last c before the clamp is read,
            # as the next run's c_{t-1}).
            m = torch.empty(R, H, dtype=acc, device=data.device)
            raw = torch.empty(R, H, dtype=acc, device=data.device)
            k_u = torch.empty(R, H, dtype=torch.uint8, device=data.device)
            starts = [sum(sizes[:j]) for j in range(len(sizes))]  # processing order, as codes
            last_bs = sizes[0]
            for j0, j1 in uniform_runs(sizes):
                bs = sizes[j0]
                c = step_input(c, last_bs, bs, c_init)
                fused.lstm_rebuild_chunk(codes, c, starts[j0:j1], bs, raw, m, k_u, levels,
                                         cell_clip)
                o = starts[j1 - 1]
                c, last_bs = torch.clamp(raw[o:o + bs], -cell_clip, cell_clip), bs
            del codes, raw, k_u
            m = m[skip:].to(dtype)
            return m if w_hr is None else mm(m, w_hr.t())
        tables = table_cache.tables(dtype, data.device)
        # One int32 index plane at a time: an inner layer's backward runs this once per chunk
        # beside its own chunk arrays, and the four planes at once were its largest temporaries.
        f_s = split_proc(tables.lookup("value", SIG, codes[:, 1]), sizes)
        i_g = tables.pair_index(codes[:, 0].to(torch.int32), codes[:, 2])
        ig = tables.gather(tables.pair_table("ab"), i_g.view(-1), (R, H))
        del i_g
        ig_s = split_proc(ig, sizes)
        t = torch.empty(R - skip, H, dtype=acc, device=data.device)  # tanh(c_t), steps first..
        t_s = split_proc(t, sizes[first - s0 :])
        for j, bs in enumerate(sizes):
            c = torch.mul(f_s[j], c).add_(ig_s[j]).clamp_(-cell_clip, cell_clip)
            if s0 + j >= first:
                torch.tanh(c, out=t_s[s0 + j - first])  # the forward's call on c_t [bs, H]
            if j + 1 < len(sizes):
                c = step_input(c, bs, sizes[j + 1], c_init)
        del f_s, ig, ig_s
        u_idx = _lstm_u_codes(tables, t)
        del t, t_s
        o_u = tables.pair_index(codes[skip:, 3].to(torch.int32), u_idx).view(-1)
        del codes, u_idx
        m = tables.gather(tables.pair_table("ab"), o_u, (R - skip, H)).to(tables.dtype)
        return m if w_hr is None else mm(m, w_hr.t())

    return output_rows


def _lstm_u_codes(tables, t, chunk_rows=False):
    """u's int32 codes [R, H] from t = tanh(c_t) [R, H] (overwritten). For the forward's codes bit
    for bit, t must come from one ``torch.tanh`` call per step on that step's contiguous [bs, H]
    rows of c_t (the forward step's loop shape, see ``kernels.rnn_torch``); the encoding is exact
    arithmetic, so it runs on all rows at once. ``chunk_rows``: t holds a backward chunk's steps
    (else the step before a chunk; the tests tell the two apart by it)."""
    u_idx = torch.empty(t.shape, dtype=torch.int32, device=t.device)
    return tables.encode_tanh_(t, True, u_idx)


def _lstm_finish_rows(done, bs, out, c_new, k_gates, k_u, h_n, c_n, final_codes):
    """The final state of the rows [done, bs) of a step, where they take their last step (their
    codes too, unless ``final_codes`` is empty: no packed state wanted; c_n None: the caller
    takes the last c_t itself)."""
    if done < bs:
        h_n[done:bs] = out[done:bs]
        if c_n is not None:
            c_n[done:bs] = c_new[done:bs]
        if final_codes.numel():
            final_codes[0, done:bs] = k_gates[done:bs, 3]
            final_codes[1, done:bs] = k_u[done:bs]


def _lstm_forward_chunked(x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes,
                          preact):
    """-> y, h_n, c_n (compute dtype), final o/u codes, checkpoints. Bit-identical to stepping
    ``rnn_torch.lstm_step_forward``. ``preact`` ([rows, 4H], compute dtype, or None) receives the
    gate pre-activations (``grad="exact"``)."""
    layout, sizes = cfg.layout, cfg.layout.batch_sizes
    dtype, device = x.dtype, x.device
    acc = compute_dtype(dtype)
    B, P = h0.shape
    H = c0.shape[1]
    step = None  # the aten step (and its buffers), built where a chunk runs step by step
    y = torch.empty(layout.total_rows, P, dtype=dtype, device=device)
    h_n = torch.empty(B, P, dtype=dtype, device=device)
    final_codes = torch.empty((2, B, H) if cfg.keeps_final_state else (0,), dtype=torch.uint8,
                              device=device)
    c_init = c0.to(acc)
    recurrent = StepProduct(w_hh, B, len(sizes))
    input_proj = chunk_product(w_ih, cfg, B)
    w_hr_t = None if w_hr is None else w_hr.t()
    direct = w_hr is None and dtype == acc  # m goes straight into y
    max_rows = min(cfg.chunk, len(sizes)) * B
    rows_buf = store.rows_buffer(max_rows)  # the chunk's codes, uint8, as the store packs them
    # The fused CPU step (kernels/rnn_cpu.cpp, bit-identical to ``step``) writes the gate codes
    # straight into rows_buf as uint8; the aten step writes int32 codes into k_buf.
    fused = rnn_cpu.fused_ops() if device.type == "cpu" and acc == torch.float32 else None
    # Where every row takes its last step together (no packed sequence), c_n is that step's c_t,
    # a tensor of its own on the fused path: no copy (under checkpointing every [B, H] buffer freed
    # between autograd's small allocations leaves a hole in glibc's heap).
    c_n = None if fused is not None and layout.uniform else torch.empty(B, H, dtype=acc,
                                                                         device=device)
    if fused is None:
        # the step's codes i, f, g, o (kept) and u (for the final-state codes only)
        k_buf = torch.empty(max_rows, rnn_torch.LSTM_CODES + 1, H, dtype=torch.int32, device=device)
        k_gate_rows, k_u_rows = k_buf[:, :4], k_buf[:, 4]
    else:
        k_gate_rows = rows_buf[:, :, :H]
        k_u_rows = torch.empty(max_rows, H, dtype=torch.uint8, device=device)
        m_buf = None if direct else torch.empty(B, H, dtype=acc, device=device)
    finish = finish_rows(layout)
    checkpoints = []
    h_prev = c_prev = None
    prev_bs = 0
    xproj_buf = torch.empty(max_rows, w_ih.shape[0], dtype=input_proj.dtype, device=device)
    for first, steps in cfg.chunks():
        lo, hi = layout.row_span(steps)
        xproj = input_proj.linear(x[lo:hi], b, out=xproj_buf[: hi - lo])
        psizes = [sizes[t] for t in steps]
        if fused is not None and rnn_cpu.CHUNK_CALLS:
            # Each run of steps with one batch size (the whole chunk but where a packed batch
            # shrinks or grows) in one call: the loop below in C++ (the same calls, without the
            # interpreter's overhead per step).
            code_lo = 0  # the run's first code row (the codes are in processing order)
            for j0, j1 in uniform_runs(psizes):
                bs = psizes[j0]
                h_in = step_input(h_prev, prev_bs, bs, h0)
                c_in = step_input(c_prev, prev_bs, bs, c_init)
                if j0 == 0 and first:
                    checkpoints.append(c_in if c_in is c_prev else c_in.clone())
                code_hi = code_lo + (j1 - j0) * bs
                c_new = fused.lstm_forward_steps(
                    xproj, [layout.offsets[t] - lo for t in steps[j0:j1]], bs, h_in, c_in,
                    recurrent.weight_t, recurrent.packed, recurrent.panels, recurrent.dtype,
                    y[lo:hi], w_hr_t,
                    k_gate_rows[code_lo:code_hi], k_u_rows[code_lo:code_hi],
                    None if preact is None else preact[lo:hi], cfg.levels, cfg.cell_clip)
                # the run's last step's rows: in y by time, in the codes by processing
                out = y[layout.rows(steps[j1 - 1])]
                _lstm_finish_rows(finish[first + j1 - 1], bs, out, c_new,
                                  k_gate_rows[code_hi - bs:code_hi], k_u_rows[code_hi - bs:code_hi],
                                  h_n, c_n, final_codes)
                h_prev, c_prev, prev_bs = out, c_new, bs
                code_lo = code_hi
        else:
            xps = split_steps(xproj, cfg, steps, lo)
            outs = split_steps(y[lo:hi], cfg, steps, lo)
            k_gates = split_proc(k_gate_rows[: hi - lo], psizes)
            k_u = split_proc(k_u_rows[: hi - lo], psizes)  # not kept: backward rebuilds it from c
            pres = split_steps(preact[lo:hi], cfg, steps, lo) if preact is not None else None
            for j, bs in enumerate(psizes):
                h_in = step_input(h_prev, prev_bs, bs, h0)
                c_in = step_input(c_prev, prev_bs, bs, c_init)
                if j == 0 and first:
                    checkpoints.append(c_in if c_in is c_prev else c_in.clone())
                if step is None:
                    step = rnn_torch.LSTMForwardStep(cfg.tables(dtype, device), B, H, device,
                                                     cfg.cell_clip)
                v = step.rows(bs)
                gates = v.gates if pres is None else pres[j]  # the same [bs, 4H] layout
                if dtype == acc:
                    recurrent.addmm(xps[j], h_in, out=gates)
                else:
                    gates.copy_(recurrent.addmm(xps[j], h_in))
                out = outs[j]
                if fused is None:
                    c_new, m = step(v, c_in, k_gates[j], k_u[j], out if direct else None,
                                    gates=None if pres is None else gates)
                else:
                    c_new = torch.empty(bs, H, dtype=acc, device=device)
                    m = out if direct else m_buf[:bs]
                    fused.lstm_forward_step(gates, c_in, c_new, m, k_gates[j], k_u[j],
                                            cfg.levels, cfg.cell_clip)
                if not direct:
                    m = m.to(dtype)
                    if w_hr_t is None:
                        out.copy_(m)
                    else:
                        mm(m, w_hr_t, out=out)
                _lstm_finish_rows(finish[first + j], bs, out, c_new, k_gates[j], k_u[j], h_n,
                                  c_n, final_codes)
                h_prev, c_prev, prev_bs = out, c_new, bs
        if keep_codes:
            if fused is None:
                rows_buf[: hi - lo, :, :H] = k_buf[: hi - lo, :4]
            store.write_rows(codes_data, first, first + len(steps) - 1, rows_buf[: hi - lo])
    return y, h_n, c_prev if c_n is None else c_n, final_codes, checkpoints


def _chunk_weight_grads(ctx, kept, dgates, h_prev, dhs, m, input_t, lo, hi, d_w_ih, d_w_hh, d_b,
                        d_w_hr, dx, gemm=None):
    """Accumulate one chunk's weight and bias gradients and write its dx rows lo..hi, from its gate
    gradients [rows, 4H], h_{t-1} rows, and (with proj_size) dL/dh and m = o u rows; ``input_t``:
    the product with W_ih (:class:`StepProduct` of W_ih^T, in the products' dtype). ``gemm``: the
    dtype of the matrix products when it is not the accumulators' (a bf16/fp16 layer: its products
    run in that dtype, as torch's own backward does under autocast; the sums stay in acc)."""
    if d_b is not None:
        d_b += dgates.sum(0)
    # dgates in the products' dtype once, for its three products (the copy per product was a
    # transposing one, slower than the product itself at small H)
    dg = dgates if gemm is None else dgates.to(gemm)
    # Tried and left, when these products ran on MKL: summing d W column-major (d W^T += rows^T
    # dgates) made them 12 % faster alone (H=256, 512 rows) but not the layer (interleaved A/B,
    # T=512: 236.0 against 235.9 ms), and it raised bench_rnn's peak by 1.1 MiB.
    weight_grad_(d_w_hh, dg, h_prev, gemm)
    weight_grad_(d_w_ih, dg, input_rows(ctx, ctx.cfg, kept, lo, hi).to(dg.dtype), gemm)
    if d_w_hr is not None:
        weight_grad_(d_w_hr, dhs, m, gemm)
    if dx is not None:
        input_t.mm(dg, out=dx[lo:hi])


def _lstm_backward_chunked(
    ctx, kept, h0, c0, w_ih, w_hh, w_hr, codes_data, checkpoints, preact, dy, dh_n, dc_n
):
    cfg = ctx.cfg
    store, layout, sizes = cfg.store, cfg.layout, cfg.layout.batch_sizes
    dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
    H, P = c0.shape[1], h0.shape[1]
    # A bf16/fp16 layer (under autocast, or with such parameters) runs backward's matrix products
    # in its dtype, as torch's backward does; the recursion and the sums stay in acc.
    gemm = backward_gemm_dtype(dtype)
    recurrent_t = StepProduct(w_hh.to(gemm or acc).t(), h0.shape[0], len(sizes))  # dgates @ W_hh
    input_t = None  # dgates @ W_ih, where dx is wanted
    if ctx.needs_input_grad[0]:
        input_t = chunk_product(w_ih.to(gemm or acc).t(), cfg, h0.shape[0])
    w_hr_a = w_hr.to(acc) if w_hr is not None else None
    c_init, h_init = c0.to(acc), h0.to(acc)
    clip = cfg.cell_clip
    # The fused CPU kernels (kernels/rnn_cpu.cpp) do the element-wise work below in fewer passes,
    # with the same arithmetic as its aten calls (bit-identical, checked on load).
    fused = None
    if device.type == "cpu" and acc == torch.float32 and preact is None:
        fused = rnn_cpu.fused_ops()

    (dh_state, dc_state), (d_w_ih, d_w_hh, d_w_hr), (d_b,), dx = backward_buffers(
        ctx, acc, (h0, c0), (dh_n, dc_n), (w_ih, w_hh, w_hr), (w_ih.shape[0],)
    )

    # The step processed after the current one hands back its dgates (dh = dy + dgates @ W_hh) and
    # dc * f; where the batch size changes they go through dh_state / dc_state instead.
    pend_dg = pend_dcf = None
    pend_bs = 0

    def flush():
        recurrent_t.mm(pend_dg, out=dh_state[:pend_bs])
        dc_state[:pend_bs] = pend_dcf

    def step_state_grads(bs, dy_rows, dh_out):
        """dh (into dh_out where given) and dc of the step processed before the pending one."""
        if pend_dg is not None and pend_bs == bs:
            return recurrent_t.addmm(dy_rows, pend_dg, out=dh_out), pend_dcf
        if pend_dg is not None:
            flush()
        return torch.add(dy_rows, dh_state[:bs], out=dh_out), dc_state[:bs]

    chunks = list(cfg.chunks())
    for k in range(len(chunks) - 1, -1, -1):
        first, steps = chunks[k]
        last = first + len(steps) - 1
        lo, hi = layout.row_span(steps)
        R = hi - lo
        psizes = [sizes[t] for t in steps]
        codes, before = chunk_rows(store, codes_data, first, last)
        # Each run of steps with one batch size in two calls (C++), or every step on its own.
        offsets = [layout.offsets[t] - lo for t in steps]
        one_call = fused is not None and rnn_cpu.CHUNK_CALLS

        def split(rows, dim=0):
            return split_steps(rows, cfg, steps, lo, dim)

        def as_output(m):  # h_t exactly as the forward pass fed it to the next step, in acc
            m = m.to(dtype)
            return (m if w_hr is None else mm(m, w_hr.t())).to(acc)

        m_before = None
        if before is not None:
            # c of the step processed before the chunk is the chunk's checkpoint (its first n rows;
            # zeros in the rest keep the forward's [bs, H] shape for tanh, see _lstm_u_codes)
            n_b = before.shape[0]
            c_b = torch.zeros(n_b, H, dtype=acc, device=device)
            n = min(n_b, psizes[0])
            c_b[:n] = checkpoints[k - 1][:n]
            tables = cfg.tables(dtype, device)
            u_b = _lstm_u_codes(tables, torch.tanh(c_b))
            o_b = tables.lookup("value", SIG, before[:, 3])
            m_before = as_output(o_b * tables.lookup("value", TANH, u_b))
            del c_b, u_b, o_b
        dys = torch.zeros(R, P, dtype=acc, device=device) if dy is None else dy[lo:hi].to(acc)
        dhs = torch.empty(R, P, dtype=acc, device=device) if w_hr is not None else None
        if one_call:
            # The rebuild and the recursion of each run in one call each (C++). They compute the
            # table terms of the path below (the per-step kernels; the aten path) inside the
            # recursion, step by step, from the codes and c_t before its clamp: the chunk keeps two
            # float planes and u's codes where that path writes eleven planes and reads them back.
            runs = uniform_runs(psizes)
            c_raw = torch.empty(R, H, dtype=acc, device=device)
            m_all = torch.empty(R, H, dtype=acc, device=device)
            k_u = torch.empty(R, H, dtype=torch.uint8, device=device)
            c_firsts = []  # c_{t-1} of each run's first step
            last_bs = psizes[0]
            c_last = (c_init if k == 0 else checkpoints[k - 1])[:last_bs]
            for j0, j1 in runs:
                bs = psizes[j0]
                c_firsts.append(step_input(c_last, last_bs, bs, c_init))
                fused.lstm_rebuild_chunk(codes, c_firsts[-1], offsets[j0:j1], bs, c_raw, m_all,
                                         k_u, cfg.levels, clip)
                o = offsets[j1 - 1]
                if j1 < len(psizes):  # the next run's c_{t-1}: c_t, the clamp of raw
                    c_last, last_bs = torch.clamp(c_raw[o:o + bs], -clip, clip), bs
            dgates = torch.empty(R, 4 * H, dtype=acc, device=device)
            for (j0, j1), c_first in zip(reversed(runs), reversed(c_firsts)):
                bs, o = psizes[j0], offsets[j1 - 1]
                dh, dc = step_state_grads(bs, dys[o:o + bs],
                                          None if dhs is None else dhs[o:o + bs])
                dm = dh if w_hr_a is None else dh @ w_hr_a
                pend_dcf = fused.lstm_backward_chunk(
                    codes, k_u, c_raw, c_first, offsets[j0:j1], bs, dys, dm, dc, dgates,
                    *rnn_cpu.derivative_tables(cfg.levels), recurrent_t.weight_t,
                    recurrent_t.packed, recurrent_t.panels, recurrent_t.dtype, dhs, w_hr_a,
                    cfg.levels, clip)
                pend_dg, pend_bs = dgates[offsets[j0]:offsets[j0] + bs].clone(), bs
            del codes, before, c_raw, k_u, dh, dc, dm, dys, c_firsts, c_last
        else:
            tables = cfg.tables(dtype, device)
            # What the gate gradients need, for the whole chunk, gathered from tables of the codes'
            # values, derivatives and products of two codes' (i and g; o and u):
            # p = [g d_i, c_prev d_f, i d_g] plane by plane, o d_u, u d_o, m = o u, i g. With
            # grad="exact" the gate derivatives are f' at the kept pre-activations instead.
            p = torch.empty(3, R, H, dtype=acc, device=device)
            d_o = None
            if fused is not None:
                f_v = torch.empty(R, H, dtype=acc, device=device)  # lives through the recursion
                # freed after the rebuild
                d_f, ig, o_v = torch.empty(3, R, H, dtype=acc, device=device)
                fused.lstm_backward_gather(
                    codes, tables.table("value", SIG), tables.table("deriv", SIG),
                    tables.pair_table("b_da"), tables.pair_table("a_db"), tables.pair_table("ab"),
                    f_v, d_f, p[0], p[2], ig, o_v, cfg.levels)
                del before  # codes: o's, read again after the rebuild
            else:
                idx = tables.indices(codes)  # [4, R * H]: i, f, g, o
                del codes, before
                i_g = tables.pair_index(idx[0], idx[2])
                f_v = tables.gather(tables.table("value", SIG), idx[1], (R, H))
                o_v = tables.gather(tables.table("value", SIG), idx[3], (R, H))
                if preact is None:
                    d_f = tables.gather(tables.table("deriv", SIG), idx[1], (R, H))
                    torch.index_select(tables.pair_table("b_da"), 0, i_g, out=p[0].view(-1))
                    torch.index_select(tables.pair_table("a_db"), 0, i_g, out=p[2].view(-1))
                else:
                    d_i, d_f, d_g, d_o = rnn_torch.exact_derivatives(
                        preact[lo:hi], rnn_torch.LSTM_GATE_KINDS, acc
                    ).unbind(1)
                    g_v = tables.gather(tables.table("value", TANH), idx[2], (R, H))
                    torch.mul(g_v, d_i, out=p[0])
                    i_v = tables.gather(tables.table("value", SIG), idx[0], (R, H))
                    torch.mul(i_v, d_g, out=p[2])
                    del g_v, i_v
                    del d_i, d_g
                ig = tables.gather(tables.pair_table("ab"), i_g, (R, H))
                del i_g

            # c_{t-1} of every step, rebuilt from the checkpoint with the forward's arithmetic (a
            # mul, an add, the clamp: bit-identical), into p[1]; c_t of every step before its clamp
            # into c_raw and after it into c_all. u's code is the encoding of tanh(c_t) (the aten
            # path calls tanh step by step, the forward's call on c_t [bs, H]; the fused kernels
            # take tanh's code thresholds), its straight-through derivative tanh'(c_t)
            # (rnn_torch.tanh_derivative): o d_u. Where the clamp was active no gradient reaches
            # the gates or c_{t-1}: p and f (as dc_{t-1} = dc f) are zeroed there.
            c_raw = torch.empty(R, H, dtype=acc, device=device)
            c_all = torch.empty(R, H, dtype=acc, device=device)
            t_c = torch.empty(R, H, dtype=acc, device=device) if fused is None else None
            f_s, ig_s, cp_s = split(f_v), split(ig), split(p[1])
            raw_s, call_s = split(c_raw), split(c_all)
            cp_s[0].copy_(c_init[: psizes[0]] if k == 0 else checkpoints[k - 1][: psizes[0]])
            t_s = split(t_c) if t_c is not None else None
            for j in range(len(steps)):
                bs = psizes[j]
                bs_next = psizes[j + 1] if j + 1 < len(steps) else 0
                if bs_next == bs:  # c_t is the next step's c_{t-1}: clamp straight into it
                    c_t = cp_s[j + 1]
                else:
                    c_t = torch.empty(bs, H, dtype=acc, device=device)
                if fused is not None:
                    fused.lstm_rebuild_step(f_s[j], ig_s[j], cp_s[j], raw_s[j], c_t, call_s[j],
                                            clip)
                else:
                    raw = torch.mul(f_s[j], cp_s[j], out=raw_s[j]).add_(ig_s[j])
                    torch.clamp(raw, -clip, clip, out=c_t)
                    call_s[j].copy_(c_t)
                    torch.tanh(c_t, out=t_s[j])  # contiguous [bs, H], as the forward step's call
                if bs_next and bs_next != bs:
                    n = min(bs, bs_next)
                    cp_s[j + 1][:n] = c_t[:n]
                    if bs_next > bs:
                        cp_s[j + 1][bs:] = c_init[bs:bs_next]
            del t_s
            if fused is not None:
                u_do = torch.empty(R, H, dtype=acc, device=device)
                m_all = torch.empty(R, H, dtype=acc, device=device)
                o_du = c_raw  # reused: o tanh'(c_t)
                fused.lstm_backward_finish(codes, c_raw, c_all, o_v, d_f, p, f_v,
                                           tables.pair_table("b_da"), tables.pair_table("ab"),
                                           o_du, u_do, m_all, cfg.levels, clip)
                del codes, c_all, ig, ig_s, cp_s, raw_s, call_s, o_v, c_raw, d_f
            else:
                passed = c_raw.abs() <= clip  # where the clamp passes the gradient
                o_du = c_raw  # reused: o tanh'(c_t)
                u_idx = _lstm_u_codes(tables, t_c, chunk_rows=True)
                rnn_torch.tanh_derivative(c_all, out=o_du).mul_(o_v)
                del t_c, c_all, call_s
                o_u = tables.pair_index(idx[3], u_idx.view(-1))
                if d_o is None:
                    u_do = tables.gather(tables.pair_table("b_da"), o_u, (R, H))
                else:
                    u_v = tables.gather(tables.table("value", TANH), u_idx.view(-1), (R, H))
                    u_do = u_v.mul_(d_o)
                    del u_v
                m_all = tables.gather(tables.pair_table("ab"), o_u, (R, H))
                del idx, o_u, u_idx, d_o, ig, ig_s, cp_s, raw_s, o_v, c_raw
                p[1].mul_(d_f)
                del d_f
                p.mul_(passed)
                f_v.mul_(passed)
                del passed

            # The sequential recursion: per step dh (one matmul), dc, dgates, dc * f.
            dgates = torch.empty(R, 4 * H, dtype=acc, device=device)
            dg4 = dgates.view(R, 4, H)
            dy_s, odu_s, udo_s = split(dys), split(o_du), split(u_do)
            p_s, dgifg_s = split(p, dim=1), split(dg4[:, :3].transpose(0, 1), dim=1)  # [3, bs, H]
            dg_s, dgo_s = split(dgates), split(dg4[:, 3])
            dh_s = split(dhs) if dhs is not None else [None] * len(steps)
            for j in range(len(steps) - 1, -1, -1):
                bs = psizes[j]
                dh, dc = step_state_grads(bs, dy_s[j], dh_s[j])
                dm = dh if w_hr_a is None else dh @ w_hr_a
                if fused is not None:
                    dcf = torch.empty(bs, H, dtype=acc, device=device)
                    fused.lstm_backward_step(dm, dc, odu_s[j], udo_s[j], p_s[j], f_s[j], dg_s[j],
                                             dcf)
                else:
                    dc = torch.addcmul(dc, dm, odu_s[j])
                    torch.mul(dc, p_s[j], out=dgifg_s[j])
                    torch.mul(dm, udo_s[j], out=dgo_s[j])
                    dcf = dc.mul_(f_s[j])
                pend_dg, pend_dcf, pend_bs = dg_s[j], dcf, bs
            pend_dg = pend_dg.clone()  # not a view into this chunk's buffer
            del p, o_du, u_do, f_v, f_s, p_s, odu_s, udo_s, dy_s, dys, dg4, dg_s, dgifg_s
            del dgo_s, dh_s

        # Chunk-wide: h_{t-1} rows, weight gradients, dx.
        h_prev = previous_rows(as_output(m_all), m_before, h_init, cfg, steps, lo, acc)
        _chunk_weight_grads(ctx, kept, dgates, h_prev, dhs, m_all, input_t, lo, hi,
                            d_w_ih, d_w_hh, d_b, d_w_hr, dx, gemm)
        del h_prev
        del dgates, dhs, m_all, m_before  # before the next chunk's
    if pend_dg is not None:
        flush()
    return dx, dh_state, dc_state, d_w_ih, d_w_hh, d_b, d_w_hr


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
        # Nothing is kept when no input needs a gradient or autograd records no graph (inference,
        # e.g. streaming, under torch.no_grad or inference_mode).
        keep_codes = (cfg.records_graph and any(ctx.needs_input_grad)) or cfg.read_by_next_layer
        codes_data = store.new_buffer() if keep_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
        # grad="exact" also keeps the gate pre-activations, [rows, 4H] in the compute dtype.
        preact = None
        if keep_codes and cfg.grad == "exact":
            preact = torch.empty(layout.total_rows, w_hh.shape[0], dtype=compute_dtype(dtype),
                                 device=x.device)
        if cfg.chunked:
            y, h, c, final_codes, checkpoints = _lstm_forward_chunked(
                x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes, preact
            )
            cfg.output_rows = _lstm_output_rows_fn_tables(cfg, store, dtype, w_hr)
        else:
            y, h, c, final_codes, checkpoints = LSTMLayerFunction._forward_steps(
                x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes, preact
            )
            cfg.output_rows = _lstm_output_rows_fn(cfg, store, ops, levels, dtype, w_hr)
        cfg.store = store
        # What the next layer of a stack saves to rebuild its input (the same tensors as here)
        cfg.output_tensors = [codes_data, c0.detach(), *checkpoints]
        ctx.cfg = cfg
        ctx.has_bias = b is not None
        kept = keep_input(ctx, x, cfg)
        ctx.save_for_backward(*kept, h0, c0, w_ih, w_hh, w_hr, b, codes_data, preact, *checkpoints)
        # the compute-dtype cell state, for the packed (detached) final state where one is wanted
        c_state = c.clone() if cfg.keeps_final_state else c.new_empty(0)
        ctx.mark_non_differentiable(codes_data, final_codes, c_state)
        return y, h, c.to(dtype), codes_data, final_codes, c_state

    @staticmethod
    def _forward_steps(x, h0, c0, w_ih, w_hh, b, w_hr, cfg, store, codes_data, keep_codes, preact):
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
        finish = finish_rows(layout)
        recurrent = StepProduct(w_hh, B, len(layout.batch_sizes))
        input_proj = chunk_product(w_ih, cfg, B)
        # every step's gates into one buffer (no allocation a step; grad="exact" keeps them all)
        gate_rows = (torch.empty(B, w_hh.shape[0], dtype=dtype, device=x.device)
                     if preact is None else None)
        checkpoints = []
        h_prev, prev_bs = None, 0
        for first, steps in cfg.chunks():
            if first:
                checkpoints.append(c.clone())
            lo, hi = layout.row_span(steps)
            xproj = input_proj.linear(x[lo:hi], b)
            # every step's rows as views made in one call per chunk (host time per step)
            xp_s, y_s = split_steps(xproj, cfg, steps, lo), split_steps(y[lo:hi], cfg, steps, lo)
            pre_s = split_steps(preact[lo:hi], cfg, steps, lo) if preact is not None else None
            for j, (s, t) in enumerate(enumerate(steps, start=first)):
                bs = layout.batch_sizes[t]
                h_in = step_input(h_prev, prev_bs, bs, h0)
                c_s = c if bs == B else c[:bs]
                if pre_s is None:
                    gates = recurrent.addmm(xp_s[j], h_in,
                                            out=gate_rows if bs == B else gate_rows[:bs])
                elif preact.dtype == dtype:
                    gates = recurrent.addmm(xp_s[j], h_in, out=pre_s[j])
                else:
                    gates = pre_s[j]
                    gates.copy_(recurrent.addmm(xp_s[j], h_in))
                out = store.rows_at(codes_data, s, s) if keep_codes else None
                _, _, m = ops.lstm_step_forward(
                    gates, c_s, levels, out=out, final=final_codes, done=finish[s],
                    store=keep_codes, c_out=c_s, m_out=y_s[j] if w_hr is None else None,
                    cell_clip=cfg.cell_clip, check=s == 0,  # later steps: views of the same buffers
                )
                if w_hr is not None:
                    mm(m.to(dtype), w_hr.t(), out=y_s[j])
                h_prev, prev_bs = y_s[j], bs
                if finish[s] < bs:
                    h_n[finish[s] : bs] = h_prev[finish[s] :]
        return y, h_n, c, final_codes, checkpoints

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _codes, _final, _c):
        saved = ctx.saved_tensors
        kept = saved[: ctx.n_kept]
        h0, c0, w_ih, w_hh, w_hr, b, codes_data, preact, *checkpoints = saved[ctx.n_kept :]
        if torch.is_grad_enabled():  # backward(create_graph=True): differentiable gradients
            return create_graph_backward(ctx, "lstm", [kept[0], h0, c0, w_ih, w_hh, b, w_hr],
                                         [dy, dh_n, dc_n])
        backward = _lstm_backward_chunked if ctx.cfg.chunked else LSTMLayerFunction._backward_steps
        grads = backward(
            ctx, kept, h0, c0, w_ih, w_hh, w_hr, codes_data, checkpoints, preact, dy, dh_n, dc_n
        )
        release_backward_tables(ctx.cfg)
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
    def _backward_steps(ctx, kept, h0, c0, w_ih, w_hh, w_hr, codes_data, checkpoints, preact, dy,
                        dh_n, dc_n):
        """Backward through the per-step ``ops`` functions (the Triton kernels), which read the
        packed codes in place; h_{t-1} of a whole chunk comes from one output launch."""
        cfg = ctx.cfg
        store, layout, levels, ops = cfg.store, cfg.layout, cfg.levels, cfg.ops
        sizes = layout.batch_sizes
        dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
        (B, P), H = h0.shape, c0.shape[1]
        gemm = backward_gemm_dtype(dtype)  # as _lstm_backward_chunked
        recurrent_t = StepProduct(w_hh.to(gemm or acc).t(), B, len(sizes))
        input_t = None
        if ctx.needs_input_grad[0]:
            input_t = chunk_product(w_ih.to(gemm or acc).t(), cfg, h0.shape[0])
        w_hr_a = w_hr.to(acc) if w_hr is not None else None
        c_init, h_init = c0.to(acc), h0.to(acc)

        (dh_state, dc_state), (d_w_ih, d_w_hh, d_w_hr), (d_b,), dx = backward_buffers(
            ctx, acc, (h0, c0), (dh_n, dc_n), (w_ih, w_hh, w_hr), (w_ih.shape[0],)
        )
        # A bf16 / fp16 layer's per-step product dgates W_hh runs in that dtype (as torch's
        # backward): the step kernel also writes its operand rounded, and its result dh (a value
        # of that dtype) stays in it for the next step's kernel, which widens it exactly. The same
        # bits as casting dgates and widening dh per step, two launches a step fewer. dh_n must
        # be of that dtype too (it is: autograd gives h_n's gradient h_n's dtype).
        low = None
        if (rnn_function.LOW_PRECISION_STEP_GRADS and gemm is not None and gemm == dtype
                and w_hr is None and (dh_n is None or dh_n.dtype == gemm)):
            low = gemm
            dh_low = dh_state.to(low)  # exact: dh_n's values, or zeros
            dg_low_rows = torch.empty(B, w_ih.shape[0], dtype=low, device=device)

        def as_output(m):  # h_t exactly as the forward pass fed it to the next step, in acc
            m = m.to(dtype)
            return (m if w_hr is None else mm(m, w_hr.t())).to(acc)

        chunks = list(cfg.chunks())
        first_step = True
        for k in range(len(chunks) - 1, -1, -1):
            first, steps = chunks[k]
            last = first + len(steps) - 1
            lo, hi = layout.row_span(steps)
            psizes = [sizes[t] for t in steps]
            step_codes = [store.rows_at(codes_data, s, s) for s in range(first, last + 1)]

            # Cell states before each step, rebuilt from the checkpoint with the saved codes, and
            # m = o * u of every step (u's code rebuilt from c_t): one cell launch per run of
            # steps with one batch size (the whole chunk but where a packed batch changes).
            c_prevs = [(checkpoints[k - 1] if k else c_init)[: psizes[0]]]
            m_rows = torch.empty(hi - lo, H, dtype=acc, device=device)  # processing order
            row = 0
            for j0, j1 in uniform_runs(psizes):
                bs, n = psizes[j0], j1 - j0
                c_run = ops.lstm_recompute_cell(
                    store.rows_at(codes_data, first + j0, first + j1 - 1), c_prevs[j0], levels,
                    cfg.cell_clip, m_out=m_rows[row : row + n * bs], steps=n)
                row += n * bs
                c_after = c_run.view(n, bs, H).unbind(0)  # c_t of each step of the run
                c_prevs += c_after[:-1]
                if j1 < len(steps):
                    c_prevs.append(step_input(c_after[-1], bs, psizes[j1], c_init))
            m_chunk = layout.to_time_order(m_rows, first, last)
            del m_rows
            # m of the step processed before the chunk: its c is the checkpoint's first n rows
            # (the other rows are not needed: zeros keep the step's [bs, H] shape).
            before = None
            if first:
                n_before = sizes[layout.order[first - 1]]
                c_b = torch.zeros(n_before, H, dtype=acc, device=device)
                n = min(n_before, psizes[0])
                c_b[:n] = c_prevs[0][:n]
                before = as_output(ops.lstm_output(store.rows_at(codes_data, first - 1, first - 1),
                                                   c_b, levels, acc))
                del c_b

            def split(rows):
                return split_steps(rows, cfg, steps, lo)

            dgates = torch.empty(hi - lo, w_ih.shape[0], dtype=acc, device=device)
            dhs = torch.empty(hi - lo, P, dtype=acc, device=device) if w_hr is not None else None
            dg_s, dh_s = split(dgates), split(dhs) if dhs is not None else None
            dy_s = split(dy[lo:hi]) if dy is not None else None
            pre_s = split(preact[lo:hi]) if preact is not None else None
            for j in range(len(steps) - 1, -1, -1):
                bs = psizes[j]
                # the state rows of this step (no view where the whole batch runs: host time)
                dh_j, dc_j = (dh_state, dc_state) if bs == B else (dh_state[:bs], dc_state[:bs])
                low_out = {}
                if low is not None:
                    dh_j = dh_low if bs == B else dh_low[:bs]
                    low_out["dgates_low_out"] = dg_low_rows if bs == B else dg_low_rows[:bs]
                dy_j = None if dy_s is None else dy_s[j]
                if w_hr is not None:
                    dh = dh_j if dy_j is None else dh_j + as_dtype(dy_j, acc)
                    dh_s[j].copy_(dh)
                    dm, dy_j = dh @ w_hr_a, None
                else:
                    dm = dh_j  # the kernel adds dy_j (one launch less per step)
                ops.lstm_step_backward(
                    step_codes[j], c_prevs[j], dm, dc_j, levels, dgates_out=dg_s[j],
                    dc_prev_out=dc_j, preact=None if pre_s is None else pre_s[j],
                    cell_clip=cfg.cell_clip, check=first_step, dy=dy_j, **low_out,
                )
                first_step = False  # later steps: views of the same buffers
                recurrent_t.mm(low_out.get("dgates_low_out", dg_s[j]), out=dh_j)
            del c_prevs

            h_prev = previous_rows(as_output(m_chunk), before, h_init, cfg, steps, lo, acc)
            _chunk_weight_grads(ctx, kept, dgates, h_prev, dhs, m_chunk, input_t, lo, hi,
                                d_w_ih, d_w_hh, d_b, d_w_hr, dx, gemm)
            del h_prev
        if low is not None:
            dh_state.copy_(dh_low)
        return dx, dh_state, dc_state, d_w_ih, d_w_hh, d_b, d_w_hr
