"""Test setup: run the Triton kernels through the interpreter when there is no GPU, and poison fresh
buffers so that an output element a kernel forgets to write fails the test."""

import os

import torch

# Must happen before discrnn (and so triton.jit) is imported: the mode is fixed at decoration.
# Without a GPU the Triton kernels run through the interpreter on CPU tensors; with one, the same
# tests run them natively: factory functions then make CUDA tensors by default.
if torch.cuda.is_available():
    torch.set_default_device("cuda")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import discrnn  # noqa: E402,F401
from discrnn.backend import triton_interpreting  # noqa: E402

# The buffer poisoning that discrnn.testing offers to kernel authors (NaN / 0xA5 / -7).
from discrnn.testing import poison_ as _poison  # noqa: E402


@pytest.fixture(autouse=True)
def poison_fresh_buffers(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        # torch.set_default_device reaches factories through a function mode that recognises the
        # real torch.empty only, so this stand-in passes the default device on itself.
        if kwargs.get("device") is None:
            kwargs["device"] = torch.get_default_device()
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    return (
        f"torch {torch.__version__}, cuda: {torch.cuda.is_available()}, "
        f"triton interpreter: {triton_interpreting()}"
    )


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
