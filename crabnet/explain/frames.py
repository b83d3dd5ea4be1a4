"""One compound's attention maps and prediction progress drawn into RGB frames (step 2's videos).

- :class:`VideoInput` — one compound's captured history, cut down to the layers to show (plain
  arrays, cheap to send to a worker process).
- :class:`AttentionFigure` and :class:`ProgressFigure` — one reused matplotlib figure each;
  ``render(k)`` updates only the artists that change (heatmaps, cell values, title, prediction
  line, highlighted point) and blits them onto a cached background, returning an RGB frame.
  Frame k of both always shows capture k. :class:`FrameRenderer` draws both and their merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crabnet.errors import VideoError

HIGHLIGHT = "#d62728"  # the current capture in the progress panel (used by nothing else there)
LINE = "#1f77b4"
CMAP = "viridis"


# --------------------------------------------------------------------------------------------
# input


@dataclass
class VideoInput:
    """What one compound's videos show.

    Attributes:
        formula: formula as stored.
        symbols: (k,) element symbols of the real elements (descending fraction).
        fractions: (k,) their fractions.
        target: target value.
        steps: (c,) epoch or optimiser step of each capture.
        predictions: (c,) prediction at each capture.
        attention: (c, n_layers_shown, H, k, k) maps of the layers shown.
        layers: layer numbers of axis 1 of ``attention``.
        capture: ``epoch`` or ``step`` (what ``steps`` counts).
        dataset: dataset name (for titles and metadata).
    """

    formula: str
    symbols: list[str]
    fractions: np.ndarray
    target: float
    steps: np.ndarray
    predictions: np.ndarray
    attention: np.ndarray
    layers: list[int]
    capture: str = "epoch"
    dataset: str = ""

    def __post_init__(self) -> None:
        c = len(self.steps)
        if c < 1:
            raise VideoError(f"{self.formula}: the store holds no captures")
        if self.attention.ndim != 5 or self.attention.shape[0] != c or len(self.predictions) != c:
            raise VideoError(
                f"{self.formula}: attention {self.attention.shape}, predictions "
                f"{np.shape(self.predictions)} and steps ({c},) do not agree"
            )
        if self.attention.shape[1] != len(self.layers):
            raise VideoError(f"{self.formula}: {self.attention.shape[1]} layers of maps for layers {self.layers}")

    @property
    def n_captures(self) -> int:
        return len(self.steps)

    @property
    def n_heads(self) -> int:
        return int(self.attention.shape[2])

    @classmethod
    def from_history(cls, history: Any, layers: Sequence[int], capture: str = "epoch", dataset: str = "") -> VideoInput:
        """Build from a :class:`crabnet.explain.store.CompoundHistory`, keeping ``layers`` only.

        Raises:
            VideoError: a layer outside the store's range.
        """
        n_layers = history.attention.shape[1]
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise VideoError(f"layer {bad[0]} out of range: the store has layers 0..{n_layers - 1}")
        return cls(
            formula=str(history.formula),
            symbols=list(history.symbols),
            fractions=np.asarray(history.fractions, dtype=np.float64),
            target=float(history.target),
            steps=np.asarray(history.step),
            predictions=np.asarray(history.prediction, dtype=np.float64),
            attention=np.ascontiguousarray(history.attention[:, list(layers)], dtype=np.float32),
            layers=list(layers),
            capture=capture,
            dataset=dataset,
        )


def capture_label(capture: str, step: int, k: int) -> str:
    """``epoch 3``, ``step 120``; capture 0 is marked as the untrained model."""
    return f"{capture} {int(step)}" + (" (untrained)" if k == 0 else "")


def layer_label(layers: Sequence[int]) -> str:
    """``layer 1`` or ``layers 0–2``."""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


# --------------------------------------------------------------------------------------------
# figures


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """Pad an (h, w, 3) frame with white on the bottom/right to even height and width (yuv420p)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


