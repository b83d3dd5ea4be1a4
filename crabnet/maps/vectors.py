"""Representations of compounds and atoms inside a trained CrabNet, collected in one pass and cached.

Two kinds of vectors are collected (steps 6 and 7, docs/steps.md):

- **local** (per atom): the value vector V of layer ``l`` at the position of one element inside
  every compound that contains it, V = x_l·W_in^T + b_in (last ``d_model`` channels of the
  attention in-projection of the layer's input ``x_l``; not split by head, not scaled).
- **global** (per compound): for the input of layer ``l`` (``l = n_layers`` is the encoder output)
  the statistics [mean, range, variance, max, min] over the compound's *real* elements, each
  ``d_model`` wide, concatenated to ``5·d_model`` (2560 for d_model 512). Padding rows never enter
  the statistics (the original code let them leak in).

One inference pass computes every missing (kind, layer[, atom]) array at once. Each batch's layer
inputs live only for that batch; the vectors are appended straight to ``.npy`` files on disk whose
header (final shape) is written first, so memory stays bounded by one batch whatever the dataset
size (no memory map: mapped pages would count towards the process's resident memory).

Cache layout (``<data-dir>/umap/cache/<dataset>/<features>__<split>__<key>/``), where ``key``
hashes the checkpoint's content, the split's CSV content, the dataset, split and the
single-element rule::

    compounds.npz            formula (unicode), row, target, prediction, elements, fractions
    local__<Z>__layer<l>.npy (n_atom_compounds, d_model) float32, rows = compounds containing Z
    global__layer<l>.npy     (n_compounds, 5·d_model) float32
    umap/…                   2-D coordinates written by ``crabnet.maps.projection``

Every file is written to a temporary name and renamed when complete, so an interrupted pass
leaves no file that looks finished. Nothing is pickled; loading uses ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crabnet.data import CompositionData
from crabnet.layout import Layout
from crabnet.progress import bar
from crabnet.training.model import CrabNet
from crabnet.training.recipe import Scaler
from crabnet.utils import atomic_path, file_sha256, remove_path

CACHE_VERSION = 1  # bump when the meaning of a cached array changes
STATISTICS = ("mean", "range", "variance", "max", "min")


# --------------------------------------------------------------------------------------------
# the two kinds of vectors


def value_vectors(model: CrabNet, layer_input: torch.Tensor, layer: int) -> torch.Tensor:
    """Value vectors of ``layer`` for its input ``x_l``: (B, E, D) -> (B, E, D).

    Args:
        model: the CrabNet.
        layer_input: ``x_l``, the input of encoder layer ``layer`` (``hidden[layer]``).
        layer: index of the encoder layer, ``0 <= layer < n_layers``.
    """
    d = model.cfg.d_model
    return model.layers[layer].self_attn.qkv(layer_input)[..., 2 * d :]


def pool_elements(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[mean, range, variance, max, min] over the real elements of each compound.

    Args:
        h: (B, E, D) per-element vectors (padding rows may hold anything).
        keep: (B, E) bool, True for real elements; every compound needs at least one.

    Returns:
        (B, 5·D): the statistics concatenated in the order of ``STATISTICS``; the variance is
        the population variance (0 for a single element).
    """
    mask = keep.unsqueeze(-1)  # (B, E, 1)
    count = keep.sum(1, keepdim=True).clamp_min(1).to(h.dtype)  # (B, 1)
    zeros = torch.zeros((), dtype=h.dtype, device=h.device)
    mean = torch.where(mask, h, zeros).sum(1) / count  # (B, D)
    var = torch.where(mask, (h - mean.unsqueeze(1)) ** 2, zeros).sum(1) / count
    big = torch.tensor(torch.finfo(h.dtype).max, dtype=h.dtype, device=h.device)
    hi = torch.where(mask, h, -big).amax(1)
    lo = torch.where(mask, h, big).amin(1)
    return torch.cat([mean, hi - lo, var, hi, lo], dim=-1)


# --------------------------------------------------------------------------------------------
# cache keys


def file_digest(path: Path | str, length: int = 16) -> str:
    """Leading hex digits of the sha256 of a file's content."""
    return file_sha256(path)[:length]


def representation_key(
    checkpoint: Path | str, split_csv: Path | str, dataset: str, split: str, drop_unary: bool = True
) -> str:
    """Key of a representation cache: checkpoint content, split content and the data settings."""
    parts = {
        "version": CACHE_VERSION,
        "checkpoint": file_digest(checkpoint),
        "data": file_digest(split_csv),
        "dataset": dataset,
        "split": split,
        "drop_unary": drop_unary,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def local_name(z: int, layer: int) -> str:
    """File stem of the local vectors of atomic number ``z`` at ``layer``."""
    return f"local__{z}__layer{layer}"


def global_name(layer: int) -> str:
    """File stem of the pooled compound vectors of layer input ``layer``."""
    return f"global__layer{layer}"


# --------------------------------------------------------------------------------------------
# the store


class _RowWriter:
    """Appends float32 rows to a ``.npy`` file whose header (final shape) is written up front."""

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path, self.shape, self.rows = path, shape, 0
        self.file = open(path, "wb")  # noqa: SIM115 - kept open across appends, closed by close()
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype="<f4")
        assert rows.ndim == 2 and rows.shape[1] == self.shape[1], (rows.shape, self.shape)
        self.file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.file.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows, expected {self.shape[0]}")


