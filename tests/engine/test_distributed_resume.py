"""Sharding over processes (gloo) and resuming killed runs give exactly the uninterrupted result."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from localvol_fast import VolumeResult

WORKER = str(Path(__file__).with_name("run_worker.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path) -> list[VolumeResult]:
    return [VolumeResult.from_dict(d) for d in json.loads(Path(path).read_text())]


def _same(a: list[VolumeResult], b: list[VolumeResult]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("indices", "estimates", "radii", "deltas", "props", "n_evals"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert x.status == y.status and x.log_volume == y.log_volume


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "result.json"
    subprocess.run([sys.executable, WORKER, str(out)], check=True, timeout=300)
    return _load(out)


@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_processes_reproduce_the_single_process_run(tmp_path, single, world_size):
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / "r.json"), "--distributed"], env=env))
    for p in procs:
        assert p.wait(timeout=300) == 0
    for rank in range(world_size):  # 23 directions: not divisible by 2 or 3
        result = _load(f"{tmp_path / 'r.json'}.{rank}")
        _same(result, single)
        assert result[0].info["processes"] == world_size


def test_run_killed_with_sigkill_resumes_to_the_same_result(tmp_path, single):
    journal = tmp_path / "run.jsonl"
    proc = subprocess.Popen([sys.executable, WORKER, str(tmp_path / "killed.json"), "--output", str(journal), "--slow", "0.05"])
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few batches are on disk, then kill without warning
        if journal.exists() and journal.read_text().count("\n") >= 1 + 2 * 9:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "killed.json").exists()
    finished = journal.read_text().count("\n") - 1
    assert 0 < finished < 2 * 23
    subprocess.run([sys.executable, WORKER, str(tmp_path / "resumed.json"), "--output", str(journal), "--resume"],
                   check=True, timeout=300)
    _same(_load(tmp_path / "resumed.json"), single)


def test_torn_last_line_is_dropped_and_resumed(tmp_path, single):
    journal = tmp_path / "run.jsonl"
    subprocess.run([sys.executable, WORKER, str(tmp_path / "first.json"), "--output", str(journal), "--n", "10"],
                   check=True, timeout=300)
    text = journal.read_text()
    journal.write_text(text[: len(text) - 25])  # the last line loses its end, as after a crash mid-write
    subprocess.run([sys.executable, WORKER, str(tmp_path / "resumed.json"), "--output", str(journal), "--resume"],
                   check=True, timeout=300)
    _same(_load(tmp_path / "resumed.json"), single)
    lines = journal.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line is gone, every line parses


def test_resume_refuses_another_configuration_and_existing_files(tmp_path):
    from localvol_fast import estimate_volume

    anchor = torch.ones(5, dtype=torch.float64)
    cost = lambda th: ((th - anchor) ** 2).sum(1)  # noqa: E731
    journal = tmp_path / "run.jsonl"
    estimate_volume(cost, anchor, cutoff=1e-2, n_samples=3, sigma=1.0, output=journal)
    with pytest.raises(FileExistsError, match="resume=True"):
        estimate_volume(cost, anchor, cutoff=1e-2, n_samples=3, sigma=1.0, output=journal)
    with pytest.raises(ValueError, match="different configuration"):
        estimate_volume(cost, anchor, cutoff=1e-3, n_samples=3, sigma=1.0, output=journal, resume=True)
    with pytest.raises(ValueError, match="torchrun"):
        estimate_volume(cost, anchor, cutoff=1e-2, n_samples=3, sigma=1.0, distributed=True)
