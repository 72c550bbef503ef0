#!/usr/bin/env python
"""Host cost of launching discrnn's step kernels, measured without a GPU.

In eager mode a layer issues its step kernels one time step at a time, and on the H200 the layers
looked bound by issuing them (README, "On an NVIDIA H200"). ``scripts/bench_host.py`` times
everything around the launches; this script times the launches themselves as far as a machine
without a GPU can: each step launcher of ``discrnn.kernels.rnn`` as the layers call it after
their first step (``check=False``), by three routes: as the layers launch (the relaunch of
:mod:`discrnn.kernels.launch`), with every launch through Triton's ``JITFunction.run``, and with
Triton's run stubbed out (discrnn's launcher alone). A stand-in driver makes that run without
CUDA: it reports an sm_90 target, so every kernel is compiled for real (ptxas) on the first call,
and its launcher does nothing. So not in the figures: the C launcher's argument marshalling and
the driver call (``cuLaunchKernelEx``), a few microseconds more on a GPU. ``--device cuda`` times
the real launches on a GPU instead (host time per call; the device keeps up with them), and
``scripts/gpu_check.sh`` runs it.

Columns: microseconds per call, best of ``--rounds`` rounds of ``--calls`` calls (rounds of the
three routes alternate): ``total`` (as the layers launch: discrnn's launcher and the relaunch),
``launcher`` (discrnn's part alone), ``relaunch`` (total - launcher), ``full_total`` (every launch
through Triton's run), ``triton_run`` (full_total - launcher), and ``runtime_args`` (the kernel's
non-constexpr parameters, each of which Triton's binder specialises on every launch, the
relaunch's included).

    python scripts/bench_launch.py                       # B=64, H=1024: gpu_check's shape
    python scripts/bench_launch.py --batch 16 --out results/bench_launch.csv
    python scripts/bench_launch.py --device cuda          # on a GPU: the real launches
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Kernels decorated while the interpreter is on cannot be compiled: it must be off before import.
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench_launch.py: unset TRITON_INTERPRET (the kernels are compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import discrnn  # noqa: E402
from discrnn.kernels import launch  # noqa: E402
from discrnn.kernels import rnn as K  # noqa: E402
from discrnn._validation import default_bits  # noqa: E402
from discrnn.kernels.rnn_torch import CodeRows  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import git_commit, load_average, write_csv  # noqa: E402


class StandInDriver:
    """What Triton's JIT asks of a driver, for an sm_90 device that runs nothing."""

    class utils:  # noqa: N801 - mirrors the driver's attribute
        @staticmethod
        def load_binary(name, kernel, shared, device):
            # module (not None: Triton loads a kernel once), function, registers, spills, threads
            return 1, 1, 32, 0, 1024

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                    "warpSize": 32}

    class launcher_cls:  # noqa: N801
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args):
            pass

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def launches(batch: int, hidden: int, levels: int, device: torch.device) -> dict:
    """One call per step launcher, with the arguments a layer's later steps pass: packed code rows
    made for the call (as the code store's ``rows_at``), views of the same buffers (on the CPU
    nothing reads them)."""
    B, H = batch, hidden
    f32 = dict(dtype=torch.float32, device=device)
    c, m, dm, dc, h = (torch.randn(B, H, **f32) for _ in range(5))
    gates, dgates = torch.randn(B, 4 * H, **f32), torch.empty(B, 4 * H, **f32)
    gx, gh, dgx, dgh = (torch.randn(B, 3 * H, **f32) for _ in range(4))
    b_hh = torch.randn(3 * H, **f32)
    final = torch.zeros(2, B, H, dtype=torch.uint8, device=device)
    bits = default_bits(levels)
    size = CodeRows.packed(torch.empty(0, dtype=torch.uint8), 0, B, 4, H, bits).row_stride * B
    store = torch.zeros(size, dtype=torch.uint8, device=device)

    def codes():
        return CodeRows.packed(store, 0, B, 4, H, bits)

    return {
        "lstm_step_forward": lambda: K.lstm_step_forward(
            gates, c, levels, out=codes(), final=final, done=0, c_out=c, m_out=m, check=False),
        "lstm_step_backward": lambda: K.lstm_step_backward(
            codes(), c, dm, dc, levels, dgates_out=dgates, dc_prev_out=dc, check=False),
        "gru_step_forward": lambda: K.gru_step_forward(
            gx, gh, h, levels, out=codes(), final=final[:1], done=0, h_out=m, check=False,
            b_hh=b_hh),
        "gru_step_backward": lambda: K.gru_step_backward(
            codes(), h, gh[:, 2 * H:], dm, levels, dgx_out=dgx, dgh_out=dgh, dh_direct_out=dm,
            check=False),
    }


