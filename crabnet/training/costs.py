"""What the jobs of a step will cost, from rates measured on the machine at hand (``--plan``).

A short probe trains the real model on a synthetic set (batch 256, one thread on the CPU) and times
training rows and validation rows; :func:`training_cost_s` turns that into the seconds of one
training with a recipe, counting what the recipe does: every epoch trains on the training split and
evaluates the validation split once, and every SWA epoch evaluates it again after every batch. A
full recipe stops early; the expected epochs come from runs of this project (README): immi stopped
after 30-50 epochs, npj after 160-300.

The probe's rates are kept in ``<data-dir>/benchmarks/rates.json`` per machine, device, precision
and torch version, so a second plan takes no time.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from crabnet.progress import say

EXPECTED_EPOCHS = {"immi": 45, "npj": 240}  # a full recipe's epochs until its early stop (observed, see above)
PROBE_ROWS, PROBE_VAL, PROBE_BATCH = 1536, 1024, 256


@dataclass
class Rates:
    """Seconds per compound of one training step and of one validation pass, on one core (CPU) or one GPU."""

    train_row_s: float
    eval_row_s: float
    device: str
    precision: str
    threads: int


def _probe_data(n: int, seed: int):
    """A synthetic split of ``n`` compounds of 2-5 elements (typical benchmark widths)."""
    from crabnet.data import CompositionData

    rng = np.random.default_rng(seed)
    width = 5
    elements = np.zeros((n, width), np.int64)
    fractions = np.zeros((n, width), np.float32)
    for i in range(n):
        k = int(rng.integers(2, width + 1))
        elements[i, :k] = rng.choice(np.arange(1, 84), size=k, replace=False)
        x = np.sort(rng.random(k))[::-1]
        fractions[i, :k] = x / x.sum()
    return CompositionData(
        np.array([f"probe{i}" for i in range(n)], dtype=object),
        elements,
        fractions,
        rng.normal(size=n).astype(np.float32),
        np.arange(1, n + 1),
        "probe",
    )


def measure_rates(device: str = "cpu", precision: str = "auto") -> Rates:
    """Time training and validation of the real model on synthetic data (a few seconds, one CPU thread)."""
    import torch

    from crabnet.jobs.engine import limit_threads
    from crabnet.training.evaluate import Validator
    from crabnet.training.loop import fit
    from crabnet.training.recipe import Scaler, build_model, make_recipe, resolve_precision

    dev = torch.device(device)
    prec = resolve_precision(precision, dev)
    train, val = _probe_data(PROBE_ROWS, 0), _probe_data(PROBE_VAL, 1)
    scaler = Scaler.fit(train.target)
    with limit_threads(1 if dev.type == "cpu" else torch.get_num_threads()):
        model = build_model("mat2vec", n_elements=train.width).to(dev)
        seconds = []
        for epochs in (1, 3):  # the difference leaves out the first epoch's warm-up
            recipe = make_recipe("immi", epochs=epochs, swa=False, batch_size=PROBE_BATCH)
            t0 = time.perf_counter()
            fit(model, train, val, scaler, recipe, progress=False, val_every=10**6, precision=prec)
            seconds.append(time.perf_counter() - t0)
        validate = Validator(val, scaler, dev, 4096, prec)
        validate(model)
        t0 = time.perf_counter()
        for _ in range(3):
            validate(model)
        eval_s = (time.perf_counter() - t0) / 3
    train_s = max(seconds[1] - seconds[0], 1e-9) / 2
    return Rates(
        train_row_s=train_s / PROBE_ROWS,
        eval_row_s=eval_s / PROBE_VAL,
        device=str(dev),
        precision=prec,
        threads=1 if dev.type == "cpu" else 0,
    )


def cached_rates(data_dir: Path, device: str = "cpu", precision: str = "auto") -> Rates:
    """:func:`measure_rates`, kept in ``<data-dir>/benchmarks/rates.json`` for this machine and torch."""
    import torch

    from crabnet.layout import Layout
    from crabnet.utils import atomic_path, available_cpus

    path = Layout(data_dir).benchmarks() / "rates.json"
    dev_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    key = f"{platform.node()}|{dev_name or platform.machine()}|{device}|{precision}|torch {torch.__version__}"
    table: dict = {}
    if path.is_file():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
    if key in table:
        return Rates(**table[key])
    say(f"measuring training rates on {device} ({precision}) for the plan: a few seconds, once per machine")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    rates = measure_rates(device, precision)
    if load > available_cpus() - 0.5 and device == "cpu":  # other work shared the cores: rates too slow
        say(
            f"note: the machine was busy (load average {load:.1f} on {available_cpus()} cores); the estimates "
            "may be high and the rates are not kept"
        )
        return rates
    table[key] = asdict(rates)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1))
    return rates


def count_rows(csv: Path) -> int:
    """Data rows of a CSV (lines after the header; quick, no parsing)."""
    with open(csv, "rb") as f:
        return max(0, sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b"")) - 1)


def expected_epochs(recipe) -> int:
    """Epochs a training with ``recipe`` is expected to run (a full recipe stops early)."""
    if recipe.is_full() and recipe.early_stop:
        return min(recipe.epochs, EXPECTED_EPOCHS.get(recipe.name, recipe.epochs))
    return recipe.epochs


def training_cost_s(n_train: int, n_val: int, recipe, rates: Rates, epochs: int | None = None) -> float:
    """Seconds of one training (one core or one GPU): training rows, one validation per epoch, and a
    validation after every batch of each SWA epoch."""
    from crabnet.data import batch_size_for

    epochs = expected_epochs(recipe) if epochs is None else epochs
    bs = recipe.batch_size or batch_size_for(n_train, recipe.max_batch_size)
    batches = math.ceil(n_train / bs)
    first = recipe.epochs_step * recipe.swa_start - 1
    swa_epochs = sum(1 for e in range(epochs) if recipe.swa and (e + 1) % (2 * recipe.epochs_step) == 0 and e >= first)
    return (
        epochs * n_train * rates.train_row_s
        + epochs * n_val * rates.eval_row_s
        + swa_epochs * batches * n_val * rates.eval_row_s
    )


def dataset_training_cost_s(data_dir: Path, dataset: str, recipe, rates: Rates, epochs: int | None = None) -> float:
    """:func:`training_cost_s` for a dataset under ``data_dir`` (row counts of its CSVs); 0 if it is missing."""
    from crabnet.layout import Layout

    lay = Layout(data_dir)
    train, val = lay.split_csv(dataset, "train"), lay.split_csv(dataset, "val")
    if not (train.is_file() and val.is_file()):
        return 0.0
    return training_cost_s(count_rows(train), count_rows(val), recipe, rates, epochs)
