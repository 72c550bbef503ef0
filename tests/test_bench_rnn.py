"""Smoke run of scripts/bench_rnn.py (``--quick``): every row it promises is timed and written,
the bf16-autocast rows run their forward under autocast, ``--products all`` adds a oneDNN row
(panels off) and a torch.addmm row beside each discrnn row, ``--tf32`` rows set the TF32 flag of
what they run, and ``--trace`` counts the device's busy time once and names what took the time."""

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


def _bench_rnn_module():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench_rnn
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return bench_rnn


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
    bench_rnn = _bench_rnn_module()
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
                 "--cuda-graphs", "--tf32", "--trace", "--repeats", "3", "--no-plot",
                 "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["label"]: r for r in csv.DictReader(out.open())}
    tf32_off = "off" if torch.backends.cudnn.allow_tf32 else "on"
    matmuls = "IEEE" if torch.backends.cuda.matmul.allow_tf32 else "TF32"
    for cell in ("LSTM", "GRU"):
        for label in (f"Discrete{cell} L=64 [triton, CUDA graph]",
                      f"Discrete{cell} L=64 [triton, {matmuls} matmuls]",
                      f"Discrete{cell} L=64 [triton, {matmuls} matmuls, CUDA graph]",
                      f"torch.nn.{cell} (cuDNN, TF32 {tf32_off})"):
            row = rows[label]
            assert not row["error"] and float(row["ms"]) > 0, row
            if "CUDA graph" not in label:  # the trace saw the device work (a replay's it may not)
                assert 0 < float(row["busy_ms"]) and float(row["activities_per_step"]) > 0, row
        assert float(graphed["peak_mib"]) > 0 and graphed["kept_per_unit"] == "nan", graphed
        assert not rows[f"Discrete{cell} L=64 [triton]"]["error"]


def test_tf32_refused_on_the_cpu(tmp_path):
    proc = _run(["--quick", "--device", "cpu", "--tf32", "--out", str(tmp_path / "b.csv")])
    assert proc.returncode != 0 and "--tf32 needs a CUDA device" in proc.stderr


@pytest.mark.parametrize("frozen", [False, True], ids=["plain", "global_flags_disabled"])
def test_tf32_rows_set_the_flag_of_what_they_run_and_restore_it(monkeypatch, frozen):
    """Also once torch.backends.disable_global_flags() has run (as torch's test harness does)."""
    import torch.backends

    if frozen:  # what disable_global_flags() sets, where its functions read it; undone after
        monkeypatch.setitem(torch.backends.flags_frozen.__globals__,
                            "__allow_nonbracketed_mutation_flag", False)
        assert torch.backends.flags_frozen()
    bench_rnn = _bench_rnn_module()
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch_case = bench_rnn.Case("lstm", None, 8, 2, 3, 4, "float32", "cuda", tf32=not cudnn)
    ours_case = bench_rnn.Case("lstm", 64, 8, 2, 3, 4, "float32", "cuda", tf32=not matmul)
    assert torch_case.label == f"torch.nn.LSTM (cuDNN, TF32 {'off' if cudnn else 'on'})" or \
        not torch.backends.cudnn.enabled
    assert ("TF32 matmuls" if not matmul else "IEEE matmuls") in ours_case.label
    with bench_rnn.precision_of(torch_case):  # torch's RNN: cuDNN's flag, cuBLAS's untouched
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (
            not cudnn, matmul)
    with bench_rnn.precision_of(ours_case):  # discrnn's products: cuBLAS's flag
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (
            cudnn, not matmul)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (cudnn,
                                                                                        matmul)


def test_trace_summary_counts_busy_time_once():
    from types import SimpleNamespace

    bench_rnn = _bench_rnn_module()
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cuda, self_us=0.0):
        return SimpleNamespace(name=name, device_type=device, self_cpu_time_total=self_us,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [event("gemm", 0, 10), event("step", 12, 15), event("gemm", 20, 30),
              event("copy", 25, 32),  # overlaps the second gemm: busy counts 30-32 only
              event("aten::mm", 0, 40, device=cpu, self_us=40.0)]  # host side: not device time
    trace = bench_rnn.summarize_trace(events, cuda=True)
    assert trace["busy_ms"] == pytest.approx((10 + 3 + 12) / 1e3)
    assert trace["activities"] == 4
    assert trace["top"] == [("gemm", 2, pytest.approx(0.02)), ("copy", 1, pytest.approx(0.007)),
                            ("step", 1, pytest.approx(0.003))]
    host = bench_rnn.summarize_trace(events, cuda=False)  # the CPU: operators by self time
    assert host["top"] == [("aten::mm", 1, pytest.approx(0.04))] and host["activities"] == 1
    assert bench_rnn.busy_us([]) == 0.0 and bench_rnn.busy_us([(5, 9), (0, 10)]) == 10


def test_quick_run_with_trace(tmp_path):
    out = tmp_path / "bench.csv"
    proc = _run(["--quick", "--device", "cpu", "--threads", "1", "--no-memory", "--no-plot",
                 "--levels", "64", "--cells", "lstm", "--dtype", "float32", "--repeats", "1",
                 "--warmup", "0", "--trace", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== Trace: one profiled forward+backward per row" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "bench_trace.csv").open()))
    labels = {r["label"] for r in rows}
    assert labels == {"torch.nn.LSTM", "DiscreteLSTM L=64 [torch]"}
    ours = [r for r in rows if r["label"].startswith("Discrete")]
    # the layer's own autograd Function is among what takes the time
    assert any(r["name"].startswith("LSTMLayerFunction") for r in ours), ours
    assert all(float(r["total_ms"]) >= 0 and int(r["calls"]) >= 1 for r in rows)
    main = {r["label"]: r for r in csv.DictReader(out.open())}
    assert float(main["DiscreteLSTM L=64 [torch]"]["activities_per_step"]) > 0
