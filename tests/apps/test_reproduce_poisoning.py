"""`reproduce_poisoning` (apps.reproduce.poisoning_cnn): the small CNN, the files, the table, the verdicts,
resuming, and argument errors. Sizes are shrunk (a few training steps, a narrow CNN, a few directions)
through ``settings``, so every test runs in seconds."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from localvol_fast.apps.reproduce import poisoning_cnn
from localvol_fast.apps.reproduce.poisoning_report import method_verdict, poisoning_verdicts
from localvol_fast.core.statistics import t_quantile

TINY = {"seeds": [0, 1], "n_samples": 4, "channels": [2, 4], "steps": 20, "timing_n_samples": 3}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads make these tiny convolutions 10-100x
    slower (measured), and the figures do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(one_thread):
    """settings() shrunk to TINY (the quick run's other entries kept), for the whole module."""
    full = poisoning_cnn.settings

    def shrunk(quick: bool = False) -> dict:
        return {**full(quick), **TINY}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(poisoning_cnn, "settings", shrunk)
        yield TINY


@pytest.fixture(scope="module")
def finished_once(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("poisoning")
    return out, poisoning_cnn.reproduce_poisoning(out, progress=False)


@pytest.fixture
def finished(finished_once, tmp_path):
    """A copy of the finished run's directory (tests may change it) and its results."""
    out, results = finished_once
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, results


def test_cnn_shape_dimension_and_init():
    model = poisoning_cnn.digits_cnn(0)
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert sum(p.numel() for p in model.parameters()) == 80 + 1168 + 2570
    # Weights N(0, 1/fan_in): fan_in 9 for the first conv (std 1/3), 72 for the second, 256 for the linear.
    for layer, std in ((model[1], 1 / 3), (model[3], 72**-0.5), (model[6], 1 / 16)):
        assert float(layer.weight.detach().std()) == pytest.approx(std, rel=0.15)
    assert torch.equal(poisoning_cnn.digits_cnn(3)[1].weight, poisoning_cnn.digits_cnn(3)[1].weight)


def test_files_table_and_records(finished):
    out, results = finished
    assert {p.name for p in out.iterdir()} >= {"results.json", "report.md", "poisoning.png"}
    assert (out / "poisoning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"] == results["settings"] and len(saved["runs"]) == 2 * 2 * 2
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| \d+ \| (clean|poisoned) \|", line)]
    assert len(rows) == 8
    for record in saved["runs"].values():
        # Each run's row shows its own log volume; log10 is log / ln 10; the interval holds the estimate
        # at its top end (percentile bootstrap of a log-mean-exp: no resample exceeds the full set's max).
        row = f"| {record['seed']} | {record['kind']} | {record['train_accuracy']:.3f} | {record['test_accuracy']:.3f} | {record['method']} | {record['log_volume']:.1f} |"
        assert any(r.startswith(row) for r in rows), row
        assert record["log10_volume"] == pytest.approx(record["log_volume"] / math.log(10))
        assert record["interval"][0] <= record["log_volume"] + 1e-9 and record["n_samples"] == 4
    assert "torch " + torch.__version__ in report and "wall time" in report
    assert "-8.1e+06" in report and "-6.1e+06" in report  # the paper's figures beside ours


def test_verdicts_in_results_follow_from_the_table(finished):
    _, results = finished
    runs = list(results["runs"].values())
    for method in ("isotropic", "adam"):
        clean = {r["seed"]: r["log_volume"] for r in runs if r["method"] == method and r["kind"] == "clean"}
        poisoned = {r["seed"]: r["log_volume"] for r in runs if r["method"] == method and r["kind"] == "poisoned"}
        below = sum(poisoned[s] < clean[s] for s in clean)
        expected = "holds" if below == 2 else "fails" if below == 0 else "mixed"
        assert results["verdicts"][method]["verdict"] == expected
        assert results["verdicts"][method]["poisoned_below_on"] == below


def test_method_verdict_on_crafted_numbers():
    clean = {0: -100.0, 1: -110.0, 2: -120.0}
    holds = method_verdict(clean, {0: -110.0, 1: -130.0, 2: -150.0})  # differences -10, -20, -30
    assert holds["verdict"] == "holds" and holds["poisoned_below_on"] == 3
    assert holds["mean_difference"] == pytest.approx(-20.0) and holds["sd_difference"] == pytest.approx(10.0)
    half = 4.303 * 10.0 / math.sqrt(3)
    assert holds["difference_interval"] == pytest.approx([-20.0 - half, -20.0 + half], abs=1e-2)
    assert holds["beyond_spread"] is False  # [-44.8, 4.8] reaches above 0
    tight = method_verdict(clean, {0: -120.0, 1: -131.0, 2: -139.0})  # -20, -21, -19
    assert tight["verdict"] == "holds" and tight["beyond_spread"] is True
    assert method_verdict(clean, {0: -90.0, 1: -130.0, 2: -150.0})["verdict"] == "mixed"
    assert method_verdict(clean, {0: -90.0, 1: -100.0, 2: -110.0})["verdict"] == "fails"
    assert method_verdict(clean, {0: -math.inf})["verdict"] == "no data"
    one = method_verdict({0: -1.0}, {0: -2.0})
    assert one["verdict"] == "holds" and "beyond_spread" not in one


def test_verdicts_count_disjoint_intervals():
    def run(seed, kind, value, low, high):
        return {"seed": seed, "kind": kind, "method": "isotropic", "log_volume": value, "interval": [low, high]}

    runs = [
        run(0, "clean", -10.0, -12.0, -10.0), run(0, "poisoned", -20.0, -25.0, -20.0),  # disjoint
        run(1, "clean", -10.0, -30.0, -10.0), run(1, "poisoned", -20.0, -25.0, -20.0),  # overlapping
    ]
    verdict = poisoning_verdicts(runs, ["isotropic"])["isotropic"]
    assert verdict["verdict"] == "holds" and verdict["intervals_disjoint_on"] == 1


def test_t_quantile():
    assert t_quantile(0.95, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.95, 100) == pytest.approx(1.984, abs=2e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.95, 0)


def test_resume_skips_finished_runs(finished, monkeypatch):
    out, first = finished
    calls = []
    real = poisoning_cnn.estimate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("evaluation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(poisoning_cnn, "estimate", counting)
    again = poisoning_cnn.reproduce_poisoning(out, progress=False)
    assert calls == [] and again["runs"] == first["runs"]  # nothing re-estimated, not even the timing
    # Drop one finished run: only it runs again, and gives the same figures (same seeds, same network).
    saved = json.loads((out / "results.json").read_text())
    dropped = saved["runs"].pop("seed 1 poisoned adam")
    (out / "results.json").write_text(json.dumps(saved))
    resumed = poisoning_cnn.reproduce_poisoning(out, progress=False)
    assert len(calls) == 1 and resumed["resumed"] is True
    assert resumed["runs"]["seed 1 poisoned adam"]["log_volume"] == pytest.approx(dropped["log_volume"], rel=1e-12)


def test_interrupted_run_keeps_finished_work_and_resumes(tiny, tmp_path, monkeypatch):
    real, calls = poisoning_cnn.estimate, []
    timing_calls = 3 + 2 * 3  # a 2-direction warm-up of each path, then two timed rounds of three

    def failing(*args, **kwargs):
        calls.append(kwargs["n_samples"])
        if len(calls) == timing_calls + 3:  # the third run dies
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(poisoning_cnn, "estimate", failing)
    with pytest.raises(KeyboardInterrupt):
        poisoning_cnn.reproduce_poisoning(tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(saved["runs"]) == ["seed 0 clean adam", "seed 0 clean isotropic"]
    assert "verdicts" not in saved and saved["evaluation_timing"]["n_samples"] == 3
    calls.clear()
    monkeypatch.setattr(poisoning_cnn, "estimate", real)
    results = poisoning_cnn.reproduce_poisoning(tmp_path, progress=False)
    assert len(results["runs"]) == 8 and results["resumed"] is True
    assert results["runs"]["seed 0 clean adam"] == saved["runs"]["seed 0 clean adam"]


def test_the_timed_fastest_path_runs_everything(finished):
    _, results = finished
    timing = results["evaluation_timing"]
    assert set(timing["seconds"]) == {"vmap", "inplace", "sequential"}
    assert timing["fastest"] == min(timing["seconds"], key=timing["seconds"].get)
    assert {r["evaluation"] for r in results["runs"].values()} == {timing["fastest"]}
    # Untimed (quick sizes): the library's own choice, in place for a CNN on a CPU.
    config = {**poisoning_cnn.settings(True), "timing_n_samples": None}
    assert poisoning_cnn._timing(config)["fastest"] == timing["auto_resolves_to"] == "inplace"


def test_resume_refuses_other_settings(finished):
    out, _ = finished
    with pytest.raises(ValueError, match=r"n_samples: saved 4, asked 3"):
        poisoning_cnn.reproduce_poisoning(out, n_samples=3, progress=False)
    with pytest.raises(ValueError, match=r"seeds: saved \[0, 1\], asked \[0\]"):
        poisoning_cnn.reproduce_poisoning(out, seeds=[0], progress=False)
    (out / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        poisoning_cnn.reproduce_poisoning(out, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seeds": []}, ValueError, "non-empty"),
        ({"seeds": [0, 0]}, ValueError, "distinct"),
        ({"seeds": ["a"]}, ValueError, "seed must be an integer"),
        ({"seeds": "012"}, TypeError, "list of integer training seeds"),
        ({"seeds": 3}, TypeError, "list of integer training seeds"),
        ({"n_samples": 1}, ValueError, "n_samples must be an integer >= 2"),
        ({"n_samples": 2.5}, ValueError, "n_samples"),
        ({"quick": "yes"}, TypeError, "quick must be True or False"),
        ({"progress": None}, TypeError, "progress must be True or False"),
    ],
)
def test_bad_arguments(tiny, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        poisoning_cnn.reproduce_poisoning(tmp_path, **kwargs)
    assert not (tmp_path / "results.json").exists()  # refused before anything ran


def test_bad_out_directory():
    with pytest.raises(TypeError, match="out must be a directory path"):
        poisoning_cnn.reproduce_poisoning(None)
