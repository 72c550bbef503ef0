"""discrnn-profile: what packed recurrent state gains in training, beside what users do today.

Runs real training steps (forward, backward, Adam step) of a language-model-shaped stack,
``nn.Embedding(vocab, embed) -> N recurrent layers -> nn.Linear(hidden, vocab)``, on the same
seeded token stream for every variant, the recurrent state carried from step to step. Variants
(``--variants``; see ``discrnn.profiling.variants``): ``lstm``, ``gru`` (torch.nn; cuDNN on CUDA),
``lstm-ckpt-sqrt`` / ``lstm-ckpt-quarter`` (torch.nn.LSTM in checkpointed segments of ceil(sqrt(T))
/ ceil(T/4) steps, ``use_reentrant=False``, state carried between segments), ``lstm-bf16`` (under
bf16 autocast), ``dlstm-L`` / ``dgru-L`` (discrnn.DiscreteLSTM / DiscreteGRU at L levels, one per
``--levels``) and ``dlstm-L-ckpt-sqrt`` (DiscreteLSTM in the same checkpointed segments); on CUDA
also ``BASE-graph`` on request (the recurrent layers through ``torch.cuda.make_graphed_callables``;
no kept bytes: a replay runs no saved-tensor hooks).

Measured, per variant and sequence length T (``--lengths``):

* memory of one training step, in a fresh process per point (``discrnn.profiling.worker``): CPU,
  the resident-set high-water mark above a baseline taken after a 2-token warm-up step, the
  process started with ``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows the live tensors; CUDA,
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` then. ``peak`` is what the step adds (kept activations, logits, gradients,
  temporaries); ``total = peak + parameters + Adam's moments`` is the step's memory without the
  runtime, the figure plotted and compared with ``--budget``. ``peak B/u`` = peak / (T x batch x
  hidden x layers);
* ``kept B/u``: bytes autograd keeps for backward inside the recurrent layers (saved-tensor hooks,
  distinct storages, without their input, output and parameters) per T x batch x hidden x layers,
  the figure of ``tests/test_rnn.py::kept_bytes`` and BASELINES.md. Checkpointed segments keep
  almost nothing in these hooks and recompute in backward: compare their ``peak B/u``;
* time per training step: median, min, max and spread (max - min over the median) over
  ``--steps`` rounds in one process per T that interleave the variants (one step of each per
  round, after an untimed 2-token step and ``--warmup`` untimed rounds), so a load change hits all
  variants alike; a point with fewer than MIN_TIMED timed steps is marked; tokens per second =
  T x batch / median. The timing processes keep glibc's default allocator settings;
* the loss of the last timed step and of the first full-length one (the same tokens for every
  variant, the same number of steps from the same weights): quality is not traded silently;
* the Pareto frontier of each T and cell (LSTM variants among themselves, GRU variants among
  themselves): the variants no other of the same cell beats on both total memory and time.

With ``--budget``, for each variant of ``--budget-variants`` the longest T whose training step
fits within it, found in real runs in fresh processes (``discrnn.profiling.search``): two runs
around the length where the sweep's straight line meets the budget, at once (usually the whole
search), then doubling and bisection, to ``--resolution``; never extrapolated. On CPU a run is
stopped once it crosses the budget.

Processes: ``--jobs`` at a time (default 2 on a CPU with two or more cores, one thread each), so
on a 2-core CPU a timing process may share the machine with a memory process; the interleaved
rounds keep the ratios fair, ``--jobs 1`` gives quieter absolute times. Memory figures do not
depend on it (each process measures only itself).

Writes to ``--out`` (default ``results/profile/``): ``profile.csv`` (one line per variant and T),
``budget.csv``, ``profile.json`` (everything, with the method), and, when matplotlib imports,
``peak_vs_length.png``, ``time_vs_memory.png`` and ``budget.png``. Each file carries the device,
the torch / triton / discrnn versions, threads, load average and the exact command line. Figures
that were not measured are left empty (CSV) or null (JSON), never written as numbers.

    discrnn-profile                      # the default (below)
    discrnn-profile --quick              # seconds: tiny sizes, only shows that it runs
    discrnn-profile --budget-variants lstm lstm-ckpt-sqrt dlstm-64   # checkpointing searched too

Defaults on CPU: 2 layers, hidden 512, batch 16, embedding 128, vocabulary 256, T in {128, 256,
512}, 3 timed steps, budget 2 GiB at a resolution of 1/16 for torch.nn.LSTM and DiscreteLSTM at
the first --levels (``--budget-variants headline``): one run at the length that fits 2 GiB takes
about a minute for DiscreteLSTM on one core, and several for the checkpointed variants, which fit
far longer sequences (``--budget-variants all`` searches every variant). The README gives the
measured wall time of the default. The loss after the few steps of a profile guards against a
broken variant (NaN, divergence); it is too early to tell quality apart (see
``scripts/train_char_lm.py`` for that). The step frees its own reference to the logits before
backward, as ``loss = F.cross_entropy(model(x), y)`` does.

At ``--quick`` sizes the peaks are a few heap pages: noise, by design only a smoke test.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from . import __version__
from .profiling import report
from .profiling.search import longest_within, straight_line_guess
from .profiling.variants import (DTYPES, StackConfig, default_variant_names, parse_variant,
                                 torch_rnn_unsupported)
from .profiling.worker import mmap_threshold, run_task

PROG = "discrnn-profile"
MIN_TIMED = 3  # a point with fewer timed steps is marked in every output
MIB = 2**20
# Sizes per device; --quick replaces them, explicit flags override both.
DEFAULTS = {
    # The acceptance configuration of the project (2-layer LSTM stack, hidden 512, batch 16),
    # sized for about 3-4 minutes on an idle 2-core CPU (one thread per process, two at once);
    # the 512 MiB budget rather than 2 GiB keeps the search within that (see the docstring).
    "cpu": dict(layers=2, hidden=512, batch=16, vocab=256, embed=128, lengths=[128, 256, 512],
                steps=3, warmup=0, budget="2GiB", resolution=0.0625, max_length=1 << 15,
                budget_variants="headline"),
    "cuda": dict(layers=2, hidden=1024, batch=16, vocab=256, embed=256,
                 lengths=[256, 512, 1024, 2048], steps=10, warmup=2, budget="4GiB",
                 resolution=0.125, max_length=1 << 18, budget_variants="all"),
    "quick": dict(layers=2, hidden=32, batch=4, vocab=64, embed=16, lengths=[16, 32], steps=3,
                  warmup=0, budget="4MiB", resolution=0.5, max_length=256,
                  budget_variants="all"),
}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20,
          "mb": 10**6, "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40,
          "tb": 10**12}


def parse_bytes(text: str) -> int | None:
    """'512MiB' -> 536870912, '2GiB', '1.5GB' (= 1.5e9), '4096' (bytes); 'none' -> None.
    KiB/MiB/GiB/TiB (and K/M/G/T) are powers of 1024, KB/MB/GB/TB powers of 1000; case-blind."""
    if text.strip().lower() in ("none", "off"):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = m[2].lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 512MiB, 2GiB, 1.5GB or none, got {text!r}")
    value = float(m[1]) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return int(value)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; the unit is the largest power of 1024 not above n."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (also used by scripts/reproduce_levels.py)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _levels(text: str) -> int:
    value = positive_int(text)
    if not 2 <= value <= 256:
        raise argparse.ArgumentTypeError(f"expected levels in [2, 256], got {value}")
    return value


def _variant(text: str) -> str:
    try:
        parse_variant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _resolution(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _variant_or_set(text: str) -> str:
    return text if text in ("all", "headline") else _variant(text)


def headline_variants(levels: list[int]) -> list[str]:
    """What the budget search compares by default on CPU: torch.nn.LSTM and DiscreteLSTM. (The
    checkpointed variants fit far longer sequences, whose runs take minutes each on a CPU: ask
    for them with --budget-variants.)"""
    return ["lstm", f"dlstm-{levels[0]}"]


_UNSET = object()  # --budget not given (None means "none": no search)


class _Parser(argparse.ArgumentParser):
    """Bad flags end the program with one line on stderr (no usage block, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Training-step memory, time and loss of DiscreteLSTM/GRU beside torch.nn "
        "LSTM/GRU, activation checkpointing and bf16 autocast, on a language-model stack; and "
        "the longest sequence each trains within a memory budget. Sizes default per device "
        f"(CPU: {DEFAULTS['cpu']}; CUDA: {DEFAULTS['cuda']}).",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else CPU")
    p.add_argument("--layers", type=positive_int, help="recurrent layers N")
    p.add_argument("--hidden", type=positive_int, help="hidden units per layer")
    p.add_argument("--batch", type=positive_int, help="sequences per step")
    p.add_argument("--vocab", type=positive_int, help="vocabulary size")
    p.add_argument("--embed", type=positive_int, help="embedding size (input of layer 1)")
    p.add_argument("--levels", type=_levels, nargs="+", default=[64, 256],
                   help="discrnn level counts of the default variants (default 64 256)")
    p.add_argument("--lengths", type=positive_int, nargs="+", help="sequence lengths T")
    p.add_argument("--variants", type=_variant, nargs="+",
                   help="default: lstm gru lstm-ckpt-sqrt lstm-ckpt-quarter lstm-bf16, dlstm-L and "
                   "dgru-L for each --levels, dlstm-L-ckpt-sqrt for the first")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype")
    p.add_argument("--threads", type=positive_int,
                   help="torch threads per process (default 1 on CPU)")
    p.add_argument("--jobs", type=positive_int,
                   help="processes at a time (default: 2 on CPU, or 1 with one core; 1 on CUDA)")
    p.add_argument("--steps", type=positive_int,
                   help=f"timed training steps per point (marked below {MIN_TIMED})")
    p.add_argument("--warmup", type=int,
                   help="untimed full-length rounds before the timed ones (default 0 on CPU, 2 on "
                   "CUDA; every variant first makes one untimed step on 2 tokens)")
    p.add_argument("--budget", type=parse_bytes, default=_UNSET,
                   help="memory budget for the longest-T search, e.g. 512MiB, 2GiB, 1.5GB; none "
                   "skips the search")
    p.add_argument("--budget-variants", type=_variant_or_set, nargs="+",
                   help="variants the budget search runs for (each must be in --variants): names, "
                   "'all', or 'headline' = lstm and dlstm-L of the first --levels (default on "
                   "CPU, where one run at the length that fits 2 GiB takes about a minute for "
                   "DiscreteLSTM and two for lstm-ckpt-sqrt; all on CUDA)")
    p.add_argument("--resolution", type=_resolution,
                   help="budget search stops when the bracket is narrower than this fraction of T")
    p.add_argument("--max-length", type=positive_int, help="longest T the budget search tries")
    p.add_argument("--chunk-size", type=positive_int, default=32, help="discrnn chunk_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results") / "profile", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI: seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve(argv=None):
    """Parsed flags with the defaults of the device filled in; bad values exit with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"argument --warmup: expected an integer >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda was asked for, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    defaults = DEFAULTS["quick" if args.quick else device.type]
    for key, value in defaults.items():
        if key == "budget":
            if args.budget is _UNSET:
                args.budget = parse_bytes(value)
        elif key == "budget_variants":
            if args.budget_variants is None:
                args.budget_variants = [value]
        elif getattr(args, key, None) is None:
            setattr(args, key, value)
    args.lengths = sorted(set(args.lengths))
    args.variants = list(dict.fromkeys(args.variants or default_variant_names(args.levels)))
    # torch's module where it cannot run here (bf16 autocast on a CPU without AVX-512): left out,
    # and said so, rather than an error row in every report
    args.left_out = {}
    for name in args.variants:
        v = parse_variant(name)
        if v.levels is None:
            reason = torch_rnn_unsupported(v.cell, device, torch.bfloat16 if v.bf16 else None)
            if reason:
                args.left_out[name] = reason
    args.variants = [v for v in args.variants if v not in args.left_out]
    graphed = [v for v in args.variants if parse_variant(v).graph]
    if graphed and device.type != "cuda":
        parser.error(f"argument --variants: {' '.join(graphed)} run under CUDA graphs, which need "
                     f"a CUDA device (this run: {device.type})")
    if not args.variants:
        parser.error("argument --variants: none of them can run here: "
                     + "; ".join(f"{k}: {r}" for k, r in args.left_out.items()))
    if args.budget_variants is not None:
        args.budget_variants = [v for v in args.budget_variants if v not in args.left_out]
    chosen = []
    for name in args.budget_variants:
        if name == "all":
            chosen += args.variants
        elif name == "headline":
            chosen += [v for v in headline_variants(args.levels) if v in args.variants]
        elif name not in args.variants:
            parser.error(f"argument --budget-variants: {name} is not among the profiled variants "
                         f"({' '.join(args.variants)})")
        else:
            chosen.append(name)
    args.budget_variants = [v for v in args.variants if v in chosen]  # in --variants order
    args.threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    args.jobs = args.jobs or (min(2, os.cpu_count() or 1) if device.type == "cpu" else 1)
    args.device = device
    args.config = StackConfig(vocab=args.vocab, embed=args.embed, hidden=args.hidden,
                              layers=args.layers, batch=args.batch, dtype=args.dtype,
                              device=str(device), seed=args.seed, chunk_size=args.chunk_size)
    if args.budget is not None:
        cells = {parse_variant(v).cell for v in args.budget_variants or args.variants}
        need = min(args.config.static_bytes(c) for c in cells)
        if args.budget < need:
            params = min(args.config.parameter_count(c) for c in cells)
            parser.error(
                f"argument --budget: {human_bytes(args.budget)} is below the model's own size, "
                f"{human_bytes(need)}: {params:,} {args.dtype} parameters, their gradients and "
                "Adam's two moments")
    return args


def _progress(args, **kwargs):
    from tqdm import tqdm

    return tqdm(disable=args.no_progress, dynamic_ncols=True, **kwargs)


def _payload(args, **extra) -> dict:
    return {"config": vars(args.config), "threads": args.threads, **extra}


def sweep(args) -> tuple[dict, dict]:
    """Every (variant, T) memory process and every T's timing process, ``args.jobs`` at a time.
    -> (memory results keyed (variant, T), timing results keyed T)."""
    tasks = [("timing", T, None, _payload(args, variants=args.variants, length=T,
                                            steps=args.steps, warmup=args.warmup))
             for T in reversed(args.lengths)]
    # Longest first: the slowest processes start early and the workers drain evenly.
    tasks += [("memory", T, v, _payload(args, variant=v, steps=T))
              for T in reversed(args.lengths) for v in args.variants]
    memory, timing = {}, {}
    with ThreadPoolExecutor(args.jobs) as pool, _progress(args, total=len(tasks),
                                                         desc="sweep", unit="process") as bar:
        futures = {pool.submit(run_task, kind, payload): (kind, T, v)
                   for kind, T, v, payload in tasks}
        for future in as_completed(futures):
            kind, T, v = futures[future]
            if kind == "timing":
                timing[T] = future.result()
            else:
                memory[(v, T)] = future.result()
            bar.set_postfix_str(f"{kind} T={T}" + (f" {v}" if v else ""))
            bar.update()
    return memory, timing


MEMORY_UNRESOLVED = "memory unresolved"


def build_points(args, memory: dict, timing: dict) -> list[dict]:
    cfg = args.config
    points = []
    for T in args.lengths:
        for name in args.variants:
            v = parse_variant(name)
            mem, tim = memory[(name, T)], timing[T]
            # A timing process that failed as a whole: {"error": ...}; else one entry per variant.
            tim = tim.get(name) or {"error": tim.get("error", "no timing result"),
                                    "times_ms": [], "losses": []}
            units = T * cfg.batch * cfg.hidden * cfg.layers
            errors = [e for e in (mem.get("error"), tim.get("error")) if e]
            if not mem.get("error") and not mem.get("peak_reset", True):
                errors.append("peak not reset (no /proc/self/clear_refs): includes setup")
            if mem.get("exceeded"):
                errors.append("out of memory")  # CUDA: the step raised OutOfMemoryError
            times = tim["times_ms"]
            p = {
                "variant": name, "description": v.description, "cell": v.cell,
                "levels": v.levels, "bf16_autocast": v.bf16, "checkpoint": v.ckpt or "",
                "cuda_graphs": v.graph,
                "segment_length": v.segment_length(T), "length": T, "batch": cfg.batch,
                "hidden": cfg.hidden, "layers": cfg.layers, "embed": cfg.embed,
                "vocab": cfg.vocab, "dtype": cfg.dtype,
                "static_bytes": None, "peak_bytes": None, "total_bytes": None, "total_mib": None,
                "peak_per_unit": None, "kept_rnn_bytes": None, "kept_per_unit": None,
                "kept_step_bytes": None, "memory_resolved": None,
                "ms_median": None, "ms_min": None, "ms_max": None, "spread_pct": None,
                "timed_steps": len(times), "timed_steps_ok": len(times) >= MIN_TIMED,
                "times_ms": " ".join(f"{t:.1f}" for t in times),  # every timed step, in order
                "tokens_per_s": None, "loss_first": None, "loss_last": None,
                "time_vs_lstm": None, "total_vs_lstm": None, "kept_vs_lstm": None,
                "pareto": False, "out_of_memory": bool(mem.get("exceeded")),
                "error": "; ".join(errors),
            }
            if "peak_bytes" in mem and not mem.get("exceeded"):
                p.update(static_bytes=mem["static_bytes"], peak_bytes=mem["peak_bytes"],
                         total_bytes=mem["total_bytes"],
                         total_mib=round(mem["total_bytes"] / MIB, 3),
                         peak_per_unit=round(mem["peak_bytes"] / units, 4),
                         kept_rnn_bytes=mem["kept_rnn_bytes"],
                         kept_per_unit=(None if mem["kept_rnn_bytes"] is None
                                        else round(mem["kept_rnn_bytes"] / units, 4)),
                         kept_step_bytes=mem["kept_step_bytes"],
                         # A step whose RSS high-water mark stays at or under the RSS after the
                         # warm-up (a tiny model reusing freed heap blocks, e.g. --quick) has no
                         # measured memory of its own: its figures stay as measured, but take no
                         # ratio and no frontier place.
                         memory_resolved=mem["peak_bytes"] > 0)
            if times:
                med = statistics.median(times)
                # spread: (max - min) / median of the timed steps, in percent
                p.update(ms_median=round(med, 3), ms_min=round(min(times), 3),
                         ms_max=round(max(times), 3),
                         spread_pct=round(100 * (max(times) - min(times)) / med, 1),
                         tokens_per_s=round(T * cfg.batch / (med / 1e3), 1))
            if tim["losses"]:
                p.update(loss_first=tim["losses"][0], loss_last=tim["losses"][-1])
            points.append(p)
    for T in args.lengths:
        mine = [p for p in points if p["length"] == T]
        ref = next((p for p in mine if p["variant"] == "lstm"), None)
        # One frontier per cell: a GRU is a different model, not a way of running an LSTM.
        for cell in dict.fromkeys(p["cell"] for p in mine):
            group = [p for p in mine if p["cell"] == cell]
            measured = [p if p["memory_resolved"] is not False else {**p, "total_bytes": None}
                        for p in group]
            for p, on_front in zip(group, report.pareto_flags(measured)):
                p["pareto"] = on_front
        for p in mine:
            if ref is None:
                continue
            for key, num, den in (("time_vs_lstm", "ms_median", "ms_median"),
                                  ("total_vs_lstm", "total_bytes", "total_bytes"),
                                  ("kept_vs_lstm", "kept_rnn_bytes", "kept_rnn_bytes")):
                if key == "total_vs_lstm" and not (p["memory_resolved"] and ref["memory_resolved"]):
                    continue
                if p[num] is not None and ref[den]:
                    p[key] = round(p[num] / ref[den], 4)
    return points


def budget_search(args, points: list[dict]) -> list[dict]:
    """The longest T within ``args.budget`` for every variant of ``args.budget_variants``, one
    search per variant, all searches at once but at most ``args.jobs`` runs at a time (a search's
    first two runs may go together, see ``discrnn.profiling.search``)."""
    budget, cuda = args.budget, args.device.type == "cuda"
    slots = threading.Semaphore(args.jobs)

    def one(name: str) -> dict:
        mine = [p for p in points if p["variant"] == name]
        failed = [p for p in mine if p["error"] and not p["out_of_memory"]]
        # The sweep's runs are real runs of the same measurement: they count as evidence (an
        # out-of-memory point as one over the budget).
        known = {p["length"]: math.inf if p["out_of_memory"] else p["total_bytes"]
                 for p in mine if p["out_of_memory"] or p["total_bytes"] is not None}
        guess = straight_line_guess([(p["length"], p["total_bytes"]) for p in mine
                                     if p["total_bytes"] is not None], budget)

        def run(T: int) -> float:
            with slots:
                res = run_task("memory", _payload(args, variant=name, steps=T),
                               budget_bytes=None if cuda else budget)
            if "error" in res:
                raise RuntimeError(f"T={T}: {res['error']}")
            return math.inf if res["exceeded"] else res["total_bytes"]

        row = {"variant": name, "budget_bytes": budget, "longest_length": None,
               "exceeded_at": None, "capped": False, "resolution": args.resolution,
               "max_length": args.max_length, "total_bytes_at_longest": None,
               "longest_vs_lstm": None, "search_runs": 0, "error": "", "evidence": []}
        if failed:
            row["error"] = f"not searched: T={failed[0]['length']} failed in the sweep"
            return row
        try:
            res = longest_within(run, budget, known=known, resolution=args.resolution,
                                 max_length=args.max_length, guess=guess,
                                 parallel=args.jobs > 1)
        except RuntimeError as exc:
            row["error"] = str(exc)
            return row
        row.update(longest_length=res.longest, exceeded_at=res.exceeded_at, capped=res.capped,
                   total_bytes_at_longest=res.evidence.get(res.longest),
                   search_runs=res.new_runs,
                   evidence=[[T, v if math.isfinite(v) else None]
                             for T, v in sorted(res.evidence.items())])
        return row

    rows = {}
    with ThreadPoolExecutor(max(1, len(args.budget_variants))) as pool, _progress(
            args, total=len(args.budget_variants), desc=f"budget {human_bytes(budget)}",
            unit="variant") as bar:
        # The longest searches first (a search's runs cost about as much as the lengths they try),
        # so that the last one to finish does not run alone while the other workers idle.
        def expected_length(name):
            mine = [(p["length"], p["total_bytes"]) for p in points
                    if p["variant"] == name and p["total_bytes"] is not None]
            return straight_line_guess(mine, budget) or 0.0

        order = sorted(args.budget_variants, key=expected_length, reverse=True)
        futures = {pool.submit(one, name): name for name in order}
        for future in as_completed(futures):
            name = futures[future]
            rows[name] = future.result()
            bar.set_postfix_str(f"{name}: T={rows[name]['longest_length']}")
            bar.update()
    rows = [rows[name] for name in args.budget_variants]
    ref = next((r for r in rows if r["variant"] == "lstm" and r["longest_length"]), None)
    for r in rows:
        if ref is not None and r["longest_length"] is not None:
            r["longest_vs_lstm"] = round(r["longest_length"] / ref["longest_length"], 4)
    return rows


def print_points(args, points: list[dict], title: str) -> None:
    header = ["variant", "total MiB", "peak B/u", "kept B/u", "ms/step", "spread %", "tok/s",
              "x lstm ms", "x lstm MiB", "loss", "front", "note"]
    for T in args.lengths:
        rows = []
        for p in (p for p in points if p["length"] == T):
            ms = report.fmt(p["ms_median"], ".1f") + ("" if p["timed_steps_ok"] else "*")
            rows.append([p["variant"], report.fmt(p["total_mib"], ".1f"),
                         report.fmt(p["peak_per_unit"], ".2f"),
                         report.fmt(p["kept_per_unit"], ".2f"), ms,
                         report.fmt(p["spread_pct"], ".0f"), report.fmt(p["tokens_per_s"], ".0f"),
                         report.fmt(p["time_vs_lstm"], ".2f"),
                         report.fmt(p["total_vs_lstm"], ".3f"),
                         report.fmt(p["loss_last"], ".3f"), "yes" if p["pareto"] else "",
                         p["error"][:60] or (MEMORY_UNRESOLVED if p["memory_resolved"] is False
                                             else "")])
        print(report.render_table(f"T={T}: {title}", header, rows))
    print(f"  total MiB: parameters + Adam moments + peak of the step above the baseline; B/u: "
          f"bytes per T x batch x hidden x layer;\n  kept: saved for backward inside the "
          f"recurrent layers (checkpointed segments recompute instead); * fewer than {MIN_TIMED} "
          f"timed steps;\n  loss: of step {args.warmup + args.steps + 1} on the same tokens; "
          "front: on the time/memory Pareto frontier of that T and cell.")
    if any(p["memory_resolved"] is False for p in points):
        print(f"  {MEMORY_UNRESOLVED}: the step's RSS high-water mark stayed at or under the RSS "
              "after the warm-up (the step reused heap blocks the\n  warm-up freed), so its memory "
              "is not measured: MiB and B/u as found, no ratio, no frontier place.")


def print_budget(args, rows: list[dict]) -> None:
    header = ["variant", "longest T", "exceeded at", "x lstm", "MiB at longest", "runs", "note"]
    table = []
    for r in rows:
        longest = r["longest_length"]
        at = r["total_bytes_at_longest"]
        note = r["error"][:70] or ("max-length reached: a lower bound" if r["capped"] else "")
        table.append([r["variant"], ("≥" if r["capped"] else "") + report.fmt(longest, "d"),
                      report.fmt(r["exceeded_at"], "d"), report.fmt(r["longest_vs_lstm"], ".2f"),
                      report.fmt(None if at is None else at / MIB, ".1f"),
                      str(r["search_runs"]), note])
    print(report.render_table(
        f"longest T whose training step fits {human_bytes(args.budget)} (real runs, resolution "
        f"{args.resolution:g} of T, at most {args.max_length})", header, table))
    print("  runs: fresh processes started by the search (the sweep's points count as well); "
          "exceeded at: the shortest T found over the budget.")


def print_summary(args, points: list[dict], budget_rows: list[dict]) -> None:
    """The discrete variants against the plain torch.nn cell of the same kind, at the longest T."""
    T = args.lengths[-1]
    at = {p["variant"]: p for p in points if p["length"] == T and not p["error"]}
    longest = {r["variant"]: r for r in budget_rows if not r["error"]}
    lines = []
    for name, p in at.items():
        ref = at.get(p["cell"])
        if p["levels"] is None or ref is None:
            continue
        text = f"  {name} vs {p['cell']} at T={T}:"
        if p["kept_rnn_bytes"]:
            text += f" keeps {ref['kept_rnn_bytes'] / p['kept_rnn_bytes']:.1f}x less for backward,"
        if p["memory_resolved"] and ref["memory_resolved"]:
            text += f" step memory {p['total_bytes'] / ref['total_bytes']:.2f}x,"
        if p["ms_median"] and ref["ms_median"]:
            text += f" time {p['ms_median'] / ref['ms_median']:.2f}x"
        mine, theirs = longest.get(name), longest.get(p["cell"])
        if mine and theirs and mine["longest_length"] and theirs["longest_length"]:
            text += (f"; longest T within the budget {mine['longest_length']} vs "
                     f"{theirs['longest_length']} ({mine['longest_length'] / theirs['longest_length']:.2f}x"
                     + (", capped" if mine["capped"] or theirs["capped"] else "") + ")")
        lines.append(text)
    if lines:
        print("\n== discrnn against torch.nn in this run")
        print("\n".join(lines))


def main(argv=None) -> int:
    args = resolve(argv)
    started = time.perf_counter()
    cfg, device = args.config, args.device
    import triton

    command = (shlex.join(sys.orig_argv) if argv is None
               else shlex.join([PROG, *[str(a) for a in argv]]))
    meta = {
        "device": device.type, "device_name": report.device_name(device),
        "torch": torch.__version__, "triton": triton.__version__, "discrnn": __version__,
        "commit": report.git_commit(), "threads_per_process": args.threads,
        "processes_at_once": args.jobs, "cpu_count": os.cpu_count(),
        "load_avg_1min_start": report.load_average(),
        # on CUDA torch.nn.LSTM / GRU (cuDNN) use TF32 for float32 by default, torch matmuls
        # (discrnn's products, the head) do not: the precision each side ran in
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "timing_method": (f"median of {args.steps} interleaved rounds after {args.warmup} "
                          "untimed, one process per T, default allocator settings"),
        "memory_method": ("torch.cuda.max_memory_allocated - memory_allocated after "
                          "reset_peak_memory_stats" if device.type == "cuda" else
                          "RSS high-water mark (clear_refs + getrusage) - RSS after warm-up, "
                          f"MALLOC_MMAP_THRESHOLD_={mmap_threshold()}, fresh process per point"),
        "command": command,
    }
    if args.left_out:
        meta["left_out"] = "; ".join(f"{name}: {why}" for name, why in args.left_out.items())
    shape = (f"{cfg.layers} layers, H={cfg.hidden}, B={cfg.batch}, E={cfg.embed}, "
             f"V={cfg.vocab}, {cfg.dtype}, {meta['device_name']}")
    print(f"{PROG}: training steps of embedding -> {shape}")
    for key, value in meta.items():
        print(f"  {key:22} {value}")
    print(f"  {'lengths':22} {args.lengths}; {args.steps} timed steps after {args.warmup} "
          f"untimed round(s); variants {' '.join(args.variants)}")
    if args.budget is not None:
        print(f"  {'budget':22} {human_bytes(args.budget)} for "
              f"{' '.join(args.budget_variants) or 'no variant'}")
    load = meta["load_avg_1min_start"]
    if device.type == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: load average {load} on {os.cpu_count()} cores: the CPU is shared; "
              "times are inflated (the rounds interleave the variants, so compare ratios)")

    memory, timing = sweep(args)
    points = build_points(args, memory, timing)
    # The sweep's table and CSV before the search, which can take far longer: a run stopped
    # during the search (a time limit, Ctrl-C) keeps them. Rewritten with the final meta below.
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print_points(args, points, shape)
    report.write_csv(out / "profile.csv", points, meta)
    search = args.budget is not None and args.budget_variants
    if search:
        print(f"\nwrote {out / 'profile.csv'} (the sweep); the budget search follows")
    budget_rows = budget_search(args, points) if search else []
    meta["load_avg_1min_end"] = report.load_average()
    meta["wall_s"] = round(time.perf_counter() - started, 1)

    if budget_rows:
        print_budget(args, budget_rows)
    print_summary(args, points, budget_rows)

    written = [out / "profile.csv", out / "profile.json"]
    report.write_csv(out / "profile.csv", points, meta)
    if budget_rows:
        report.write_csv(out / "budget.csv",
                         [{k: v for k, v in r.items() if k != "evidence"} for r in budget_rows],
                         meta)
        written.append(out / "budget.csv")
    report.write_json(out / "profile.json", {
        "meta": meta,
        "config": {**vars(cfg), "lengths": args.lengths, "variants": args.variants,
                   "steps": args.steps, "warmup": args.warmup, "min_timed_steps": MIN_TIMED,
                   "budget_bytes": args.budget, "budget_variants": args.budget_variants,
                   "resolution": args.resolution,
                   "max_length": args.max_length},
        "method": __doc__,
        "points": points,
        "budget": budget_rows,
    })
    plt, why = report.import_pyplot()
    if plt is None:
        print(f"\nplots skipped: matplotlib does not import ({why})")
    else:
        title = (f"{shape}\ntorch {torch.__version__}, triton {triton.__version__}, "
                 f"discrnn {__version__}, {args.threads} thread(s) per process")
        report.plot_peak_vs_length(plt, out / "peak_vs_length.png", points, args.variants,
                                   args.budget, title)
        report.plot_time_memory(plt, out / "time_vs_memory.png", points, args.lengths, title)
        written += [out / "peak_vs_length.png", out / "time_vs_memory.png"]
        if budget_rows:
            report.plot_budget(plt, out / "budget.png", budget_rows,
                               f"longest T within {human_bytes(args.budget)}; {title}")
            written.append(out / "budget.png")
    print(f"\nwrote {', '.join(str(p) for p in written)} ({meta['wall_s']:.0f} s)")
    # An out-of-memory point is a measurement (that length does not fit), not a failure.
    failed = ([p for p in points if p["error"] and not p["out_of_memory"]]
              + [r for r in budget_rows if r["error"]])
    for item in failed:
        print(f"ERROR {item['variant']}" + (f" T={item['length']}" if "length" in item else "")
              + f": {item['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
