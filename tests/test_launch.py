"""discrnn.kernels.launch: the short route for a pass's later step launches.

The route itself needs compiled kernels, so its checks run in a subprocess through a stand-in sm_90
driver (tests/launch_check.py: the same compiled variant and the same launcher arguments as
Triton's run, a new specialisation through Triton's run, hooks turn it off). Here, under the
interpreter as the other layer tests: that the layers ask for it exactly on the steps whose
argument checks they skip."""

import collections
import os
import subprocess
import sys

import pytest
import torch

import discrnn
from discrnn.kernels import launch as launch_module
from discrnn.kernels import rnn as rnn_kernels

HERE = os.path.dirname(os.path.abspath(__file__))


def test_relaunch_hands_the_launcher_what_tritons_run_does():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "launch_check.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all launch checks passed" in proc.stdout


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layers_relaunch_every_step_but_the_first(monkeypatch, mode):
    calls = collections.Counter()
    real_launch = rnn_kernels.launch

    def counting(kernel, grid, args, options, relaunch=False):
        calls[(kernel.__name__, relaunch)] += 1
        return real_launch(kernel, grid, args, options, relaunch)

    monkeypatch.setattr(rnn_kernels, "launch", counting)
    torch.manual_seed(0)
    T, B = 5, 3
    layer_cls = discrnn.DiscreteLSTM if mode == "LSTM" else discrnn.DiscreteGRU
    layer = layer_cls(4, 8, levels=16, backend="triton", bidirectional=True)
    x = torch.randn(T, B, 4, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    kind = mode.lower()
    forward, backward = f"_{kind}_step_fwd_kernel", f"_{kind}_step_bwd_kernel"
    # per direction: the first step a full (checked) launch, the other T - 1 relaunches
    assert calls[(forward, False)] == 2 and calls[(forward, True)] == 2 * (T - 1), calls
    assert calls[(backward, False)] == 2 and calls[(backward, True)] == 2 * (T - 1), calls
    # the kernels that run once per chunk or call never ask for it
    assert not any(relaunch for (name, relaunch) in calls
                   if name not in (forward, backward)), calls

