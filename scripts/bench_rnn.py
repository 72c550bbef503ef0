#!/usr/bin/env python
"""Benchmark DiscreteLSTM / DiscreteGRU against torch.nn.LSTM / torch.nn.GRU in the same run:
forward+backward time, memory kept for backward and peak memory.

Every configuration runs one layer, ``x`` of shape [T, B, input_size] with ``requires_grad``, zero
initial states, and the loss ``output.sum() + h_n.sum() (+ c_n.sum())``; the backward pass computes
the gradients of ``x`` and of every parameter (``torch.autograd.grad``, so nothing accumulates in
``.grad`` between calls).

Columns:

* ``median ms`` / ``min ms``: forward+backward. CPU: ``time.perf_counter`` around each call, rounds
  interleaved over the configurations (one call of each per round, ``--warmup`` untimed rounds
  first) so that a load change on a shared machine hits every row alike; median of ``--repeats``.
  CUDA: median of ``triton.testing.do_bench`` (L2 flushed before each call, at least ``--repeats``
  timed calls after warm-up).
* ``x torch``: median time / median time of torch.nn.LSTM (GRU) in the same run and dtype; on CUDA
  that torch module runs cuDNN. Absolute CPU times drift between runs, ratios much less.
* ``kept B/u``: bytes of every distinct storage autograd saves for backward (saved-tensor hooks, as
  ``tests/test_rnn.py::kept_bytes``), excluding the input, the parameters and the output (they exist
  anyway), per time step x batch row x hidden unit. ``codes B/u`` is what the DiscreteLSTM/GRU
  docstrings promise: Q codes of ceil(log2 L) bits (+ 4 / chunk_size bytes of LSTM cell checkpoint).
* ``peak MiB``: extra memory at the peak of one forward+backward, measured in a fresh process per
  configuration so peaks never mix (forked from a clean "forkserver" interpreter that has only
  imported torch and discrnn). A warm-up call on 64 steps (two chunks) initialises thread pools
  and lazy library state (oneDNN's too: see ``warmup_tokens``); it is that short because glibc reuses the small
  blocks it frees without growing RSS. Then the baseline is taken and the full call measured. CPU: the process's resident-set high-water mark
  (``getrusage(RUSAGE_SELF).ru_maxrss``, reset to the current RSS through ``/proc/self/clear_refs``
  after the warm-up) minus the RSS at that point. The process runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every large tensor on its own and returns it
  to the system when freed; otherwise its adaptive threshold keeps freed tensors in the heap and RSS
  measures allocator history instead of live tensors. CUDA: ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats`` minus ``memory_allocated`` at that point. The baseline holds the
  model and ``x``; the peak includes the output (T x B x H), the kept tensors, the gradients
  (``dx`` is T x B x input_size) and the temporaries of backward. ``peak B/u`` divides it by
  T x B x H. Small sizes (``--quick``) give peaks of a few MiB where heap noise dominates.
  tracemalloc would be wrong here: it does not see torch's allocations.

Defaults: CPU H=256, B=16, T=512, input_size=256, float32; CUDA H=1024, B=64, T=1024, float32 and
bfloat16. Levels 64 and 256. ``--quick`` shrinks everything to a smoke run (T=32, B=4,
H=input_size=32), where peaks are heap noise. ``--dtype bf16-autocast`` runs float32 modules with
their forward under ``torch.autocast(device, torch.bfloat16)`` (torch.nn.LSTM under CPU autocast
runs oneDNN's LSTM in bf16; see the README's "Mixed precision" for discrnn's rules).
``--products both`` adds a row per discrnn configuration whose recurrent products run torch.addmm
instead of the library's default (discrnn's panel products on AVX-512 / AVX2 CPUs, else
prepacked oneDNN weights where they pay; ``discrnn.rnn_function.StepProduct``), in the same
rounds; ``--products all`` adds a row with the panels off (oneDNN where it pays) as well.
``--cuda-graphs`` (CUDA only) adds a row per discrnn configuration whose module runs through
``torch.cuda.make_graphed_callables``: its forward and its backward are one CUDA graph replay each,
with no per-step launches from Python (``x`` is the graph's static input). Its peak includes the
capture (the graph's memory pool and static tensors, which stay allocated) and its kept bytes are
not counted (a replay runs no saved-tensor hooks).
``--tf32`` (CUDA, float32 rows) adds torch's module with cuDNN's TF32 setting flipped and each
discrnn configuration with cuBLAS's flipped: by default torch.nn.LSTM / GRU on CUDA run float32 on
TF32 tensor cores (``torch.backends.cudnn.allow_tf32``, True) while discrnn's recurrent products
are torch matmuls in IEEE float32 (``torch.backends.cuda.matmul.allow_tf32``, False), so the
default rows do not compute alike; ``x torch`` stays against torch's default row.
``--trace`` profiles one more call of each row after the timing (torch.profiler) and adds
``busy_ms`` (CUDA: the time the device ran anything, the union of its kernels' and copies'
intervals), ``busy_share`` (busy_ms / the median: near 1 the device is the limit, far below it the
host's launches are, and busy_ms is about what a CUDA graph replay of that work can reach) and
``activities_per_step``, prints the activities (CUDA: kernels and copies; CPU: operators by self
time) that took the most time and writes them to ``<out>_trace.csv``.
Writes ``results/bench_rnn_<device>.csv`` (``_quick`` appended for --quick runs) and a PNG beside it
when matplotlib imports.

    python scripts/bench_rnn.py             # the default configuration of this device
    python scripts/bench_rnn.py --quick     # smoke run, a few seconds
    python scripts/bench_rnn.py --threads 1 --input-size 64 --levels 64 --cells lstm \
        --dtype float32 bf16-autocast --products all    # the CPU speed targets' setting
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import triton
from torch import nn

import discrnn
from discrnn import DiscreteGRU, DiscreteLSTM
from discrnn import rnn_function
from discrnn.backend import resolve_backend
# The RSS and saved-tensor measurement lives in the library (shared with discrnn-profile).
from discrnn.profiling.memory import (  # noqa: F401 (MMAP_THRESHOLD: scripts/rnn_memory.py)
    MMAP_THRESHOLD, KeptBytes, memory_baseline, memory_peak, rss_now,
)
from discrnn.profiling.variants import torch_rnn_unsupported
from discrnn.profiling.worker import warmup_tokens
from bench_env import (  # scripts/ is on sys.path
    add_device_argument, device_name, git_commit, load_average, resolve_device, save_figure,
)

# "bf16-autocast": float32 parameters, the forward under torch.autocast(device, torch.bfloat16)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64, "bf16-autocast": torch.float32}
CELLS = {"lstm": (nn.LSTM, DiscreteLSTM), "gru": (nn.GRU, DiscreteGRU)}
CODES_PER_UNIT = {"lstm": 4, "gru": 4}  # i, f, g, o (tanh(c) is rebuilt from c) / r, z, n, h
# Steps of the untimed warm-up call in the memory process: discrnn.profiling.worker.warmup_tokens
# (64 at the default chunk size). Short on purpose: blocks below the mmap threshold that it frees
# stay in the heap, and the measured call would reuse them unseen. Long enough for discrnn to pack
# its weights (the per-step products' panels or oneDNN layout, the chunk products' oneDNN layout
# from two chunks), so that oneDNN's one-time state (its JIT-compiled kernels, about 6 MiB) lands
# in the baseline for discrnn as it does for torch.nn.LSTM, whose every call runs oneDNN.

# shared/BASELINES.md: kept bytes per step x batch x hidden unit that discrnn aims at, and the GPU
# targets against cuDNN (time within 1.3x, at most a quarter of its peak memory).
KEPT_GOALS = {("lstm", 64): 4.0, ("gru", 64): 3.5, ("lstm", 256): 5.25}
GPU_TIME_GOAL, GPU_PEAK_GOAL = 1.3, 0.25


# ---------------------------------------------------------------------------------------------
# One configuration: what to build and how to run it (shared with scripts/rnn_memory.py)


@dataclass
class Case:
    cell: str  # "lstm" or "gru"
    levels: int | None  # None: torch.nn.LSTM / GRU itself
    hidden: int
    batch: int
    steps: int
    input_size: int
    dtype: str
    device: str
    chunk_size: int = 32
    seed: int = 0
    threads: int = 1
    backend: str | None = None  # discrnn backend: None picks by device (Triton on CUDA)
    # discrnn's per-step products (discrnn.rnn_function.StepProduct): "default" (the library's:
    # panels on AVX-512 / AVX2 CPUs, else prepacked oneDNN weights where they pay), "onednn" (the panels
    # off) or "addmm" (torch.addmm always), for comparison
    products: str = "default"
    cuda_graph: bool = False  # run through torch.cuda.make_graphed_callables (discrnn rows)
    # TF32 tensor cores for float32 products where given (see ``precision_of``); None: as the
    # process has it (torch's defaults: on for cuDNN's RNNs, off for cuBLAS's matmuls)
    tf32: bool | None = None

    @property
    def label(self) -> str:
        if self.levels is None:
            name = f"torch.nn.{self.cell.upper()}"
            cudnn = self.device.startswith("cuda") and torch.backends.cudnn.enabled
            tf32 = {None: "", True: ", TF32 on", False: ", TF32 off"}[self.tf32]
            return name + (f" (cuDNN{tf32})" if cudnn else "")
        # The backend that will run, so a table never hides which step kernels were timed.
        try:
            backend = resolve_backend(self.backend, torch.device(self.device))
        except ValueError:
            backend = f"{self.backend}?"
        products = {"default": "", "onednn": ", oneDNN", "addmm": ", addmm"}[self.products]
        graph = ", CUDA graph" if self.cuda_graph else ""
        tf32 = {None: "", True: ", TF32 matmuls", False: ", IEEE matmuls"}[self.tf32]
        return f"Discrete{self.cell.upper()} L={self.levels} [{backend}{products}{tf32}{graph}]"

    def codes_bytes_per_unit(self) -> float:
        """Kept bytes per step x batch x unit that the DiscreteLSTM/GRU docstrings promise."""
        if self.levels is None:
            return math.nan
        bits = (self.levels - 1).bit_length()
        per_unit = CODES_PER_UNIT[self.cell] * bits / 8
        if self.cell == "lstm":
            per_unit += 4 / self.chunk_size  # float32 cell-state checkpoint every chunk_size steps
        return per_unit


def resolved_backend(name: str, device: torch.device) -> str:
    """'auto' -> the backend discrnn picks on this device; one it refuses is kept as given, so its
    rows carry discrnn's own error message."""
    try:
        return resolve_backend(None if name == "auto" else name, device)
    except ValueError:
        return name


