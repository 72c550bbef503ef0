"""The variants ``discrnn-profile`` compares, the language-model stack each one trains, its data and
one training step.

A variant name reads ``BASE[-bf16][-ckpt-sqrt|-ckpt-quarter]`` or ``BASE-graph``:

* ``BASE``: ``lstm`` / ``gru`` (torch.nn.LSTM / GRU; cuDNN on CUDA), ``dlstm-L`` / ``dgru-L``
  (discrnn.DiscreteLSTM / DiscreteGRU with ``levels=L``, 2 <= L <= 256);
* ``-bf16``: the forward (embedding, recurrent layers, head) under ``torch.autocast(device_type,
  dtype=torch.bfloat16)``, the loss in float32 (DiscreteLSTM / GRU compute as torch.nn.LSTM / GRU
  do under autocast: see the README's "Mixed precision");
* ``-ckpt-sqrt`` / ``-ckpt-quarter``: the recurrent layers run in consecutive segments of
  ceil(sqrt(T)) / ceil(T/4) steps, each under ``torch.utils.checkpoint.checkpoint(...,
  use_reentrant=False)``, the state carried from segment to segment: what users do today to save
  memory. Embedding and head stay outside the segments;
* ``-graph`` (CUDA only): the recurrent layers run through ``torch.cuda.make_graphed_callables``,
  captured once per input shape (the first step at a new length pays the capture), so their
  forward and backward are one CUDA graph replay each; embedding, head, loss and Adam stay eager.

The stack is ``nn.Embedding(vocab, embed) -> N recurrent layers (hidden) -> nn.Linear(hidden,
vocab)``, sequence-first ([T, B] tokens), trained with Adam on next-token cross-entropy; the state at
the end of a step is carried (detached) into the next, as in truncated backpropagation through time.
The weights are drawn from one seed, so the torch.nn, checkpointed, autocast and discrete LSTMs all
start from the same weights (DiscreteLSTM/GRU initialise as torch.nn does).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..rnn import DiscreteGRU, DiscreteLSTM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
GATES = {"lstm": 4, "gru": 3}
LEARNING_RATE = 2e-3  # Adam, as scripts/train_char_lm.py
# Dictionary of the synthetic text (see token_stream): its size and the range of word lengths.
WORDS, WORD_MIN, WORD_MAX = 512, 2, 8

_NAME = re.compile(r"(?P<base>lstm|gru|d(?P<dcell>lstm|gru)-(?P<levels>\d+))"
                   r"(?:(?P<bf16>-bf16)?(?:-ckpt-(?P<ckpt>sqrt|quarter))?|(?P<graph>-graph))")


@dataclass(frozen=True)
class Variant:
    """One way of running the recurrent layers; ``name`` as on the command line."""

    name: str
    cell: str  # "lstm" or "gru"
    levels: int | None  # None: torch.nn.LSTM / GRU
    bf16: bool = False
    ckpt: str | None = None  # None, "sqrt" or "quarter"
    graph: bool = False  # the recurrent layers under CUDA graphs

    @property
    def description(self) -> str:
        if self.levels is None:
            text = f"torch.nn.{self.cell.upper()}"
        else:
            text = f"Discrete{self.cell.upper()} L={self.levels}"
        if self.bf16:
            text += ", bf16 autocast"
        if self.ckpt:
            text += ", checkpoint " + ("sqrt(T)" if self.ckpt == "sqrt" else "T/4") + " segments"
        if self.graph:
            text += ", CUDA graphs"
        return text

    def segment_length(self, steps: int) -> int | None:
        """Steps per checkpointed segment at sequence length ``steps``; None without checkpoints."""
        if self.ckpt == "sqrt":
            return max(1, math.ceil(math.sqrt(steps)))
        if self.ckpt == "quarter":
            return max(1, math.ceil(steps / 4))
        return None


def parse_variant(name: str) -> Variant:
    """'dlstm-64-ckpt-sqrt' -> Variant; ValueError naming the accepted forms otherwise."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(
            f"unknown variant {name!r}: expected lstm, gru, dlstm-L or dgru-L (L levels, 2..256), "
            "optionally followed by -bf16 and/or -ckpt-sqrt or -ckpt-quarter, or by -graph")
    levels = None
    if m["levels"] is not None:
        levels = int(m["levels"])
        if not 2 <= levels <= 256:
            raise ValueError(f"variant {name!r}: levels must lie in [2, 256], got {levels}")
    cell = m["dcell"] or m["base"]
    return Variant(name, cell, levels, bool(m["bf16"]), m["ckpt"], bool(m["graph"]))


