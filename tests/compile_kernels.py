"""Compile every Triton kernel of discrnn for real GPU targets, without a GPU.

    python tests/compile_kernels.py [--full] [--targets sm90,sm80] [--jobs 2]

Prints one JSON line per (kernel spec, target): {"name", "target", "ok", "error", "seconds"}.
Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled), so the tests call it
in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_specs import kernel_specs  # noqa: E402

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}


def compile_one(name, kernel, signature, constexprs, target_name):
    start = time.perf_counter()
    try:
        full_signature = {**signature, **{k: "constexpr" for k in constexprs}}
        src = ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs)
        # The launchers run with fp fusion off (bit-exact quantizers); compile the same way.
        compiled = triton.compile(
            src, target=TARGETS[target_name], options={"enable_fp_fusion": False, "num_warps": 4}
        )
        ok, error = bool(compiled.asm.get("cubin")), None
    except Exception:  # report every failure, keep compiling the rest
        ok, error = False, traceback.format_exc(limit=3)[-3000:]
    return {"name": name, "target": target_name, "ok": ok, "error": error,
            "seconds": round(time.perf_counter() - start, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="whole cross product, not the cover")
    parser.add_argument("--targets", default="sm90,sm80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    jobs = [(*spec, t) for spec in kernel_specs(args.full) for t in args.targets.split(",")]
    failed = 0
    # ptxas runs as a subprocess, so threads overlap well.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(lambda job: compile_one(*job), jobs):
            failed += not result["ok"]
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
