"""Attention/progress videos: rendering, ffmpeg encoding and the generate_attention_videos.py script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import generate_attention_videos as gav
from crabnet.data import compositions_from_formulas
from crabnet.explain.frames import HIGHLIGHT, AttentionFigure, ProgressFigure, VideoInput
from crabnet.explain.store import AttentionStore, AttentionWriter
from crabnet.explain.video import (
    VideoError,
    VideoJob,
    ffmpeg_writer,
    find_ffmpeg,
    parse_layers,
    plan_jobs,
    probe_video,
    run_jobs,
    safe_name,
    select_compounds,
    video_paths,
)
from crabnet.jobs.cli import run
from crabnet.jobs.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
FORMULAS = ["Hf1O2", "Gd2O7Ti2", "P1W3", "Fe2O3", "Al1Gd1O3"]
C, L, H = 5, 2, 3  # captures, layers, heads (3 heads: nothing may assume 4)
STEPS = [0, 1, 2, 3, 4]
DPI = 40


def known_prediction(i: int, c: int) -> float:
    return 50.0 + 10.0 * i + 7.0 * c - 3.0 * (c % 2)


def write_store(data_dir: Path, dataset: str = "synth", formulas=FORMULAS, captures: int = C) -> Path:
    """A finished attention store with known predictions and random maps over the real elements."""
    rng = np.random.default_rng(0)
    data = compositions_from_formulas(formulas, np.arange(len(formulas), dtype=np.float32) * 20 + 60)
    n, E = len(data), data.width
    path = data_dir / "attention" / dataset / "attention.zarr"
    writer = AttentionWriter(
        path, data, L, H, {"dataset": dataset, "features": "onehot", "split": "val", "capture": "epoch"}
    )
    real = data.elements > 0
    written = []
    for step in range(captures):
        c = writer.begin_capture(step)
        maps = rng.random((n, L, H, E, E)).astype(np.float32)
        maps *= real[:, None, None, None, :] * real[:, None, None, :, None]
        maps /= np.maximum(maps.sum(-1, keepdims=True), 1e-12)
        writer.write_batch(c, 0, maps)
        writer.write_prediction(c, np.array([known_prediction(i, c) for i in range(n)], np.float32))
        written.append(maps)
    writer.finalize(progress=False)
    # the round trip keeps every map: what the videos show is what was written
    store, written = AttentionStore(path), np.stack(written, axis=1)  # (n, captures, L, H, E, E)
    for i in range(n):
        h = store.compound(i)
        k = len(h.elements)
        np.testing.assert_array_equal(h.attention, written[i, :, :, :, :k, :k])
        np.testing.assert_array_equal(h.prediction, [known_prediction(i, c) for c in range(captures)])
    return path


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    write_store(tmp_path)
    return tmp_path


def history_input(path: Path, key, layers=(0,)) -> VideoInput:
    return VideoInput.from_history(AttentionStore(path).compound(key), list(layers), dataset="synth")


def run_main(data_dir: Path, *args: str) -> int:
    argv = ["--data-dir", str(data_dir), "--dataset", "synth", "--scheduler", "sequential", "--dpi", str(DPI), *args]
    return run(gav.main, gav.parse_args(argv))  # as the script runs: usage errors -> exit 2


def test_script_three_videos_frames_duration_format(store_dir, capsys):
    rc = run_main(store_dir, "--formula", "HfO2", "--fps", "4")  # HfO2 matches the stored Hf1O2
    assert rc == 0, capsys.readouterr().err
    out_dir = store_dir / "videos" / "synth"
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["Hf1O2.mp4", "Hf1O2_attention.mp4", "Hf1O2_progress.mp4"]  # no frame or temp files left
    sizes = {}
    for name in names:
        info = probe_video(out_dir / name)
        assert info.frames == C
        assert info.duration == pytest.approx(C / 4, abs=0.02)
        assert info.codec == "h264" and info.pix_fmt == "yuv420p"
        assert info.width % 2 == 0 and info.height % 2 == 0
        sizes[name] = (info.width, info.height)
        raw = (out_dir / name).read_bytes()
        assert 0 <= raw.find(b"moov") < raw.find(b"mdat")  # +faststart
    assert sizes["Hf1O2.mp4"][0] >= sizes["Hf1O2_attention.mp4"][0] + sizes["Hf1O2_progress.mp4"][0] - 2
    assert str(out_dir) in capsys.readouterr().out

    # up to date -> skipped; a different fps or --force re-renders
    mtime = (out_dir / "Hf1O2.mp4").stat().st_mtime_ns
    assert run_main(store_dir, "--formula", "HfO2", "--fps", "4") == 0
    assert "up to date" in capsys.readouterr().out
    assert (out_dir / "Hf1O2.mp4").stat().st_mtime_ns == mtime
    assert run_main(store_dir, "--formula", "HfO2", "--fps", "5") == 0
    assert probe_video(out_dir / "Hf1O2.mp4", count_frames=False).duration == pytest.approx(C / 5, abs=0.02)
    assert run_main(store_dir, "--formula", "HfO2", "--fps", "5", "--force") == 0
    assert "up to date" not in capsys.readouterr().out


def test_frame_k_shows_capture_k(store_dir):
    """Maps, title and the highlighted progress point of frame k all come from capture k."""
    path = store_dir / "attention" / "synth" / "attention.zarr"
    data = history_input(path, "Gd2O7Ti2", layers=(1,))
    store = AttentionStore(path)
    row = store.find("Gd2O7Ti2")
    att = AttentionFigure(data, dpi=DPI)
    prog = ProgressFigure(data, dpi=DPI, height=att.height_in)
    assert len(att.images) == store.attrs["n_heads"] == H
    highlight = np.array([int(HIGHLIGHT[i : i + 2], 16) for i in (1, 3, 5)])
    bbox = prog.ax.get_window_extent()
    fig_h = prog.fig.bbox.height
    r0, r1 = int(fig_h - bbox.y1), int(fig_h - bbox.y0)
    c0, c1 = int(bbox.x0), int(bbox.x1)
    y_span = np.ptp(prog.ax.get_ylim())
    limits = (prog.ax.get_xlim(), prog.ax.get_ylim())
    frames = []
    for k in range(C):
        frame = att.render(k)
        frames.append(frame)
        for im, l, h in att.images:
            np.testing.assert_array_equal(np.asarray(im.get_array()), data.attention[k, l, h])
            np.testing.assert_array_equal(data.attention[k, l, h], store.compound(row).attention[k, 1, h])
        assert f"epoch {STEPS[k]}" in att.title.get_text() and "layer 1" in att.title.get_text()

        pframe = prog.render(k)
        inside = pframe[r0:r1, c0:c1].astype(int)
        red = np.argwhere((np.abs(inside - highlight) < 40).all(-1))
        assert len(red) > 10, f"no highlighted point in frame {k}"
        row_px, col_px = red.mean(0)
        x, y = prog.data_at_pixel(col_px + c0, row_px + r0)
        assert x == pytest.approx(STEPS[k], abs=0.05 * C)
        assert y == pytest.approx(known_prediction(row, k), abs=0.03 * y_span)
        np.testing.assert_array_equal(prog.line.get_ydata(), [known_prediction(row, j) for j in range(k + 1)])
        assert (prog.ax.get_xlim(), prog.ax.get_ylim()) == limits  # fixed axes over the whole video
    assert not np.array_equal(frames[0], frames[1])
    lo, hi = prog.ax.get_ylim()
    assert lo < min(data.target, data.predictions.min()) and hi > max(data.target, data.predictions.max())


def test_blitted_frames_match_full_redraw(store_dir):
    data = history_input(store_dir / "attention" / "synth" / "attention.zarr", 1)
    for fig in (AttentionFigure(data, dpi=DPI), ProgressFigure(data, dpi=DPI)):
        fast = fig.render(3)
        full = fig.render(3, full=True)
        assert fast.shape == full.shape and fast.shape[0] % 2 == 0 and fast.shape[1] % 2 == 0
        assert (np.abs(fast.astype(int) - full).max(-1) > 40).mean() < 0.002


def test_unknown_formula_lists_close_matches(store_dir, capsys):
    assert run_main(store_dir, "--formula", "HfO3") == 2
    err = capsys.readouterr().err
    assert "HfO3" in err and "close matches" in err and "Hf1O2" in err
    assert not (store_dir / "videos").exists()
    # nothing textually close: compounds of the store to try are still offered, same elements first
    assert run_main(store_dir, "--formula", "FeO", "--formula", "GaN", "--formula", "Xx2") == 2
    lines = capsys.readouterr().err.splitlines()
    assert "'FeO'" in lines[-3] and lines[-3].split("close matches: ")[1].startswith("Fe2O3")
    assert "'GaN'" in lines[-2] and "close matches: none" not in lines[-2]
    assert "'Xx2'" in lines[-1] and any(f in lines[-1] for f in FORMULAS)
    assert run_main(store_dir, "--index", "99") == 2 and "out of range" in capsys.readouterr().err
    assert run_main(store_dir, "--formula", "P1W3", "--layer", "2") == 2
    assert "layers 0..1" in capsys.readouterr().err


def test_missing_store_points_to_step_1(tmp_path, capsys):
    assert run(gav.main, gav.parse_args(["--data-dir", str(tmp_path), "--quick"])) == 2
    err = capsys.readouterr().err
    assert "no attention store" in err and "get_training_attention.py" in err


def test_quick_paper_compounds_found_and_missing_reported(tmp_path):
    path = write_store(tmp_path, "aflow__ael_bulk_modulus_vrh", formulas=["Fe2O3", "Hf1O2", "W3P1", "Na1Cl1"])
    store = AttentionStore(path)
    rows, missing = select_compounds(store, dataset="aflow__ael_bulk_modulus_vrh")
    assert [store.formulas[i] for i in rows] == ["W3P1", "Hf1O2"]  # paper order; P1W3 matches W3P1
    assert "C11N4" in missing and "HfO2" not in missing
    with pytest.raises(ValueError, match="--formula"):
        select_compounds(store, dataset="aflow__Egap")


def test_dataset_without_paper_videos_renders_a_sample(tmp_path, capsys, monkeypatch):
    """Step 2's defaults on a dataset the paper made no videos of (aflow__Egap, step 1's default)."""
    formulas = ["Fe1", "Cu1", "Hf1O2", "Fe2O3", "Na1Cl1", "Al1Gd1O3", "Gd2O7Ti2", "Li1Fe1O2", "Ba1Ti1O3", "K1Mg1F3"]
    store = AttentionStore(write_store(tmp_path, formulas=formulas, captures=2))
    rows, missing = select_compounds(store, dataset="synth", n_sample=4)
    assert missing == [] and len(rows) == len(set(rows)) == 4
    assert {int((store.elements[i] > 0).sum()) for i in rows} == {1, 2, 3}  # spread over numbers of elements
    with pytest.raises(ValueError, match="--formula"):  # without n_sample nothing is chosen for it
        select_compounds(store, dataset="synth")

    monkeypatch.setattr(gav, "DEFAULT_SAMPLE", 2)  # fewer videos to encode
    assert run_main(tmp_path) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("no paper videos for synth"))
    picked = line.split(": ")[-1].split(", ")
    assert len(picked) == 2 and set(picked) <= set(formulas)
    assert sorted(p.name for p in (tmp_path / "videos" / "synth").glob("*.mp4")) == sorted(
        f"{f}{suffix}.mp4" for f in picked for suffix in ("", "_attention", "_progress")
    )
    assert (tmp_path / "explorer" / "synth.html").is_file()


def test_layer_all_one_row_per_layer(store_dir, capsys):
    assert run_main(store_dir, "--index", "2", "--layer", "all") == 0
    out_dir = store_dir / "videos" / "synth"
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "P1W3_layers.mp4",
        "P1W3_layers_attention.mp4",
        "P1W3_layers_progress.mp4",
    ]
    data = history_input(store_dir / "attention" / "synth" / "attention.zarr", 2, layers=range(L))
    assert len(AttentionFigure(data, dpi=DPI).images) == L * H
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("1", 3) == [1]
    with pytest.raises(ValueError):
        parse_layers("x", 3)


def test_ffmpeg_failure_raises_with_stderr(tmp_path):
    out = tmp_path / "v.mp4"
    frame = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(VideoError) as info, ffmpeg_writer(out, (16, 16), 10, preset="no-such-preset") as pipe:
        for _ in range(50):
            pipe.write(frame)
    assert "ffmpeg failed" in str(info.value) and "preset" in str(info.value).lower()
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@pytest.mark.cluster  # a LocalCluster of the engine
def test_engine_runs_video_jobs_and_names_failing_compound(store_dir):
    path = store_dir / "attention" / "synth" / "attention.zarr"
    out = store_dir / "videos"
    jobs = [VideoJob(history_input(path, i), video_paths(out, FORMULAS[i], [0], L), fps=10, dpi=30) for i in (0, 3)]
    results = run_jobs(jobs, Engine(threads_per_job=1))
    assert [r["merged"].name for r in results] == ["Hf1O2.mp4", "Fe2O3.mp4"]
    assert all(
        probe_video(p, count_frames=False).duration == pytest.approx(0.5, abs=0.02) for r in results for p in r.values()
    )
    jobs[1].preset = "no-such-preset"
    with pytest.raises(VideoError, match=r"Fe2O3[\s\S]*ffmpeg failed"):
        run_jobs(jobs, Engine(threads_per_job=1))


def test_safe_names_and_ffmpeg_found():
    assert safe_name("Fe(HO)2") == "Fe(HO)2"
    assert safe_name("Li0.5Co0.5O2") == "Li0.5Co0.5O2"
    assert safe_name("../a b/c") == "a_b_c"
    assert os.access(find_ffmpeg(), os.X_OK)


def test_help_states_defaults_and_next_step(capsys):
    with pytest.raises(SystemExit) as info:
        gav.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "default: 10" in out and "guess_oxidation.py" in out and "--scheduler" in out


@pytest.mark.slow
def test_real_training_store_to_videos(tiny_data):
    """Step 1 on a tiny dataset, then step 2 as a user runs it."""
    train = subprocess.run(
        [
            sys.executable,
            str(ROOT / "get_training_attention.py"),
            "--data-dir",
            str(tiny_data),
            "--dataset",
            "tiny",
            "--epochs",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert train.returncode == 0, train.stderr
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate_attention_videos.py"),
            "--data-dir",
            str(tiny_data),
            "--dataset",
            "tiny",
            "--index",
            "0",
            "--index",
            "1",
            "--dpi",
            "50",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    videos = sorted((tiny_data / "videos" / "tiny").glob("*.mp4"))
    assert len(videos) == 6
    assert all(probe_video(v).frames == 3 for v in videos)


def test_same_formula_twice_gets_distinct_names(tmp_path):
    path = write_store(tmp_path, formulas=["Fe2O3", "Fe2O3", "Hf1O2"], captures=2)
    jobs = plan_jobs(AttentionStore(path), [0, 1, 2], [0], tmp_path / "v", dataset="synth", fps=10)
    assert [j.outputs["merged"].name for j in jobs] == ["Fe2O3.mp4", "Fe2O3_row1.mp4", "Hf1O2.mp4"]
    assert jobs[1].outputs["attention"].name == "Fe2O3_row1_attention.mp4"
