"""Every (kernel, constexpr) combination the launchers in discrnn.kernels.codec and
discrnn.kernels.rnn can produce, so the compile test can build them for real GPU targets without a
GPU. ``levels`` takes any value in [2, 256]: the codec specs sample one per bit width, the rnn specs
the values in ``RNN_LEVELS`` (it only changes folded constants)."""

from __future__ import annotations

import itertools

import triton

from discrnn._validation import default_bits
from discrnn.kernels import codec
from discrnn.kernels import rnn
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
    # As the launcher picks them on a GPU: the tuned block and grouped read where CUDA_LAUNCH has one
    _, tuned_block, _, grouped = codec.CUDA_LAUNCH.get(bits, (4, block, 4, False))
    g_bytes = group_bytes(bits)
    signature = {"PACKED": "*u8", "DY": f"*{dy_ty}", "OUT": f"*{out_ty}", "n": "i64", "n_bytes": "i64"}
    constexprs = dict(LEVELS=levels, BITS=bits, KIND=kind, OUTPUT=output, BLOCK=tuned_block,
                      GROUPED=grouped, GROUP_CODES=group_codes(bits), GROUP_BYTES=g_bytes,
                      GROUP_BYTES_POW2=triton.next_power_of_2(g_bytes))
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
    specs += rnn_kernel_specs(full)
    return specs


# ---------------------------------------------------------------------------------------------
# Recurrent step kernels (discrnn.kernels.rnn). Their constexprs are LEVELS, BITS (the code width:
# the layers' default_bits(levels), or 8 for unpacked uint8 codes), the forward kernels' packing
# switches, and the GPU tile (BLOCK_B, BLOCK_H); the float pointer dtypes vary as listed below.

RNN_LEVELS = (2, 64, 256, 3, 100, 255)  # both ends, powers of two and odd counts
CELL_CLIPS = (8.0, float("inf"))
ACC_DTYPES = ("fp32", "fp64")


def _rnn_kernels():
    """(name, kernel, [dtype combos], signature builder, code role, grad="exact" switch or None). Integers are i32 as
    launched (code offsets i64: a code store can pass 2 GiB); pointer dtypes: the LSTM gates take
    any float dtype with an fp32/fp64 cell state and write m in the gates' dtype (the layer's
    output rows); the GRU forward takes one dtype for gx, gh, h_prev and writes h in it; the
    output kernel writes any float dtype; the LSTM backward reads dm and writes the rounded
    dgates (HAS_DG_LOW), the GRU backward the rounded dgh (HAS_DGH_LOW), in bf16 / fp16 for such a
    layer's products (and reads that product back, HAS_DH_ADD); the rest are in the compute dtype
    (the launchers convert other inputs first)."""
    dtypes = list(TRITON_DTYPES.values())

    def ints(*names):
        return {n: "i32" for n in names}

    def strides(*prefixes):
        return [f"stride_{p}{axis}" for p in prefixes for axis in "bh"]

    codes = {"CODES": "*u8", "code_offset": "i64"}
    code_strides = ["stride_kq", "stride_kb"]
    return [
        ("lstm_fwd", rnn._lstm_step_fwd_kernel, list(itertools.product(dtypes, ACC_DTYPES)),
         lambda g, a: {"GATES": f"*{g}", "C_PREV": f"*{a}", **codes, "FINAL": "*u8", "C": f"*{a}",
                       "M": f"*{g}", **ints("bs", "H", "H_PAD", "done", *strides("g", "c"),
                                            *code_strides, "stride_fq")}, "forward", None),
        # m_out of the cell kernel: any float dtype (the next layer's input rows, or acc)
        ("lstm_cell", rnn._lstm_cell_kernel, [(a, m) for a in ACC_DTYPES for m in dtypes if
                                              a == "fp64" or m != "fp64"],
         lambda a, m: {**codes, "C_PREV": f"*{a}", "C": f"*{a}", "M": f"*{m}",
                       **ints("bs", "H", *code_strides, *strides("c"), "n_steps")}, None,
         "STORE_M"),
        ("lstm_out", rnn._output_kernel, [(d,) for d in dtypes],
         lambda d: {**codes, "C": "*fp64" if d == "fp64" else "*fp32", "OUT": f"*{d}",
                    **ints("bs", "H", *code_strides, *strides("c"))}, "lstm", None),
        ("gru_out", rnn._output_kernel, [(d,) for d in dtypes],
         lambda d: {**codes, "C": f"*{d}", "OUT": f"*{d}",
                    **ints("bs", "H", *code_strides, *strides("c"))}, "gru", None),
        # dm and the rounded dgates of a bf16 / fp16 backward product (HAS_DG_LOW) in that dtype
        ("lstm_bwd", rnn._lstm_step_bwd_kernel,
         [(a, a) for a in ACC_DTYPES] + [("fp32", "bf16"), ("fp32", "fp16")],
         lambda a, low: {**codes, "C_PREV": f"*{a}", "DM": f"*{low}", "DY": f"*{a}", "DC": f"*{a}",
                         "DGATES": f"*{a}", "DC_PREV": f"*{a}", "DG_LOW": f"*{low}",
                         "PRE": f"*{a}",
                         **ints("bs", "H", *code_strides, *strides("c", "m", "y", "d", "p"))},
         None, "EXACT"),
        ("gru_fwd", rnn._gru_step_fwd_kernel, [(d,) for d in dtypes],
         lambda d: {"GX": f"*{d}", "GH": f"*{d}", "B_HH": f"*{d}", "H_PREV": f"*{d}", **codes,
                    "FINAL": "*u8", "H_OUT": f"*{d}", "PRE": "*fp64" if d == "fp64" else "*fp32",
                    **ints("bs", "H", "H_PAD", "done", *strides("x", "g", "p"), *code_strides)},
         "forward", "STORE_PRE"),
        # the rounded dgh of a bf16 / fp16 backward product (HAS_DGH_LOW) in that dtype
        ("gru_bwd", rnn._gru_step_bwd_kernel,
         [(a, a) for a in ACC_DTYPES] + [("fp32", "bf16"), ("fp32", "fp16")],
         lambda a, low: {**codes, "H_PREV": f"*{a}", "GH_N": f"*{a}", "DH": f"*{a}",
                         "DY": f"*{a}", "DH_ADD": f"*{low}", "DGX": f"*{a}", "DGH": f"*{a}",
                         "DH_DIRECT": f"*{a}", "DGH_LOW": f"*{low}", "PRE": f"*{a}",
                         **ints("bs", "H", *code_strides, *strides("p", "n", "d", "e", "y"),
                                "add_rows", *strides("a"))},
         None, "EXACT"),
    ]


