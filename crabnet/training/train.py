"""Training, prediction and checkpoints for CrabNet.

The recipe (npj paper and original code): targets standardised with the training mean and std;
fraction jitter; RobustL1 loss; Lamb inside Lookahead; triangular cyclic learning rate
1e-4…6e-3 stepped per batch with a half-cycle of ``epochs_step`` epochs; SWA over the weights at
new validation minima, checked after every batch of every ``2*epochs_step``-th epoch; early stop
after three such epochs without a new minimum; the averaged weights are swapped in at the end.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import crabnet
from crabnet.data import CompositionData, batch_size_for
from crabnet.elements import feature_table
from crabnet.errors import UsageError
from crabnet.jobs import distributed
from crabnet.jobs.signals import STOP, Preempted, deferred_stop
from crabnet.layout import Layout
from crabnet.training.model import CrabNet, CrabNetConfig, real_slots
from crabnet.training.optim import SWA, Lamb, Lookahead, triangular_lr
from crabnet.utils import atomic_path


@dataclass
class Recipe:
    """Training settings. Build them with :func:`make_recipe` ("immi" or "npj", SPEC §4)."""

    name: str = "immi"  # which published recipe these settings start from
    epochs: int = 300
    epochs_step: int = 1  # half-cycle of the cyclic LR, in epochs; SWA checks every 2x this
    base_lr: float = 1e-4
    max_lr: float = 6e-3
    jitter: float = 0.02  # fraction noise: frac * (1 + N(0,1) * jitter)
    swa: bool = True
    swa_start: int = 2  # SWA checks start at epoch epochs_step * swa_start - 1
    early_stop: int = 3  # stop after this many SWA epochs in which no batch was averaged (0 = never)
    batch_size: int = 0  # 0 = the recipe's 2^round(log2(n_train)-4) in [128, max_batch_size]
    max_batch_size: int = 4096
    eval_batch_size: int = 4096
    lookahead_alpha: float = 0.5
    lookahead_k: int = 6

    def is_full(self) -> bool:
        """Whether these are exactly the settings of the named recipe (300 epochs, SWA early stop)."""
        return self.name in RECIPES and self == make_recipe(self.name, eval_batch_size=self.eval_batch_size)


# The two published recipes (SPEC §4): "npj" gave the published MAEs (Wang et al. 2021); "immi" is
# the default of the explainability paper's scripts (learning rate cycles every 2 epochs).
RECIPES = {"immi": {"epochs_step": 1}, "npj": {"epochs_step": 10}}


def make_recipe(name: str = "immi", **overrides) -> Recipe:
    """The named recipe with some settings replaced (e.g. ``epochs=8`` for a demo)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return Recipe(name=name, **{**RECIPES[name], **overrides})


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> "bf16" where the hardware runs bf16 matmuls natively, else "fp32".

    bf16 is chosen on CUDA GPUs that run it natively (compute capability 8.0 and newer, asked of
    ``device`` itself: :func:`cuda_bf16_native`) and on CPUs with AVX-512 bf16 or AMX tiles (there
    a bf16 matmul ran ~5x faster than fp32 on this project's 2-core machine); other CPUs emulate
    bf16 slowly, so they stay in fp32. Weights, optimiser state and the loss are fp32 either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if cuda_bf16_native(device) else "fp32"
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        fast = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        return "bf16" if fast else "fp32"
    return "fp32"


def cuda_bf16_native(device: torch.device | str) -> bool:
    """Whether the CUDA device ``device`` (not merely the current one) runs bf16 matmuls natively.

    ``torch.cuda.is_bf16_supported()`` asks about the *current* device and by default also counts
    GPUs that only emulate bf16 (compute capability < 8.0, where it is slower than fp32); here it is
    asked with ``including_emulation=False`` about ``device``. ROCm GPUs count as native, as PyTorch has it.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a PyTorch without the keyword: Ampere (8.0) and newer run bf16 natively
            return torch.version.hip is not None or torch.cuda.get_device_capability(index) >= (8, 0)


def autocast(precision: str, device: torch.device | str):
    """Context for a forward pass at ``precision`` ("fp32" or "bf16"; resolve "auto" first)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class Scaler:
    """Standardises targets with the training mean and (unbiased) std."""

    mean: float
    std: float

    @classmethod
    def fit(cls, y: np.ndarray) -> Scaler:
        y = np.asarray(y, dtype=np.float64)
        std = float(y.std(ddof=1)) if len(y) > 1 else 1.0
        return cls(float(y.mean()), std if std > 0 else 1.0)

    def scale(self, y):
        return (y - self.mean) / self.std

    def unscale(self, y):
        return y * self.std + self.mean


def robust_l1(pred: torch.Tensor, log_unc: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RobustL1: sqrt(2)·|ŷ−y|·exp(−log σ) + log σ, averaged."""
    return (math.sqrt(2.0) * (pred - target).abs() * torch.exp(-log_unc) + log_unc).mean()


def jitter_fractions(frac: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """frac·(1 + N(0,1)·scale), clamped to [0, 1], padding kept 0, re-normalised to sum 1."""
    if scale <= 0:
        return frac
    noise = torch.randn(frac.shape, generator=generator, device=frac.device, dtype=frac.dtype)
    out = (frac * (1 + noise * scale)).clamp(0, 1) * (frac > 0)
    return out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)


def build_model(features: str = "mat2vec", n_elements: int = 0, **overrides) -> CrabNet:
    """A fresh CrabNet on the given element features (config fields may be overridden)."""
    table, _ = feature_table(features)
    cfg = CrabNetConfig(features=features, d_in=table.shape[1], n_elements=n_elements, **overrides)
    return CrabNet(cfg, table)


def to_tensors(data: CompositionData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(elements, fractions, target) of a split as tensors on ``device``."""
    return (
        torch.as_tensor(data.elements, dtype=torch.long, device=device),
        torch.as_tensor(data.fractions, dtype=torch.float32, device=device),
        torch.as_tensor(data.target, dtype=torch.float32, device=device),
    )


@torch.no_grad()
def _forward_batches(
    model: CrabNet,
    el: torch.Tensor,
    fr: torch.Tensor,
    batch_size: int,
    precision: str,
    real: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Raw outputs (n, 3) in float32 for tensors already on the model's device (eval mode).

    ``real``: the real slots of each batch (:func:`crabnet.training.model.real_slots`), if known.
    """
    was_training = model.training
    model.eval()
    with autocast(precision, el.device):
        out = (
            torch.cat(
                [
                    model(
                        el[i : i + batch_size],
                        fr[i : i + batch_size],
                        real=None if real is None else real[i // batch_size],
                    )
                    for i in range(0, len(el), batch_size)
                ]
            )
            if len(el)
            else torch.empty(0, 3)
        )
    model.train(was_training)
    return out.float()


def predict(
    model: CrabNet,
    data: CompositionData,
    scaler: Scaler,
    *,
    batch_size: int = 4096,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and uncertainties (in target units) for every compound of ``data``.

    ``precision`` "fp32" (default, the same answer on every machine) or "bf16"/"auto".
    """
    device = device or next(model.parameters()).device
    el, fr, _ = to_tensors(data, device)
    out = _forward_batches(model, el, fr, batch_size, resolve_precision(precision, device)).double().cpu()
    pred = scaler.unscale(out[:, 0].numpy())
    unc = torch.exp(out[:, 2]).numpy() * scaler.std
    return pred, unc


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute error."""
    return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))))


class Validator:
    """Validation MAE of the current weights, as fast as the recipe allows.

    SWA epochs evaluate the validation split after every batch, so the split is moved to the
    device once and evaluated in large batches without autograd at the training precision.
    Under torchrun (:mod:`crabnet.jobs.distributed`) each rank evaluates a contiguous share of the split
    and the absolute errors are summed over the ranks: every rank gets the same MAE.
    """

    def __init__(self, data: CompositionData, scaler: Scaler, device: torch.device, batch_size: int, precision: str):
        self.n, self.world = len(data), distributed.world_size()
        if self.world > 1:  # this rank's rows [lo, hi) of the split
            r = distributed.rank()
            data = data.subset(np.arange(self.n * r // self.world, self.n * (r + 1) // self.world))
        self.el, self.fr, _ = to_tensors(data, device)
        self.target = np.asarray(data.target, np.float64)
        self.scaler, self.batch_size, self.precision = scaler, batch_size, precision
        # off the CPU each batch's real slots are found once, here, so the passes need no host synchronisation
        self.real = (
            None
            if torch.device(device).type == "cpu"
            else [real_slots(data.elements[i : i + batch_size], device) for i in range(0, len(data), batch_size)]
        )

    def __call__(self, model: CrabNet) -> float:
        out = _forward_batches(model, self.el, self.fr, self.batch_size, self.precision, self.real)
        pred = self.scaler.unscale(out[:, 0].double().cpu().numpy())
        if self.world == 1:
            return mae(pred, self.target)
        error = torch.tensor([float(np.abs(pred - self.target).sum())], dtype=torch.float64)
        return float(distributed.all_reduce(error)[0]) / self.n if self.n else float("nan")


@dataclass
class History:
    """What happened during ``fit``; the per-epoch lists have one entry per epoch run."""

    epochs_run: int = 0
    steps: int = 0
    precision: str = "fp32"
    train_loss: list[float] = field(default_factory=list)
    val_mae: list[float] = field(default_factory=list)  # NaN where not computed (val_every)
    epoch_lr: list[float] = field(default_factory=list)  # learning rate of the epoch's last batch
    epoch_swa: list[int] = field(default_factory=list)  # SWA additions in the epoch (-1: no SWA check)
    lr: list[float] = field(default_factory=list)  # learning rate of every optimiser step
    swa_updates: int = 0
    swa_failures: int = 0  # SWA epochs in which no batch was averaged
    swa_resets: int = 0
    stopped_early: bool = False
    swapped_swa: bool = False
    seconds: float = 0.0

    def per_epoch(self) -> dict:
        """The per-epoch curves as a dict of lists (for checkpoints and learning-curve figures)."""
        return {
            "epoch": list(range(1, self.epochs_run + 1)),
            "train_loss": self.train_loss,
            "val_mae": self.val_mae,
            "lr": self.epoch_lr,
            "swa_updates": [max(0, a) for a in self.epoch_swa],
            "swa_check": [a >= 0 for a in self.epoch_swa],
        }


# Callback events: ("start", epoch=-1, step=0), ("step", epoch, step), ("epoch", epoch, step).
# A callback with ``state_dict()``/``load_state_dict(state)`` has its state saved with the training
# state and restored on resume (instead of receiving "start" again).
Callback = Callable[[str, int, int], None]

SAVE_EVERY_S = 60.0  # default interval between saves of the training state
STATE_EVERY_ENV = "CRABNET_STATE_EVERY_S"  # environment variable overriding it (seconds; 0 = every epoch)


def state_save_interval() -> float:
    """Seconds between saves of the training state: ``$CRABNET_STATE_EVERY_S`` if set (a float >= 0;
    0 = after every epoch), else :data:`SAVE_EVERY_S` (60 s).

    Raises:
        UsageError: the variable is set but is not a number >= 0.
    """
    raw = os.environ.get(STATE_EVERY_ENV, "").strip()
    if not raw:
        return SAVE_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"{STATE_EVERY_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def save_training_state(
    path: Path | str,
    *,
    key: dict,
    epoch: int,
    model: CrabNet,
    optimizer: Lookahead,
    swa: SWA,
    gen: torch.Generator,
    noise_gen: torch.Generator,
    hist: History,
    callback_state: dict | None = None,
    partial: dict | None = None,
    rank_rng: list[dict] | None = None,
) -> None:
    """Everything ``fit`` needs to go on after ``epoch`` exactly as if it had not stopped.

    ``partial``: a stop inside the next epoch (SIGTERM) also saves how far that epoch went (batches
    done, the epoch's order, loss sum and SWA additions so far); ``fit`` goes on from that batch.
    ``rank_rng``: under torchrun, every rank's random-number state (:func:`_rng_state`, in rank order;
    the ranks draw their own dropout masks).
    Plain tensors, numbers and strings only (loadable with ``weights_only=True``); written to a
    temporary file and renamed, so an interruption while saving leaves the previous state intact.
    """
    device = next(model.parameters()).device
    state = {
        "key": key,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "swa": swa.state_dict(),
        "gen": gen.get_state(),
        "noise_gen": noise_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
        "history": asdict(hist),
        "callback": callback_state or {},
        "partial": partial or {},
        **({"rank_rng": rank_rng} if rank_rng else {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path | str, key: dict) -> dict | None:
    """The state saved by :func:`save_training_state` if it was written for ``key``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key:
        print(f"ignoring {path}: it was saved by a run with other settings")
        return None
    return state


def _restore_training_state(
    state: dict,
    model: CrabNet,
    optimizer: Lookahead,
    swa: SWA,
    gen: torch.Generator,
    noise_gen: torch.Generator,
    callback=None,
) -> tuple[History, int, dict]:
    """Load a state of :func:`save_training_state` into ``fit``'s objects (``callback``: a stateful one).

    Returns:
        ``(history, first epoch to run, partial)``; ``partial`` is empty unless the state was saved
        inside that epoch (then it holds the batches done, the order, loss sum and SWA additions).
    """
    device = next(model.parameters()).device
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    swa.load_state_dict(state["swa"])
    gen.set_state(state["gen"])
    noise_gen.set_state(state["noise_gen"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    if callback is not None:
        callback.load_state_dict(state["callback"])
    partial = dict(state.get("partial") or {})
    if partial:
        partial["order"], partial["loss_sum"] = partial["order"].to(device), partial["loss_sum"].to(device)
    return History(**state["history"]), int(state["epoch"]) + 1, partial


def plain_progress(progress: bool | None) -> bool:
    """Whether ``fit`` prints one plain line per epoch: ``progress`` None (the default) and stdout or
    stderr not a terminal (a cluster job's log, where the tqdm bar stays silent)."""

    def tty(stream) -> bool:
        return bool(getattr(stream, "isatty", lambda: False)())

    return progress is None and not (tty(sys.stdout) and tty(sys.stderr))


def _clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def epoch_line(desc: str, hist: History, recipe: Recipe, seconds_per_epoch: float, elapsed: float) -> str:
    """The log line of the epoch ``fit`` just finished, e.g. ``mp_bulk_modulus mat2vec epoch 12/300 loss
    0.1234 val MAE 10.87 SWA +3 (checks 2 failed 0) 4.1 s/epoch elapsed 0:49 ETA <=19:30``.

    ``SWA +k``: weights averaged in this epoch (``SWA -``: not a check epoch); ETA = the mean epoch
    time x the epochs left, written ``<=`` where SWA early stopping may end the run sooner.
    """
    parts = [f"{desc} epoch {hist.epochs_run}/{recipe.epochs} loss {hist.train_loss[-1]:.4f}"]
    if hist.val_mae and not math.isnan(hist.val_mae[-1]):
        parts.append(f"val MAE {hist.val_mae[-1]:.4g}")
    if recipe.swa:
        added = hist.epoch_swa[-1] if hist.epoch_swa else -1
        checks = sum(a >= 0 for a in hist.epoch_swa)
        parts.append(f"SWA {f'+{added}' if added >= 0 else '-'} (checks {checks} failed {hist.swa_failures})")
    eta = "<=" if recipe.swa and recipe.early_stop else ""
    parts.append(
        f"{seconds_per_epoch:.3g} s/epoch elapsed {_clock(elapsed)} "
        f"ETA {eta}{_clock(seconds_per_epoch * (recipe.epochs - hist.epochs_run))}"
    )
    return " ".join(parts)


def _bar_postfix(bar, hist: History, recipe: Recipe) -> None:
    """Loss, validation MAE and SWA counts beside the tqdm bar (no-op without a bar)."""
    if not hasattr(bar, "set_postfix"):
        return
    post = {"loss": f"{hist.train_loss[-1]:.4f}"}
    if not math.isnan(hist.val_mae[-1]):
        post["val_mae"] = f"{hist.val_mae[-1]:.4g}"
    if recipe.swa:
        post["swa"] = f"{hist.swa_updates}/{hist.swa_failures}"
    bar.set_postfix(post)


def _preempted(desc: str, where: str, state_path: Path | str | None) -> Preempted:
    """The exception ``fit`` raises on SIGTERM, saying where the training state was saved."""
    if not state_path:
        return Preempted(f"{desc}: SIGTERM in {where}; no training state is kept")
    return Preempted(
        f"{desc}: SIGTERM in {where}; the training state was saved at {state_path} "
        "(the same command goes on from there)"
    )


@dataclass
class _Run:
    """The objects of one :func:`fit` call, shared by the functions its loop is made of."""

    model: CrabNet
    train: CompositionData
    recipe: Recipe
    desc: str
    precision: str
    el: torch.Tensor  # (n, E) atomic numbers of the training split, on the model's device
    fr: torch.Tensor  # (n, E) fractions
    y: torch.Tensor  # (n,) standardised targets
    bs: int  # batch size
    n_batches: int  # batches per epoch
    half_cycle: int  # optimiser steps per half-cycle of the learning rate
    optimizer: Lookahead
    swa: SWA
    validate: Validator
    gen: torch.Generator  # shuffling
    noise_gen: torch.Generator  # fraction jitter, on the model's device
    hist: History
    key: dict  # identifies the run in its training state
    callback: Callback | None
    stateful: bool  # the callback has state_dict/load_state_dict
    state_path: Path | str | None
    t0: float  # perf_counter() at the start of this call
    net: torch.nn.Module  # what the training steps run: the model, or its DDP wrapper under torchrun
    seed: int = 0
    rank: int = 0  # this process's rank under torchrun (crabnet.jobs.distributed), else 0
    world: int = 1  # number of ranks training this model together
    t_resumed: float = 0.0  # training seconds before this call (a resumed run)

    @property
    def device(self) -> torch.device:
        return self.el.device


def _setup(
    model: CrabNet,
    train: CompositionData,
    val: CompositionData,
    scaler: Scaler,
    recipe: Recipe,
    *,
    seed: int,
    callback: Callback | None,
    desc: str,
    state_path: Path | str | None,
    state_key: dict | None,
    precision: str,
) -> _Run:
    """The data on the device, batch count, optimiser, SWA, validator and generators of a fresh run.

    Under torchrun this joins the process group (:func:`crabnet.jobs.distributed.init`) and wraps the model
    in DDP; every rank holds the whole training split and draws the same batch order and jitter.
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    distributed.init(device)
    precision = resolve_precision(precision, device)
    el, fr, y = to_tensors(train, device)
    n = len(train)
    # the original counts the training CSV's rows before unary compounds are dropped and duplicates merged
    bs = recipe.batch_size or batch_size_for(train.n_csv_rows, recipe.max_batch_size)
    n_batches = math.ceil(n / bs)
    params = [p for p in model.parameters() if p.requires_grad]
    key = {
        "n_train": n,
        "n_val": len(val),
        "batch_size": bs,
        "recipe": recipe_dict(recipe),
        "seed": seed,
        "precision": precision,
        "swa_rule": SWA.RULE,
        **(state_key or {}),
    }
    return _Run(
        model=model,
        train=train,
        recipe=recipe,
        desc=desc,
        precision=precision,
        el=el,
        fr=fr,
        y=scaler.scale(y),
        bs=bs,
        n_batches=n_batches,
        half_cycle=max(1, recipe.epochs_step * n_batches),
        optimizer=Lookahead(Lamb(params, lr=recipe.base_lr), alpha=recipe.lookahead_alpha, k=recipe.lookahead_k),
        swa=SWA(params),
        validate=Validator(val, scaler, device, recipe.eval_batch_size, precision),
        gen=torch.Generator(device="cpu").manual_seed(seed),
        noise_gen=torch.Generator(device=device).manual_seed(seed + 1),
        hist=History(precision=precision),
        key=key,
        callback=callback,
        stateful=callback is not None and hasattr(callback, "state_dict") and hasattr(callback, "load_state_dict"),
        state_path=state_path,
        t0=t0,
        net=distributed.wrap(model),
        seed=seed,
        rank=distributed.rank(),
        world=distributed.world_size(),
    )


def _resume(run: _Run) -> tuple[bool, int, dict]:
    """Load the training state saved for this run, if any.

    Returns:
        ``(resumed, first epoch to run, partial)`` (``partial``: see :func:`_restore_training_state`).
    """
    distributed.barrier()  # under torchrun: rank 0's file operations before fit (a stale state removed) are done
    state = load_training_state(run.state_path, run.key) if run.state_path else None
    if run.world > 1:
        _check_same_state(run, state)
    if state is None:
        _seed_rank(run, run.rank)
        return False, 0, {}
    run.hist, start, partial = _restore_training_state(
        state,
        run.model,
        run.optimizer,
        run.swa,
        run.gen,
        run.noise_gen,
        run.callback if run.stateful else None,
    )
    run.t_resumed = run.hist.seconds
    if run.world > 1:
        saved = state.get("rank_rng") or []
        if run.rank < len(saved):
            _set_rng_state(saved[run.rank], run.device)
        else:  # saved by fewer ranks: this rank draws other dropout masks than an uninterrupted run would
            _seed_rank(run, run.rank + run.world * run.hist.steps)
        if partial and run.rank:  # the saved loss sum of the epoch so far is the sum over all ranks: rank 0 holds it
            partial["loss_sum"] = torch.zeros_like(partial["loss_sum"])
    at = f" batch {partial['batches'] + 1}/{run.n_batches}" if partial else ""
    if distributed.is_main():
        print(f"resuming {run.desc} from {run.state_path} at epoch {start + 1}{at} of {run.recipe.epochs}", flush=True)
    return True, start, partial


def _check_same_state(run: _Run, state: dict | None) -> None:
    """Under torchrun: fail unless every rank found the same saved training state (the file must be on a
    filesystem every node sees)."""
    where = None if state is None else (int(state["epoch"]), int((state.get("partial") or {}).get("batches", 0)))
    views = distributed.all_gather_object(where)
    if any(v != views[0] for v in views):
        raise RuntimeError(
            f"{run.desc}: the ranks found different training states at {run.state_path} "
            f"((epoch, batches) by rank: {views}); put --data-dir on a filesystem that every node shares"
        )


def _rng_state(device: torch.device) -> dict:
    """The random-number state that drives dropout (PyTorch's CPU generator, and the GPU's on CUDA)."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Put back a state of :func:`_rng_state`."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"].numel():
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _seed_rank(run: _Run, stream: int) -> None:
    """Under torchrun, ranks other than 0 seed their dropout masks from (seed, ``stream``): each rank draws
    its own, reproducibly for a given number of ranks. Rank 0 (and a single process) keeps the state it has."""
    if run.rank:
        torch.manual_seed(int(np.random.SeedSequence([run.seed, stream]).generate_state(1, np.uint64)[0]))


def _save(run: _Run, epoch: int, inside: dict | None = None) -> None:
    """Save the training state after ``epoch`` (+ ``inside``: how far the next epoch went).

    Under torchrun every rank calls this (their random-number states are gathered); rank 0 writes.
    """
    rank_rng = distributed.all_gather_object(_rng_state(run.device)) if run.world > 1 else None
    if not distributed.is_main():
        return
    run.hist.seconds = run.t_resumed + time.perf_counter() - run.t0
    save_training_state(
        run.state_path,
        key=run.key,
        epoch=epoch,
        model=run.model,
        optimizer=run.optimizer,
        swa=run.swa,
        gen=run.gen,
        noise_gen=run.noise_gen,
        hist=run.hist,
        callback_state=run.callback.state_dict() if run.stateful else None,
        partial=inside,
        rank_rng=rank_rng,
    )


def _train_step(run: _Run, idx: torch.Tensor, rows: np.ndarray | None) -> tuple[torch.Tensor, float]:
    """One optimiser step on the global batch ``idx`` (B,) of the training split.

    Args:
        run: the run.
        idx: (B,) rows of the training split, on the device.
        rows: the same rows on the host, to find the real slots there (off the CPU), else None.

    Returns:
        ``(loss, lr)``: this rank's batch loss (a detached 0-dim tensor; under torchrun weighted so that
        the mean over the ranks is the global batch's loss) and the learning rate used.
    """
    hist, recipe = run.hist, run.recipe
    lr = triangular_lr(hist.steps, recipe.base_lr, recipe.max_lr, run.half_cycle)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    frac = jitter_fractions(run.fr[idx], recipe.jitter, run.noise_gen)  # (B, E): every rank jitters the whole batch
    weight = 1.0
    if run.world > 1:
        idx, frac, rows, weight = _shard(run, idx, frac, rows)  # (b,), (b, E): this rank's share
    real = None if rows is None else real_slots(run.train.elements[rows], run.device)
    with autocast(run.precision, run.device):
        out = run.net(run.el[idx], frac, real=real)  # (b, 3), float32
    loss = robust_l1(out[:, 0], out[:, 2], run.y[idx])
    if run.world > 1:
        loss = loss * weight
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under torchrun DDP averages the gradients over the ranks here
    run.optimizer.step()
    hist.steps += 1
    hist.lr.append(lr)
    return loss.detach(), lr


def _shard(
    run: _Run, idx: torch.Tensor, frac: torch.Tensor, rows: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None, float]:
    """This rank's contiguous share of a global batch of B rows: rows [B*r/W, B*(r+1)/W).

    Shares differ by at most one row (the last, smaller batch of an epoch too); the loss of a share of b
    rows is weighted by W*b/B, so that the mean DDP takes over the ranks is the global batch's mean loss
    (and its gradient that of the single-process run). A rank left without rows (B < W) runs one row
    with weight 0, so that every parameter still gets its (zero) gradient.

    Returns:
        ``(idx, frac, rows, weight)`` of the share.
    """
    B = len(idx)
    lo, hi = B * run.rank // run.world, B * (run.rank + 1) // run.world
    weight = run.world * (hi - lo) / B
    part = slice(lo, hi) if hi > lo else slice(0, 1)
    return idx[part], frac[part], None if rows is None else rows[part], weight


def _swa_check(run: _Run) -> int:
    """The SWA rule on the validation MAE of the current weights; 1 if they were averaged, else 0."""
    resets = run.swa.resets
    added = run.swa.update(run.validate(run.model))
    run.hist.swa_resets += run.swa.resets - resets
    return int(added)


def _train_epoch(run: _Run, epoch: int, swa_epoch: bool, partial: dict) -> tuple[torch.Tensor, int, float]:
    """The batches of ``epoch`` (from the batch ``partial`` says, when resuming inside it).

    SIGTERM (``STOP``) is acted on after a batch: the state is saved inside the epoch and
    :class:`~crabnet.jobs.signals.Preempted` raised.

    Returns:
        ``(loss_sum, added, lr)``: the sum of the batch losses (0-dim tensor), the SWA additions and
        the learning rate of the last batch.
    """
    n, bs, n_batches, device = len(run.train), run.bs, run.n_batches, run.device
    if partial:  # resuming inside this epoch
        first, order, loss_sum, added = partial["batches"], partial["order"], partial["loss_sum"], partial["added"]
    else:
        first, order = 0, torch.randperm(n, generator=run.gen).to(device)  # (n,)
        loss_sum, added = torch.zeros((), device=device), 0
    # off the CPU the batches' real slots come from the host's copy of the data (crabnet.training.model.real_slots),
    # so that the forward pass needs no host synchronisation
    order_host = None if device.type == "cpu" else order.cpu().numpy()  # one synchronisation per epoch
    lr = run.hist.epoch_lr[-1] if run.hist.epoch_lr else run.recipe.base_lr
    for b in range(first, n_batches):
        idx = order[b * bs : (b + 1) * bs]  # (B,)
        loss, lr = _train_step(run, idx, None if order_host is None else order_host[b * bs : (b + 1) * bs])
        loss_sum += loss
        if swa_epoch:
            added += _swa_check(run)
        if run.callback:
            run.callback("step", epoch, run.hist.steps)
        if b + 1 < n_batches and _stopping(run):  # SIGTERM: save inside the epoch and stop
            if run.state_path:
                total = distributed.all_reduce(loss_sum).detach().cpu()  # rank 0 keeps it on resume
                inside = {"batches": b + 1, "order": order.cpu(), "loss_sum": total, "added": added}
                _save(run, epoch - 1, inside)
            where = f"epoch {epoch + 1}/{run.recipe.epochs} (after batch {b + 1}/{n_batches})"
            raise _preempted(run.desc, where, run.state_path)
    return loss_sum, added, lr


def _stopping(run: _Run) -> bool:
    """Whether SIGTERM arrived (``STOP``); under torchrun on any rank, so that all stop after the same batch."""
    return distributed.any_rank(STOP.is_set()) if run.world > 1 else STOP.is_set()


def _epoch_flags(run: _Run, due: bool) -> tuple[bool, bool]:
    """``(stopping, save)`` at the end of an epoch: SIGTERM on any rank, and rank 0's view of whether
    the training state is due (it alone keeps the clock), the same on every rank."""
    if run.world == 1:
        return STOP.is_set(), due
    flags = distributed.all_reduce(torch.tensor([float(STOP.is_set()), float(due and run.rank == 0)]), "max")
    return bool(flags[0]), bool(flags[1])


def _end_epoch(
    run: _Run, epoch: int, swa_epoch: bool, loss_sum: torch.Tensor, added: int, lr: float, val_every: int
) -> None:
    """Record ``epoch`` in the history (loss, validation MAE, SWA counts) and send the "epoch" event."""
    hist, recipe = run.hist, run.recipe
    if run.world > 1:  # every rank's loss is weighted so that their mean is the global batch's loss
        loss_sum = distributed.all_reduce(loss_sum) / run.world
    hist.train_loss.append(float(loss_sum) / run.n_batches)
    hist.epochs_run = epoch + 1
    hist.epoch_lr.append(lr)
    hist.epoch_swa.append(added if swa_epoch else -1)
    hist.swa_updates += added
    if swa_epoch and not added:
        hist.swa_failures += 1
    hist.val_mae.append(run.validate(run.model) if val_every and (epoch + 1) % val_every == 0 else float("nan"))
    if run.callback:
        run.callback("epoch", epoch, hist.steps)
    hist.stopped_early = bool(recipe.early_stop and hist.swa_failures >= recipe.early_stop)


def _epoch_bar(run: _Run, start: int, progress: bool | None) -> range | tqdm:
    """A tqdm bar over the epochs left (``progress`` False: the plain range)."""
    epochs = range(start, run.recipe.epochs)
    if progress is False:
        return epochs
    return tqdm(
        epochs,
        desc=run.desc,
        unit="epoch",
        disable=False if progress else None,
        dynamic_ncols=True,
        initial=start,
        total=run.recipe.epochs,
    )


def _epochs(
    run: _Run, start: int, partial: dict, *, progress: bool | None, val_every: int, save_every_s: float
) -> None:
    """The epochs from ``start`` on, until the last one or SWA early stopping; the progress bar or lines;
    the training state saved every ``save_every_s`` seconds, at the end and on SIGTERM (then
    :class:`~crabnet.jobs.signals.Preempted` is raised)."""
    hist, recipe, desc, state_path = run.hist, run.recipe, run.desc, run.state_path
    bar = _epoch_bar(run, start, progress)
    swa_first = recipe.epochs_step * recipe.swa_start - 1
    last_save = t_loop = time.perf_counter()
    lines = plain_progress(progress)
    stop = recipe.early_stop and hist.swa_failures >= recipe.early_stop
    for epoch in [] if stop else bar:
        swa_epoch = recipe.swa and (epoch + 1) % (2 * recipe.epochs_step) == 0 and epoch >= swa_first
        loss_sum, added, lr = _train_epoch(run, epoch, swa_epoch, partial)
        partial = {}
        _end_epoch(run, epoch, swa_epoch, loss_sum, added, lr, val_every)
        _bar_postfix(bar, hist, recipe)
        now = time.perf_counter()
        if lines:
            elapsed = run.t_resumed + now - run.t0
            print(epoch_line(desc, hist, recipe, (now - t_loop) / (epoch + 1 - start), elapsed), flush=True)
        stop = hist.stopped_early
        stopping, due = _epoch_flags(run, now - last_save >= save_every_s or stop or epoch + 1 == recipe.epochs)
        if state_path and (due or stopping):
            _save(run, epoch)
            last_save = now
        if stopping:
            raise _preempted(desc, f"epoch {epoch + 1}/{recipe.epochs} (at its end)", state_path)
        if stop:
            break
    if hasattr(bar, "close"):
        bar.close()


@deferred_stop()
def fit(
    model: CrabNet,
    train: CompositionData,
    val: CompositionData,
    scaler: Scaler,
    recipe: Recipe,
    *,
    seed: int = 0,
    callback: Callback | None = None,
    progress: bool | None = None,
    val_every: int = 1,
    desc: str = "train",
    state_path: Path | str | None = None,
    state_key: dict | None = None,
    save_every_s: float | None = None,
    precision: str = "auto",
) -> History:
    """Train ``model`` in place with the CrabNet recipe (SPEC §4).

    Under torchrun (``WORLD_SIZE`` > 1, :mod:`crabnet.jobs.distributed`) every rank calls ``fit`` with the
    same arguments and they train one model: each epoch's shuffled global batches (the recipe's batch
    size) are split between the ranks (:func:`_shard`), DDP averages the gradients, the validation
    MAE is summed over the ranks' shares of ``val``, so every rank takes the same SWA and early-stop
    decisions and ends with the same weights, within float32 rounding of a single-process run (the
    batch order, jitter and learning rate are the same; the dropout masks depend on the number of
    ranks). Rank 0 alone writes the training state and shows the progress; the callback runs on the
    ranks that are given one.

    Args:
        model: the model (already on its device).
        train, val: the splits; ``val`` drives SWA and early stopping.
        scaler: target scaler fitted on ``train``.
        recipe: training settings (:func:`make_recipe`).
        seed: seeds the shuffling and the fraction jitter.
        callback: called as ``callback(event, epoch, step)`` with event "start" before the first
            step, "step" after every optimiser step and "epoch" after every epoch.
        progress: tqdm progress bar (None: only when attached to a terminal; where stdout or stderr is
            not a terminal, e.g. a cluster job's log, one plain line per epoch instead, :func:`epoch_line`).
        val_every: compute the validation MAE for the history every this many epochs.
        state_path: if given, the training state is saved there at the end of an epoch at most
            every ``save_every_s`` seconds, and a run finding a state saved for the same
            ``state_key`` goes on from it (bit for bit the same result on CPU as an uninterrupted
            run at the same precision). The caller removes the file once the result is saved.
            SIGTERM (:func:`crabnet.jobs.signals.install_stop_handler`, or ``crabnet.jobs.signals.STOP`` set)
            is acted on after the current batch: the state is saved there, inside the epoch, and
            :class:`crabnet.jobs.signals.Preempted` is raised.
        state_key: identifies the run beyond the split sizes, recipe and seed (e.g. dataset,
            features); a state saved with another key is ignored.
        save_every_s: default :func:`state_save_interval` (``$CRABNET_STATE_EVERY_S``, else 60 s).
        precision: "auto" (bf16 autocast where the hardware is fast at it), "fp32" or "bf16".
            Weights, optimiser, SWA and loss stay fp32.
    """
    run = _setup(
        model,
        train,
        val,
        scaler,
        recipe,
        seed=seed,
        callback=callback,
        desc=desc,
        state_path=state_path,
        state_key=state_key,
        precision=precision,
    )
    save_every_s = state_save_interval() if save_every_s is None else save_every_s
    progress = progress if distributed.is_main() else False  # under torchrun rank 0 shows the progress
    resumed, start, partial = _resume(run)
    model.train()
    if callback and not resumed:
        callback("start", -1, 0)
    _epochs(run, start, partial, progress=progress, val_every=val_every, save_every_s=save_every_s)
    hist = run.hist
    hist.swapped_swa = run.swa.swap()
    model.eval()
    hist.seconds = run.t_resumed + time.perf_counter() - run.t0
    return hist


# --------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Path | str, model: CrabNet, scaler: Scaler, meta: dict | None = None) -> Path:
    """Save weights, model config, scaler and metadata (plain tensors and numbers only)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "model": state,
        "config": model.cfg.to_dict(),
        "scaler": {"mean": scaler.mean, "std": scaler.std},
        "meta": {"created_with": crabnet.__version__, **(meta or {})},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[CrabNet, Scaler, dict]:
    """Load a checkpoint saved by ``save_checkpoint`` (``weights_only=True``).

    Returns:
        ``(model, scaler, meta)`` with the model in eval mode on ``device``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = CrabNetConfig.from_dict(ckpt["config"])
    model = CrabNet(cfg, ckpt["model"]["feature_table"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, Scaler(**ckpt["scaler"]), dict(ckpt.get("meta", {}))


def read_checkpoint_meta(path: Path | str) -> dict | None:
    """The metadata of a checkpoint without building its model (memory-mapped read); None if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return dict(ckpt.get("meta", {}))


def checkpoint_path(data_dir: Path | str, dataset: str, features: str, recipe: str = "immi") -> Path:
    """:meth:`crabnet.layout.Layout.checkpoint`: ``models/<dataset>__<features>[__<recipe>].pt``."""
    return Layout(data_dir).checkpoint(dataset, features, recipe)


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as a plain dict (for checkpoint metadata and store attributes)."""
    return asdict(recipe)


def training_meta(recipe: Recipe, hist: History, **extra) -> dict:
    """Checkpoint metadata of a training run: recipe, precision, history and ``extra`` fields."""
    return {
        **extra,
        "recipe": recipe_dict(recipe),
        "full_recipe": recipe.name if recipe.is_full() else None,
        "swa_rule": SWA.RULE,
        "precision": hist.precision,
        "epochs_run": hist.epochs_run,
        "stopped_early": hist.stopped_early,
        "swa_updates": hist.swa_updates,
        "swa_resets": hist.swa_resets,
        "final_weights": "swa" if hist.swapped_swa else "last",
        "train_seconds": round(hist.seconds, 1),
        "history": hist.per_epoch(),
        # under torchrun: the ranks that trained together (the dropout masks, and so the weights, depend on it)
        **({"ranks": distributed.world_size()} if distributed.world_size() > 1 else {}),
    }


def new_model(
    features: str, splits: dict[str, CompositionData], device: torch.device | str, seed: int
) -> tuple[CrabNet, Scaler]:
    """A freshly initialised model (seeded) for ``splits`` and the target scaler of its training split."""
    from crabnet.utils import seed_everything

    seed_everything(seed)
    model = build_model(features, n_elements=splits["train"].width).to(device)
    return model, Scaler.fit(splits["train"].target)


def save_trained(
    data_dir: Path | str,
    dataset: str,
    features: str,
    recipe: Recipe,
    model: CrabNet,
    scaler: Scaler,
    hist: History,
    test: CompositionData,
    *,
    seed: int,
    written_by: str,
    beside_full: bool = False,
) -> tuple[Path, dict]:
    """Evaluate on ``test`` and save the checkpoint of a finished training at :func:`checkpoint_path`.

    ``beside_full``: if a checkpoint trained with a full recipe is already there, keep it and
    write ``…__attention.pt`` beside it (step 1's shorter attention run). Under torchrun every rank
    gets the metadata, and rank 0 alone writes the checkpoint.

    Returns:
        ``(path, meta)``.
    """
    pred, _ = predict(model, test, scaler)
    meta = training_meta(
        recipe,
        hist,
        dataset=dataset,
        features=features,
        seed=seed,
        test_mae=mae(pred, test.target),
        written_by=written_by,
    )
    path = checkpoint_path(data_dir, dataset, features, recipe.name)
    if beside_full and path.exists():
        try:
            full = bool(load_checkpoint(path)[2].get("full_recipe"))
        except Exception:  # an unreadable file is replaced
            full = False
        if full:
            path = path.with_name(f"{path.stem}__attention.pt")
    if distributed.is_main():
        save_checkpoint(path, model, scaler, meta)
    return path, meta


def train_and_save(
    data_dir: Path | str,
    dataset: str,
    features: str,
    recipe: Recipe,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    splits: dict[str, CompositionData] | None = None,
    written_by: str = "",
    progress: bool | None = None,
    precision: str = "auto",
) -> tuple[CrabNet, Scaler, dict]:
    """Train a model on ``dataset`` with ``recipe`` and save it to :func:`checkpoint_path`.

    ``progress``: tqdm bar (None = only on a terminal, plain per-epoch lines elsewhere; True also
    when logging to a file). The training state is kept beside the checkpoint (``….state.pt``) while
    the run goes on (saved about once a minute, ``$CRABNET_STATE_EVERY_S`` seconds if set, and on
    SIGTERM), so an interrupted run started again with the same settings goes on from there (to the
    same result). The state file is removed at the end. Under torchrun (docs/distributed.md) the
    ranks train the model together and rank 0 writes the files.

    Returns:
        ``(model, scaler, meta)``; meta holds the recipe, test MAE and training history.
    """
    from crabnet.data import load_dataset

    device = distributed.init(device)  # under torchrun: join the process group; this rank's GPU
    if splits is None:
        with distributed.main_first():  # rank 0 fetches the datasets if they are missing
            splits = load_dataset(data_dir, dataset)
    model, scaler = new_model(features, splits, device, seed)
    state_path = Layout(data_dir).training_state(dataset, features, recipe.name)
    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        recipe,
        seed=seed,
        desc=f"{dataset} {features}",
        progress=progress,
        state_path=state_path,
        state_key={"dataset": dataset, "features": features},
        precision=precision,
    )
    _, meta = save_trained(
        data_dir, dataset, features, recipe, model, scaler, hist, splits["test"], seed=seed, written_by=written_by
    )
    if distributed.is_main():
        state_path.unlink(missing_ok=True)
    return model, scaler, meta


def checkpoint_suits(meta: dict, recipe: Recipe) -> bool:
    """A full-recipe request needs a checkpoint trained with that full recipe and today's SWA rule
    (``SWA.RULE``); a shorter one takes any."""
    return not recipe.is_full() or (meta.get("full_recipe") == recipe.name and meta.get("swa_rule") == SWA.RULE)


def ensure_model(
    data_dir: Path | str,
    dataset: str,
    features: str,
    recipe: Recipe,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    force: bool = False,
    written_by: str = "",
    precision: str = "auto",
) -> tuple[CrabNet, Scaler, dict]:
    """Load the checkpoint of ``recipe`` (:func:`checkpoint_path`) if it suits it, else train and save it.

    A checkpoint suits a full-recipe request only if it was itself trained with that full recipe
    and the current SWA rule (older checkpoints, made before the recipe followed the original exactly, do not); any
    checkpoint suits a shorter (e.g. ``--quick``) request. ``force`` always retrains.
    """
    path = checkpoint_path(data_dir, dataset, features, recipe.name)
    if path.exists() and not force:
        model, scaler, meta = load_checkpoint(path, device)
        if checkpoint_suits(meta, recipe):
            kind = f"full {meta['full_recipe']} recipe" if meta.get("full_recipe") else "short run"
            print(f"using {path} ({kind}, test MAE {meta.get('test_mae', float('nan')):.4g})")
            return model, scaler, meta
        print(f"{path} was not trained with the full {recipe.name} recipe: training it again")
    return train_and_save(
        data_dir, dataset, features, recipe, device=device, seed=seed, written_by=written_by, precision=precision
    )
