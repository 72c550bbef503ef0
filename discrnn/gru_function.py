"""The discrete GRU layer as one autograd Function per layer and direction (see
:mod:`discrnn.rnn_function` for the sequence layout, the code store and the two paths): the chunked
torch path (``_gru_forward_chunked`` / ``_gru_backward_chunked``) and the per-step path through
the Triton step kernels (``GRULayerFunction._forward_steps`` / ``_backward_steps``)."""

from __future__ import annotations

import torch

from . import rnn_function
from .kernels import rnn_cpu, rnn_torch
from .kernels.codec_torch import compute_dtype
from .rnn_function import (
    SIG,
    TANH,
    LayerConfig,
    CodeStore,
    weight_grad_,
    StepProduct,
    backward_buffers,
    backward_gemm_dtype,
    chunk_rows,
    create_graph_backward,
    release_backward_tables,
    finish_rows,
    input_rows,
    keep_input,
    chunk_product,
    previous_rows,
    split_proc,
    split_steps,
    step_input,
)


def _gru_output_rows_fn(store, ops, levels, dtype):
    def output_rows(tensors, first, last):  # h_t exactly as the forward pass fed it to the next step
        return ops.gru_output(store.rows_at(tensors[0], first, last), levels, dtype)

    return output_rows



def _gru_output_rows_fn_tables(store, table_cache, dtype):
    def output_rows(tensors, first, last):  # table_cache: the layer's (not cfg: see lstm_function)
        codes = store.read_rows(tensors[0], first, last)
        tables = table_cache.tables(dtype, codes.device)
        return tables.lookup("value", TANH, codes[:, 3, : store.hidden]).to(dtype)

    return output_rows


def _gru_forward_chunked(x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes, preact):
    """-> y, h_n, final h codes. Bit-identical to stepping ``rnn_torch.gru_step_forward``.
    ``preact`` ([rows, 3H], compute dtype, or None) receives the pre-activations of r, z, n
    (``grad="exact"``)."""
    layout, sizes = cfg.layout, cfg.layout.batch_sizes
    dtype, device = x.dtype, x.device
    acc = compute_dtype(dtype)
    B, H = h0.shape
    step = rnn_torch.GRUForwardStep(cfg.tables(dtype, device), B, H, device)
    y = torch.empty(layout.total_rows, H, dtype=dtype, device=device)
    h_n = torch.empty(B, H, dtype=dtype, device=device)
    final_codes = torch.empty((1, B, H) if cfg.keeps_final_state else (0,), dtype=torch.uint8,
                              device=device)  # empty: no packed state wanted
    recurrent = StepProduct(w_hh, B, len(sizes))
    input_proj = chunk_product(w_ih, cfg, B)
    direct = dtype == acc
    max_rows = min(cfg.chunk, len(sizes)) * B
    rows_buf = store.rows_buffer(max_rows)  # the chunk's codes, uint8, as the store packs them
    # The fused CPU step (kernels/rnn_cpu.cpp, bit-identical to ``step``) writes uint8 codes
    # straight into rows_buf; the aten step writes int32 codes into k_buf.
    fused = rnn_cpu.fused_ops() if device.type == "cpu" and acc == torch.float32 else None
    if fused is None:
        k_buf = torch.empty(max_rows, rnn_torch.GRU_CODES, H, dtype=torch.int32, device=device)
    else:
        k_buf = rows_buf[:, :, :H]
        h_buf = None if direct else torch.empty(B, H, dtype=acc, device=device)
        no_pre = torch.empty(0, dtype=acc, device=device)
    finish = finish_rows(layout)
    h_prev = None
    prev_bs = 0
    for first, steps in cfg.chunks():
        lo, hi = layout.row_span(steps)
        gx = input_proj.linear(x[lo:hi], b_ih)
        gx3 = gx.to(acc).view(hi - lo, 3, H)
        psizes = [sizes[t] for t in steps]
        gx_rz = split_steps(gx3[:, :2], cfg, steps, lo)
        gx_n = split_steps(gx3[:, 2], cfg, steps, lo)
        outs = split_steps(y[lo:hi], cfg, steps, lo)
        k_chunk = k_buf[: hi - lo]
        k_rz = split_proc(k_chunk[:, :2].transpose(0, 1), psizes, dim=1)
        k_n, k_h = split_proc(k_chunk[:, 2], psizes), split_proc(k_chunk[:, 3], psizes)
        pres = split_steps(preact[lo:hi], cfg, steps, lo) if preact is not None else [None] * len(steps)
        for j, bs in enumerate(psizes):
            h_in = step_input(h_prev, prev_bs, bs, h0)
            v = step.rows(bs)
            gh = recurrent.mm(h_in, out=v.gh if dtype == acc else None)
            if b_hh is not None:
                gh += b_hh
            if dtype != acc:
                v.gh.copy_(gh)
            out = outs[j]
            if fused is None:
                h = step(v, gx_rz[j], gx_n[j], h_in, k_rz[j], k_n[j], k_h[j],
                         out if direct else None, pre_out=pres[j])
            else:
                h = out if direct else h_buf[:bs]
                fused.gru_forward_step(gx_rz[j], gx_n[j], v.gh, h_in.to(acc), k_rz[j], k_n[j],
                                       k_h[j], h, no_pre if pres[j] is None else pres[j],
                                       cfg.levels)
            if not direct:
                out.copy_(h)
            done = finish[first + j]
            if done < bs:
                h_n[done:bs] = out[done:bs]
                if final_codes.numel():
                    final_codes[0, done:bs] = k_h[j][done:bs]
            h_prev, prev_bs = out, bs
        if keep_codes:
            if fused is None:
                rows_buf[: hi - lo, :, :H] = k_chunk
            store.write_rows(codes_data, first, first + len(steps) - 1, rows_buf[: hi - lo])
    return y, h_n, final_codes


