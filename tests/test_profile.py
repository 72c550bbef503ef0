"""discrnn-profile (discrnn/profile.py, discrnn/profiling/): a smoke run with tiny settings writes
every output file with finite figures; bad flags end with one line and a non-zero exit; the parts
(size parsing, parameter count, the budget search, the frontier, the variants) on their own."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from discrnn.profile import PROG, build_points, parse_bytes, print_points, print_summary, resolve
from discrnn.profiling.report import pareto_flags, plot_peak_vs_length, plot_time_memory
from discrnn.profiling.search import longest_within, straight_line_guess
from discrnn.profiling.variants import (StackConfig, build, default_variant_names, parse_variant,
                                        torch_rnn_unsupported,
                                        token_stream, train_step)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The profiler runs compiled kernels or the torch path, never the interpreter the tests set up.
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

# Figures every point of a smoke run must carry (a finite number each).
POINT_FIGURES = ["length", "batch", "hidden", "layers", "static_bytes", "peak_bytes", "total_bytes",
                 "total_mib", "peak_per_unit", "kept_rnn_bytes", "kept_per_unit",
                 "kept_step_bytes", "ms_median", "ms_min", "ms_max", "spread_pct", "timed_steps",
                 "tokens_per_s", "loss_first", "loss_last", "time_vs_lstm",
                 "kept_vs_lstm", "threads_per_process", "load_avg_1min_start", "wall_s"]
BUDGET_FIGURES = ["budget_bytes", "longest_length", "resolution", "max_length",
                  "total_bytes_at_longest", "longest_vs_lstm", "search_runs"]


def _finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_csv(path, figures, rows_expected):
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == rows_expected
    for row in rows:
        assert not row["error"], row["error"]
        for key in figures:
            assert _finite_number(row[key]), f"{path.name} {row['variant']}: {key}={row[key]!r}"
        for key, value in row.items():  # nothing that looks like a number may be nan or inf
            if value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
                pytest.fail(f"{path.name} {row['variant']}: {key}={value!r}")
        for key in ("device_name", "torch", "triton", "discrnn", "command", "cudnn_allow_tf32",
                    "matmul_allow_tf32"):
            assert row[key], key
    return rows


def _walk_numbers(obj, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def test_quick_run_writes_every_file_with_finite_figures(tmp_path):
    out = tmp_path / "profile"
    cmd = [sys.executable, "-m", "discrnn.profile", "--quick", "--device", "cpu", "--no-progress",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variants = default_variant_names([64, 256])
    # torch's module where it cannot run here (bf16 autocast on a CPU without AVX-512): left out,
    # with the reason in the run's meta
    left_out = [v for v in variants if parse_variant(v).levels is None and torch_rnn_unsupported(
        parse_variant(v).cell, "cpu", torch.bfloat16 if parse_variant(v).bf16 else None)]
    variants = [v for v in variants if v not in left_out]
    lengths = [16, 32]  # the --quick lengths

    points = _check_csv(out / "profile.csv", POINT_FIGURES, len(variants) * len(lengths))
    assert {r["variant"] for r in points} == set(variants)
    # The memory ratio exists exactly where both steps' memory was resolved (at --quick sizes a
    # step may stay under the warm-up's RSS: see test_unresolved_memory_takes_no_ratio).
    resolved = {(r["variant"], r["length"]): r["memory_resolved"] == "True" for r in points}
    assert all(r["memory_resolved"] in ("True", "False") for r in points)
    for r in points:
        both = resolved[(r["variant"], r["length"])] and resolved[("lstm", r["length"])]
        assert _finite_number(r["total_vs_lstm"]) if both else r["total_vs_lstm"] == "", r
    budget = _check_csv(out / "budget.csv", BUDGET_FIGURES, len(variants))
    for row in budget:
        assert int(row["longest_length"]) >= 0
        assert row["capped"] == "True" or int(row["exceeded_at"]) > int(row["longest_length"])

    # JSON: strict (NaN/Infinity refused by the parser), every number finite, the same points.
    def refuse(constant):
        raise AssertionError(f"non-finite {constant} in profile.json")

    doc = json.loads((out / "profile.json").read_text(), parse_constant=refuse)
    for where, value in _walk_numbers(doc):
        assert math.isfinite(value), where
    assert len(doc["points"]) == len(points) and len(doc["budget"]) == len(variants)
    assert doc["meta"]["command"].endswith(f"--out {out}")
    for name in left_out:
        assert f"{name}: torch.nn." in doc["meta"]["left_out"] and "cannot run" in proc.stdout
    for p in doc["points"]:
        for key in POINT_FIGURES:
            if key in p:
                assert p[key] is not None, (p["variant"], key)
        assert p["timed_steps"] == 3 and p["timed_steps_ok"] is True
    # Checkpointing changes memory, not the math: same weights, same tokens, same losses.
    losses = {p["variant"]: p["loss_last"] for p in doc["points"] if p["length"] == 32}
    assert losses["lstm-ckpt-sqrt"] == pytest.approx(losses["lstm"], rel=1e-4)
    assert losses["lstm-ckpt-quarter"] == pytest.approx(losses["lstm"], rel=1e-4)
    assert losses["dlstm-64-ckpt-sqrt"] == pytest.approx(losses["dlstm-64"], rel=1e-4)
    at_32 = [p for p in doc["points"] if p["length"] == 32]
    assert any(p["pareto"] for p in at_32) or not any(p["memory_resolved"] for p in at_32)

    plots = ["peak_vs_length.png", "time_vs_memory.png", "budget.png"]
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped: matplotlib does not import" in proc.stdout
        assert not any((out / name).exists() for name in plots)
    else:
        for name in plots:
            assert (out / name).stat().st_size > 0, name


BAD_FLAGS = [
    (["--hidden", "-3"], "--hidden"),
    (["--batch", "0"], "--batch"),
    (["--layers", "two"], "--layers"),
    (["--lengths", "16", "-1"], "--lengths"),
    (["--variants", "lstm", "transformer"], "--variants"),
    (["--variants", "dlstm-300"], "--variants"),
    (["--levels", "1"], "--levels"),
    (["--budget", "lots"], "--budget"),
    (["--budget", "2XB"], "--budget"),
    (["--budget", "1KiB"], "--budget"),  # below the model's own size
    (["--quick", "--budget", "100KB"], "--budget"),
    (["--resolution", "0"], "--resolution"),
]


@pytest.mark.parametrize("argv, flag", BAD_FLAGS)
def test_bad_flag_is_one_line_and_a_nonzero_exit(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        resolve(["--device", "cpu", *argv])
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{PROG}: error: argument {flag}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_missing_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        resolve(["--device", "cuda"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{PROG}: error: argument --device: cuda was asked for, but torch sees no CUDA device"]


@pytest.mark.parametrize("argv", [["--hidden", "-3"], ["--budget", "2 furlongs"],
                                  ["--variants", "lstm", "dlstm-300"]])
def test_bad_flag_from_the_command_line_has_no_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "discrnn.profile", "--device", "cpu", *argv],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("4096", 4096),
    ("64 KiB", 64 * 1024), ("2gib", 2 * 2**30), ("1.5G", 3 * 2**29), ("none", None),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_defaults_and_the_budget_floor():
    args = resolve(["--device", "cpu"])
    assert (args.layers, args.hidden, args.batch, args.threads) == (2, 512, 16, 1)
    expected = default_variant_names([64, 256])
    if torch_rnn_unsupported("lstm", "cpu", torch.bfloat16):  # a CPU without AVX-512
        assert list(args.left_out) == ["lstm-bf16"]
        expected.remove("lstm-bf16")
    assert args.variants == expected
    assert resolve(["--device", "cpu", "--budget", "none"]).budget is None
    assert args.budget == 2 * 2**30 and args.budget_variants == ["lstm", "dlstm-64"]
    # The floor is the smallest model among the variants the budget search runs for.
    floor = args.config.static_bytes("lstm")
    assert resolve(["--device", "cpu", "--budget", str(floor)]).budget == floor
    with pytest.raises(SystemExit):
        resolve(["--device", "cpu", "--budget", str(floor - 1)])
    floor = args.config.static_bytes("gru")  # the smallest variant of the default set
    every = resolve(["--device", "cpu", "--budget", str(floor), "--budget-variants", "all"])
    assert every.budget == floor and every.budget_variants == every.variants


def test_budget_variants_flag(capsys):
    args = resolve(["--device", "cpu", "--variants", "gru", "dlstm-16", "lstm",
                    "--budget-variants", "lstm", "headline", "--levels", "16"])
    assert args.budget_variants == ["dlstm-16", "lstm"]  # --variants order, no repeats
    with pytest.raises(SystemExit) as info:
        resolve(["--device", "cpu", "--variants", "lstm", "--budget-variants", "gru"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "--budget-variants: gru is not among the profiled variants" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["lstm", "gru", "dlstm-64", "dgru-256"])
def test_parameter_count_formula(name):
    cfg = StackConfig(vocab=11, embed=5, hidden=7, layers=3, batch=2)
    v = parse_variant(name)
    model, _, _ = build(v, cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.parameter_count(v.cell)


def test_variants_share_weights_data_and_checkpointing_keeps_the_math():
    cfg = StackConfig(vocab=13, embed=6, hidden=8, layers=2, batch=3, dtype="float64")
    tokens = token_stream(cfg, 17)
    assert torch.equal(tokens, token_stream(cfg, 17)) and tokens.shape == (17, 3)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < cfg.vocab
    losses = {}
    for name in ["lstm", "lstm-ckpt-sqrt", "lstm-ckpt-quarter", "dlstm-16", "dlstm-16-ckpt-sqrt"]:
        model, optimizer, state = build(parse_variant(name), cfg)
        run = []
        for window in (tokens[:9], tokens[8:]):  # two steps, state carried
            loss, state = train_step(model, optimizer, window, state)
            run.append(float(loss))
        losses[name] = run
    for ckpt, plain in [("lstm-ckpt-sqrt", "lstm"), ("lstm-ckpt-quarter", "lstm"),
                        ("dlstm-16-ckpt-sqrt", "dlstm-16")]:
        assert losses[ckpt] == pytest.approx(losses[plain], rel=1e-9, abs=1e-12)


def test_variant_names():
    v = parse_variant("dlstm-64-ckpt-sqrt")
    assert (v.cell, v.levels, v.bf16, v.ckpt) == ("lstm", 64, False, "sqrt")
    assert v.segment_length(100) == 10 and v.segment_length(101) == 11
    assert parse_variant("lstm-ckpt-quarter").segment_length(10) == 3
    assert parse_variant("lstm-bf16").bf16
    v = parse_variant("dgru-64-bf16-ckpt-sqrt")
    assert (v.cell, v.levels, v.bf16, v.ckpt) == ("gru", 64, True, "sqrt")
    for bad in ["lstm-", "dlstm", "dlstm-1", "dlstm-bf16", "dgru-64-ckpt-sqrt-bf16", "LSTM",
                "dlstm-64-graph-ckpt-sqrt", "dlstm-64-bf16-graph", "lstm-graph-bf16"]:
        with pytest.raises(ValueError):
            parse_variant(bad)
    v = parse_variant("dlstm-64-graph")
    assert (v.cell, v.levels, v.bf16, v.ckpt, v.graph) == ("lstm", 64, False, None, True)
    assert v.description == "DiscreteLSTM L=64, CUDA graphs" and v.segment_length(100) is None
    assert parse_variant("gru-graph").graph and not parse_variant("dgru-8").graph


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses graphs where there is no CUDA")
def test_graph_variants_need_cuda(capsys):
    with pytest.raises(SystemExit) as info:
        resolve(["--device", "cpu", "--variants", "lstm", "dlstm-8-graph"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{PROG}: error: argument --variants: dlstm-8-graph run under CUDA graphs, which need a "
        "CUDA device (this run: cpu)"]
    cfg = StackConfig(vocab=8, embed=4, hidden=4, layers=1, batch=2, device="cpu")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        build(parse_variant("dlstm-8-graph"), cfg)


@pytest.mark.gpu
def test_graph_variant_trains_as_the_eager_one():
    """dlstm-L-graph on CUDA: the same losses as dlstm-L over steps at two lengths (a capture per
    shape; Adam updates the weights in place between replays)."""
    cfg = StackConfig(vocab=16, embed=8, hidden=16, layers=2, batch=3, device="cuda")
    losses = {}
    for name in ("dlstm-16", "dlstm-16-graph"):
        model, optimizer, state = build(parse_variant(name), cfg)
        tokens = token_stream(cfg, 4 * 12 + 1)
        got = []
        for r, length in enumerate((12, 12, 7, 12)):
            loss, state = train_step(model, optimizer, tokens[r * 12: r * 12 + length + 1], state)
            got.append(float(loss))
        losses[name] = got
    assert losses["dlstm-16-graph"] == pytest.approx(losses["dlstm-16"], rel=1e-5, abs=1e-6)


def _linear_run(a, b, calls):
    def run(T):
        calls.append(T)
        return a + b * T
    return run


@pytest.mark.parametrize("known", [[], [64, 128], [8192], [6000, 7000, 20000]])
@pytest.mark.parametrize("resolution", [0.5, 0.125, 1 / 64])
def test_search_brackets_the_budget_in_real_runs(known, resolution):
    """total(T) = 40 + 16 T fits 100_000 up to T = 6247: the answer fits, the next length found
    does not, they are at most the resolution apart, and both were run (or known)."""
    calls = []
    known = {T: 40 + 16 * T for T in known}
    res = longest_within(_linear_run(40, 16, calls), 100_000, known=known,
                         resolution=resolution, max_length=1 << 20,
                         guess=straight_line_guess(list(known.items()), 100_000))
    assert 40 + 16 * res.longest <= 100_000 < 40 + 16 * res.exceeded_at
    assert res.exceeded_at - res.longest <= max(1, int(resolution * res.longest))
    assert res.longest in res.evidence and res.exceeded_at in res.evidence
    assert set(calls) | set(known) == set(res.evidence) and res.new_runs == len(calls)
    assert not res.capped and len(calls) == len(set(calls))


def test_search_around_a_good_guess_takes_two_runs():
    """With the sweep's points on the line, the two probes around the guess close the bracket."""
    calls = []
    known = {T: 40 + 16 * T for T in (64, 128, 256)}
    res = longest_within(_linear_run(40, 16, calls), 100_000, known=known, resolution=0.25,
                         max_length=1 << 20, guess=straight_line_guess(list(known.items()), 100_000))
    assert len(calls) == 2 and res.longest < 6247.5 < res.exceeded_at


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("guess", [100.0, 5000.0, 6247.0, 6300.0, 9000.0, 1e9])
def test_search_is_right_whatever_the_guess(guess, parallel):
    """A wrong guess costs runs, never the answer: it is only where the first probes go."""
    calls = []
    res = longest_within(_linear_run(40, 16, calls), 100_000, known={64: 40 + 16 * 64},
                         resolution=0.25, max_length=1 << 20, guess=guess, parallel=parallel)
    assert 40 + 16 * res.longest <= 100_000 < 40 + 16 * res.exceeded_at
    assert res.exceeded_at - res.longest <= max(1, int(0.25 * res.longest))
    assert len(calls) == len(set(calls)) == res.new_runs


