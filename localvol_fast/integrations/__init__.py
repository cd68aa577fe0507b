"""Hooks for training loops: the local volume measured during training, leaving the run as it was.

``VolumeTracker`` (``tracking``) is a plain callable for hand-written loops. The Hugging Face
``Trainer`` callback lives in ``localvol_fast.integrations.transformers``, imported explicitly
(``from localvol_fast.integrations.transformers import LocalVolumeCallback``): it imports
transformers when it loads, which neither ``localvol_fast`` nor this package ever does.
"""

from localvol_fast.integrations.tracking import (
    DEFAULT_SEED,
    VolumeTracker,
    random_states_preserved,
    training_state_preserved,
)

__all__ = ["DEFAULT_SEED", "VolumeTracker", "random_states_preserved", "training_state_preserved"]
