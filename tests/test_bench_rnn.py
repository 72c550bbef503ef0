"""Smoke run of scripts/bench_rnn.py (``--quick``): every row it promises is timed and written,
the bf16-autocast rows run their forward under autocast, and ``--products all`` adds a oneDNN row
(panels off) and a torch.addmm row beside each discrnn row."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_rnn.py")


def _run(args, timeout=300):
    """scripts/bench_rnn.py in a subprocess (compiled kernels or the torch path, never the
    interpreter the tests set up)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_quick_run_with_autocast_and_all_products(tmp_path):
    out = tmp_path / "bench.csv"
    proc = _run(["--quick", "--device", "cpu", "--threads", "1", "--no-memory", "--no-plot",
                 "--levels", "64", "--dtype", "float32", "bf16-autocast", "--products", "all",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    labels = {(r["dtype"], r["label"]) for r in rows}
    for dtype in ("float32", "bf16-autocast"):
        for cell in ("LSTM", "GRU"):
            assert (dtype, f"torch.nn.{cell}") in labels
            assert (dtype, f"Discrete{cell} L=64 [torch]") in labels
            assert (dtype, f"Discrete{cell} L=64 [torch, oneDNN]") in labels
            assert (dtype, f"Discrete{cell} L=64 [torch, addmm]") in labels
    assert len(rows) == 16 and not any(r["error"] for r in rows)
    # Every row timed but torch's module where it cannot run here (bf16 autocast on a CPU without
    # AVX-512), which says why.
    from discrnn.profiling.variants import torch_rnn_unsupported

    for r in rows:
        skipped = (r["label"] == "torch.nn.LSTM" and r["dtype"] == "bf16-autocast"
                   and torch_rnn_unsupported("lstm", "cpu", torch.bfloat16))
        assert (r["unsupported"].startswith("torch.nn.LSTM cannot run") if skipped
                else float(r["ms"]) > 0 and not r["unsupported"]), r


def test_autocast_case_runs_its_forward_in_bfloat16():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_rnn
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    case = bench_rnn.Case("lstm", 64, 8, 2, 3, 4, "bf16-autocast", "cpu")
    module, x = bench_rnn.build(case)
    assert x.dtype == module.weight_hh_l0.dtype == bench_rnn.DTYPES["float32"]
    y, _ = bench_rnn.run_forward(module, x, case)
    assert y.dtype == bench_rnn.DTYPES["bfloat16"]  # as torch.nn.LSTM's under CPU autocast
    y32, _ = bench_rnn.run_forward(module, x, bench_rnn.Case("lstm", 64, 8, 2, 3, 4, "float32", "cpu"))
    assert y32.dtype == x.dtype


def test_cuda_graphs_refused_on_the_cpu(tmp_path):
    proc = _run(["--quick", "--device", "cpu", "--cuda-graphs", "--out", str(tmp_path / "b.csv")])
    assert proc.returncode != 0 and "--cuda-graphs needs a CUDA device" in proc.stderr


@pytest.mark.gpu
def test_quick_run_with_cuda_graphs(tmp_path):
    out = tmp_path / "bench.csv"
    proc = _run(["--quick", "--device", "cuda", "--levels", "64", "--dtype", "float32",
                 "--cuda-graphs", "--repeats", "3", "--no-plot", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["label"]: r for r in csv.DictReader(out.open())}
    for cell in ("LSTM", "GRU"):
        graphed = rows[f"Discrete{cell} L=64 [triton, CUDA graph]"]
        assert not graphed["error"] and float(graphed["ms"]) > 0, graphed
        assert float(graphed["peak_mib"]) > 0 and graphed["kept_per_unit"] == "nan", graphed
        assert not rows[f"Discrete{cell} L=64 [triton]"]["error"]
