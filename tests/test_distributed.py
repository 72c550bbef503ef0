"""DistributedDataParallel with DiscreteLSTM on CPU (gloo, 2 processes): the same gradients and
weights as one process training on the same global batch."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from discrnn import DiscreteGRU, DiscreteLSTM

T, B, I, H, STEPS = 10, 8, 5, 6, 3


class _Model(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn = cls(I, H, num_layers=2, levels=64, dropout=0.0)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])


def _data():
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(STEPS, T, B, I, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (STEPS, B), generator=g)
    return xs, ys


def _train(model, xs, ys, rows):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first_grads = None
    for step in range(STEPS):
        loss = nn.functional.cross_entropy(model(xs[step][:, rows]), ys[step][rows])
        opt.zero_grad()
        loss.backward()
        if first_grads is None:
            first_grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return first_grads, [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, init_file, out_file, cls_name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = _Model(DiscreteLSTM if cls_name == "DiscreteLSTM" else DiscreteGRU).double()
        ddp = nn.parallel.DistributedDataParallel(model)
        xs, ys = _data()
        per = B // world
        grads, weights = _train(ddp, xs, ys, slice(rank * per, (rank + 1) * per))
        if rank == 0:
            torch.save({"grads": grads, "weights": weights}, out_file)
        # Both ranks leave together: a rank that tears gloo down while the other still talks to
        # it can abort the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                    reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("cls", [DiscreteLSTM, DiscreteGRU])
def test_ddp_matches_one_process_on_the_global_batch(tmp_path, cls):
    out_file = tmp_path / "ddp.pt"
    env = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    os.environ.update(env)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out_file), cls.__name__),
                       nprocs=2, join=True, start_method="spawn")
    ddp = torch.load(out_file, weights_only=True)
    torch.manual_seed(0)
    model = _Model(cls).double()
    xs, ys = _data()
    grads, weights = _train(model, xs, ys, slice(0, B))
    # The mean of the two half-batch mean losses is the global mean: the gradients agree to the
    # rounding of the all-reduce's sum order.
    for name, a, b in zip([n for n, _ in model.named_parameters()], ddp["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    for name, a, b in zip([n for n, _ in model.named_parameters()], ddp["weights"], weights):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert any(float(g.abs().sum()) > 0 for g in grads[:4])  # the recurrent weights learn
