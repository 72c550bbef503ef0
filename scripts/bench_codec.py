#!/usr/bin/env python
"""Benchmark discrnn's codecs: quantize+pack and unpack+dequantize, float32, tanh levels.

For 6, 7 and 8 bits (64, 128 and 256 levels) it times, in one run and on one device:

* ``discrnn``: the public API with its default backend (Triton on CUDA, torch elsewhere);
* ``torch eager``: the pure-torch reference ``discrnn.kernels.codec_torch`` (the ratio baseline);
* ``torch compile``: that reference under ``torch.compile`` (a failure is recorded, not raised);
* ``separate``: a straightforward torch quantize + ``discrnn.pack`` (``discrnn.unpack`` + decode);
* ``copy``: ``clone`` of the float32 input, the bandwidth this machine actually reaches.

Bytes moved count reads plus writes: quantize+pack reads 4 B and writes bits/8 B per value,
unpack+dequantize the reverse, a float32 copy 8 B. GB/s is also given as a share of the copy's GB/s
measured in the same run, and time as a speedup over the torch eager reference (> 1 is faster).
Every output is checked against the eager reference ("exact" = bit for bit).

A second section packs and unpacks 6-bit codes (2^24 by default) on the CPU beside the
"straightforward dense torch" codec of shared/BASELINES.md, to stand beside the rows there.

Timing: on CUDA the median of ``triton.testing.do_bench`` (after its warm-up, L2 flushed between
calls), plus the peak of extra memory a call allocates (``torch.cuda.max_memory_allocated``). On CPU
``time.perf_counter`` around each call, in rounds interleaved over a section's implementations (one
call of each per round, ``--warmup`` untimed rounds first) so that a load change on a shared machine
hits every row alike; median of ``--repeats`` rounds, the fastest call beside it. Absolute CPU times
drift between runs: compare ratios.

CPU memory: glibc maps every allocation above its mmap threshold (32 MiB at most) afresh, and the
kernel faults its pages in on first touch: at 2^24 float32 values that can cost more than the
arithmetic. The ``faulted MiB`` column (minor page faults per call) shows how much. With
``--reuse-memory`` glibc keeps freed memory, as CUDA's caching allocator does, and the times measure
the codec itself; the default leaves malloc alone, which is what a user gets.

Writes ``results/bench_codec_<device>.csv`` (``cpu`` or ``cuda``; ``--out`` sets the path) and a PNG
beside it when matplotlib imports. ``--quick`` runs 2^20 values and appends ``_quick`` to the name.

    python scripts/bench_codec.py            # 2^28 values on CUDA, 2^24 on CPU
    python scripts/bench_codec.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import triton

import discrnn
from discrnn.backend import resolve_backend, triton_interpreting
from discrnn.kernels import codec_torch as ct
from bench_env import (  # scripts/ is on sys.path
    add_device_argument, device_name, git_commit, load_average, resolve_device, save_figure,
)

KIND = "tanh"
QP, UD = "quantize+pack", "unpack+dequantize"  # the two main sections
PACK, UNPACK = "pack 6-bit (CPU)", "unpack 6-bit (CPU)"  # the BASELINES.md section
COPY = "copy (clone fp32)"
DENSE = "dense torch (int32 word per 4 codes)"
EAGER, COMPILED = "torch eager (reference)", "torch compile"

# shared/BASELINES.md, 2^24 6-bit codes, 2 threads, median of 5 (ms). Only their ratios are used:
# absolute times drift between runs, ratios measured in one run much less.
BASELINE_DENSE_MS = {"pack": 101.7, "unpack": 77.5}
BASELINE_TORCHAO_MS = {"pack": 18.1, "unpack": 13.0}
NOISY = 1.5  # a median this many times the fastest call gets flagged in the table
GPU_COPY_SHARE_TARGET = 85.0  # percent of the measured copy rate (BASELINES.md, GPU targets)


@dataclass
class Row:
    section: str
    impl: str
    bits: int
    numel: int
    bytes_moved: int
    ms: float = math.nan  # median
    min_ms: float = math.nan  # fastest call: far below the median means a noisy machine
    gbps: float = math.nan
    pct_copy: float = math.nan
    speedup: float = math.nan  # t(baseline of the section) / t(this row); > 1 is faster
    peak_extra_mib: float | None = None  # CUDA only: peak allocation of one call beyond its inputs
    faulted_mib: float | None = None  # CPU only: memory first touched per call (minor page faults)
    first_call_s: float = math.nan  # includes compilation for the compiled rows
    check: str = ""
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Case:
    row: Row
    fn: Callable[[], object]
    check: Callable[[object], str] | None = None  # output -> "exact" / "close" / "MISMATCH ..."


def run_section(cases: list[Case], device: torch.device, repeats: int, warmup: int) -> None:
    """Time every case of one section and fill its row (median and fastest call, in ms).

    Each case is first called once: that compiles what needs compiling, gives the output to check
    and, on CUDA, the peak memory of a call. An exception is recorded in the row rather than raised,
    so one failing implementation (typically torch.compile) does not hide the others.

    On CUDA each case then goes through ``triton.testing.do_bench``. On the CPU the cases are timed
    in interleaved rounds (one call of each per round), so that a slow phase of a shared machine
    hits all of them alike and the ratios within the section stay fair.
    """
    cuda = device.type == "cuda"
    live = []
    for case in cases:
        try:
            start = time.perf_counter()
            out = case.fn()
            if cuda:
                torch.cuda.synchronize(device)
            case.row.first_call_s = time.perf_counter() - start
            if case.check is not None:
                case.row.check = case.check(out)
            del out
            if cuda:
                case.row.peak_extra_mib = peak_extra_mib(case.fn, device)
            live.append(case)
        except Exception as exc:  # noqa: BLE001 - recorded in the output instead
            case.row.error = f"{type(exc).__name__}: {exc}".strip()

    if cuda:
        for case in live:
            try:
                # do_bench warms up for 25 ms, then times ~100 ms of calls, flushing L2 before each.
                median, fastest = triton.testing.do_bench(
                    case.fn, warmup=25, rep=100, quantiles=[0.5, 0.0]
                )
                case.row.ms, case.row.min_ms = float(median), float(fastest)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded
                case.row.error = f"{type(exc).__name__}: {exc}".strip()
        return

    times: dict[int, list[float]] = {id(case): [] for case in live}
    faults: dict[int, int] = {id(case): 0 for case in live}
    for round_ in range(warmup + repeats):
        for case in live:
            faults_before = minor_faults()
            start = time.perf_counter()
            case.fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[id(case)].append(elapsed * 1e3)
                faults[id(case)] += minor_faults() - faults_before
    for case in live:
        case.row.ms, case.row.min_ms = statistics.median(times[id(case)]), min(times[id(case)])
        case.row.faulted_mib = faults[id(case)] / repeats * resource.getpagesize() / 2**20


def minor_faults() -> int:
    """Minor page faults of this process so far. glibc hands tensors above its mmap threshold (at
    most 32 MiB) fresh pages from the kernel on every allocation, and faulting them in can cost more
    than the arithmetic; the count per call shows how much of a CPU time that is."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap and keep freed memory there, so that repeated
    calls reuse warm pages as CUDA's caching allocator does (``--reuse-memory``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during one call (its output included) above what was live before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


