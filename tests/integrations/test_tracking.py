"""``VolumeTracker`` in a hand-written loop: the run continues bit for bit, the values are estimate's."""

from __future__ import annotations

import copy
import csv
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from localvol_fast.integrations import DEFAULT_SEED, VolumeTracker, training_state_preserved
from localvol_fast.nn.estimator import estimate

# Small loss neighborhoods have unbounded and non-monotone directions; their warnings are not under test.
pytestmark = pytest.mark.filterwarnings("ignore:local volume:RuntimeWarning")
STEPS = 6
EVERY = 2


def rng_hungry_cross_entropy(outputs, targets):
    """Cross-entropy that also draws from every global generator (as a user's loss or a model's forward
    might): without the tracker's restoring, the training's dropout and its scale factors shift."""
    random.random()
    np.random.rand()
    torch.rand(1)
    return F.cross_entropy(outputs, targets)


# Through a loss neighborhood that draws random numbers, one probe at a time (vmap refuses torch.rand).
OPTIONS = {
    "neighborhood": "loss", "loss_fn": rng_hungry_cross_entropy, "evaluation": "sequential", "preconditioner": "adam",
    "preconditioner_eps": 1e-2, "n_samples": 6, "cutoff": 0.05,
}


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return (x[:32], y[:32]), (x[32:], y[32:])


def train(measure=None):
    """Six Adam steps of a small MLP with dropout; every global generator feeds the training (torch:
    dropout and batch rows, numpy and Python: loss scale factors). ``measure(model, step, optimizer)``
    runs after backward, before the optimizer step: grads must survive it. Returns (losses, model)."""
    (x, y), _ = make_data()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.25), torch.nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for step in range(1, STEPS + 1):
        rows = torch.randperm(32)[:16]
        scale = (1 + 1e-3 * random.random()) * (1 + 1e-3 * float(np.random.rand()))
        loss = F.cross_entropy(model(x[rows]), y[rows]) * scale
        optimizer.zero_grad()
        loss.backward()
        if measure is not None:
            measure(model, step, optimizer)
        optimizer.step()
        losses.append(loss.item())
    return losses, model


def test_training_continues_bit_identically_and_values_equal_direct_estimates():
    _, held_out = make_data()
    reference_losses, reference_model = train()
    snapshots = {}

    def snapshot(model, step, optimizer):
        if step % EVERY == 0:
            snapshots[step] = copy.deepcopy((model, optimizer))  # the optimizer copy refers to the model copy

    assert train(snapshot)[0] == reference_losses  # copying alone changes nothing

    tracker = VolumeTracker(held_out, every=EVERY, **OPTIONS)
    seen = {}

    def measure(model, step, optimizer):
        grads = [p.grad.clone() for p in model.parameters()]
        states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
        result = tracker(model, step, optimizer=optimizer)
        assert (result is None) == (step % EVERY != 0)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
        assert torch.equal(torch.get_rng_state(), states[2])
        assert model.training  # given back in train mode
        seen[step] = result

    losses, model = train(measure)
    assert losses == reference_losses
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)
    assert tracker.measured_steps == [2, 4, 6] == [r["step"] for r in tracker.history]
    for step, (model_copy, optimizer_copy) in snapshots.items():
        direct = estimate(model_copy, held_out, optimizer=optimizer_copy, seed=DEFAULT_SEED, progress=False, **OPTIONS)
        row = next(r for r in tracker.history if r["step"] == step)
        assert row["log_volume"] == direct.log_volume and torch.equal(seen[step].estimates, direct.estimates)
        assert (row["interval_low"], row["interval_high"]) == direct.log_volume_interval
        assert row["preconditioner"] == "adam" and row["preconditioner_eps"] == 1e-2 and row["seed"] == DEFAULT_SEED
    assert len({r["log_volume"] for r in tracker.history}) == 3  # the weights moved: the volumes differ


def test_an_untracked_estimate_would_shift_the_run():
    """The control: the same estimates without the tracker change the losses (so the test above can fail)."""
    _, held_out = make_data()
    reference_losses, _ = train()

    def bare(model, step, optimizer):
        if step % EVERY == 0:
            estimate(model, held_out, optimizer=optimizer, progress=False, **OPTIONS)

    assert train(bare)[0] != reference_losses


