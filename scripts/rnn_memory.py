#!/usr/bin/env python
"""How peak memory of one forward+backward grows with the sequence length T: DiscreteLSTM (levels 64
and 256), DiscreteGRU (levels 64) and torch.nn.LSTM / GRU, fitted as a straight line
``peak = a + slope * T`` and reported as the slope in bytes per time step x batch row x hidden unit.

Method. Every (module, T) runs in a process of its own (``memory_worker`` of
``scripts/bench_rnn.py``), forked from a multiprocessing "forkserver": a clean interpreter that has
only imported torch and discrnn and never touched CUDA or torch's thread pools. Each measurement
gets a new child, so none inherits another's allocator state or peak, and the torch import is paid
once rather than per point. In that child:

1. build the module and ``x`` [T, B, input_size] (requires_grad); a warm-up forward+backward on
   2 steps makes thread pools, BLAS handles and lazy state (short, so that it leaves few freed heap
   blocks for the measured call to reuse unseen);
2. baseline: CPU, the current resident set size, after resetting the RSS high-water mark through
   ``/proc/self/clear_refs``; CUDA, ``torch.cuda.memory_allocated`` after
   ``torch.cuda.reset_peak_memory_stats``;
3. forward over all T steps (saved-tensor hooks count what autograd keeps, copying nothing),
   loss = output.sum() + final states, ``torch.autograd.grad`` of x and of every parameter;
4. peak = CPU ``getrusage(RUSAGE_SELF).ru_maxrss`` (the high-water mark), CUDA
   ``torch.cuda.max_memory_allocated``, minus the baseline.

On CPU the processes run with ``MALLOC_MMAP_THRESHOLD_=65536``: each tensor above 64 KiB is its own
mapping, returned to the system when freed, so RSS follows the live tensors. With glibc's default
(adaptive) threshold, freed tensors stay in the heap, are counted in the baseline and are silently
reused by the measured call, which understates the peak. Tensors below 64 KiB still come from the
heap; their fragmentation is roughly constant and lands mostly in the intercept ``a``.

What the slope includes. The baseline holds the parameters and the input x. Everything that grows
with T during the measured call is in the slope: the memory kept for backward (``kept``, from the
saved-tensor hooks, without input, parameters and output), the returned output y (T x B x H floats)
and the input gradient dx (T x B x input_size floats), both alive at the end of the call by
construction, and whatever T-sized temporaries forward or backward create. ``y + dx`` is those two
tensors' share (``elem * (1 + input_size / H)`` bytes per unit) and ``rest = slope - kept - y - dx``
what is left: when positive, T-sized temporaries beyond what is kept and returned; negative when
kept, y and dx are not all alive at the same moment (autograd frees saved tensors as backward
proceeds, before dx is complete). The gradient of ``output.sum()`` that reaches the layer is an
expanded scalar (a stride-0 view), so the loss materialises no T x B x H output gradient; a loss
with a real dy would add ``elem`` bytes per unit to every row. So the slope equals BASELINES.md's
kept-bytes figure only after the output, dx and temporaries are taken out.

Defaults take well under the ~4 minutes allowed on a 2-core CPU (about 35 s on a shared one):
T in {64, 128, 256, 512, 1024}, B=16, H=input_size=256, float32, two processes at a time (peaks are
per process, so two at once do not mix; each gets one thread). ``--quick``: T in {32, 64, 128}, B=8,
H=64, about 10 s; at that size heap noise dominates and the numbers only show that it runs. CUDA
defaults: B=64, H=1024. Writes ``results/rnn_memory_<device>[_quick].csv`` (one row per module and
T, carrying the fit of that module) and a PNG when matplotlib imports.

    python scripts/rnn_memory.py
    python scripts/rnn_memory.py --quick
    python scripts/rnn_memory.py --steps 128 256 512 --configs lstm:64 lstm:torch
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import triton

# The worker, the module builder and the reporting helpers live in bench_rnn.py beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rnn as B  # noqa: E402
from bench_env import add_device_argument, resolve_device, save_figure  # noqa: E402

import discrnn  # noqa: E402

DEFAULT_CONFIGS = ["lstm:torch", "lstm:64", "lstm:256", "gru:torch", "gru:64"]


@dataclass
class Point:
    """One process: one module at one T, plus the fit of that module (filled afterwards)."""

    label: str
    cell: str
    levels: int | None
    dtype: str
    steps: int
    batch: int
    hidden: int
    input_size: int
    chunk_size: int
    peak_bytes: float = math.nan
    end_bytes: float = math.nan
    kept_bytes: float = math.nan
    slope_per_unit: float = math.nan  # fitted peak slope / (B * H), bytes per step x batch x unit
    intercept_mib: float = math.nan
    max_residual_mib: float = math.nan
    kept_slope_per_unit: float = math.nan
    codes_per_unit: float = math.nan
    y_dx_per_unit: float = math.nan
    error: str = ""


def parse_config(text: str) -> tuple[str, int | None]:
    """'lstm:64' -> ('lstm', 64); 'gru:torch' -> ('gru', None)."""
    cell, _, levels = text.partition(":")
    if cell not in B.CELLS or not levels:
        raise argparse.ArgumentTypeError(f"expected CELL:LEVELS or CELL:torch, got {text!r}")
    if levels == "torch":
        return cell, None
    try:
        value = int(levels)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"levels must be an int or 'torch', got {levels!r}") from None
    if not 2 <= value <= 256:
        raise argparse.ArgumentTypeError(f"levels must lie in [2, 256], got {value}")
    return cell, value


def fit_line(ts: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b * t -> (a, b, largest |residual|)."""
    n = len(ts)
    mean_t, mean_y = sum(ts) / n, sum(ys) / n
    var_t = sum((t - mean_t) ** 2 for t in ts)
    b = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys)) / var_t
    a = mean_y - b * mean_t
    return a, b, max(abs(y - (a + b * t)) for t, y in zip(ts, ys))


