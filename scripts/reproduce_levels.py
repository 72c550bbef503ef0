"""Reproduce the study: quality against the number of levels.

Baluja (2018, *Empirical Explorations in Training Networks with Discrete Activations*,
arXiv:1801.05156) reports that hidden units limited to 64-256 output levels lose little against
tanh and relu on classification, regression, memorization and compression. This script retrains
small networks of each kind with ``discrnn.DiscreteTanh`` at L in {2, 3, 4, 8, 16, 32, 64, 128,
256} levels, in both straight-through gradient modes (``grad="exact"`` and ``grad="code"``), beside
continuous tanh and relu, and the recurrent layers ``DiscreteLSTM``/``DiscreteGRU`` beside
``torch.nn.LSTM``/``GRU``. Tasks:

* ``digits``: classification, MLP 64 -> 128 -> 128 -> 10 on sklearn's bundled 8x8 digits
  (``load_digits``); held-out accuracy.
* ``diabetes``: regression, MLP 10 -> 64 -> 64 -> 1 on sklearn's bundled ``load_diabetes``
  (inputs and target standardised with the training split's statistics); held-out MSE in units of
  the target's variance (1.0 = predicting the training mean).
* ``memorize``: 2048 random Gaussian inputs (32-d) to random labels (10 classes), MLP 32 -> 128 ->
  128 -> 10; the fraction of the training set classified right after a fixed number of steps.
* ``compress``: autoencoder 64 -> 128 -> 16 -> 128 -> 64 on the digits; the 16 bottleneck units
  (and the other hidden units) are the unit under test; held-out reconstruction MSE (pixels in
  [0, 1]) and the bits the bottleneck takes per image (16 log2 L; 16 x 32 for float32).
* ``spirals`` and ``recall``: the two experiments of ``scripts/grad_modes.py`` (imported from it:
  its data and models, trained here by the same loop as the rest): two-class 2-D spirals with an
  MLP 2 -> 64 -> 64 -> 1, and a vanilla RNN (32 units) that recalls a random bit 8 steps back;
  held-out accuracy. (grad_modes.py itself also measures the gradients' cosine and a naive
  estimate; run it for those.)
* ``digits_rnn``: the digits read row by row (8 steps of 8 pixels) by one recurrent layer (64
  units); held-out accuracy.
* ``adding``: the adding problem: 200 steps of (value in [0, 1], marker), two markers (one in each
  half); predict the sum of the two marked values; held-out MSE (0.167 for always predicting 1).
* ``char_lm``: the character-level language model of ``scripts/train_char_lm.py`` (its ``run``,
  called with the settings below); validation bits per character.

The first six train feedforward nets whose hidden units are the unit under test; the last three
train recurrent layers (DiscreteLSTM/GRU in both gradient modes against torch.nn.LSTM/GRU).
Within a task every variant gets the same architecture, optimiser (Adam), learning rate, batch size
and number of steps: nothing is tuned per L. Seed s fixes the initial weights (the same for every
variant of that seed, torch.nn's and discrnn's layers included) and the minibatch order; the data
are fixed per task, so the seed-to-seed spread is that of training alone.

The rule for "within the seed-to-seed spread": L matches its reference (tanh; for the recurrent
tasks torch.nn's cell of the same kind) when every seed finished with a finite loss and its mean is
not worse than the reference's by more than max(std_L, std_ref) (sample standard deviations over
the seeds; one seed: no spread, so any loss fails). Being better by any amount also matches: the
claim is that discrete units lose little. The report writes, per task, whether 64, 128 and 256
levels match, the smallest L that does, and what ``grad="code"`` costs against ``"exact"`` by the
same rule, all generated from the measurements. A reference that did not close at least a quarter
of the gap between a trivial predictor and a perfect one within the budget is flagged: then
matching it says nothing.

Output (``--out``, default ``results/reproduce_levels/``): ``report.md`` (the command, seeds,
versions, device, threads, load, one table per task, the findings), ``<task>.png`` (metric against
log2 L, the baselines as horizontal bands of mean +- std), ``runs.json`` (every run, the summary
and the settings) and ``runs.csv`` (every run).

Usage::

    python scripts/reproduce_levels.py --quick        # about 11 minutes on one CPU core
    python scripts/reproduce_levels.py --device cuda  # the full study: 5 seeds, every L, long
                                                      # budgets: many hours; meant for a GPU
    python scripts/reproduce_levels.py --tasks adding char_lm --seeds 3 --out results/rnn_full
    python scripts/reproduce_levels.py --quick --tasks digits memorize --levels 2 64 256 --seeds 3
    python scripts/reproduce_levels.py --smoke --out /tmp/x   # every task, tiny: seconds (tests)
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    from tqdm import tqdm
except ImportError:  # the bar is a convenience; the study does not need it
    tqdm = None

import discrnn
from discrnn.profile import positive_int
from discrnn.profiling.report import (device_name, git_commit, import_pyplot, load_average,
                                      write_json)

# The two experiments of grad_modes.py and the language model of train_char_lm.py are reused, not
# copied: they live beside this script.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grad_modes  # noqa: E402
import train_char_lm as char_lm  # noqa: E402

LEVELS = (2, 3, 4, 8, 16, 32, 64, 128, 256)
CLAIM_LEVELS = (64, 128, 256)  # the range the study recommends
FEW_LEVELS = (2, 3, 4)  # where the two gradient modes part, if anywhere
GRAD_MODES = ("exact", "code")
TASKS = ("digits", "diabetes", "memorize", "compress", "spirals", "recall",
         "digits_rnn", "adding", "char_lm")
CELL_TASKS = ("digits_rnn", "adding", "char_lm")
BOTTLENECK = 16  # units in the compress task's bottleneck
ADDING_LENGTH = 200  # time steps of the adding problem
MEMORIZE_POINTS = 2048
LEARNED_SHARE = 0.25  # a reference must close this share of the trivial-to-ideal gap

# What each run mode trains. Steps are per task (every variant of a task gets the same number);
# levels are per task group. The recurrent tasks run fewer level counts in quick mode: a step of
# the adding problem (200 time steps) costs ~40 ms on one CPU core, 50 times a step of the MLPs.
PRESETS = {
    "full": dict(
        seeds=5,
        levels={"units": LEVELS, "digits_rnn": LEVELS, "adding": LEVELS, "char_lm": LEVELS},
        # memorize keeps the quick budget: its score is what fits within a fixed budget, and
        # with a few thousand steps every unit memorizes all 2048 points
        steps={"digits": 2000, "diabetes": 1000, "memorize": 500, "compress": 3000,
               "spirals": 1000, "recall": 300, "digits_rnn": 1500, "adding": 3000,
               "char_lm": 800},
        # train_char_lm.py's own defaults: the README's language-model table
        char_lm=dict(hidden=256, embed=128, batch=32, window=128, lr=2e-3, val_chars=131072),
    ),
    # Measured on the 2-core CPU, one thread: 531-580 s of CPU time, 641-674 s wall at a load
    # average of 3.6-4 (other processes); the adding problem takes a third of it. Each char_lm
    # run also re-reads train_char_lm's corpus (~1 s).
    "quick": dict(
        seeds=3,
        levels={"units": LEVELS, "digits_rnn": (2, 16, 64, 256), "adding": (256,),
                "char_lm": (16, 256)},
        steps={"digits": 300, "diabetes": 300, "memorize": 500, "compress": 400,
               "spirals": 400, "recall": 100, "digits_rnn": 300, "adding": 300,
               "char_lm": 200},
        # a short run; lr 5e-3 rather than 2e-3 gets further in 200 steps
        char_lm=dict(hidden=64, embed=32, batch=16, window=32, lr=5e-3, val_chars=16384),
    ),
    # every task and both gradient modes, a few steps each: for tests/test_reproduce_levels.py
    "smoke": dict(
        seeds=1,
        levels={"units": (4, 64), "digits_rnn": (4,), "adding": (4,), "char_lm": (4,)},
        steps={"digits": 3, "diabetes": 3, "memorize": 3, "compress": 3, "spirals": 3,
               "recall": 2, "digits_rnn": 2, "adding": 2, "char_lm": 6},
        char_lm=dict(quick=True),  # train_char_lm.py --quick: its own smoke settings (6 steps)
    ),
}


# ----------------------------------------------------------------------------------------------
# What is trained: a variant is a unit (feedforward tasks) or a cell (recurrent tasks)


@dataclass(frozen=True)
class Variant:
    """``kind``: "tanh", "relu", "discrete" (a unit) or "lstm", "gru" (a cell); ``levels`` None is
    continuous (torch's own cell for "lstm"/"gru")."""

    kind: str
    levels: int | None = None
    grad: str | None = None

    @property
    def is_cell(self) -> bool:
        return self.kind in ("lstm", "gru")

    @property
    def series(self) -> str:
        """The curve this variant belongs to (one per gradient mode, per cell) or its baseline."""
        if self.levels is None:
            return f"torch.nn.{self.kind.upper()}" if self.is_cell else self.kind
        unit = f"Discrete{self.kind.upper()}" if self.is_cell else "DiscreteTanh"
        return f"{unit} {self.grad}"

    @property
    def label(self) -> str:
        return self.series if self.levels is None else f"{self.series} L={self.levels}"


def make_unit(variant: Variant) -> nn.Module:
    if variant.kind == "tanh":
        return nn.Tanh()
    if variant.kind == "relu":
        return nn.ReLU()
    return discrnn.DiscreteTanh(variant.levels, grad=variant.grad)


def variants_for(task: "Task", levels: tuple[int, ...]) -> list[Variant]:
    if task.cells:
        out = []
        for cell in ("lstm", "gru"):
            out.append(Variant(cell))
            out += [Variant(cell, L, g) for g in GRAD_MODES for L in levels]
        return out
    return ([Variant("tanh"), Variant("relu")]
            + [Variant("discrete", L, g) for g in GRAD_MODES for L in levels])


def reference_of(variant: Variant) -> Variant:
    """What a variant is compared with: tanh, or torch.nn's cell of the same kind."""
    return Variant(variant.kind) if variant.is_cell else Variant("tanh")


def bits_per_unit(levels: int | None) -> int:
    """Bits a unit's code takes when stored packed; float32 for continuous units."""
    return 32 if levels is None else math.ceil(math.log2(levels))


# ----------------------------------------------------------------------------------------------
# Training


class Diverged(Exception):
    """The training loss stopped being finite."""


def fit(model: nn.Module, loss_fn: Callable, train: tuple, *, steps: int, batch: int, lr: float,
        seed: int, clip: float = 0.0) -> None:
    """Adam on minibatches drawn with replacement from ``train``; the draw order depends on the seed
    only, so every variant of a seed sees the same minibatches."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    n = train[0].shape[0]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=order).to(train[0].device)
        loss = loss_fn(model, *(t[idx] for t in train))
        if not torch.isfinite(loss):
            raise Diverged(f"loss {float(loss)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def mlp(sizes: list[int], unit: nn.Module) -> nn.Sequential:
    """Linear layers of ``sizes``, the unit after every one but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(unit)  # no parameters: one module can serve every layer
    return nn.Sequential(*layers)


class LastStep(nn.Module):
    """A recurrent layer (batch first), then a linear head on its output at the last time step."""

    def __init__(self, rnn: nn.Module, hidden: int, out: int):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, out)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def make_cell(variant: Variant, input_size: int, hidden: int) -> nn.Module:
    # train_char_lm.make_rnn builds torch.nn.LSTM/GRU (levels None) or DiscreteLSTM/GRU alike.
    return char_lm.make_rnn(variant.kind, variant.levels, input_size, hidden, 1,
                            variant.grad or "code", None)


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    name: str
    title: str
    metric: str  # what the number is, for tables and plots
    higher_is_better: bool
    trivial: float  # what a model that learned nothing scores
    ideal: float
    digits: int  # decimals in the tables
    description: str
    cells: bool = False  # recurrent task: variants are cells, not units
    # (variant, seed, steps) -> {"metric": float, ...}; raises Diverged
    train_one: Callable[[Variant, int, int], dict] | None = None
    extra_columns: dict = field(default_factory=dict)  # name -> f(levels) for the table

    def learned(self, value: float) -> bool:
        return abs(value - self.trivial) >= LEARNED_SHARE * abs(self.ideal - self.trivial) and (
            (value > self.trivial) == self.higher_is_better)


