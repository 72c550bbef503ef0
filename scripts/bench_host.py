#!/usr/bin/env python
"""Host time per time step of the Triton (per-step) path, measured without a GPU.

On a GPU the layers' Triton path launches a matmul and one or two step kernels per time step from
Python; each is small at the sizes users train (H=1024, B=64), and the H200 run looked bound by
issuing them (bf16 took longer than fp32; README, "On an NVIDIA H200"). This script measures the
host's part on any machine: it runs DiscreteLSTM / DiscreteGRU with ``backend="triton"`` under the
Triton interpreter with every kernel launch replaced by a no-op (outputs are garbage; nothing is
checked), so what is timed is everything but the kernels: the layers' Python, the launchers'
argument checks, torch's allocations and views, and the recurrent products (discrnn's CPU products
on small tensors here, cuBLAS calls there). Triton's own launch cost on a GPU (argument binding,
the driver call) is not in it.

Columns: microseconds per layer and time step (the call's time / T / layers), forward only and
forward + backward, the best of ``--repeats`` calls after one warm-up call; and the kernel launches
a GPU would get per layer and step, forward and backward (one more call each, counted: every
Triton launch, and every aten call but views and bare allocations, with the recurrent products
through torch.addmm / torch.mm as on a GPU), with the backward's by name.

    python scripts/bench_host.py                  # LSTM and GRU, 1 and 2 layers, T=256
    python scripts/bench_host.py --cells lstm --out results/bench_host.csv
    python scripts/bench_host.py --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

# The interpreter is chosen when triton.jit decorates the kernels: before discrnn is imported.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import discrnn  # noqa: E402
from discrnn import DiscreteGRU, DiscreteLSTM, rnn_function  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import git_commit, load_average, write_csv  # noqa: E402

CELLS = {"lstm": DiscreteLSTM, "gru": DiscreteGRU}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def stub_kernels() -> None:
    """Every Triton kernel launch returns at once (the interpreter's entry point); an active
    LaunchCounter counts it."""
    def launch(self, *args, grid, warmup, **kwargs):
        for counter in _active_counters:
            counter.counts[f"triton.{self.fn.__name__}"] += 1

    interpreter.InterpretedFunction.run = launch


# aten calls that make a view or only allocate: no kernel launch on a GPU
_NO_KERNEL = frozenset({
    "empty", "empty_strided", "empty_like", "view", "_unsafe_view", "slice", "select", "unbind",
    "t", "transpose", "as_strided", "narrow", "expand", "split", "split_with_sizes", "unsqueeze",
    "squeeze", "permute", "detach", "alias", "_reshape_alias", "lift_fresh", "unfold",
})


class LaunchCounter(TorchDispatchMode):
    """Counts, while active, the aten calls that would launch a kernel on a GPU (views and bare
    allocations left out) and the Triton kernel launches (through the stubbed entry point)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        _active_counters.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active_counters.remove(self)
        return super().__exit__(*exc)


_active_counters: list[LaunchCounter] = []


def launches_per_step(module, x) -> tuple[float, float, str]:
    """(forward, backward) kernel launches per layer and step, as a GPU would get them, and the
    backward's launches by name. The recurrent products run through torch.addmm / torch.mm here
    (on a GPU they are cuBLAS calls; the CPU's own panel products are not aten calls) and bf16
    ones natively, so each is one counted call as there."""
    saved = (rnn_function.PANEL_STEP_PRODUCTS, rnn_function.ONEDNN_STEP_PRODUCTS,
             rnn_function.WIDEN_LOW_PRECISION_PRODUCTS)
    rnn_function.PANEL_STEP_PRODUCTS = rnn_function.ONEDNN_STEP_PRODUCTS = False
    rnn_function.WIDEN_LOW_PRECISION_PRODUCTS = False
    try:
        per = x.shape[0] * module.num_layers
        with LaunchCounter() as forward:
            y, _ = module(x)
        with LaunchCounter() as backward:
            y.sum().backward()
    finally:
        (rnn_function.PANEL_STEP_PRODUCTS, rnn_function.ONEDNN_STEP_PRODUCTS,
         rnn_function.WIDEN_LOW_PRECISION_PRODUCTS) = saved
    top = ", ".join(f"{name} {n / per:.2f}" for name, n in backward.counts.most_common(6))
    return sum(forward.counts.values()) / per, sum(backward.counts.values()) / per, top


def per_step_us(module, x, backward: bool, repeats: int) -> float:
    def call():
        y, state = module(x)
        if backward:
            states = state if isinstance(state, tuple) else (state,)
            (y.sum() + sum(s.sum() for s in states)).backward()

    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best / x.shape[0] / module.num_layers * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", choices=tuple(CELLS), nargs="+", default=list(CELLS))
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=256, help="T")
    p.add_argument("--batch", type=int, default=4, help="B (small: the products are host work too)")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--levels", type=int, default=64)
    p.add_argument("--dtypes", choices=tuple(DTYPES), nargs="+", default=["float32"],
                   help="the layers' dtype (bfloat16: its backward products run in bf16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results") / "bench_host.csv")
    args = p.parse_args(argv)
    if min(args.layers + [args.steps, args.batch, args.hidden, args.repeats]) < 1:
        p.error("--layers, --steps, --batch, --hidden and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    stub_kernels()
    meta = {"torch": torch.__version__, "triton": triton.__version__,
            "discrnn": discrnn.__version__, "commit": git_commit(),
            "load_avg_1min": load_average(), "T": args.steps, "B": args.batch, "H": args.hidden}
    print("host time per layer-step of the Triton path, kernels stubbed out: "
          + ", ".join(f"{k} {v}" for k, v in meta.items()))
    rows = []
    for dtype in args.dtypes:
        for cell in args.cells:
            for layers in args.layers:
                torch.manual_seed(0)
                module = CELLS[cell](args.hidden, args.hidden, layers, levels=args.levels,
                                     backend="triton", check_finite=False).to(DTYPES[dtype])
                x = torch.randn(args.steps, args.batch, args.hidden, dtype=DTYPES[dtype],
                                requires_grad=True)
                fwd = per_step_us(module, x, False, args.repeats)
                both = per_step_us(module, x, True, args.repeats)
                fwd_launches, bwd_launches, bwd_top = launches_per_step(module, x)
                rows.append({"dtype": dtype, "cell": cell, "layers": layers,
                             "forward_us": round(fwd, 2), "forward_backward_us": round(both, 2),
                             "forward_launches": round(fwd_launches, 3),
                             "backward_launches": round(bwd_launches, 3),
                             "backward_launches_by_name": bwd_top})
                print(f"  {dtype:8} {cell:4} layers={layers}: forward {fwd:6.1f} us, "
                      f"forward+backward {both:6.1f} us per layer-step; kernel launches per "
                      f"layer-step {fwd_launches:.2f} forward, {bwd_launches:.2f} backward "
                      f"({bwd_top})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, rows, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
