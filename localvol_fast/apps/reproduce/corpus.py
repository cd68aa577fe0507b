"""A text corpus every machine has without a download: the Python standard library's own ``.py`` files.

The folder is ``sysconfig.get_paths()["stdlib"]`` (or a ``root`` you pass). Files under
``site-packages``/``dist-packages`` (installed packages, which differ between machines), the test
suites (``test``, ``tests``, ``idle_test``: they hold deliberately malformed files) and ``__pycache__``
are left out, as are files over ``max_file_bytes`` (a few generated data modules, e.g.
``pydoc_data/topics.py``, are one long string of prose, not code).

Order and split are deterministic and machine-independent given the same files: files are ordered
by the SHA-256 of their path relative to the root (a fixed shuffle that mixes packages, unlike
alphabetical order, which would fill a small budget with ``__future__`` and ``asyncio``); the first
files up to ``heldout_bytes`` are held out, the following ones up to ``train_bytes`` are for training,
so the two splits never share a file. ``Corpus.fingerprint`` (SHA-256 of the selected paths and
contents) identifies the text, as Python versions ship different sources.

Tokenizer: raw UTF-8 bytes (vocabulary 256). Why not a BPE trained here: bytes need no training time
(the whole experiment must fit 15 minutes on 2 CPU cores), are lossless for every file, including
ones that are not valid UTF-8, and keep D small and fixed (the embedding is 256 rows whatever the
corpus); the paper's findings concern training dynamics, not the tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch

from localvol_fast.core.checks import check_integer

EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
DOCUMENT_SEPARATOR = 0  # byte 0 (NUL) never occurs in Python source: it marks where one file ends
VOCAB_SIZE = 256


class ByteTokenizer:
    """Text <-> token ids, one id per UTF-8 byte (vocab_size 256, ids 0..255); no training, no special
    tokens (``DOCUMENT_SEPARATOR`` is byte 0, which source text does not contain)."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str | bytes) -> torch.Tensor:
        """(n_bytes,) int64 ids of ``text`` (a str is UTF-8 encoded first; bytes are taken as they are)."""
        if isinstance(text, str):
            text = text.encode("utf-8")
        if not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
        if not text:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)

    def decode(self, ids) -> str:
        """The text of ``ids`` (a sequence or 1-d tensor of ints in 0..255); invalid UTF-8 is replaced."""
        values = torch.as_tensor(ids).reshape(-1)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= VOCAB_SIZE):
            raise ValueError(
                f"token ids must lie in 0..{VOCAB_SIZE - 1} for the byte tokenizer, got "
                f"{int(values.min())}..{int(values.max())}"
            )
        return bytes(values.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The selected files of each split (paths relative to ``root``) and their bytes."""

    root: Path
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    train_text: tuple[bytes, ...]
    heldout_text: tuple[bytes, ...]
    fingerprint: str

    def stream(self, split: str) -> torch.Tensor:
        """(n_tokens,) int64: the split's files as byte ids, each followed by ``DOCUMENT_SEPARATOR``."""
        texts = {"train": self.train_text, "heldout": self.heldout_text}.get(split)
        if texts is None:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        joined = b"".join(text + bytes([DOCUMENT_SEPARATOR]) for text in texts)
        return ByteTokenizer().encode(joined)

    def summary(self) -> dict:
        """JSON-ready: root, file counts, byte counts, fingerprint."""
        return {
            "root": str(self.root), "fingerprint": self.fingerprint,
            "train_files": len(self.train_files), "heldout_files": len(self.heldout_files),
            "train_bytes": sum(map(len, self.train_text)), "heldout_bytes": sum(map(len, self.heldout_text)),
        }


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library (``sysconfig``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path, max_file_bytes: int) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root`` that the corpus may use, in the fixed
    order (SHA-256 of the relative path). FileNotFoundError when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"the standard-library folder {str(root)!r} does not exist; pass root= a folder of .py files")
    paths = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_PARTS.isdisjoint(relative.parts) and path.is_file() and path.stat().st_size <= max_file_bytes:
            paths.append(relative.as_posix())
    if not paths:
        raise FileNotFoundError(
            f"no Python source files (*.py of at most {max_file_bytes} bytes, outside test folders and "
            f"site-packages) under {str(root)!r}: this interpreter ships its standard library without sources "
            "(e.g. only .pyc); install the sources or pass root= a folder of .py files"
        )
    return sorted(paths, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest())


def _take(root: Path, paths: Sequence[str], start: int, budget: int) -> tuple[list[str], list[bytes], int]:
    """Files from ``paths[start:]`` in order until ``budget`` bytes are reached (the last one may end past
    it by less than a file). Returns (names, texts, index of the next unused path)."""
    names, texts, used, index = [], [], 0, start
    while index < len(paths) and used < budget:
        text = (root / paths[index]).read_bytes()
        if text:  # empty __init__.py files carry no text
            names.append(paths[index])
            texts.append(text)
            used += len(text)
        index += 1
    return names, texts, index


def load_corpus(
    *, train_bytes: int = 2_000_000, heldout_bytes: int = 200_000, root=None, max_file_bytes: int = 200_000
) -> Corpus:
    """The corpus: held-out files first (about ``heldout_bytes``), then training files (about
    ``train_bytes``), disjoint by file, from ``root`` (default: ``stdlib_root()``).

    Raises FileNotFoundError when the folder has no usable sources, ValueError when they run out before
    both splits have a file.
    """
    train_bytes = check_integer(train_bytes, "train_bytes", what="bytes of training text")
    heldout_bytes = check_integer(heldout_bytes, "heldout_bytes", what="bytes of held-out text")
    max_file_bytes = check_integer(max_file_bytes, "max_file_bytes", what="largest file taken, in bytes")
    root = stdlib_root() if root is None else Path(root)
    paths = source_files(root, max_file_bytes)
    heldout_names, heldout_text, next_index = _take(root, paths, 0, heldout_bytes)
    train_names, train_text, _ = _take(root, paths, next_index, train_bytes)
    if not heldout_names or not train_names:
        raise ValueError(
            f"the {len(paths)} source files under {str(root)!r} are too few to give both a held-out and a "
            "training split; pass a root with more .py files"
        )
    digest = hashlib.sha256()
    for name, text in zip(heldout_names + train_names, heldout_text + train_text):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(text).digest())
    return Corpus(
        root=root, train_files=tuple(train_names), heldout_files=tuple(heldout_names),
        train_text=tuple(train_text), heldout_text=tuple(heldout_text), fingerprint=digest.hexdigest(),
    )


def heldout_windows(stream: torch.Tensor, n_windows: int, length: int) -> dict:
    """``n_windows`` windows of ``length`` tokens spread evenly over ``stream``, as the dict ``estimate``
    takes for a language model: {"input_ids": (n_windows, length) int64, "attention_mask": ones}."""
    n_windows = check_integer(n_windows, "n_windows", what="held-out sequences")
    length = check_integer(length, "length", what="tokens per sequence")
    room = stream.numel() - length
    if room < 0 or (n_windows > 1 and room < n_windows - 1):
        raise ValueError(
            f"the held-out text has {stream.numel()} tokens, too few for {n_windows} windows of {length}; "
            "raise heldout_bytes or lower the window count or length"
        )
    starts = torch.linspace(0, room, n_windows).round().to(torch.int64)
    ids = torch.stack([stream[s : s + length] for s in starts.tolist()])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
