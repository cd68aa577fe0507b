"""``LocalVolumeCallback``: the local volume during a Hugging Face ``Trainer`` run, in the Trainer's own logs.

This module imports transformers when it loads; ``localvol_fast`` and ``localvol_fast.integrations``
never import it, so import this module by name::

    from transformers import Trainer, TrainingArguments
    from localvol_fast.integrations.transformers import LocalVolumeCallback

    held_out = tokenizer(texts, return_tensors="pt", padding=True)  # input_ids and attention_mask
    volume = LocalVolumeCallback(held_out, every=50, preconditioner="adam", preconditioner_eps=1e-2,
                                 n_samples=64)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", logging_steps=10),
                      train_dataset=train_set, callbacks=[volume])
    volume.set_trainer(trainer)  # so the values go through trainer.log (TensorBoard, W&B, log_history)
    trainer.train()
    volume.history      # one dict per measured step: step, log_volume, log10_volume (nats / log10), ...
    volume.tracker.save("volume.csv")

At the end of every due optimizer step (``on_step_end``, ``state.global_step`` % every == 0 or in
steps=) it runs a ``VolumeTracker`` (``tracking``) on the Trainer's model with the Trainer's live
optimizer (both come with every callback event), which leaves the run exactly as it was: weights,
optimizer state, random states, modes, grads.

How the values are logged, and why: a callback event gets the model, optimizer and state but not the
Trainer, and ``Trainer.log`` is the one call that both appends to ``state.log_history`` (saved with
checkpoints) and fires every callback's ``on_log`` (the TensorBoard, W&B, MLflow, ... reporters and the
progress printer). Changing the ``logs`` dict inside our own ``on_log`` would not do: the reporters run
before user callbacks and ``log_history`` keeps its own copy. So the callback keeps a reference to the
Trainer, as transformers' own JIT-checkpoint callback does (``set_trainer``), and calls
``trainer.log(values)`` with keys "<name>/log_volume", "<name>/log10_volume", "<name>/interval_low",
"<name>/interval_high" and "<name>/seconds" (name defaults to "volume"). ``Trainer.log``'s ``on_log``
clears ``control.should_log``, which the default flow may have set for this very step, so the flag is
put back afterwards: the Trainer's own loss log of the step still happens. Without a Trainer
(``set_trainer`` not called) the values are appended to ``state.log_history`` only, with a warning
that the reporters do not see them.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from localvol_fast.integrations.tracking import VolumeTracker


class LocalVolumeCallback(TrainerCallback):
    """Estimate the local volume on held-out ``data`` at due steps of a Trainer run (module docstring).

    data, every, steps, name and estimate_options: as ``VolumeTracker`` (progress bars off, seed 0
    unless given). trainer: the Trainer whose ``log`` carries the values (or call ``set_trainer``).
    The tracker is ``self.tracker``; ``history`` and ``results`` are its.
    """

    def __init__(self, data, *, every=None, steps=None, name: str = "volume", trainer=None, **estimate_options):
        self.tracker = VolumeTracker(data, every=every, steps=steps, name=name, **estimate_options)
        self.trainer = None
        self._warned = False
        if trainer is not None:
            self.set_trainer(trainer)

    def set_trainer(self, trainer) -> None:
        """Log through ``trainer.log`` (anything with a ``log(dict)`` method, normally a ``Trainer``)."""
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(f"trainer must be a transformers Trainer (with a log method), got {type(trainer).__name__}")
        self.trainer = trainer

    @property
    def history(self) -> list[dict]:
        return self.tracker.history

    @property
    def results(self) -> list:
        return self.tracker.results

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        """At a due global step: measure, then log through the Trainer (module docstring)."""
        if not self.tracker.is_due(state.global_step):
            return control
        if model is None:
            raise ValueError("the Trainer passed no model to the callback event; LocalVolumeCallback needs it")
        self.tracker(model, state.global_step, optimizer=optimizer)
        values = self.tracker.log_values()
        if self.trainer is not None:
            should_log = control.should_log
            self.trainer.log(values)
            control.should_log = should_log  # on_log cleared it: the Trainer's own log of this step still runs
        else:
            state.log_history.append({**values, "step": state.global_step})
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "LocalVolumeCallback has no Trainer: its values go to state.log_history only, not to "
                    "TensorBoard/W&B; call callback.set_trainer(trainer) after building the Trainer",
                    stacklevel=2,
                )
        return control
