"""Train the character-level language model of ``train_char_lm.py`` with variants of the discrete LSTM
cell, to choose its definition by measurement (the record behind DiscreteLSTM's clamp and its
derivative of the cell output; see the README).

The cell is written step by step in plain autograd (one layer, slow, everything kept), so that a
variant is a flag rather than a kernel. With ``--gate-grid standard --u-grad exact --cell-clip C`` it
is DiscreteLSTM(levels, cell_clip=C) (same forward and gradients to rounding; tested in
``tests/test_train_char_lm.py``).

* ``--gate-grid standard``: sigmoid levels k / (L - 1), k = 0..L-1 (top level exactly 1, as
  ``discrete_sigmoid``); ``below-one``: levels k / L (top level 1 - 1/L, as integer LSTMs of
  inference engines hold gates in [0, 1)), which bounds |c| by L - 1 without a clamp.
* ``--u-grad code``: the derivative of u = discrete_tanh(c) is the bin mean of its code (what the
  layers did before); ``exact``: tanh'(c), which fades as |c| grows.
* ``--cell-clip C``: c = clamp(f c + i g, -C, C); ``none``: no clamp.

Gates always use the code rule (bin means). Usage::

    python scripts/lstm_cell_variants.py --levels 16 --gate-grid standard --u-grad exact --cell-clip 8
    python scripts/lstm_cell_variants.py --levels 16 --u-grad code --cell-clip none   # the old cell

Every flag of ``train_char_lm.py`` applies; rows go to ``results/lstm_cell_variants.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_char_lm  # noqa: E402


def sigmoid_code_derivative(k, levels, span):
    """Mean of s - s^2 over the outputs that round to level k / span (clipped to [0, 1])."""
    c = k / span
    half = 0.5 / span
    lo = torch.where(k == 0, torch.zeros_like(c), c - half)
    hi = torch.where(k == levels - 1, torch.ones_like(c), c + half)
    return 0.5 * (lo + hi) - (hi * hi + hi * lo + lo * lo) / 3


def tanh_code_derivative(k, levels):
    """Mean of 1 - t^2 over the outputs that round to the tanh level of k."""
    c = (2 * k - (levels - 1)) / (levels - 1)
    half = 1.0 / (levels - 1)
    lo, hi = (c - half).clamp(min=-1.0), (c + half).clamp(max=1.0)
    return 1 - (hi * hi + hi * lo + lo * lo) / 3


class Gates(torch.autograd.Function):
    """Pre-activations [B, 4H] -> levels of i, f, g, o; straight-through with the bin-mean rule."""

    @staticmethod
    def forward(ctx, pre, levels, span):
        B, H4 = pre.shape
        p = pre.view(B, 4, H4 // 4)
        k = torch.clamp(torch.floor(torch.sigmoid(p) * span + 0.5), 0, levels - 1)
        value, deriv = k / span, sigmoid_code_derivative(k, levels, span)
        k_g = torch.clamp(torch.floor((torch.tanh(p[:, 2]) + 1) * (levels - 1) / 2 + 0.5), 0, levels - 1)
        value[:, 2] = (2 * k_g - (levels - 1)) / (levels - 1)
        deriv[:, 2] = tanh_code_derivative(k_g, levels)
        ctx.save_for_backward(deriv)
        return value.view(B, H4)

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors
        return grad * deriv.view_as(grad), None, None


class CellOutput(torch.autograd.Function):
    """u = discrete_tanh(c); derivative the bin mean of u's code ("code") or tanh'(c) ("exact")."""

    @staticmethod
    def forward(ctx, c, levels, rule):
        t = torch.tanh(c)
        k = torch.clamp(torch.floor((t + 1) * (levels - 1) / 2 + 0.5), 0, levels - 1)
        ctx.save_for_backward(tanh_code_derivative(k, levels) if rule == "code" else 1 - t * t)
        return (2 * k - (levels - 1)) / (levels - 1)

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors
        return grad * deriv, None, None


class VariantLSTM(nn.LSTM):
    """One-layer, batch-first LSTM with the parameters of torch.nn.LSTM and a discrete cell variant."""

    def __init__(self, input_size, hidden_size, levels, gate_grid, u_grad, cell_clip):
        super().__init__(input_size, hidden_size, batch_first=True)
        self.levels, self.u_grad, self.cell_clip = levels, u_grad, cell_clip
        self.span = levels if gate_grid == "below-one" else levels - 1

    def forward(self, x, state=None):
        B, T, _ = x.shape
        H, L = self.hidden_size, self.levels
        if state is None:
            h, c = x.new_zeros(B, H), x.new_zeros(B, H)
        else:
            h, c = state[0][0], state[1][0]
        xproj = x @ self.weight_ih_l0.t() + self.bias_ih_l0 + self.bias_hh_l0
        ys = []
        for t in range(T):
            gates = Gates.apply(torch.addmm(xproj[:, t], h, self.weight_hh_l0.t()), L, self.span)
            i, f, g, o = gates.chunk(4, 1)
            c = f * c + i * g
            if self.cell_clip is not None:
                c = c.clamp(-self.cell_clip, self.cell_clip)
            h = o * CellOutput.apply(c, L, self.u_grad)
            ys.append(h)
        return torch.stack(ys, 1), (h[None], c[None])


def parse_clip(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def describe(gate_grid: str, u_grad: str, cell_clip: float | None) -> str:
    clamp = "no clamp" if cell_clip is None else f"clamp {cell_clip:g}"
    u = "tanh'(c)" if u_grad == "exact" else "bin-mean u"
    return f"{gate_grid} gates, {u}, {clamp}"


def main(argv=None) -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--gate-grid", choices=("standard", "below-one"), default="standard")
    own.add_argument("--u-grad", choices=("code", "exact"), default="exact")
    own.add_argument("--cell-clip", type=parse_clip, default=8.0, help="a float, or 'none' for no clamp")
    variant, rest = own.parse_known_args(argv)
    parser = train_char_lm.build_parser()
    parser.set_defaults(csv="results/lstm_cell_variants.csv")
    args = parser.parse_args(rest)
    if args.rnn != "lstm" or args.levels is None or args.layers != 1:
        raise SystemExit("lstm_cell_variants.py trains one discrete LSTM layer: --rnn lstm, "
                         "--levels N, --layers 1")
    clip = variant.cell_clip

    def make_rnn(kind, levels, embed, hidden, layers, grad, backend, cell_clip=None):
        return VariantLSTM(embed, hidden, levels, variant.gate_grid, variant.u_grad, clip)

    train_char_lm.make_rnn = make_rnn
    result = train_char_lm.run(args)
    result.update(layer="VariantLSTM", grad="code", cell_clip=clip,
                  variant=describe(variant.gate_grid, variant.u_grad, clip))
    train_char_lm.save(result, args)


if __name__ == "__main__":
    main()
