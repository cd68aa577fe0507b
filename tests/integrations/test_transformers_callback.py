"""``LocalVolumeCallback`` in a short Trainer run of a tiny random GPT-2: the run is unchanged, the
logged values are a direct ``estimate``'s, and they reach every callback's ``on_log``."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from localvol_fast.integrations.transformers import LocalVolumeCallback
from localvol_fast.nn.estimator import estimate

MAX_STEPS = 3
EVERY = 2
OPTIONS = {"preconditioner": "adam", "preconditioner_eps": 1e-2, "n_samples": 6, "cutoff": 0.05}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
    )  # dropout 0.1 as GPT-2's default: the training draws random numbers every step
    return transformers.GPT2LMHeadModel(config)


def token_data():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 32, (8, 12), generator=g)
    held_out = {
        "input_ids": torch.randint(0, 32, (3, 10), generator=g), "attention_mask": torch.ones(3, 10, dtype=torch.long),
    }
    held_out["attention_mask"][2, 7:] = 0  # one padded row
    return [{"input_ids": r, "labels": r} for r in ids], held_out


class Snapshot(transformers.TrainerCallback):
    """Copies (model, optimizer) at due steps and nothing else: the reference for direct estimates."""

    def __init__(self):
        self.copies = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % EVERY == 0:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
            self.copies[state.global_step] = copy.deepcopy((model, inner))


class Recorder(transformers.TrainerCallback):
    """Stands for TensorBoard / W&B: what every reporter's on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def run(tmp_path, callbacks, bind=None):
    train_set, _ = token_data()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=MAX_STEPS, per_device_train_batch_size=2, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=train_set, callbacks=callbacks)
    if bind is not None:
        bind.set_trainer(trainer)
    trainer.train()
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    return trainer, losses


def test_callback_leaves_the_run_unchanged_and_logs_direct_estimates(tmp_path):
    snapshot = Snapshot()
    reference, reference_losses = run(tmp_path / "reference", [snapshot])
    _, held_out = token_data()
    callback, recorder = LocalVolumeCallback(held_out, every=EVERY, **OPTIONS), Recorder()
    tracked, losses = run(tmp_path / "tracked", [callback, recorder], bind=callback)

    assert sorted(losses) == [1, 2, 3] and losses == reference_losses  # every step's loss log still happens
    reference_weights = reference.model.state_dict()
    for name, tensor in tracked.model.state_dict().items():
        assert torch.equal(tensor, reference_weights[name]), name
    assert callback.tracker.measured_steps == [2]
    model_copy, optimizer_copy = snapshot.copies[2]
    direct = estimate(model_copy, held_out, optimizer=optimizer_copy, seed=0, progress=False, **OPTIONS)
    assert callback.history[0]["log_volume"] == direct.log_volume
    assert torch.equal(callback.results[0].estimates, direct.estimates)
    logged = [e for e in tracked.state.log_history if "volume/log_volume" in e]
    assert len(logged) == 1 and logged[0]["step"] == 2 and logged[0]["volume/log_volume"] == direct.log_volume
    assert logged[0]["volume/log10_volume"] == direct.log10_volume
    assert (logged[0]["volume/interval_low"], logged[0]["volume/interval_high"]) == direct.log_volume_interval
    assert [e["volume/log_volume"] for e in recorder.logs if "volume/log_volume" in e] == [direct.log_volume]


def test_without_a_trainer_the_values_go_to_log_history_with_a_warning(tmp_path):
    _, held_out = token_data()
    callback = LocalVolumeCallback(held_out, steps=[1], n_samples=4, cutoff=0.05, name="lv")
    with pytest.warns(UserWarning, match="set_trainer"):
        trainer, losses = run(tmp_path, [callback])
    assert sorted(losses) == [1, 2, 3]
    logged = [e for e in trainer.state.log_history if "lv/log_volume" in e]
    assert [(e["step"], e["lv/log_volume"]) for e in logged] == [(1, callback.history[0]["log_volume"])]
    assert callback.history[0]["preconditioner"] == "isotropic"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every must be a positive integer.*-3"):
        LocalVolumeCallback(torch.zeros(1, 4, dtype=torch.long), every=-3)
    with pytest.raises(ValueError, match="every= .* or steps="):
        LocalVolumeCallback(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="trainer must be a transformers Trainer"):
        LocalVolumeCallback(torch.zeros(1, 4, dtype=torch.long), every=1, trainer=object())
