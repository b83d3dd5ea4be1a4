"""Attention captured during training, streamed to Zarr v3, and read back per compound.

Layout of ``attention.zarr`` (a Zarr v3 group), n compounds of the captured split, c captures,
L layers, H heads, E element slots:

    formula (n,) str · elements (n, E) int · fractions (n, E) float32 · target (n,) float32
    step (c,) int         epoch or optimiser step of each capture; capture 0 = untrained model
    prediction (n, c)     prediction in target units
    attribution (n, c, E) leave-one-element-out effect on the prediction, target units: the
                          prediction with the element removed (other fractions renormalised)
                          minus the full one; 0 at padding and for single-element compounds
                          (:func:`crabnet.explain.faithfulness.leave_one_out`); absent in older stores
    shapley (n, c, E)     exact Shapley values of the elements (:func:`crabnet.explain.attribution.shapley`; a
                          coalition's value = the prediction for its sub-compound, fractions
                          renormalised; the empty one = the training mean): they sum to the prediction
                          minus ``shapley_baseline`` (attribute); exact up to ``shapley_max_exact``
                          elements, a seeded estimate of ``shapley_samples`` element orders above
    contribution (n, c, E) each element's share of the output (:func:`crabnet.explain.attribution.contribution`),
                          summing to the prediction
    head_effect (c, L, H) validation MAE with the head's output zeroed minus without (> 0: the head helps),
                          on ``head_sample`` compounds of the split (a fixed seeded subset)
    head_change (c, L, H) mean |change of the prediction| when the head is zeroed, same compounds
    attention (n, c, L, H, E, E) float32: row q is query element q's distribution over the keys

While training, captures are appended to ``<store>.partial`` in capture-major chunks (one batch
of compounds for one capture per chunk), so memory stays bounded whatever the number of captures.
``AttentionWriter.finalize`` then rewrites the store compound-major: one chunk holds one
compound's whole history, and chunks are grouped into shards so the store is a few files. The
finished store is renamed into place and carries ``complete = True``; an interrupted run leaves
only the ``.partial`` folder, which the reader refuses.

:func:`attention_job` is step 1 (``python get_training_attention.py``) as one job of ``crabnet.jobs.engine``:
the training with its captures, run in that process or sent to a Dask cluster with ``--scheduler``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

import crabnet
from crabnet.data import CompositionData, normalise_formula, parse_formula
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.errors import DataError
from crabnet.explain.attribution import (
    MAX_EXACT,
    N_SAMPLES,
    coalition_attribution,
    contribution_from_head,
    head_ablation,
)
from crabnet.training.model import CrabNet
from crabnet.training.train import Recipe, Scaler
from crabnet.utils import atomic_path, remove_path

STAGING_CHUNK_BYTES = 8 << 20  # staging chunk: this many bytes of one capture
SHARD_BYTES = 32 << 20  # final shard: about this many bytes
# the attributions stored beside attention at every capture (see the module docstring)
PER_COMPOUND = ("attribution", "shapley", "contribution")  # (n, c, E), target units
PER_CAPTURE = ("head_effect", "head_change")  # (c, L, H), target units
ATTRIBUTIONS = (*PER_COMPOUND, *PER_CAPTURE)
HEAD_SAMPLE = 64  # compounds of the split (a fixed seeded subset) whose predictions the head ablation measures
ATTRIBUTION_ATTRS = {"shapley_max_exact": MAX_EXACT, "shapley_samples": N_SAMPLES, "head_sample": HEAD_SAMPLE}
SMALL_CHUNK_BYTES = 4 << 20  # final chunk of the per-compound histories of prediction/attribution
BLOCK_BYTES = 256 << 20  # reorganisation reads at most about this much at once


def _plain(value):
    """JSON-like value with tuples as lists (Zarr attributes come back as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def partial_path(path: Path) -> Path:
    """Where captures are staged while training runs."""
    return path.with_name(path.name + ".partial")


class AttentionWriter:
    """Streams captures of one split to a staging store, then writes the final store.

    Args:
        path: final store path (``…/attention.zarr``).
        data: the captured split.
        n_layers, n_heads: model shape.
        attrs: group attributes (dataset, features, split, capture, model config, …).
        resume: reopen the staging store of an interrupted run made with the same ``attrs``
            (``resumed`` says whether there was one); :meth:`restore` then keeps its first
            captures. Otherwise the staging store is created afresh.
        attribution: also store the attributions of every capture: leave-one-element-out, Shapley
            values, the output contribution and the head ablation (:data:`PER_COMPOUND`,
            :data:`PER_CAPTURE`; the group attribute ``attribution`` says whether a store has them),
            or only the kinds named (a model without CrabNet's layers and head, e.g. a test's stub,
            has neither output contribution nor heads).
    """

    def __init__(
        self,
        path: Path | str,
        data: CompositionData,
        n_layers: int,
        n_heads: int,
        attrs: dict,
        resume: bool = False,
        attribution: bool | tuple[str, ...] = True,
    ):
        self.path = Path(path)
        self.data = data
        self.n = len(data)
        self.E = data.width
        self.map_shape = (n_layers, n_heads, self.E, self.E)
        self.bytes_per_map = 4 * int(np.prod(self.map_shape))
        self.chunk_n = int(np.clip(STAGING_CHUNK_BYTES // self.bytes_per_map, 1, self.n))
        kinds = ATTRIBUTIONS if attribution is True else tuple(attribution or ())
        unknown = set(kinds) - set(ATTRIBUTIONS)
        if unknown:
            raise ValueError(f"unknown attribution kinds {sorted(unknown)}; known: {ATTRIBUTIONS}")
        self.attrs = {
            **attrs,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "n_elements": self.E,
            "n_compounds": self.n,
            "created_with": crabnet.__version__,
            "attribution": bool(kinds),
            **({**ATTRIBUTION_ATTRS, "attributions": list(kinds)} if kinds else {}),
            "complete": False,
        }
        self.kinds = kinds
        self.with_attribution = bool(kinds)
        self.extra: dict[str, Any] = {}  # name -> staging array of PER_COMPOUND (n, c, E) / PER_CAPTURE (c, L, H)
        self.attr_missing: set[int] = set()  # captures begun whose attributions were not all written
        self.final_attrs: dict[str, Any] = {}  # attributes known only once captures ran (the Shapley baseline)
        self.staging = partial_path(self.path)
        self.steps: list[int] = []
        self.resumed = resume and self._reopen()
        if self.resumed:
            return
        remove_path(self.staging)
        self.group = zarr.open_group(self.staging, mode="w", zarr_format=3, attributes=self.attrs)
        self.att = self.group.create_array(
            "attention", shape=(self.n, 0, *self.map_shape), chunks=(self.chunk_n, 1, *self.map_shape), dtype="float32"
        )
        self.pred = self.group.create_array("prediction", shape=(self.n, 0), chunks=(self.n, 1), dtype="float32")
        for name in self.kinds:
            shape = self._extra_shape(name, 0)
            chunks = (self.n, 1, self.E) if name in PER_COMPOUND else (1, *shape[1:])
            self.extra[name] = self.group.create_array(name, shape=shape, chunks=chunks, dtype="float32")

    @property
    def attr(self):
        """The staging array of the leave-one-element-out attribution (None without attribution)."""
        return self.extra.get("attribution")

    def _extra_shape(self, name: str, c: int) -> tuple[int, ...]:
        return (self.n, c, self.E) if name in PER_COMPOUND else (c, *self.map_shape[:2])

    def _reopen(self) -> bool:
        """Open an existing staging store made with the same attributes; False if there is none."""
        try:
            group = zarr.open_group(self.staging, mode="r+")
            same = _plain(dict(group.attrs)) == _plain(self.attrs)
            att, pred = group["attention"], group["prediction"]
            extra = {name: group[name] for name in self.kinds}
        except Exception:  # missing or unreadable: start afresh
            return False
        c = att.shape[1]
        if not same or att.shape[0] != self.n or tuple(att.shape[2:]) != self.map_shape:
            return False
        if any(a.shape != self._extra_shape(name, c) for name, a in extra.items()):
            return False
        self.group, self.att, self.pred, self.extra = group, att, pred, extra
        return True

    def restore(self, steps: list[int]) -> None:
        """Keep the first ``len(steps)`` captures of a reopened staging store (those the saved
        training state had made; later ones are dropped and made again)."""
        c = len(steps)
        if c > self.att.shape[1]:
            raise DataError(f"{self.staging} holds {self.att.shape[1]} captures, the training state expects {c}")
        self.att.resize((self.n, c, *self.map_shape))
        self.pred.resize((self.n, c))
        for name, a in self.extra.items():
            a.resize(self._extra_shape(name, c))
        self.steps = [int(s) for s in steps]
        self.attr_missing = set()  # kept captures were made by capture_split, with their attribution

    @property
    def n_captures(self) -> int:
        return len(self.steps)

    def begin_capture(self, step: int) -> int:
        """Open capture slot ``c`` for epoch/step ``step``; returns c."""
        c = self.n_captures
        self.att.resize((self.n, c + 1, *self.map_shape))
        self.pred.resize((self.n, c + 1))
        for name, a in self.extra.items():
            a.resize(self._extra_shape(name, c + 1))
        if self.extra:
            self.attr_missing.add(c)
        self.steps.append(int(step))
        return c

    def write_batch(self, c: int, start: int, attention: np.ndarray) -> None:
        """Write attention maps (b, L, H, E, E) of compounds ``start:start+b`` for capture c."""
        self.att[start : start + len(attention), c] = attention

    def write_prediction(self, c: int, prediction: np.ndarray) -> None:
        """Write the predictions (n,) of every compound for capture c."""
        self.pred[:, c] = prediction

    def write_attribution(self, c: int, attribution: np.ndarray | None = None, **others: np.ndarray) -> None:
        """Write the attributions of capture c (ignored without attribution): ``attribution`` (n, E) and,
        by name, the other :data:`PER_COMPOUND` (n, E) and :data:`PER_CAPTURE` (L, H) arrays. A capture
        counts as complete when all of them were written."""
        if not self.extra:
            return
        values = {**({} if attribution is None else {"attribution": attribution}), **others}
        for name, v in values.items():
            if name in PER_COMPOUND:
                self.extra[name][:, c] = v
            else:
                self.extra[name][c] = v
        if set(self.extra) <= set(values):
            self.attr_missing.discard(c)

    def finalize(self, extra_attrs: dict | None = None, progress: bool | None = None) -> Path:
        """Reorganise compound-major and sharded; atomically replace ``path``; drop staging.

        ``attribution`` is written only if every capture has it (a writer fed by hand that never
        called :meth:`write_attribution` makes a store without it; group attribute ``attribution``).
        """
        c = self.n_captures
        with_attr = self.attr is not None and not self.attr_missing
        if self.attr is not None and self.attr_missing and len(self.attr_missing) < c:
            print(
                f"warning: {len(self.attr_missing)} of {c} captures have no attribution; "
                f"{self.path.name} is written without it"
            )
        per_compound = c * self.bytes_per_map
        shard_n = int(np.clip(SHARD_BYTES // per_compound, 1, self.n))
        block_n = max(shard_n, (BLOCK_BYTES // per_compound) // shard_n * shard_n)
        attrs = {**self.attrs, **self.final_attrs, **(extra_attrs or {}), "n_captures": c}
        attrs.update(attribution=with_attr, complete=True)
        if not with_attr:
            attrs = {k: v for k, v in attrs.items() if k not in ATTRIBUTION_ATTRS}
        with atomic_path(self.path) as tmp:
            g = zarr.open_group(tmp, mode="w", zarr_format=3)
            d = self.data
            formula = g.create_array("formula", shape=(self.n,), dtype=str, chunks=(self.n,))
            formula[:] = np.asarray([str(f) for f in d.formula])
            for name, arr in (
                ("elements", d.elements.astype(np.int16)),
                ("fractions", d.fractions.astype(np.float32)),
                ("target", d.target.astype(np.float32)),
                ("step", np.asarray(self.steps, np.int64)),
            ):
                g.create_array(name, data=arr, chunks=arr.shape or (1,))
            g.create_array("prediction", data=self.pred[:], chunks=(min(self.n, 4096), c))
            if with_attr:  # compound-major: whole histories of a few thousand compounds per chunk
                rows = int(np.clip(SMALL_CHUNK_BYTES // max(1, 4 * c * self.E), 1, min(self.n, 4096)))
                for name, a in self.extra.items():
                    chunks = (rows, c, self.E) if name in PER_COMPOUND else a.shape
                    g.create_array(name, data=a[:], chunks=chunks)
            att = g.create_array(
                "attention",
                shape=(self.n, c, *self.map_shape),
                dtype="float32",
                chunks=(1, c, *self.map_shape),
                shards=(shard_n, c, *self.map_shape),
            )
            for i in tqdm(
                range(0, self.n, block_n),
                desc="reorganise",
                unit="block",
                disable=None if progress is None else not progress,
            ):
                att[i : i + block_n] = self.att[i : i + block_n]
            g.attrs.update(attrs)
        remove_path(self.staging)
        return self.path


@torch.no_grad()
def capture_split(
    model: CrabNet,
    data: CompositionData,
    scaler: Scaler,
    writer: AttentionWriter,
    step: int,
    batch_size: int | None = None,
) -> np.ndarray:
    """Run the model on ``data`` with attention capture and store one capture. Returns predictions.

    Eval mode, no autograd, float32 (autocast disabled), no random numbers drawn: training goes on
    exactly as without capture. With ``writer.with_attribution`` the sub-compounds of each batch
    (all 2^k - 1 of a k-element compound, each distinct one once) follow its attention pass, giving
    the Shapley values and the leave-one-element-out attribution, and the head ablation runs on
    :data:`HEAD_SAMPLE` compounds (:func:`head_sample`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bs = batch_size or writer.chunk_n
    c = writer.begin_capture(step)
    n, with_attr = len(data), writer.with_attribution
    preds = np.empty(n, dtype=np.float64)
    extra = {name: np.zeros((n, writer.E), dtype=np.float32) for name in PER_COMPOUND if name in writer.kinds}
    with torch.autocast(device.type, enabled=False):
        for i in range(0, n, bs):
            el = torch.as_tensor(data.elements[i : i + bs], dtype=torch.long, device=device)  # (b, E)
            fr = torch.as_tensor(data.fractions[i : i + bs], dtype=torch.float32, device=device)  # (b, E)
            out = model.forward_internals(el, fr, attention=True, hidden="contribution" in extra)
            writer.write_batch(c, i, out.attention.float().cpu().numpy())  # (b, L, H, E, E)
            preds[i : i + bs] = out.output[:, 0].double().cpu().numpy()
            if with_attr:
                _attribute_batch(model, el, fr, out, scaler, extra, i, bs)
        pred = scaler.unscale(preds)
        writer.write_prediction(c, pred.astype(np.float32))
        if with_attr:
            if "head_effect" in writer.kinds:
                rows = head_sample(n)
                heads = head_ablation(model, data.elements[rows], data.fractions[rows], data.target[rows], scaler)
                extra.update(head_effect=heads["mae_change"], head_change=heads["mean_abs_change"])
            writer.write_attribution(c, **extra)
            writer.final_attrs["shapley_baseline"] = float(scaler.mean)
    model.train(was_training)
    return pred


def head_sample(n: int) -> np.ndarray:
    """The rows of a split of ``n`` compounds whose head ablation is measured: all, or :data:`HEAD_SAMPLE`
    drawn once with a fixed seed (the same at every capture), sorted."""
    if n <= HEAD_SAMPLE:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, HEAD_SAMPLE, replace=False))


def _attribute_batch(model, el, fr, out, scaler, extra: dict[str, np.ndarray], i: int, bs: int) -> None:
    """The Shapley values, leave-one-out effects and output contributions of one batch into ``extra``."""
    ca = coalition_attribution(model, el, fr, scaler, float(scaler.mean), full=out.output[:, 0], batch_size=bs)
    extra["attribution"][i : i + bs] = ca.leave_one_out  # (b, E), target units
    if "shapley" in extra:
        extra["shapley"][i : i + bs] = ca.shapley  # (b, E)
    if "contribution" in extra:
        head_out = model.head(out.hidden[-1]).float()  # (b, E, 3), padding rows of no weight
        extra["contribution"][i : i + bs] = contribution_from_head(head_out, el > 0, scaler)  # (b, E)


class AttentionRecorder:
    """Training callback that captures the split before training and after every epoch or k-th step."""

    def __init__(
        self,
        model: CrabNet,
        data: CompositionData,
        scaler: Scaler,
        writer: AttentionWriter,
        mode: str = "epoch",
        every: int = 1,
    ):
        if mode not in ("epoch", "step"):
            raise ValueError(f"capture mode must be 'epoch' or 'step', got {mode!r}")
        if every < 1:
            raise ValueError(f"capture every must be >= 1, got {every}")
        self.model, self.data, self.scaler, self.writer = model, data, scaler, writer
        self.mode, self.every = mode, every
        self.last_prediction: np.ndarray | None = None

    def __call__(self, event: str, epoch: int, step: int) -> None:
        if event == "start":  # a run starting afresh: drop captures of a reopened staging store
            self.writer.restore([])
            value = 0
        elif event == "epoch" and self.mode == "epoch":
            value = epoch + 1
        elif event == "step" and self.mode == "step" and step % self.every == 0:
            value = step
        else:
            return
        self.last_prediction = capture_split(self.model, self.data, self.scaler, self.writer, value)

    def state_dict(self) -> dict:
        """Saved with the training state: which captures exist."""
        return {"steps": list(self.writer.steps)}

    def load_state_dict(self, state: dict) -> None:
        """On resume: keep the captures the saved training state had made."""
        self.writer.restore(state["steps"])


# --------------------------------------------------------------------------------------------
# step 1 as a job of crabnet.jobs.engine


def attention_job(data_dir: Path, recipe: Recipe, settings: dict, device: str, force: bool, skip_invalid: bool) -> dict:
    """Step 1 (``get_training_attention.py``) as one job: train a model while capturing attention.

    The model of ``settings["features"]`` is trained on ``settings["dataset"]`` with ``recipe``; the
    ``settings["split"]`` compounds are captured before training and after every epoch (or k-th step)
    into the dataset's attention store, which is then finalised; the model is saved (kept as
    ``…__attention.pt`` beside a full-recipe checkpoint). The training state is saved beside the store
    (``<store>.state.pt``): the same job started again goes on from there (``force`` starts afresh).

    Args:
        data_dir: the ``--data-dir`` root (a shared filesystem when the job runs on a cluster).
        recipe: the training recipe (epochs, batch size and learning-rate cycle already set).
        settings: the store's settings (``dataset``, ``features``, ``split``, ``capture``,
            ``capture_every``, ``epochs``, ``seed``, ``drop_unary``, ``precision``, …), kept in its
            attributes and compared by the script's up-to-date check.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        force: discard staged captures and a saved training state.
        skip_invalid: skip bad rows (reported) instead of raising.

    Under torchrun (docs/distributed.md) every rank runs this job and they train the model together;
    rank 0 alone captures and writes the store, the checkpoint and the training state.

    Returns:
        ``store``, ``checkpoint`` (paths as text), ``n_captures``, ``n_compounds``, ``reorganise_s``,
        ``epochs_run``, ``train_s``, ``val_mae`` (last epoch), ``test_mae`` and ``swa`` (SWA weights kept);
        on ranks other than 0 only ``store``, ``checkpoint``, ``epochs_run``, ``train_s``, ``val_mae``,
        ``test_mae`` and ``swa``.

    Raises:
        KeyboardInterrupt: after saying where the captures are staged.
        Preempted: SIGTERM; the training state was saved (the message names the staged captures).
        DataError: a bad row (unless ``skip_invalid``).
    """
    import time

    from crabnet.data import load_dataset
    from crabnet.jobs import distributed
    from crabnet.layout import Layout
    from crabnet.training.train import new_model, save_trained
    from crabnet.utils import resolve_device

    dataset, features, split = settings["dataset"], settings["features"], settings["split"]
    capture, capture_every, seed = settings["capture"], settings["capture_every"], settings["seed"]
    store = Layout(data_dir).attention_store(dataset)
    dev = distributed.init(resolve_device(device))  # under torchrun: the process group; this rank's GPU
    with distributed.main_first():  # rank 0 fetches the datasets if they are missing
        splits = load_dataset(data_dir, dataset, drop_unary=settings["drop_unary"], skip_invalid=skip_invalid)
    model, scaler = new_model(features, splits, dev, seed)
    print(
        f"{dataset}: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test; "
        f"{features}, {model.n_params():,} parameters, {settings['epochs']} epochs on {dev}; capturing {split} "
        f"({len(splits[split])} compounds) every {capture if capture_every == 1 else f'{capture_every} steps'}"
    )

    state_path = store.with_name(store.name + ".state.pt")
    writer, recorder = _open_capture(store, state_path, splits[split], model, scaler, settings, recipe, force)
    hist = _fit_capturing(model, splits, scaler, recipe, settings, recorder, state_path, partial_path(store))
    by, test = "get_training_attention.py", splits["test"]
    ckpt, meta = save_trained(data_dir, dataset, features, recipe, model, scaler, hist, test, seed=seed, written_by=by,
                              beside_full=True)  # fmt: skip
    result = {
        "store": str(store),
        "checkpoint": str(ckpt),
        "epochs_run": hist.epochs_run,
        "train_s": hist.seconds,
        "val_mae": hist.val_mae[-1] if hist.val_mae else float("nan"),
        "test_mae": meta["test_mae"],
        "swa": bool(hist.swapped_swa),
    }
    if writer is None:  # a rank other than 0: rank 0 writes the store
        return result
    state_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    writer.finalize(_run_attrs(hist, meta["test_mae"]))
    return {
        **result,
        "n_captures": writer.n_captures,
        "n_compounds": len(splits[split]),
        "reorganise_s": time.perf_counter() - t0,
    }


def store_matches(store: Path, wanted: dict) -> bool:
    """Whether a complete store exists that was made with the same settings."""
    try:
        attrs = dict(zarr.open_group(store, mode="r").attrs)
    except Exception:
        return False
    return bool(attrs.get("complete")) and all(attrs.get(k) == v for k, v in wanted.items())


def print_result(r: dict, store: Path) -> None:
    """What :func:`attention_job` made (or that the store was up to date)."""
    if r.get("up_to_date"):
        print(f"{store} is up to date (same settings); use --force to recompute")
        return
    print(
        f"attention: {r['n_captures']} captures x {r['n_compounds']} compounds -> {r['store']} "
        f"(reorganised in {r['reorganise_s']:.1f} s)"
    )
    print(
        f"model -> {r['checkpoint']}\n{r['epochs_run']} epochs in {r['train_s']:.1f} s; "
        f"val MAE {r['val_mae']:.4g} (last epoch), test MAE {r['test_mae']:.4g} "
        f"({'SWA weights' if r['swa'] else 'last weights'})"
    )


def _fit_capturing(model, splits, scaler, recipe, settings: dict, recorder, state_path: Path, staged: Path):
    """Train with the capturing callback; an interruption says where the captures are staged."""
    import sys

    from crabnet.jobs.signals import Preempted
    from crabnet.training.train import fit

    desc = f"{settings['dataset']} {settings['features']}"
    try:
        return fit(model, splits["train"], splits["val"], scaler, recipe, seed=settings["seed"], callback=recorder,
                   precision=settings["precision"], desc=desc, state_path=state_path, state_key=settings)  # fmt: skip
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: captures staged in {staged} (incomplete, not used by later steps); "
            f"the same command goes on from the last saved epoch ({state_path.name})",
            file=sys.stderr,
        )
        raise
    except Preempted as err:  # SIGTERM: fit saved its state; crabnet.jobs.cli.run prints this and exits 143
        raise Preempted(f"{err}; captures staged in {staged}") from None


def _open_capture(
    store: Path, state_path: Path, data: CompositionData, model, scaler, settings: dict, recipe: Recipe, force: bool
) -> tuple[AttentionWriter | None, AttentionRecorder | None]:
    """The store's writer and the training callback that captures into it (on rank 0 only; else None, None)."""
    from crabnet.jobs import distributed
    from crabnet.training.train import recipe_dict

    if not distributed.is_main():  # under torchrun rank 0 alone captures (the others wait in the next step)
        return None, None
    cfg = model.cfg
    attrs = {**settings, "model_config": cfg.to_dict(), "recipe": recipe_dict(recipe)}
    writer = AttentionWriter(store, data, cfg.n_layers, cfg.n_heads, attrs, resume=not force)
    if not writer.resumed:
        state_path.unlink(missing_ok=True)  # a state without its captures cannot be resumed
    every = settings["capture_every"]
    return writer, AttentionRecorder(model, data, scaler, writer, mode=settings["capture"], every=every)


def _run_attrs(hist, test_mae: float) -> dict:
    """What the finished store says of the training that made it."""
    from crabnet.jobs import distributed

    return {
        "epochs_run": hist.epochs_run,
        "stopped_early": hist.stopped_early,
        "swa_updates": hist.swa_updates,
        "final_weights": "swa" if hist.swapped_swa else "last",
        "precision_used": hist.precision,
        "test_mae": test_mae,
        "train_seconds": round(hist.seconds, 2),
        **({"ranks": distributed.world_size()} if distributed.world_size() > 1 else {}),  # under torchrun
    }


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class CompoundHistory:
    """One compound's attention maps and predictions over all captures.

    Attributes:
        index: row in the store.
        formula: formula as in the dataset.
        elements: (k,) atomic numbers of the k real elements (descending fraction).
        fractions: (k,) their fractions.
        target: target value.
        step: (c,) epoch or optimiser step of each capture.
        prediction: (c,) predictions.
        attention: (c, L, H, k, k) maps restricted to the real elements.
        attribution: (c, k) leave-one-element-out effects (target units), or None for a store
            made without attribution.
        shapley: (c, k) Shapley values (target units; they sum to the prediction minus the store's
            ``shapley_baseline``), or None for a store without them.
        contribution: (c, k) each element's share of the output (they sum to the prediction), or None.
    """

    index: int
    formula: str
    elements: np.ndarray
    fractions: np.ndarray
    target: float
    step: np.ndarray
    prediction: np.ndarray
    attention: np.ndarray
    attribution: np.ndarray | None = None
    shapley: np.ndarray | None = None
    contribution: np.ndarray | None = None

    @property
    def symbols(self) -> list[str]:
        return [SYMBOLS[z - 1] for z in self.elements]


class AttentionStore:
    """Read access to a finished ``attention.zarr``.

    Example::

        store = AttentionStore("data/attention/aflow__ael_bulk_modulus_vrh/attention.zarr")
        h = store.compound("HfO2")      # or store.compound(17)
        h.attention.shape               # (captures, layers, heads, 2, 2)
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            hint = " (an interrupted run left only a .partial store)" if partial_path(self.path).exists() else ""
            raise FileNotFoundError(f"no attention store at {self.path}{hint}; run get_training_attention.py first")
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)
        if not self.attrs.get("complete"):
            raise DataError(f"{self.path} is not a complete attention store; re-run get_training_attention.py")
        self.formulas: list[str] = [str(f) for f in self.group["formula"][:]]
        self.steps: np.ndarray = self.group["step"][:]
        # small per-compound arrays are read once; maps and predictions are read per compound
        self.elements: np.ndarray = np.asarray(self.group["elements"][:], dtype=np.int64)
        self.fractions: np.ndarray = self.group["fractions"][:]
        self.targets: np.ndarray = self.group["target"][:]
        self._norm: dict[str, int] | None = None
        # stores made before attribution was captured have none
        arrays = set(self.group.array_keys())
        self.has_attribution: bool = "attribution" in arrays
        self.has_shapley: bool = "shapley" in arrays  # newer stores (a stub model's store may lack the others)
        self.has_contribution: bool = "contribution" in arrays
        self.has_heads: bool = "head_effect" in arrays

    def __len__(self) -> int:
        return len(self.formulas)

    @property
    def n_captures(self) -> int:
        return len(self.steps)

    def find(self, formula: str) -> int:
        """Row of a formula, matched after normalisation (``HfO2`` finds ``Hf1O2``).

        Raises:
            KeyError: with the closest formulas in the store.
        """
        try:
            key = normalise_formula(formula)
        except DataError as err:
            raise KeyError(f"{err}; e.g. {', '.join(self.formulas[:3])}") from None
        if key in self._normalised():
            return self._normalised()[key]
        raise KeyError(
            f"{formula!r} is not in {self.path} ({len(self)} compounds); "
            f"close matches: {', '.join(self.suggest(formula)) or 'none'}"
        )

    def _normalised(self) -> dict[str, int]:
        """Normalised formula -> first row holding it (built on first use)."""
        if self._norm is None:
            self._norm = {}
            for i, f in enumerate(self.formulas):
                self._norm.setdefault(normalise_formula(f), i)
        return self._norm

    def suggest(self, formula: str, n: int = 5) -> list[str]:
        """Formulas of the store to offer for one it does not hold, best first.

        Compounds made of exactly the formula's elements, then those holding all of them and the
        fewest others (textually closest first), then the textually closest ones (after normalising,
        so ``GaN`` is compared with ``Ga1N1``), then ones holding any of its elements; never empty for
        a non-empty store.

        Args:
            formula: the formula that was not found.
            n: how many to offer at most.
        """
        index = self._normalised()
        try:
            key = normalise_formula(formula)
            wanted = {ATOMIC_NUMBER[el] for el in parse_formula(formula)}
        except (DataError, KeyError):
            key, wanted = formula, set()
        sets = [set(row[row > 0].tolist()) for row in self.elements] if wanted else []
        ranked = [self.formulas[i] for i, s in enumerate(sets) if s == wanted]
        supersets = [i for i, s in enumerate(sets) if wanted < s]
        matcher = difflib.SequenceMatcher(b=key)

        def closeness(i: int) -> float:
            matcher.set_seq1(self.formulas[i])
            return matcher.ratio()

        supersets.sort(key=lambda i: (len(sets[i]), -closeness(i), i))
        ranked += [self.formulas[i] for i in supersets[:n]]
        ranked += [self.formulas[index[k]] for k in difflib.get_close_matches(key, list(index), n=n, cutoff=0.6)]
        ranked += [self.formulas[i] for i, s in enumerate(sets) if wanted & s][:n]
        ranked += self.formulas[:n]
        return list(dict.fromkeys(ranked))[:n]

    def head_effects(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``head_effect`` and ``head_change`` (c, L, H) of the head ablation, or None for an older store."""
        if not self.has_heads:
            return None
        return self.group["head_effect"][:], self.group["head_change"][:]

    def compound(self, key: int | str) -> CompoundHistory:
        """History of one compound by row number or formula (one contiguous read of its maps)."""
        i = self.find(key) if isinstance(key, str) else int(key)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range 0..{len(self) - 1}")
        k = int((self.elements[i] > 0).sum())
        att = self.group["attention"][i]  # (c, L, H, E, E): one chunk
        return CompoundHistory(
            index=i,
            formula=self.formulas[i],
            elements=self.elements[i, :k],
            fractions=self.fractions[i, :k],
            target=float(self.targets[i]),
            step=self.steps,
            prediction=self.group["prediction"][i],
            attention=att[..., :k, :k],
            attribution=self.group["attribution"][i][:, :k] if self.has_attribution else None,
            shapley=self.group["shapley"][i][:, :k] if self.has_shapley else None,
            contribution=self.group["contribution"][i][:, :k] if self.has_contribution else None,
        )