def test_history_saves_as_json_and_csv(tmp_path):
    _, held_out = make_data()
    tracker = VolumeTracker(held_out, steps=[3, 5], n_samples=4, cutoff=[0.05, 0.2], neighborhood="loss",
                            loss_fn=F.cross_entropy)
    train(tracker)
    assert tracker.measured_steps == [3, 5] and len(tracker.results) == 2 and len(tracker.history) == 4
    assert [(r["step"], r["cutoff"]) for r in tracker.history] == [(3, 0.05), (3, 0.2), (5, 0.05), (5, 0.2)]
    assert all(r["preconditioner"] == "isotropic" and r["preconditioner_eps"] is None for r in tracker.history)
    saved = json.loads(tracker.save(tmp_path / "v.json").read_text())
    assert saved["history"] == tracker.history and saved["options"]["progress"] is False
    assert "cross_entropy" in saved["options"]["loss_fn"]
    with tracker.save(tmp_path / "sub" / "v.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["log_volume"]) for r in rows] == [r["log_volume"] for r in tracker.history]
    columns = tracker.columns()
    assert columns["step"] == [3, 3, 5, 5] and columns["log10_volume"] == [r["log10_volume"] for r in tracker.history]
    values = tracker.log_values()
    assert values["volume/log_volume@0.05"] == tracker.history[2]["log_volume"]
    assert set(tracker.log_values(3)) == set(values)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "every= .* or steps="),
        ({"every": 0}, ValueError, "every must be a positive integer.*got 0"),
        ({"every": 2.5}, ValueError, "every must be a positive integer.*2.5"),
        ({"every": True}, ValueError, "every must be a positive integer.*True"),
        ({"steps": 10}, TypeError, r"steps=\[10\].*every=10"),
        ({"steps": "10"}, TypeError, "steps must be an iterable"),
        ({"steps": []}, ValueError, "steps is empty"),
        ({"steps": [1, -2]}, ValueError, "each of steps must be an integer >= 0.*-2"),
        ({"every": 2, "name": ""}, ValueError, "name must be a non-empty string"),
        ({"every": 2, "n_sample": 5}, TypeError, r"\['n_sample'\].*n_samples"),
        ({"every": 2, "optimizer": object()}, TypeError, "pass the optimizer with each call"),
        ({"every": 2, "n_samples": 0}, ValueError, "n_samples must be a positive integer"),
        ({"every": 2, "cutoff": -1.0}, ValueError, "cutoff"),
        ({"every": 2, "progress": "no"}, TypeError, "progress must be True or False"),
        ({"every": 2, "output": "j.jsonl"}, ValueError, "does not take output="),
    ],
)
def test_bad_schedules_and_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        VolumeTracker(torch.zeros(2, 4), **kwargs)


def test_bad_calls_are_refused(tmp_path):
    model = torch.nn.Linear(4, 3)
    tracker = VolumeTracker(torch.zeros(2, 4), every=1, preconditioner="adam")
    with pytest.raises(ValueError, match="step must be an integer >= 0.*-1"):
        tracker(model, -1)
    with pytest.raises(ValueError, match="optimizer=optimizer"):
        tracker(model, 1)
    with pytest.raises(ValueError, match="nothing measured yet"):
        tracker.log_values()
    with pytest.raises(ValueError, match=r"\.json or \.csv"):
        tracker.save(tmp_path / "v.txt")
    assert VolumeTracker(torch.zeros(2, 4), every=2, preconditioner="adam")(model, 1) is None  # not due: not run


def test_a_changed_optimizer_is_reported():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    changed = "optimizer's state or hyperparameters changed"
    with pytest.raises(RuntimeError, match=changed), training_state_preserved(optimizer):
        optimizer.state[model.weight]["exp_avg_sq"].add_(1.0)
    with pytest.raises(RuntimeError, match=changed), training_state_preserved(optimizer):
        optimizer.param_groups[0]["lr"] = 0.5
    with training_state_preserved(optimizer):  # reading it is fine
        optimizer.state[model.weight]["exp_avg_sq"].sum()


def test_importing_the_package_never_imports_transformers():
    code = "import sys, localvol_fast, localvol_fast.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
