"""Evaluators of a model's neighborhood cost at the estimator's probes (``choice`` picks one)."""