_UNSUPPORTED: dict = {}


def torch_rnn_unsupported(cell: str, device: torch.device | str, amp: torch.dtype | None) -> str:
    """Why torch.nn.LSTM / GRU (``cell`` "lstm" / "gru") cannot run on ``device`` under
    ``torch.autocast(dtype=amp)`` (None: no autocast), or "" where it can: found by running a
    one-unit module once. On a CPU without AVX-512, oneDNN has no bfloat16 LSTM, and torch's
    module, cast to bfloat16 by autocast, raises "could not create a primitive descriptor"."""
    device = torch.device(device)
    key = (cell, device.type, amp)
    if key not in _UNSUPPORTED:
        module = (nn.LSTM if cell == "lstm" else nn.GRU)(1, 1, device=device)
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                module(torch.zeros(1, 1, 1, device=device))
            _UNSUPPORTED[key] = ""
        except RuntimeError as exc:
            what = f"under {str(amp).replace('torch.', '')} autocast " if amp is not None else ""
            _UNSUPPORTED[key] = (f"torch.nn.{cell.upper()} cannot run {what}on this "
                                 f"{device.type.upper()} ({str(exc).splitlines()[0][:60]})")
    return _UNSUPPORTED[key]


def default_variant_names(levels: list[int]) -> list[str]:
    """What users do today, then discrnn at every level count, then discrnn with checkpoints."""
    names = ["lstm", "gru", "lstm-ckpt-sqrt", "lstm-ckpt-quarter", "lstm-bf16"]
    names += [f"dlstm-{L}" for L in levels] + [f"dgru-{L}" for L in levels]
    names.append(f"dlstm-{levels[0]}-ckpt-sqrt")
    return names


@dataclass(frozen=True)
class StackConfig:
    """Shape of the language-model stack and of its data; the same for every variant of a run."""

    vocab: int
    embed: int
    hidden: int
    layers: int
    batch: int
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    chunk_size: int = 32  # discrnn chunk_size

    def parameter_count(self, cell: str) -> int:
        """Parameters of the stack with ``cell`` layers (formula; tested against the modules)."""
        g = GATES[cell] * self.hidden
        count = self.vocab * self.embed + self.hidden * self.vocab + self.vocab
        for layer in range(self.layers):
            inputs = self.embed if layer == 0 else self.hidden
            count += g * (inputs + self.hidden) + 2 * g
        return count

    def static_bytes(self, cell: str) -> int:
        """What training holds besides activations: parameters, their gradients and Adam's two
        moments, each in the parameter dtype (the gradients exist during the step only)."""
        elem = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return 4 * elem * self.parameter_count(cell)