@dataclass
class Compounds:
    """The compounds of a cached split (row order of the split after loading)."""

    formula: np.ndarray  # (n,) unicode
    row: np.ndarray  # (n,) row numbers in the CSV (1-based data rows)
    target: np.ndarray  # (n,) float64
    prediction: np.ndarray  # (n,) float64, the model's prediction in target units
    elements: np.ndarray  # (n, E) atomic numbers, 0 = padding
    fractions: np.ndarray  # (n, E)

    def __len__(self) -> int:
        return len(self.formula)

    @property
    def n_elements(self) -> np.ndarray:
        """(n,) number of real elements of each compound."""
        return (self.elements > 0).sum(1)

    def rows_with(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the compounds that contain atomic number ``z`` and ``z``'s position in each."""
        hit = self.elements == z  # each element appears at most once per compound
        idx = np.flatnonzero(hit.any(1))
        return idx, hit[idx].argmax(1)


class RepresentationStore:
    """A cache folder of collected vectors (see the module docstring).

    Args:
        folder: the cache folder.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self._compounds: Compounds | None = None

    @property
    def compounds(self) -> Compounds:
        """The compounds of the split (read once)."""
        if self._compounds is None:
            with np.load(self.folder / "compounds.npz", allow_pickle=False) as f:
                self._compounds = Compounds(**{k: f[k] for k in Compounds.__dataclass_fields__})
        return self._compounds

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str, mmap: bool = True) -> np.ndarray:
        """An array of the store (memory-mapped by default: only what is indexed is read)."""
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} has not been collected")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)

    def local(self, z: int, layer: int) -> np.ndarray:
        """(n_z, D) value vectors of atomic number ``z`` at ``layer``, rows as ``rows_with(z)``."""
        return self.load(local_name(z, layer))

    def global_(self, layer: int) -> np.ndarray:
        """(n, 5·D) pooled vectors of layer input ``layer``."""
        return self.load(global_name(layer))

    @property
    def umap_dir(self) -> Path:
        return self.folder / "umap"


def _requested(model: CrabNet, local: dict | None, global_layers: list[int] | None) -> tuple[dict, list[int]]:
    """Normalise and check the requested layers: ``{layer: sorted atomic numbers}``, sorted layer inputs."""
    n_layers = model.cfg.n_layers
    local = {int(l): sorted({int(z) for z in zs}) for l, zs in (local or {}).items()}
    global_layers = sorted({int(l) for l in (global_layers or [])})
    for l in local:
        if not 0 <= l < n_layers:
            raise ValueError(f"local vectors exist for layers 0..{n_layers - 1}, not {l}")
    for l in global_layers:
        if not 0 <= l <= n_layers:
            raise ValueError(
                f"global vectors exist for layer inputs 0..{n_layers} ({n_layers} = encoder output), not {l}"
            )
    return local, global_layers


def _open_writers(
    folder: Path, elements: np.ndarray, d: int, want_local: set, want_global: list[int]
) -> tuple[dict[str, _RowWriter], dict[int, np.ndarray]]:
    """A partial ``.npy`` writer per missing array, and the rows of the compounds containing each atom."""
    targets: dict[str, _RowWriter] = {}
    rows_of: dict[int, np.ndarray] = {}
    try:
        for l, z in sorted(want_local):
            rows_of[z] = np.flatnonzero((elements == z).any(1))
            name = local_name(z, l)
            targets[name] = _RowWriter(folder / f".{name}.partial.npy", (len(rows_of[z]), d))
        for l in want_global:
            name = global_name(l)
            targets[name] = _RowWriter(folder / f".{name}.partial.npy", (len(elements), 5 * d))
    except BaseException:
        _discard(targets)
        raise
    return targets, rows_of


def _discard(targets: dict[str, _RowWriter]) -> None:
    for w in targets.values():
        w.file.close()
        remove_path(w.path)


def _append_local(
    targets: dict[str, _RowWriter], v: torch.Tensor, el_np: np.ndarray, start: int, l: int, zs: list[int], rows_of
) -> None:
    """Append the value vectors ``v`` (b, E, D) of atoms ``zs`` in the batch starting at row ``start``."""
    stop = start + len(el_np)
    for z in zs:
        idx = rows_of[z]
        lo, hi = np.searchsorted(idx, [start, stop])
        if hi == lo:
            continue
        b_rows = idx[lo:hi] - start
        pos = (el_np[b_rows] == z).argmax(1)
        sel = v[torch.as_tensor(b_rows, device=v.device), torch.as_tensor(pos, device=v.device)]  # (k, D)
        targets[local_name(z, l)].append(sel.float().cpu().numpy())


def _write_compounds(folder: Path, data: CompositionData, scaler: Scaler, prediction: np.ndarray) -> None:
    with atomic_path(folder / "compounds.npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            formula=np.asarray([str(s) for s in data.formula], dtype=str),
            row=np.asarray(data.rows, dtype=np.int64),
            target=np.asarray(data.target, dtype=np.float64),
            prediction=np.asarray(scaler.unscale(prediction), dtype=np.float64),
            elements=np.asarray(data.elements).astype(np.int16),
            fractions=np.asarray(data.fractions, np.float32),
        )


@torch.no_grad()
def collect(
    model: CrabNet,
    data: CompositionData,
    scaler: Scaler,
    folder: Path | str,
    *,
    local: dict[int, list[int]] | None = None,
    global_layers: list[int] | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> RepresentationStore:
    """One inference pass writing the requested vectors (and the compounds table) into ``folder``.

    Args:
        model: a trained CrabNet (put in eval mode here).
        data: the compounds.
        scaler: the model's target scaler (for predictions in target units).
        folder: the cache folder (created).
        local: {layer: [atomic numbers]} of local vectors to collect (layers < n_layers).
        global_layers: layer inputs to pool (``n_layers`` = encoder output).
        batch_size: compounds per forward pass.
        device: where to run (default: the model's device).
        progress: tqdm bar (None: only on a terminal).

    Returns:
        The store. Arrays already present in ``folder`` are not recomputed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = RepresentationStore(folder)
    local, global_layers = _requested(model, local, global_layers)
    elements = np.asarray(data.elements)  # (n, E)
    want_local = {(l, z) for l, zs in local.items() for z in zs if not store.has(local_name(z, l))}
    want_global = [l for l in global_layers if not store.has(global_name(l))]
    need_compounds = not (folder / "compounds.npz").is_file()
    if not (want_local or want_global or need_compounds):
        return store

    targets, rows_of = _open_writers(folder, elements, model.cfg.d_model, want_local, want_global)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    try:
        prediction = _pass(model, data, device, batch_size, progress, want_local, want_global, targets, rows_of)
        for name in list(targets):
            w = targets.pop(name)
            w.close()
            os.replace(w.path, store.path(name))
    finally:
        _discard(targets)
    if need_compounds:
        _write_compounds(folder, data, scaler, prediction)
    return store


def _pass(model, data, device, batch_size, progress, want_local, want_global, targets, rows_of) -> np.ndarray:
    """The inference pass of :func:`collect`: vectors appended to ``targets``; returns the predictions (n,)."""
    elements, n = np.asarray(data.elements), len(data)  # (n, E)
    prediction = np.empty(n, dtype=np.float64)
    layers_needed = sorted({l for l, _ in want_local} | set(want_global))
    for start in bar(range(0, n, batch_size), progress, desc="representations", unit="batch", dynamic_ncols=True):
        stop = min(n, start + batch_size)
        el = torch.as_tensor(elements[start:stop], dtype=torch.long, device=device)  # (b, E)
        fr = torch.as_tensor(np.asarray(data.fractions[start:stop]), dtype=torch.float32, device=device)
        out = model.forward_internals(el, fr, hidden=bool(layers_needed))
        prediction[start:stop] = out.output[:, 0].double().cpu().numpy()
        for l in layers_needed:
            h = out.hidden[l]  # (b, E, D)
            if l in want_global:
                targets[global_name(l)].append(pool_elements(h, el > 0).float().cpu().numpy())
            zs = [z for (ll, z) in want_local if ll == l]
            if zs:
                _append_local(targets, value_vectors(model, h, l), elements[start:stop], start, l, zs, rows_of)
        del out
    return prediction


def open_store(
    data_dir: Path | str,
    dataset: str,
    features: str,
    split: str,
    checkpoint: Path | str,
    split_csv: Path | str,
    *,
    drop_unary: bool = True,
    force: bool = False,
) -> RepresentationStore:
    """The cache folder for a checkpoint and split; stale folders of the same pair are removed.

    Args:
        data_dir, dataset, features, split: where and what.
        checkpoint: the model file (its content is part of the key).
        split_csv: the split's CSV (its content is part of the key).
        drop_unary: the single-element rule used when loading.
        force: empty the folder first (recompute everything, UMAP coordinates included).
    """
    key = representation_key(checkpoint, split_csv, dataset, split, drop_unary)
    folder = Layout(data_dir).umap_cache(dataset) / f"{features}__{split}__{key}"
    for old in folder.parent.glob(f"{features}__{split}__*"):
        if old != folder:
            remove_path(old)
    if force:
        remove_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return RepresentationStore(folder)
