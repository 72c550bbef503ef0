"""What a benchmark records about where it ran: shared by the scripts in this folder."""

from __future__ import annotations

import sys

import torch

# Where a benchmark ran: the library's own helpers (shared with discrnn-profile).
from discrnn.profiling.report import device_name, git_commit, load_average, write_csv

__all__ = ["add_device_argument", "device_name", "git_commit", "load_average", "resolve_device",
           "save_figure", "write_csv"]


def add_device_argument(parser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available, else CPU")


def resolve_device(choice: str) -> torch.device:
    """The device of ``--device``; exits with a message when CUDA is asked for and absent."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    return torch.device(choice)


def save_figure(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
