"""The parts of ``discrnn-profile`` (``discrnn/profile.py``, the command line).

* ``variants``: the variant names (``lstm``, ``dlstm-64-ckpt-sqrt``, ...), the language-model stack
  each one builds, its data and one training step;
* ``memory``: what a process holds (RSS and its high-water mark) and what autograd keeps
  (saved-tensor hooks);
* ``worker``: the measurements, each run in a fresh process (peak memory, timing rounds);
* ``search``: the longest sequence within a memory budget, by doubling and bisection over real runs;
* ``report``: the Pareto frontier, the terminal table, CSV, JSON and the plots.

Nothing here is imported by ``import discrnn``; matplotlib and tqdm are imported only when used.
"""
