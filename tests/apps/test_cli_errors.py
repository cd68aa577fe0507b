"""``localvol estimate``: every user error exits 2 with a clear message, found before the model loads.

Issue 14, part 5. A usage error names the option and the value, has no traceback and no torch-internal
text, and writes nothing. ``--out`` and ``--journal`` are tried for writing before the factory or model
is loaded; if ``--out`` still fails at the end, the result is saved to a fallback file that is named.
Tests run as root here, which ignores file permissions: an unwritable place is a path below a regular
file, or a monkeypatched write; the chmod test runs only for other users.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from localvol_fast.apps import cli
from localvol_fast.core.result import VolumeResult

REPO = Path(__file__).resolve().parents[2]
FACTORY = "tests.apps.cli_factory:build"
# what torch or Python print when an error escapes unexplained
INTERNAL = ("Traceback", "KeyError", "RuntimeError", "NotImplementedError", "torch/", "site-packages")


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def loads(monkeypatch):
    """Records whether the model was loaded (the factory called) - a usage error must come first."""
    calls = []
    real = cli.load_factory

    def recording(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(cli, "load_factory", recording)
    return calls


def run(capsys, *args) -> tuple[int, str]:
    code = cli.main(["estimate", *args, "--quiet"])
    return code, capsys.readouterr().err


def assert_usage_error(code, err, *expected):
    assert code == 2, err
    for text in expected:
        assert text in err, err
    for text in INTERNAL:
        assert text not in err, err


# ----- --out and --journal are checked before the model loads ------------------------------------
def test_out_below_a_regular_file_is_refused_before_loading(tmp_path, capsys, in_repo, loads):
    (tmp_path / "plain").write_text("a file, not a folder")
    out = tmp_path / "plain" / "r.json"
    code, err = run(capsys, "--factory", FACTORY, "--out", str(out))
    assert_usage_error(code, err, f"--out {out}", "cannot create its folder")
    assert loads == []


def test_out_in_a_folder_that_refuses_files_is_refused_before_loading(tmp_path, capsys, in_repo, loads, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", refuse)
    code, err = run(capsys, "--factory", FACTORY, "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, "--out", "cannot write there (Permission denied)")
    assert loads == [] and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_out_in_a_read_only_folder_is_refused_before_loading(tmp_path, capsys, in_repo, loads):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        code, err = run(capsys, "--factory", FACTORY, "--out", str(folder / "r.json"))
    finally:
        folder.chmod(0o700)
    assert_usage_error(code, err, "--out", "cannot write there")
    assert loads == []


def test_the_write_test_leaves_no_file_behind(tmp_path, capsys, in_repo):
    out = tmp_path / "new" / "r.json"
    assert cli.main(["estimate", "--factory", FACTORY, "--n-samples", "2", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]


def test_journal_below_a_regular_file_is_refused_before_loading(tmp_path, capsys, in_repo, loads):
    (tmp_path / "plain").write_text("x")
    code, err = run(capsys, "--factory", FACTORY, "--journal", str(tmp_path / "plain" / "j.jsonl"),
                    "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, "--journal", "cannot create its folder")
    assert loads == []


def test_journal_holding_a_run_without_resume_is_refused_before_loading(tmp_path, capsys, in_repo, loads):
    journal = tmp_path / "j.jsonl"
    journal.write_text('{"format": "x"}\n')
    code, err = run(capsys, "--factory", FACTORY, "--journal", str(journal), "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, "already holds a run", "--resume")
    assert loads == []


def test_resume_without_journal_is_refused_before_loading(tmp_path, capsys, in_repo, loads):
    code, err = run(capsys, "--factory", FACTORY, "--resume", "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, "--resume needs --journal")
    assert loads == []


# ----- a result that cannot be written at the end is not lost ---------------------------------
def _failing_save_to(monkeypatch, out: Path):
    real = VolumeResult.save

    def save(self, path, *args, **kwargs):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(VolumeResult, "save", save)


def test_a_failed_write_of_out_saves_the_result_next_to_the_journal(tmp_path, capsys, in_repo, monkeypatch):
    out, journal = tmp_path / "out" / "r.json", tmp_path / "runs" / "j.jsonl"
    _failing_save_to(monkeypatch, out)
    code, err = run(capsys, "--factory", FACTORY, "--n-samples", "3", "--journal", str(journal), "--out", str(out))
    assert code == 1, err
    assert "No space left on device" in err and "the result was saved to" in err
    saved = [p for p in journal.parent.iterdir() if p.suffix == ".json"]
    assert len(saved) == 1 and str(saved[0]) in err
    assert VolumeResult.load(saved[0]).n_samples == 3


def test_a_failed_write_of_out_without_journal_saves_in_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "r.json"
    _failing_save_to(monkeypatch, out)
    code, err = run(capsys, "--factory", FACTORY, "--n-samples", "2", "--out", str(out))
    assert code == 1 and "the result was saved to" in err
    saved = list(work.glob("r.*.json"))
    assert len(saved) == 1 and VolumeResult.load(saved[0]).n_samples == 2


# ----- options and files that are wrong ---------------------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--device", "meta"], ["--device", "'meta' holds no data"]),
        (["--device", "gpu0"], ["--device", "'gpu0' is not a torch device"]),
        (["--seed", "-1"], ["--seed", "must be an integer in [0, 2**64)"]),
        (["--seed", "1.5"], ["--seed", "'1.5'"]),
        (["--seed", str(2**64)], ["--seed"]),
        (["--sigma", "1e300"], ["sigma must lie in [1e-150, 1e+150]"]),
        (["--measure", "uniform", "--bounds", "1e-300"], ["bounds must lie in"]),
        (["--memory-budget-gib", "0"], ["--memory-budget-gib"]),
        (["--params", "nope"], ["nope"]),
        (["--optimizer-state", "x.pt"], ["--optimizer-state is used by --preconditioner adam"]),
        (["--preconditioner", "adam", "--optimizer-state", "/no/such/adam.pt"], ["no such file"]),
        (["--distributed"], ["torchrun"]),
    ],
    ids=lambda v: " ".join(v)[:30] if isinstance(v, list) else "",
)
def test_bad_options_exit_2_with_a_clear_message(tmp_path, capsys, in_repo, args, expected):
    code, err = run(capsys, "--factory", FACTORY, *args, "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, *expected)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2_before_loading(tmp_path, capsys, in_repo, loads):
    code, err = run(capsys, "--factory", FACTORY, "--device", "cuda", "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, "--device", "CUDA is not available")
    assert loads == []


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"not a torch file", "cannot read it as a torch.save'd optimizer state_dict"),
        (torch.ones(3), "optimizer must be a torch Adam/AdamW or its state_dict()"),
        ({"a": torch.ones(1)}, "got a dict with keys ['a']"),
    ],
    ids=["junk", "tensor", "dict"],
)
def test_optimizer_state_of_the_wrong_kind_exits_2(tmp_path, capsys, in_repo, content, expected):
    path = tmp_path / "adam.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    code, err = run(capsys, "--factory", "tests.apps.cli_factory:build_trained", "--preconditioner", "adam",
                    "--optimizer-state", str(path), "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, expected)


def test_nonfinite_factory_data_exits_2_naming_the_position(tmp_path, capsys, monkeypatch):
    x = torch.randn(8, 4)
    x[5, 2] = float("inf")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    monkeypatch.setattr(cli, "load_factory", lambda spec: (model, x, {}))
    code, err = run(capsys, "--factory", "any:thing", "--out", str(tmp_path / "r.json"))
    assert_usage_error(code, err, "the evaluation data holds inf in batch 0 (input 0), row 5, position (5, 2)")


# ----- a Hugging Face folder and its data -------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny_neox_errors")
    config = transformers.GPTNeoXConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(directory)
    return directory


def _hf_run(capsys, hf_dir, data, tmp_path, *extra):
    return run(capsys, "--model", str(hf_dir), "--data", str(data), "--n-samples", "2", *extra,
               "--out", str(tmp_path / "r.json"))


@pytest.mark.parametrize(
    "content, expected",
    [
        (torch.full((2, 4), 40), "token id 40 in batch 0 at position (0, 0) is outside the model's vocabulary of 32"),
        (torch.tensor([[1, 2, -3, 4]]), "token id -3 in batch 0 at position (0, 2)"),
        (torch.ones(2, 4), "token ids must be integers, got torch.float32"),
        ([1, 2, 3], "expected a tensor of token ids or a dict with 'input_ids', got list"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)},
         "attention_mask has shape (2, 3) but input_ids has shape (2, 4)"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(5)},
         "attention_mask has shape (1, 5) but input_ids has shape (2, 4)"),
    ],
    ids=["beyond-vocab", "negative", "float", "list", "mask-shape", "mask-size"],
)
def test_bad_token_data_exits_2(tmp_path, capsys, hf_dir, content, expected):
    torch.save(content, tmp_path / "ids.pt")
    code, err = _hf_run(capsys, hf_dir, tmp_path / "ids.pt", tmp_path)
    assert_usage_error(code, err, expected)
    assert not (tmp_path / "r.json").exists()


def test_data_of_the_wrong_kind_exits_2(tmp_path, capsys, hf_dir):
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01 not a torch file")
    code, err = _hf_run(capsys, hf_dir, tmp_path / "junk.pt", tmp_path)
    assert_usage_error(code, err, "cannot read it as a torch.save'd tensor or dict")
    (tmp_path / "folder").mkdir()
    code, err = _hf_run(capsys, hf_dir, tmp_path / "folder", tmp_path)
    assert_usage_error(code, err, "is a folder")
    (tmp_path / "lines.txt").write_text("the cat\n")  # text, but this folder has no tokenizer of its own
    code, err = _hf_run(capsys, hf_dir, tmp_path / "lines.txt", tmp_path)
    assert_usage_error(code, err, "tokenizer")


def test_model_folder_without_or_with_a_broken_config_exits_2(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch.save(torch.ones(1, 4, dtype=torch.long), tmp_path / "ids.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _hf_run(capsys, empty, tmp_path / "ids.pt", tmp_path)
    assert_usage_error(code, err, "no config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture_xyz"}')
    code, err = _hf_run(capsys, broken, tmp_path / "ids.pt", tmp_path)
    assert_usage_error(code, err, f"--model {broken}: cannot load a causal language model")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text("{ not json")
    code, err = _hf_run(capsys, weightless, tmp_path / "ids.pt", tmp_path)
    assert_usage_error(code, err, "cannot load a causal language model")