def split(x: torch.Tensor, y: torch.Tensor, device, stratify=True):
    """Fixed 75/25 split (random_state 0, stratified for labels)."""
    from sklearn.model_selection import train_test_split

    xa, xb, ya, yb = train_test_split(x.numpy(), y.numpy(), test_size=0.25, random_state=0,
                                      stratify=y.numpy() if stratify else None)
    return tuple(torch.as_tensor(a).to(device) for a in (xa, ya)), tuple(
        torch.as_tensor(a).to(device) for a in (xb, yb))


def classifier_task(name, title, description, train, test, sizes, *, lr, batch, trivial,
                    metric="held-out accuracy", score_on_train=False) -> Task:
    def loss_fn(model, x, y):
        return F.cross_entropy(model(x), y)

    def train_one(variant, seed, steps):
        torch.manual_seed(seed)
        model = mlp(sizes, make_unit(variant)).to(train[0].device)
        fit(model, loss_fn, train, steps=steps, batch=batch, lr=lr, seed=seed)
        model.eval()
        with torch.no_grad():
            x, y = train if score_on_train else test
            return {"metric": accuracy(model(x), y)}

    return Task(name, title, metric, True, trivial, 1.0, 3, description, train_one=train_one)


@functools.lru_cache(maxsize=None)
def digits_data(device: torch.device):
    """sklearn's 8x8 digits, pixels / 16 in [0, 1]: (train, test) of ([N, 64], [N] labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return split(pixels, torch.tensor(digits.target, dtype=torch.long), device)


def digits_task(preset, device, threads) -> Task:
    train, test = digits_data(device)
    return classifier_task(
        "digits", "Classification: digits, MLP",
        "sklearn's 8x8 digits (1347 train / 450 held out, stratified), pixels / 16; MLP 64 -> 128 "
        "-> 128 -> 10, the unit under test after both hidden layers; Adam 1e-3, batch 64.",
        train, test, [64, 128, 128, 10], lr=1e-3, batch=64, trivial=0.1)


def diabetes_task(preset, device, threads) -> Task:
    from sklearn.datasets import load_diabetes

    # Standardised with the training split's statistics, so an MSE of 1 is the training mean.
    db = load_diabetes()
    train, test = split(torch.tensor(db.data, dtype=torch.float32),
                        torch.tensor(db.target, dtype=torch.float32), device, stratify=False)
    x_mean, x_std = train[0].mean(0), train[0].std(0)
    y_mean, y_std = train[1].mean(), train[1].std()
    train = ((train[0] - x_mean) / x_std, (train[1] - y_mean) / y_std)
    test = ((test[0] - x_mean) / x_std, (test[1] - y_mean) / y_std)

    def loss_fn(model, x, y):
        return F.mse_loss(model(x).squeeze(-1), y)

    def train_one(variant, seed, steps):
        torch.manual_seed(seed)
        model = mlp([10, 64, 64, 1], make_unit(variant)).to(device)
        fit(model, loss_fn, train, steps=steps, batch=64, lr=1e-3, seed=seed)
        model.eval()
        with torch.no_grad():
            return {"metric": float(loss_fn(model, *test))}

    return Task(
        "diabetes", "Regression: diabetes, MLP", "held-out MSE (target variance = 1)", False,
        float((test[1] ** 2).mean()), 0.0, 4,
        "sklearn's diabetes set (331 train / 111 held out; inputs and target standardised with "
        "the training split's mean and std); MLP 10 -> 64 -> 64 -> 1; Adam 1e-3, batch 64, "
        "MSE loss. Predicting the training mean scores the trivial value, about 1.",
        train_one=train_one)


def memorize_task(preset, device, threads) -> Task:
    # Nothing to generalise: only capacity and optimisation within the budget count.
    g = torch.Generator().manual_seed(2018)
    # 2048 points: tanh memorizes about three quarters of them in the quick budget (500 steps),
    # so the score neither saturates nor stays at chance. 1024 were all memorized by every unit.
    x = torch.randn(MEMORIZE_POINTS, 32, generator=g).to(device)
    y = torch.randint(0, 10, (MEMORIZE_POINTS,), generator=g).to(device)
    return classifier_task(
        "memorize", "Memorization: random inputs to random labels",
        f"{MEMORIZE_POINTS} Gaussian inputs (32-d) with uniformly random labels (10 classes), "
        "fixed; MLP 32 -> 128 -> 128 -> 10; Adam 3e-3, batch 128; the score is the fraction of "
        "the training set classified right at the end of the budget (chance 0.1).",
        (x, y), (x, y), [32, 128, 128, 10], lr=3e-3, batch=128, trivial=0.1,
        metric="fraction memorized", score_on_train=True)


def compress_task(preset, device, threads) -> Task:
    train, test = digits_data(device)

    def loss_fn(model, x, _labels):
        return F.mse_loss(model(x), x)

    def train_one(variant, seed, steps):
        torch.manual_seed(seed)
        model = mlp([64, 128, BOTTLENECK, 128, 64], make_unit(variant)).to(device)
        fit(model, loss_fn, train, steps=steps, batch=64, lr=1e-3, seed=seed)
        model.eval()
        with torch.no_grad():
            return {"metric": float(loss_fn(model, test[0], None))}

    return Task(
        "compress", "Compression: digits autoencoder", "held-out reconstruction MSE", False,
        float(((test[0] - train[0].mean(0)) ** 2).mean()), 0.0, 4,
        f"Autoencoder 64 -> 128 -> {BOTTLENECK} -> 128 -> 64 on the digits (pixels in [0, 1], "
        f"linear output), the unit under test on every hidden layer, so the {BOTTLENECK}-unit "
        f"bottleneck holds {BOTTLENECK} log2 L bits per image ({BOTTLENECK} x 32 in float32); "
        "Adam 1e-3, batch 64, MSE loss. The training set's mean image scores the trivial value.",
        train_one=train_one,
        extra_columns={"bottleneck bits/image": lambda L: (
            f"{BOTTLENECK * 32}" if L is None else f"{BOTTLENECK * math.log2(L):.1f}")})


def spirals_task(preset, device, threads) -> Task:
    return grad_modes_task(
        "spirals", "grad_modes.py: 2-D spirals, MLP", grad_modes.mlp_task(),
        "grad_modes.py's two-class 2-D spirals (2000 train / 2000 held out), MLP 2 -> 64 -> 64 "
        "-> 1; Adam 1e-2, batch 128.", device)


def recall_task(preset, device, threads) -> Task:
    return grad_modes_task(
        "recall", "grad_modes.py: recall a bit 8 steps back, vanilla RNN", grad_modes.rnn_task(8),
        "grad_modes.py's delayed recall: random +-1 bits, predict the bit from 8 steps back at "
        "every step of a 20-step sequence; vanilla RNN h_t = unit(W x_t + U h_{t-1}), 32 units "
        "(the unit under test carries the state); Adam 2e-2, batch 64.", device)


def digits_rnn_task(preset, device, threads) -> Task:
    train, test = digits_data(device)
    train, test = (train[0].view(-1, 8, 8), train[1]), (test[0].view(-1, 8, 8), test[1])

    def loss_fn(model, x, y):
        return F.cross_entropy(model(x), y)

    def train_one(variant, seed, steps):
        torch.manual_seed(seed)
        model = LastStep(make_cell(variant, 8, 64), 64, 10).to(device)
        fit(model, loss_fn, train, steps=steps, batch=64, lr=3e-3, seed=seed, clip=1.0)
        model.eval()
        with torch.no_grad():
            return {"metric": accuracy(model(test[0]), test[1])}

    return Task(
        "digits_rnn", "Recurrent: digits read row by row", "held-out accuracy", True, 0.1, 1.0, 3,
        "The digits as sequences of 8 rows of 8 pixels; one recurrent layer (64 units), a linear "
        "head on the last step's output; Adam 3e-3, batch 64, gradient norm clipped at 1.",
        cells=True, train_one=train_one)


def adding_task(preset, device, threads) -> Task:
    length = ADDING_LENGTH
    train = adding_problem(20000, length, torch.Generator().manual_seed(7), device)
    test = adding_problem(1000, length, torch.Generator().manual_seed(8), device)

    def loss_fn(model, x, y):
        return F.mse_loss(model(x).squeeze(-1), y)

    def train_one(variant, seed, steps):
        torch.manual_seed(seed)
        model = LastStep(make_cell(variant, 2, 32), 32, 1).to(device)
        fit(model, loss_fn, train, steps=steps, batch=64, lr=1e-2, seed=seed, clip=1.0)
        model.eval()
        with torch.no_grad():
            return {"metric": float(loss_fn(model, *test))}

    return Task(
        "adding", f"Recurrent: the adding problem, T = {length}", "held-out MSE", False,
        float(((test[1] - 1.0) ** 2).mean()), 0.0, 4,
        f"Sequences of {length} steps of (value uniform in [0, 1], marker); one marker in each "
        "half; the target is the sum of the two marked values (always predicting 1 scores the "
        "trivial value, about 0.167). One recurrent layer (32 units), a linear head on the last "
        "step's output; 20000 training sequences, 1000 held out; Adam 1e-2, batch 64, gradient "
        "norm clipped at 1.",
        cells=True, train_one=train_one)


def char_lm_task(preset, device, threads) -> Task:
    lm = preset["char_lm"]
    if lm.get("quick"):
        description = ("scripts/train_char_lm.py --quick (its smoke settings: 200k characters, "
                       "hidden 32, batch 4, window 16, 6 steps).")
    else:
        description = (
            f"scripts/train_char_lm.py's model and loop (its run()): the Python standard library's "
            f"source, embedding {lm['embed']} -> one recurrent layer of {lm['hidden']} units -> "
            f"linear head, batch {lm['batch']}, windows of {lm['window']} characters with the "
            f"state carried, Adam {lm['lr']:g}, gradient norm clipped at 1; validation over "
            f"{lm['val_chars']} held-out characters. Trivial value: log2 of the vocabulary "
            "(a uniform guess).")
    train_text, _ = char_lm.load_corpus()
    return Task(
        "char_lm", "Recurrent: character-level language model", "validation bits per character",
        False, math.log2(len(char_lm.Vocabulary(train_text))), 0.0, 3, description, cells=True,
        train_one=functools.partial(train_char_lm_variant, lm=lm, device=device, threads=threads))


TASK_BUILDERS = {"digits": digits_task, "diabetes": diabetes_task, "memorize": memorize_task,
                 "compress": compress_task, "spirals": spirals_task, "recall": recall_task,
                 "digits_rnn": digits_rnn_task, "adding": adding_task, "char_lm": char_lm_task}


def grad_modes_task(name: str, title: str, gm: "grad_modes.Task", description: str,
                    device) -> Task:
    """A Task of grad_modes.py (its data, model and loss) trained by this script's loop."""
    train = tuple(t.to(device) for t in gm.train)
    test = tuple(t.to(device) for t in gm.test)

    def loss_fn(model, x, y):
        return gm.loss_acc(model, x, y)[0]

    def train_one(variant, seed, steps):
        torch.manual_seed(seed)
        model = gm.make_model(make_unit(variant)).to(device)
        fit(model, loss_fn, train, steps=steps, batch=gm.batch, lr=gm.lr, seed=seed)
        model.eval()
        with torch.no_grad():
            return {"metric": float(gm.loss_acc(model, *test)[1])}

    return Task(name, title, "held-out accuracy", True, 0.5, 1.0, 3, description,
                train_one=train_one)


