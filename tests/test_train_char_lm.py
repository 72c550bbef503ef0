"""Smoke run of scripts/train_char_lm.py (``--quick``): it trains, evaluates, and writes its JSON
line and CSV row, for the discrete layers and for torch's own."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_char_lm.py")


@pytest.mark.parametrize("args", [["--rnn", "lstm", "--levels", "16"],
                                  ["--rnn", "gru", "--levels", "64", "--grad", "exact"],
                                  ["--rnn", "lstm", "--levels", "none"]])
def test_quick_run_writes_json_and_csv(tmp_path, args):
    out_csv, out_json = tmp_path / "runs.csv", tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, SCRIPT, "--quick", "--no-progress", "--device", "cpu",
           "--csv", str(out_csv), "--json", str(out_json), *args]
    runs = 2 if args[1] == "lstm" and args[3] == "16" else 1  # once: a second run appends a row
    for _ in range(runs):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out_json.read_text())
    assert result["steps_done"] == 6 and len(result["history"]) == 2
    assert 0 < result["val_bpc"] < 10 and result["ms_per_step"] > 0 and result["peak_mib"] > 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == runs and rows[-1]["val_bpc"] == str(result["val_bpc"])
    table = subprocess.run([sys.executable, SCRIPT, "--summarize", str(out_csv)], capture_output=True,
                           text=True, timeout=120, env=env)
    assert table.returncode == 0, table.stderr
    assert f"| {result['val_bpc']:.3f} ± " in table.stdout


@pytest.mark.parametrize("levels", [2, 16, 256])
def test_cell_variant_script_matches_discrete_lstm(levels):
    """scripts/lstm_cell_variants.py's plain-autograd cell, as the adopted variant (standard gates,
    tanh'(c), clamp), is DiscreteLSTM: same outputs and gradients (float64), so the variants it
    measures differ from the library only where their flags say."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import torch
    from lstm_cell_variants import VariantLSTM

    from discrnn import DiscreteLSTM

    torch.manual_seed(0)
    lib = DiscreteLSTM(6, 8, batch_first=True, levels=levels, chunk_size=4, cell_clip=1.0).double()
    var = VariantLSTM(6, 8, levels, "standard", "exact", 1.0).double()
    var.load_state_dict(lib.state_dict())
    with torch.no_grad():
        for m in (lib, var):
            m.bias_ih_l0[8:16] = 3.0  # forget gates open: the clamp is active
    x = torch.randn(3, 10, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for m in (lib, var):
        y, (h, c) = m(x)
        loss = (y * torch.sin(3 * y + 1)).sum() + (c * c).sum()
        results.append([y, c, *torch.autograd.grad(loss, [x, *m.parameters()])])
    assert float(results[0][1].detach().abs().max()) == 1.0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