def elem_size(dtype: str) -> int:
    return torch.empty((), dtype=B.DTYPES[dtype]).element_size()


def fit_module(points: list[Point]) -> None:
    """Fit peak and kept bytes against T for one module's points, store the results in each."""
    good = [p for p in points if not p.error]
    if len(good) < 2:
        return
    units_per_step = good[0].batch * good[0].hidden
    ts = [p.steps for p in good]
    a, slope, resid = fit_line(ts, [p.peak_bytes for p in good])
    _, kept_slope, _ = fit_line(ts, [p.kept_bytes for p in good])
    y_dx = elem_size(good[0].dtype) * (1 + good[0].input_size / good[0].hidden)
    for p in points:
        p.slope_per_unit = slope / units_per_step
        p.intercept_mib = a / 2**20
        p.max_residual_mib = resid / 2**20
        p.kept_slope_per_unit = kept_slope / units_per_step
        p.y_dx_per_unit = y_dx


def print_tables(points: list[Point], labels: list[str], steps: list[int], title: str) -> None:
    fmt = B.fmt
    # Peaks per T: the raw measurements the fit is made from.
    header = ["module"] + [f"T={t}" for t in steps]
    table = []
    for label in labels:
        row = [label]
        for t in steps:
            p = next(p for p in points if p.label == label and p.steps == t)
            row.append("ERR" if p.error else fmt(p.peak_bytes / 2**20, ".1f"))
        table.append(row)
    render_table(f"{title}: peak MiB above baseline", header, table)

    # The fit.
    header = ["module", "peak slope B/u", "intercept MiB", "max resid MiB", "kept B/u",
              "codes B/u", "y + dx B/u", "rest B/u", f"peak vs torch @T={steps[-1]}"]
    table = []
    for label in labels:
        p = next(p for p in points if p.label == label)
        last = next(q for q in points if q.label == label and q.steps == steps[-1])
        ref = next((q for q in points if q.cell == p.cell and q.levels is None
                    and q.steps == steps[-1]), None)
        vs_torch = (last.peak_bytes / ref.peak_bytes if ref is not None and ref.peak_bytes
                    else math.nan)
        rest = p.slope_per_unit - p.kept_slope_per_unit - p.y_dx_per_unit
        table.append([label, fmt(p.slope_per_unit, ".2f"), fmt(p.intercept_mib, ".1f"),
                      fmt(p.max_residual_mib, ".2f"), fmt(p.kept_slope_per_unit, ".3f"),
                      fmt(p.codes_per_unit, ".3f"), fmt(p.y_dx_per_unit, ".1f"), fmt(rest, ".2f"),
                      fmt(vs_torch, ".3f")])
    render_table(f"{title}: least-squares fit peak = a + slope * T, per step x batch x hidden unit",
                 header, table)
    print("  kept B/u: slope of the saved-tensor bytes (without input, parameters, output); "
          "codes B/u: the docstring's promise;\n  y + dx: output and input gradient, alive at the "
          "end of the call; rest = peak slope - kept - (y + dx): > 0 is T-sized memory beyond\n"
          "  them (temporaries), < 0 means they are not all alive at the peak (saved tensors are "
          "freed as backward runs).")


