"""The estimator over any cost (``estimate_volume``) and what it runs on: directions, the pilot, records,
journals, sharding over processes, progress."""