def adding_problem(n: int, length: int, g: torch.Generator, device):
    """[n, length, 2] inputs (value, marker) and [n] targets: the sum of the two marked values."""
    values = torch.rand(n, length, generator=g)
    first = torch.randint(0, length // 2, (n,), generator=g)
    second = torch.randint(length // 2, length, (n,), generator=g)
    markers = torch.zeros(n, length)
    markers[torch.arange(n), first] = 1.0
    markers[torch.arange(n), second] = 1.0
    return torch.stack([values, markers], dim=-1).to(device), (values * markers).sum(1).to(device)


def train_char_lm_variant(variant: Variant, seed: int, steps: int, *, lm: dict, device,
                          threads: int) -> dict:
    argv = ["--rnn", variant.kind, "--levels", str(variant.levels or "none"),
            "--grad", variant.grad or "code", "--seed", str(seed), "--threads", str(threads),
            "--device", device.type, "--no-progress"]
    if lm.get("quick"):
        argv.append("--quick")  # its own tiny settings, steps included
    else:
        argv += ["--steps", str(steps), "--eval-every", str(steps), "--hidden", str(lm["hidden"]),
                 "--embed", str(lm["embed"]), "--batch", str(lm["batch"]),
                 "--window", str(lm["window"]), "--lr", str(lm["lr"]),
                 "--val-chars", str(lm["val_chars"])]
    result = char_lm.run(char_lm.build_parser().parse_args(argv))
    if result["steps_done"] < result["steps"] or not math.isfinite(result["val_bpc"]):
        raise Diverged(f"stopped after {result['steps_done']} of {result['steps']} steps")
    return {"metric": float(result["val_bpc"]), "train_bpc": result["train_bpc"],
            "ms_per_step": result["ms_per_step"]}


# ----------------------------------------------------------------------------------------------
# Summaries and the rule


@dataclass
class Stats:
    values: list  # one per seed; None for a run that diverged
    mean: float
    std: float  # sample std over the finite values; 0 for one value
    n: int
    diverged: int

    @classmethod
    def of(cls, values: list) -> "Stats":
        finite = [v for v in values if v is not None and math.isfinite(v)]
        mean = statistics.fmean(finite) if finite else float("nan")
        std = statistics.stdev(finite) if len(finite) > 1 else 0.0
        return cls(values, mean, std, len(values), len(values) - len(finite))

    def text(self, digits: int) -> str:
        if self.n == self.diverged:
            return f"diverged ({self.diverged}/{self.n})"
        body = f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.n > 1 else "")
        return body + (f" ({self.diverged}/{self.n} diverged)" if self.diverged else "")


@dataclass
class Comparison:
    diff: float  # mean - reference mean (raw)
    worse_by: float  # how much worse than the reference (negative: better)
    spread: float  # max of the two stds
    matches: bool


def compare(a: Stats, ref: Stats, higher_is_better: bool) -> Comparison:
    """The report's rule: a matches ref when no seed diverged and a is not worse than ref by more
    than max(std_a, std_ref)."""
    diff = a.mean - ref.mean
    worse_by = -diff if higher_is_better else diff
    spread = max(a.std, ref.std)
    ok = a.diverged == 0 and math.isfinite(diff) and worse_by <= spread
    return Comparison(diff, worse_by, spread, ok)


def summarize(task: Task, runs: list[dict]) -> dict:
    """Stats per variant, comparisons against the reference and between the gradient modes."""
    by_variant: dict[Variant, list] = {}
    for r in runs:
        v = Variant(r["kind"], r["levels"], r["grad"])
        by_variant.setdefault(v, []).append(r["metric"])
    stats = {v: Stats.of(vals) for v, vals in by_variant.items()}
    vs_ref, code_vs_exact = {}, {}
    for v, s in stats.items():
        ref = reference_of(v)
        if v.levels is not None or v != ref:
            if ref in stats:
                vs_ref[v] = compare(s, stats[ref], task.higher_is_better)
        if v.levels is not None and v.grad == "code":
            exact = Variant(v.kind, v.levels, "exact")
            if exact in stats:
                code_vs_exact[v] = compare(s, stats[exact], task.higher_is_better)
    return {"stats": stats, "vs_ref": vs_ref, "code_vs_exact": code_vs_exact}


def signed(value: float, digits: int) -> str:
    """+0.012 / -0.012; a difference that rounds to zero is +0.000, never -0.000."""
    if not math.isfinite(value):
        return "-"
    return f"{value + 0.0 if round(value, digits) != 0 else 0.0:+.{digits}f}"


def fmt_diff(c: Comparison, digits: int) -> str:
    if not math.isfinite(c.diff):
        return "-"
    return f"{signed(c.diff, digits)} {'✓' if c.matches else '✗'}"


def list_levels(levels: list[int]) -> str:
    return ", ".join(str(L) for L in levels) if levels else "none"


def claim_verdict(levels: list[int], vs_ref: dict, ref_name: str, d: int) -> tuple[str, str]:
    """(sentence, table cell) on the study's claim: 64, 128 and 256 levels match the reference."""
    claim = [L for L in levels if L in CLAIM_LEVELS]
    if not claim:
        return "not tested (no level count in 64-256 ran)", "-"
    ok = [L for L in claim if vs_ref[L].matches]
    bad = [L for L in claim if not vs_ref[L].matches]
    detail = "; ".join(f"L={L}: {signed(vs_ref[L].diff, d)}, spread {vs_ref[L].spread:.{d}f}"
                       for L in claim)
    if not bad:
        return f"holds at {list_levels(ok)} levels ({detail})", f"yes ({list_levels(ok)})"
    if not ok:
        return (f"does not hold: {list_levels(bad)} levels are worse than {ref_name} by more than "
                f"the spread ({detail})", f"no ({list_levels(bad)})")
    return (f"holds in part: {list_levels(ok)} levels match, {list_levels(bad)} do not "
            f"({detail})", f"{list_levels(ok)} only")


def smallest_matching(levels: list[int], vs_ref: dict) -> tuple[int | None, str]:
    """The smallest L from which every larger L tested matches its reference (None: the largest
    does not), and a sentence that also names a smaller L that matches on its own."""
    matching = [L for L in levels if vs_ref[L].matches]
    if not matching:
        return None, f"none of {list_levels(levels)}"
    smallest = matching[0]
    stable = next((L for L in levels if all(vs_ref[M].matches for M in levels if M >= L)), None)
    if stable == smallest:
        return stable, f"{smallest} (every larger L matches too)"
    if stable is None:
        return None, f"{smallest}, but the largest L tested does not"
    return stable, f"{stable} and every larger L; {smallest} as well, but not every L between"


def code_cost(levels: list[int], costs: dict, d: int) -> tuple[str, str]:
    """(sentence, table cell) on what grad="code" costs against "exact", by the same rule."""
    claim = [L for L in levels if L in CLAIM_LEVELS and L in costs]
    parts, cell = [], "-"
    if claim:
        beyond = [L for L in claim if not costs[L].matches]
        cell = ", ".join(signed(costs[L].diff, d) for L in claim)
        parts.append(f"at {list_levels(claim)} levels code - exact = {cell} "
                     + ("(no worse than exact beyond the spread)" if not beyond else
                        f"(worse than exact beyond the spread at {list_levels(beyond)})"))
    worst = max(costs, key=lambda L: costs[L].worse_by if math.isfinite(costs[L].worse_by)
                else math.inf)
    w = costs[worst]
    if not math.isfinite(w.worse_by):
        parts.append(f"at L={worst} code diverged where exact did not, or both did")
    elif round(w.worse_by, d) > 0:  # a cost that rounds to zero in the tables is none
        parts.append(f"its largest cost is at L={worst}: {signed(w.diff, d)} "
                     + ("(beyond the spread)" if not w.matches else "(within the spread)"))
    else:
        parts.append("code is no worse than exact at any L")
    return "; ".join(parts), cell


def findings(task: Task, summary: dict) -> tuple[list[str], list[dict]]:
    """The generated sentences of a task, and one row per reference for the findings table."""
    stats, vs_ref, cve = summary["stats"], summary["vs_ref"], summary["code_vs_exact"]
    d = task.digits
    lines, rows = [], []
    for kind in ("lstm", "gru") if task.cells else ("discrete",):
        ref_variant = reference_of(Variant(kind, 2, "exact"))
        ref, ref_name = stats.get(ref_variant), ref_variant.series
        if ref is None:
            continue
        unit = f"Discrete{kind.upper()}" if task.cells else "DiscreteTanh"
        learned = ref.diverged == 0 and task.learned(ref.mean)
        by_grad = {g: {v.levels: c for v, c in vs_ref.items() if v.kind == kind and v.grad == g}
                   for g in GRAD_MODES}
        levels = sorted(by_grad["exact"])
        head = f"**{unit} against {ref_name}.** " if task.cells else ""

        verdict, claim_cell = claim_verdict(levels, by_grad["exact"], ref_name, d)
        caveat = "" if learned else (
            f" **But {ref_name} itself did not learn this task within the budget** "
            f"({ref.text(d)} against {task.trivial:.{d}f} for a trivial predictor): matching it "
            "says nothing.")
        lines.append(f"- {head}Claim (64-256 levels within the seed spread of {ref_name}, "
                     f"grad=\"exact\"): {verdict}.{caveat}")

        smallest = {}
        for g in GRAD_MODES:
            if by_grad[g]:
                smallest[g] = smallest_matching(sorted(by_grad[g]), by_grad[g])
        lines.append(f"- Smallest L that matches {ref_name}: "
                     + "; ".join(f"grad=\"{g}\" {text}" for g, (_, text) in smallest.items()) + ".")

        costs = {v.levels: c for v, c in cve.items() if v.kind == kind}
        cost_cell = "-"
        if costs:
            sentence, cost_cell = code_cost(levels, costs, d)
            lines.append(f"- grad=\"code\" against \"exact\" ({unit}): {sentence}.")
        claim_costs = [costs[L] for L in CLAIM_LEVELS if L in costs]
        few_costs = [costs[L] for L in FEW_LEVELS if L in costs]

        def at(L):
            v = Variant(kind, L, "exact")
            return stats[v].text(d) if v in stats else "-"

        rows.append({
            "task": task.title + (f" ({kind.upper()})" if task.cells else ""),
            "metric": task.metric, "reference": f"{ref_name} {ref.text(d)}",
            "L=64": at(64), "L=256": at(256),
            "64-256 match": claim_cell + ("" if learned else " (reference did not learn)"),
            "matches from L (exact / code)": " / ".join(
                str(smallest[g][0]) if g in smallest and smallest[g][0] else "none"
                for g in GRAD_MODES),
            "code - exact at 64-256": cost_cell,
            # for the overall summary, not printed as columns
            "_claim": claim_cell.split(" ")[0], "_learned": learned,
            "_code_ok_64_256": all(c.matches for c in claim_costs) if claim_costs else None,
            "_code_bad_few": any(not c.matches for c in few_costs) if few_costs else None,
        })
    if not task.cells and Variant("relu") in vs_ref:
        c = vs_ref[Variant("relu")]
        verdict = "not worse beyond the spread" if c.matches else "worse beyond the spread"
        lines.append(f"- relu against tanh: {stats[Variant('relu')].text(d)}, {signed(c.diff, d)} "
                     f"({verdict}).")
    return lines, rows


# ----------------------------------------------------------------------------------------------
# Report, plots, files


def task_table(task: Task, summary: dict) -> list[str]:
    stats, vs_ref, cve = summary["stats"], summary["vs_ref"], summary["code_vs_exact"]
    d = task.digits
    extra = list(task.extra_columns)
    ref_word = "vs torch.nn" if task.cells else "vs tanh"
    head = (["cell"] if task.cells else []) + ["unit", "bits", "bytes/unit"] + extra + [
        'grad="exact"', ref_word, 'grad="code"', ref_word, "code - exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    kinds = ("lstm", "gru") if task.cells else ("discrete",)
    for kind in kinds:
        baselines = [Variant(kind)] if task.cells else [Variant("tanh"), Variant("relu")]
        for b in baselines:
            if b not in stats:
                continue
            cells = ([b.series] if task.cells else []) + [
                "continuous" if task.cells else b.kind, "32", "4"]
            cells += [f(None) for f in task.extra_columns.values()]
            c = vs_ref.get(b)
            cells += [stats[b].text(d), fmt_diff(c, d) if c else "", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        levels = sorted({v.levels for v in stats if v.kind == kind and v.levels is not None})
        for L in levels:
            bits = bits_per_unit(L)
            cells = ([f"Discrete{kind.upper()}"] if task.cells else []) + [
                f"L={L}", str(bits), f"{bits / 8:g}"]
            cells += [f(L) for f in task.extra_columns.values()]
            for g in GRAD_MODES:
                v = Variant(kind, L, g)
                cells += [stats[v].text(d) if v in stats else "-",
                          fmt_diff(vs_ref[v], d) if v in vs_ref else "-"]
            c = cve.get(Variant(kind, L, "code"))
            cells.append(fmt_diff(c, d) if c else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


COLORS = {"exact": "tab:blue", "code": "tab:orange", "tanh": "tab:green", "relu": "tab:red",
          "lstm": "tab:blue", "gru": "tab:purple"}


def plot_task(plt, path: Path, task: Task, summary: dict, subtitle: str) -> None:
    stats = summary["stats"]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    all_levels = sorted({v.levels for v in stats if v.levels is not None})
    for v, s in stats.items():  # the baselines: a line at the mean, a band of +- std
        if v.levels is None and math.isfinite(s.mean):
            color = COLORS[v.kind]
            ax.axhline(s.mean, color=color, linewidth=1.0, linestyle=":",
                       label=f"{v.series} (mean ± std)")
            ax.axhspan(s.mean - s.std, s.mean + s.std, color=color, alpha=0.12, linewidth=0)
    # one curve per (unit or cell, gradient mode): exact solid, code dashed
    order = ("discrete", "lstm", "gru")
    series = sorted({(v.kind, v.grad) for v in stats if v.levels is not None},
                    key=lambda kg: (order.index(kg[0]), GRAD_MODES.index(kg[1])))
    for kind, grad in series:
        mine = sorted((v for v in stats if v.kind == kind and v.grad == grad
                       and v.levels is not None), key=lambda v: v.levels)
        pts = [(math.log2(v.levels), stats[v]) for v in mine if math.isfinite(stats[v].mean)]
        if not pts:
            continue
        # the units: one colour per gradient mode; the cells: one colour per cell (as its
        # baseline band), the mode told by the line (solid exact, dashed code, open markers)
        color = COLORS[grad] if kind == "discrete" else COLORS[kind]
        ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std for p in pts],
                    marker="s" if kind == "gru" else "o", capsize=3, color=color,
                    markerfacecolor=color if grad == "exact" else "white",
                    linestyle="-" if grad == "exact" else "--", label=mine[0].series)
    ticks = sorted(set(all_levels) | {2, 256})  # the whole range, whatever ran
    ax.set_xticks([math.log2(L) for L in ticks])
    ax.set_xticklabels([str(L) for L in ticks])
    ax.set_xlim(0.5, 8.5)
    ax.axvspan(math.log2(64) - 0.2, math.log2(256) + 0.2, color="gray", alpha=0.08, linewidth=0)
    ax.set_xlabel("levels L (log2 scale; shaded: the study's 64-256)")
    ax.set_ylabel(task.metric + (" (higher is better)" if task.higher_is_better
                                 else " (lower is better)"))
    ax.set_title(f"{task.title}\n{subtitle}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def environment(device: torch.device, threads: int) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - recorded, not needed
        triton_version = None
    import numpy
    import sklearn

    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "discrnn": discrnn.__version__,
            "sklearn": sklearn.__version__, "numpy": numpy.__version__,
            "device": str(device), "device_name": device_name(device), "threads": threads,
            "cpu_count": os.cpu_count(), "git_commit": git_commit()}


def overall_summary(rows: list[dict]) -> list[str]:
    """Generated sentences over every comparison (a task, or a task and cell)."""
    def names(selected):
        return "; ".join(r["task"] for r in selected) or "none"

    judged = [r for r in rows if r["_claim"] != "-" and r["_learned"]]
    unlearned = [r for r in rows if r["_claim"] != "-" and not r["_learned"]]
    holds = [r for r in judged if r["_claim"] == "yes"]
    fails = [r for r in judged if r["_claim"] != "yes"]
    out = [f"- The claim (64-256 levels within the seed spread of the continuous reference, "
           f"grad=\"exact\") holds on {len(holds)} of {len(judged)} comparisons where the "
           "reference learned the task."
           + (f" It does not hold, or only in part, on: {names(fails)}." if fails else "")]
    if unlearned:
        out.append(f"- Not judged (the reference did not learn within the budget): "
                   f"{names(unlearned)}.")
    code = [r for r in rows if r["_code_ok_64_256"] is not None]
    code_ok = [r for r in code if r["_code_ok_64_256"]]
    out.append(f"- grad=\"code\" is no worse than \"exact\" beyond the spread at the 64-256 "
               f"levels tested on {len(code_ok)} of {len(code)} comparisons"
               + (f" (not on: {names([r for r in code if not r['_code_ok_64_256']])})."
                  if len(code_ok) < len(code) else "."))
    few = [r for r in rows if r["_code_bad_few"] is not None]
    if few:
        bad = [r for r in few if r["_code_bad_few"]]
        out.append(f"- At 2-4 levels grad=\"code\" is worse than \"exact\" beyond the spread on "
                   f"{len(bad)} of {len(few)} comparisons that ran them.")
    return out


def write_report(out: Path, meta: dict, tasks: list[Task], summaries: dict, plots: dict) -> None:
    env = meta["environment"]
    lines = [
        "# Reproduction: quality against the number of levels",
        "",
        "Baluja (2018, arXiv:1801.05156) reports that hidden units limited to 64-256 levels lose "
        "little against tanh and relu. Produced by `scripts/reproduce_levels.py`; every sentence "
        "below is generated from the runs in `runs.json`.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Mode: {meta['mode']}; seeds {', '.join(map(str, meta['seeds']))}; "
        f"{meta['n_runs']} runs ({meta['n_diverged']} diverged); wall time "
        f"{meta['wall_s']:.0f} s, CPU time of the process {meta['cpu_s']:.0f} s",
        f"- Device: {env['device']} ({env['device_name']}), {env['threads']} torch thread(s), "
        f"{env['cpu_count']} CPUs; load average (1 min) {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end, {meta['load_during']['mean']} on average and "
        f"{meta['load_during']['max']} at most after each run (other processes share the "
        "machine when it exceeds the thread count)",
        f"- Versions: discrnn {env['discrnn']} (commit {env['git_commit']}), torch {env['torch']}, "
        f"triton {env['triton']}, scikit-learn {env['sklearn']}, numpy {env['numpy']}, "
        f"Python {env['python']}",
        "",
        "## Method",
        "",
        "- Discrete units: `discrnn.DiscreteTanh(L, grad=...)` (tanh snapped to L uniform levels "
        "in [-1, 1], straight-through gradients); `grad=\"exact\"` uses tanh' at the "
        "pre-activation, `grad=\"code\"` the mean of tanh' over the level's bin (what a layer "
        "that keeps only the codes can use). Recurrent tasks: `DiscreteLSTM`/`DiscreteGRU` in "
        "both modes beside `torch.nn.LSTM`/`GRU`.",
        "- Within a task every variant has the same architecture, optimiser, learning rate, batch "
        "and number of steps; nothing is tuned per L. A seed fixes the initial weights (the same "
        "for every variant of that seed) and the minibatch order; the data are fixed.",
        "- Bits per unit = ceil(log2 L), what a packed code takes; bytes/unit = bits / 8 "
        "(float32: 32 bits, 4 bytes).",
        "- **Rule.** L *matches* its reference (tanh; torch.nn's cell of the same kind for the "
        "recurrent tasks) when no seed diverged and its mean is not worse than the reference's by "
        "more than max(std_L, std_ref), the larger sample standard deviation over seeds (✓ in "
        "the tables; ✗ otherwise). Better by any amount matches. `code - exact` uses the same "
        "rule with exact as the reference. With one seed there is no spread, so any loss fails.",
        f"- A reference that did not close {LEARNED_SHARE:.0%} of the gap between a trivial "
        "predictor and a perfect score is flagged: matching it then says nothing.",
        "",
        "## Findings",
        "",
    ]
    all_rows = [row for t in tasks for row in summaries[t.name]["rows"]]
    if all_rows:
        lines += overall_summary(all_rows) + [""]
        cols = ["task", "metric", "reference", "L=64", "L=256", "64-256 match",
                "matches from L (exact / code)", "code - exact at 64-256"]
        lines += ["Means ± std over seeds; L=64 and L=256 with grad=\"exact\"; `64-256 match` "
                  "applies the rule to those of 64, 128 and 256 levels that ran (exact); `matches "
                  "from L`: the smallest L from which every larger L tested matches; `code - "
                  "exact` is the raw difference of the metric at 64, 128, 256 levels.", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in all_rows]
        lines.append("")
    for t in tasks:
        s = summaries[t.name]
        lines += [f"## {t.title}", "", t.description, "",
                  f"{t.metric} ({'higher' if t.higher_is_better else 'lower'} is better), mean ± "
                  f"std over {len(meta['seeds'])} seed(s), {s['steps']} steps per run, "
                  f"{s['seconds']:.0f} s for the task.", ""]
        lines += task_table(t, s)
        lines += [""] + s["lines"] + [""]
        if t.name in plots:
            lines += [f"![{t.title}]({plots[t.name]})", ""]
    (out / "report.md").write_text("\n".join(lines))


def write_runs_csv(path: Path, runs: list[dict]) -> None:
    names = list(dict.fromkeys(k for r in runs for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, restval="")
        writer.writeheader()
        for r in runs:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})


# ----------------------------------------------------------------------------------------------
# Command line


def level_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be integers, got {text!r}") from None
    if not 2 <= value <= 256:
        raise argparse.ArgumentTypeError(f"levels must be in [2, 256], got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag ends in one line on stderr and exit status 2, not argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(
        prog="reproduce_levels.py", description=__doc__.split("\n\n")[0],
        epilog="The module docstring describes the tasks, the rule and the output.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="3 seeds, short budgets, fewer L on the recurrent tasks: about 11 "
                           "minutes on one CPU core")
    mode.add_argument("--smoke", action="store_true",
                      help="every task, 1 seed, L in {4, 64}, a few steps: seconds (for tests)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), metavar="TASK",
                   help=f"tasks to run (default all: {' '.join(TASKS)})")
    p.add_argument("--levels", nargs="+", type=level_count, default=None, metavar="L",
                   help="level counts for every task (default: the mode's; full: "
                        f"{' '.join(map(str, LEVELS))})")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="number of seeds, 0..N-1 (default full 5, quick 3, smoke 1)")
    p.add_argument("--steps-scale", type=positive_float, default=1.0,
                   help="multiply every task's number of training steps (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: the models are small)")
    p.add_argument("--out", default=None,
                   help="output folder (default results/reproduce_levels; "
                        "--smoke: results/reproduce_levels_smoke)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    default_out = "results/reproduce_levels_smoke" if args.smoke else "results/reproduce_levels"
    args.out = Path(args.out or default_out)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    preset = PRESETS[mode]
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    seeds = list(range(args.seeds or preset["seeds"]))
    command = shlex.join(["python", "scripts/reproduce_levels.py", *argv])
    load_start, t_start, cpu_start = load_average(), time.perf_counter(), time.process_time()
    loads = []  # the 1-minute load average after each run: how busy the machine was

    selected = [TASK_BUILDERS[name](preset, device, args.threads) for name in args.tasks]
    plan = []  # (task, variant, seed, steps)
    for t in selected:
        levels = tuple(args.levels) if args.levels else preset["levels"].get(
            t.name, preset["levels"]["units"])
        steps = max(1, round(preset["steps"][t.name] * args.steps_scale))
        plan += [(t, v, s, steps) for v in variants_for(t, levels) for s in seeds]

    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(total=len(plan), unit="run", dynamic_ncols=True, file=sys.stderr)
    runs, task_seconds = [], {}
    for t, v, seed, steps in plan:
        if bar is not None:
            bar.set_postfix_str(f"{t.name}: {v.label}, seed {seed}")
        t0 = time.perf_counter()
        try:
            result, error = t.train_one(v, seed, steps), None
        except Diverged as exc:
            result, error = {"metric": None}, str(exc)
        seconds = time.perf_counter() - t0
        task_seconds[t.name] = task_seconds.get(t.name, 0.0) + seconds
        metric = result.pop("metric")
        if metric is not None and not math.isfinite(metric):
            metric, error = None, f"metric {metric}"
        runs.append({"task": t.name, "kind": v.kind, "levels": v.levels, "grad": v.grad,
                     "series": v.series, "seed": seed, "steps": steps, "metric": metric,
                     "diverged": error is not None, "error": error,
                     "bits_per_unit": bits_per_unit(v.levels), "seconds": round(seconds, 3),
                     **result})
        loads.append(load_average())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    loads = [x for x in loads if x is not None]

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "mode": mode, "seeds": seeds, "tasks": args.tasks,
            "environment": environment(device, args.threads), "load_start": load_start,
            "load_end": load_average(),
            "load_during": {"mean": round(statistics.fmean(loads), 2) if loads else None,
                            "max": max(loads) if loads else None},
            "n_runs": len(runs),
            "n_diverged": sum(r["diverged"] for r in runs),
            "steps_scale": args.steps_scale, "rule": "matches: no seed diverged and mean not "
            "worse than the reference's by more than max(std_L, std_ref)"}
    summaries, plots = {}, {}
    plt, why = import_pyplot()
    for t in selected:
        mine = [r for r in runs if r["task"] == t.name]
        s = summarize(t, mine)
        s["lines"], s["rows"] = findings(t, s)
        s["steps"], s["seconds"] = mine[0]["steps"], task_seconds.get(t.name, 0.0)
        summaries[t.name] = s
        if plt is not None:
            plots[t.name] = f"{t.name}.png"
            subtitle = (f"{mode} mode, {len(seeds)} seed(s), {s['steps']} steps, "
                        f"{meta['environment']['device']}")
            plot_task(plt, args.out / plots[t.name], t, s, subtitle)
    if plt is None:
        print(f"plots skipped: matplotlib does not import ({why})", file=sys.stderr)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["cpu_s"] = round(time.process_time() - cpu_start, 1)
    write_report(args.out, meta, selected, summaries, plots)
    write_json(args.out / "runs.json", {
        "meta": meta, "runs": runs,
        "summary": {t.name: {
            "metric": t.metric, "higher_is_better": t.higher_is_better, "trivial": t.trivial,
            "variants": [{"label": v.label, "kind": v.kind, "levels": v.levels, "grad": v.grad,
                          "mean": st.mean, "std": st.std, "n": st.n, "diverged": st.diverged}
                         for v, st in summaries[t.name]["stats"].items()],
            "findings": summaries[t.name]["lines"]} for t in selected}})
    write_runs_csv(args.out / "runs.csv", runs)
    print(f"wrote {args.out / 'report.md'}, runs.json, runs.csv and {len(plots)} plot(s); "
          f"{len(runs)} runs in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
