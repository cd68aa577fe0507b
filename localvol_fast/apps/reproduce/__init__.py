"""The paper's experiments: the digits MLP table (``experiments`` runs, ``verdicts`` compares with the paper,
``report`` writes report.md and the plots), the language-model findings (``lm``, ``corpus``, ``lm_report``)
and the poisoned CNN (``poisoning_cnn``, ``poisoning_report``)."""

from localvol_fast.apps.reproduce.experiments import reproduce_digits
from localvol_fast.apps.reproduce.lm import reproduce_lm
from localvol_fast.apps.reproduce.poisoning_cnn import reproduce_poisoning

__all__ = ["reproduce_digits", "reproduce_lm", "reproduce_poisoning"]
