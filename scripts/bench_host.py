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
forward + backward, the best of ``--repeats`` calls after one warm-up call.

    python scripts/bench_host.py                  # LSTM and GRU, 1 and 2 layers, T=256
    python scripts/bench_host.py --cells lstm --out results/bench_host.csv
    python scripts/bench_host.py --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

# The interpreter is chosen when triton.jit decorates the kernels: before discrnn is imported.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

import discrnn  # noqa: E402
from discrnn import DiscreteGRU, DiscreteLSTM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import git_commit, load_average  # noqa: E402

CELLS = {"lstm": DiscreteLSTM, "gru": DiscreteGRU}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def stub_kernels() -> None:
    """Every Triton kernel launch returns at once (the interpreter's entry point)."""
    interpreter.InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None


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
                rows.append({"dtype": dtype, "cell": cell, "layers": layers,
                             "forward_us": round(fwd, 2), "forward_backward_us": round(both, 2)})
                print(f"  {dtype:8} {cell:4} layers={layers}: forward {fwd:6.1f} us, "
                      f"forward+backward {both:6.1f} us per layer-step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
