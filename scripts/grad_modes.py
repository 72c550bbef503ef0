"""What does the ``grad="code"`` straight-through estimate cost against ``grad="exact"``?

``discrete_tanh(x, L)`` snaps tanh(x) to L levels; its backward passes the gradient straight
through the rounding, scaled by an estimate of tanh'. Three estimates are compared, plus plain tanh:

* ``tanh``  -- continuous tanh, no discretisation (the baseline; independent of L).
* ``exact`` -- ``grad="exact"``: tanh'(x) at the pre-activation (keeps x for backward).
* ``code``  -- ``grad="code"``: mean of tanh' over the bin of outputs that round to the level
  (keeps only the packed level codes, ceil(log2 L) bits per unit).
* ``naive`` -- 1 - y^2 at the snapped output y, defined locally below. It also needs only the
  level, but is 0 at the end levels +-1, hence 0 everywhere at L = 2. It is here to show why the
  library uses the bin mean instead.

Two small deterministic tasks, trained with Adam for a fixed number of steps:

* ``mlp``: two-class 2-D spirals, MLP 2 -> 64 -> 64 -> 1 with the unit under test as activation.
* ``rnn``: delayed recall, random +-1 bits, predict the bit from ``--delay`` (8) steps back at
  every step t >= delay of a T = 20 sequence; vanilla RNN h_t = act(W x_t + U h_{t-1}), 32 units.
  Continuous tanh gets to ~93% in 100 steps; the gradient has to carry 8 steps back through the
  unit, so a biased estimate compounds.

For each seed every mode starts from the same initial weights and sees the same minibatches, so
differences between the three discrete modes at one L come from the gradient estimate alone.
Reported per (task, L, mode), mean +- std over seeds: final loss on the whole training set,
held-out loss and accuracy, and ``grad cos``: the cosine between the mode's full-batch gradient
and the ``exact`` one at the same weights, over the parameters below the units (1 for exact by
definition; 0 where the estimate is all zero; not defined for continuous tanh, whose forward pass
differs), taken at initialisation and at the weights the mode's own training ended at.

Chance accuracy is 0.5 on both tasks; a loss of ln 2 = 0.693 is a constant prediction.

Usage::

    python scripts/grad_modes.py              # default, about 2-2.5 minutes on 2 CPU cores
    python scripts/grad_modes.py --quick      # smoke run, well under 30 s
    python scripts/grad_modes.py --seeds 5 --steps 1000 --rnn-steps 300 --out results/x.csv
    python scripts/grad_modes.py --tasks mlp --levels 2 256

The CSV (``--out``) holds one row per (task, L, mode, seed), with the training loop's wall time;
the printed table is its summary.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from discrnn import discrete_tanh

LEVELS = (2, 4, 8, 16, 64, 256)
MODES = ("tanh", "exact", "code", "naive")


class NaiveLevelTanh(torch.autograd.Function):
    """Same forward as ``discrete_tanh``; backward uses tanh' = 1 - y^2 at the snapped output y."""

    @staticmethod
    def forward(ctx, x, levels):
        y = discrete_tanh(x, levels)  # autograd is off inside forward: only the value is used
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * (1.0 - y * y), None


def make_activation(mode: str, levels: int | None):
    if mode == "tanh":
        return torch.tanh
    if mode == "naive":
        return lambda x: NaiveLevelTanh.apply(x, levels)
    return lambda x: discrete_tanh(x, levels, grad=mode)


# ----------------------------------------------------------------------------------------------
# Tasks. Each provides a fixed dataset (independent of the seed, so every seed and mode is scored
# on the same data), a model factory, and a loss / accuracy on a batch.


def spirals(n: int, generator: torch.Generator, turns: float = 1.5, noise: float = 0.08):
    """Two interleaved spirals in roughly [-1, 1]^2; label = which spiral.

    1.5 turns: continuous tanh gets to ~92% in 400 steps, short of perfect, so a worse gradient
    estimate shows up in the numbers instead of being hidden by every mode saturating."""
    label = torch.randint(0, 2, (n,), generator=generator)
    r = torch.rand(n, generator=generator)  # the radius in [0, 1] also sets the angle
    theta = r * (2 * math.pi * turns) + label * math.pi
    x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
    x = x + noise * torch.randn(n, 2, generator=generator)
    return x, label.float()


