"""Attention maps and prediction progress through training, rendered to frames and encoded with ffmpeg.

The pieces, used by ``generate_attention_videos.py`` (step 2):

- :class:`VideoInput` — one compound's captured history, cut down to the layers to show (plain
  arrays, cheap to send to a worker process).
- :class:`AttentionFigure` and :class:`ProgressFigure` — one reused matplotlib figure each;
  ``render(k)`` updates only the artists that change (heatmaps, cell values, title, prediction
  line, highlighted point) and blits them onto a cached background, returning an RGB frame.
  Frame k of both always shows capture k.
- :func:`ffmpeg_writer` — frames piped to ``ffmpeg`` (libx264, CRF 18, preset veryfast, yuv420p,
  +faststart), written to a temporary file renamed into place on success; ffmpeg's stderr in
  the error on failure. :func:`find_ffmpeg` prefers a system ``ffmpeg`` and falls back to the
  binary of ``imageio-ffmpeg``.
- :func:`render_job` / :func:`run_jobs` — one compound's three videos; several compounds on a
  process pool, a worker's exception re-raised with the compound named.
- :func:`probe_video` — frame count, duration, size, codec and metadata read back with ffmpeg.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crabnet.errors import VideoError
from crabnet.utils import atomic_path, available_cpus

HIGHLIGHT = "#d62728"  # the current capture in the progress panel (used by nothing else there)
LINE = "#1f77b4"
CMAP = "viridis"
DEFAULT_PRESET = "veryfast"  # libx264: half the CPU of "medium" for these flat graphics, ~15 % larger files
KINDS = ("attention", "progress", "merged")
DEFAULT_SAMPLE = 5  # compounds rendered for a dataset without paper videos

# Compounds of the paper's videos (Wang et al. 2022), by dataset.
PAPER_COMPOUNDS: dict[str, list[str]] = {
    "aflow__ael_bulk_modulus_vrh": ["P1W3", "C11N4", "HfO2", "Pt3Ti1", "GaN", "Gd2O7Ti2", "BN", "AlGdO3", "Hf2La2O7"],
    "mp_bulk_modulus": ["SiO2", "FeCO3", "YSF", "Fe(HO)2", "AgSbTe2", "NaNO3", "Al2O3", "LiFeO2"],
}


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
        ticks = np.arange(k)
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
            im = ax.imshow(
                np.ma.masked_invalid(data.attention[0, l, h]),
                cmap=cmap,
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
                aspect="equal",
            )
            self.images.append((im, l, h))
            ax.set_yticks(ticks, data.symbols)
            ax.set_xticks(ticks, fractions, fontsize=small, rotation=0 if k <= 4 else 45)
            top = ax.secondary_xaxis("top")
            top.set_xticks(ticks, data.symbols)
            ax.tick_params(length=2)
            top.tick_params(length=2)
            name = f"head {h}" if n_l == 1 else f"L{data.layers[l]} · head {h}"
            ax.set_title(name, fontsize=9)
            if i % ncols == 0:
                ax.set_ylabel("query element")
            spines.extend(ax.spines.values())  # redrawn over the heatmap, which covers their inner half
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


# --------------------------------------------------------------------------------------------
# ffmpeg


def find_ffmpeg() -> str:
    """The system ``ffmpeg`` when on PATH, else the binary shipped with ``imageio-ffmpeg``.

    Raises:
        VideoError: neither is available.
    """
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as err:  # ImportError or its "no binary" RuntimeError
        raise VideoError(f"no ffmpeg found: install ffmpeg on PATH or `pip install imageio-ffmpeg` ({err})") from err


def ffmpeg_command(
    ffmpeg: str,
    out: Path | str,
    size: tuple[int, int],
    fps: float,
    crf: int = 18,
    preset: str = DEFAULT_PRESET,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """The ffmpeg command that encodes raw RGB frames from stdin to an H.264 MP4 at ``out``."""
    w, h = size
    if w % 2 or h % 2:
        raise VideoError(f"frame size {w}x{h} is not even (yuv420p needs even sizes)")
    meta = [a for k, v in (metadata or {}).items() for a in ("-metadata", f"{k}={v}")]
    return [
        ffmpeg,
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-framerate",
        f"{fps:g}",
        "-i",
        "pipe:0",
        "-an",
        "-c:v",
        "libx264",
        "-preset",
        preset,
        "-crf",
        str(crf),
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        *meta,
        "-f",
        "mp4",
        str(out),
    ]


class _Pipe:
    """Writes frames to a running ffmpeg; a dead ffmpeg becomes a VideoError with its stderr."""

    def __init__(self, proc: subprocess.Popen, err, path: Path, size: tuple[int, int]):
        self.proc, self.err, self.path, self.size = proc, err, path, size
        self.frames = 0

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace").strip()

    def fail(self, rc: int | None) -> VideoError:
        return VideoError(f"ffmpeg failed (exit status {rc}) writing {self.path}:\n{self.stderr() or '(no stderr)'}")

    def write(self, frame: np.ndarray) -> None:
        w, h = self.size
        if frame.shape != (h, w, 3) or frame.dtype != np.uint8:
            raise VideoError(f"frame {frame.shape} {frame.dtype} does not match the video size {w}x{h} uint8")
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except (BrokenPipeError, OSError):
            raise self.fail(self.proc.wait()) from None
        self.frames += 1


@contextlib.contextmanager
def ffmpeg_writer(
    path: Path | str,
    size: tuple[int, int],
    fps: float,
    *,
    crf: int = 18,
    preset: str = DEFAULT_PRESET,
    metadata: dict[str, str] | None = None,
    ffmpeg: str | None = None,
) -> Iterator[_Pipe]:
    """Encode frames piped to ffmpeg into ``path`` (H.264 MP4), renamed into place on success.

    Yields an object with ``write(frame)`` for (h, w, 3) uint8 RGB frames. Nothing is left at
    ``path`` (nor any temporary file) when ffmpeg or the caller fails.

    Raises:
        VideoError: ffmpeg exited with an error (its stderr is in the message).
    """
    exe = ffmpeg or find_ffmpeg()
    with atomic_path(path) as tmp, tempfile.TemporaryFile() as err:
        cmd = ffmpeg_command(exe, tmp, size, fps, crf, preset, metadata)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        except OSError as e:
            raise VideoError(f"cannot run ffmpeg ({exe}): {e}") from e
        pipe = _Pipe(proc, err, Path(path), size)
        try:
            yield pipe
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.stdin.close()
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0:
            raise pipe.fail(rc)
        if pipe.frames == 0:
            raise VideoError(f"no frames were written to {path}")


@dataclass
class VideoInfo:
    """What ffmpeg reads back from a video file."""

    frames: int | None
    duration: float
    width: int
    height: int
    codec: str
    pix_fmt: str
    metadata: dict[str, str] = field(default_factory=dict)


def probe_video(path: Path | str, count_frames: bool = True, ffmpeg: str | None = None) -> VideoInfo:
    """Read a video's duration, size, codec, pixel format, metadata and (decoding it) frame count.

    Uses the ffmpeg binary only (no ffprobe needed).

    Raises:
        VideoError: the file is missing or not a readable video.
    """
    exe = ffmpeg or find_ffmpeg()
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"no video at {path}")
    text = subprocess.run(
        [exe, "-hide_banner", "-nostdin", "-i", str(path)], capture_output=True, text=True, errors="replace"
    ).stderr
    dur = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    stream = re.search(r"Stream #\S+.*?Video: (.*)", text)
    if not dur or not stream:
        raise VideoError(f"ffmpeg cannot read {path}:\n{text.strip()}")
    line = stream.group(1)
    size = re.search(r"\b(\d{2,5})x(\d{2,5})\b", line)
    pix = re.search(r"\b(yuvj?\d{3}p\w*|rgb\w*|bgr\w*|gray\w*|nv\d\d)\b", line)
    meta = dict(re.findall(r"^\s{4}(\w+)\s*:\s(.*)$", text.split("Stream #")[0], flags=re.M))
    frames = None
    if count_frames:
        out = subprocess.run(
            [exe, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "framecrc", "-"],
            capture_output=True,
            text=True,
            errors="replace",
        )
        if out.returncode != 0:
            raise VideoError(f"ffmpeg cannot decode {path}:\n{out.stderr.strip()}")
        frames = sum(1 for ln in out.stdout.splitlines() if ln.strip() and not ln.startswith("#"))
    h, m, s = dur.groups()
    return VideoInfo(
        frames=frames,
        duration=int(h) * 3600 + int(m) * 60 + float(s),
        width=int(size.group(1)) if size else 0,
        height=int(size.group(2)) if size else 0,
        codec=line.split()[0].strip(","),
        pix_fmt=pix.group(1) if pix else "",
        metadata={k.lower(): v.strip() for k, v in meta.items()},
    )


# --------------------------------------------------------------------------------------------
# choosing compounds and layers


def parse_layers(layer: str | int, n_layers: int) -> list[int]:
    """``0`` -> [0]; ``all`` -> every layer. Raises ValueError outside 0..n_layers-1."""
    if str(layer).strip().lower() == "all":
        return list(range(n_layers))
    try:
        value = int(layer)
    except ValueError:
        raise ValueError(f"--layer must be a layer number or 'all', got {layer!r}") from None
    if not 0 <= value < n_layers:
        raise ValueError(f"--layer {value} out of range: the store has layers 0..{n_layers - 1} (or 'all')")
    return [value]


def final_errors(store: Any) -> np.ndarray:
    """|prediction at the last capture − target| of every compound of a store (inf where not finite)."""
    pred = np.asarray(store.group["prediction"][:, -1], dtype=np.float64)
    err = np.abs(pred - np.asarray(store.targets, dtype=np.float64))
    return np.where(np.isfinite(err), err, np.inf)


def sample_compounds(store: Any, n: int = DEFAULT_SAMPLE) -> list[int]:
    """``n`` representative rows of a store, across numbers of elements and errors.

    The numbers of elements get picks in proportion to how many distinct compounds have them
    (largest remainder, so the common ones are shown and a rare one only when ``n`` allows); within
    a number, the error of the last capture (:func:`final_errors`) picks the median
    compound for one pick, else the best, the worst and evenly spaced ranks between. A formula is
    picked once (its first row). The explorer spreads its larger sample evenly over the numbers of
    elements instead (:func:`crabnet.web.explorer.choose_compounds`), which for a handful would favour
    rare ones (unaries, 7-element compounds).

    Returns:
        rows ordered by number of elements, then error.
    """
    from crabnet.data import normalise_formula
    from crabnet.errors import DataError

    first: dict[str, int] = {}
    for i, f in enumerate(store.formulas):
        try:
            first.setdefault(normalise_formula(f), i)
        except DataError:
            first.setdefault(f"row:{i}", i)
    n_elements = (np.asarray(store.elements) > 0).sum(axis=1)
    groups: dict[int, list[int]] = {}
    for i in first.values():
        groups.setdefault(int(n_elements[i]), []).append(i)
    n = min(n, len(first))
    exact = {k: n * len(v) / len(first) for k, v in groups.items()}
    quota = {k: int(x) for k, x in exact.items()}
    for k in sorted(groups, key=lambda k: (quota[k] - exact[k], -len(groups[k]), k))[: n - sum(quota.values())]:
        quota[k] += 1
    err = final_errors(store)
    picked: list[int] = []
    for k in sorted(groups):
        ranked = sorted(groups[k], key=lambda i: (err[i], i))
        if quota[k] == 1:
            picked.append(ranked[len(ranked) // 2])
        elif quota[k] > 1:
            picked += [ranked[p] for p in np.unique(np.rint(np.linspace(0, len(ranked) - 1, quota[k])).astype(int))]
    return picked


def print_selection(store: Any, rows: list[int], missing: list[str], dataset: str, *, explicit: bool) -> None:
    """Say which asked-for compounds the store lacks, and which were chosen when no paper compound is there."""
    if missing:
        print(f"not in the captured {store.attrs.get('split', '')} split of {dataset} (skipped): {', '.join(missing)}")
    if not explicit and len(missing) == len(PAPER_COMPOUNDS.get(dataset, [])):  # no paper compound here
        print(
            f"no paper videos for {dataset} in this store: {len(rows)} compounds across numbers of elements and "
            f"errors (--formula/--index choose others): {', '.join(store.formulas[i] for i in rows)}"
        )


def select_compounds(
    store: Any, formulas: Sequence[str] = (), indices: Sequence[int] = (), dataset: str = "", n_sample: int = 0
) -> tuple[list[int], list[str]]:
    """Rows of the store to render, and the paper compounds not found in it.

    Explicit ``formulas`` (matched after normalising, ``HfO2`` finds ``Hf1O2``) and ``indices``
    win; without them the paper's compounds of ``dataset`` that the store holds are chosen, and
    where there are none (no paper list for the dataset, or none of it in the store) ``n_sample``
    representative compounds (:func:`sample_compounds`).

    Args:
        store: a :class:`crabnet.explain.store.AttentionStore`.
        formulas: compounds to render by formula.
        indices: compounds to render by row.
        dataset: selects the paper's compounds (:data:`PAPER_COMPOUNDS`).
        n_sample: how many representative compounds to choose when nothing else is (0 = raise instead).

    Raises:
        KeyError: unknown formulas (the message lists close matches for each).
        IndexError: rows out of range.
        ValueError: nothing chosen, no paper compounds for this dataset in the store and ``n_sample`` 0.
    """
    rows: list[int] = []
    if formulas or indices:
        problems = []
        for f in formulas:
            try:
                rows.append(store.find(f))
            except KeyError as err:
                problems.append(str(err.args[0]) if err.args else repr(f))
        if problems:
            raise KeyError("\n".join(problems))
        for i in indices:
            if not 0 <= int(i) < len(store):
                raise IndexError(f"--index {i} out of range: the store has rows 0..{len(store) - 1}")
            rows.append(int(i))
        return list(dict.fromkeys(rows)), []
    paper = PAPER_COMPOUNDS.get(dataset, [])
    missing = []
    for f in paper:
        try:
            rows.append(store.find(f))
        except KeyError:
            missing.append(f)
    if not rows and n_sample > 0 and len(store):
        return sample_compounds(store, n_sample), missing
    if not rows:
        example = store.formulas[0] if len(store) else "Fe2O3"
        what = (
            f"none of the paper's {dataset} compounds ({', '.join(paper)}) is in the captured split"
            if paper
            else f"the paper made no videos for {dataset}"
        )
        raise ValueError(f"{what}; choose compounds with --formula (e.g. --formula {example}) or --index")
    return list(dict.fromkeys(rows)), missing


# --------------------------------------------------------------------------------------------
# jobs


def safe_name(formula: str) -> str:
    """File-name-safe form of a formula: letters, digits, ``.``, ``-``, ``(`` and ``)`` kept, others ``_``."""
    name = re.sub(r"[^A-Za-z0-9.()\-]+", "_", formula.strip()).strip("._") or "compound"
    return name[:150]


def video_paths(out_dir: Path | str, formula: str, layers: Sequence[int], n_layers: int) -> dict[str, Path]:
    """The three output files of a compound.

    Layer 0 alone gives ``<formula>_attention.mp4``, ``<formula>_progress.mp4`` and
    ``<formula>.mp4``; another single layer adds ``_layer<N>``, all layers ``_layers``.
    """
    base = safe_name(formula)
    if list(layers) == list(range(n_layers)) and n_layers > 1:
        base += "_layers"
    elif list(layers) != [0]:
        base += "_layer" + "-".join(str(l) for l in layers)
    out = Path(out_dir)
    return {
        "attention": out / f"{base}_attention.mp4",
        "progress": out / f"{base}_progress.mp4",
        "merged": out / f"{base}.mp4",
    }


@dataclass
class VideoJob:
    """One compound's three videos: what to show, where to write, how to encode."""

    data: VideoInput
    outputs: dict[str, Path]
    fps: float = 10.0
    dpi: float = 100.0
    crf: int = 18
    preset: str = DEFAULT_PRESET
    ffmpeg: str | None = None

    @property
    def name(self) -> str:
        return f"{self.data.formula} ({layer_label(self.data.layers)})"

    def metadata(self) -> dict[str, str]:
        """Written into each video's ``comment``; an up-to-date check compares it."""
        d = self.data
        return {
            "title": f"{d.formula} {layer_label(d.layers)}",
            "comment": f"crabnet attention video; dataset={d.dataset}; formula={d.formula}; "
            f"layers={','.join(map(str, d.layers))}; captures={d.n_captures}; fps={self.fps:g}; "
            f"dpi={self.dpi:g}; crf={self.crf}; preset={self.preset}",
        }

    def up_to_date(self, newer_than: float) -> bool:
        """All three videos exist, are newer than ``newer_than`` (a store's mtime) and were made with these settings."""
        paths = list(self.outputs.values())
        if not all(p.is_file() and p.stat().st_mtime >= newer_than for p in paths):
            return False
        try:
            meta = probe_video(self.outputs["merged"], count_frames=False, ffmpeg=self.ffmpeg).metadata
        except VideoError:
            return False
        return meta.get("comment") == self.metadata()["comment"]