def test_search_runs_the_two_probes_around_the_guess_at_once():
    running, overlapped, lock = [0], [False], threading.Lock()

    def run(T):
        with lock:
            running[0] += 1
        time.sleep(0.2)
        with lock:
            overlapped[0] |= running[0] == 2
            running[0] -= 1
        return 40 + 16 * T

    known = {T: 40 + 16 * T for T in (64, 128, 256)}
    res = longest_within(run, 100_000, known=known, resolution=1 / 16, max_length=1 << 20,
                         guess=straight_line_guess(list(known.items()), 100_000), parallel=True)
    assert overlapped[0] and res.new_runs == 2 and res.longest < 6247.5 < res.exceeded_at


def test_search_capped_and_nothing_fits():
    res = longest_within(lambda T: 1.0, 10, known={}, resolution=0.25, max_length=1000)
    assert res.capped and res.longest == 1000 and res.exceeded_at is None
    res = longest_within(lambda T: math.inf, 10, known={8: math.inf}, resolution=0.25,
                         max_length=1000)
    assert res.longest == 0 and res.exceeded_at == 1 and sorted(res.evidence) == [1, 2, 4, 8]


def test_pareto_flags():
    points = [{"total_bytes": 1, "ms_median": 9, "error": ""},
              {"total_bytes": 5, "ms_median": 2, "error": ""},
              {"total_bytes": 6, "ms_median": 3, "error": ""},  # beaten by the second
              {"total_bytes": 5, "ms_median": 2, "error": ""},  # a tie is not beaten
              {"total_bytes": 0, "ms_median": 0, "error": "failed"}]
    assert pareto_flags(points) == [True, True, False, True, False]