def compare(out: torch.Tensor, ref: torch.Tensor) -> str:
    """'exact' (bit for bit), 'close' (floats within 1e-6) or 'MISMATCH (...)'."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"MISMATCH (got {out.dtype}{tuple(out.shape)}, want {ref.dtype}{tuple(ref.shape)})"
    if torch.equal(out, ref):
        return "exact"
    if out.is_floating_point() and torch.allclose(out, ref, rtol=0.0, atol=1e-6):
        return "close"
    return f"MISMATCH ({int((out != ref).sum())} of {ref.numel()})"


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def finish(rows: list[Row], baseline: str, copy: str) -> None:
    """GB/s, share of the copy's GB/s and speedup over the section's baseline row."""
    base_ms = next((r.ms for r in rows if r.impl == baseline), math.nan)
    copy_gbps = next((gbps(r.bytes_moved, r.ms) for r in rows if r.impl == copy), math.nan)
    for r in rows:
        r.gbps = gbps(r.bytes_moved, r.ms)
        r.pct_copy = 100.0 * r.gbps / copy_gbps
        r.speedup = base_ms / r.ms


# ---------------------------------------------------------------------------------------------
# The implementations


def separate_quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Straightforward torch tanh quantizer (same formula as the reference; input has no NaN)."""
    return torch.clamp(torch.floor((x + 1.0) * ((levels - 1) / 2) + 0.5), 0, levels - 1).to(
        torch.uint8
    )


