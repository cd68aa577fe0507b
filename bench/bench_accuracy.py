"""Smoke test of the accuracy benchmark (``bench/accuracy.py``): its --quick configuration on the small
problems only (a 2-D banana, a 5-D coupled quartic, the D = 1e4 power-law quadratic), one seed.

It checks that the run completes, that every (problem, method) gets a row in both files, that no method
fails, and that what is exact by construction is exact: on the quadratic power-law problem the
sequential estimator (whose surrogate is the exact cost there) lands within 2 nats of the truth. The
benchmark's figures themselves come from the full run (``python bench/accuracy.py``), not from here.

    python -m pytest -q -p no:cacheprovider bench/bench_accuracy.py
"""

import fcntl
import json
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import accuracy_problems  # noqa: E402

PROBLEMS = ("banana-2d", "coupled-quartic-5d", "powerlaw-1e4")


def test_quick_accuracy_table_on_small_problems(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy_problems, "CACHE_DIR", tmp_path / "cache")  # truths computed afresh
    out = tmp_path / "results"
    summary = accuracy.main(["--quick", "--problems", ",".join(PROBLEMS), "--seeds", "1", "--out", str(out)])

    data = json.loads((out / "accuracy.json").read_text())
    table = (out / "accuracy.md").read_text()
    assert {(r["problem"], r["method"]) for r in data["rows"]} == {(p, m) for p in PROBLEMS for m in accuracy.METHODS}
    for problem in PROBLEMS:
        truth = data["truths"][problem]
        assert math.isfinite(truth["log_volume"]) and truth["log_volume"] < 0, truth
        assert table.count(f"| {problem} |") == len(accuracy.METHODS) + 1  # its method rows and its truth row
    statuses = {o["status"] for o in data["outcomes"]}
    assert statuses <= {"ok", "incomplete", "skipped", "not available"}, [o for o in data["outcomes"] if o["status"] == "failed"]
    assert data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1 and "--quick" in data["machine"]["command"]

    rows = {(r["problem"], r["method"]): r for r in summary["rows"]}
    isotropic = rows[("powerlaw-1e4", "rays-isotropic")]
    assert isotropic["gap"] < -100, isotropic  # the rays' known bias in high dimension shows in the table
    sequential = rows[("powerlaw-1e4", "sequential")]
    if "not available" not in sequential["statuses"]:
        assert abs(sequential["gap"]) < 2.0, sequential


def test_update_merges_seeds_into_the_existing_table(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy_problems, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "results"
    common = ["--quick", "--problems", "banana-2d", "--out", str(out)]
    accuracy.main([*common, "--methods", "rays-isotropic,rays-diagonal-prior", "--seeds", "1"])
    first = json.loads((out / "accuracy.json").read_text())
    accuracy.main([*common, "--methods", "rays-isotropic", "--seeds", "1", "--first-seed", "1", "--update"])
    merged = json.loads((out / "accuracy.json").read_text())

    seeds = {(o["method"], o["seed"]) for o in merged["outcomes"]}
    assert seeds == {("rays-isotropic", 0), ("rays-isotropic", 1), ("rays-diagonal-prior", 0)}
    rows = {r["method"]: r for r in merged["rows"]}
    assert rows["rays-isotropic"]["seeds"] == 2 and rows["rays-diagonal-prior"]["seeds"] == 1
    assert rows["rays-diagonal-prior"]["estimate"] == next(r for r in first["rows"] if r["method"] == "rays-diagonal-prior")["estimate"]
    two = [o["estimate"] for o in merged["outcomes"] if o["method"] == "rays-isotropic"]
    assert math.isclose(rows["rays-isotropic"]["estimate"], sum(two) / 2)
    assert merged["machine"]["command"] == first["machine"]["command"]
    assert merged["machine"]["updates"][0]["cells"] == [["banana-2d", "rays-isotropic", [1]]]
    assert "Updated by `python bench/accuracy.py" in (out / "accuracy.md").read_text()

    # a rerun of a seed replaces it rather than counting it twice
    accuracy.main([*common, "--methods", "rays-isotropic", "--seeds", "1", "--first-seed", "1", "--update"])
    again = json.loads((out / "accuracy.json").read_text())
    assert len(again["outcomes"]) == 3 and len(again["machine"]["updates"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.json", "accuracy.md"]  # no partial file left


def test_update_waits_for_the_table_lock(tmp_path):
    # seeds run as separate processes merge into one table; a second merger must wait for the first
    out = tmp_path / "results"
    with accuracy.exclusive(out):
        other = os.open(out, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    free = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving
    finally:
        os.close(free)


def test_sequential_mixing_table(tmp_path):
    import sequential_mixing

    summary = sequential_mixing.main(["--dim", "8", "--seeds", "2", "--configs", "40x1", "--out", str(tmp_path)])
    rows = summary["rows"]
    assert [(r["particles"], r["moves_per_step"], r["seed"]) for r in rows] == [(40, 1, 0), (40, 1, 1)]
    for r in rows:
        assert abs(r["gap"]) < 2.0 and r["interval"][0] < r["interval"][1], r  # D = 8: the sampler is close
    assert "| 40 x 1 | 2 |" in (tmp_path / "sequential_mixing.md").read_text()
