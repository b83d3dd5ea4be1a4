"""The encoded videos show the rendered frames (run: pytest tests/test_video_decode.py).

Each of a compound's three videos (attention, progress, merged) is decoded frame by frame with
the ffmpeg binary the project uses (``crabnet.explain.video.find_ffmpeg``) and compared with a complete
matplotlib redraw of the same capture (``render(k, full=True)``, not the blitted fast path that
produced the video):

- the whole frame within a small tolerance for the codec: compared in luma, which yuv420p keeps
  at full resolution (colour is stored at half resolution, so sharp colour edges cannot be
  compared pixel by pixel);
- frame k is much closer to capture k than to any other capture (no frame skipped, repeated or
  out of order);
- the text that changes from frame to frame (the attention title with the epoch, the progress
  panel's values) near-exactly: every pixel within TEXT_TOL (32 of 255) luma levels (13-19
  measured), while the texts of two captures differ by 119 levels or more somewhere, so a stale
  epoch number fails.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_videos import DPI, C, write_store

from crabnet.explain.frames import FrameRenderer, VideoInput, merge_frames
from crabnet.explain.store import AttentionStore
from crabnet.explain.video import KINDS, VideoJob, find_ffmpeg, render_job, video_paths

LUMA = np.array([0.299, 0.587, 0.114])  # BT.601, as ffmpeg converts RGB to yuv420p and back by default
TEXT_TOL = 32  # luma levels: largest difference allowed anywhere in the changing text
FRAME_TOL = 32  # luma levels: at most FRAME_SHARE of a frame's pixels may differ by more
FRAME_SHARE = 0.001


def decode_luma(path: Path, width: int, height: int) -> np.ndarray:
    """Every frame of a video as (frames, height, width) luma in 0-255, decoded by ffmpeg."""
    out = subprocess.run(
        [
            find_ffmpeg(),
            "-nostdin",
            "-v",
            "error",
            "-i",
            str(path),
            "-map",
            "0:v:0",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "gray",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert len(out) % (width * height) == 0, f"{path}: {len(out)} bytes are not whole {width}x{height} frames"
    return np.frombuffer(out, np.uint8).reshape(-1, height, width).astype(np.float64)


def luma(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64) @ LUMA


def _text_box(fig, text) -> tuple[slice, slice]:
    """Pixel rows and columns of a matplotlib text in the figure's frames (1 px margin)."""
    bb = text.get_window_extent(fig.canvas.get_renderer())
    height = fig.fig.bbox.height
    return (
        slice(max(0, math.floor(height - bb.y1) - 1), math.ceil(height - bb.y0) + 1),
        slice(max(0, math.floor(bb.x0) - 1), math.ceil(bb.x1) + 1),
    )


def _union(boxes):
    rows = slice(min(b[0].start for b in boxes), max(b[0].stop for b in boxes))
    cols = slice(min(b[1].start for b in boxes), max(b[1].stop for b in boxes))
    return rows, cols


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """One compound's three videos (3 elements: cell values written), with full redraws of every capture."""
    root = tmp_path_factory.mktemp("decode")
    store = AttentionStore(write_store(root))
    data = VideoInput.from_history(store.compound("Gd2O7Ti2"), [1], dataset="synth")
    job = VideoJob(data, video_paths(root / "videos", data.formula, [1], 2), fps=4, dpi=DPI)
    render_job(job)
    renderer = FrameRenderer(data, dpi=DPI)
    att, prog = renderer.attention, renderer.progress
    full, att_boxes, prog_boxes = [], [], []
    for k in range(C):
        a, p = att.render(k, full=True), prog.render(k, full=True)
        full.append({"attention": a, "progress": p, "merged": merge_frames(a, p)})
        att_boxes.append(_text_box(att, att.title))
        prog_boxes.append(_text_box(prog, prog.value))
    renderer.close()
    a_box, p_box = _union(att_boxes), _union(prog_boxes)
    shift = full[0]["attention"].shape[1]  # the progress panel starts here in the merged frames
    boxes = {
        "attention": [a_box],
        "progress": [p_box],
        "merged": [a_box, (p_box[0], slice(p_box[1].start + shift, p_box[1].stop + shift))],
    }
    return job, full, boxes


@pytest.mark.parametrize("kind", KINDS)
def test_decoded_frames_are_the_rendered_captures(video, kind):
    job, full, _ = video
    h, w = full[0][kind].shape[:2]
    decoded = decode_luma(job.outputs[kind], w, h)
    assert len(decoded) == C
    rendered = [luma(f[kind]) for f in full]
    for k in range(C):
        diff = np.abs(decoded[k] - rendered[k])
        assert diff.mean() < 1.5, f"{kind} frame {k}: mean luma difference {diff.mean():.2f}"
        share = (diff > FRAME_TOL).mean()
        assert share < FRAME_SHARE, f"{kind} frame {k}: {share:.2%} of the pixels differ by > {FRAME_TOL}"
        # much closer to its own capture than to any other
        own = diff.mean()
        closest_other = min(np.abs(decoded[k] - rendered[j]).mean() for j in range(C) if j != k)
        assert own < 0.5 * closest_other, f"{kind} frame {k} looks like another capture"


@pytest.mark.parametrize("kind", KINDS)
def test_changing_text_near_exact(video, kind):
    """The title with the epoch (and the progress panel's values) match the redraw of that capture."""
    job, full, boxes = video
    h, w = full[0][kind].shape[:2]
    decoded = decode_luma(job.outputs[kind], w, h)
    for rows, cols in boxes[kind]:
        texts = [luma(f[kind])[rows, cols] for f in full]
        assert min(t.shape[0] for t in texts) >= 5 and np.ptp(texts[0]) > 150  # the box holds dark text on white
        for k in range(C):
            got = decoded[k][rows, cols]
            worst = np.abs(got - texts[k]).max()
            assert worst <= TEXT_TOL, f"{kind} frame {k}: text differs by {worst:.0f} luma levels"
            for j in range(C):
                if j != k:  # the check has power: another capture's text is far off
                    assert np.abs(texts[j] - texts[k]).max() > 3 * TEXT_TOL
