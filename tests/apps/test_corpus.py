"""The standard-library corpus and the byte tokenizer (apps.reproduce.corpus), without network access."""

from __future__ import annotations

import hashlib

import pytest
import torch

from localvol_fast.apps.reproduce.corpus import (
    DOCUMENT_SEPARATOR,
    ByteTokenizer,
    heldout_windows,
    load_corpus,
    source_files,
    stdlib_root,
)


def _fake_library(root, n_files: int = 12, size: int = 400) -> None:
    """``n_files`` small .py files in two packages, plus files the corpus must leave out."""
    for k in range(n_files):
        package = root / ("alpha" if k % 2 else "beta")
        package.mkdir(parents=True, exist_ok=True)
        (package / f"mod{k}.py").write_text(f"# module {k}\n" + f"x_{k} = {k}\n" * (size // 8))
    for excluded in ("test", "site-packages/pkg", "__pycache__"):
        (root / excluded).mkdir(parents=True, exist_ok=True)
        (root / excluded / "skip_me.py").write_text("raise SystemExit\n")
    (root / "alpha" / "notes.txt").write_text("not python")


def test_tokenizer_roundtrips_text_and_bytes():
    tokenizer = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'  # unicode survives\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.int64 and ids.numel() == len(text.encode("utf-8")) > len(text)
    assert int(ids.min()) >= 0 and int(ids.max()) < tokenizer.vocab_size == 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text
    raw = bytes(range(1, 128))
    assert bytes(tokenizer.encode(raw).tolist()) == raw
    assert tokenizer.encode("").numel() == 0 and tokenizer.decode([]) == ""


def test_tokenizer_refuses_bad_input():
    tokenizer = ByteTokenizer()
    with pytest.raises(ValueError, match="0..255"):
        tokenizer.decode([65, 300])
    with pytest.raises(TypeError, match="str or bytes"):
        tokenizer.encode(12)


def test_order_split_and_exclusions_on_a_fake_library(tmp_path):
    _fake_library(tmp_path)
    names = source_files(tmp_path, max_file_bytes=10_000)
    assert len(names) == 12 and not any("skip_me" in n for n in names)
    assert names == sorted(names, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    corpus = load_corpus(train_bytes=2_000, heldout_bytes=800, root=tmp_path)
    assert set(corpus.train_files).isdisjoint(corpus.heldout_files)
    # Held-out files come first in the fixed order, training files right after them.
    assert list(corpus.heldout_files) + list(corpus.train_files) == names[: len(corpus.heldout_files) + len(corpus.train_files)]
    sizes = {n: (tmp_path / n).stat().st_size for n in names}
    assert 800 <= sum(sizes[n] for n in corpus.heldout_files) < 800 + max(sizes.values())
    assert 2_000 <= sum(sizes[n] for n in corpus.train_files) < 2_000 + max(sizes.values())
    assert corpus.train_text[0] == (tmp_path / corpus.train_files[0]).read_bytes()
    stream = corpus.stream("heldout")
    assert int((stream == DOCUMENT_SEPARATOR).sum()) == len(corpus.heldout_files)
    assert stream.numel() == sum(sizes[n] for n in corpus.heldout_files) + len(corpus.heldout_files)


def test_stdlib_corpus_is_deterministic_and_disjoint():
    first = load_corpus(train_bytes=60_000, heldout_bytes=20_000)
    second = load_corpus(train_bytes=60_000, heldout_bytes=20_000)
    assert first.root == stdlib_root()
    assert first.train_files == second.train_files and first.heldout_files == second.heldout_files
    assert first.fingerprint == second.fingerprint
    assert torch.equal(first.stream("train"), second.stream("train"))
    assert set(first.train_files).isdisjoint(first.heldout_files)
    assert all(name.endswith(".py") and "site-packages" not in name for name in first.train_files)
    summary = first.summary()
    assert summary["train_bytes"] >= 60_000 and summary["heldout_bytes"] >= 20_000
    # Another budget changes the text and its fingerprint.
    assert load_corpus(train_bytes=90_000, heldout_bytes=20_000).fingerprint != first.fingerprint


def test_clear_errors_without_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(root=tmp_path / "missing")
    (tmp_path / "only_bytecode").mkdir()
    (tmp_path / "only_bytecode" / "mod.pyc").write_bytes(b"\x00\x01")
    with pytest.raises(FileNotFoundError, match="no Python source files.*only_bytecode"):
        load_corpus(root=tmp_path / "only_bytecode")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="too few"):
        load_corpus(root=tmp_path / "one", heldout_bytes=1, train_bytes=1)
    with pytest.raises(ValueError, match="train_bytes"):
        load_corpus(train_bytes=0)
    _fake_library(tmp_path / "lib")
    with pytest.raises(ValueError, match="split must be"):
        load_corpus(root=tmp_path / "lib", train_bytes=1, heldout_bytes=1).stream("validation")


def test_heldout_windows(tmp_path):
    stream = torch.arange(100) % 256
    data = heldout_windows(stream, 3, 10)
    assert data["input_ids"].shape == (3, 10) and torch.equal(data["attention_mask"], torch.ones(3, 10, dtype=torch.int64))
    assert data["input_ids"][0, 0] == 0 and data["input_ids"][-1, -1] == 99  # spread from the start to the end
    with pytest.raises(ValueError, match="too few for 2 windows of 200"):
        heldout_windows(stream, 2, 200)