def render_table(title: str, header: list[str], table: list[list[str]]) -> None:
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]

    def render(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(f"\n== {title}")
    print(render(header))
    print(render(["-" * w for w in widths]))
    for line in table:
        print(render(line))


def write_csv(path: Path, points: list[Point], meta: dict) -> None:
    names = list(meta) + [f.name for f in fields(Point)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for p in points:
            writer.writerow({**meta, **asdict(p)})


def plot(path: Path, points: list[Point], labels: list[str], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - the plot is optional
        print(f"\nplot skipped: matplotlib does not import ({type(exc).__name__}: {exc})")
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for label in labels:
        mine = [p for p in points if p.label == label and not p.error]
        if not mine:
            continue
        line, = ax.plot([p.steps for p in mine], [p.peak_bytes / 2**20 for p in mine], "o-",
                        label=f"{label}: {mine[0].slope_per_unit:.1f} B/u")
        # The fitted line, to show how straight the points are.
        ts = [mine[0].steps, mine[-1].steps]
        units = mine[0].batch * mine[0].hidden
        ax.plot(ts, [mine[0].intercept_mib + mine[0].slope_per_unit * units * t / 2**20
                     for t in ts], ":", color=line.get_color())
    ax.set_xlabel("T (steps)")
    ax.set_ylabel("peak MiB above baseline")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Slope of peak forward+backward memory against T for DiscreteLSTM/GRU and "
        "torch.nn.LSTM/GRU, one fresh process per module and T.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_device_argument(p)
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="sequence lengths (default 64 128 256 512 1024; quick 32 64 128)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 256 CPU, 1024 CUDA)")
    p.add_argument("--batch", type=int, default=None, help="B (default 16 CPU, 64 CUDA)")
    p.add_argument("--input-size", type=int, default=None, help="default: H")
    p.add_argument("--configs", type=parse_config, nargs="+", default=None,
                   help=f"CELL:LEVELS or CELL:torch (default {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--dtype", choices=tuple(B.DTYPES), default="float32")
    p.add_argument("--chunk-size", type=int, default=32, help="discrnn chunk_size")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes at a time (default 2 on CPU, 1 on CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: CPU cores / jobs)")
    p.add_argument("--quick", action="store_true", help="smoke run, well under a minute")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV path (default results/rnn_memory_<device>[_quick].csv)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps is not None and (len(set(args.steps)) < 2 or min(args.steps) < 1):
        p.error(f"--steps needs at least two distinct positive lengths, got {args.steps}")
    for name in ("hidden", "batch", "input_size", "jobs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"

    if args.quick:
        default = dict(steps=[32, 64, 128], hidden=64, batch=8)
    elif cuda:
        default = dict(steps=[64, 128, 256, 512, 1024], hidden=1024, batch=64)
    else:
        default = dict(steps=[64, 128, 256, 512, 1024], hidden=256, batch=16)
    steps = sorted(set(args.steps or default["steps"]))
    H = args.hidden or default["hidden"]
    Bsz = args.batch or default["batch"]
    I = args.input_size or H
    configs = args.configs or [parse_config(c) for c in DEFAULT_CONFIGS]
    # One GPU: processes in parallel would share it and its memory counters are per process
    # anyway, but there is nothing to gain. On CPU two at a time halves the wall time.
    jobs = args.jobs or (1 if cuda else min(2, os.cpu_count() or 1))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)

    name = B.device_name(device)
    meta = {
        "device": device.type, "device_name": name, "torch": torch.__version__,
        "triton": triton.__version__, "discrnn": discrnn.__version__, "commit": B.git_commit(),
        "threads_per_job": threads, "jobs": jobs, "load_avg_1min": B.load_average(),
        "peak": "max_memory_allocated" if cuda else "RSS high-water mark, MALLOC_MMAP_THRESHOLD_="
        + os.environ.get("MALLOC_MMAP_THRESHOLD_", B.MMAP_THRESHOLD),
    }
    print("discrnn recurrent-layer memory against T (one fresh process per module and T)")
    for key, value in meta.items():
        print(f"  {key:16} {value}")
    print(f"  {'shape':16} T in {steps}, B={Bsz} H={H} input_size={I} {args.dtype}, "
          f"chunk_size={args.chunk_size}")

    cases = [
        B.Case(cell, levels, H, Bsz, T, I, args.dtype, str(device), args.chunk_size, args.seed,
               threads)
        for cell, levels in configs for T in steps
    ]
    points = [Point(c.label, c.cell, c.levels, c.dtype, c.steps, c.batch, c.hidden, c.input_size,
                    c.chunk_size, codes_per_unit=c.codes_bytes_per_unit()) for c in cases]

    start = time.perf_counter()
    # Largest T first: the slowest processes start early and the pool drains evenly.
    order = sorted(range(len(cases)), key=lambda i: -cases[i].steps)
    results = dict(zip(order, B.measure_memory([cases[i] for i in order], jobs=jobs)))
    for i, point in enumerate(points):
        result = results[i]
        if "error" in result:
            point.error = result["error"]
        elif not result["peak_reset"]:
            point.error = "peak not reset (no /proc/self/clear_refs): includes setup"
        else:
            point.peak_bytes = result["peak_bytes"]
            point.end_bytes = result["end_bytes"]
            point.kept_bytes = result["kept_bytes"]
    print(f"\n{len(cases)} processes took {time.perf_counter() - start:.0f} s")

    labels = list(dict.fromkeys(p.label for p in points))
    for label in labels:
        fit_module([p for p in points if p.label == label])
    print_tables(points, labels, steps, f"{args.dtype}, B={Bsz} H={H} input_size={I} on {name}")
    print("  BASELINES.md kept B/u: torch.nn CPU fp32 LSTM 62-68, GRU 28-29; discrnn goals LSTM "
          "L=64 <= 4.0, L=256 <= 5.25, GRU L=64 <= 3.5")

    errors = [p for p in points if p.error]
    for p in errors:
        print(f"\nERROR in {p.label} T={p.steps}: {p.error}")

    tag = device.type + ("_quick" if args.quick else "")
    out = args.out or Path("results") / f"rnn_memory_{tag}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, points, {**meta, "load_avg_1min_end": B.load_average()})
    print(f"\nwrote {out}")
    title = f"peak forward+backward memory, B={Bsz} H={H} {args.dtype}, {name}"
    if not args.no_plot and plot(out.with_suffix(".png"), points, labels, title):
        print(f"wrote {out.with_suffix('.png')}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
