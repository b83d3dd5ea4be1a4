"""Cost of the attributions beyond attention against one attention capture, on the demo validation split.

    python benchmarks/attribution_cost.py
    python benchmarks/attribution_cost.py --dataset aflow__Egap --split val --repeat 5 --threads 4

A freshly initialised model of the published architecture (``crabnet.training.train.build_model``, mat2vec;
the cost of a forward pass does not depend on the weights) on ``<data-dir>/benchmark_data/<dataset>``.
Timed, each the best of ``--repeat`` rounds that run every task once (wall seconds; the machine
may be shared, so the load average is printed before and after):

- ``capture``: the store's per-capture work, :func:`crabnet.explain.capture.capture_split` with a writer
  that keeps nothing: the attention pass (maps copied to the host) and ``leave_one_out``;
- ``shapley``: :func:`crabnet.explain.attribution.shapley` (exact up to 8 elements) over the split;
- ``contribution``: :func:`crabnet.explain.attribution.contribution`;
- ``head_ablation``: :func:`crabnet.explain.attribution.head_ablation` (L·H + 1 passes of the split);
- ``wired``: what a capture computing attention, Shapley values, leave-one-out and contribution in
  one go would cost: the attention pass with ``hidden=True``, Shapley values and leave-one-out
  from one set of sub-compounds reusing the pass's predictions (``coalition_attribution(full=...)``),
  the contribution from the same pass's encoder output (head ablation not included);
- ``ablation_<m>``: head ablation of a fixed random subsample of m compounds (``--subsample``),
  with the largest difference of its ``mean_abs_change`` from the whole split's, relative to the
  whole split's largest value.

Prints seconds of each and the ratios to ``capture`` (the issue's goal: Shapley + ablation within
1.5x of the attention capture alone).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from crabnet.data import load_dataset
from crabnet.explain.attribution import (
    coalition_attribution,
    contribution,
    contribution_from_head,
    head_ablation,
    shapley,
)
from crabnet.explain.capture import STAGING_CHUNK_BYTES, capture_split
from crabnet.jobs.cli import DEMO_DATASET
from crabnet.training.train import Scaler, build_model
from crabnet.utils import seed_everything


class NullWriter:
    """The interface ``capture_split`` writes to, keeping nothing (chunking as ``AttentionWriter``'s)."""

    def __init__(self, n: int, E: int, n_layers: int, n_heads: int):
        self.E, self.with_attribution = E, True
        self.chunk_n = int(np.clip(STAGING_CHUNK_BYTES // (4 * n_layers * n_heads * E * E), 1, n))

    def begin_capture(self, step: int) -> int:
        return 0

    def write_batch(self, c: int, start: int, attention: np.ndarray) -> None:
        pass

    def write_prediction(self, c: int, prediction: np.ndarray) -> None:
        pass

    def write_attribution(self, c: int, attribution: np.ndarray) -> None:
        pass


@torch.no_grad()
def wired_capture(model, data, scaler: Scaler, batch_size: int) -> None:
    """Attention, prediction, leave-one-out, Shapley and contribution of every batch from one attention
    pass plus the sub-compounds (what a wired capture would run before head ablation)."""
    model.eval()
    for i in range(0, len(data), batch_size):
        el = torch.as_tensor(data.elements[i : i + batch_size], dtype=torch.long)
        fr = torch.as_tensor(data.fractions[i : i + batch_size], dtype=torch.float32)
        out = model.forward_internals(el, fr, attention=True, hidden=True)
        out.attention.float().cpu().numpy()
        coalition_attribution(model, el, fr, scaler, scaler.mean, full=out.output[:, 0], batch_size=batch_size)
        contribution_from_head(model.head(out.hidden[-1]).float(), el > 0, scaler)


def best_of(repeat: int, tasks: dict) -> dict[str, float]:
    """Smallest wall time of each ``tasks[name]()`` over ``repeat`` rounds; every round runs every task once,
    so a burst of load on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeat):
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def subsample_ablation(model, data, scaler: Scaler, whole: np.ndarray, m: int):
    """Head ablation of m compounds drawn at random (seed 0) as a task to time, and how far its
    ``mean_abs_change`` is from the whole split's ``whole`` (L, H)."""
    rows = np.sort(np.random.default_rng(0).choice(len(data), size=min(m, len(data)), replace=False))
    el, fr, y = data.elements[rows], data.fractions[rows], data.target[rows]
    part = head_ablation(model, el, fr, y, scaler)["mean_abs_change"]
    return lambda: head_ablation(model, el, fr, y, scaler), (
        f"  mean_abs_change off by <= {np.abs(part - whole).max() / whole.max():.0%} of the largest"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    parser.add_argument("--dataset", default=DEMO_DATASET)
    parser.add_argument("--split", default="val")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--subsample", type=int, nargs="*", default=[64, 128], help="head ablation of m compounds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_dataset(args.data_dir, args.dataset, splits=("train", args.split), verbose=False, fetch=False)
    data, scaler = splits[args.split], Scaler.fit(splits["train"].target)
    seed_everything(0)
    model = build_model("mat2vec", n_elements=data.width).eval()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    writer = NullWriter(len(data), data.width, L, H)
    k = data.n_real
    print(
        f"{args.dataset} {args.split}: {len(data)} compounds, width {data.width}, real elements "
        f"{dict(zip(*np.unique(k, return_counts=True)))}; {model.n_params():,} parameters, L={L}, H={H}; "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; load average {os.getloadavg()}"
    )
    sub = coalition_attribution(model, data.elements, data.fractions, scaler, scaler.mean)
    print(f"shapley: {sub.rows} distinct sub-compounds (full compounds included), {int(sub.exact.sum())} exact")
    tasks = {
        "capture": lambda: capture_split(model, data, scaler, writer, 0),
        "shapley": lambda: shapley(model, data.elements, data.fractions, scaler, scaler.mean),
        "contribution": lambda: contribution(model, data.elements, data.fractions, scaler),
        "head_ablation": lambda: head_ablation(model, data.elements, data.fractions, data.target, scaler),
        "wired": lambda: wired_capture(model, data, scaler, writer.chunk_n),
    }
    whole = head_ablation(model, data.elements, data.fractions, data.target, scaler)["mean_abs_change"]
    notes = {}
    for m in args.subsample:
        tasks[f"ablation_{m}"], notes[f"ablation_{m}"] = subsample_ablation(model, data, scaler, whole, m)
    seconds = best_of(args.repeat, tasks)
    base = seconds["capture"]
    for name, s in seconds.items():
        print(f"{name:>16s} {s:8.3f} s  {s / base:6.2f}x capture{notes.get(name, '')}")
    for label, parts in (
        ("shapley+ablation", ("shapley", "head_ablation")),
        ("all three", ("shapley", "contribution", "head_ablation")),
        ("wired+ablation", ("wired", "head_ablation")),
        *((f"wired+abl._{m}", ("wired", f"ablation_{m}")) for m in args.subsample),
    ):
        s = sum(seconds[p] for p in parts)
        print(f"{label:>16s} {s:8.3f} s  {s / base:6.2f}x capture")
    print("goal of the issue: shapley+ablation <= 1.5x capture")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
