"""Train a character-level language model with a recurrent layer, carrying the state across windows.

The text is the Python standard library's own source (the ``.py`` files at the top of the folder
``sysconfig`` names ``stdlib``): nothing is downloaded, and every machine with Python has it. Every
tenth file (in sorted order) is held out for validation.

Model: ``nn.Embedding(V, embed)`` -> recurrent layer(s) (``batch_first=True``) -> ``nn.Linear(hidden,
V)``. The training text is cut into ``batch`` contiguous streams; step s reads window s of every
stream, and the recurrent state of the previous window is carried in (detached), as in truncated
backpropagation through time. Adam, gradient-norm clipping.

``--levels none`` trains ``torch.nn.LSTM`` / ``torch.nn.GRU`` itself; a number trains
``discrnn.DiscreteLSTM`` / ``DiscreteGRU`` with that many levels (``--grad`` picks its
straight-through rule). Validation runs the held-out text the same way (carried state, from zero),
in bits per character.

At the end one line of JSON goes to stdout (and ``--json``), and one CSV row is appended to
``--csv``: validation bits per character (and along the way, every ``--eval-every`` steps), median
time per training step, tokens per second, peak memory of the process (CPU: high-water RSS; CUDA:
``torch.cuda.max_memory_allocated``), the largest |c| of the carried LSTM cell state, and the
settings.

Usage::

    python scripts/train_char_lm.py --rnn lstm --levels 64           # ~800 steps, a few minutes
    python scripts/train_char_lm.py --rnn gru --levels none --seed 1
    python scripts/train_char_lm.py --quick                          # smoke run, seconds
    python scripts/train_char_lm.py --summarize results/train_char_lm.csv  # markdown table of runs
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import glob
import json
import math
import os
import resource
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a convenience; training does not need it
    tqdm = None

import discrnn

UNKNOWN = "\0"  # stands for characters of the validation text never seen in training


# -- data ----------------------------------------------------------------------------------------


def load_corpus(root: str | None = None) -> tuple[str, str]:
    """(train text, validation text) from the standard library's top-level ``.py`` files."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if len(files) < 10:
        raise SystemExit(f"found only {len(files)} .py files under {root}: need at least 10")
    train, val = [], []
    for n, path in enumerate(files):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        (val if n % 10 == 0 else train).append(text)
    return "\n".join(train), "\n".join(val)


class Vocabulary:
    def __init__(self, text: str):
        self.chars = [UNKNOWN] + sorted(set(text) - {UNKNOWN})
        self.index = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(ch, 0) for ch in text], dtype=torch.long)


