"""Journals that cannot lie: exact checksums of the anchor and the data, checksummed rows, and a resume
that refuses anything it cannot trust (and gives exactly the first n_samples directions)."""

import json
import math

import pytest
import torch

import localvol_fast.engine.journal as journal_module
from localvol_fast import estimate_volume
from localvol_fast.engine.journal import fingerprint_tensors, tensor_checksum

DIM = 10_000  # the old strided fingerprint sampled every 2nd element here: element 1 was never read


def _anchor():
    return torch.linspace(-1, 1, DIM, dtype=torch.float64)


def _run(path, n=6, anchor=None, cutoff=(1e-2, 1e-3), resume=False, **kw):
    anchor = _anchor() if anchor is None else anchor
    cost = lambda th: ((th - anchor) ** 2).sum(1)  # noqa: E731
    return estimate_volume(cost, anchor, cutoff=list(cutoff), n_samples=n, sigma=1.0, seed=4, batch_size=4,
                           output=path, resume=resume, **kw)


def _same(a, b):
    for x, y in zip(a, b):
        for name in ("indices", "estimates", "radii", "deltas", "n_evals"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert x.status == y.status


def _lines(path):
    return path.read_text().splitlines()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")


# ----- tensor_checksum ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_checksum_changes_with_any_single_bit(dtype):
    t = torch.randn(3001, generator=torch.Generator().manual_seed(0)).to(dtype)
    bits = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    before = tensor_checksum(t)
    assert tensor_checksum(t.clone()) == before
    for k in (0, 1, 1500, 3000):
        for bit in (0, 7, 8 * t.element_size() - 1):  # lowest mantissa bit ... sign bit
            flipped = bits.clone()
            flipped[k] ^= (1 << bit) if bit < 8 * t.element_size() - 1 else -(1 << bit)
            assert tensor_checksum(flipped.view(dtype)) != before, (k, bit)


def test_checksum_is_the_same_in_any_chunking_and_layout(monkeypatch):
    t = torch.randn(1000, dtype=torch.float32)
    whole = tensor_checksum(t)
    monkeypatch.setattr(journal_module, "_CHUNK", 7)  # many chunks, the last one short
    assert tensor_checksum(t) == whole
    assert tensor_checksum(t.reshape(40, 25).t().contiguous().t()) == whole  # non-contiguous, same values
    swapped = t.clone()
    swapped[[3, 700]] = swapped[[700, 3]]
    assert tensor_checksum(swapped) != whole  # a position-weighted sum: order matters


def test_fingerprint_tensors_sees_values_shapes_and_order():
    x, y = torch.randn(8, 3), torch.randint(0, 5, (8,))
    base = fingerprint_tensors([x, None, y])
    assert fingerprint_tensors([x.clone(), None, y.clone()]) == base
    other = x.clone()
    other[5, 2] = other[5, 2].nextafter(torch.tensor(math.inf))
    assert fingerprint_tensors([other, None, y]) != base
    assert fingerprint_tensors([y, None, x]) != base
    assert fingerprint_tensors([x.reshape(3, 8), None, y]) != base
    assert fingerprint_tensors([x, y]) != base


# ----- what the configuration holds ----------------------------------------------------------------
def test_resume_refuses_an_anchor_changed_in_one_element_the_old_sample_skipped(tmp_path):
    path = tmp_path / "run.jsonl"
    _run(path, n=3)
    changed = _anchor()
    changed[1] += 1e-12
    with pytest.raises(ValueError, match="different configuration.*anchor"):
        _run(path, n=3, anchor=changed, resume=True)
    _run(path, n=3, resume=True)  # the same anchor is still accepted


def test_resume_refuses_a_preconditioner_or_sigma_changed_in_one_element(tmp_path):
    path = tmp_path / "run.jsonl"
    p, sigma = torch.ones(DIM, dtype=torch.float64), torch.ones(DIM, dtype=torch.float64)
    anchor = _anchor()
    cost = lambda th: ((th - anchor) ** 2).sum(1)  # noqa: E731
    run = lambda p, sigma, resume: estimate_volume(  # noqa: E731
        cost, anchor, cutoff=1e-2, n_samples=2, sigma=sigma, preconditioner=p, output=path, resume=resume)
    run(p, sigma, False)
    p2, sigma2 = p.clone(), sigma.clone()
    p2[3], sigma2[3] = 1.5, 1.5
    with pytest.raises(ValueError, match="preconditioner"):
        run(p2, sigma, True)
    with pytest.raises(ValueError, match="measure"):
        run(p, sigma2, True)
    run(p, sigma, True)


def test_resume_refuses_other_data_of_the_same_shape(tmp_path):
    path = tmp_path / "run.jsonl"
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 3
    _run(path, n=3, run_info={"data": fingerprint_tensors([x, y])})
    other = x.clone()
    other[9, 1] += 0.5
    with pytest.raises(ValueError, match="different configuration.*data"):
        _run(path, n=3, resume=True, run_info={"data": fingerprint_tensors([other, y])})
    _run(path, n=3, resume=True, run_info={"data": fingerprint_tensors([x.clone(), y.clone()])})


# ----- rows ----------------------------------------------------------------------------------------
def test_an_edited_row_is_refused_with_its_file_and_line(tmp_path):
    path = tmp_path / "run.jsonl"
    _run(path, n=5)
    lines = _lines(path)
    row = json.loads(lines[3])
    row["radii"] = row["radii"] * 1.01  # still valid JSON, still a row
    lines[3] = json.dumps(row)
    _write(path, lines)
    with pytest.raises(ValueError, match=r"run\.jsonl, line 4: .*checksum"):
        _run(path, n=5, resume=True)


def test_a_row_that_is_not_json_inside_the_file_is_refused(tmp_path):
    path = tmp_path / "run.jsonl"
    _run(path, n=5)
    lines = _lines(path)
    lines[2] = lines[2][:-10]  # a torn line that is not the last one: the file was damaged
    _write(path, lines)
    with pytest.raises(ValueError, match="line 3"):
        _run(path, n=5, resume=True)


@pytest.mark.parametrize("where", ["end", "middle"])
def test_a_duplicated_row_is_refused(tmp_path, where):
    path = tmp_path / "run.jsonl"
    _run(path, n=5)
    lines = _lines(path)
    lines.insert(len(lines) if where == "end" else 4, lines[1])
    _write(path, lines)
    with pytest.raises(ValueError, match="already on line 2"):
        _run(path, n=5, resume=True)


def test_a_row_moved_from_another_journal_is_refused(tmp_path):
    mine, theirs = tmp_path / "mine.jsonl", tmp_path / "theirs.jsonl"
    _run(mine, n=5)
    _run(theirs, n=5, cutoff=(1e-2, 2e-3))  # another run: same directions, other cutoffs
    lines, other = _lines(mine), _lines(theirs)
    row = json.loads(other[1])
    row["cutoff"] = json.loads(lines[1])["cutoff"]  # made to look like a row of this run
    lines[1] = json.dumps(row)
    _write(mine, lines)
    with pytest.raises(ValueError, match="line 2: .*checksum"):
        _run(mine, n=5, resume=True)


def test_a_removed_row_inside_the_file_is_refused(tmp_path):
    path = tmp_path / "run.jsonl"
    _run(path, n=5)
    lines = _lines(path)
    del lines[3]  # direction 1 keeps one of its two cutoffs, and later directions follow
    _write(path, lines)
    with pytest.raises(ValueError, match="only some of the cutoffs"):
        _run(path, n=5, resume=True)


@pytest.mark.parametrize("cut", ["torn line", "half a direction"])
def test_what_a_killed_run_leaves_is_dropped_and_run_again(tmp_path, cut):
    path = tmp_path / "run.jsonl"
    full = _run(None, n=9)
    _run(path, n=6)
    text = path.read_text()
    lines = text.splitlines()
    if cut == "torn line":
        path.write_text(text[:-20])  # the last direction's second cutoff lost its end
    else:
        _write(path, lines[:-1])  # the last direction has only its first cutoff
    _same(_run(path, n=9, resume=True), full)
    again = _lines(path)
    keys = [(json.loads(line)["cutoff"], json.loads(line)["index"]) for line in again[1:]]
    assert len(keys) == len(set(keys)) == 2 * 9  # every direction once per cutoff, every line whole
    _same(_run(path, n=9, resume=True), full)  # and the repaired journal resumes again


def test_an_old_format_journal_is_refused_as_written_by_an_older_version(tmp_path):
    path = tmp_path / "run.jsonl"
    _run(path, n=3)
    lines = _lines(path)
    header = json.loads(lines[0])
    del header["version"]  # version 1 wrote no version, and rows without checksums
    _write(path, [json.dumps(header), *lines[1:]])
    with pytest.raises(ValueError, match="older version of localvol_fast"):
        _run(path, n=3, resume=True)


# ----- n_samples on resume -------------------------------------------------------------------------
def test_fewer_n_samples_gives_exactly_the_first_directions(tmp_path):
    path = tmp_path / "run.jsonl"
    _run(path, n=11)
    for n in (10, 4, 1):
        resumed = _run(path, n=n, resume=True)
        assert [r.indices.tolist() for r in resumed] == [list(range(n))] * 2
        _same(resumed, _run(None, n=n))
    _same(_run(path, n=14, resume=True), _run(None, n=14))  # more still extends


def test_rank_files_may_repeat_a_direction_identically_never_otherwise(tmp_path):
    from localvol_fast.engine.journal import open_journal

    path = tmp_path / "run.jsonl"
    _run(path, n=5)
    lines = _lines(path)
    config = json.loads(lines[0])["config"]
    _write(tmp_path / "run.rank1.jsonl", lines)  # every rank runs the pilot: the same rows in each file
    journal = open_journal(path, config, resume=True, rank=0, world_size=2)
    assert journal.done_indices(config["cutoffs"]) == set(range(5))
    row = json.loads(lines[2])
    del row["check"]
    row["radii"] *= 1.01
    lines[2] = json.dumps({**row, "check": journal._row_check(row)})  # a valid row with other values
    _write(tmp_path / "run.rank1.jsonl", lines)
    with pytest.raises(ValueError, match=r"run\.rank1\.jsonl, line 3: .*already on line 3 of .*run\.jsonl with other"):
        open_journal(path, config, resume=True, rank=0, world_size=2)
