"""Oxidation-state guesses (step 3): known answers, time bounds, worker failures, resuming."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
from pathlib import Path

import pytest

import guess_oxidation as go
from conftest import write_dataset
from crabnet.oxidation import (TIMEOUT, Guess, GuessCache, GuessPool, cache_path, element_ox_states, guess_all,
                               keys_for, reduced_key)

SLOW = "Co30Mn31O59"  # several seconds of pymatgen work (combinations of Co and Mn states)


def run(data_dir: Path, *args: str) -> int:
    return go.main(**vars(go.parse_args(["--data-dir", str(data_dir), "--workers", "2", *args])))


def write_split(root: Path, name: str, formulas: list[str], split: str = "test") -> None:
    folder = root / "benchmark_data" / name
    folder.mkdir(parents=True, exist_ok=True)
    for s in ("train", "val", "test"):
        rows = formulas if s == split else ["NaCl"]
        (folder / f"{s}.csv").write_text("formula,target\n" + "".join(f"{f},1.0\n" for f in rows))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_known_answers_and_bad_formula(tmp_path):
    formulas = ["Al2O3", "LiFeO2", "Fe3O4", "CuZn", "Xx2O3", "Fe6O8", "Al2O3"]
    write_split(tmp_path, "known", formulas)
    assert run(tmp_path, "--dataset", "known") == 0
    out = read_json(tmp_path / "oxidation" / "known__test.json")
    assert list(out) == ["Al2O3", "LiFeO2", "Fe3O4", "CuZn", "Xx2O3", "Fe6O8"]  # row order, once each
    assert out["Al2O3"] == {"Al": 3.0, "O": -2.0}
    assert out["LiFeO2"] == {"Li": 1.0, "Fe": 3.0, "O": -2.0}
    assert out["Fe3O4"]["O"] == -2.0 and out["Fe3O4"]["Fe"] == pytest.approx(8 / 3)
    assert out["Fe6O8"] == out["Fe3O4"]
    assert out["CuZn"] is None and out["Xx2O3"] is None

    with open(tmp_path / "oxidation" / "known__test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["formula"] for r in rows] == formulas  # every row, duplicates included
    by = {r["formula"]: r for r in rows}
    assert by["CuZn"]["reason"] == "no_solution"
    assert by["Xx2O3"]["reason"].startswith("invalid_formula") and "Xx" in by["Xx2O3"]["reason"]
    assert by["Fe3O4"]["reason"] == "" and float(by["Fe3O4"]["Fe"]) == pytest.approx(8 / 3)
    assert by["Fe6O8"]["reduced_formula"] == by["Fe3O4"]["reduced_formula"]
    assert by["Al2O3"]["Fe"] == ""

    states = read_json(tmp_path / "oxidation" / "element_ox_states.json")
    assert len(states) == 118 and list(states)[:3] == ["H", "He", "Li"]
    assert {2, 3} <= set(states["Fe"]["icsd"]) and set(states["Fe"]["common"]) <= set(states["Fe"]["all"])


def test_reduced_keys():
    assert reduced_key("Fe6O8") == reduced_key("Fe3O4") == reduced_key("O4Fe3")
    key, sites = reduced_key("Li0.5Co0.5O2")  # fractional -> smallest integer formula, reduced
    assert sites == 6 and sorted(key.split()) == ["Co1", "Li1", "O4"]
    split = keys_for("x", ["Al4O6", "K6Si2Te6", "fe2o3"], max_sites=6)
    assert split.keys[0] is not None and split.reasons[0] is None
    assert split.keys[1] is None and split.reasons[1] == "max_sites"  # K3SiTe3 has 7 atoms
    assert split.keys[2] is None and split.reasons[2].startswith("invalid_formula")


def test_timeout_is_recorded_and_the_run_goes_on():
    cache = GuessCache(None)
    keys = [reduced_key(f)[0] for f in (SLOW, "Al2O3", "NaCl")]
    run_info = guess_all(keys, cache, workers=1, max_seconds=0.2, progress=False)
    slow = cache.get(keys[0], 0.2)
    assert slow.states is None and slow.reason == TIMEOUT
    assert cache.get(keys[1], 0.2).states == {"Al": 3.0, "O": -2.0}
    assert cache.get(keys[2], 0.2).states == {"Na": 1.0, "Cl": -1.0}
    assert run_info["reasons"] == {"timeout": 1, "ok": 2}
    # a timeout is retried when the bound is raised, reused when it is not
    assert cache.get(keys[0], 0.1) is not None and cache.get(keys[0], 5.0) is None


def test_hard_bound_kills_a_stuck_worker():
    key = reduced_key(SLOW)[0]
    with GuessPool(1, max_seconds=0.2, hard_seconds=0.5, soft_timeout=False) as pool:
        got = list(pool.run([key, "Na1 Cl1"]))
        assert pool.kills == 1
    assert got[0].key == key and got[0].reason == TIMEOUT and got[0].states is None
    assert got[1] == Guess("Na1 Cl1", {"Na": 1.0, "Cl": -1.0}, None, got[1].seconds)


def test_wall_clock_bound_kills_a_blocked_worker():
    """A worker that stops using CPU (here: stopped by a signal) is killed at the wall-clock bound."""
    key = reduced_key(SLOW)[0]
    with GuessPool(1, max_seconds=30.0, hard_seconds=20.0, wall_seconds=1.0) as pool:
        results = pool.run(["Na1 Cl1", key, "Al2 O3"])
        first = next(results)  # the worker is ready and has now been sent SLOW
        timer = threading.Timer(0.2, os.kill, (pool._workers[0].proc.pid, signal.SIGSTOP))
        timer.start()
        got = [first, *results]
        timer.join()
        assert pool.kills == 1
    assert got[1].key == key and got[1].reason == TIMEOUT and 1.0 <= got[1].seconds < 20.0
    assert got[0].states == {"Na": 1.0, "Cl": -1.0} and got[2].states == {"Al": 3.0, "O": -2.0}


def test_worker_errors_and_deaths_are_recorded():
    key = reduced_key(SLOW)[0]
    with GuessPool(1, max_seconds=60.0) as pool:
        results = pool.run(["Fe0.5 O1", key, "Na1 Cl1"])
        first = next(results)  # the worker has now been sent SLOW, which takes seconds
        timer = threading.Timer(0.3, os.kill, (pool._workers[0].proc.pid, signal.SIGKILL))
        timer.start()
        try:
            got = {g.key: g for g in [first, *results]}
        finally:
            timer.cancel()
            timer.join()
        assert pool.deaths == 1
    assert got["Fe0.5 O1"].states is None and got["Fe0.5 O1"].reason.startswith("error: ValueError")
    assert got[key].states is None and got[key].reason.startswith("error: worker process died")
    assert got["Na1 Cl1"].states == {"Na": 1.0, "Cl": -1.0}


def test_resumed_run_reproduces_the_uninterrupted_output(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for root in (full, resumed):
        write_dataset(root, "tiny", sizes=(6, 6, 40), seed=3)
    assert run(full, "--dataset", "tiny", "--split", "all") == 0
    assert run(resumed, "--dataset", "tiny", "--split", "all") == 0

    # interrupt: keep the first third of the cache and half of the next line, drop the outputs
    cache = cache_path(resumed)
    lines = cache.read_text().splitlines(keepends=True)
    keep = len(lines) // 3
    cache.write_text("".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
    for p in (resumed / "oxidation").glob("tiny__*"):
        p.unlink()

    reloaded = GuessCache(cache)
    assert len(reloaded) == keep and reloaded.unreadable == 1
    assert run(resumed, "--dataset", "tiny", "--split", "all") == 0
    names = sorted(p.name for p in (full / "oxidation").glob("tiny__*"))
    assert len(names) == 6
    for name in names:
        assert (resumed / "oxidation" / name).read_bytes() == (full / "oxidation" / name).read_bytes(), name
    # only the missing results were computed: one new line each after the kept ones and the half line
    assert len(cache.read_text().splitlines()) == len(lines) + 1
    after = GuessCache(cache)
    assert len(after) == len(lines) and after.unreadable == 1


def test_bad_arguments_are_clear(tmp_path, capsys):
    write_split(tmp_path, "known", ["NaCl"])
    assert run(tmp_path, "--dataset", "nope") == 2
    assert "nope" in capsys.readouterr().err
    assert run(tmp_path, "--dataset", "known", "--max-seconds", "0") == 2


def test_element_ox_states_cover_all_elements():
    states = element_ox_states()
    assert len(states) == 118
    assert states["O"]["icsd"] == [-2] and states["He"]["all"] == []


def test_pool_without_fork_when_threads_run():
    """With another thread alive, workers come from the forkserver (forking a threaded process is unsafe)."""
    from crabnet.oxidation import _start_method

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        assert _start_method() != "fork"
        cache = GuessCache(None)
        guess_all(["Al2 O3", "Zn1 Cu1"], cache, workers=2, max_seconds=30.0, progress=False)
    finally:
        stop.set()
    assert cache.get("Al2 O3", 30.0).states == {"Al": 3.0, "O": -2.0}
    assert cache.get("Zn1 Cu1", 30.0).reason == "no_solution"