class MLP(nn.Module):
    def __init__(self, act, hidden: int = 64):
        super().__init__()
        self.act = act
        self.l1, self.l2 = nn.Linear(2, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        # Inputs are ~[-1, 1]; scale up so the first layer's pre-activations span several levels.
        h = self.act(self.l1(3.0 * x))
        h = self.act(self.l2(h))
        return self.out(h).squeeze(-1)


class RNN(nn.Module):
    def __init__(self, act, hidden: int = 32):
        super().__init__()
        self.act, self.hidden = act, hidden
        self.w, self.u = nn.Linear(1, hidden), nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):  # x: [B, T] of +-1
        h = x.new_zeros(x.shape[0], self.hidden)
        wx = self.w(x.unsqueeze(-1))  # all input projections at once: [B, T, H]
        states = []
        for t in range(x.shape[1]):
            h = self.act(wx[:, t] + self.u(h))
            states.append(h)
        return self.out(torch.stack(states, dim=1)).squeeze(-1)  # logits [B, T]


@dataclass
class Task:
    name: str
    train: tuple
    test: tuple
    make_model: Callable[[Callable], nn.Module]  # activation -> fresh model
    lr: float
    batch: int
    skip: int = 0  # leading time steps without a target (rnn: the first `delay` steps)

    def loss_acc(self, model, x, y):
        logits = model(x)[..., self.skip:]
        y = y[..., self.skip:]
        loss = F.binary_cross_entropy_with_logits(logits, y)
        acc = ((logits > 0).float() == y).float().mean()
        return loss, acc


def mlp_task() -> Task:
    g = torch.Generator().manual_seed(1234)
    return Task("mlp", spirals(2000, g), spirals(2000, g), lambda act: MLP(act), lr=1e-2, batch=128)


def rnn_task(delay: int, length: int = 20) -> Task:
    g = torch.Generator().manual_seed(4321)

    def data(n):
        bits = torch.randint(0, 2, (n, length), generator=g).float()
        target = torch.zeros_like(bits)
        target[:, delay:] = bits[:, :-delay]
        return 2 * bits - 1, target

    return Task("rnn", data(1000), data(1000), lambda act: RNN(act), lr=2e-2, batch=64, skip=delay)


# ----------------------------------------------------------------------------------------------


def unit_grad(model) -> torch.Tensor:
    """Gradient of the parameters below the units. The readout layer's gradient is left out: for a
    given L the forward pass, hence the readout gradient, is the same in every mode, and it would
    pull every cosine towards 1."""
    return torch.cat(
        [p.grad.reshape(-1) for n, p in model.named_parameters() if not n.startswith("out.")]
    )


def estimate_cos(task: Task, model, mode: str, levels) -> float:
    """Cosine between the mode's full-batch gradient and the exact-mode one at the model's current
    weights. Both use the same forward pass (same L), so only the backward estimate differs."""
    if mode == "tanh":
        return float("nan")  # different forward pass: nothing to compare
    grads = []
    for m in (mode, "exact"):
        model.act = make_activation(m, levels)
        model.zero_grad(set_to_none=True)
        task.loss_acc(model, *task.train)[0].backward()
        grads.append(unit_grad(model))
    model.act = make_activation(mode, levels)
    model.zero_grad(set_to_none=True)
    return float(F.cosine_similarity(grads[0], grads[1], dim=0))


def run_one(task: Task, mode: str, levels, seed: int, steps: int, init_state) -> dict:
    """Train one model from ``init_state`` and score it."""
    model = task.make_model(make_activation(mode, levels))
    model.load_state_dict(init_state)  # same start for every mode of this seed
    # At initialisation pre-activations are small and all estimates nearly agree; at the end of
    # training, where weights have grown and units saturate, is where they can part.
    cos_init = estimate_cos(task, model, mode, levels)

    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    x_train, y_train = task.train
    order = torch.Generator().manual_seed(seed)  # same minibatch sequence for every mode
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x_train.shape[0], (task.batch,), generator=order)
        opt.zero_grad(set_to_none=True)
        task.loss_acc(model, x_train[idx], y_train[idx])[0].backward()
        opt.step()
    train_seconds = time.perf_counter() - t0

    cos_end = estimate_cos(task, model, mode, levels)
    with torch.no_grad():
        train_loss, _ = task.loss_acc(model, *task.train)
        test_loss, test_acc = task.loss_acc(model, *task.test)
    return dict(train_loss=float(train_loss), test_loss=float(test_loss), test_acc=float(test_acc),
                cos_init=cos_init, cos_end=cos_end, train_seconds=round(train_seconds, 3))


