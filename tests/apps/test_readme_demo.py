"""The README's demo table is what a fresh `localvol demo` prints: it cannot go stale.

The README's table comes from `localvol demo` at its default settings (about 6 s on a 2-core CPU), so
this test runs exactly that command, parses the markdown table of the README's "## The demo, as
measured" section and compares each row. Tolerance: the chosen eps must be the same and each log volume
within LOG_VOLUME_TOLERANCE nats. On the machine and torch version the README names, the run is
bit-for-bit reproducible (seeded data split, init, shuffles and directions); the tolerance only absorbs
float reductions of other BLAS builds or thread counts, where the radius search's rtol 1e-2 on the cost
(about 0.5% in a radius, times D = 4,810 / 2) can move a row by tens of nats. A real change of recipe,
preconditioner or eps moves the rows by hundreds to thousands of nats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localvol_fast.apps import cli

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## The demo, as measured"
LOG_VOLUME_TOLERANCE = 50.0  # nats


def readme_demo_table() -> dict[str, dict[str, str]]:
    """{method: {column: cell}} from the first markdown table of the README's demo section."""
    text = README.read_text()
    section = text[text.index(SECTION) :].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = cells[0], [row for row in cells[2:] if row]  # cells[1] is the |---| rule
    return {row[0]: dict(zip(header, row)) for row in body}


def test_readme_table_parses():
    table = readme_demo_table()
    assert list(table) == ["isotropic", "adam", "fisher"]
    assert all(float(row["log volume (nats)"]) < 0 for row in table.values())


def test_readme_demo_table_matches_a_fresh_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    # The README's command, at its default settings: nothing is made smaller here.
    assert cli.main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    capsys.readouterr()
    fresh = {row["method"]: row for row in json.loads((tmp_path / "demo.json").read_text())["table"]}
    readme = readme_demo_table()
    assert set(fresh) == set(readme)
    for method, row in readme.items():
        ours = fresh[method]
        eps = "-" if ours["preconditioner_eps"] is None else f"{ours['preconditioner_eps']:g}"
        assert eps == row["eps"], f"{method}: the demo chose eps {eps}, the README shows {row['eps']}"
        assert ours["log_volume"] == pytest.approx(float(row["log volume (nats)"]), abs=LOG_VOLUME_TOLERANCE), method
    # What the README says the demo shows (the paper's finding): Adam above isotropic.
    assert fresh["adam"]["log_volume"] > fresh["isotropic"]["log_volume"]
