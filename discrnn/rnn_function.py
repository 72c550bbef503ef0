"""What the autograd Functions of the discrete recurrent layers share: one Function per layer and
direction (``lstm_function.LSTMLayerFunction``, ``gru_function.GRULayerFunction``), over the whole
sequence, keeping only bit-packed level codes (plus sparse cell-state checkpoints) for backward.

Sequences are handled in torch's packed-data form: ``x_data`` is [N, I] with the rows of time step t
at ``offsets[t] : offsets[t] + batch_sizes[t]``; batch sizes never grow with t (a padded batch is
the special case of equal sizes). Forward runs steps in processing order (t = 0..T-1, or T-1..0 for
the reverse direction); the active rows of a step are always a prefix of the batch.

What one layer keeps for backward, per step and active row (``Q`` codes of ``bits`` bits per unit,
see ``discrnn.kernels.rnn_torch``), in one uint8 buffer: ``Q * bits / 8`` bytes per unit (LSTM:
Q = 4, i, f, g, o; GRU: Q = 4, r, z, n, h); the LSTM adds its float32 cell state every ``chunk``
steps (``4 / chunk`` bytes per unit and step) and c_0, recomputes c in between from the saved
i, f, g codes, and rebuilds u = discrete_tanh(c_t)'s code from the recomputed c_t (see
``discrnn.lstm_function``) instead of keeping it. Input projections, gate gradients and weight
gradients are computed ``chunk`` steps at a time, so no [T, B, 4H] float tensor ever exists.

Two implementations share the code store and the layer Functions (each cell's in its module):

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
import math

import torch

from .kernels import codec_torch
from .kernels import rnn_torch

SIG, TANH = "sigmoid", "tanh"


def _is_torch_ops(ops) -> bool:
    """True for the torch step backend (``rnn._TorchSteps``), which the chunked path replaces."""
    return getattr(ops, "lstm_step_forward", None) is rnn_torch.lstm_step_forward


class SequenceLayout:
    """Step sizes and row offsets of a packed batch, and the processing order of one direction."""

    def __init__(self, batch_sizes: list[int], reverse: bool):
        self.batch_sizes = batch_sizes
        T = len(batch_sizes)
        # A layer's autograd node keeps its layout until the whole graph is freed: one per layer
        # per segment under torch.utils.checkpoint. With one batch size (every unpacked input) the
        # offsets are a range, not T int objects (at T = 8192, sqrt(T) segments, two layers, the
        # lists here and in CodeStore held 1.8 MiB until backward).
        self.uniform = T > 0 and batch_sizes[0] > 0 and batch_sizes.count(batch_sizes[0]) == T
        if self.uniform:
            self.offsets = range(0, T * batch_sizes[0], batch_sizes[0])
        else:
            self.offsets = [0] * T
            for t in range(1, T):
                self.offsets[t] = self.offsets[t - 1] + batch_sizes[t - 1]
        self.total_rows = self.offsets[-1] + batch_sizes[-1] if batch_sizes else 0
        self.reverse = reverse
        self.order = range(T - 1, -1, -1) if reverse else range(T)

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
        T = len(layout.batch_sizes)
        step = n_codes * layout.batch_sizes[0] * self.padded * bits // 8 if T else 0
        if layout.uniform and step > 0:  # as SequenceLayout.offsets: no T ints per layer call
            self.step_bytes = [step] * T
            self.step_offsets = range(0, T * step, step)
        else:
            self.step_bytes = [
                n_codes * layout.batch_sizes[t] * self.padded * bits // 8 for t in layout.order
            ]
            self.step_offsets = [0] * T
            for s in range(1, T):
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
        layout = self.layout
        if first == last:  # the step loops ask once per step: no list of sizes
            rows = layout.batch_sizes[layout.order[first]]
        else:
            rows = sum(layout.proc_sizes(first, last))
        return rnn_torch.CodeRows.packed(
            data, self.step_offsets[first], rows, self.n_codes, self.hidden, self.bits
        )


class TableCache(dict):
    """A layer call's ``rnn_torch.StepTables`` by (dtype, device), built on first use.

    Held by the call's ``LayerConfig`` and by its ``output_rows`` closure (which must not hold the
    cfg itself, see ``lstm_function._lstm_output_rows_fn``). Autograd keeps a layer's cfg (as
    ``ctx.cfg``) until the whole graph is freed, so the cache is emptied once the stack's forward has
    run and after each backward that filled it (``release_output_tensors``,
    ``release_backward_tables``): under torch.utils.checkpoint, which runs a layer once per
    segment, kept tables cost 13 small constant tensors per layer per segment after forward and,
    after backward, three pair tables of L * L values more (5.8 MiB at T=2048, 64 levels, 2
    layers, sqrt(T) segments; 768 KiB per layer per segment at 256 levels).
    """

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def tables(self, dtype, device) -> rnn_torch.StepTables:
        key = (dtype, torch.device(device))
        if key not in self:
            self[key] = rnn_torch.StepTables(self.levels, dtype, device)
        return self[key]


class LayerConfig:
    """Static arguments of one layer call (not tensors, so autograd ignores them).

    ``input_source``: None when the layer keeps its input tensor for backward (the first layer), or
    a :class:`CodedInput` that rebuilds the input from the previous layer's codes (inner layers).
    After forward, ``store``, ``output_tensors`` and ``output_rows`` describe this layer's codes to
    the next layer: ``output_tensors`` is what rebuilds its outputs (the code buffer; the LSTM adds
    c_0 and its cell-state checkpoints), which the next layer saves too (the same tensors: no extra
    memory), and ``output_rows(tensors, first, last)`` rebuilds the outputs of processing steps
    first..last (rows in processing order, the layer's dtype) from those tensors.
    """

    def __init__(self, batch_sizes, levels, bits, chunk, reverse, ops, input_source=None,
                 grad="code", cell_clip=math.inf):
        self.layout = SequenceLayout(batch_sizes, reverse)
        self.levels, self.bits, self.chunk, self.ops = levels, bits, chunk, ops
        self.grad = grad  # the gates' straight-through rule: "code" or "exact"
        self.cell_clip = cell_clip  # the LSTM's bound on |c_t|
        self.input_source = input_source
        self.store = None
        self.output_tensors = None
        # Set by the stack: the next layer's backward rebuilds its input from this layer's codes,
        # so they are kept even where this layer's own inputs need no gradient.
        self.read_by_next_layer = False
        # Set by the stack: False where autograd records no graph of the call (the module run under
        # torch.no_grad or inference_mode), so that no backward reads its codes; a Function's
        # needs_input_grad says only which inputs require grad, whatever the grad mode.
        self.records_graph = True
        # Set by the stack: False where the caller wants no packed final state, so that the CPU
        # path builds none (the final codes, the LSTM's copy of its cell state: small tensors per
        # layer call; under torch.utils.checkpoint they are freed between long-lived small
        # allocations and left 2.1 MiB of holes in glibc's heap at T=8192, H=256, 2 layers).
        self.keeps_final_state = True
        self.output_rows = None
        self.chunked = _is_torch_ops(ops)  # the chunked torch path (see the module docstring)
        self.table_cache = TableCache(levels)

    def tables(self, dtype, device) -> rnn_torch.StepTables:
        """Constants and level lookup tables of the torch path, built once per layer call."""
        return self.table_cache.tables(dtype, device)

    def release_tables(self) -> None:
        """Drop this call's tables (rebuilt if needed again, e.g. by a second backward)."""
        self.table_cache.clear()

    def chunks(self):
        order = self.layout.order
        for first in range(0, len(order), self.chunk):
            yield first, order[first : first + self.chunk]


def chunk_rows(store, data, first, last):
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


def uniform_runs(sizes: list[int]) -> list[tuple[int, int]]:
    """[j0, j1) spans of consecutive equal batch sizes (a chunk's steps in processing order): the
    runs the chunk kernels take in one call each (one for an unpacked batch)."""
    runs, j0 = [], 0
    for j in range(1, len(sizes) + 1):
        if j == len(sizes) or sizes[j] != sizes[j0]:
            runs.append((j0, j))
            j0 = j
    return runs


def step_input(prev, prev_bs, bs, init):
    """The state rows a step reads: the previous step's (a prefix where the batch shrinks), then
    ``init`` rows for rows that start at this step (the batch grows: the reverse direction)."""
    if prev is None:
        return init[:bs]
    if bs == prev_bs:
        return prev
    if bs < prev_bs:
        return prev[:bs]
    return torch.cat([prev, init[prev_bs:bs].to(prev.dtype)])


def previous_rows(out_rows, before, h_init, cfg, steps, lo, acc):
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

    def __init__(self, prev_cfgs, mask=None):
        self.prev_cfgs = prev_cfgs  # one LayerConfig per direction of the previous layer
        self.mask = mask  # PackedDropoutMask or None
        # How many of the saved tensors belong to each direction: the cfgs drop their references
        # once the whole stack has run (see ``release_output_tensors``).
        self.counts = [len(cfg.output_tensors) for cfg in prev_cfgs]

    def tensors(self):
        """What this layer saves: each previous direction's ``output_tensors``, then the mask."""
        kept = [t for cfg in self.prev_cfgs for t in cfg.output_tensors]
        return kept + ([self.mask.packed] if self.mask is not None else [])

    def rows(self, kept, lo: int, hi: int) -> torch.Tensor:
        t_first, t_last = self.prev_cfgs[0].layout.times_in(lo, hi)
        T = len(self.prev_cfgs[0].layout.batch_sizes)
        parts = []
        start = 0
        for cfg, count in zip(self.prev_cfgs, self.counts):
            tensors = kept[start : start + count]
            start += count
            # processing indices of these times in that direction form one contiguous run
            a, b = (T - 1 - t_last, T - 1 - t_first) if cfg.layout.reverse else (t_first, t_last)
            parts.append(cfg.layout.to_time_order(cfg.output_rows(tensors, a, b), a, b))
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


def keep_input(ctx, x, cfg):
    """Save what rebuilds the input in backward: x itself, or the previous layer's codes."""
    kept = [x] if cfg.input_source is None else cfg.input_source.tensors()
    ctx.n_kept = len(kept)
    ctx.x_shape, ctx.x_dtype, ctx.x_device = x.shape, x.dtype, x.device
    return kept


def input_rows(ctx, cfg, kept, lo, hi):
    if cfg.input_source is None:
        return kept[0][lo:hi]
    return cfg.input_source.rows(kept, lo, hi)


def finish_rows(layout: SequenceLayout) -> list[int]:
    """Per processing step s, the first row that takes its last step there: rows [done, bs) finish
    at step s (done = the batch size of step s + 1, or 0 after the last step)."""
    sizes = [layout.batch_sizes[t] for t in layout.order]
    return sizes[1:] + [0]


def split_steps(rows: torch.Tensor, cfg, steps: list[int], lo: int, dim: int = 0) -> list:
    """Views of the rows of each step of a chunk (``steps``, processing order) in ``rows``, whose
    dimension ``dim`` runs over the chunk's rows lo.. in time order, as in the packed data."""
    sizes, offsets = cfg.layout.batch_sizes, cfg.layout.offsets
    bs = sizes[steps[0]]
    if all(sizes[t] == bs for t in steps):
        views = rows.unflatten(dim, (len(steps), bs)).unbind(dim)  # one call for all steps
        t0 = min(steps)
        return [views[t - t0] for t in steps]
    return [rows.narrow(dim, offsets[t] - lo, sizes[t]) for t in steps]


def backward_gemm_dtype(dtype: torch.dtype):
    """The dtype backward's matrix products run in: a bf16/fp16 layer's own (under autocast, or
    with such parameters), as torch's own backward does; None for the compute dtype. The
    recursion and the gradient sums stay in the compute dtype either way."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


# Whether bfloat16 / float16 products on the CPU run as float32 products of the widened operands
# (see widened_products); None: where oneDNN has no kernels of the dtype for this CPU.
WIDEN_LOW_PRECISION_PRODUCTS: bool | None = None
_NATIVE_LOW_PRECISION: dict = {}


def widened_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether products in ``dtype`` run as float32 products of their operands widened to float32
    (exact: a product of two bfloat16 or float16 values fits float32's significand), the result
    rounded once to ``dtype``: what a bf16 / fp16 matrix product with float32 accumulation
    computes, up to the order of the sums. On a CPU for which oneDNN has no kernels of the dtype
    (bfloat16 needs AVX-512 on x86; an AVX2 CPU such as AMD Zen 3 has none), aten's bfloat16
    products take 15-20x the float32 ones' time (a DiscreteLSTM step under bf16 autocast at H=256:
    850 against 55 ms), so there they run widened. ``WIDEN_LOW_PRECISION_PRODUCTS`` forces it
    (True) or forbids it (False)."""
    if dtype not in (torch.bfloat16, torch.float16) or device.type != "cpu":
        return False
    if WIDEN_LOW_PRECISION_PRODUCTS is not None:
        return WIDEN_LOW_PRECISION_PRODUCTS
    if dtype not in _NATIVE_LOW_PRECISION:
        name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
        try:
            native = bool(getattr(torch.ops.mkldnn, name)())
        except (AttributeError, RuntimeError):  # an older build: leave the products to aten
            native = True
        _NATIVE_LOW_PRECISION[dtype] = native
    return not _NATIVE_LOW_PRECISION[dtype]


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (a, b of one dtype) as torch.mm, but widened where :func:`widened_products` says."""
    if not widened_products(a.dtype, a.device):
        return torch.mm(a, b, out=out)
    y = torch.mm(a.float(), b.float())
    if out is None or out.dtype != a.dtype:
        y = y.to(a.dtype)
    return y if out is None else out.copy_(y)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gemm=None) -> torch.Tensor:
    """acc += a @ b, the product in ``gemm`` when given (the sum stays in acc's dtype)."""
    if gemm is None:
        return acc.addmm_(a, b)
    return acc.add_(mm(a.to(gemm), b.to(gemm)))


def weight_grad_(acc: torch.Tensor, grads: torch.Tensor, rows: torch.Tensor,
                 gemm=None) -> torch.Tensor:
    """acc += grads^T @ rows: a weight's gradient ([out, in]) summed over the rows of a chunk,
    ``grads`` [R, out] (the gate gradients) and ``rows`` [R, in] (the inputs the weight read), the
    product in ``gemm`` when given (see :func:`addmm_`).

    A float32 product on a CPU with the panel products (see :class:`StepProduct`) runs there
    (``panel_weight_grad``, kernels/panel_gemm.cpp: ``grads`` read in place, ``rows`` packed 512
    at a time, summed in blocks of 512 rows, so its rounding error is MKL's order): 0.70-0.95x
    torch.addmm's (MKL's) time for the LSTM's gradients at H = 256-1024 and 368-2048 rows on one
    thread of the 2-core AMD EPYC. A bfloat16 product into a float32 accumulator on a CPU with AMX
    runs on its tiles (``amx_weight_grad``: the float32 sum rounded once to bfloat16, then added,
    as acc.add_(torch.mm(...)) does; 0.65-0.73x its time for the LSTM's at H=256, 512 rows).
    Elsewhere torch.addmm."""
    if (gemm == torch.bfloat16 and acc.dtype == torch.float32 and acc.dim() == 2
            and acc.stride(-1) == 1 and _on_amx(acc)):
        from .kernels import rnn_cpu

        grads, rows = grads.to(gemm), rows.to(gemm)
        grads = grads if grads.stride(-1) == 1 else grads.contiguous()
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        return rnn_cpu.panel_products(torch.bfloat16).amx_weight_grad(acc, grads, rows)
    if (gemm is None and PANEL_STEP_PRODUCTS and acc.device.type == "cpu"
            and acc.dtype == grads.dtype == rows.dtype == torch.float32
            and acc.stride(-1) == 1 and grads.stride(-1) == 1 and acc.dim() == 2):
        from .kernels import rnn_cpu

        module = rnn_cpu.panel_products(torch.float32)
        if module is not None and rnn_cpu.panels_for_large_products():
            return module.panel_weight_grad(acc, grads, rows)
    return addmm_(acc, grads.t(), rows, gemm)


# Set to False to run every per-step product through torch.addmm / torch.mm (benchmarks compare).
ONEDNN_STEP_PRODUCTS = True
# The per-step path's backward product of a bf16 / fp16 layer (dgates W_hh, in that dtype) reads
# its operand rounded by the step function (``dgates_low_out`` / ``dgh_low_out``); the LSTM keeps
# dh in that dtype between steps, the GRU's next step function adds the product to its float32 dh
# (``dh_add``): the same bits as a cast before each product and a copy or add after it, two
# launches a step fewer. Set to False for the casts and adds (tests compare the two).
LOW_PRECISION_STEP_GRADS = True
# Reordering the weight costs about as much as two or three products (H=256: ~0.2 ms, H=1024:
# ~4.6 ms on the 2-core CPU); below this many products per layer call it does not pay.
_MIN_PACKED_PRODUCTS = 16
# oneDNN's linear costs ~13 us per call more than addmm before any arithmetic; it wins once the
# weight outgrows the core's cache. Measured per product (B=16, one thread, 2-core AMD EPYC),
# forward h W_hh^T + x / backward dgates W_hh + dy, addmm against packed: H=128 (256 KiB) 30.6
# against 37.5 us; H=192 (576 KiB) 66.9 / 62.2 and 59.6 / 62.3; H=256 (1 MiB) 117.6 / 97.5 and
# 106.3 / 95.9. Yet at H=256 a training step does not gain from it: discrnn-profile (2 layers,
# T=512) gave DiscreteLSTM 763 ms either way, and with sqrt(T) checkpointing 1235 against 1109 ms
# and 59.4 against 47.5 MiB (every recomputed segment reorders the weights and oneDNN keeps state
# per product shape), so float32 weights of at most 1 MiB stay on addmm. At H=512 and 1024 the
# packed weights take 0.67-0.93x addmm's time (scripts/bench_rnn.py --products both), float32 and
# bf16 autocast. float32 only: a bfloat16 addmm runs oneDNN too and reorders the weight on every
# call, so the packed weight is never slower there (per product, B=16: H=32 17.7 against 20.4 us,
# H=256 61.5 against 77.8 us).
_MIN_PACKED_WEIGHT_BYTES = 1 << 20


# A call's chunk products take oneDNN's prepacked weight only where at least this many chunks share
# it: the reorder costs about a tenth of a chunk's product (W_ih at H=512: 1.5-2.3 ms against
# 12-18 ms), which one chunk's gain over torch.mm does not repay. Checkpointed segments of fewer
# steps than a chunk were reordering every weight in every call: 2 layers, H=512, input 128,
# segments of 23 steps, one thread of a 2-core AMD EPYC Zen 3, 970 against 904 ms (one process
# alternating, medians of 6).
_MIN_ONEDNN_CHUNKS = 2

# Set to False to keep the per-step products off discrnn's own kernels (rnn_cpu.panel_products).
PANEL_STEP_PRODUCTS = True
# From about 256 rows oneDNN's and MKL's products are faster (kernels/panel_gemm.cpp); at 64 rows
# the panels take 0.94-1.04x oneDNN's time and 0.69-0.87x addmm's (H = 256-1024, float32).
_MAX_PANEL_ROWS = 64


def _panel_packed(weight: torch.Tensor, rows: int | None, products: int):
    """``weight`` ([out, in]) packed for discrnn's small-batch products (``panel_gemm.cpp``), or
    None where they do not run (see :func:`rnn_cpu.panel_products`), the products have more than
    ``_MAX_PANEL_ROWS`` rows (``rows=None``: any number), or fewer than ``_MIN_PACKED_PRODUCTS``
    of them do not pay the packing (a copy of the weight, about one or two products' time)."""
    if not (PANEL_STEP_PRODUCTS and products >= _MIN_PACKED_PRODUCTS
            and (rows is None or rows <= _MAX_PANEL_ROWS)
            and weight.device.type == "cpu" and weight.dim() == 2):
        return None
    from .kernels import rnn_cpu

    module = rnn_cpu.panel_products(weight.dtype)
    large = (rnn_cpu.amx_products() if weight.dtype == torch.bfloat16
             else rnn_cpu.panels_for_large_products())
    if module is None or (rows is None and not large):
        return None
    return module.pack_panels(weight.detach())


def _on_amx(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s panel products would run on AMX (a CPU bfloat16 weight, see
    :func:`rnn_cpu.amx_products`)."""
    if not (PANEL_STEP_PRODUCTS and weight.device.type == "cpu"):
        return False
    from .kernels import rnn_cpu

    return rnn_cpu.amx_products()


def _onednn_packed(weight: torch.Tensor, rows: int, products: int):
    """``weight`` ([out, in], torch's linear layout) reordered into oneDNN's blocked layout for
    ``torch.ops.mkldnn._linear_pointwise`` (what inductor's CPU weight prepacking does), or None
    where that is unavailable or not worth it: not a CPU tensor, not float32 / bfloat16 (float64
    has no oneDNN path, float16 needs CPU support few machines have), oneDNN absent or disabled
    (``torch.backends.mkldnn.flags(enabled=False)``), a float32 weight of at most 1 MiB or fewer
    than ``_MIN_PACKED_PRODUCTS`` products to run."""
    small = (weight.dtype == torch.float32
             and weight.numel() * weight.element_size() <= _MIN_PACKED_WEIGHT_BYTES)
    if not (ONEDNN_STEP_PRODUCTS and products >= _MIN_PACKED_PRODUCTS and not small
            and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), max(rows, 1))
    except (AttributeError, RuntimeError):  # an older build, or a CPU without the dtype's support
        return None


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: itself where it already is (``Tensor.to`` returns it too, after a
    dispatch that costs about a microsecond on the host, once per step in the step loops)."""
    return t if t.dtype == dtype else t.to(dtype)


class StepProduct:
    """The recurrence's per-step matrix product a @ W^T with one weight W ([out, in]) and a few
    rows a per call, in ``W``'s dtype (``a`` is cast to it; the layers pass bf16/fp16 weights for
    backward's products under autocast, as torch's backward computes them).

    On a CPU with AVX-512 or AVX2 (float32; bfloat16: AVX512-BF16), W is packed once per layer
    call into panels and every product runs discrnn's own kernel (``kernels/panel_gemm.cpp``;
    ``panels``): at B=16 it takes 0.67x torch.addmm's time at H=256 in float32 and 0.7x oneDNN's
    in bfloat16 (AVX-512, Zen 4), 0.77x torch.addmm's in float32 (AVX2, Zen 3); on a CPU with AMX
    the bfloat16 panels run on its tiles, 0.27x oneDNN's time (Intel Xeon, Sapphire Rapids class). A bf16 / fp16 W
    on a CPU without fast products of its dtype (:func:`widened_products`) is widened to float32
    once, and each product rounds its float32 result once to W's dtype.
    Otherwise, with oneDNN (bfloat16, or float32 and a weight over 1 MiB), W is reordered into
    oneDNN's blocked layout and every product runs oneDNN's linear on it (``packed``); its
    bfloat16 results are bit-identical to torch.addmm's. Elsewhere torch.addmm / torch.mm on W^T.
    float32 results differ between these by rounding (each sums in its own order); every product
    of one layer call takes the same route, so backward reproduces forward's products exactly.
    ``rows``: the most rows of one product; ``products``: how many a layer call runs (the
    chunk-wide products, see :func:`chunk_product`, pass the call's steps: the rows they cover).
    ``chunk``: the products are a chunk's (hundreds of rows): oneDNN's blocked layout first where
    it applies, else the panels at any number of rows (see :func:`chunk_product`); a bfloat16
    weight on a CPU with AMX takes the panels first (they run on AMX's tiles there, about 0.6x
    oneDNN's time at 512 rows and 0.27x at 16: :func:`rnn_cpu.amx_products`).
    """

    def __init__(self, weight: torch.Tensor, rows: int, products: int, chunk: bool = False,
                 onednn: bool = True):
        self.dtype = weight.dtype  # the products' (their results are rounded to it)
        # bf16 / fp16 where the CPU has no fast products of them: float32 on the widened weight
        self.widened = widened_products(weight.dtype, weight.device)
        if self.widened:
            weight = weight.float()
        self.gemm_dtype = weight.dtype
        self.weight_t = weight.t()
        if chunk and weight.dtype == torch.bfloat16 and _on_amx(weight):
            # AMX's panels beat oneDNN's products at any number of rows (rnn_cpu.amx_products)
            self.panels = _panel_packed(weight, None, products)
            self.packed = None if self.panels is not None else _onednn_packed(weight, rows,
                                                                              products)
        elif chunk:
            self.packed = _onednn_packed(weight, rows, products) if onednn else None
            # a weight oneDNN would take, in a call of too few chunks to pay its reorder: torch.mm
            big = weight.numel() * weight.element_size() > _MIN_PACKED_WEIGHT_BYTES
            declined = not onednn and big
            self.panels = (None if self.packed is not None or declined
                           else _panel_packed(weight, None, products))
        else:
            self.panels = _panel_packed(weight, rows, products)
            self.packed = None if self.panels is not None else _onednn_packed(weight, rows, products)

    def _on_panels(self, a: torch.Tensor, c, out):
        from .kernels import rnn_cpu

        module = rnn_cpu.panel_products(self.gemm_dtype)
        a = a if a.stride(-1) == 1 else a.contiguous()
        n = self.weight_t.shape[1]
        if out is not None and out.dtype == self.gemm_dtype and (n <= 1 or out.stride(-1) == 1):
            return module.panel_linear(a, self.panels, n, c, out)
        y = module.panel_linear(a, self.panels, n, c)
        return y if out is None else out.copy_(y)

    def _widened(self, a: torch.Tensor, c, out):
        """c + a @ W^T (c None: a @ W^T) in float32 on the widened operands, rounded once to W's
        dtype (into ``out`` when given)."""
        a = a.to(self.dtype).float()
        c = None if c is None else c.float()
        if self.panels is not None:
            y = self._on_panels(a, c, None)
        elif self.packed is not None:
            y = (torch.ops.mkldnn._linear_pointwise(a, self.packed, None, "none", [], "")
                 if c is None else
                 torch.ops.mkldnn._linear_pointwise.binary(a, c, self.packed, None, "add"))
        else:
            y = a @ self.weight_t if c is None else torch.addmm(c, a, self.weight_t)
        if out is None or out.dtype != self.dtype:
            y = y.to(self.dtype)  # one rounding, whatever out's dtype (as the product's own)
        return y if out is None else out.copy_(y)

    def mm(self, a: torch.Tensor, out=None) -> torch.Tensor:
        """a @ W^T, in W's dtype (into ``out`` when given)."""
        if self.widened:
            return self._widened(a, None, out)
        a = as_dtype(a, self.dtype)
        if self.panels is not None:
            return self._on_panels(a, None, out)
        if self.packed is None:
            if out is not None and out.dtype == self.dtype:
                return torch.mm(a, self.weight_t, out=out)
            y = a @ self.weight_t
        else:
            y = torch.ops.mkldnn._linear_pointwise(a, self.packed, None, "none", [], "")
        return y if out is None else out.copy_(y)

    def addmm(self, c: torch.Tensor, a: torch.Tensor, out=None) -> torch.Tensor:
        """c + a @ W^T (into ``out`` when given). Where c has W's dtype, one fused call rounding as
        torch.addmm; otherwise the product is rounded to W's dtype and added in c's."""
        if c.dtype != self.dtype:
            return torch.add(c, self.mm(a), out=out)
        if self.widened:
            return self._widened(a, c, out)
        a = as_dtype(a, self.dtype)
        if self.panels is not None:
            return self._on_panels(a, c if c.stride(-1) == 1 else c.contiguous(), out)
        if self.packed is None:
            return torch.addmm(c, a, self.weight_t, out=out)
        y = torch.ops.mkldnn._linear_pointwise.binary(a, c, self.packed, None, "add")
        return y if out is None else out.copy_(y)

    def linear(self, a: torch.Tensor, bias: torch.Tensor | None, out=None) -> torch.Tensor:
        """a @ W^T + bias (``bias`` [out] or None), rounded as :meth:`mm` followed by ``+= bias``
        in W's dtype (into ``out`` when given). On float32 panels the bias is added as each
        output is stored (one rounding, as the separate add), which saves a pass over the rows."""
        if (bias is not None and self.panels is not None and self.dtype == torch.float32
                and bias.dtype == torch.float32 and bias.dim() == 1 and bias.stride(0) == 1):
            return self._on_panels(as_dtype(a, self.dtype), bias.expand(a.shape[0], -1), out)
        y = self.mm(a, out=out)
        if bias is not None:
            y += bias
        return y

    def addmm_(self, acc: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """acc += a @ W^T."""
        if self.widened:
            return acc.add_(self.mm(a))
        if acc.dtype == self.dtype and self.panels is not None and acc.stride(-1) == 1:
            return self._on_panels(as_dtype(a, self.dtype), acc, acc)
        if acc.dtype == self.dtype and self.packed is None and self.panels is None:
            return acc.addmm_(as_dtype(a, self.dtype), self.weight_t)
        return acc.add_(self.mm(a))


def chunk_product(weight: torch.Tensor, cfg, batch: int) -> StepProduct:
    """The chunk-wide product a @ weight^T (forward's x W_ih^T with ``weight`` = W_ih, backward's
    dgates W_ih with W_ih^T, the GRU's h W_hn^T again), ``cfg.chunk`` steps of up to ``batch`` rows
    at a time. Prepacked where the call runs ``_MIN_PACKED_PRODUCTS`` steps or more (a short call,
    e.g. one step at a time in a decoding loop, does not pay the reorder): into oneDNN's layout on
    the per-step products' terms, else (float32 weights up to 1 MiB) into the panels at any number
    of rows; into oneDNN's only where the call runs ``_MIN_ONEDNN_CHUNKS`` chunks or more (else
    torch.mm for such a weight). The panels take less time than MKL there: in a layer's loop (the
    panel products of W_hh between calls; 512 rows, H=256, one thread, 2-core AMD EPYC Zen 4) x
    W_ih^T + b at 64 / 256 inputs 0.87x / 0.84x torch.mm and the add, dgates W_ih 0.75x / 0.85x
    torch.mm, the GRU's h W_hn^T 0.72x."""
    steps = len(cfg.layout.batch_sizes)
    chunks = -(-steps // cfg.chunk)
    return StepProduct(weight, min(cfg.chunk, steps) * batch, steps, chunk=True,
                       onednn=chunks >= _MIN_ONEDNN_CHUNKS)


def split_proc(rows: torch.Tensor, sizes: list[int], dim: int = 0) -> list[torch.Tensor]:
    """Views of consecutive blocks of ``sizes`` rows along ``dim`` (steps in processing order)."""
    if all(bs == sizes[0] for bs in sizes):
        return list(rows.unflatten(dim, (len(sizes), sizes[0])).unbind(dim))
    return list(rows.split(sizes, dim))


def backward_buffers(ctx, acc, states, state_grads, weights, bias_rows):
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


def create_graph_backward(ctx, cell: str, inputs: list, grad_outputs: list) -> tuple:
    """The gradients of one layer call under ``backward(create_graph=True)`` (double backward, e.g.
    a gradient penalty): the layer's math rerun by ``rnn_reference.reference_packed_layer`` on the
    saved inputs and differentiated by autograd with ``create_graph=True``, so the gradients are
    themselves differentiable. ``inputs``: the Function's tensor inputs in order (x, states,
    weights); ``grad_outputs``: the incoming gradients of (y, final states), None where unused.
    Costs what plain autograd costs (every step kept): only this mode takes that path.

    Needs the layer's input tensor: an inner layer of a ``num_layers > 1`` module rebuilds its input
    from the previous layer's codes, which autograd cannot differentiate, and raises instead."""
    from .rnn_reference import reference_packed_layer

    cfg = ctx.cfg
    if cfg.input_source is not None:
        raise RuntimeError(
            f"Discrete{cell.upper()}: backward with create_graph=True (double backward) needs each "
            "layer's input, and layers 2 and up of a module with num_layers > 1 rebuild theirs "
            "from the previous layer's codes; stack single-layer modules instead (each keeps its "
            "input), or use levels=None"
        )
    n_states = 2 if cell == "lstm" else 1
    states, weights = inputs[1 : 1 + n_states], inputs[1 + n_states :]
    y, finals = reference_packed_layer(cell, inputs[0], cfg.layout.batch_sizes, cfg.layout.reverse,
                                       states, weights, cfg.levels, cfg.grad, cfg.cell_clip)
    pairs = [(o, g) for o, g in zip([y, *finals], grad_outputs) if g is not None]
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    grads = [None] * (len(inputs) + 1)  # + the LayerConfig
    if pairs and wanted:
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                  [g for _, g in pairs], create_graph=True, allow_unused=True)
        for i, g in zip(wanted, got):
            grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return tuple(grads)


def release_output_tensors(cfgs) -> None:
    """Drop the layers' Python references to their output tensors (codes, c_0, checkpoints) once a
    stack has run: every layer that needs them has saved them with ``save_for_backward`` by then.
    A reference held in a LayerConfig (which autograd keeps alive through ``ctx.cfg``) would keep
    them in memory where ``torch.utils.checkpoint`` discards saved tensors to recompute them."""
    for cfg in cfgs:
        cfg.output_tensors = None
        cfg.release_tables()


def release_backward_tables(cfg) -> None:
    """After a layer's backward: drop the tables it built, its own and those of the layers whose
    codes rebuilt its input (see :class:`TableCache`)."""
    cfg.release_tables()
    if cfg.input_source is not None:
        for prev in cfg.input_source.prev_cfgs:
            prev.release_tables()