def run_task(task: Task, levels_list, seeds, steps):
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        init_state = {k: v.clone() for k, v in task.make_model(torch.tanh).state_dict().items()}
        configs = [("tanh", None)] + [(m, L) for L in levels_list for m in MODES[1:]]
        for mode, levels in configs:
            metrics = run_one(task, mode, levels, seed, steps, init_state)
            rows.append(dict(task=task.name, levels=levels or "", mode=mode, seed=seed, steps=steps,
                             **metrics))
    return rows


def fmt(values, digits):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:  # no spread from one seed; don't print a misleading "± 0"
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_table(rows, task_name, n_seeds, steps, seconds):
    rows = [r for r in rows if r["task"] == task_name]
    print(f"\n== {task_name}: {steps} Adam steps, mean ± std over {n_seeds} seed(s), "
          f"{seconds:.0f} s ==")
    header = (f"{'L':>4}  {'mode':<6} {'train loss':>16} {'test loss':>16} {'test acc':>16}"
              f" {'grad cos init':>14} {'grad cos end':>14}")
    print(header)
    print("-" * len(header))
    keys = []
    for r in rows:
        if (r["levels"], r["mode"]) not in keys:
            keys.append((r["levels"], r["mode"]))
    for levels, mode in keys:
        group = [r for r in rows if r["levels"] == levels and r["mode"] == mode]
        if mode == "exact" and levels != keys[0][0]:
            print()
        cells = [f"{fmt([r[k] for r in group], d):>{w}}" for k, d, w in
                 (("train_loss", 4, 16), ("test_loss", 4, 16), ("test_acc", 4, 16),
                  ("cos_init", 3, 14), ("cos_end", 3, 14))]
        print(f"{levels if levels else '-':>4}  {mode:<6} " + " ".join(cells))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, few steps, L in {2, 16, 256}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="Adam steps, mlp task (default 400, quick 150)")
    p.add_argument("--rnn-steps", type=int, default=None,
                   help="Adam steps, rnn task (default 100, quick 40): each step runs the unit "
                        "T = 20 times forward and backward, so it costs ~6x an mlp step")
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help=f"levels L to test (default {' '.join(map(str, LEVELS))}; quick 2 16 256)")
    p.add_argument("--tasks", nargs="+", choices=("mlp", "rnn"), default=["mlp", "rnn"])
    p.add_argument("--delay", type=int, default=8, help="rnn recall delay (default 8)")
    # One thread by default: the tensors here are tiny (at most 2000 x 64), so a second thread buys
    # nothing, and on a shared 2-core machine it made runs 10-30x slower whenever the other core was
    # busy (OpenMP threads waiting on each other).
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--out", default=None, help="CSV path (default results/grad_modes.csv; "
                   "--quick: results/grad_modes_quick.csv, so a smoke run keeps the real one)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    def pick(value, quick, default):
        return value if value is not None else (quick if args.quick else default)

    n_seeds = pick(args.seeds, 1, 3)
    steps = pick(args.steps, 150, 400)
    rnn_steps = pick(args.rnn_steps, 40, 100)
    levels_list = pick(args.levels, (2, 16, 256), LEVELS)
    out = pick(args.out, os.path.join("results", "grad_modes_quick.csv"),
               os.path.join("results", "grad_modes.csv"))
    if n_seeds < 1 or steps < 0 or rnn_steps < 0:
        p.error("--seeds must be >= 1 and --steps/--rnn-steps >= 0")
    seeds = list(range(n_seeds))

    plan = {"mlp": (mlp_task, steps), "rnn": (lambda: rnn_task(args.delay), rnn_steps)}
    all_rows, t_start = [], time.perf_counter()
    for name in args.tasks:
        make, task_steps = plan[name]
        t0 = time.perf_counter()
        rows = run_task(make(), levels_list, seeds, task_steps)
        all_rows += rows
        print_table(rows, name, n_seeds, task_steps, time.perf_counter() - t0)

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    total = time.perf_counter() - t_start
    print(f"\nwrote {len(all_rows)} rows to {out}; total {total:.0f} s")


if __name__ == "__main__":
    main()
