"""Attention maps and prediction progress through training, rendered to frames and encoded with ffmpeg.

The pieces, used by ``generate_attention_videos.py`` (step 2):

- :mod:`crabnet.explain.frames` — one compound's history (:class:`VideoInput`) drawn into frames.
- :func:`ffmpeg_writer` — frames piped to ``ffmpeg`` (libx264, CRF 18, preset veryfast, yuv420p,
  +faststart), written to a temporary file renamed into place on success; ffmpeg's stderr in
  the error on failure. :func:`find_ffmpeg` prefers a system ``ffmpeg`` and falls back to the
  binary of ``imageio-ffmpeg``.
- :func:`render_job` / :func:`run_jobs` — one compound's three videos; several compounds as jobs of
  the Dask engine (``crabnet.jobs.engine``), a failure re-raised with the compound named.
- :func:`probe_video` — frame count, duration, size, codec and metadata read back with ffmpeg.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crabnet.errors import JobsFailed, VideoError
from crabnet.explain.frames import FrameRenderer, VideoInput, layer_label
from crabnet.jobs.engine import Engine, Job
from crabnet.jobs.engine import run_jobs as engine_run_jobs
from crabnet.progress import bar, say
from crabnet.utils import atomic_path

DEFAULT_PRESET = "veryfast"  # libx264: half the CPU of "medium" for these flat graphics, ~15 % larger files
KINDS = ("attention", "progress", "merged")
DEFAULT_SAMPLE = 5  # compounds rendered for a dataset without paper videos

# Compounds of the paper's videos (Wang et al. 2022), by dataset.
PAPER_COMPOUNDS: dict[str, list[str]] = {
    "aflow__ael_bulk_modulus_vrh": ["P1W3", "C11N4", "HfO2", "Pt3Ti1", "GaN", "Gd2O7Ti2", "BN", "AlGdO3", "Hf2La2O7"],
    "mp_bulk_modulus": ["SiO2", "FeCO3", "YSF", "Fe(HO)2", "AgSbTe2", "NaNO3", "Al2O3", "LiFeO2"],
}


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
        say(f"not in the captured {store.attrs.get('split', '')} split of {dataset} (skipped): {', '.join(missing)}")
    if not explicit and len(missing) == len(PAPER_COMPOUNDS.get(dataset, [])):  # no paper compound here
        say(
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
            for k in bar(range(job.data.n_captures), progress, desc=job.data.formula, unit="frame", leave=False):
                frames = first if k == 0 else renderer.frames(k)
                for kind in KINDS:
                    pipes[kind].write(frames[kind])
    finally:
        renderer.close()
    return dict(job.outputs)


def render_videos(
    jobs: list[VideoJob], store_time: float, *, force: bool = False, engine: Engine | None = None
) -> None:
    """Render the jobs whose videos are older than the store (all with ``force``), printing each as it ends.

    Raises:
        VideoError: naming the compound whose rendering failed.
    """
    todo = []
    for job in jobs:
        if not force and job.up_to_date(store_time):
            say(f"{job.outputs['merged']} and its _attention/_progress videos are up to date (--force re-renders)")
        else:
            todo.append(job)
    if not todo:
        return
    first = todo[0].data
    say(
        f"rendering {len(todo)} compound(s) x {first.n_captures} captures, {len(first.layers)} layer(s) x "
        f"{first.attention.shape[2]} heads, {todo[0].fps:g} fps"
    )
    t0 = time.perf_counter()
    run_jobs(
        todo, engine, on_done=lambda job, paths: say(f"{job.data.formula}: {', '.join(p.name for p in paths.values())}")
    )
    say(f"{3 * len(todo)} videos in {time.perf_counter() - t0:.1f} s -> {todo[0].outputs['merged'].parent}")


def _render(job: VideoJob) -> dict[str, Path]:
    """One job of the engine: the compound's videos, or a VideoError that names it."""
    try:
        return render_job(job, progress=False)
    except Exception as err:
        raise VideoError(f"{job.name}: {err}") from err


def run_jobs(
    jobs: Sequence[VideoJob],
    engine: Engine | None = None,
    on_done: Callable[[VideoJob, dict[str, Path]], None] | None = None,
) -> list[dict[str, Path]]:
    """Render and encode several jobs as jobs of the Dask engine (``crabnet.jobs.engine``: in this process
    for one job or one core, else on a LocalCluster or the cluster ``engine`` names).

    Args:
        jobs: the compounds to render.
        engine: where to run them (default: the engine's default, ``--scheduler local``).
        on_done: called in this process after each finished job.

    Raises:
        VideoError: naming each compound whose rendering or encoding failed (after the others finished).
    """
    by_name = {job.outputs["merged"].stem: job for job in jobs}
    tasks = [Job(name, _render, {"job": job}) for name, job in by_name.items()]
    done = (lambda task, paths: on_done(by_name[task.name], paths)) if on_done else None
    try:
        return engine_run_jobs(tasks, engine or Engine(), what="videos", on_result=done)
    except JobsFailed as err:
        raise VideoError("\n".join(text for _, text in err.failures)) from err