def _gru_backward_chunked(ctx, kept, h0, w_ih, w_hh, b_hh, codes_data, preact, dy, dh_n):
    cfg = ctx.cfg
    store, layout, sizes = cfg.store, cfg.layout, cfg.layout.batch_sizes
    dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
    tables = cfg.tables(dtype, device)
    H = w_hh.shape[1]
    gemm = backward_gemm_dtype(dtype)  # bf16/fp16 layers: products in their dtype, as torch's
    recurrent_t = StepProduct(w_hh.to(gemm or acc).t(), h0.shape[0], len(sizes))  # dgh @ W_hh
    input_t = None  # dgx @ W_ih, where dx is wanted
    if ctx.needs_input_grad[0]:
        input_t = chunk_product(w_ih.to(gemm or acc).t(), cfg, h0.shape[0])
    hn_product = chunk_product(w_hh[2 * H :].to(acc), cfg, h0.shape[0])  # gh_n again, in acc
    b_hn_a = b_hh[2 * H :].to(acc) if b_hh is not None else None
    h_init = h0.to(acc)
    fused = None  # the fused CPU kernels (kernels/rnn_cpu.cpp), grad="code" in float32 arithmetic
    if device.type == "cpu" and acc == torch.float32 and preact is None:
        fused = rnn_cpu.fused_ops()

    (dh_state,), (d_w_ih, d_w_hh), (d_b_ih, d_b_hh), dx = backward_buffers(
        ctx, acc, (h0,), (dh_n,), (w_ih, w_hh), (3 * H, 3 * H)
    )

    # dh_{t-1} = dh_t * z_t + dgh_t @ W_hh, handed over from the step processed after the current
    # one (through dh_state where the batch size changes).
    pend_dh = pend_z = pend_dgh = None
    pend_bs = 0

    def flush():
        recurrent_t.addmm(pend_dh * pend_z, pend_dgh, out=dh_state[:pend_bs])

    chunks = list(cfg.chunks())
    for k in range(len(chunks) - 1, -1, -1):
        first, steps = chunks[k]
        last = first + len(steps) - 1
        lo, hi = layout.row_span(steps)
        R = hi - lo
        psizes = [sizes[t] for t in steps]
        codes, before = chunk_rows(store, codes_data, first, last)

        def split(rows, dim=0):
            return split_steps(rows, cfg, steps, lo, dim)

        h_before = None if before is None else tables.lookup("output", TANH, before[:, 3])
        del before
        if fused is not None:  # the same lookups and products in two passes (kernels/rnn_cpu.cpp)
            h_out = torch.empty(R, H, dtype=acc, device=device)
            fused.lookup_plane(codes, 3, tables.table("output", TANH), h_out)
        else:
            idx = tables.indices(codes)
            del codes

            def gather(which, kind, q):
                return tables.gather(tables.table(which, kind), idx[q], (R, H))

            h_out = gather("output", TANH, 3)
        h_prev = previous_rows(h_out, h_before, h_init, cfg, steps, lo, acc)
        del h_out
        # h W_hn^T + b_hn, needed for dr, is recomputed for the whole chunk in one matmul.
        gh_n = hn_product.mm(h_prev)
        if b_hn_a is not None:
            gh_n += b_hn_a
        # dgh = dh * kk with kk = [(1 - z) d_n gh_n d_r, (h_prev - n) d_z, (1 - z) d_n r]; dgx is the
        # same with (1 - z) d_n as its last plane. The derivatives d_* come from the codes, or
        # with grad="exact" are f' at the kept pre-activations.
        if fused is not None:
            kk = torch.empty(3, R, H, dtype=acc, device=device)  # plane by plane
            z_v, a_n = torch.empty(2, R, H, dtype=acc, device=device)
            fused.gru_backward_prep(codes, h_prev, gh_n, tables.table("value", SIG),
                                    tables.table("deriv", SIG), tables.table("value", TANH),
                                    tables.pair_table("a_n"), kk, z_v, a_n, cfg.levels)
            del codes, gh_n
        elif preact is None:
            a_n = tables.gather(tables.pair_table("a_n"), tables.pair_index(idx[1], idx[2]), (R, H))
            d_r, d_z = gather("deriv", SIG, 0), gather("deriv", SIG, 1)
        else:
            d_r, d_z, d_n = rnn_torch.exact_derivatives(
                preact[lo:hi], rnn_torch.GRU_GATE_KINDS, acc
            ).unbind(1)
            a_n = torch.rsub(gather("value", SIG, 1), 1.0).mul_(d_n)
            del d_n
        if fused is None:
            kk = torch.empty(3, R, H, dtype=acc, device=device)  # plane by plane
            torch.mul(a_n, gh_n, out=kk[0]).mul_(d_r)
            del gh_n, d_r
            torch.sub(h_prev, gather("value", TANH, 2), out=kk[1]).mul_(d_z)
            del d_z
            torch.mul(a_n, gather("value", SIG, 0), out=kk[2])
            z_v = gather("value", SIG, 1)
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
                recurrent_t.addmm(base, pend_dgh, out=dh_s[j])
            else:
                if pend_dh is not None:
                    flush()
                torch.add(dy_s[j], dh_state[:bs], out=dh_s[j])
            torch.mul(dh_s[j], kk_s[j], out=dg3_s[j])
            pend_dh, pend_z, pend_dgh, pend_bs = dh_s[j], z_s[j], dg_s[j], bs
        pend_dh, pend_z, pend_dgh = pend_dh.clone(), pend_z.clone(), pend_dgh.clone()
        del kk, z_v, dy_s, z_s, kk_s, dys

        weight_grad_(d_w_hh, dg, h_prev, gemm)
        del h_prev
        if d_b_hh is not None:
            d_b_hh += dg.sum(0)
        torch.mul(dhs, a_n, out=dg.view(R, 3, H)[:, 2])  # dg is now d_gx
        weight_grad_(d_w_ih, dg, input_rows(ctx, cfg, kept, lo, hi).to(acc), gemm)
        if d_b_ih is not None:
            d_b_ih += dg.sum(0)
        if dx is not None:
            input_t.mm(dg, out=dx[lo:hi])
        del dg, dhs, dh_s, dg_s, dg3_s, a_n  # before the next chunk's
    if pend_dh is not None:
        flush()
    return dx, dh_state, d_w_ih, d_w_hh, d_b_ih, d_b_hh


class GRULayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, cfg: LayerConfig):
        ctx.set_materialize_grads(False)  # see LSTMLayerFunction.forward
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype = x.dtype
        hidden = w_hh.shape[1]
        store = CodeStore(layout, rnn_torch.GRU_CODES, hidden, cfg.bits, x.device, ops)
        keep_codes = (cfg.records_graph and any(ctx.needs_input_grad)) or cfg.read_by_next_layer
        codes_data = store.new_buffer() if keep_codes else torch.empty(0, dtype=torch.uint8, device=x.device)
        # grad="exact" also keeps the pre-activations of r, z, n: [rows, 3H] in the compute dtype.
        preact = None
        if keep_codes and cfg.grad == "exact":
            preact = torch.empty(layout.total_rows, 3 * hidden, dtype=compute_dtype(dtype),
                                 device=x.device)
        if cfg.chunked:
            y, h, final_codes = _gru_forward_chunked(
                x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes, preact
            )
            cfg.output_rows = _gru_output_rows_fn_tables(store, cfg.table_cache, dtype)
        else:
            y, h, final_codes = GRULayerFunction._forward_steps(
                x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes, preact
            )
            cfg.output_rows = _gru_output_rows_fn(store, ops, levels, dtype)
        cfg.store = store
        cfg.output_tensors = [codes_data]  # what the next layer of a stack saves
        ctx.cfg = cfg
        ctx.has_bias = b_ih is not None
        kept = keep_input(ctx, x, cfg)
        ctx.save_for_backward(*kept, h0, w_ih, w_hh, b_ih, b_hh, codes_data, preact)
        ctx.mark_non_differentiable(codes_data, final_codes)
        return y, h, codes_data, final_codes

    @staticmethod
    def _forward_steps(x, h0, w_ih, w_hh, b_ih, b_hh, cfg, store, codes_data, keep_codes, preact):
        """Forward through the per-step ``ops`` functions (the Triton kernels): per step one matmul
        and one kernel, which packs the codes straight into the code store and writes h into the
        output rows (see :meth:`LSTMLayerFunction._forward_steps`)."""
        layout, levels, ops = cfg.layout, cfg.levels, cfg.ops
        dtype = x.dtype
        y = torch.empty(layout.total_rows, w_hh.shape[1], dtype=dtype, device=x.device)
        h_n = torch.empty_like(h0)
        final_codes = torch.empty(1, *h0.shape, dtype=torch.uint8, device=x.device)
        finish = finish_rows(layout)
        B = h0.shape[0]
        recurrent = StepProduct(w_hh, B, len(layout.batch_sizes))
        input_proj = chunk_product(w_ih, cfg, B)
        # h W_hh^T of every step into one buffer (no allocation a step); the kernel adds b_hh
        gh_rows = torch.empty(B, w_hh.shape[0], dtype=recurrent.dtype, device=x.device)
        h_prev, prev_bs = None, 0
        for first, steps in cfg.chunks():
            lo, hi = layout.row_span(steps)
            gx = input_proj.linear(x[lo:hi], b_ih)
            # every step's rows as views made in one call per chunk (host time per step)
            gx_s, y_s = split_steps(gx, cfg, steps, lo), split_steps(y[lo:hi], cfg, steps, lo)
            pre_s = split_steps(preact[lo:hi], cfg, steps, lo) if preact is not None else None
            for j, (s, t) in enumerate(enumerate(steps, start=first)):
                bs = layout.batch_sizes[t]
                h_in = step_input(h_prev, prev_bs, bs, h0)
                gh = recurrent.mm(h_in, out=gh_rows if bs == B else gh_rows[:bs])
                out = store.rows_at(codes_data, s, s) if keep_codes else None
                ops.gru_step_forward(  # gh += b_hh in the kernel, rounded as the torch path's
                    gx_s[j], gh, h_in, levels, out=out, final=final_codes, done=finish[s],
                    store=keep_codes, h_out=y_s[j], preact_out=None if pre_s is None else pre_s[j],
                    check=s == 0,  # later steps: views of the same buffers
                    b_hh=b_hh,
                )
                h_prev, prev_bs = y_s[j], bs
                if finish[s] < bs:
                    h_n[finish[s] : bs] = h_prev[finish[s] :]
        return y, h_n, final_codes

    @staticmethod
    def backward(ctx, dy, dh_n, _codes, _final):
        saved = ctx.saved_tensors
        kept = saved[: ctx.n_kept]
        h0, w_ih, w_hh, b_ih, b_hh, codes_data, preact = saved[ctx.n_kept :]
        if torch.is_grad_enabled():  # backward(create_graph=True): differentiable gradients
            return create_graph_backward(ctx, "gru", [kept[0], h0, w_ih, w_hh, b_ih, b_hh],
                                         [dy, dh_n])
        backward = _gru_backward_chunked if ctx.cfg.chunked else GRULayerFunction._backward_steps
        grads = backward(ctx, kept, h0, w_ih, w_hh, b_hh, codes_data, preact, dy, dh_n)
        release_backward_tables(ctx.cfg)
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
    def _backward_steps(ctx, kept, h0, w_ih, w_hh, b_hh, codes_data, preact, dy, dh_n):
        """Backward through the per-step ``ops`` functions (the Triton kernels), which read the
        packed codes in place; h_{t-1} of a whole chunk comes from one output launch."""
        cfg = ctx.cfg
        store, layout, levels, ops = cfg.store, cfg.layout, cfg.levels, cfg.ops
        sizes = layout.batch_sizes
        dtype, acc, device = ctx.x_dtype, compute_dtype(ctx.x_dtype), ctx.x_device
        H, B = w_hh.shape[1], h0.shape[0]
        gemm = backward_gemm_dtype(dtype)  # as _gru_backward_chunked
        recurrent_t = StepProduct(w_hh.to(gemm or acc).t(), B, len(sizes))
        input_t = None
        if ctx.needs_input_grad[0]:
            input_t = chunk_product(w_ih.to(gemm or acc).t(), cfg, h0.shape[0])
        hn_product = chunk_product(w_hh[2 * H :].to(acc), cfg, h0.shape[0])
        b_hn_a = b_hh[2 * H :].to(acc) if b_hh is not None else None
        h_init = h0.to(acc)

        (dh_state,), (d_w_ih, d_w_hh), (d_b_ih, d_b_hh), dx = backward_buffers(
            ctx, acc, (h0,), (dh_n,), (w_ih, w_hh), (3 * H, 3 * H)
        )
        # A bf16 / fp16 layer's per-step product dgh W_hh runs in that dtype (as torch's
        # backward): the step kernel also writes its operand rounded, and the next step's kernel
        # adds the product (left in that dtype) to dh, which stays in the compute dtype (it sums
        # dh * z). The same bits as a cast before the product and an add after it, two launches a
        # step fewer; the last step's product is added after the loop.
        dgh_low_rows = product = None
        if rnn_function.LOW_PRECISION_STEP_GRADS and gemm is not None:
            dgh_low_rows = torch.empty(B, 3 * H, dtype=gemm, device=device)
            product_rows = torch.empty(B, H, dtype=gemm, device=device)

        chunks = list(cfg.chunks())
        first_step = True
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
            h_prev = previous_rows(out_rows, before, h_init, cfg, steps, lo, acc)
            del h_rows, out_rows, before
            # h W_hn^T + b_hn, needed for dr, is recomputed for the whole chunk in one matmul.
            gh_n = hn_product.mm(h_prev)
            if b_hn_a is not None:
                gh_n += b_hn_a

            def split(rows):
                return split_steps(rows, cfg, steps, lo)

            d_gx = torch.empty(hi - lo, 3 * H, dtype=acc, device=device)
            d_gh = torch.empty(hi - lo, 3 * H, dtype=acc, device=device)
            h_prev_s, gh_n_s, d_gx_s, d_gh_s = split(h_prev), split(gh_n), split(d_gx), split(d_gh)
            dy_s = split(dy[lo:hi]) if dy is not None else None
            pre_s = split(preact[lo:hi]) if preact is not None else None
            for j in range(len(steps) - 1, -1, -1):
                bs = psizes[j]
                dh_j = dh_state if bs == B else dh_state[:bs]  # no view for the whole batch
                low = {}
                if dgh_low_rows is not None:
                    if product is not None and product.shape[0] > bs:
                        # rows whose sequences start after this step (a reverse direction's
                        # packed batch): their h_0 gradients take the rest of the product now
                        dh_state[bs : product.shape[0]] += product[bs:]
                        product = product[:bs]
                    low["dgh_low_out"] = dgh_low_rows if bs == B else dgh_low_rows[:bs]
                    low["dh_add"] = product  # the later step's product (None at the last step)
                ops.gru_step_backward(  # dh_state + dy_j in the kernel (one launch less per step)
                    store.rows_at(codes_data, first + j, first + j), h_prev_s[j], gh_n_s[j],
                    dh_j, levels, dgx_out=d_gx_s[j], dgh_out=d_gh_s[j], dh_direct_out=dh_j,
                    preact=None if pre_s is None else pre_s[j],
                    check=first_step, dy=None if dy_s is None else dy_s[j], **low,
                )
                first_step = False  # later steps: views of the same buffers
                if dgh_low_rows is None:
                    recurrent_t.addmm_(dh_j, d_gh_s[j])
                else:
                    product = recurrent_t.mm(low["dgh_low_out"],
                                             out=product_rows if bs == B else product_rows[:bs])
            del gh_n, gh_n_s
            weight_grad_(d_w_ih, d_gx, input_rows(ctx, cfg, kept, lo, hi).to(acc), gemm)
            weight_grad_(d_w_hh, d_gh, h_prev, gemm)
            if d_b_ih is not None:
                d_b_ih += d_gx.sum(0)
                d_b_hh += d_gh.sum(0)
            if dx is not None:
                input_t.mm(d_gx, out=dx[lo:hi])
        if product is not None:  # the first step's product: dh_0's share through W_hh
            dh_state[: product.shape[0]] += product
        return dx, dh_state, d_w_ih, d_w_hh, d_b_ih, d_b_hh
