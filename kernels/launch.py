"""Relaunching a compiled Triton kernel with less host work than ``JITFunction.run``.

In eager mode a recurrent layer launches its step kernels once per time step, and on a GPU the
host's time per step sets the layer's time (README, "On an NVIDIA H200"). Per launch, Triton's run
binds and specialises the arguments (its binder), reads its knobs and hooks, looks the variant up
by a cache key built from the specialisation and the options, checks the kernel's globals, asks
for the device and the stream and calls the compiled variant's launcher. Measured through a
stand-in sm_90 driver on a Zen 4 core (``scripts/bench_launch.py``, Triton 3.6 and 3.9) that is
10-15 us per step kernel, of which the binder is about half.

A relaunch keeps the binder, so the specialisation (argument dtypes, 16-byte alignment, integers
equal to 1 or divisible by 16, the constexprs) is Triton's own answer for these arguments, and
takes the variant from a table keyed by that specialisation, which full launches fill; then it
calls the variant's launcher as Triton's run does (same grid, stream, function and arguments).
It skips what cannot change between the steps of one pass:

* the knobs and hooks: a full launch records whether they allow relaunching (no launch enter/exit
  hooks, no pre-run hooks, no debug, instrumentation or stage-inspection mode); where they do not,
  it empties the kernel's table, so every later launch is a full one until a full launch finds
  them clear again. A hook set between a pass's first (full) launch and its later ones sees those
  later ones from the pass after;
* the options: the step launchers pass the same option set on every launch of a kernel;
* the kernel's globals: module constants, checked by the full launches.

A specialisation the table lacks (a later step's view aligned differently, say) is a full launch,
which compiles it where needed and adds it. The layers relaunch exactly where they skip their
argument checks: the later steps of a pass, whose first step of each kind was a full launch.
"""

from __future__ import annotations

from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

__all__ = ["launch", "RELAUNCH", "clear_variants"]

RELAUNCH = True  # the switch (tests and scripts/bench_launch.py compare both routes)

# id(JITFunction), device -> {specialisation: compiled kernel}; JITFunction hashes its source's key
# through a Python method, so the table keys on the (immortal, module-level) kernel's id.
_variants: dict = {}


def clear_variants() -> None:
    """Forget every recorded variant (the next launch of each kernel is a full one)."""
    _variants.clear()


def _no_hooks(hook) -> bool:
    # Triton 3.6-3.9 keep launch hooks in a HookChain (``calls``); older ones in a plain attribute
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


def _relaunch_allowed(kernel) -> bool:
    runtime, compilation = knobs.runtime, knobs.compilation
    return (
        _no_hooks(runtime.launch_enter_hook)
        and _no_hooks(runtime.launch_exit_hook)
        and not kernel.pre_run_hooks
        and not runtime.debug
        and not getattr(kernel, "debug", False)
        and not getattr(compilation, "instrumentation_mode", "")
        and not getattr(compilation, "fpsan_homomorphic_casts", False)
        and getattr(runtime, "add_stages_inspection_hook", None) is None
    )


def launch(kernel, grid: tuple, args: tuple, options: dict, relaunch: bool = False) -> None:
    """``kernel[grid](*args, **options)``; ``relaunch``: this launch follows a full launch of
    ``kernel`` in the same pass (see the module's docstring), so it may take the short route."""
    if not isinstance(kernel, JITFunction):  # the interpreter's kernels: no compiled variants
        kernel.run(*args, grid=grid, warmup=False, **options)
        return
    if relaunch and RELAUNCH:
        device = driver.active.get_current_device()
        table = _variants.get((id(kernel), device))
        if table is not None:
            bound, specialization, _ = kernel.device_caches[device][4](*args, **options)
            compiled = table.get(tuple(specialization))
            if compiled is not None:
                compiled.run(grid[0], grid[1] if len(grid) > 1 else 1,
                             grid[2] if len(grid) > 2 else 1,
                             driver.active.get_current_stream(device), compiled.function,
                             compiled.packed_metadata, None, None, None, *bound.values())
                return
    # kernel.run is what kernel[grid](...) calls, without the proxy it makes per launch
    compiled = kernel.run(*args, grid=grid, warmup=False, **options)
    if not RELAUNCH:
        return
    device = driver.active.get_current_device()
    key = (id(kernel), device)
    if compiled is not None and _relaunch_allowed(kernel):
        _, specialization, _ = kernel.device_caches[device][4](*args, **options)
        _variants.setdefault(key, {})[tuple(specialization)] = compiled
    else:
        _variants.pop(key, None)