def build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    """The module and its input, the same weights for torch and discrnn (same seed, same init)."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    torch.manual_seed(case.seed)
    torch_cls, ours_cls = CELLS[case.cell]
    if case.levels is None:
        module = torch_cls(case.input_size, case.hidden)
    else:
        module = ours_cls(case.input_size, case.hidden, levels=case.levels,
                          chunk_size=case.chunk_size, backend=case.backend)
    # .to() of an nn.LSTM on CUDA re-flattens its weights into the one buffer cuDNN wants.
    module = module.to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(case.seed + 1)
    x = torch.randn(case.steps, case.batch, case.input_size, generator=gen, device=device,
                    dtype=dtype).requires_grad_()
    return module, x


def graphed(module: nn.Module, x: torch.Tensor, case: Case) -> nn.Module:
    """``module`` with its forward and backward captured as CUDA graphs on ``x`` (the static input)
    where the case asks for it; the module itself otherwise."""
    if not case.cuda_graph:
        return module
    with settings_of(case):
        return torch.cuda.make_graphed_callables(module, (x,))


def loss_of(y: torch.Tensor, states) -> torch.Tensor:
    """output.sum() + final states. The gradient of a sum is an expanded scalar (a stride-0 view),
    so no T x B x H gradient tensor is materialised by the loss itself."""
    states = states if isinstance(states, tuple) else (states,)
    return y.sum() + sum(s.sum() for s in states)


def backward(module: nn.Module, x: torch.Tensor, y: torch.Tensor, states) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_of(y, states), [x, *module.parameters()]))


@contextlib.contextmanager
def products_of(case: Case):
    """discrnn's per-step products as ``case.products`` asks, restored afterwards."""
    previous = rnn_function.ONEDNN_STEP_PRODUCTS, rnn_function.PANEL_STEP_PRODUCTS
    rnn_function.ONEDNN_STEP_PRODUCTS = case.products != "addmm"
    rnn_function.PANEL_STEP_PRODUCTS = case.products == "default"
    try:
        yield
    finally:
        rnn_function.ONEDNN_STEP_PRODUCTS, rnn_function.PANEL_STEP_PRODUCTS = previous


