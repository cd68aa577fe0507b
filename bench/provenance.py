"""Where a benchmark's figures came from: the repository's git commit, asked of git itself.

``bench/`` is not a package: the scripts import this file by its path (their folder is on sys.path).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str | None:
    """``git args...`` run in the repository: its stripped output, or None (no git, not a checkout, an error)."""
    try:
        out = subprocess.run(["git", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def short_commit() -> str:
    """The checked-out commit's short hash, or "unknown"."""
    return git("rev-parse", "--short", "HEAD") or "unknown"
