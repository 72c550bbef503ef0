"""Smoke run of scripts/bench_launch.py: the step launchers' host cost per call, split into
discrnn's launcher, the relaunch and Triton's run, through a stand-in sm_90 driver (the kernels are compiled for
real; nothing is launched)."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_launch_writes_every_launcher(tmp_path):
    out = tmp_path / "launch.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_launch.py"), "--batch", "4",
           "--hidden", "32", "--calls", "20", "--rounds", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["launcher_fn"] for r in rows] == ["lstm_step_forward", "lstm_step_backward",
                                                "gru_step_forward", "gru_step_backward"]
    for r in rows:
        total, launcher, run, relaunch, full = (float(r[k]) for k in (
            "total_us", "launcher_us", "triton_run_us", "relaunch_us", "full_total_us"))
        assert 0 < launcher < total and run > 0 and relaunch > 0 and full > launcher, r
        assert int(r["runtime_args"]) >= 8, r


def test_bench_launch_refuses_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_launch.py"), "--out",
           str(tmp_path / "x.csv")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr


@pytest.mark.gpu
def test_bench_launch_times_real_launches_on_a_gpu(tmp_path):
    out = tmp_path / "launch.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_launch.py"), "--device", "cuda",
           "--batch", "4", "--hidden", "32", "--calls", "20", "--rounds", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(float(r["triton_run_us"]) > 0 for r in rows), rows