def test_unresolved_memory_takes_no_ratio(capsys):
    """A step whose RSS high-water mark stays under the warm-up's RSS (peak <= 0: a tiny model
    reusing freed heap blocks) has no measured memory: its figures stay as found, but it takes no
    memory ratio, no frontier place and no "step memory" line, and the table says why. The other
    points keep theirs; where the reference itself is unresolved, nobody gets a memory ratio."""
    args = resolve(["--device", "cpu", "--variants", "lstm", "lstm-ckpt-sqrt", "dlstm-64",
                    "--lengths", "32", "64"])
    peaks = {("lstm", 32): 3.0, ("lstm-ckpt-sqrt", 32): 2.0, ("dlstm-64", 32): -0.25,
             ("lstm", 64): -0.5, ("lstm-ckpt-sqrt", 64): 1.0, ("dlstm-64", 64): 0.5}  # MiB
    seconds = {"lstm": 1.0, "lstm-ckpt-sqrt": 2.0, "dlstm-64": 0.5}
    memory = {key: {"peak_bytes": int(m * 2**20), "static_bytes": 2**20,
                    "total_bytes": int((1 + m) * 2**20), "kept_rnn_bytes": 1, "kept_step_bytes": 1}
              for key, m in peaks.items()}
    timing = {T: {v: {"times_ms": [t * 1e3] * 3, "losses": [1.0]} for v, t in seconds.items()}
              for T in (32, 64)}
    points = {(p["variant"], p["length"]): p for p in build_points(args, memory, timing)}
    p = points[("dlstm-64", 32)]
    assert p["memory_resolved"] is False and p["total_vs_lstm"] is None
    assert p["total_mib"] == -0.25 + 1 and p["time_vs_lstm"] == 0.5  # as found, time kept
    # Fastest and (as measured) smallest, yet off the frontier; the others are judged without it.
    assert not p["pareto"] and points[("lstm", 32)]["pareto"]
    assert points[("lstm-ckpt-sqrt", 32)]["total_vs_lstm"] == 0.75
    assert points[("lstm-ckpt-sqrt", 32)]["pareto"]
    assert all(points[(v, 64)]["total_vs_lstm"] is None for v in seconds)  # reference unresolved
    assert points[("dlstm-64", 64)]["memory_resolved"] is True
    print_points(args, list(points.values()), "test")
    print_summary(args, list(points.values()), [])
    out = capsys.readouterr().out
    assert out.count("memory unresolved") == 3  # two rows and the footnote
    assert "dlstm-64 vs lstm at T=64:" in out and "step memory" not in out