def separate_decode(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Straightforward torch tanh decode. Division by a Python scalar may become a multiplication by
    its reciprocal (CUDA), so this may be only 'close' to the correctly rounded reference."""
    return (codes.to(torch.float32) * 2.0 - (levels - 1)) / (levels - 1)


def dense_pack6(codes: torch.Tensor) -> torch.Tensor:
    """The 'straightforward dense torch' row of BASELINES.md: one int32 word per 4 codes, stack its
    3 low bytes. Same dense little-endian layout as discrnn. Needs numel % 4 == 0."""
    c = codes.view(-1, 4).to(torch.int32)
    word = c[:, 0] | (c[:, 1] << 6) | (c[:, 2] << 12) | (c[:, 3] << 18)
    return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=1).to(
        torch.uint8
    ).view(-1)


def dense_unpack6(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(-1, 3).to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    return torch.stack([(word >> s) & 63 for s in (0, 6, 12, 18)], dim=1).to(torch.uint8).view(-1)


def compiled(fn):
    # dynamic=False: levels and bits drive Python-level loops in the reference, so every width gets
    # its own static graph (the default would try symbolic ints after the second width).
    return torch.compile(fn, dynamic=False)


def bench_codecs(x, bits_list, backend, skip_compile, run) -> list[Row]:
    """The quantize+pack and unpack+dequantize sections, one pair per code width."""
    n = x.numel()
    rows: list[Row] = []
    for bits in bits_list:
        levels = 2**bits
        nbytes = (n * bits + 7) // 8  # packed bytes: ceil(n * bits / 8)
        ref_packed = ct.torch_quantize_pack(x, levels, KIND, bits)
        ref_values = ct.torch_unpack_dequantize(ref_packed, bits, n, levels, KIND, torch.float32)
        packed = discrnn.quantize_pack(x, levels, KIND)

        def check_packed(out):
            return compare(out.data if isinstance(out, discrnn.PackedTensor) else out, ref_packed)

        def check_values(out):
            return compare(out, ref_values)

        # quantize+pack reads 4 B and writes bits/8 B per value; the float32 copy moves 4 + 4 B.
        def qp(impl, fn, check=check_packed):
            return Case(Row(QP, impl, bits, n, 4 * n + nbytes), fn, check)

        cases = [
            qp(f"discrnn ({backend})", lambda: discrnn.quantize_pack(x, levels, KIND)),
            qp(EAGER, lambda: ct.torch_quantize_pack(x, levels, KIND, bits)),
        ]
        if not skip_compile:
            qp_compiled = compiled(ct.torch_quantize_pack)
            cases.append(qp(COMPILED, lambda: qp_compiled(x, levels, KIND, bits)))
        cases += [
            qp("separate: torch quantize + discrnn.pack",
               lambda: discrnn.pack(separate_quantize(x, levels), bits)),
            Case(Row(QP, COPY, bits, n, 8 * n), lambda: x.clone()),
        ]
        run(cases)
        finish([c.row for c in cases], EAGER, COPY)
        rows += [c.row for c in cases]

        def ud(impl, fn, check=check_values):
            return Case(Row(UD, impl, bits, n, nbytes + 4 * n), fn, check)

        cases = [
            ud(f"discrnn ({backend})", lambda: packed.dequantize()),
            ud(EAGER, lambda: ct.torch_unpack_dequantize(ref_packed, bits, n, levels, KIND,
                                                          torch.float32)),
        ]
        if not skip_compile:
            ud_compiled = compiled(ct.torch_unpack_dequantize)
            cases.append(ud(COMPILED, lambda: ud_compiled(ref_packed, bits, n, levels, KIND,
                                                          torch.float32)))
        cases += [
            ud("separate: discrnn.unpack + torch decode",
               lambda: separate_decode(discrnn.unpack(packed.data, bits, n), levels)),
            Case(Row(UD, COPY, bits, n, 8 * n), lambda: x.clone()),
        ]
        run(cases)
        finish([c.row for c in cases], EAGER, COPY)
        rows += [c.row for c in cases]
        del ref_packed, ref_values, packed
    return rows


def bench_pack6_cpu(n: int, seed: int, run) -> list[Row]:
    """6-bit pack / unpack of uint8 codes on the CPU, beside BASELINES.md's dense torch row."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 64, (n,), dtype=torch.uint8, generator=gen)
    # BASELINES.md lists the float -> 6-bit code quantizer beside the packers; time it here too.
    x = torch.empty(n, dtype=torch.float32).uniform_(-1.05, 1.05, generator=gen)
    nbytes = (n * 6 + 7) // 8
    ref = dense_pack6(codes)
    copy_codes = "copy codes (clone uint8)"

    def same_as(expected):
        return lambda out: compare(out, expected)

    pack = [
        Case(Row(PACK, "discrnn.pack (torch, checks codes)", 6, n, n + nbytes),
             lambda: discrnn.pack(codes, 6), same_as(ref)),
        Case(Row(PACK, "codec_torch.torch_pack (no checks)", 6, n, n + nbytes),
             lambda: ct.torch_pack(codes, 6), same_as(ref)),
        Case(Row(PACK, DENSE, 6, n, n + nbytes), lambda: dense_pack6(codes)),
        Case(Row(PACK, copy_codes, 6, n, 2 * n), lambda: codes.clone()),
        Case(Row(PACK, "torch quantize float->code (no pack)", 6, n, 4 * n + n),
             lambda: separate_quantize(x, 64)),
    ]
    run(pack)
    finish([c.row for c in pack], DENSE, copy_codes)

    unpack = [
        Case(Row(UNPACK, "discrnn.unpack (torch)", 6, n, nbytes + n),
             lambda: discrnn.unpack(ref, 6, n), same_as(codes)),
        Case(Row(UNPACK, DENSE, 6, n, nbytes + n), lambda: dense_unpack6(ref), same_as(codes)),
        Case(Row(UNPACK, copy_codes, 6, n, 2 * n), lambda: codes.clone()),
    ]
    run(unpack)
    finish([c.row for c in unpack], DENSE, copy_codes)
    return [c.row for c in pack + unpack]


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def first_line(text: str, width: int = 60) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def print_table(title: str, rows: list[Row], ratio_label: str) -> None:
    show_peak = any(r.peak_extra_mib is not None for r in rows)
    show_faulted = any(r.faulted_mib is not None for r in rows)
    header = ["implementation", "bits", "median ms", "min ms", "GB/s", "% copy", ratio_label]
    if show_peak:
        header.append("peak MiB")
    if show_faulted:
        header.append("faulted MiB")
    header += ["check", "note"]
    table = []
    for r in rows:
        note = f"ERROR {first_line(r.error)}" if r.error else ""
        if not r.error and r.impl == COMPILED:
            note = f"first call {r.first_call_s:.1f} s (compiles)"
        if r.ms > NOISY * r.min_ms:  # the machine was not quiet: trust this row less
            note = (note + "; " if note else "") + f"noisy: median {r.ms / r.min_ms:.1f}x min"
        line = [r.impl, str(r.bits), fmt(r.ms, ".3f"), fmt(r.min_ms, ".3f"), fmt(r.gbps, ".2f"),
                fmt(r.pct_copy, ".1f"), fmt(r.speedup, ".2f")]
        if show_peak:
            line.append(fmt(r.peak_extra_mib, ".1f"))
        if show_faulted:
            line.append(fmt(r.faulted_mib, ".0f"))
        line += [r.check, note]
        table.append(line)
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    numeric = set(range(1, len(header) - 2))  # all but the name, check and note

    def render(cells):
        return "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    print(f"\n== {title}")
    print(render(header))
    print(render(["-" * w for w in widths]))
    previous_bits = None
    for r, line in zip(rows, table):
        if previous_bits is not None and r.bits != previous_bits:
            print()
        previous_bits = r.bits
        print(render(line))


def print_goals(rows: list[Row], device: torch.device, backend: str) -> None:
    """The targets of shared/BASELINES.md, judged on this run's numbers."""

    def get(section, impl, bits=None):
        return next((r for r in rows if r.section == section and r.impl == impl
                     and (bits is None or r.bits == bits)), None)

    def verdict(ok):
        return "met" if ok else "NOT met"

    print("\n== Goals (shared/BASELINES.md), judged on this run")
    ours = f"discrnn ({backend})"
    for section, other in ((QP, "separate: torch quantize + discrnn.pack"),
                           (UD, "separate: discrnn.unpack + torch decode")):
        for r in (r for r in rows if r.section == section and r.impl == ours):
            sep = get(section, other, r.bits)
            if sep is None or math.isnan(r.ms) or math.isnan(sep.ms):
                continue
            line = f"{section} {r.bits} bits: discrnn {sep.ms / r.ms:.2f}x as fast as separate"
            if section == QP:
                line += f" ({verdict(r.ms < sep.ms)}: faster than separate passes)"
            if device.type == "cuda":
                target = GPU_COPY_SHARE_TARGET
                ok = r.pct_copy >= target
                line += f"; {r.pct_copy:.1f}% of copy ({verdict(ok)}: >= {target}%)"
            print("  " + line)
    for op, section, impl in (("pack", PACK, "discrnn.pack (torch, checks codes)"),
                              ("pack", PACK, "codec_torch.torch_pack (no checks)"),
                              ("unpack", UNPACK, "discrnn.unpack (torch)")):
        r = get(section, impl)
        if r is None or math.isnan(r.speedup):
            continue
        target = BASELINE_DENSE_MS[op] / BASELINE_TORCHAO_MS[op]
        print(f"  {op} 6-bit CPU, {impl}: {r.speedup:.2f}x as fast as dense torch; torchao was "
              f"{target:.2f}x in BASELINES.md ({verdict(r.speedup >= target)}: >= torchao)")


def write_csv(path: Path, rows: list[Row], meta: dict) -> None:
    names = list(meta) + [f.name for f in fields(Row)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({**meta, **asdict(r)})


def plot(path: Path, rows: list[Row], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - the plot is optional
        print(f"\nplot skipped: matplotlib does not import ({type(exc).__name__}: {exc})")
        return False

    panels = [(QP, "bits"), (UD, "bits"), (None, "op")]  # None: the 6-bit CPU pack/unpack panel
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 6.5))
    colors = {}  # one colour per implementation across the panels
    for ax, (section, group_by) in zip(axes, panels):
        if section is None:
            chosen = [r for r in rows if r.section in (PACK, UNPACK)]
            ax.set_title(f"6-bit codes on CPU, {chosen[0].numel if chosen else 0} codes")
        else:
            chosen = [r for r in rows if r.section == section]
            ax.set_title(f"{section}, float32, {chosen[0].numel if chosen else 0} values")
        groups = list(dict.fromkeys(r.bits if group_by == "bits" else r.section for r in chosen))
        labelled = set()
        for i, g in enumerate(groups):
            members = [r for r in chosen if (r.bits if group_by == "bits" else r.section) == g]
            width = 0.8 / max(1, len(members))
            for j, r in enumerate(members):
                color = colors.setdefault(r.impl, plt.get_cmap("tab20")(len(colors) % 20))
                ax.bar(i + (j - (len(members) - 1) / 2) * width,
                       0.0 if math.isnan(r.gbps) else r.gbps, width, color=color,
                       label=None if r.impl in labelled else r.impl)
                labelled.add(r.impl)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{g} bits" if group_by == "bits" else g for g in groups])
        ax.set_ylabel("GB/s (bytes read + written)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Throughput of discrnn's quantize+pack and unpack+dequantize codecs beside "
        "the torch reference (eager and compiled), separate torch passes and a float32 copy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_device_argument(p)
    p.add_argument("--numel", type=int, default=None,
                   help="values per tensor (default 2^28 on CUDA, 2^24 on CPU)")
    p.add_argument("--pack-numel", type=int, default=None,
                   help="codes in the 6-bit CPU pack/unpack section, a multiple of 4 "
                   "(default 2^24)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2^20 values everywhere unless --numel/--pack-numel say "
                   "otherwise")
    p.add_argument("--bits", type=int, nargs="+", default=[6, 7, 8],
                   help="code widths to run; levels = 2^bits")
    p.add_argument("--repeats", type=int, default=5,
                   help="CPU: timed rounds (one call of each implementation), the median is kept")
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed rounds before timing")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch CPU threads")
    p.add_argument("--skip-compile", action="store_true",
                   help="leave out torch.compile (its first compile takes a minute on 2 CPU cores)")
    p.add_argument("--skip-pack", action="store_true", help="leave out the 6-bit CPU section")
    p.add_argument("--reuse-memory", action="store_true",
                   help="CPU: let glibc keep freed memory (mallopt), so calls reuse warm pages as "
                   "on CUDA and times measure the codec rather than page faults")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV path, the PNG goes beside it (default results/bench_codec_<device>"
                   "[_quick].csv, <device> = cpu or cuda)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if any(not 1 <= b <= 8 for b in args.bits):
        p.error(f"--bits must lie in [1, 8], got {args.bits}")
    if args.numel is not None and args.numel < 1:
        p.error(f"--numel must be >= 1, got {args.numel}")
    if args.pack_numel is not None and (args.pack_numel < 4 or args.pack_numel % 4):
        p.error(f"--pack-numel must be a positive multiple of 4, got {args.pack_numel}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--repeats and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and triton_interpreting():
        # The kernels would run through the interpreter: numbers that mean nothing.
        sys.exit("TRITON_INTERPRET=1 is set: unset it to benchmark the compiled Triton kernels")
    # The default backend on this device. On CPU that is the torch codec: the Triton interpreter is
    # far too slow to time, and discrnn never picks it by default.
    backend = resolve_backend(None, device)

    torch.set_num_threads(args.threads)
    malloc = "glibc default"
    if args.reuse_memory:
        malloc = "reuse freed memory (mallopt)" if keep_freed_memory() else "mallopt FAILED"
    numel = args.numel or (2**20 if args.quick else 2**28 if device.type == "cuda" else 2**24)
    pack_numel = args.pack_numel or (2**20 if args.quick else 2**24)

    name = device_name(device)
    meta = {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "discrnn": discrnn.__version__,
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": load_average(),
        "malloc": malloc,
        "timing": "triton.testing.do_bench median" if device.type == "cuda"
        else f"perf_counter, median of {args.repeats} interleaved rounds after {args.warmup} "
        "warm-up",
    }
    print("discrnn codec benchmark")
    for key, value in meta.items():
        print(f"  {key:14} {value}")
    print(f"  {'numel':14} {numel} (2^{math.log2(numel):.2f}) float32, kind={KIND!r}")
    if not args.skip_pack:
        print(f"  {'pack numel':14} {pack_numel} 6-bit codes on CPU")
    print("  GB/s counts bytes read + written; '% copy' is the share of a float32 clone's GB/s in "
          "this run;\n  'x eager' is t(torch eager reference) / t (> 1 is faster); "
          "'check' compares with the eager reference;\n  'faulted MiB' (CPU) is memory the "
          "kernel had to fault in per call: fresh pages of large tensors (see --reuse-memory).")

    # Another busy process matters a lot on a small CPU: an OpenMP region waits for its slowest
    # thread, so a thread that loses its core for a scheduler slice inflates the call many-fold.
    if device.type == "cpu" and meta["load_avg_1min"] > 0.5 * (os.cpu_count() or 1):
        print(f"  WARNING: load average {meta['load_avg_1min']} before the run: the CPU is shared, "
              f"times with {torch.get_num_threads()} threads can be inflated many-fold")

    gen = torch.Generator(device=device).manual_seed(args.seed)
    # A little past [-1, 1] so the clamp to the end levels is exercised too.
    x = torch.empty(numel, dtype=torch.float32, device=device).uniform_(-1.05, 1.05, generator=gen)

    def run_on(dev):
        return lambda cases: run_section(cases, dev, args.repeats, args.warmup)

    rows = bench_codecs(x, args.bits, backend, args.skip_compile, run_on(device))
    del x
    print_table(f"{QP}: float32 -> packed codes, {numel} values on {name}",
                [r for r in rows if r.section == QP], "x eager")
    print_table(f"{UD}: packed codes -> float32, {numel} values on {name}",
                [r for r in rows if r.section == UD], "x eager")

    if not args.skip_pack:
        pack_rows = bench_pack6_cpu(pack_numel, args.seed, run_on(torch.device("cpu")))
        rows += pack_rows
        title = (f"6-bit pack / unpack on CPU ({torch.get_num_threads()} threads), {pack_numel} "
                 f"codes; 'x dense' = t(dense torch) / t")
        print_table(title, pack_rows, "x dense")
        print("  BASELINES.md (2 threads, 2^24 codes): dense torch pack "
              f"{BASELINE_DENSE_MS['pack']} ms / unpack {BASELINE_DENSE_MS['unpack']} ms, torchao "
              f"{BASELINE_TORCHAO_MS['pack']} / {BASELINE_TORCHAO_MS['unpack']} ms, quantize "
              "float->code 127.2 ms, clone 1.1 ms")

    print_goals(rows, device, backend)
    noisy = [r for r in rows if r.ms > NOISY * r.min_ms]
    if noisy:
        print(f"  ({len(noisy)} of {len(rows)} rows are noisy (median > {NOISY}x fastest call): "
              "rerun on a quiet machine before trusting these verdicts)")

    errors = [r for r in rows if r.error]
    if errors:
        print("\n== Errors (full text)")
        for r in errors:
            print(f"-- {r.section}, {r.impl}, {r.bits} bits:\n{r.error}\n")

    tag = device.type + ("_quick" if args.quick else "")  # the card's name is in the CSV
    csv_path = args.out or Path("results") / f"bench_codec_{tag}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(csv_path, rows, {**meta, "numel_main": numel, "load_avg_1min_end": load_average()})
    print(f"\nwrote {csv_path}")
    if not args.no_plot:
        png_path = csv_path.with_suffix(".png")
        if plot(png_path, rows, f"discrnn codecs on {name} (torch {torch.__version__}, "
                                f"triton {triton.__version__})"):
            print(f"wrote {png_path}")

    # An error or a wrong output fails the run, except under torch.compile: that is recorded
    # (the compiler is not ours, and a failure there is a finding, not a broken benchmark).
    failed = [r for r in rows if r.impl != COMPILED and (r.error or r.check.startswith("MISMATCH"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