def plan_jobs(
    store: Any, rows: Sequence[int], layers: Sequence[int], out_dir: Path | str, *, dataset: str = "", **settings: Any
) -> list[VideoJob]:
    """One job per chosen row of a store, with its output paths.

    A formula that occurs twice among the rows (e.g. polymorphs) gets ``_row<i>`` in its later names.

    Args:
        store: a :class:`crabnet.explain.store.AttentionStore`.
        rows: rows to render.
        layers: layers to show.
        out_dir: where the videos go.
        dataset: for titles and metadata.
        settings: fps, dpi, crf, preset, ffmpeg of :class:`VideoJob`.
    """
    n_layers = int(store.attrs["n_layers"])
    capture = str(store.attrs.get("capture", "epoch"))
    jobs, used = [], set()
    for i in rows:
        data = VideoInput.from_history(store.compound(i), layers, capture=capture, dataset=dataset)
        paths = video_paths(out_dir, data.formula, layers, n_layers)
        if paths["merged"] in used:
            paths = video_paths(out_dir, f"{data.formula}_row{i}", layers, n_layers)
        used.add(paths["merged"])
        jobs.append(VideoJob(data=data, outputs=paths, **settings))
    return jobs


def render_job(job: VideoJob, progress: bool | None = False) -> dict[str, Path]:
    """Render every capture of one compound and encode its three videos.

    Frames are rendered once and piped to three ffmpeg processes at the same time (attention,
    progress and the two side by side), so encoding runs beside rendering.

    Args:
        job: the compound, output paths and encoding settings.
        progress: a per-frame progress bar: None = when on a terminal, False = never.

    Returns:
        The paths written, by kind (attention, progress, merged).
    """
    from tqdm.auto import tqdm

    renderer = FrameRenderer(job.data, dpi=job.dpi)
    try:
        first = renderer.frames(0)
        meta = job.metadata()
        with contextlib.ExitStack() as stack:
            pipes = {
                kind: stack.enter_context(
                    ffmpeg_writer(
                        job.outputs[kind],
                        (first[kind].shape[1], first[kind].shape[0]),
                        job.fps,
                        crf=job.crf,
                        preset=job.preset,
                        metadata=meta,
                        ffmpeg=job.ffmpeg,
                    )
                )
                for kind in KINDS
            }
            disable = None if progress is None else not progress
            for k in tqdm(
                range(job.data.n_captures), desc=job.data.formula, unit="frame", disable=disable, leave=False
            ):
                frames = first if k == 0 else renderer.frames(k)
                for kind in KINDS:
                    pipes[kind].write(frames[kind])
    finally:
        renderer.close()
    return dict(job.outputs)


