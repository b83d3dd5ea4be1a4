"""The capture store: ``attention.zarr`` written capture by capture and read back per compound, without torch.

The arrays and attributes of ``attention.zarr`` (a Zarr v3 group; n compounds, c captures, L layers,
H heads, E element slots) are listed in docs/steps.md ("What a capture store holds"): the compounds,
``step (c,)``, ``prediction (n, c)``, ``attention (n, c, L, H, E, E)`` (row q: query element q over
the keys), and the attributions ``attribution``/``shapley``/``contribution (n, c, E)`` and
``head_effect``/``head_change (c, L, H)`` (:mod:`crabnet.explain.attribution`).

While training, captures are appended to ``<store>.partial`` in capture-major chunks (one batch
of compounds for one capture per chunk), so memory stays bounded whatever the number of captures.
``AttentionWriter.finalize`` then rewrites the store compound-major: one chunk holds one
compound's whole history, and chunks are grouped into shards so the store is a few files. The
finished store is renamed into place and carries ``complete = True``; an interrupted run leaves
only the ``.partial`` folder, which the reader refuses.

Written by :class:`AttentionWriter` (step 1's training, ``crabnet.explain.capture``; ``python -m
crabnet.explain``), read by :class:`AttentionStore` (step 2, the explorer, the report).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import crabnet
from crabnet.data import CompositionData, normalise_formula, parse_formula
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.errors import DataError
from crabnet.progress import bar, say
from crabnet.utils import atomic_path, remove_path

STAGING_CHUNK_BYTES = 8 << 20  # staging chunk: this many bytes of one capture
SHARD_BYTES = 32 << 20  # final shard: about this many bytes
# the attributions stored beside attention at every capture (see the module docstring)
PER_COMPOUND = ("attribution", "shapley", "contribution")  # (n, c, E), target units
PER_CAPTURE = ("head_effect", "head_change")  # (c, L, H), target units
ATTRIBUTIONS = (*PER_COMPOUND, *PER_CAPTURE)
MAX_EXACT = 8  # exact Shapley values up to this many real elements (2^8 - 1 = 255 sub-compounds)
N_SAMPLES = 64  # random element orders of the sampled estimate above MAX_EXACT
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
            say(
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
            for i in bar(range(0, self.n, block_n), progress, desc="reorganise", unit="block"):
                att[i : i + block_n] = self.att[i : i + block_n]
            g.attrs.update(attrs)
        remove_path(self.staging)
        return self.path


def store_matches(store: Path, wanted: dict) -> bool:
    """Whether a complete store exists that was made with the same settings."""
    try:
        attrs = dict(zarr.open_group(store, mode="r").attrs)
    except Exception:
        return False
    return bool(attrs.get("complete")) and all(attrs.get(k) == v for k, v in wanted.items())


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