class _TextStamps:
    """Alpha masks of short strings, rendered by matplotlib once and pasted into frames with numpy.

    Drawing a matplotlib text costs milliseconds; the cell values of the heatmaps are a few
    dozen texts per frame drawn from about a hundred distinct strings ("0.00" … "1.00"), so each
    is rendered once per process and stamped (alpha-blended) into the frame afterwards.
    """

    _shared: dict[tuple[float, float], _TextStamps] = {}

    def __init__(self, fontsize: float, dpi: float):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1.2, 0.5), dpi=dpi)
        fig.patch.set_alpha(0.0)
        self.canvas = FigureCanvasAgg(fig)
        self.text = fig.text(0.5, 0.5, "", ha="center", va="center", fontsize=fontsize, color="black")
        self.masks: dict[str, tuple[np.ndarray, float, float]] = {}

    @classmethod
    def get(cls, fontsize: float, dpi: float) -> _TextStamps:
        key = (float(fontsize), float(dpi))
        if key not in cls._shared:
            cls._shared[key] = cls(fontsize, dpi)
        return cls._shared[key]

    def mask(self, text: str) -> tuple[np.ndarray, float, float]:
        """(alpha mask in [0, 1], row offset, column offset of its top-left corner from the text centre)."""
        if text not in self.masks:
            self.text.set_text(text)
            self.canvas.draw()
            alpha = np.asarray(self.canvas.buffer_rgba())[..., 3]
            h, w = alpha.shape
            rows, cols = np.nonzero(alpha.any(1))[0], np.nonzero(alpha.any(0))[0]
            if len(rows) == 0:
                self.masks[text] = (np.zeros((0, 0), np.float32), 0.0, 0.0)
            else:
                r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
                self.masks[text] = (alpha[r0:r1, c0:c1].astype(np.float32) / 255.0, r0 - h / 2, c0 - w / 2)
        return self.masks[text]

    def paste(self, frame: np.ndarray, text: str, row: float, col: float, color: np.ndarray) -> None:
        """Blend ``text`` in ``color`` (RGB 0–255) into ``frame`` centred at (row, col) pixels."""
        m, dr, dc = self.mask(text)
        if m.size == 0:
            return
        r0, c0 = int(round(row + dr)), int(round(col + dc))
        r1, c1 = r0 + m.shape[0], c0 + m.shape[1]
        fr0, fc0, fr1, fc1 = max(r0, 0), max(c0, 0), min(r1, frame.shape[0]), min(c1, frame.shape[1])
        if fr0 >= fr1 or fc0 >= fc1:
            return
        a = m[fr0 - r0 : fr1 - r0, fc0 - c0 : fc1 - c0, None]
        region = frame[fr0:fr1, fc0:fc1]
        region[:] = (region * (1.0 - a) + color * a + 0.5).astype(np.uint8)