def _code_constexprs(role, levels: int, k: int) -> list[dict]:
    """Code constexprs of one spec: packed codes (the layers), and for forward kernels also the
    unpacked form and a launch that keeps no codes (inference), alternating with ``k``."""
    bits = default_bits(levels)
    if role is None:
        return [dict(BITS=bits)]
    if role in ("lstm", "gru"):
        return [dict(BITS=bits, CELL=role)]
    out = []
    for store_codes, store_final, b in ((True, True, bits), (True, False, 8), (False, True, 8)):
        if k and (store_codes, b) != (True, bits):
            continue  # the cover keeps the unpacked and no-code launches once per kernel
        out.append(dict(BITS=b, GROUP_CODES=group_codes(b),
                        GROUP_BYTES_POW2=triton.next_power_of_2(group_bytes(b)),
                        STORE_CODES=store_codes, STORE_FINAL=store_final))
    return out


def rnn_kernel_specs(full: bool):
    """``full``: every dtype combination x GPU tile x level count of RNN_LEVELS. Otherwise a cover in
    which every dtype combination, every tile and every level count appear at least once."""
    tiles = rnn.GPU_TILE.shapes()
    specs = []
    for name, kernel, dtype_combos, signature, role, switch in _rnn_kernels():
        if full:
            combos = list(itertools.product(dtype_combos, tiles, RNN_LEVELS))
        else:
            n = max(len(dtype_combos), len(tiles), len(RNN_LEVELS))
            combos = [(dtype_combos[k % len(dtype_combos)], tiles[k % len(tiles)],
                       RNN_LEVELS[k % len(RNN_LEVELS)]) for k in range(n)]
        for k, (dts, (block_b, block_h), levels) in enumerate(combos):
            # the grad="exact" switch: both values in the full product, alternating in the cover
            grad_modes = [{}] if switch is None else (
                [{switch: False}, {switch: True}] if full else [{switch: bool(k % 2)}])
            # the LSTM cell bound: the layers' default, and inf (no clamp) in the step functions
            clips = [{}] if not name.startswith("lstm_") or name == "lstm_out" else (
                [{"CELL_CLIP": c} for c in CELL_CLIPS] if full else [{"CELL_CLIP": CELL_CLIPS[k % 2]}])
            # backward kernels: the output gradient added in the kernel, or not
            if name.endswith("_bwd"):
                dys = [True, False] if full else [k % 3 != 1]
                clips = [{**c, "HAS_DY": d} for c in clips for d in dys]
            if name == "gru_fwd":  # b_hh added in the kernel, or already in gh
                biases = [True, False] if full else [k % 2 == 0]
                clips = [{**c, "HAS_BIAS": b} for c in clips for b in biases]
            if name in ("lstm_bwd", "gru_bwd"):  # a bf16 / fp16 layer's backward product
                lows = ["HAS_DG_LOW"] if name == "lstm_bwd" else ["HAS_DGH_LOW", "HAS_DH_ADD"]
                clips = [{**c, **{low: dts[1] != dts[0] for low in lows}} for c in clips]
            for code, grad, clip in itertools.product(
                    _code_constexprs(role, levels, 0 if full else k), grad_modes, clips):
                constexprs = dict(LEVELS=levels, **code, **grad, **clip, BLOCK_B=block_b,
                                  BLOCK_H=block_h)
                tag = f"b{code['BITS']}" + ("" if code.get("STORE_CODES", True) else "-nocodes")
                tag += "" if code.get("STORE_FINAL", True) else "-nofinal"
                tag += ("-m" if switch == "STORE_M" else "-exact") if any(grad.values()) else ""
                tag += f"-clip{clip['CELL_CLIP']}" if "CELL_CLIP" in clip else ""
                tag += "-dy" if clip.get("HAS_DY") else ""
                tag += "-dglow" if clip.get("HAS_DG_LOW") or clip.get("HAS_DGH_LOW") else ""
                tag += "-bias" if clip.get("HAS_BIAS") else ""
                specs.append((f"rnn_{name}-{'-'.join(dts)}-L{levels}-{tag}-{block_b}x{block_h}",
                              kernel, signature(*dts), constexprs))
    return specs
