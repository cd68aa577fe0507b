"""The GPU check's script, run here on the CPU so that it works when a GPU is finally lent.

``bench/gpu_check.sh`` runs on a machine lent for a few minutes at a time: a script error there costs
the whole measurement. ``bench/gpu_bench.py --device cpu --quick`` runs every section with tiny shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses():
    run = subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_gpu_bench_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "figures.json"
    # As gpu_check.sh runs it: from the repository, the package built in place rather than installed;
    # without the Triton interpreter the tests turn on (it would take minutes on these shapes).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--device", "cpu", "--quick", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    for section in ("kernels", "digits", "pythia31m_shape", "billion_bf16"):
        assert "error" not in report[section], report[section].get("traceback")
    pythia = report["pythia31m_shape"]
    assert pythia["status"] == {"converged": pythia["directions"]}
    assert pythia["seconds_per_direction"] > 0 and pythia["baseline_seconds_per_direction"] > 0
    assert pythia["baseline_evals_per_direction"] > pythia["evals_per_direction"]
    assert pythia["tf32"]["max_abs_estimate_difference_nats"] == 0.0  # the CPU has no TF32: the same run
    for backend, figures in report["digits"].items():
        if backend != "section_seconds":
            assert figures["evals_per_direction"] > 0, backend