@contextlib.contextmanager
def precision_of(case: Case):
    """TF32 as ``case.tf32`` asks, restored afterwards. torch.nn's rows set cuDNN's flag (its RNNs
    use TF32 tensor cores for float32 by default: ``torch.backends.cudnn.allow_tf32``), discrnn's
    rows cuBLAS's (its recurrent products are torch matmuls, IEEE float32 by default:
    ``torch.backends.cuda.matmul.allow_tf32``), so a TF32 row of each computes alike."""
    if case.tf32 is None:
        yield
        return
    if case.levels is None:
        # the setter under torch.backends.cudnn.allow_tf32, which refuses plain assignment once
        # torch.backends.disable_global_flags() has run (torch's own test harness calls it)
        get, put = torch._C._get_cudnn_allow_tf32, torch._C._set_cudnn_allow_tf32
    else:
        matmul = torch.backends.cuda.matmul

        def get():
            return matmul.allow_tf32

        def put(value):
            matmul.allow_tf32 = value
    previous = get()
    put(case.tf32)
    try:
        yield
    finally:
        put(previous)


@contextlib.contextmanager
def settings_of(case: Case):
    """Every process-wide setting a case asks for: discrnn's products and the TF32 flags."""
    with products_of(case), precision_of(case):
        yield


def run_forward(module: nn.Module, x: torch.Tensor, case: Case | None = None):
    """module(x), under bf16 autocast for the "bf16-autocast" dtype (the forward only, as torch
    recommends; backward runs each op in the dtype its forward used)."""
    autocast = case is not None and case.dtype == "bf16-autocast"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        return module(x)


def forward_backward(module: nn.Module, x: torch.Tensor, case: Case | None = None):
    with settings_of(case) if case is not None else contextlib.nullcontext():
        y, states = run_forward(module, x, case)
        return y, backward(module, x, y, states)


