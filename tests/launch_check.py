"""Checks of discrnn.kernels.launch's relaunch route, without a GPU.

    python tests/launch_check.py

Runs the step launchers through the stand-in sm_90 driver of scripts/bench_launch.py (the kernels
are compiled for real, nothing is launched) with a launcher that records what it is handed, and
checks that a relaunch hands the compiled kernel's launcher exactly what Triton's run hands it
(the same compiled variant, grid, stream, function, metadata and arguments), that a new
specialisation goes through Triton's run, and that launch hooks turn the short route off. Prints
one line per check and exits non-zero on the first failure. Must run with TRITON_INTERPRET unset
(interpreted kernels cannot be compiled), so tests/test_launch.py calls it in a subprocess.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("launch_check.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_launch  # noqa: E402

from discrnn.kernels import launch  # noqa: E402
from discrnn.kernels import rnn as K  # noqa: E402

# (launcher instance, its arguments) per launch, whichever route made it
handed: list = []
full_runs: list = []


class RecordingDriver(bench_launch.StandInDriver):
    class launcher_cls:  # noqa: N801 - one per compiled variant, as Triton makes them
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args):
            handed.append((self, args))
            # grid (3), stream, function, packed metadata, launch metadata, enter hook, exit hook:
            # the enter hook is called as Triton's C launcher calls it
            if args[7] is not None:
                args[7](args[6])


def _counting_run(real_run):
    def run(self, *args, grid, warmup, **kwargs):
        full_runs.append(self)
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
    return run


def _what_matters(call):
    """The launcher (so the compiled variant), grid, stream, function, packed metadata and the
    kernel's arguments; not the launch metadata and hooks, which the relaunch leaves out (None)
    because it runs only where no hook is set."""
    launcher, args = call
    return (launcher, args[:6], args[9:])


def _same(a, b) -> bool:
    la, ha, ka = _what_matters(a)
    lb, hb, kb = _what_matters(b)
    return la is lb and ha == hb and len(ka) == len(kb) and all(
        x is y or (type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y)
        or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            and x.data_ptr() == y.data_ptr() and x.dtype == y.dtype)
        for x, y in zip(ka, kb))


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}")
    if not ok:
        sys.exit(1)


def main() -> int:
    previous = getattr(driver, "_active", None)
    driver.set_active(RecordingDriver())
    # checked launches (a pass's first step) refuse CPU tensors: the stand-in's are never read
    K._check_device = lambda device: None
    real_run = JITFunction.run
    JITFunction.run = _counting_run(real_run)
    try:
        for name, fn in bench_launch.launches(4, 32, 64, torch.device("cpu")).items():
            launch.clear_variants()
            launch.RELAUNCH = False
            fn()
            fn()
            via_run = handed[-1]
            launch.RELAUNCH = True
            runs = len(full_runs)
            fn()  # a full launch (the table is empty), which records the variant
            fn()
            check(f"{name}: the first launch runs through Triton, the second does not",
                  len(full_runs) == runs + 1, f"{len(full_runs) - runs} full runs")
            check(f"{name}: a relaunch hands the launcher what Triton's run does",
                  _same(handed[-1], via_run),
                  f"{_what_matters(handed[-1])[1]} against {_what_matters(via_run)[1]}")
            check(f"{name}: the relaunch leaves hooks and launch metadata out",
                  handed[-1][1][6:9] == (None, None, None))

        # A later step whose output view is aligned differently: Triton's binder specialises on
        # 16-byte alignment, so that is another variant, which only Triton's run may pick.
        B, H = 4, 32
        gates, c = torch.randn(B, 4 * H), torch.randn(B, H)
        final = torch.zeros(2, B, H, dtype=torch.uint8)
        m = torch.empty(B * H + 1)
        aligned, misaligned = m[:-1].view(B, H), m[1:].view(B, H)

        def step(m_out, check_args=False):
            K.lstm_step_forward(gates, c, 64, out=None, final=final, done=0, c_out=c,
                                m_out=m_out, check=check_args)

        launch.clear_variants()
        step(aligned, True)
        runs = len(full_runs)
        step(aligned)
        aligned_call = handed[-1]
        check("a later step like the first relaunches", len(full_runs) == runs)
        step(misaligned)
        check("a misaligned view goes through Triton's run", len(full_runs) == runs + 1)
        misaligned_call = handed[-1]
        check("... which picks another compiled variant", misaligned_call[0] is not aligned_call[0])
        step(misaligned)
        check("... and then relaunches it", len(full_runs) == runs + 1
              and handed[-1][0] is misaligned_call[0])
        step(aligned)
        check("both variants stay recorded", len(full_runs) == runs + 1
              and handed[-1][0] is aligned_call[0])

        # Launch hooks: a full launch that finds one empties the table (every later launch is
        # full, so the hook sees it) until a full launch finds the hooks clear again.
        seen = []
        hook = seen.append
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            step(aligned, True)
            runs = len(full_runs)
            step(aligned)
            check("with a launch hook set, later steps run through Triton",
                  len(full_runs) == runs + 1 and len(seen) == 2, f"{len(seen)} hook calls")
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        step(aligned, True)
        runs = len(full_runs)
        step(aligned)
        check("hooks cleared: the next pass relaunches again", len(full_runs) == runs)

        launch.RELAUNCH = False
        step(aligned, True)
        runs = len(full_runs)
        step(aligned)
        check("RELAUNCH off: every launch runs through Triton", len(full_runs) == runs + 1)
    finally:
        launch.RELAUNCH = True
        JITFunction.run = real_run
        driver.set_active(previous)
    print("all launch checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