class _BlitFigure:
    """A figure drawn once in full; later frames redraw only its animated artists on a cached background."""

    def __init__(self, figsize: tuple[float, float], dpi: float):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
        self.canvas = FigureCanvasAgg(self.fig)
        self.animated: list[Any] = []
        self._background = None

    def _freeze(self) -> None:
        """Lay out with every artist showing frame 0, then fix the layout and cache the background."""
        self.canvas.draw()
        self.fig.set_layout_engine("none")
        for a in self.animated:
            a.set_animated(True)
        self.canvas.draw()
        self._background = self.canvas.copy_from_bbox(self.fig.bbox)

    def _decorate(self, frame: np.ndarray) -> None:
        """Draw anything that is pasted rather than drawn by matplotlib (in place)."""

    def _blit(self, full: bool = False) -> np.ndarray:
        if full:  # a complete redraw (slow path; used to check the fast one)
            for a in self.animated:
                a.set_animated(False)
            self.canvas.draw()
            for a in self.animated:
                a.set_animated(True)
        else:
            self.canvas.restore_region(self._background)
            for a in self.animated:
                self.fig.draw_artist(a)
        frame = np.asarray(self.canvas.buffer_rgba())[..., :3].copy()
        self._decorate(frame)
        return _pad_even(frame)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames in pixels (even)."""
        w, h = self.canvas.get_width_height()
        return w + w % 2, h + h % 2

    def close(self) -> None:
        self.fig.clear()


class AttentionFigure(_BlitFigure):
    """Grid of the attention maps of all heads of the chosen layer(s) for one compound.

    One layer: heads in a near-square grid. Several layers: one row per layer, one column per
    head. Rows of a map are query elements, columns key elements; element symbols label the left
    and top axes, fractions the lower axis; the colour scale is fixed to 0–1 with one colour bar.
    Only the compound's real elements are shown (padding hidden); non-finite values are masked.

    Args:
        data: the compound.
        dpi: resolution of the frames.
        panel: size of one heatmap panel in inches (grows with the number of elements).
        annotate_max: write the weight in each cell when the compound has at most this many elements.
    """

    def __init__(self, data: VideoInput, dpi: float = 100, panel: float | None = None, annotate_max: int = 5):
        import matplotlib

        self.data = data
        c, n_l, n_h, k, _ = data.attention.shape
        if n_l == 1:
            ncols = math.ceil(math.sqrt(n_h))
            nrows = math.ceil(n_h / ncols)
            slots = [(0, h) for h in range(n_h)]
        else:
            nrows, ncols = n_l, n_h
            slots = [(l, h) for l in range(n_l) for h in range(n_h)]
        panel = panel or 1.9 + 0.28 * max(0, k - 3)
        self.height_in = nrows * panel + 1.25
        super().__init__((ncols * panel + 1.5, self.height_in), dpi)
        fig = self.fig
        axes = fig.subplots(nrows, ncols, squeeze=False)
        cmap = matplotlib.colormaps[CMAP].with_extremes(bad="0.85")
        fractions = [f"{f:.3g}" for f in data.fractions]
        self.images: list[tuple[Any, int, int]] = []
        self.cells: list[tuple[Any, int, int]] = []  # (axes, layer slot, head) of annotated maps
        spines = []
        annotate = k <= annotate_max
        small = max(5.0, 9.0 - 0.6 * max(0, k - 3))
        self.stamps = _TextStamps.get(small, dpi) if annotate else None
        for i, ax in enumerate(axes.flat):
            if i >= len(slots):
                ax.set_axis_off()
                continue
            l, h = slots[i]
            spines.extend(self._panel(ax, l, h, cmap, fractions, small, first_column=i % ncols == 0))
            if annotate:
                self.cells.append((ax, l, h))
        fig.colorbar(self.images[0][0], ax=axes, shrink=0.85, label="attention weight", ticks=np.linspace(0, 1, 6))
        fig.supxlabel("key element (symbol above, fraction below)", fontsize=9)
        self.title = fig.suptitle("", fontsize=12)
        self.animated = [im for im, _, _ in self.images] + spines + [self.title]
        self._update(0)
        self._freeze()
        height = self.fig.bbox.height
        self.centres = [
            [[(height - y, x) for x, y in ax.transData.transform([(q, p) for q in range(k)])] for p in range(k)]
            for ax, _, _ in self.cells
        ]

    def _panel(
        self, ax: Any, l: int, h: int, cmap: Any, fractions: list[str], small: float, first_column: bool
    ) -> list:
        """Draw the heatmap of layer slot ``l``, head ``h`` at capture 0 with its axes; returns its spines."""
        data, k = self.data, len(self.data.symbols)
        ticks = np.arange(k)
        im = ax.imshow(np.ma.masked_invalid(data.attention[0, l, h]), cmap=cmap, vmin=0.0, vmax=1.0,
                       interpolation="nearest", aspect="equal")  # fmt: skip
        self.images.append((im, l, h))
        ax.set_yticks(ticks, data.symbols)
        ax.set_xticks(ticks, fractions, fontsize=small, rotation=0 if k <= 4 else 45)
        top = ax.secondary_xaxis("top")
        top.set_xticks(ticks, data.symbols)
        ax.tick_params(length=2)
        top.tick_params(length=2)
        ax.set_title(f"head {h}" if data.attention.shape[1] == 1 else f"L{data.layers[l]} · head {h}", fontsize=9)
        if first_column:
            ax.set_ylabel("query element")
        return list(ax.spines.values())  # redrawn over the heatmap, which covers their inner half

    def _update(self, k: int) -> None:
        d = self.data
        maps = d.attention[k]
        for im, l, h in self.images:
            m = maps[l, h]
            im.set_data(m if np.isfinite(m).all() else np.ma.masked_invalid(m))
        self._k = k
        self.title.set_text(f"{d.formula} · {layer_label(d.layers)} · {capture_label(d.capture, d.steps[k], k)}")

    def _decorate(self, frame: np.ndarray) -> None:
        """Write each cell's weight (black on light cells, white on dark ones)."""
        maps = self.data.attention[self._k]
        black, white = np.zeros(3, np.float32), np.full(3, 255.0, np.float32)
        for (_, l, h), centres in zip(self.cells, self.centres):
            m = maps[l, h]
            for p, row in enumerate(centres):
                for q, (r, c) in enumerate(row):
                    v = float(m[p, q])
                    if np.isfinite(v):
                        self.stamps.paste(frame, f"{v:.2f}", r, c, black if v > 0.55 else white)

    def render(self, k: int, full: bool = False) -> np.ndarray:
        """RGB frame (h, w, 3) uint8 of capture k."""
        self._update(k)
        return self._blit(full)