class _Recorder:
    """A stand-in for matplotlib.pyplot, its figures and axes: records what is drawn where."""

    def __init__(self):
        self.drawn = []  # (method, x values)

    def subplots(self, *shape, **kwargs):
        if shape:  # plt.subplots(1, n, squeeze=False): a row of axes
            return self, [[self] * shape[1]]
        return self, self

    def scatter(self, x, y, **kwargs):
        self.drawn.append(("scatter", [x]))

    def plot(self, x, y, *args, **kwargs):
        self.drawn.append(("plot", list(x)))

    def __getattr__(self, name):  # labels, scales, legends, savefig, close: nothing to record
        return lambda *args, **kwargs: None


def test_plots_leave_out_unresolved_memory(tmp_path):
    """The plots draw no point whose memory is unresolved (test_unresolved_memory_takes_no_ratio):
    its total is no measurement, and on the log axes a negative one would not even show."""
    args = resolve(["--device", "cpu", "--variants", "lstm", "dlstm-64", "--lengths", "32", "64"])
    peaks = {("lstm", 32): 3.0, ("dlstm-64", 32): -0.25, ("lstm", 64): 4.0, ("dlstm-64", 64): 1.0}
    memory = {key: {"peak_bytes": int(m * 2**20), "static_bytes": 2**20,
                    "total_bytes": int((1 + m) * 2**20), "kept_rnn_bytes": 1, "kept_step_bytes": 1}
              for key, m in peaks.items()}
    timing = {T: {v: {"times_ms": [1e3] * 3, "losses": [1.0]} for v in ("lstm", "dlstm-64")}
              for T in (32, 64)}
    points = build_points(args, memory, timing)
    unresolved_mib = 1 - 0.25  # dlstm-64 at T=32: static 1 MiB plus its peak of -0.25
    plt = _Recorder()
    plot_time_memory(plt, tmp_path / "a.png", points, [32, 64], "t")
    xs = [x for _, values in plt.drawn for x in values]
    assert len([1 for kind, _ in plt.drawn if kind == "scatter"]) == 3 and unresolved_mib not in xs
    plt = _Recorder()
    plot_peak_vs_length(plt, tmp_path / "b.png", points, ["lstm", "dlstm-64"], None, "t")
    assert plt.drawn == [("plot", [32, 64]), ("plot", [64])]