# ---------------------------------------------------------------------------------------------
# Peak memory, in a fresh process per configuration


def memory_worker(case: Case) -> dict:
    """Runs in its own process: peak and retained memory of one forward+backward above the baseline
    after setup, and the bytes kept for backward, counted during that same forward."""
    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    module, x = build(case)
    # Warm-up (warmup_tokens): thread pools, BLAS handles and lazy state are made here, not counted.
    warm_x = x[: min(case.steps, warmup_tokens(case))].detach().requires_grad_()
    out = forward_backward(module, warm_x, case)
    del out, warm_x
    gc.collect()

    base, peak_reset = memory_baseline(device)

    # A graphed module is captured here, inside the measurement: its pool and static tensors stay.
    module = graphed(module, x, case)
    with settings_of(case):
        with KeptBytes() as kept:
            y, states = run_forward(module, x, case)
        grads = backward(module, x, y, states)
    peak = memory_peak(device) - base
    end = (torch.cuda.memory_allocated(device) if cuda else (rss_now() or 0)) - base
    # a replay runs no saved-tensor hooks: nothing to count
    kept_bytes = math.nan if case.cuda_graph else kept.total([x, y, *module.parameters()])
    del y, states, grads
    return {"peak_bytes": peak, "end_bytes": end, "kept_bytes": kept_bytes,
            "peak_reset": peak_reset}


def _safe_worker(spec: dict) -> dict:
    try:
        return memory_worker(Case(**spec))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a row error
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure_memory(cases: list[Case], jobs: int = 1, timeout_s: float = 900.0) -> list[dict]:
    """memory_worker(case) of every case, each in a process of its own, ``jobs`` at a time.

    The processes are forked from a multiprocessing "forkserver": a fresh interpreter (started by
    exec, never touched by CUDA or by torch's thread pools) that has only imported torch and
    discrnn. Each task gets a new child (maxtasksperchild=1), so no peak or allocator state is
    inherited from another measurement, and the ~2 s torch import is paid once, not per case.
    """
    if any(c.device == "cpu" for c in cases):
        # Read by glibc when the forkserver starts, inherited by every child forked from it.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "discrnn"])
    results = []
    with ctx.Pool(processes=jobs, maxtasksperchild=1) as pool:
        pending = [pool.apply_async(_safe_worker, (asdict(c),)) for c in cases]
        for task in pending:
            try:
                results.append(task.get(timeout_s))
            except multiprocessing.TimeoutError:  # also what a killed child looks like
                results.append({"error": f"no result after {timeout_s:.0f} s "
                                         "(killed? out of memory?)"})
    return results


# ---------------------------------------------------------------------------------------------
# Timing


def time_cpu(fns: list[Callable[[], object]], repeats: int, warmup: int
             ) -> tuple[list[list[float]], list[str]]:
    """Milliseconds per call of each fn, in interleaved rounds (one call of every fn per round), so
    a load change on a shared CPU spreads over all rows instead of landing on one. A fn that raises
    is recorded (second list) and left out of the later rounds."""
    times: list[list[float]] = [[] for _ in fns]
    errors = [""] * len(fns)
    for round_ in range(warmup + repeats):
        for i, fn in enumerate(fns):
            if errors[i]:
                continue
            try:
                start = time.perf_counter()
                out = fn()
                elapsed = (time.perf_counter() - start) * 1e3
                del out
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            if round_ >= warmup:
                times[i].append(elapsed)
    return times, errors


def time_cuda(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) ms from triton.testing.do_bench with at least ``repeats`` timed calls: do_bench
    times ``rep`` milliseconds' worth of calls, so rep is scaled by a first estimate."""
    fn()  # first call: cuDNN plans, cuBLAS handles, allocator growth
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3
    median, fastest = triton.testing.do_bench(
        fn, warmup=max(25.0, estimate_ms), rep=max(100.0, repeats * estimate_ms * 1.05),
        quantiles=[0.5, 0.0],
    )
    return float(median), float(fastest)


# ---------------------------------------------------------------------------------------------
# Where the time goes (--trace)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by the union of [start, end) intervals (overlaps counted once)."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize_trace(events, cuda: bool, top: int = 8) -> dict:
    """What one profiled call ran: on CUDA every device activity (kernels, copies, sets) by name
    with its calls and time, and the time the device was busy at all (the union of their
    intervals, so a replayed graph's kernels or concurrent streams are not counted twice); on the
    CPU the operators by self time (no busy figure: the host is the device there). ``events`` are
    torch.profiler FunctionEvents (anything with name, device_type, time_range and
    self_cpu_time_total)."""
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    by_name: dict[str, list[float]] = {}
    intervals = []
    for e in events:
        if e.device_type != device:
            continue
        if cuda:
            us = e.time_range.end - e.time_range.start
            intervals.append((e.time_range.start, e.time_range.end))
        else:
            us = e.self_cpu_time_total
        calls_us = by_name.setdefault(e.name, [0, 0.0])
        calls_us[0] += 1
        calls_us[1] += us
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {
        "busy_ms": busy_us(intervals) / 1e3 if cuda else math.nan,
        "activities": sum(calls for calls, _ in by_name.values()),
        "top": [(name, int(calls), us / 1e3) for name, (calls, us) in ranked[:top]],
    }


