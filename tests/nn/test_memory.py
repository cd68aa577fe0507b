"""Peak memory does not grow with the number of directions (issue: large models), measured in subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = str(Path(__file__).with_name("memory_worker.py"))


def _peak(n_samples: int) -> dict:
    out = subprocess.run([sys.executable, WORKER, str(n_samples)], check=True, capture_output=True, text=True, timeout=1500)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_of_a_100m_parameter_model_is_flat_in_n_samples():
    pytest.importorskip("transformers")
    few, many = _peak(2), _peak(64)
    print(f"\npeak RSS: n_samples=2 {few['peak_rss_mib']:.0f} MiB, n_samples=64 {many['peak_rss_mib']:.0f} MiB; {many}")
    assert few["parameters"] > 90_000_000 and many["evaluation"] == "inplace"
    assert many["status"].get("converged", 0) == 64
    assert many["peak_rss_mib"] <= 1.10 * few["peak_rss_mib"]
