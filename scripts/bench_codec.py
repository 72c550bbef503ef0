#!/usr/bin/env python
"""Benchmark discrnn's codecs: quantize+pack and unpack+dequantize, float32, tanh levels.

For 6, 7 and 8 bits (64, 128 and 256 levels) it times, in one run and on one device:

* ``discrnn``          the public API with its default backend (Triton on CUDA, torch elsewhere);
* ``torch eager``      the pure-torch reference in ``discrnn.kernels.codec_torch`` (the ratio baseline);
* ``torch compile``    that reference under ``torch.compile`` (a failure is recorded, not raised);
* ``separate passes``  a straightforward torch quantize (or decode) plus ``discrnn.pack`` (``unpack``);
* ``copy``             ``clone`` of the float32 input: the bandwidth this machine actually reaches.

Bytes moved count reads plus writes: quantize+pack reads 4 B and writes bits/8 B per value,
unpack+dequantize the reverse, a float32 copy 8 B. GB/s is also given as a share of the copy's GB/s
measured in the same run, and time as a speedup over the torch eager reference (> 1 is faster).
Every output is checked against the eager reference ("exact" = bit for bit).

A second section packs and unpacks 6-bit codes (2^24 by default) on the CPU beside the
"straightforward dense torch" codec of shared/BASELINES.md, so the figures can stand beside its rows.

Timing: on CUDA the median of ``triton.testing.do_bench`` (after its warm-up, L2 flushed between
calls), plus the peak of extra memory a call allocates; on CPU ``time.perf_counter`` around each call,
after ``--warmup`` calls, median of ``--repeats``. Absolute CPU times drift between runs: compare ratios.

Writes ``<out>/bench_codec_<device>.csv`` (and ``.png`` when matplotlib imports); ``--quick`` runs
2^20 values and writes ``bench_codec_<device>_quick.*``.

    python scripts/bench_codec.py            # 2^28 values on CUDA, 2^24 on CPU
    python scripts/bench_codec.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import statistics
import subprocess
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
GPU_COPY_SHARE_TARGET = 85.0  # percent of the measured copy rate (BASELINES.md, GPU targets)


@dataclass
class Row:
    section: str
    impl: str
    bits: int
    numel: int
    bytes_moved: int
    ms: float = math.nan
    gbps: float = math.nan
    pct_copy: float = math.nan
    speedup: float = math.nan  # t(baseline of the section) / t(this row); > 1 is faster
    peak_extra_mib: float | None = None  # CUDA only: peak allocation of one call beyond its inputs
    first_call_s: float = math.nan  # includes compilation for the compiled rows
    check: str = ""
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Median milliseconds of a call: do_bench on CUDA, perf_counter on CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def median_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def peak_extra_mib(self, fn: Callable[[], object]) -> float | None:
        """Peak bytes allocated during one call (its output included) above what was live before."""
        if self.device.type != "cuda":
            return None  # torch has no peak-memory counter for the CPU allocator
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del out
        return peak / 2**20

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(timer: Timer, row: Row, fn: Callable[[], object], check=None) -> Row:
    """Fill ``row`` with the timing of ``fn``. An exception is recorded in the row, not raised, so
    one failing implementation (typically torch.compile) does not hide the others."""
    try:
        start = time.perf_counter()
        out = fn()  # first call: compiles where there is something to compile
        timer.sync()
        row.first_call_s = time.perf_counter() - start
        if check is not None:
            row.check = check(out)
        del out
        row.peak_extra_mib = timer.peak_extra_mib(fn)
        row.ms = timer.median_ms(fn)
    except Exception as exc:  # noqa: BLE001 - recorded in the output instead
        row.error = f"{type(exc).__name__}: {exc}".strip()
    return row


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


def finish(rows: list[Row], baseline: str, copy: Row) -> None:
    """GB/s, share of the copy rate and speedup over the section's baseline row."""
    base_ms = next((r.ms for r in rows if r.impl == baseline), math.nan)
    copy_gbps = gbps(copy.bytes_moved, copy.ms)
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