def test_one_frontier_per_cell():
    """A GRU variant that beats every LSTM variant on both axes must not push the LSTM variants off
    their own frontier: a GRU is another model, not a way of running the LSTM."""
    args = resolve(["--device", "cpu", "--variants", "lstm", "lstm-ckpt-sqrt", "gru", "dgru-64",
                    "--lengths", "64"])
    figures = {"lstm": (400, 2.0), "lstm-ckpt-sqrt": (150, 3.0), "gru": (90, 1.0),
               "dgru-64": (100, 1.5)}  # (MiB, s): gru beats both LSTM variants
    memory = {(v, 64): {"peak_bytes": m * 2**20, "static_bytes": 0, "total_bytes": m * 2**20,
                        "kept_rnn_bytes": 1, "kept_step_bytes": 1} for v, (m, _) in figures.items()}
    timing = {64: {v: {"times_ms": [t * 1e3] * 3, "losses": [1.0]} for v, (_, t) in figures.items()}}
    front = {p["variant"]: p["pareto"] for p in build_points(args, memory, timing)}
    assert front == {"lstm": True, "lstm-ckpt-sqrt": True, "gru": True, "dgru-64": False}


def test_sweep_table_is_written_before_the_budget_search(tmp_path, monkeypatch, capsys):
    """The sweep's table and profile.csv come before the budget search, which can take far longer:
    a run stopped there (a time limit, Ctrl-C) keeps them."""
    import discrnn.profile as profile

    def stopped(args, points):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile, "budget_search", stopped)
    with pytest.raises(KeyboardInterrupt):
        profile.main(["--quick", "--device", "cpu", "--no-progress", "--variants", "lstm",
                      "dlstm-64", "--lengths", "16", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert [r["variant"] for r in rows] == ["lstm", "dlstm-64"]
    assert all(float(r["ms_median"]) > 0 for r in rows), rows
    out = capsys.readouterr().out
    assert "== T=16" in out and "the budget search follows" in out