class LMStack(nn.Module):
    """Embedding -> recurrent layers -> linear head, run as ``variant`` says."""

    def __init__(self, variant: Variant, cfg: StackConfig):
        super().__init__()
        if variant.graph and torch.device(cfg.device).type != "cuda":
            raise ValueError(f"variant {variant.name!r}: CUDA graphs need a CUDA device, got "
                             f"{cfg.device!r}")
        self.variant, self.cfg = variant, cfg
        # -graph: one captured callable per input shape (a plain dict: not submodules, so the
        # parameters are listed once)
        self._graphed: dict = {}
        self.embed = nn.Embedding(cfg.vocab, cfg.embed)
        if variant.levels is None:
            rnn_cls = nn.LSTM if variant.cell == "lstm" else nn.GRU
            self.rnn = rnn_cls(cfg.embed, cfg.hidden, cfg.layers)
        else:
            rnn_cls = DiscreteLSTM if variant.cell == "lstm" else DiscreteGRU
            self.rnn = rnn_cls(cfg.embed, cfg.hidden, cfg.layers, levels=variant.levels,
                               chunk_size=cfg.chunk_size)
        self.head = nn.Linear(cfg.hidden, cfg.vocab)

    def initial_state(self) -> tuple[torch.Tensor, ...]:
        p = self.head.weight
        shape = (self.cfg.layers, self.cfg.batch, self.cfg.hidden)
        n = 2 if self.variant.cell == "lstm" else 1
        return tuple(torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(n))

    def _rnn(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _call_rnn(self.rnn, x, state)

    def _graphed_rnn(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        """``_rnn`` through a CUDA graph captured for this shape (``-graph``)."""
        key = (tuple(x.shape), x.requires_grad, tuple(s.shape for s in state))
        if key not in self._graphed:
            # static inputs of their own (each call copies into them), not this step's tensors
            static = (x.detach().clone().requires_grad_(x.requires_grad),
                      *(s.detach().clone() for s in state))
            self._graphed[key] = torch.cuda.make_graphed_callables(_RNNCall(self.rnn), static)
        return self._graphed[key](x, *state)

    def run_rnn(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        if self.variant.graph:
            y, *state = self._graphed_rnn(x, state)
            return y, tuple(state)
        seg = self.variant.segment_length(x.shape[0])
        if seg is None:
            y, *state = self._rnn(x, *state)
            return y, tuple(state)
        ys = []
        for start in range(0, x.shape[0], seg):
            y, *state = checkpoint(self._rnn, x[start:start + seg], *state, use_reentrant=False)
            ys.append(y)
        return torch.cat(ys), tuple(state)

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...],
                kept: StageKept | None = None):
        """tokens [T, B] -> logits [T, B, vocab], final state (a tuple of [layers, B, hidden])."""
        stage = kept.stage if kept is not None else (lambda name: contextlib.nullcontext())
        with stage("embed"):
            x = self.embed(tokens)
        with stage("rnn"):
            y, state = self.run_rnn(x, state)
        with stage("head"):
            logits = self.head(y)
        if kept is not None:
            # What the recurrent layers keep beyond their input, output and parameters (which
            # exist anyway): the figure BASELINES.md and tests/test_rnn.py::kept_bytes count.
            kept.rnn_exclude = [x, y, *state, *self.rnn.parameters()]
        return logits, state


class _RNNCall(nn.Module):
    """``rnn(x, state)`` with flat tensor arguments and results, the form
    ``torch.cuda.make_graphed_callables`` captures; ``rnn``'s parameters are its parameters."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _call_rnn(self.rnn, x, state)


def _call_rnn(rnn: nn.Module, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
    """rnn(x, state) as a flat tuple (y, h_n[, c_n]): the form checkpoint and CUDA graphs take."""
    y, new = rnn(x, state if len(state) == 2 else state[0])
    return (y, *(new if isinstance(new, tuple) else (new,)))


class StageKept:
    """Saved-tensor hooks over a whole forward pass that record, per named stage, the distinct
    storages autograd keeps (identity hooks: nothing is copied). One set of hooks for the whole
    pass, because hooks nest: a second set around the recurrent layers would hide what they keep
    from the outer one."""

    def __init__(self):
        self.stages: dict[str, dict[int, int]] = {}
        self.current = "other"
        self.rnn_exclude: list[torch.Tensor] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        previous, self.current = self.current, name
        try:
            yield
        finally:
            self.current = previous

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.stages.setdefault(self.current, {})[storage.data_ptr()] = storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def rnn_bytes(self) -> int:
        excluded = {t.untyped_storage().data_ptr() for t in self.rnn_exclude}
        return sum(n for p, n in self.stages.get("rnn", {}).items() if p not in excluded)

    def step_bytes(self, exclude: list[torch.Tensor]) -> int:
        """Everything kept by the forward pass and the loss, once per storage, minus ``exclude``."""
        excluded = {t.untyped_storage().data_ptr() for t in exclude}
        merged: dict[int, int] = {}
        for storages in self.stages.values():
            merged.update(storages)
        return sum(n for p, n in merged.items() if p not in excluded)


def token_stream(cfg: StackConfig, length: int) -> torch.Tensor:
    """[length, batch] int64 tokens on ``cfg.device``: random words (WORD_MIN..WORD_MAX tokens
    each, uniform over the vocabulary) drawn from a seeded dictionary of WORDS words and
    concatenated. Random, but with structure a recurrent model can learn within a few steps (the
    rest of a word follows from its start), so the loss after a few steps tells variants apart.
    Depends only on (seed, vocab, batch, length): every variant gets the same data."""
    # Drawn on the CPU (device given everywhere, whatever torch's default device), then moved.
    cpu = torch.device("cpu")
    g = torch.Generator(cpu).manual_seed(cfg.seed + 1)
    lengths = torch.randint(WORD_MIN, WORD_MAX + 1, (WORDS,), generator=g, device=cpu)
    flat = torch.randint(0, cfg.vocab, (int(lengths.sum()),), generator=g, device=cpu)
    starts = torch.cumsum(lengths, 0) - lengths
    per_row = length // WORD_MIN + 1  # enough words for `length` tokens in every row
    ids = torch.randint(0, WORDS, (cfg.batch * per_row,), generator=g, device=cpu)
    word_len = lengths[ids]
    # Position of every token of every chosen word in `flat`: its word's start + offset in word.
    ends = torch.cumsum(word_len, 0)
    offsets = (torch.arange(int(ends[-1]), device=cpu)
               - torch.repeat_interleave(ends - word_len, word_len))
    tokens = flat[torch.repeat_interleave(starts[ids], word_len) + offsets]
    row_start = torch.cat([torch.zeros(1, dtype=torch.long, device=cpu),
                           ends[per_row - 1::per_row][:-1]])
    index = row_start[:, None] + torch.arange(length, device=cpu)  # [batch, length]
    return tokens[index].t().contiguous().to(cfg.device)


def build(variant: Variant, cfg: StackConfig):
    """(model, Adam optimizer, initial state) with the weights of ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = LMStack(variant, cfg).to(device=cfg.device, dtype=DTYPES[cfg.dtype])
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    return model, optimizer, model.initial_state()


def train_step(model: LMStack, optimizer, tokens: torch.Tensor, state, kept: StageKept | None = None):
    """One training step on ``tokens`` [T + 1, B] (inputs tokens[:-1], targets tokens[1:]):
    forward, cross-entropy, backward, Adam step, gradients freed. Returns (loss tensor, detached
    final state in the parameter dtype). With ``kept``, saved-tensor hooks count what autograd
    keeps during the forward pass and the loss."""
    inputs, targets = tokens[:-1], tokens[1:]
    hooks = kept.hooks() if kept is not None else contextlib.nullcontext()
    with hooks:
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16,
                            enabled=model.variant.bf16):
            logits, state = model(inputs, state, kept)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()  # cross-entropy in float32, as autocast does on CUDA
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    # As in `loss = F.cross_entropy(model(x), y)`: only autograd holds the logits' descendants in
    # backward (cross-entropy keeps its log-softmax), not a [T, B, vocab] reference of ours.
    del logits
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dtype = model.head.weight.dtype
    return loss.detach(), tuple(s.detach().to(dtype) for s in state)


def optimizer_state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in optimizer.state.values()
               for t in st.values() if isinstance(t, torch.Tensor))


def parameter_bytes(model: nn.Module) -> int:
    # numel, not storage size: on CUDA nn.LSTM's weights are views of one flat cuDNN buffer.
    return sum(p.numel() * p.element_size() for p in model.parameters())