class ProgressFigure(_BlitFigure):
    """The compound's prediction over the captures so far, the target as a horizontal line.

    Axes are fixed over the whole video (all captures and the target fit); the current capture is
    highlighted with a large red point and a vertical guide line, and its values are written above
    the plot.

    Args:
        data: the compound.
        dpi: resolution (use the attention figure's so the frames have the same height).
        height: figure height in inches (the attention figure's).
        width: figure width in inches (default about as wide as high).
    """

    def __init__(self, data: VideoInput, dpi: float = 100, height: float = 5.0, width: float | None = None):
        self.data = data
        super().__init__((width or min(max(5.0, 1.1 * height), 8.0), height), dpi)
        ax = self.ax = self.fig.subplots()
        x, y = np.asarray(data.steps, dtype=np.float64), data.predictions
        span = float(x[-1] - x[0]) or 1.0
        ax.set_xlim(x[0] - 0.03 * span, x[-1] + 0.03 * span)
        values = np.concatenate([y[np.isfinite(y)], [data.target]])
        lo, hi = float(values.min()), float(values.max())
        pad = 0.08 * (hi - lo) if hi > lo else max(1.0, abs(hi) * 0.1)
        ax.set_ylim(lo - pad, hi + pad)
        ax.axhline(data.target, color="0.25", ls="--", lw=1.3, label=f"target ({data.target:.4g})")
        (self.line,) = ax.plot([], [], "-o", color=LINE, lw=1.8, ms=3, label="prediction")
        self.guide = ax.axvline(x[0], color="0.6", lw=0.8, zorder=1)
        (self.point,) = ax.plot(
            [], [], "o", ms=10, color=HIGHLIGHT, mec="black", mew=0.8, zorder=5, label="current capture"
        )
        self.value = ax.set_title("", fontsize=10)  # the current capture's values, above the plot
        ax.set_xlabel("epoch" if data.capture == "epoch" else "optimiser step")
        ax.set_ylabel(f"prediction{f' ({data.dataset})' if data.dataset else ''}")
        ax.grid(alpha=0.3)
        self.fig.suptitle(f"{data.formula}: prediction during training", fontsize=12)
        self.fig.legend(loc="outside lower center", ncols=3, fontsize=9, frameon=False)
        self.animated = [self.guide, self.line, self.point, *ax.spines.values(), self.value]
        self._update(0)
        self._freeze()

    def _update(self, k: int) -> None:
        d = self.data
        x = np.asarray(d.steps[: k + 1], dtype=np.float64)
        self.line.set_data(x, d.predictions[: k + 1])
        self.point.set_data([x[-1]], [d.predictions[k]])
        self.guide.set_xdata([x[-1], x[-1]])
        self.value.set_text(
            f"{capture_label(d.capture, d.steps[k], k)}: prediction {d.predictions[k]:.4g}, target {d.target:.4g}"
        )

    def render(self, k: int, full: bool = False) -> np.ndarray:
        """RGB frame (h, w, 3) uint8 of capture k."""
        self._update(k)
        return self._blit(full)

    def data_at_pixel(self, col: float, row: float) -> tuple[float, float]:
        """Data coordinates of a frame pixel (column, row from the top); used to check frames."""
        height = self.fig.bbox.height
        return tuple(self.ax.transData.inverted().transform((col + 0.5, height - row - 0.5)))


def merge_frames(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Side by side, the shorter padded with white at the bottom; even size."""
    h = max(left.shape[0], right.shape[0])
    pad = [np.pad(f, ((0, h - f.shape[0]), (0, 0), (0, 0)), constant_values=255) for f in (left, right)]
    return _pad_even(np.concatenate(pad, axis=1))


class FrameRenderer:
    """Both figures of one compound; ``frames(k)`` gives the three frames of capture k."""

    def __init__(self, data: VideoInput, dpi: float = 100):
        self.attention = AttentionFigure(data, dpi=dpi)
        self.progress = ProgressFigure(data, dpi=dpi, height=self.attention.height_in)

    def frames(self, k: int) -> dict[str, np.ndarray]:
        """Frames of capture k by kind: attention, progress and merged (both side by side)."""
        a = self.attention.render(k)
        p = self.progress.render(k)
        return {"attention": a, "progress": p, "merged": merge_frames(a, p)}

    def close(self) -> None:
        self.attention.close()
        self.progress.close()