def trace_call(fn: Callable[[], object], cuda: bool) -> dict:
    """summarize_trace of one call of ``fn`` under torch.profiler (after the timing: warm)."""
    from torch.profiler import ProfilerActivity, profile

    # CUDA: the device's activities only (the host's thousands of operator events would cost
    # seconds to parse per row and say nothing about the device)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        out = fn()
        if cuda:
            torch.cuda.synchronize()
    del out
    return summarize_trace(prof.events(), cuda)


# ---------------------------------------------------------------------------------------------
# Rows and reporting


@dataclass
class Row:
    label: str
    cell: str
    levels: int | None
    dtype: str
    hidden: int
    batch: int
    steps: int
    input_size: int
    chunk_size: int
    tf32: str = ""  # "on" / "off" where the case sets TF32 (precision_of), "" where it does not
    ms: float = math.nan
    min_ms: float = math.nan
    ratio: float = math.nan  # ms / ms of the torch module of the same cell and dtype
    kept_bytes: float = math.nan
    kept_per_unit: float = math.nan
    codes_per_unit: float = math.nan
    peak_mib: float = math.nan
    peak_per_unit: float = math.nan
    peak_ratio: float = math.nan  # peak / peak of the torch module
    end_mib: float = math.nan  # memory still held after backward (output + gradients)
    # --trace: one profiled call (summarize_trace); busy_share = busy_ms / ms (CUDA only)
    busy_ms: float = math.nan
    busy_share: float = math.nan
    activities_per_step: float = math.nan
    times_ms: list = field(default_factory=list)
    error: str = ""
    unsupported: str = ""  # why the module cannot run here (not timed, not an error)


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(title: str, rows: list[Row], cuda: bool) -> None:
    header = ["module", "median ms", "min ms", "x torch", "kept B/u", "codes B/u", "peak MiB",
              "peak B/u", "peak x torch", "note"]
    table = []
    for r in rows:
        note = (f"ERROR {r.error.splitlines()[0][:70]}" if r.error
                else f"not run: {r.unsupported}" if r.unsupported else "")
        goal = KEPT_GOALS.get((r.cell, r.levels))
        if goal is not None and not math.isnan(r.kept_per_unit):
            note = (note + "; " if note else "") + (
                f"kept goal <= {goal}: {'met' if r.kept_per_unit <= goal else 'NOT met'}")
        if abs(r.peak_mib) < 1.0:  # a few heap pages: allocator noise, not the layer
            note = (note + "; " if note else "") + "peak < 1 MiB: noise"
        table.append([r.label, fmt(r.ms, ".1f"), fmt(r.min_ms, ".1f"), fmt(r.ratio, ".2f"),
                      fmt(r.kept_per_unit, ".3f"), fmt(r.codes_per_unit, ".3f"),
                      fmt(r.peak_mib, ".1f"), fmt(r.peak_per_unit, ".2f"),
                      fmt(r.peak_ratio, ".3f"), note])
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]

    def render(cells):
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(f"\n== {title}")
    print(render(header))
    print(render(["-" * w for w in widths]))
    previous = None
    for r, line in zip(rows, table):
        if previous is not None and r.cell != previous:
            print()
        previous = r.cell
        print(render(line))
    print("  B/u = bytes per time step x batch row x hidden unit; peak is measured in a fresh "
          "process (" + ("max_memory_allocated" if cuda else "RSS high-water mark") + ").")


def print_gpu_goals(rows: list[Row]) -> None:
    """shared/BASELINES.md GPU targets: DiscreteLSTM within 1.3x cuDNN time, <= 1/4 of its peak."""
    print("\n== GPU goals (shared/BASELINES.md), judged on this run")
    for r in rows:
        if r.cell != "lstm" or r.levels is None or r.error:
            continue
        t_ok = r.ratio <= GPU_TIME_GOAL
        m_ok = r.peak_ratio <= GPU_PEAK_GOAL
        print(f"{r.label:>26} {r.dtype:>8}: {r.ratio:.2f}x cuDNN time "
              f"({'met' if t_ok else 'NOT met'}: <= {GPU_TIME_GOAL}), {r.peak_ratio:.3f}x its peak "
              f"({'met' if m_ok else 'NOT met'}: <= {GPU_PEAK_GOAL})")


