"""Smoke run of scripts/reproduce_levels.py (``--smoke``: every task, both gradient modes, one seed,
a few steps): it writes report.md, a plot per task, runs.json and runs.csv, every figure finite; the
rule behind the report's sentences; bad flags end in an argparse error, not a traceback."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "reproduce_levels.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import reproduce_levels as RL  # noqa: E402


def run_main(argv):
    threads = torch.get_num_threads()  # main() sets it; leave the session as it was
    try:
        return RL.main(argv)
    finally:
        torch.set_num_threads(threads)


def all_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from all_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from all_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_smoke_run_writes_report_plots_and_runs(tmp_path):
    assert run_main(["--smoke", "--no-progress", "--device", "cpu", "--out", str(tmp_path)]) == 0

    doc = json.loads((tmp_path / "runs.json").read_text())
    runs = doc["runs"]
    levels = RL.PRESETS["smoke"]["levels"]
    # units: tanh, relu and each L in both modes; cells: per cell torch's and each L in both modes
    expected = sum(2 * (1 + 2 * len(levels[name])) if name in RL.CELL_TASKS
                   else 2 + 2 * len(levels["units"]) for name in RL.TASKS)
    assert len(runs) == expected
    assert {r["task"] for r in runs} == set(RL.TASKS)
    for r in runs:
        assert not r["diverged"], r
        assert isinstance(r["metric"], float) and math.isfinite(r["metric"]), r
    for name, summary in doc["summary"].items():
        assert summary["findings"], name
        for v in summary["variants"]:
            assert math.isfinite(v["mean"]) and math.isfinite(v["std"]), (name, v)
    assert all(math.isfinite(x) for x in all_numbers(doc))
    meta = doc["meta"]
    assert meta["seeds"] == [0] and meta["environment"]["threads"] == 1
    assert meta["environment"]["torch"] == torch.__version__

    report = (tmp_path / "report.md").read_text()
    for needle in ("--smoke", "torch " + torch.__version__, "triton", "seeds 0", "**Rule.**",
                   "## Findings", "Claim (64-256 levels"):
        assert needle in report, needle
    words = report.lower().replace("|", " ").split()
    assert "nan" not in words and "inf" not in words and "-inf" not in words
    for name in RL.TASKS:
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in report

    csv_lines = (tmp_path / "runs.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + expected


def test_same_seed_same_numbers(tmp_path):
    """Seeds fix the initial weights and the minibatch order: two runs give the same metrics."""
    metrics = []
    for out in ("a", "b"):
        run_main(["--smoke", "--tasks", "digits", "recall", "--no-progress", "--device", "cpu",
                  "--out", str(tmp_path / out)])
        runs = json.loads((tmp_path / out / "runs.json").read_text())["runs"]
        metrics.append([(r["task"], r["series"], r["levels"], r["metric"]) for r in runs])
    assert metrics[0] == metrics[1]


def test_rule_and_sentences():
    """The report's rule on made-up numbers: 64 levels match tanh, 128 is worse by more than the
    spread, 256 is better by more than it (which matches: the claim is about losing little); code
    costs beyond the spread at 2 and 256 levels."""
    task = RL.Task("t", "T", "accuracy", True, 0.1, 1.0, 3, "")
    runs = []

    def add(kind, levels, grad, values):
        runs.extend({"kind": kind, "levels": levels, "grad": grad, "metric": v} for v in values)

    add("tanh", None, None, [0.90, 0.91, 0.92])  # std 0.01
    add("relu", None, None, [0.80, 0.81, 0.82])
    for L, exact, code in ((2, [0.70, 0.71, 0.72], [0.50, 0.51, 0.52]),
                           (64, [0.90, 0.91, 0.92], [0.90, 0.91, 0.92]),
                           (128, [0.85, 0.86, 0.87], [0.85, 0.86, 0.87]),
                           (256, [0.95, 0.96, 0.97], [0.90, 0.91, 0.92])):
        add("discrete", L, "exact", exact)
        add("discrete", L, "code", code)
    summary = RL.summarize(task, runs)
    lines, rows = RL.findings(task, summary)
    text = "\n".join(lines)
    assert "holds in part: 64, 256 levels match, 128 do not" in text
    assert 'grad="exact" 256 and every larger L; 64 as well, but not every L between' in text
    assert "its largest cost is at L=2: -0.200 (beyond the spread)" in text
    assert "relu against tanh: 0.810 ± 0.010, -0.100 (worse beyond the spread)" in text
    assert rows[0]["64-256 match"] == "64, 256 only"
    assert rows[0]["matches from L (exact / code)"] == "256 / 256"
    summary_text = "\n".join(RL.overall_summary(rows))
    assert "holds on 0 of 1 comparisons" in summary_text
    assert "worse than \"exact\" beyond the spread on 1 of 1" in summary_text
    assert "code - exact = +0.000, +0.000, -0.050 (worse than exact beyond the spread at 256)" \
        in text
    assert rows[0]["code - exact at 64-256"] == "+0.000, +0.000, -0.050"


@pytest.mark.parametrize("flags", [["--levels", "1"], ["--levels", "abc"], ["--seeds", "0"],
                                   ["--tasks", "nope"], ["--quick", "--smoke"],
                                   ["--steps-scale", "-1"]])
def test_bad_flags_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        RL.parse_args(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err


def test_bad_flag_from_the_command_line():
    proc = subprocess.run([sys.executable, SCRIPT, "--levels", "300"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "reproduce_levels.py: error: argument --levels: levels must be in [2, 256], got 300 "
        "(--help lists the flags)"]
