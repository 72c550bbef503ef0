"""Every kernel and constexpr combination compiles to a real GPU binary (sm_90 and sm_80), even on a
machine without a GPU: code that the interpreter accepts but the compiler rejects fails here.

The compiles run in one subprocess (tests/compile_kernels.py) because this test process may have
the kernels decorated for the interpreter, and interpreted kernels cannot be compiled."""

import json
import os
import subprocess
import sys

import pytest

from kernel_specs import kernel_specs

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = ("sm90", "sm80")


def _run_compiles(full: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(HERE, "compile_kernels.py"), "--targets", ",".join(TARGETS)]
    if full:
        cmd.append("--full")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[(r["name"], r["target"])] = r
    if not results:
        pytest.fail(f"compile_kernels.py produced no results:\n{proc.stdout}\n{proc.stderr}")
    return results


@pytest.fixture(scope="module")
def cover_results():
    return _run_compiles(full=False)


@pytest.fixture(scope="module")
def full_results():
    return _run_compiles(full=True)


def _check(results, name, target):
    r = results.get((name, target))
    assert r is not None, f"{name} on {target} was not compiled"
    assert r["ok"], f"{name} failed to compile for {target}:\n{r['error']}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", [spec[0] for spec in kernel_specs(full=False)])
def test_kernel_compiles(cover_results, name, target):
    _check(cover_results, name, target)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", [spec[0] for spec in kernel_specs(full=True)])
def test_kernel_compiles_full_cross_product(full_results, name, target):
    _check(full_results, name, target)