def _render_job_quiet(job: VideoJob) -> dict[str, Path]:
    """Worker entry point (no per-frame bars from several processes)."""
    return render_job(job, progress=False)


def _pool_context():
    """A start method that does not fork this (multi-threaded: zarr, torch) process.

    forkserver where available: workers fork from a small server process that imported the
    package once. Each worker re-imports the script's ``__main__``, which imports
    ``crabnet.explain.capture`` (torch, zarr); preloading it in the server makes that free. (Python 3.11's
    server ignores the parent's sys.path, so the preload works when run from the repository root,
    as the scripts are; elsewhere it silently falls back to importing in every worker.)
    """
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["crabnet.explain.capture", "crabnet.explain.video"])
        return ctx
    return multiprocessing.get_context("spawn")


def render_videos(jobs: list[VideoJob], store_time: float, *, force: bool = False, workers: int = 0) -> None:
    """Render the jobs whose videos are older than the store (all with ``force``), printing each as it ends.

    Raises:
        VideoError: naming the compound whose rendering failed.
    """
    todo = []
    for job in jobs:
        if not force and job.up_to_date(store_time):
            print(f"{job.outputs['merged']} and its _attention/_progress videos are up to date (--force re-renders)")
        else:
            todo.append(job)
    if not todo:
        return
    first = todo[0].data
    print(
        f"rendering {len(todo)} compound(s) x {first.n_captures} captures, {len(first.layers)} layer(s) x "
        f"{first.attention.shape[2]} heads, {todo[0].fps:g} fps"
    )
    t0 = time.perf_counter()
    run_jobs(
        todo,
        workers=workers,
        on_done=lambda job, paths: print(f"{job.data.formula}: {', '.join(p.name for p in paths.values())}"),
    )
    print(f"{3 * len(todo)} videos in {time.perf_counter() - t0:.1f} s -> {todo[0].outputs['merged'].parent}")