KERNELS = {"lstm_step_forward": K._lstm_step_fwd_kernel,
           "lstm_step_backward": K._lstm_step_bwd_kernel,
           "gru_step_forward": K._gru_step_fwd_kernel,
           "gru_step_backward": K._gru_step_bwd_kernel}


def per_call_us(fn, calls: int, rounds: int, sync) -> dict:
    """Host time per call (best round) by route: ``relaunch`` (as the layers launch their later
    steps: :mod:`discrnn.kernels.launch`'s short route), ``full`` (every launch through Triton's
    ``JITFunction.run``) and ``stub`` (Triton's run stubbed out: discrnn's launcher alone), in
    rounds that alternate the three, so that a slow spell of a shared machine hits all alike. On a
    GPU the launches are asynchronous: as long as the device keeps up with them (a step kernel
    takes a few microseconds there) the loop's time is the host's."""
    real_run = JITFunction.run

    def stub(self, *args, grid, warmup, **kwargs):
        return None

    routes = {"relaunch": (True, real_run), "full": (False, real_run), "stub": (False, stub)}
    fn()  # the first call compiles (a full launch, which records the variant)
    sync()
    best = dict.fromkeys(routes, float("inf"))
    try:
        for _ in range(rounds):
            for name, (relaunch, run) in routes.items():
                launch.RELAUNCH, JITFunction.run = relaunch, run
                fn()  # with RELAUNCH just switched on: a full launch records the variant again
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / calls)
                sync()
    finally:
        launch.RELAUNCH, JITFunction.run = True, real_run
    return {name: t * 1e6 for name, t in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the stand-in driver (no GPU needed); cuda: real launches on the "
                        "GPU, timed on the host")
    p.add_argument("--batch", type=int, default=64, help="B")
    p.add_argument("--hidden", type=int, default=1024, help="H")
    p.add_argument("--levels", type=int, default=64)
    p.add_argument("--calls", type=int, default=2000, help="calls per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results") / "bench_launch.csv")
    args = p.parse_args(argv)
    if min(args.batch, args.hidden, args.calls, args.rounds) < 1:
        p.error("--batch, --hidden, --calls and --rounds must be >= 1")
    if not 2 <= args.levels <= 256:
        p.error(f"--levels must lie in [2, 256], got {args.levels}")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if not cuda:
        # None where no driver was ever made (no GPU): put back as found
        previous = getattr(driver, "_active", None)
        driver.set_active(StandInDriver())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "stand-in sm_90",
            "torch": torch.__version__, "triton": triton.__version__,
            "discrnn": discrnn.__version__, "commit": git_commit(),
            "load_avg_1min": load_average(), "B": args.batch, "H": args.hidden,
            "levels": args.levels}
    what = ("real launches, host time per call" if cuda
            else "stand-in sm_90 driver, nothing launched")
    print(f"host cost per launch of the step kernels ({what}): "
          + ", ".join(f"{k} {v}" for k, v in meta.items()))
    rows = []
    try:
        for name, fn in launches(args.batch, args.hidden, args.levels, device).items():
            us = per_call_us(fn, args.calls, args.rounds, sync)
            total, full, launcher = us["relaunch"], us["full"], us["stub"]
            n_args = sum(not param.is_constexpr for param in KERNELS[name].params)
            rows.append({"launcher_fn": name, "total_us": round(total, 2),
                         "launcher_us": round(launcher, 2),
                         "relaunch_us": round(total - launcher, 2),
                         "full_total_us": round(full, 2),
                         "triton_run_us": round(full - launcher, 2), "runtime_args": n_args})
            print(f"  {name:20} {total:6.1f} us a call ({full:5.1f} through Triton's run): "
                  f"discrnn's launcher {launcher:5.1f}, relaunch {total - launcher:5.1f}, "
                  f"Triton's run {full - launcher:5.1f} ({n_args} runtime arguments)")
    finally:
        if not cuda:
            driver.set_active(previous)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, rows, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
