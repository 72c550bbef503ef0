"""scripts/gpu_check.sh: the one command for a lent GPU. Without a GPU only its plan is checked
(--dry-run); the run itself is for a GPU machine (README, "GPU check")."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_plan(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run",
                          str(tmp_path / "gc")], capture_output=True, text=True, check=True).stdout
    steps = [line for line in out.splitlines() if line.startswith("[")]
    names = [line[1:].split(",")[0] for line in steps]
    assert names == ["install", "env", "tests_gpu", "tests_kernels", "bench_codec", "tune_codec",
                     "bench_launch", "bench_rnn", "bench_rnn_bf16", "profile"]
    limits = [int(line.split("at most ")[1].split(" s]")[0]) for line in steps]
    assert sum(limits) < 8 * 60  # the script's promise: under 8 minutes on the GPU machine
    assert f"--numel {1 << 28}" in out and "-m gpu" in out
    assert "--hidden 1024 --batch 64 --steps 1024 --dtype float32 " in out
    assert "--hidden 1024 --batch 64 --steps 1024 --dtype bfloat16 " in out
    assert "--cuda-graphs --tf32 --trace" in out and "tests/test_cuda_graphs.py" in out
    assert all(str(tmp_path / "gc") in line for line in steps if "--out" in line)


def test_tune_codec_variants_are_bit_exact(tmp_path):
    # scripts/tune_codec.py drives the codec kernels directly (launch shapes, both unpack reads):
    # its --check-only mode keeps it in step with their signatures, here under the interpreter.
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("tune_codec", ROOT / "scripts" / "tune_codec.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    if torch.cuda.is_available():
        pytest.skip("on a GPU, scripts/gpu_check.sh runs the script itself (2^28 values, timed)")
    assert tune.main(["--check-only", "--bits", "6", "7", "3", "--numel", "3001",
                      "--out", str(tmp_path / "t.csv")]) == 0