def run_jobs(
    jobs: Sequence[VideoJob],
    workers: int = 0,
    progress: bool | None = None,
    on_done: Callable[[VideoJob, dict[str, Path]], None] | None = None,
) -> list[dict[str, Path]]:
    """Render and encode several jobs, on a process pool when there are several jobs and workers.

    Args:
        jobs: the compounds to render.
        workers: processes (0 = all cores); one job or one worker renders in this process.
        progress: tqdm ``disable`` semantics inverted: None = auto (a terminal), False = off.
        on_done: called in this process after each finished job.

    Raises:
        VideoError: naming the compound whose rendering or encoding failed (the worker's
            exception chained); the remaining jobs are cancelled.
    """
    from tqdm.auto import tqdm

    workers = workers or available_cpus()
    results: list[dict[str, Path] | None] = [None] * len(jobs)
    disable = None if progress is None else not progress
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(tqdm(jobs, desc="videos", unit="compound", disable=disable or len(jobs) <= 1)):
            try:
                results[i] = render_job(job, progress=progress)
            except Exception as err:
                raise VideoError(f"{job.name}: {err}") from err
            if on_done:
                on_done(job, results[i])
        return results  # type: ignore[return-value]
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_pool_context()) as pool:
        futures = {pool.submit(_render_job_quiet, job): i for i, job in enumerate(jobs)}
        bar = tqdm(total=len(jobs), desc="videos", unit="compound", disable=disable)
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    i = futures[fut]
                    err = fut.exception()
                    if err is not None:
                        for other in pending:
                            other.cancel()
                        raise VideoError(f"{jobs[i].name}: {err}") from err
                    results[i] = fut.result()
                    bar.update()
                    if on_done:
                        on_done(jobs[i], results[i])
        finally:
            bar.close()
    return results  # type: ignore[return-value]
