"""`reproduce_lm` (apps.reproduce.lm) on a tiny GPT-NeoX: files, resume, report, verdicts, and training
left exactly as it is without measurement."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from localvol_fast.apps.reproduce import lm, lm_report
from localvol_fast.apps.reproduce.corpus import heldout_windows, load_corpus
from localvol_fast.nn.estimator import estimate

TINY = {
    "hidden_size": 16, "layers": 1, "heads": 2, "seq_len": 32, "batch_size": 4, "steps": 3,
    "train_bytes": 40_000, "heldout_bytes": 8_000, "eval_windows": 2, "n_samples": 4,
    "scan_cutoffs": [1e-3, 1e-2, 1e-1], "evaluation": "inplace",
}
CLAIMS = ("rises early in training, then falls steadily", "beat isotropic ones", "(D/2) ln eps", "prior's ceiling")


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: tiny models run faster on one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("lm")
    return out, lm.reproduce_lm(out, seed=3, progress=False, overrides=TINY)


class _Counter:
    """Counts ``record_of`` calls: one per finished estimate (per cutoff for the scan)."""

    def __init__(self):
        self.calls = 0
        self._record_of = lm.record_of

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._record_of(*args, **kwargs)


def test_step_grid_and_schedule():
    assert lm.step_grid(10) == [0, 1, 2, 4, 8, 10]
    assert lm.step_grid(8) == [0, 1, 2, 4, 8]
    assert lm.step_grid(1) == [0, 1]
    with pytest.raises(ValueError, match="steps"):
        lm.step_grid(0)
    assert lm.lr_factor(0, 64) == pytest.approx(1 / 4)  # warmup of 64 // 16 = 4 updates
    assert lm.lr_factor(3, 64) == pytest.approx(1.0)
    assert lm.lr_factor(64, 64) == pytest.approx(0.1)
    assert lm.settings(True)["steps"] < lm.settings(False)["steps"]


def test_files_series_and_prior(tiny_run):
    out, results = tiny_run
    for name in ("results.json", "report.md", "settings.json", "lm_volume_over_training.png", "lm_volume_vs_cutoff.png", "lm_losses.png"):
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{s:06d}.pt" for s in (0, 1, 2, 3)]
    saved = json.loads((out / "results.json").read_text())
    assert saved["grid"] == [0, 1, 2, 3] and saved["dim"] == results["dim"]
    assert [r["step"] for r in results["series"]["isotropic"]] == [0, 1, 2, 3]
    assert [r["step"] for r in results["series"]["adam"]] == [1, 2, 3]  # no Adam state at step 0
    assert len(results["train_losses"]) == 3 and all(math.isfinite(v) for v in results["train_losses"])
    assert [len(results["cutoff_scan"][m]["records"]) for m in lm.METHODS] == [3, 3]
    # The prior's sigma is the RMS of the seeded initial parameters.
    init = lm.build_model(lm._configured(False, None, TINY), 3)
    rms = torch.cat([p.detach().double().flatten() for p in init.parameters()]).pow(2).mean().sqrt()
    assert results["sigma"] == pytest.approx(float(rms), rel=1e-12)
    gain = results["gains"][-1]
    adam, iso = results["series"]["adam"][-1], results["series"]["isotropic"][-1]
    assert gain["nats"] == pytest.approx(adam["log_volume"] - iso["log_volume"])
    assert gain["log10"] == pytest.approx(gain["nats"] / math.log(10))


def test_report_names_each_finding(tiny_run):
    out, results = tiny_run
    report = (out / "report.md").read_text()
    assert len(results["findings"]) == 7
    for claim in CLAIMS:
        assert claim in report
    for finding in results["findings"]:
        assert finding["verdict"] in ("agrees", "partly", "disagrees")
        assert finding["claim"] in report and f"**{finding['verdict']}**" in report
    assert "sigma = " in report and "Cutoff scan" in report


def test_measurements_equal_a_direct_estimate_at_the_saved_checkpoint(tiny_run):
    """The saved volumes are those of the live model and optimizer at that step (same directions)."""
    out, results = tiny_run
    config = lm._configured(False, None, TINY)
    corpus = load_corpus(train_bytes=config["train_bytes"], heldout_bytes=config["heldout_bytes"])
    data = heldout_windows(corpus.stream("heldout"), config["eval_windows"], config["seq_len"])
    trainer = lm.Trainer(config, corpus.stream("train"), 3)
    trainer.load(torch.load(lm.checkpoint_path(out, 2), weights_only=True))
    options = {"cutoff": lm.CUTOFF, "n_samples": 4, "sigma": results["sigma"], "seed": 3, "progress": False, "evaluation": "inplace"}
    with lm._quiet():
        iso = estimate(trainer.model, data, **options)
        adam = estimate(trainer.model, data, preconditioner="adam", optimizer=trainer.optimizer, preconditioner_eps=1e-2, **options)
    assert results["series"]["isotropic"][2]["log_volume"] == pytest.approx(iso.log_volume, rel=1e-9)
    assert results["series"]["adam"][1]["log_volume"] == pytest.approx(adam.log_volume, rel=1e-9)


def test_training_with_measurement_gives_the_losses_of_training_without(tiny_run):
    _, results = tiny_run
    config = lm._configured(False, None, TINY)
    corpus = load_corpus(train_bytes=config["train_bytes"], heldout_bytes=config["heldout_bytes"])
    trainer = lm.Trainer(config, corpus.stream("train"), 3)
    lm.run_training(trainer, lm.step_grid(config["steps"]))
    assert trainer.losses == results["train_losses"]  # bit for bit


def test_rerun_skips_finished_work_and_resume_continues_exactly(tiny_run, tmp_path, monkeypatch):
    out, results = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    counter = _Counter()
    monkeypatch.setattr(lm, "record_of", counter)
    again = lm.reproduce_lm(copy, seed=3, progress=False, overrides=TINY)
    assert counter.calls == 0 and again["resumed_from_step"] == 3
    assert again["series"] == results["series"] and again["train_losses"] == results["train_losses"]
    # Lose everything after step 1: the rerun trains from the step-1 checkpoint and measures only what is missing.
    for step in (2, 3):
        lm.checkpoint_path(copy, step).unlink()
        for name in (f"step_{step:06d}_isotropic", f"step_{step:06d}_adam", f"step_{step:06d}_heldout"):
            lm.measurement_path(copy, name).unlink()
    lm.measurement_path(copy, "scan_adam").unlink()
    resumed = lm.reproduce_lm(copy, seed=3, progress=False, overrides=TINY)
    assert resumed["resumed_from_step"] == 1
    assert counter.calls == 4 + 3  # two steps x two methods, and the Adam scan's three cutoffs
    assert resumed["train_losses"] == results["train_losses"]
    for method in lm.METHODS:
        assert [r["log_volume"] for r in resumed["series"][method]] == pytest.approx(
            [r["log_volume"] for r in results["series"][method]], rel=1e-9
        )


def test_other_settings_are_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(ValueError, match="other settings.*n_samples"):
        lm.reproduce_lm(copy, seed=3, progress=False, overrides=TINY, n_samples=5)
    with pytest.raises(ValueError, match="other settings.*seed"):
        lm.reproduce_lm(copy, seed=4, progress=False, overrides=TINY)
    with pytest.raises(ValueError, match="unknown settings"):
        lm.reproduce_lm(tmp_path / "new", progress=False, overrides={"hidden": 8})
    with pytest.raises(TypeError, match="quick must be True or False"):
        lm.reproduce_lm(tmp_path / "new", quick="yes")
    assert not (tmp_path / "new").exists()  # refused before anything is written


def _record(step, value, half_width=10.0):
    return {"step": step, "log_volume": value, "interval": [value - half_width, value + half_width]}


def test_trajectory_verdicts():
    rise_fall = [_record(s, v) for s, v in [(0, -500), (1, -400), (2, -300), (4, -350), (8, -600)]]
    assert lm_report.trajectory_finding("isotropic", rise_fall, 8)["verdict"] == "agrees"
    falling = [_record(s, v) for s, v in [(0, -100), (1, -200), (2, -300)]]
    assert lm_report.trajectory_finding("isotropic", falling, 2)["verdict"] == "partly"  # falls, never rises
    flat = [_record(s, v) for s, v in [(0, -100), (1, -95), (2, -101)]]  # all within the intervals
    assert lm_report.trajectory_finding("isotropic", flat, 2)["verdict"] == "disagrees"
    bumpy = [_record(s, v) for s, v in [(0, -500), (2, -300), (4, -600), (8, -400), (16, -700)]]
    finding = lm_report.trajectory_finding("isotropic", bumpy, 16)
    assert finding["verdict"] == "partly" and "[8]" in finding["detail"]


def test_gain_and_slope_verdicts():
    dim = 1000
    large = lm_report.PAPER_GAIN_PER_PARAMETER * dim * math.log(10)  # nats of the paper's per-parameter gain
    def gain(nats, separated=True):
        return {"step": 4, "nats": nats, "log10": nats / math.log(10), "per_parameter_log10": nats / math.log(10) / dim,
                "relative": 0.1, "separated": separated}
    assert lm_report.gain_finding([gain(large)], dim)["verdict"] == "agrees"
    assert lm_report.gain_finding([gain(0.01 * large)], dim)["verdict"] == "partly"
    assert lm_report.gain_finding([gain(large, separated=False)], dim)["verdict"] == "disagrees"
    scan = {"slope": 520.0, "fit_points": 3, "fit_max_cutoff": 1e-2, "local_slopes": []}
    assert lm_report.slope_finding("isotropic", scan, 500.0)["verdict"] == "agrees"
    assert lm_report.slope_finding("isotropic", {**scan, "slope": 350.0}, 500.0)["verdict"] == "partly"
    assert lm_report.slope_finding("isotropic", {**scan, "slope": math.nan}, 500.0)["verdict"] == "disagrees"
    top = {"cutoff": 1.0, "log_volume": -1010.0, "n_samples": 4, "status": {"unbounded": 3, "converged": 1}}
    flat = {"records": [top], "local_slopes": [{"from": 0.1, "to": 1.0, "slope": 100.0}]}
    assert lm_report.ceiling_finding("adam", flat, 500.0, -1000.0)["verdict"] == "agrees"
    assert lm_report.ceiling_finding("adam", flat, 500.0, -2000.0)["verdict"] == "partly"
    steep = {**flat, "local_slopes": [{"from": 0.1, "to": 1.0, "slope": 480.0}]}
    assert lm_report.ceiling_finding("adam", steep, 500.0, -2000.0)["verdict"] == "disagrees"


def test_scan_slope_is_a_least_squares_fit():
    records = [{"cutoff": c, "log_volume": 7.0 * math.log(c) + 3.0} for c in (1e-4, 1e-3, 1e-2)]
    records.append({"cutoff": 1.0, "log_volume": 0.0})  # beyond the fit's limit
    fitted = lm.scan_slope(records)
    assert fitted["slope"] == pytest.approx(7.0) and fitted["fit_points"] == 3
    assert [p["slope"] for p in fitted["local_slopes"]][:2] == pytest.approx([7.0, 7.0])