def as_streams(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[N] -> [batch, N // batch]: ``batch`` contiguous streams read side by side."""
    n = ids.numel() // batch
    return ids[: n * batch].view(batch, n)


def windows(streams: torch.Tensor, window: int, start: int):
    """Input and target windows [batch, window] at position ``start`` (wrapping to the beginning
    when the streams run out)."""
    n = streams.shape[1] - 1
    start %= n - window + 1 if n >= window else 1
    x = streams[:, start : start + window]
    y = streams[:, start + 1 : start + window + 1]
    return x, y


# -- model ---------------------------------------------------------------------------------------


def make_rnn(kind: str, levels: int | None, embed: int, hidden: int, layers: int, grad: str,
             backend: str | None, cell_clip: float | None = None) -> nn.Module:
    if levels is None:
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        return cls(embed, hidden, layers, batch_first=True)
    if kind == "gru":
        return discrnn.DiscreteGRU(embed, hidden, layers, batch_first=True, levels=levels, grad=grad,
                                   backend=backend)
    extra = {} if cell_clip is None else {"cell_clip": cell_clip}
    return discrnn.DiscreteLSTM(embed, hidden, layers, batch_first=True, levels=levels, grad=grad,
                                backend=backend, **extra)


class CharLM(nn.Module):
    def __init__(self, vocab: int, embed: int, rnn: nn.Module, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = rnn
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        y, state = self.rnn(self.embed(x), state)
        return self.head(y), state


def detach(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def cell_magnitude(state) -> float:
    """Largest |c| of an LSTM state (h, c), |h| of a GRU state."""
    if state is None:
        return 0.0
    s = state[1] if isinstance(state, tuple) else state
    return float(s.detach().abs().max())


@torch.no_grad()
def evaluate(model, streams: torch.Tensor, window: int, device) -> float:
    """Bits per character over the whole validation streams, state carried from zero."""
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    for start in range(0, streams.shape[1] - 1 - window + 1, window):
        x, y = windows(streams, window, start)
        logits, state = model(x.to(device), state)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1) / math.log(2)


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- training ------------------------------------------------------------------------------------


def parse_levels(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rnn", choices=("lstm", "gru"), default="lstm")
    p.add_argument("--levels", type=parse_levels, default=64,
                   help="levels of the discrete layer (2..256), or 'none' for torch.nn.LSTM/GRU")
    p.add_argument("--grad", choices=("code", "exact"), default="code",
                   help="straight-through rule of the discrete layer (default code)")
    p.add_argument("--cell-clip", type=float, default=None,
                   help="DiscreteLSTM's bound on |c| (default: the library's, 8.0)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--val-chars", type=int, default=131072,
                   help="validation characters (spread over the batch's streams)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("torch", "triton"), default=None,
                   help="discrete layer backend (default: by device)")
    p.add_argument("--csv", default="results/train_char_lm.csv", help="CSV to append a row to")
    p.add_argument("--json", default=None, help="also write the result line to this file")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 200k characters of text, hidden 32, batch 4, window 16, 6 steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> dict:
    if args.quick:
        args.hidden, args.embed, args.batch, args.window = 32, 16, 4, 16
        args.steps, args.eval_every, args.val_chars = 6, 3, 512
    if args.levels is not None and not 2 <= args.levels <= 256:
        raise SystemExit(f"--levels must be in [2, 256] or 'none', got {args.levels}")
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)

    train_text, val_text = load_corpus()
    if args.quick:  # a smoke run needs no more text than this
        train_text = train_text[:200_000]
    vocab = Vocabulary(train_text)
    train = as_streams(vocab.encode(train_text), args.batch)
    val = as_streams(vocab.encode(val_text[: args.val_chars + args.batch]), args.batch)

    torch.manual_seed(args.seed)
    rnn = make_rnn(args.rnn, args.levels, args.embed, args.hidden, args.layers, args.grad,
                   args.backend, args.cell_clip)
    model = CharLM(len(vocab), args.embed, rnn, args.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    history, step_times = [], []
    state, loss_value = None, float("nan")
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True, file=sys.stderr)
    for step in range(1, args.steps + 1):
        x, y = windows(train, args.window, (step - 1) * args.window)
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        logits, state = model(x, detach(state))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t0)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            print(f"step {step}: loss is {loss_value}; stopping", file=sys.stderr)
            break
        if step % args.eval_every == 0 or step == args.steps:
            history.append({"step": step, "val_bpc": round(evaluate(model, val, args.window, device), 4),
                            "max_abs_state": round(cell_magnitude(state), 3)})
        if bar is not None:
            bar.set_postfix(bpc=f"{loss_value / math.log(2):.3f}",
                            val=history[-1]["val_bpc"] if history else "-")
            bar.update(1)
    if bar is not None:
        bar.close()

    step_s = statistics.median(step_times) if step_times else float("nan")
    name = ("torch.nn." + args.rnn.upper()) if args.levels is None else (
        f"Discrete{args.rnn.upper()}")
    result = {
        "layer": name,
        "rnn": args.rnn,
        "levels": args.levels,
        "grad": args.grad if args.levels is not None else None,
        "cell_clip": getattr(rnn, "cell_clip", None) if args.rnn == "lstm" else None,
        "seed": args.seed,
        "steps_done": len(step_times),
        "val_bpc": history[-1]["val_bpc"] if history else float("nan"),
        "train_bpc": round(loss_value / math.log(2), 4),
        "history": history,
        "ms_per_step": round(step_s * 1e3, 2),
        "tokens_per_s": round(args.batch * args.window / step_s, 1) if step_times else 0.0,
        "peak_mib": round(peak_memory_mib(device), 1),
        "max_abs_state": round(cell_magnitude(state), 3),
        "layers": args.layers, "hidden": args.hidden, "embed": args.embed, "batch": args.batch,
        "window": args.window, "steps": args.steps, "lr": args.lr, "clip": args.clip,
        "threads": args.threads, "vocab": len(vocab), "device": str(device),
        "torch": torch.__version__, "discrnn": discrnn.__version__,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    return result


def save(result: dict, args) -> None:
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(line + "\n")
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in result.items()}
        with open(path.with_suffix(".lock"), "w") as lock:  # runs side by side share a CSV
            fcntl.flock(lock, fcntl.LOCK_EX)
            rows, fields = [], list(row)
            if path.exists():  # keep earlier rows; a column new to the file is added to all
                with path.open(newline="") as f:
                    reader = csv.DictReader(f)
                    rows, old = list(reader), list(reader.fieldnames or [])
                fields = old + [k for k in row if k not in old]
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(rows + [row])


def summarize(path: str) -> str:
    """A markdown table of a results CSV: validation bits per character, mean +- std over seeds,
    per (layer, levels, grad), and the difference from torch's layer of the same kind."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # a "variant" column (scripts/lstm_cell_variants.py) names the layer's variant
        layer = r["layer"] + (f" ({r['variant']})" if r.get("variant") else "")
        groups.setdefault((r["rnn"], layer, r["levels"], r["grad"]), []).append(r)

    def stats(values):
        mean = statistics.fmean(values)
        return mean, statistics.stdev(values) if len(values) > 1 else float("nan")

    baseline = {rnn: stats([float(r["val_bpc"]) for r in g])[0]
                for (rnn, layer, _, _), g in groups.items() if layer.startswith("torch.nn.")}
    lines = ["| layer | levels | grad | seeds | val. bits/char, mean ± std | vs torch.nn | "
             "per seed | ms/step (median of runs) |", "|---|---|---|---|---|---|---|---|"]

    def order(key):
        rnn, layer, levels, grad = key
        return (rnn, not layer.startswith("torch.nn."), grad or "", int(levels or 0))

    for key in sorted(groups, key=order):
        rnn, layer, levels, grad = key
        g = sorted(groups[key], key=lambda r: int(r["seed"]))
        bpc = [float(r["val_bpc"]) for r in g]
        mean, std = stats(bpc)
        delta = f"{mean - baseline[rnn]:+.3f}" if rnn in baseline and not layer.startswith("torch.nn.") else ""
        ms = statistics.median(float(r["ms_per_step"]) for r in g)
        lines.append(f"| {layer} | {levels or '-'} | {grad or '-'} | {len(g)} | {mean:.3f} ± {std:.3f} | "
                     f"{delta} | {' / '.join(f'{b:.3f}' for b in bpc)} | {ms:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summarize"]:
        if len(argv) != 2:
            raise SystemExit("usage: train_char_lm.py --summarize RESULTS.csv")
        print(summarize(argv[1]))
        return
    args = build_parser().parse_args(argv)
    save(run(args), args)


if __name__ == "__main__":
    main()
