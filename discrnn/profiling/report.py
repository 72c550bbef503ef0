"""What ``discrnn-profile`` writes: the Pareto frontier, the terminal tables, CSV, JSON and plots,
and the description of where it ran."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Where it ran


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """1-minute load average; None where the system does not tell."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def git_commit() -> str | None:
    """Commit of the discrnn checkout this runs from (+dirty), None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=here).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# Figures


def finite_or_none(value):
    """Numbers that were not measured (NaN, inf) are written as empty / null, never as numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def pareto_flags(points: list[dict], x: str = "total_bytes", y: str = "ms_median") -> list[bool]:
    """For each point: True when no other point has x <= and y <= with one of them strictly lower
    (lower memory and lower time are both better). Points without both figures are never on it."""
    def ok(p):
        return (not p.get("error") and p.get(x) is not None and p.get(y) is not None
                and math.isfinite(p[x]) and math.isfinite(p[y]))

    flags = []
    for p in points:
        if not ok(p):
            flags.append(False)
            continue
        dominated = any(ok(q) and q[x] <= p[x] and q[y] <= p[y] and (q[x] < p[x] or q[y] < p[y])
                        for q in points if q is not p)
        flags.append(not dominated)
    return flags


def fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def render_table(title: str, header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns aligned; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"\n== {title}", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Files


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """One line per row, the run's meta data repeated on every line (so a line stands alone)."""
    names = list(meta) + [k for k in rows[0] if k not in meta] if rows else list(meta)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = {**meta, **row}
            writer.writerow({k: ("" if v is None else v) for k, v in
                             ((k, finite_or_none(v)) for k, v in out.items())})


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return finite_or_none(obj)


def write_json(path: Path, document: dict) -> None:
    with open(path, "w") as f:
        json.dump(_clean(document), f, indent=1, allow_nan=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib is optional)


def import_pyplot():
    """matplotlib.pyplot on the Agg backend, or (None, reason) when it does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - the plots are optional
        return None, f"{type(exc).__name__}: {exc}"
    return plt, ""


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def has_memory(p: dict) -> bool:
    """Whether a point has a measured step memory to plot: a finite total, not marked "memory
    unresolved" (its step never rose above the warm-up's RSS: see discrnn.profile)."""
    return (p["total_bytes"] is not None and math.isfinite(p["total_bytes"])
            and p.get("memory_resolved") is not False)


def plot_peak_vs_length(plt, path: Path, points: list[dict], variants: list[str],
                        budget: int | None, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in variants:
        mine = sorted((p for p in points if p["variant"] == name and has_memory(p)),
                      key=lambda p: p["length"])
        if mine:
            ax.plot([p["length"] for p in mine], [p["total_bytes"] / MIB for p in mine], marker="o",
                    label=name, linestyle="--" if name.startswith("d") else "-")
    if budget is not None:
        ax.axhline(budget / MIB, color="black", linewidth=0.8, linestyle=":",
                   label=f"budget {budget / MIB:.0f} MiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (steps)")
    ax.set_ylabel("training-step memory, MiB (parameters + Adam + step peak)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    _save(plt, fig, path)


def plot_time_memory(plt, path: Path, points: list[dict], lengths: list[int], title: str) -> None:
    """One panel per length: each variant's (step memory, time per step); the frontier of each cell
    joined (LSTM solid, GRU dashed)."""
    n = len(lengths)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), squeeze=False)
    for ax, T in zip(axes[0], lengths):
        mine = [p for p in points if p["length"] == T and p["ms_median"] is not None
                and has_memory(p) and not p["error"]]
        for p in mine:
            ax.scatter(p["total_bytes"] / MIB, p["ms_median"],
                       marker="*" if p["pareto"] else "o", s=90 if p["pareto"] else 30,
                       color="tab:red" if p["pareto"] else "tab:blue")
            ax.annotate(p["variant"] + ("" if p["timed_steps_ok"] else " (few)"),
                        (p["total_bytes"] / MIB, p["ms_median"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        for cell, style in (("lstm", "-"), ("gru", "--")):  # one frontier per cell
            front = sorted((p for p in mine if p["pareto"] and p["cell"] == cell),
                           key=lambda p: p["total_bytes"])
            if front:
                ax.plot([p["total_bytes"] / MIB for p in front], [p["ms_median"] for p in front],
                        style, color="tab:red", linewidth=0.8, label=f"{cell.upper()} frontier")
        if any(p["pareto"] for p in mine):
            ax.legend(fontsize=7)
        ax.set_xlabel("training-step memory, MiB")
        ax.set_ylabel("median ms per training step")
        ax.set_title(f"T={T}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    _save(plt, fig, path)


def plot_budget(plt, path: Path, budget_rows: list[dict], title: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    names = [r["variant"] for r in budget_rows]
    values = [r["longest_length"] or 0 for r in budget_rows]
    colors = ["tab:blue" if n.startswith("d") else "tab:gray" for n in names]
    ax.bar(range(len(names)), values, color=colors)
    for i, r in enumerate(budget_rows):
        label = ("≥" if r["capped"] else "") + str(r["longest_length"])
        ax.annotate(label, (i, values[i]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("longest T within the budget")
    ax.set_title(title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)
