#!/usr/bin/env python
"""Launch-shape and layout experiments for the 6- and 7-bit codec kernels on a GPU.

bench_codec.py measured, on one H200 (2^28 float32 values): quantize+pack at 75% of a float32 copy's
bandwidth for 6 and 7 bits against 103% for 8 bits, unpack+dequantize at 62-66% against 93%. 8 bits
differs in its bytes: one per code, stored and loaded whole. For 6 and 7 bits the production kernels
store 3 (7) bytes of every 4 (8) lanes one byte at a time, and the unpack gathered two single bytes
per code. This script times the kernels under block sizes and warp counts, and the unpack with both
of its reads: ``two_bytes`` (per code) and ``grouped`` (the pack's group layout read backwards:
[groups, bytes] tiles, one word per group, [groups, G] values out), which it measured at 94% / 86%
of the copy for 6 / 7 bits and which the launchers now use (``CUDA_LAUNCH``). An output-stationary
pack (a program owns a run of output bytes and loads the values whose bits fall in each) was also
tried and reached only 36-44%; it was dropped. The 7-bit pack stayed at 78.7 %; ``words`` is a 7-bit
pack that stores 8-byte words instead of single bytes (``_pack7_words_kernel``: each word from two
neighbouring 56-bit groups), bit-exact under the interpreter and compiled for sm_90 / sm_80, not yet
timed on a GPU.

Every variant is checked bit for bit against the production kernel on the same input before it is
timed (``triton.testing.do_bench`` median). Prints a table and writes a CSV (``--out``).

    python scripts/tune_codec.py --out results/tune_codec.csv      # on a CUDA machine
    TRITON_INTERPRET=1 python scripts/tune_codec.py --check-only    # correctness on the CPU
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from discrnn.kernels import codec as K
from discrnn.kernels.codec_torch import group_bytes, group_codes

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def production_pack(x, levels, bits, block_codes, num_warps):
    n = x.numel()
    n_bytes = (n * bits + 7) // 8
    packed = torch.empty(n_bytes, dtype=torch.uint8, device=x.device)
    g = group_codes(bits)
    block_groups = triton.next_power_of_2(max(1, block_codes // g))
    gb = group_bytes(bits)
    K._quantize_pack_kernel[(triton.cdiv(triton.cdiv(n, g), block_groups),)](
        x, packed, x, n, n_bytes, LEVELS=levels, BITS=bits, KIND="tanh", INPUT="values",
        WRITE_PACKED=True, WRITE_VALUES=False, GROUP_CODES=g, GROUP_BYTES=gb,
        GROUP_BYTES_POW2=triton.next_power_of_2(gb), BLOCK_GROUPS=block_groups,
        num_warps=num_warps, enable_fp_fusion=False)
    return packed


@triton.jit
def _group_words(X, group, n, LEVELS: tl.constexpr):
    """The 56-bit word of each 7-bit group index in ``group`` ([BS, 8]): its 8 codes, code j at
    bits 7j, as the production pack lays them out; codes past ``n`` are 0."""
    lanes = tl.arange(0, 8)
    idx = group[:, :, None] * 8 + lanes[None, None, :]  # [BS, 8, 8] code index of every lane
    x = tl.load(X + idx, mask=idx < n, other=0.0).to(tl.float32)
    code = tl.where(idx < n, K._encode(x, LEVELS, "tanh"), 0)
    return tl.sum(code.to(tl.int64) << (lanes * 7).to(tl.int64)[None, None, :], axis=2)


@triton.jit
def _pack7_words_kernel(X, WORDS, n, n_words, LEVELS: tl.constexpr, BLOCK_SG: tl.constexpr):
    """7-bit quantize+pack storing 8-byte words: a super-group of 8 groups (64 codes) is 56 bytes,
    7 words; word k holds group k's bits from 8k on and group k+1's first 8k bits, so each word
    is (G_k >> 8k) | (G_{k+1} << (56 - 8k)). G_{k+1} is computed again from its codes (Triton has
    no shift along an axis), loads of lines the first pass brought into L1."""
    sg = tl.program_id(0).to(tl.int64) * BLOCK_SG + tl.arange(0, BLOCK_SG)  # [BS]
    k = tl.arange(0, 8).to(tl.int64)  # word lanes, 7 of 8 used
    group = sg[:, None] * 8 + k[None, :]  # [BS, 8]
    g = _group_words(X, group, n, LEVELS)
    g_next = _group_words(X, group + 1, n, LEVELS)
    word = (g >> (8 * k)[None, :]) | (g_next << (56 - 8 * k)[None, :])
    w_idx = sg[:, None] * 7 + k[None, :]
    tl.store(WORDS + w_idx, word, mask=(k[None, :] < 7) & (w_idx < n_words))


def words_pack7(x, levels, block_codes, num_warps):
    """quantize+pack at 7 bits through ``_pack7_words_kernel``: the production bytes, written as
    8-byte words into a buffer padded to whole words (the first ceil(7n/8) bytes are compared)."""
    n = x.numel()
    n_bytes = (n * 7 + 7) // 8
    n_words = (n_bytes + 7) // 8
    words = torch.empty(n_words, dtype=torch.int64, device=x.device)
    block_sg = triton.next_power_of_2(max(1, block_codes // 64))
    _pack7_words_kernel[(triton.cdiv(triton.cdiv(n, 64), block_sg),)](
        x, words, n, n_words, LEVELS=levels, BLOCK_SG=block_sg, num_warps=num_warps,
        enable_fp_fusion=False)
    return words.view(torch.uint8)[:n_bytes]


def production_unpack(packed, n, levels, bits, block_codes, num_warps, grouped):
    """The unpack kernel with the grouped read, or two bytes a code (what 6 and 7 bits used
    before this script)."""
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    gb = group_bytes(bits)
    K._unpack_kernel[(triton.cdiv(n, block_codes),)](
        packed, out, out, n, packed.numel(), LEVELS=levels, BITS=bits, KIND="tanh",
        OUTPUT="values", BLOCK=block_codes, GROUPED=grouped, GROUP_CODES=group_codes(bits),
        GROUP_BYTES=gb, GROUP_BYTES_POW2=triton.next_power_of_2(gb), num_warps=num_warps,
        enable_fp_fusion=False)
    return out


def median_ms(fn) -> float:
    # do_bench returns a bare float for a single quantile on some triton versions, a list on others
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=None, help="default 2^28 on CUDA, 10007 otherwise")
    p.add_argument("--bits", type=int, nargs="+", default=[6, 7])
    p.add_argument("--blocks", type=int, nargs="+", default=[4096, 16384], help="codes per program")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--check-only", action="store_true", help="bit-exactness only, no timing")
    p.add_argument("--out", type=Path, default=Path("results/tune_codec.csv"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not INTERPRETING
    device = torch.device("cuda" if cuda else "cpu")
    n = args.numel or ((1 << 28) if cuda else 10007)
    big = 65536 if INTERPRETING else None
    torch.manual_seed(0)
    x = torch.rand(n, device=device) * 2.2 - 1.1  # past both ends: the clamps run too
    copy_ms = None
    if not args.check_only:
        copy_ms = median_ms(lambda: x.clone())
    rows = []
    for bits in args.bits:
        levels = 1 << bits
        want = production_pack(x, levels, bits, big or 4096, 4)
        want_values = production_unpack(want, n, levels, bits, big or 4096, 4, False)
        variants = []
        for block in ([big] if big else args.blocks):
            for warps in ([4] if big else args.warps):
                variants += [
                    ("pack", "production", block, warps,
                     lambda b=block, w=warps: production_pack(x, levels, bits, b, w)),
                    ("unpack", "two_bytes", block, warps,
                     lambda b=block, w=warps: production_unpack(want, n, levels, bits, b, w, False)),
                    ("unpack", "grouped", block, warps,
                     lambda b=block, w=warps: production_unpack(want, n, levels, bits, b, w, True)),
                ]
                if bits == 7:  # the pack below 85 % of a copy on the H200: 8-byte word stores
                    variants.append(("pack", "words", block, warps,
                                     lambda b=block, w=warps: words_pack7(x, levels, b, w)))
        for op, name, block, warps, fn in variants:
            try:
                got = fn()
                exact, error = torch.equal(got, want if op == "pack" else want_values), ""
            except Exception as exc:  # noqa: BLE001 - one variant that fails to build or run
                exact, error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            row = {"bits": bits, "op": op, "kernel": name, "block": block, "num_warps": warps,
                   "exact": exact, "ms": None, "pct_copy": None, "error": error}
            if exact and not args.check_only:
                ms = median_ms(fn)
                moved = n * 4 + n * bits / 8
                row["ms"] = round(ms, 4)
                row["pct_copy"] = round(100 * (moved / ms) / (2 * n * 4 / copy_ms), 1)
            rows.append(row)
            print(f"{bits} bits {op:6} {name:14} block {block:6} warps {warps}: "
                  f"{'exact' if exact else 'ERROR ' + error if error else 'MISMATCH'}"
                  + (f", {row['ms']:.4f} ms, {row['pct_copy']:.1f}% of copy" if row["ms"] else ""),
                  flush=True)
    if copy_ms is not None:
        print(f"float32 copy of {n} values: {copy_ms:.4f} ms on {torch.cuda.get_device_name()}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