def bench_codecs(x, bits_list, timer, backend, skip_compile) -> tuple[list[Row], Row]:
    n = x.numel()
    # One copy measurement serves every section of the run as its bandwidth reference.
    copy = measure(timer, Row("copy", COPY, 32, n, 8 * n), lambda: x.clone())
    rows: list[Row] = []
    for bits in bits_list:
        levels = 2**bits
        nbytes = (n * bits + 7) // 8  # packed bytes: ceil(n * bits / 8)
        ref_packed = ct.torch_quantize_pack(x, levels, KIND, bits)
        ref_values = ct.torch_unpack_dequantize(ref_packed, bits, n, levels, KIND, torch.float32)
        packed = discrnn.quantize_pack(x, levels, KIND)

        def qp_row(impl):
            return Row(QP, impl, bits, n, 4 * n + nbytes)

        def ud_row(impl):
            return Row(UD, impl, bits, n, nbytes + 4 * n)

        def check_packed(out):
            return compare(out.data if isinstance(out, discrnn.PackedTensor) else out, ref_packed)

        def check_values(out):
            return compare(out, ref_values)

        section = [
            measure(timer, qp_row(f"discrnn ({backend})"),
                    lambda: discrnn.quantize_pack(x, levels, KIND), check_packed),
            measure(timer, qp_row(EAGER),
                    lambda: ct.torch_quantize_pack(x, levels, KIND, bits), check_packed),
        ]
        if not skip_compile:
            qp_compiled = compiled(ct.torch_quantize_pack)
            section.append(measure(timer, qp_row(COMPILED),
                                   lambda: qp_compiled(x, levels, KIND, bits), check_packed))
        section.append(measure(timer, qp_row("separate: torch quantize + discrnn.pack"),
                               lambda: discrnn.pack(separate_quantize(x, levels), bits),
                               check_packed))
        section.append(Row(QP, COPY, bits, n, copy.bytes_moved, copy.ms))
        finish(section, EAGER, copy)
        rows += section

        section = [
            measure(timer, ud_row(f"discrnn ({backend})"), lambda: packed.dequantize(),
                    check_values),
            measure(timer, ud_row(EAGER),
                    lambda: ct.torch_unpack_dequantize(ref_packed, bits, n, levels, KIND,
                                                       torch.float32),
                    check_values),
        ]
        if not skip_compile:
            ud_compiled = compiled(ct.torch_unpack_dequantize)
            section.append(measure(timer, ud_row(COMPILED),
                                   lambda: ud_compiled(ref_packed, bits, n, levels, KIND,
                                                       torch.float32),
                                   check_values))
        section.append(measure(timer, ud_row("separate: discrnn.unpack + torch decode"),
                               lambda: separate_decode(discrnn.unpack(packed.data, bits, n),
                                                       levels),
                               check_values))
        section.append(Row(UD, COPY, bits, n, copy.bytes_moved, copy.ms))
        finish(section, EAGER, copy)
        rows += section
        del ref_packed, ref_values, packed
    return rows, copy


def bench_pack6_cpu(n: int, timer: Timer, seed: int) -> list[Row]:
    """6-bit pack / unpack of uint8 codes on the CPU, beside BASELINES.md's dense torch row."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 64, (n,), dtype=torch.uint8, generator=gen)
    nbytes = (n * 6 + 7) // 8
    ref = dense_pack6(codes)
    copy_codes = measure(timer, Row(PACK, "copy codes (clone uint8)", 6, n, 2 * n),
                         lambda: codes.clone())

    pack_rows = [
        measure(timer, Row(PACK, "discrnn.pack (torch, checks codes)", 6, n, n + nbytes),
                lambda: discrnn.pack(codes, 6), lambda out: compare(out, ref)),
        measure(timer, Row(PACK, "codec_torch.torch_pack (no checks)", 6, n, n + nbytes),
                lambda: ct.torch_pack(codes, 6), lambda out: compare(out, ref)),
        measure(timer, Row(PACK, DENSE, 6, n, n + nbytes),
                lambda: dense_pack6(codes)),
        copy_codes,
    ]
    # BASELINES.md lists the float -> 6-bit code quantizer beside the packers; time it here too.
    x = torch.empty(n, dtype=torch.float32).uniform_(-1.05, 1.05, generator=gen)
    pack_rows.append(measure(timer, Row(PACK, "torch quantize float->code (no pack)", 6, n, 5 * n),
                             lambda: separate_quantize(x, 64)))
    finish(pack_rows, DENSE, copy_codes)

    unpack_rows = [
        measure(timer, Row(UNPACK, "discrnn.unpack (torch)", 6, n, nbytes + n),
                lambda: discrnn.unpack(ref, 6, n), lambda out: compare(out, codes)),
        measure(timer, Row(UNPACK, DENSE, 6, n, nbytes + n),
                lambda: dense_unpack6(ref), lambda out: compare(out, codes)),
        Row(UNPACK, copy_codes.impl, 6, n, copy_codes.bytes_moved, copy_codes.ms),
    ]
    finish(unpack_rows, DENSE, copy_codes)
    return pack_rows + unpack_rows
