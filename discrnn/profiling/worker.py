"""The measurements of ``discrnn-profile``, each in a fresh process.

Processes. Every measurement runs in a child process of its own. Memory processes are forked from
a multiprocessing "forkserver": a clean interpreter (started by exec, never touched by CUDA or
torch's thread pools) that has imported only torch and discrnn, started with
``MALLOC_MMAP_THRESHOLD_=65536``. No child inherits another's allocator state or peak, and the
torch import is paid once. Timing processes are started by "spawn" (a fresh interpreter each,
paying the import) with the parent's environment, so they allocate as a user's training run does
(see ``_context``). On CUDA a fresh process is a clean allocator state as well. The parent only
orchestrates (threads that start children and wait for them); it builds no model.

Peak memory of one training step (:func:`memory_task`):

1. build the stack and its Adam optimizer, the tokens of one window (T + 1 tokens per row);
2. warm-up: one training step on ``warmup_tokens`` tokens (64 at discrnn's default chunk size),
   carrying the state from zero. It makes Adam's moments, thread pools, BLAS handles and lazy
   library state (oneDNN's, see ``warmup_tokens``); it is that short because blocks below the mmap
   threshold that it frees stay in the heap, where the measured step would reuse them unseen;
3. baseline: CPU, the resident set size right after resetting the high-water mark
   (``/proc/self/clear_refs``); CUDA, ``torch.cuda.memory_allocated`` after
   ``torch.cuda.reset_peak_memory_stats``. It holds the runtime, the parameters, Adam's moments,
   the tokens and the carried state;
4. one training step over all T tokens (forward with saved-tensor hooks counting what is kept,
   cross-entropy, backward, Adam step, gradients freed), with the state carried in from step 2;
5. peak = CPU ``getrusage(RUSAGE_SELF).ru_maxrss`` (the high-water mark), CUDA
   ``torch.cuda.max_memory_allocated``, minus the baseline. It holds what the step adds: the
   activations kept for backward, the logits, the gradients, the temporaries of backward and of
   Adam. ``static`` = parameters + Adam's moments, counted from the tensors; ``total = static +
   peak`` is what the step needs beside the runtime, and what a budget is compared with.

CPU children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (see ``discrnn.profiling.memory``). Tensors
below 64 KiB still come from the heap; their fragmentation is roughly constant and small beside
the figures at the default sizes, but dominates at ``--quick`` sizes.

Timing (:func:`timing_task`): one process per sequence length builds every variant (same seed,
same weights where the shapes agree), gives each one untimed training step on 2 tokens (Adam's
moments, lazy library state), then runs ``warmup`` untimed and ``steps`` timed rounds over
consecutive windows of T tokens; a round is one training step of every variant in turn, so a load
change on a shared machine hits all variants alike. The step is timed with ``time.perf_counter``
(CUDA: after a synchronize on both ends). The losses of the rounds are returned: all variants see
the same tokens in the same order.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import threading
import time
import traceback

import torch

from .memory import MMAP_THRESHOLD, memory_baseline, memory_peak, rss_peak_of
from .variants import (StackConfig, StageKept, build, optimizer_state_bytes, parameter_bytes,
                       parse_variant, token_stream, train_step)

# The fewest tokens per row of the warm-up step in a memory process (see step 2 above).
WARMUP_TOKENS = 16


def warmup_tokens(cfg) -> int:
    """Tokens per row of the warm-up step: enough for discrnn to pack its weights as the measured
    step does (rnn_function._MIN_PACKED_PRODUCTS steps: panels or oneDNN's layout for the per-step
    products; _MIN_ONEDNN_CHUNKS chunks: oneDNN's layout for the chunk-wide ones), so that oneDNN's
    one-time state (JIT-compiled kernels, about 6 MiB) is in the baseline for discrnn as for
    torch.nn.LSTM (with 16 tokens, one chunk, a plain DiscreteLSTM step at H=512 counted it: 151-152
    against 146 MiB)."""
    from ..rnn_function import _MIN_ONEDNN_CHUNKS, _MIN_PACKED_PRODUCTS

    return max(WARMUP_TOKENS, _MIN_PACKED_PRODUCTS, _MIN_ONEDNN_CHUNKS * cfg.chunk_size)
POLL_S = 0.02  # how often the parent reads a watched child's high-water mark


def _setup(payload: dict) -> tuple[StackConfig, torch.device]:
    cfg = StackConfig(**payload["config"])
    torch.set_num_threads(payload["threads"])
    return cfg, torch.device(cfg.device)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def memory_task(payload: dict, send) -> dict:
    """Peak memory and kept bytes of one training step of one variant at one length (see the
    module docstring). ``send(("baseline", {...}))`` tells a watching parent the baseline."""
    cfg, device = _setup(payload)
    cuda = device.type == "cuda"
    variant = parse_variant(payload["variant"])
    steps = payload["steps"]
    model, optimizer, state = build(variant, cfg)
    tokens = token_stream(cfg, steps + 1)
    _, state = train_step(model, optimizer, tokens[: warmup_tokens(cfg) + 1], state)
    gc.collect()
    static = parameter_bytes(model) + optimizer_state_bytes(optimizer)

    base, peak_reset = memory_baseline(device)
    send(("baseline", {"rss": base, "static": static, "cuda": cuda}))

    # A graph replay runs no saved-tensor hooks (and the capture's warm-up calls would be counted):
    # no kept bytes for -graph variants.
    kept = None if variant.graph else StageKept()
    try:
        loss, state = train_step(model, optimizer, tokens, state, kept)
        loss = float(loss)
    except Exception as exc:  # noqa: BLE001 - an out-of-memory step is a result, not a failure
        if cuda and _is_oom(exc):
            return {"exceeded": True, "oom": True, "static_bytes": static}
        raise
    peak = memory_peak(device) - base
    params = list(model.parameters())
    return {
        "peak_bytes": peak, "static_bytes": static, "total_bytes": static + peak,
        "kept_rnn_bytes": kept.rnn_bytes() if kept else None,
        "kept_step_bytes": kept.step_bytes([tokens, *params]) if kept else None,
        "loss": loss, "peak_reset": peak_reset, "exceeded": False,
    }


def timing_task(payload: dict, send) -> dict:
    """Interleaved timing rounds of every variant at one length (see the module docstring).
    Returns {variant: {"times_ms": [...], "losses": [...], "error": str}}."""
    cfg, device = _setup(payload)
    cuda = device.type == "cuda"
    steps, warmup, length = payload["steps"], payload["warmup"], payload["length"]
    rounds = warmup + steps
    # One stream for all variants: round r trains on window r (T + 1 tokens, one shared).
    tokens = token_stream(cfg, rounds * length + 1)
    runs, results = {}, {}
    for name in payload["variants"]:
        results[name] = {"times_ms": [], "losses": [], "error": ""}
        try:
            runs[name] = list(build(parse_variant(name), cfg))
        except Exception as exc:  # noqa: BLE001 - recorded in that variant's row
            results[name]["error"] = f"{type(exc).__name__}: {exc}"
    for name, run in list(runs.items()):
        try:
            _, run[2] = train_step(run[0], run[1], tokens[: warmup_tokens(cfg) + 1], run[2])
        except Exception as exc:  # noqa: BLE001 - recorded, the variant leaves the rounds
            results[name]["error"] = f"{type(exc).__name__}: {exc}"
            del runs[name]
    for r in range(rounds):
        window = tokens[r * length: (r + 1) * length + 1]
        for name, run in list(runs.items()):
            model, optimizer, state = run
            try:
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                loss, run[2] = train_step(model, optimizer, window, state)
                if cuda:
                    torch.cuda.synchronize(device)
                elapsed = (time.perf_counter() - start) * 1e3
                loss = float(loss)
            except Exception as exc:  # noqa: BLE001 - recorded, the variant leaves the rounds
                results[name]["error"] = f"{type(exc).__name__}: {exc}"
                del runs[name], run, model, optimizer, state
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                continue
            results[name]["losses"].append(loss)
            if r >= warmup:
                results[name]["times_ms"].append(elapsed)
    return results


TASKS = {"memory": memory_task, "timing": timing_task}


def _child_main(conn, task: str, payload: dict) -> None:
    """Entry point of a child process: runs TASKS[task], sends ("result", dict) or ("error",
    one-line message, traceback)."""
    try:
        result = TASKS[task](payload, conn.send)
        conn.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                   traceback.format_exc()))
    finally:
        conn.close()


_CONTEXTS: dict = {}
_START_LOCK = threading.Lock()  # children are started from several parent threads
_MMAP_VAR = "MALLOC_MMAP_THRESHOLD_"


def _context(task: str):
    """Memory tasks: the forkserver, started with MALLOC_MMAP_THRESHOLD_ so that RSS follows the
    live tensors. Timing tasks: "spawn" (a fresh interpreter per process) with the parent's own
    environment, i.e. glibc's default, adaptive threshold as in a user's training run: under the
    64 KiB threshold every large tensor is a fresh mapping, page-faulted in and zeroed on each
    step, which slowed DiscreteLSTM's training step by about 30 % (torch.nn.LSTM's by about 5 %)
    in a test on this project's 2-core CPU. A user's own MALLOC_MMAP_THRESHOLD_ is kept for both."""
    with _START_LOCK:
        if not _CONTEXTS:
            fork = multiprocessing.get_context("forkserver")
            # torch._dynamo: imported lazily by the first optimizer (about 1 s), so once here
            # rather than in every child.
            fork.set_forkserver_preload(["torch", "torch._dynamo", "discrnn",
                                         "discrnn.profiling.worker"])
            own = os.environ.get(_MMAP_VAR)
            # glibc reads the variable when the forkserver starts; its children inherit it.
            os.environ[_MMAP_VAR] = own or MMAP_THRESHOLD
            try:
                from multiprocessing import forkserver

                forkserver.ensure_running()
            finally:
                if own is None:
                    del os.environ[_MMAP_VAR]
            _CONTEXTS.update(memory=fork, timing=multiprocessing.get_context("spawn"),
                             threshold=own or MMAP_THRESHOLD)
    return _CONTEXTS[task]


def mmap_threshold() -> str:
    """The MALLOC_MMAP_THRESHOLD_ the memory processes run with (the user's, or ours)."""
    return os.environ.get(_MMAP_VAR, MMAP_THRESHOLD)


def run_task(task: str, payload: dict, *, budget_bytes: int | None = None,
             timeout_s: float = 3600.0) -> dict:
    """TASKS[task](payload) in a fresh child process; the result dict, or {"error": message}.

    With ``budget_bytes`` (CPU memory tasks) the parent watches the child: once the child has sent
    its baseline, the parent reads the child's RSS high-water mark every POLL_S seconds and kills
    the child as soon as static + (high-water mark - baseline) exceeds the budget; the result is
    then {"exceeded": True, "killed": True, "total_bytes": what was seen}. A run that will not fit
    is thus stopped where it crosses the budget instead of running to its end. The high-water mark
    is kept by the kernel, so no spike between two reads is missed; the kill comes within about
    POLL_S of the crossing. A child that dies without a word (killed by the system for memory) is
    also an exceeded run when a budget is watched, an error otherwise."""
    ctx = _context(task)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(sender, task, payload), daemon=True)
    with _START_LOCK:
        proc.start()
    sender.close()
    deadline = time.monotonic() + timeout_s
    baseline = None
    try:
        while True:
            if receiver.poll(POLL_S):
                try:
                    message = receiver.recv()
                except EOFError:
                    message = None
                if message is None:
                    proc.join(5)
                    if budget_bytes is not None:
                        return {"exceeded": True, "killed": True, "total_bytes": math.nan,
                                "note": f"process ended without a result (exit code "
                                        f"{proc.exitcode}): taken as out of memory"}
                    return {"error": f"process ended without a result (exit code {proc.exitcode})"}
                kind = message[0]
                if kind == "baseline":
                    baseline = message[1]
                    continue
                if kind == "result":
                    return message[1]
                return {"error": message[1], "traceback": message[2]}
            if (budget_bytes is not None and baseline is not None and not baseline["cuda"]):
                hwm = rss_peak_of(proc.pid)
                if hwm is not None:
                    total = baseline["static"] + hwm - baseline["rss"]
                    if total > budget_bytes:
                        proc.kill()
                        return {"exceeded": True, "killed": True, "total_bytes": total,
                                "static_bytes": baseline["static"]}
            if time.monotonic() > deadline:
                proc.kill()
                return {"error": f"no result after {timeout_s:.0f} s"}
    finally:
        receiver.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
