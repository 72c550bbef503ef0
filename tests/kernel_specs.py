"""Every (kernel, constexpr) combination the launchers in discrnn.kernels.codec can produce, so the
compile test can build them for real GPU targets without a GPU."""

from __future__ import annotations

import itertools

import triton

from discrnn.kernels import codec
from discrnn.kernels.codec_torch import group_bytes, group_codes

TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
KINDS = ("tanh", "sigmoid")
BITS = tuple(range(1, 9))


def _quantize_pack(x_ty, y_ty, bits, levels, kind, input_kind, write_packed, write_values, block):
    g_codes, g_bytes = group_codes(bits), group_bytes(bits)
    signature = {"X": f"*{x_ty}", "PACKED": "*u8", "Y": f"*{y_ty}", "n": "i64", "n_bytes": "i64"}
    constexprs = dict(
        LEVELS=levels, BITS=bits, KIND=kind, INPUT=input_kind, WRITE_PACKED=write_packed,
        WRITE_VALUES=write_values, GROUP_CODES=g_codes, GROUP_BYTES=g_bytes,
        GROUP_BYTES_POW2=triton.next_power_of_2(g_bytes),
        BLOCK_GROUPS=triton.next_power_of_2(max(1, block // g_codes)),
    )
    return codec._quantize_pack_kernel, signature, constexprs


def _unpack(out_ty, dy_ty, bits, levels, kind, output, block):
    signature = {"PACKED": "*u8", "DY": f"*{dy_ty}", "OUT": f"*{out_ty}", "n": "i64", "n_bytes": "i64"}
    constexprs = dict(LEVELS=levels, BITS=bits, KIND=kind, OUTPUT=output, BLOCK=block)
    return codec._unpack_kernel, signature, constexprs


def kernel_specs(full: bool):
    """(name, kernel, signature, constexprs). ``full`` gives the whole cross product; otherwise a
    covering subset in which every value of every constexpr and dtype appears at least once."""
    block = 4096  # the GPU default
    specs = []
    for bits in BITS:  # pack
        specs.append((f"pack-b{bits}", *_quantize_pack("u8", "u8", bits, 2, "tanh", "codes", True, False, block)))
        specs.append((f"unpack-codes-b{bits}", *_unpack("u8", "u8", bits, 2, "tanh", "codes", block)))
    dtypes = list(TRITON_DTYPES.values())
    if full:
        combos = itertools.product(dtypes, KINDS, BITS)
    else:  # each dtype with each kind at one width, and each width once
        combos = [(d, k, 6) for d in dtypes for k in KINDS]
        combos += [("fp32", KINDS[b % 2], b) for b in BITS if b != 6]
    for dt, kind, bits in combos:
        levels = 1 << bits
        for input_kind in ("values", "preactivation"):
            specs.append((f"quantize_pack-{input_kind}-{dt}-{kind}-b{bits}",
                          *_quantize_pack(dt, dt, bits, levels, kind, input_kind, True, False, block)))
        for write_packed in (True, False):  # the discrete unit's forward
            specs.append((f"unit_fwd-{dt}-{kind}-b{bits}-packed{int(write_packed)}",
                          *_quantize_pack(dt, dt, bits, levels, kind, "preactivation", write_packed, True, block)))
        for output in ("values", "grad"):
            specs.append((f"unpack-{output}-{dt}-{kind}-b{bits}",
                          *_unpack(dt, dt, bits, levels, kind, output, block)))
    return specs