def print_traces(rows: list[Row], traces: dict[int, dict], steps: int, cuda: bool) -> None:
    """--trace: per row, the device's busy share of the timed median (CUDA: near 1 means the
    device is the limit, far below 1 means the host's launches are, and the busy time is roughly
    what a CUDA graph replay could reach) and the activities that take the most time."""
    what = "device activities (kernels, copies)" if cuda else "operators by self CPU time"
    print(f"\n== Trace: one profiled forward+backward per row, {what}")
    for i, trace in traces.items():
        r = rows[i]
        head = f"{r.label}, {r.dtype}: {trace['activities'] / steps:.1f} per time step"
        if not trace["activities"]:
            head += " (the profiler recorded nothing: a graph replay may be hidden from it)"
        elif cuda:
            head += (f", device busy {r.busy_ms:.1f} ms = {r.busy_share:.2f} of the median "
                     f"{r.ms:.1f} ms")
        print(head)
        for name, calls, ms in trace["top"]:
            print(f"    {ms:9.2f} ms {calls:7d} x  {name[:90]}")


def write_trace_csv(path: Path, rows: list[Row], traces: dict[int, dict], steps: int,
                    meta: dict) -> None:
    names = [*meta, "label", "dtype", "rank", "name", "calls", "calls_per_step", "total_ms",
             "share_of_busy"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for i, trace in traces.items():
            r = rows[i]
            for rank, (name, calls, ms) in enumerate(trace["top"], start=1):
                writer.writerow({**meta, "label": r.label, "dtype": r.dtype, "rank": rank,
                                 "name": name, "calls": calls, "calls_per_step": calls / steps,
                                 "total_ms": ms, "share_of_busy": ms / r.busy_ms})


def reference_row(rows: list[Row], row: Row) -> Row:
    """The torch module of ``row``'s cell and dtype as the process runs it (no TF32 change)."""
    return next(r for r in rows if r.cell == row.cell and r.dtype == row.dtype
                and r.levels is None and not r.tf32)


def write_csv(path: Path, rows: list[Row], meta: dict) -> None:
    names = list(meta) + [f.name for f in fields(Row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            d = asdict(r)
            d["times_ms"] = " ".join(f"{t:.2f}" for t in r.times_ms)
            writer.writerow({**meta, **d})


def plot(path: Path, rows: list[Row], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - the plot is optional
        print(f"\nplot skipped: matplotlib does not import ({type(exc).__name__}: {exc})")
        return False
    panels = [("ratio", "forward+backward time / torch"),
              ("kept_per_unit", "kept B per step x B x H"),
              ("peak_mib", "peak MiB (fresh process)")]
    labels = [f"{r.label}\n{r.dtype}" for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5))
    for ax, (attr, name) in zip(axes, panels):
        values = [0.0 if math.isnan(getattr(r, attr)) else getattr(r, attr) for r in rows]
        colors = ["tab:gray" if r.levels is None else "tab:blue" for r in rows]
        ax.bar(range(len(rows)), values, color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        if attr == "kept_per_unit":
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Forward+backward time, kept bytes and peak memory of DiscreteLSTM/GRU beside "
        "torch.nn.LSTM/GRU (cuDNN on CUDA) in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_device_argument(p)
    p.add_argument("--hidden", type=int, default=None, help="H (default 1024 CUDA, 256 CPU)")
    p.add_argument("--batch", type=int, default=None, help="B (default 64 CUDA, 16 CPU)")
    p.add_argument("--steps", type=int, default=None, help="T (default 1024 CUDA, 512 CPU)")
    p.add_argument("--input-size", type=int, default=None, help="default: H")
    p.add_argument("--levels", type=int, nargs="+", default=[64, 256], help="discrnn levels")
    p.add_argument("--cells", choices=tuple(CELLS), nargs="+", default=list(CELLS))
    p.add_argument("--dtype", choices=tuple(DTYPES), nargs="+", default=None,
                   help="default: float32 and bfloat16 on CUDA, float32 on CPU; bf16-autocast: "
                        "float32 parameters, the forward under torch.autocast(bfloat16)")
    p.add_argument("--products", choices=("default", "onednn", "addmm", "both", "all"),
                   default="default",
                   help="discrnn's recurrent products: the library's default (panels on AVX-512 / "
                        "AVX2 CPUs, else prepacked oneDNN weights where they pay), oneDNN where it "
                        "pays (panels off), torch.addmm always; both = default and addmm rows, "
                        "all = the three")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: also run each discrnn configuration through "
                        "torch.cuda.make_graphed_callables (forward and backward one graph replay "
                        "each)")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA, float32: also run torch.nn with cuDNN's TF32 off and discrnn with "
                        "TF32 matmuls (cuDNN's RNNs use TF32 by default, torch matmuls do not)")
    p.add_argument("--trace", action="store_true",
                   help="after the timing, profile one call of each row (torch.profiler): device "
                        "busy time and the top kernels on CUDA, the top operators on the CPU; "
                        "writes <out>_trace.csv")
    p.add_argument("--chunk-size", type=int, default=32, help="discrnn chunk_size")
    p.add_argument("--backends", choices=("auto", "torch", "triton"), nargs="+", default=["auto"],
                   help="discrnn backends to run; auto = by device (Triton on CUDA, torch on CPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per configuration (default 5 CPU, 10 CUDA; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed rounds before timing")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: T=32 B=4 H=input_size=32 unless given")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--memory-jobs", type=int, default=None,
                   help="peak-memory processes at a time (default 1 on CPU, where RSS is shared "
                        "with whatever else runs; 4 on CUDA, where each process's allocator "
                        "counts only its own tensors)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV path (default results/bench_rnn_<device>[_quick].csv)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("hidden", "batch", "steps", "input_size", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(not 2 <= L <= 256 for L in args.levels):
        p.error(f"--levels must lie in [2, 256], got {args.levels}")
    if args.chunk_size < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--chunk-size and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.cuda_graphs and not cuda:
        sys.exit("--cuda-graphs needs a CUDA device (CUDA graphs exist only there)")
    if args.tf32 and not cuda:
        sys.exit("--tf32 needs a CUDA device (TF32 tensor cores exist only there)")
    torch.set_num_threads(args.threads)

    # Sizes: the device's default configuration, shrunk by --quick, overridden by explicit flags.
    default = dict(hidden=1024, batch=64, steps=1024) if cuda else dict(hidden=256, batch=16,
                                                                         steps=512)
    if args.quick:
        default = dict(hidden=32, batch=4, steps=32)
    H = args.hidden or default["hidden"]
    B = args.batch or default["batch"]
    T = args.steps or default["steps"]
    I = args.input_size or H
    dtypes = args.dtype or (["float32", "bfloat16"] if cuda else ["float32"])
    repeats = args.repeats or (3 if args.quick else 10 if cuda else 5)

    name = device_name(device)
    meta = {
        "device": device.type, "device_name": name, "torch": torch.__version__,
        "triton": triton.__version__, "discrnn": discrnn.__version__, "commit": git_commit(),
        "threads": torch.get_num_threads(), "load_avg_1min": load_average(),
        "timing": f"do_bench median, >= {repeats} calls" if cuda
        else f"perf_counter median of {repeats} interleaved rounds after {args.warmup}",
        # the process's TF32 defaults, which every row without a tf32 entry runs under
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    print("discrnn recurrent-layer benchmark: forward+backward of one layer")
    for key, value in meta.items():
        print(f"  {key:14} {value}")
    print(f"  {'shape':14} T={T} B={B} H={H} input_size={I}, levels {args.levels}, "
          f"chunk_size={args.chunk_size}, dtypes {dtypes}")
    if not cuda and meta["load_avg_1min"] > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: load average {meta['load_avg_1min']} before the run: the CPU is shared; "
              "absolute times are inflated, compare the ratios (rounds are interleaved)")

    backends = list(dict.fromkeys(resolved_backend(b, device) for b in args.backends))
    products = {"both": ["default", "addmm"],
                "all": ["default", "onednn", "addmm"]}.get(args.products, [args.products])
    graph_choices = [False, True] if args.cuda_graphs else [False]

    def tf32_choices(dtype: str, default: bool) -> list[bool | None]:
        """The process's setting, then (--tf32, float32 products only) the other one."""
        return [None, not default] if args.tf32 and dtype == "float32" else [None]

    cases = []
    for dtype in dtypes:
        for cell in args.cells:
            cases += [Case(cell, None, H, B, T, I, dtype, str(device), args.chunk_size, args.seed,
                           torch.get_num_threads(), tf32=t)
                      for t in tf32_choices(dtype, torch.backends.cudnn.allow_tf32)]
            cases += [Case(cell, L, H, B, T, I, dtype, str(device), args.chunk_size, args.seed,
                           torch.get_num_threads(), b, p, g, t)
                      for L in args.levels for b in backends for p in products
                      for t in tf32_choices(dtype, torch.backends.cuda.matmul.allow_tf32)
                      for g in graph_choices]
    rows = [Row(c.label, c.cell, c.levels, c.dtype, H, B, T, I, args.chunk_size,
                tf32={None: "", True: "on", False: "off"}[c.tf32],
                codes_per_unit=c.codes_bytes_per_unit()) for c in cases]

    # -- time -------------------------------------------------------------------------------
    start = time.perf_counter()
    built = []
    for case, row in zip(cases, rows):
        if case.levels is None and case.dtype == "bf16-autocast":
            # torch.nn.LSTM under bf16 autocast on a CPU without AVX-512 (no oneDNN kernels)
            row.unsupported = torch_rnn_unsupported(case.cell, device, torch.bfloat16)
        if case.cuda_graph and case.dtype == "bf16-autocast":
            # make_graphed_callables refuses autocast's weight cache; bench_rnn graphs no autocast
            row.unsupported = "not graphed under autocast here (make_graphed_callables needs " \
                              "autocast's cache off)"
        if row.unsupported:
            built.append(None)
            continue
        try:
            module, x = build(case)
            built.append((graphed(module, x, case), x))
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            row.error = f"{type(exc).__name__}: {exc}"
            built.append(None)

    def call(i):
        return lambda: forward_backward(*built[i], cases[i])

    live = [i for i, b in enumerate(built) if b is not None]
    if cuda:
        for i in live:
            try:
                rows[i].ms, rows[i].min_ms = time_cuda(call(i), repeats)
            except Exception as exc:  # noqa: BLE001
                rows[i].error = f"{type(exc).__name__}: {exc}"
    else:
        all_times, errors = time_cpu([call(i) for i in live], repeats, args.warmup)
        for i, times, error in zip(live, all_times, errors):
            rows[i].error = error
            if times:
                rows[i].times_ms = times
                rows[i].ms, rows[i].min_ms = statistics.median(times), min(times)
    print(f"\ntiming took {time.perf_counter() - start:.0f} s")
    # The times now, before the trace and the memory processes: a run stopped during those (a
    # time limit) keeps them in its log.
    for row in rows:
        ref = reference_row(rows, row)
        if not math.isnan(row.ms):
            ratio = "" if math.isnan(ref.ms) else f", {row.ms / ref.ms:.2f}x {ref.label}"
            print(f"  {row.label}, {row.dtype}: {row.ms:.1f} ms median{ratio}")

    traces = {}
    if args.trace:
        start = time.perf_counter()
        for i in live:
            if rows[i].error:
                continue
            try:
                traces[i] = trace_call(call(i), cuda)
            except Exception as exc:  # noqa: BLE001 - a trace is a diagnosis, not a result
                print(f"trace of {rows[i].label} {rows[i].dtype} failed: "
                      f"{type(exc).__name__}: {exc}")
                continue
            rows[i].activities_per_step = traces[i]["activities"] / T
            if traces[i]["activities"]:  # none: a profiler that saw nothing (not an idle device)
                rows[i].busy_ms = traces[i]["busy_ms"]
                rows[i].busy_share = rows[i].busy_ms / rows[i].ms
        print(f"tracing took {time.perf_counter() - start:.0f} s")
    del built
    gc.collect()

    # -- memory: one fresh process per configuration -----------------------------------------
    if not args.no_memory:
        start = time.perf_counter()
        # One process per configuration that ran.
        todo = [i for i, row in enumerate(rows) if not row.error and not row.unsupported]
        memory_jobs = args.memory_jobs or (4 if cuda else 1)
        for i, result in zip(todo, measure_memory([cases[i] for i in todo], jobs=memory_jobs)):
            row = rows[i]
            if "error" in result:
                row.error = result["error"]
                continue
            units = T * B * H
            row.kept_bytes = result["kept_bytes"]
            row.kept_per_unit = result["kept_bytes"] / units
            row.peak_mib = result["peak_bytes"] / 2**20
            row.peak_per_unit = result["peak_bytes"] / units
            row.end_mib = result["end_bytes"] / 2**20
            if not result["peak_reset"]:
                row.error = "peak not reset (no /proc/self/clear_refs): includes setup"
        print(f"memory processes took {time.perf_counter() - start:.0f} s")

    # Ratios against the torch module of the same cell and dtype, measured in this run.
    for row in rows:
        ref = reference_row(rows, row)
        row.ratio = row.ms / ref.ms
        row.peak_ratio = row.peak_mib / ref.peak_mib if ref.peak_mib else math.nan

    for dtype in dtypes:
        print_table(f"{dtype}, T={T} B={B} H={H} input_size={I} on {name}",
                    [r for r in rows if r.dtype == dtype], cuda)
    if traces:
        print_traces(rows, traces, T, cuda)
    if cuda:
        print_gpu_goals(rows)
    print("  BASELINES.md, torch.nn CPU fp32 kept B/u: LSTM 62-68, GRU 28-29; discrnn goals: "
          "LSTM L=64 <= 4.0, L=256 <= 5.25, GRU L=64 <= 3.5")
    errors = [r for r in rows if r.error]
    for r in errors:
        print(f"\nERROR in {r.label} {r.dtype}:\n{r.error}")

    tag = device.type + ("_quick" if args.quick else "")
    out = args.out or Path("results") / f"bench_rnn_{tag}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows, {**meta, "load_avg_1min_end": load_average()})
    print(f"\nwrote {out}")
    if traces:
        trace_out = out.with_name(out.stem + "_trace.csv")
        write_trace_csv(trace_out, rows, traces, T, meta)
        print(f"wrote {trace_out}")
    if not args.no_plot and plot(out.with_suffix(".png"), rows,
                                 f"discrnn vs torch.nn, T={T} B={B} H={H}, {name} "
                                 f"(torch {torch.__version__}, triton {triton.__version__})"):
        print(f"wrote {out.with_suffix('.png')}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
