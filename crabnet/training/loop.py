"""The training loop: :func:`fit` runs the recipe (crabnet.training.recipe) on a model, resumably.

One epoch: the batches of a seeded permutation (each torchrun rank takes its share of every global
batch), a Lamb/Lookahead step per batch at the cyclic learning rate, SWA checks after every batch of
the check epochs, a validation pass, the history and a log line or bar; the training state is saved
on a clock and on SIGTERM (crabnet.training.state).

Under torchrun (``WORLD_SIZE`` > 1, :mod:`crabnet.jobs.distributed`) every rank calls :func:`fit` with the
same arguments and they train one model: each epoch's shuffled global batches (the recipe's batch size)
are split between the ranks (:func:`_shard`), DDP averages the gradients, the validation MAE is summed
over the ranks' shares of ``val``, so every rank takes the same SWA and early-stop decisions and ends
with the same weights, within float32 rounding of a single-process run (the dropout masks depend on the
number of ranks). Rank 0 alone writes the training state and shows the progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crabnet.data import CompositionData, batch_size_for
from crabnet.jobs import distributed
from crabnet.jobs.signals import STOP, Preempted, deferred_stop
from crabnet.progress import bar, duration, plain_lines, say
from crabnet.training.evaluate import Validator, to_tensors
from crabnet.training.model import CrabNet, real_slots
from crabnet.training.optim import SWA, Lamb, Lookahead, triangular_lr
from crabnet.training.recipe import (
    Recipe,
    Scaler,
    autocast,
    jitter_fractions,
    recipe_dict,
    resolve_precision,
    robust_l1,
)
from crabnet.training.state import (
    Callback,
    History,
    load_training_state,
    restore_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
    state_save_interval,
)


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
        f"{seconds_per_epoch:.3g} s/epoch elapsed {duration(elapsed)} "
        f"ETA {eta}{duration(seconds_per_epoch * (recipe.epochs - hist.epochs_run))}"
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
    key = {"n_train": n, "n_val": len(val), "batch_size": bs, "recipe": recipe_dict(recipe), "seed": seed,
           "precision": precision, "swa_rule": SWA.RULE, **(state_key or {})}  # fmt: skip
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
        ``(resumed, first epoch to run, partial)`` (``partial``: see :func:`restore_training_state`).
    """
    distributed.barrier()  # under torchrun: rank 0's file operations before fit (a stale state removed) are done
    state = load_training_state(run.state_path, run.key) if run.state_path else None
    if run.world > 1:
        _check_same_state(run, state)
    if state is None:
        _seed_rank(run, run.rank)
        return False, 0, {}
    run.hist, start, partial = restore_training_state(
        state, run.model, run.optimizer, run.swa, run.gen, run.noise_gen, run.callback if run.stateful else None
    )
    run.t_resumed = run.hist.seconds
    if run.world > 1:
        saved = state.get("rank_rng") or []
        if run.rank < len(saved):
            set_rng_state(saved[run.rank], run.device)
        else:  # saved by fewer ranks: this rank draws other dropout masks than an uninterrupted run would
            _seed_rank(run, run.rank + run.world * run.hist.steps)
    if partial:
        partial["loss_sum"] = _resumed_loss_sum(run, partial)
    at = f" batch {partial['batches'] + 1}/{run.n_batches}" if partial else ""
    if distributed.is_main():
        say(f"resuming {run.desc} from {run.state_path} at epoch {start + 1}{at} of {run.recipe.epochs}")
    return True, start, partial


def _resumed_loss_sum(run: _Run, partial: dict) -> torch.Tensor:
    """This rank's loss sum of the interrupted epoch so far: its own as saved (``rank_loss_sums``, one per
    rank, so the epoch adds up in the same order as an uninterrupted run); saved by another number of
    ranks (or by one process), rank 0 carries the whole sum and the others start from 0."""
    sums = partial.get("rank_loss_sums")
    if sums is not None and len(sums) == run.world:
        return sums[run.rank].to(run.device)
    total = sums.sum() if sums is not None else partial["loss_sum"]
    return (total if run.rank == 0 else torch.zeros_like(total)).to(run.device)


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


def _seed_rank(run: _Run, stream: int) -> None:
    """Under torchrun, ranks other than 0 seed their dropout masks from (seed, ``stream``): each rank draws
    its own, reproducibly for a given number of ranks. Rank 0 (and a single process) keeps the state it has."""
    if run.rank:
        torch.manual_seed(int(np.random.SeedSequence([run.seed, stream]).generate_state(1, np.uint64)[0]))


def _save(run: _Run, epoch: int, inside: dict | None = None) -> None:
    """Save the training state after ``epoch`` (+ ``inside``: how far the next epoch went).

    Under torchrun every rank calls this (their random-number states are gathered); rank 0 writes.
    """
    rank_rng = distributed.all_gather_object(rng_state(run.device)) if run.world > 1 else None
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
                inside = {"batches": b + 1, "order": order.cpu(), "loss_sum": loss_sum.detach().cpu(), "added": added}
                if run.world > 1:  # each rank's own sum, so that a resumed epoch adds up in the same order
                    inside["rank_loss_sums"] = torch.stack(distributed.all_gather_object(loss_sum.detach().cpu()))
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


def _epoch_bar(run: _Run, start: int, progress: bool | None) -> Iterable[int]:
    """A tqdm bar over the epochs left (``progress`` False: the plain range)."""
    epochs = range(start, run.recipe.epochs)
    if progress is False:
        return epochs
    return bar(
        epochs, progress, desc=run.desc, unit="epoch", dynamic_ncols=True, initial=start, total=run.recipe.epochs
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
    lines = plain_lines(progress)
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
            say(epoch_line(desc, hist, recipe, (now - t_loop) / (epoch + 1 - start), elapsed))
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
    """Train ``model`` in place with the CrabNet recipe (docs/model-and-recipe.md); under torchrun see above.

    Args:
        model: the model (already on its device).
        train, val: the splits; ``val`` drives SWA and early stopping.
        scaler: target scaler fitted on ``train``.
        recipe: training settings (:func:`crabnet.training.recipe.make_recipe`).
        seed: seeds the shuffling and the fraction jitter.
        callback: called as ``callback(event, epoch, step)`` with event "start" before the first
            step, "step" after every optimiser step and "epoch" after every epoch.
        progress: tqdm bar (None: only on a terminal; elsewhere, e.g. a cluster job's log, one plain
            line per epoch, :func:`epoch_line`).
        val_every: compute the validation MAE for the history every this many epochs.
        state_path: if given, the training state is saved there at the end of an epoch at most every
            ``save_every_s`` seconds (default ``$CRABNET_STATE_EVERY_S``, else 60 s), and a run finding a
            state saved for the same ``state_key`` goes on from it (bit for bit on CPU at the same
            precision). The caller removes the file once the result is saved. SIGTERM
            (``crabnet.jobs.signals.STOP``) is acted on after the current batch: the state is saved
            inside the epoch and :class:`crabnet.jobs.signals.Preempted` is raised.
        state_key: identifies the run beyond split sizes, recipe and seed; another key's state is ignored.
        precision: "auto" (bf16 autocast where the hardware is fast at it), "fp32" or "bf16".
            Weights, optimiser, SWA and loss stay fp32.
    """
    run = _setup(model, train, val, scaler, recipe, seed=seed, callback=callback, desc=desc, state_path=state_path,
                 state_key=state_key, precision=precision)  # fmt: skip
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
