"""discrnn's main job, for now: a tour of the codecs.

Values in (a tanh-bounded tensor, like an RNN's hidden state), packed bytes out, the memory saved
and the error measured, for several level counts; then a discrete unit forward and backward.

    python scripts/demo_codec.py [--numel N] [--device cpu|cuda] [--out results/demo_codec.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import torch

import discrnn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 22, help="values to encode (default 2^22)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/demo_codec.csv")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print("Golden example of the bit layout: 6-bit codes [1, 2, 3, 63] ->",
          [hex(b) for b in discrnn.pack(torch.tensor([1, 2, 3, 63], dtype=torch.uint8), 6).tolist()])

    x = torch.tanh(torch.randn(args.numel, device=device) * 1.5)  # a hidden-state-like tensor
    dense = x.numel() * x.element_size()
    backend = "triton" if device.type == "cuda" else "torch"
    print(f"\n{args.numel} float32 values in [-1, 1] on {device} ({backend} backend): "
          f"{dense / 2**20:.1f} MiB dense\n")
    header = ["levels", "bits", "packed_MiB", "saved_pct", "max_abs_err", "rms_err",
              "half_spacing", "pack_ms", "unpack_ms"]
    print("{:>6} {:>4} {:>10} {:>9} {:>11} {:>9} {:>12} {:>8} {:>9}".format(*header))
    rows = []
    for levels in (256, 128, 64, 16, 4, 2):
        discrnn.quantize_pack(x[:1024], levels)  # warm-up (compiles the kernel on a GPU)
        _sync(device)
        t0 = time.perf_counter()
        packed = discrnn.quantize_pack(x, levels)
        _sync(device)
        t1 = time.perf_counter()
        back = packed.dequantize()
        _sync(device)
        t2 = time.perf_counter()
        err = (back - x).abs()
        row = [levels, packed.bits, packed.nbytes / 2**20, 100 * (1 - packed.nbytes / dense),
               float(err.max()), float(err.pow(2).mean().sqrt()), 1 / (levels - 1),
               1e3 * (t1 - t0), 1e3 * (t2 - t1)]
        # rounding to the nearest level never errs by more than half a spacing (2/(L-1) / 2)
        assert row[4] <= row[6] + 1e-6
        rows.append(row)
        print("{:>6} {:>4} {:>10.2f} {:>8.1f}% {:>11.5f} {:>9.5f} {:>12.5f} {:>8.1f} {:>9.1f}".format(*row))
    print(f"\nexample object: {packed}")

    # A discrete unit keeps only packed codes for backward in grad="code" mode.
    pre = torch.randn(4, 1024, device=device, requires_grad=True)
    unit = discrnn.DiscreteTanh(64, grad="code")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = unit(pre)
    y.sum().backward()
    kept = sum(t.numel() * t.element_size() for t in saved)
    print(f"\n{unit} on a {tuple(pre.shape)} input: output levels {y.unique().numel()}, "
          f"kept for backward {kept} bytes ({kept / pre.numel():.2f} B/value, float32 input is 4)")

    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["device", "numel"] + header)
            for row in rows:
                writer.writerow([str(device), args.numel] + row)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
