"""The ``localvol`` command line: demo, reproduce, estimate, exit codes and progress output.

Commands run in-process through ``cli.main([...])``; one estimate and one bad-usage call run as real
subprocesses (the console script when installed, else ``python -m localvol_fast``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localvol_fast.apps import cli
from localvol_fast.apps.demo import load_demo_results
from localvol_fast.core.result import VolumeResult
from localvol_fast.engine.sequential_result import SequentialResult

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
PROGRESS = "directions ["  # what the core's progress bar prints


def _image(path: Path):
    image = pytest.importorskip("matplotlib.image").imread(path)
    assert path.stat().st_size > 1000
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root so that ``tests.apps.cli_factory`` imports as a factory module."""
    monkeypatch.chdir(REPO)


def _estimate_args(out, *extra):
    return ["estimate", "--factory", "tests.apps.cli_factory:build", "--n-samples", "8", "--out", str(out), *extra]


# ----- demo -------------------------------------------------------------------------------------
def test_demo_writes_table_json_and_png(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    code = cli.main(["demo", "--out", str(tmp_path), "--n-samples", "8", "--steps", "30"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "log volume (nats)" in captured.out and "95% interval" in captured.out and "evals/dir" in captured.out
    for method in ("isotropic", "adam", "fisher"):
        assert method in captured.out
    assert PROGRESS in captured.err  # progress bars on stderr unless --quiet
    document = json.loads((tmp_path / "demo.json").read_text())
    assert [row["method"] for row in document["table"]] == ["isotropic", "adam", "fisher"]
    results = load_demo_results(tmp_path / "demo.json")
    assert set(results) == {"isotropic", "adam", "fisher"}
    for name, result in results.items():
        assert isinstance(result, VolumeResult) and result.n_samples == 8 and result.dim == 4810
        row = next(r for r in document["table"] if r["method"] == name)
        assert row["log_volume"] == pytest.approx(result.log_volume)
    _image(tmp_path / "demo.png")


def test_demo_quiet_hides_progress(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert cli.main(["demo", "--out", str(tmp_path), "--n-samples", "4", "--steps", "10", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert PROGRESS not in captured.err and "training" not in captured.err
    assert "isotropic" in captured.out


# ----- reproduce --------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["lm", "poisoning"])
def test_reproduce_lm_and_poisoning_dispatch_their_options(experiment, tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    calls = []

    def fake(out, **options):
        calls.append((out, options, torch.get_num_threads()))
        return {"paper_comparison": [{"claim": f"{experiment} claim", "verdict": "holds", "ours": "our figure"}]}

    monkeypatch.setitem(cli.EXPERIMENTS, experiment, (fake, experiment))
    args = ["reproduce", experiment, "--quick", "--out", str(tmp_path), "--quiet", "--seed", "3", "--n-samples", "8"]
    assert cli.main(args) == 0
    out, options, threads = calls[0]
    assert out == tmp_path and options["quick"] is True and options["n_samples"] == 8 and options["progress"] is False
    assert (options["seeds"] == [3]) if experiment == "poisoning" else (options["seed"] == 3)
    assert threads == 1  # reproduce runs with one torch thread unless --threads says otherwise
    printed = capsys.readouterr().out
    assert "HOLDS" in printed and f"{experiment} claim" in printed and "ours: our figure" in printed
    assert cli.main(["reproduce", experiment, "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    assert ("seeds" in calls[1][1] and calls[1][1]["seeds"] is None) or calls[1][1]["seed"] == 0


def test_reproduce_digits_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert cli.main(["reproduce", "digits", "--quick", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "comparison with the paper" in out
    report = (tmp_path / "report.md").read_text()
    assert "## Comparison with the paper" in report
    assert "-7021" in report and "Adam second moment" in report  # the paper's figures are quoted
    assert any(v in report for v in ("AGREES", "DISAGREES", "PARTLY"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"training", "poisoning", "preconditioners", "cutoff_scan", "paper_comparison"} <= set(results)
    best = results["preconditioners"]["best"]
    assert {"isotropic", "adam", "adam-m1", "fisher"} <= set(best)
    assert all(f["verdict"] in ("agrees", "disagrees", "partly") for f in results["paper_comparison"])
    scan = results["cutoff_scan"]
    assert next(r["cutoff"] for r in scan["records"]) == pytest.approx(1e-6)
    assert [r["cutoff"] for r in scan["records"]][-1] == pytest.approx(1e2)
    for name in ("training.png", "cutoff_scan.png", "preconditioners.png", "histograms.png", "poisoning.png"):
        _image(tmp_path / name)


# ----- estimate with a factory ------------------------------------------------------------------
def test_estimate_factory(tmp_path, capsys, in_repo):
    out = tmp_path / "sub" / "result.json"
    assert cli.main(_estimate_args(out, "--cutoff", "0.05", "--seed", "3")) == 0
    captured = capsys.readouterr()
    assert "log volume" in captured.out and "nats" in captured.out
    assert PROGRESS in captured.err
    result = VolumeResult.load(out)
    assert result.n_samples == 8 and result.cutoff == 0.05 and result.dim == 4 * 8 + 8 + 8 * 3 + 3
    assert result.config["seed"] == 3


def test_estimate_quiet_hides_progress(tmp_path, capsys, in_repo):
    assert cli.main(_estimate_args(tmp_path / "r.json", "--quiet")) == 0
    captured = capsys.readouterr()
    assert PROGRESS not in captured.err
    assert "log volume" in captured.out


def test_estimate_factory_options(tmp_path, in_repo):
    """Adam preconditioner from the factory's optimizer, loss neighborhood, uniform box, params subset."""
    common = ["--factory", "tests.apps.cli_factory:build_trained", "--n-samples", "6", "--quiet"]
    out = tmp_path / "adam.json"
    assert cli.main(["estimate", *common, "--preconditioner", "adam", "--neighborhood", "loss", "--out", str(out)]) == 0
    assert VolumeResult.load(out).config["preconditioned"] is True
    out = tmp_path / "box.json"
    args = [
        "--measure",
        "uniform",
        "--bounds",
        "3",
        "--params",
        "0.weight",
        "0.bias",
        "--batch-size",
        "2",
        "--rtol",
        "0.05",
    ]
    assert cli.main(["estimate", *common, *args, "--out", str(out)]) == 0
    result = VolumeResult.load(out)
    assert result.dim == 4 * 8 + 8 and result.measure["name"] == "uniform"


def test_estimate_optimizer_state_file(tmp_path, in_repo):
    from tests.apps.cli_factory import build_trained

    torch.save(build_trained()[2]["optimizer"].state_dict(), tmp_path / "adam.pt")
    args = _estimate_args(
        tmp_path / "r.json", "--preconditioner", "adam", "--optimizer-state", str(tmp_path / "adam.pt")
    )
    assert cli.main([*args, "--quiet"]) == 0
    assert VolumeResult.load(tmp_path / "r.json").info["preconditioner"]["name"] == "adam"
    (tmp_path / "junk.pt").write_text("not a torch file")
    bad = _estimate_args(
        tmp_path / "r2.json", "--preconditioner", "adam", "--optimizer-state", str(tmp_path / "junk.pt")
    )
    assert cli.main([*bad, "--quiet"]) == 2


# ----- estimate with a Hugging Face model directory ---------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("tiny_neox")
    config = transformers.GPTNeoXConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(directory)
    words = "the a cat dog sat ran on under mat log and fast slow big small red blue".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: k + 3 for k, w in enumerate(words)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    tokenizer.save_pretrained(directory)
    (directory / "lines.txt").write_text("the cat sat on the mat\n\na big red dog ran fast\nthe log\n")
    torch.save(torch.randint(3, 32, (3, 12), generator=torch.Generator().manual_seed(0)), directory / "ids.pt")
    return directory


@pytest.mark.parametrize("data", ["ids.pt", "lines.txt"])
def test_estimate_hf_model(tmp_path, capsys, hf_dir, data):
    out = tmp_path / "lm.json"
    args = ["estimate", "--model", str(hf_dir), "--data", str(hf_dir / data), "--n-samples", "4", "--max-length", "8"]
    assert cli.main([*args, "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    result = VolumeResult.load(out)
    assert result.n_samples == 4 and result.config["model"] == "GPTNeoXForCausalLM"
    assert "log volume" in capsys.readouterr().out


def test_estimate_hf_model_loss_neighborhood(tmp_path, hf_dir):
    out = tmp_path / "loss.json"
    args = ["estimate", "--model", str(hf_dir), "--data", str(hf_dir / "lines.txt"), "--neighborhood", "loss"]
    assert cli.main([*args, "--n-samples", "3", "--out", str(out), "--quiet"]) == 0
    assert VolumeResult.load(out).config["neighborhood"] == "loss"


# ----- bad input and failures -------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model_dir", "--data", "x.pt"], "no such folder"),
        (["--factory", "no_colon_here"], "module:function"),
        (["--factory", "tests.apps.cli_factory:missing"], "has no function 'missing'"),
        (["--factory", "tests.apps.cli_factory:NOT_CALLABLE"], "has no function"),
        (["--factory", "no_such_module_xyz:build"], "cannot import module"),
        (["--factory", "tests.apps.cli_factory:not_a_model"], "torch.nn.Module"),
        (["--factory", "tests.apps.cli_factory:build", "--cutoff", "0"], "--cutoff"),
        (["--factory", "tests.apps.cli_factory:build", "--cutoff", "-1"], "--cutoff"),
        (["--factory", "tests.apps.cli_factory:build", "--cutoff", "nan"], "--cutoff"),
        (["--factory", "tests.apps.cli_factory:build", "--n-samples", "0"], "--n-samples"),
        (["--factory", "tests.apps.cli_factory:build", "--preconditioner", "adam"], "needs the model's Adam state"),
        (["--factory", "tests.apps.cli_factory:build", "--params", "nope"], "nope"),
        (["--factory", "tests.apps.cli_factory:build", "--data", "x.pt"], "--data goes with --model"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, in_repo, args, message):
    code = cli.main(["estimate", *args, "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_bad_model_folder_and_data(tmp_path, capsys, hf_dir):
    (tmp_path / "empty").mkdir()
    assert (
        cli.main(["estimate", "--model", str(tmp_path / "empty"), "--data", "x.pt", "--out", str(tmp_path / "r.json")])
        == 2
    )
    assert "config.json" in capsys.readouterr().err
    missing = [
        "estimate",
        "--model",
        str(hf_dir),
        "--data",
        str(tmp_path / "none.pt"),
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert cli.main(missing) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save(torch.full((2, 4), 99), tmp_path / "big.pt")
    too_big = [
        "estimate",
        "--model",
        str(hf_dir),
        "--data",
        str(tmp_path / "big.pt"),
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert cli.main(too_big) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert cli.main(["estimate", "--model", str(hf_dir), "--out", str(tmp_path / "r.json")]) == 2
    assert "--model needs --data" in capsys.readouterr().err


def test_usage_errors_and_help(capsys):
    assert cli.main([]) == 2
    assert cli.main(["reproduce", "cifar"]) == 2
    assert cli.main(["estimate", "--out", "r.json"]) == 2  # neither --model nor --factory
    assert "usage" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0


def test_runtime_failure_exits_1(tmp_path, capsys, in_repo):
    code = cli.main(["estimate", "--factory", "tests.apps.cli_factory:broken", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert "the factory failed on purpose" in err and "Traceback" not in err
    code = cli.main(["estimate", "--factory", "tests.apps.cli_factory:broken", "--out", str(tmp_path / "r.json"), "--debug"])
    assert code == 1 and "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(tmp_path, capsys, monkeypatch, in_repo):
    def interrupted(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_factory", interrupted)
    assert cli.main(_estimate_args(tmp_path / "r.json")) == 130
    assert "interrupted" in capsys.readouterr().err


def test_threads_are_restored(tmp_path, in_repo):
    before = torch.get_num_threads()
    assert cli.main(_estimate_args(tmp_path / "r.json", "--threads", "1", "--quiet")) == 0
    assert torch.get_num_threads() == before


def test_missing_matplotlib_is_named(tmp_path, capsys, monkeypatch):
    from localvol_fast.apps import plots

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'localvol_fast\[demo\]'"):
        plots.plot_volume_over_training([{"step": 1, "log_volume": -1.0}], tmp_path / "x.png")
    assert cli.main(["demo", "--out", str(tmp_path), "--quiet"]) == 1
    assert "pip install 'localvol_fast[demo]'" in capsys.readouterr().err
    assert not (tmp_path / "demo.json").exists()


def test_plots_from_plain_data(tmp_path):
    pytest.importorskip("matplotlib")
    from localvol_fast.apps import plots

    points = [
        {"cutoff": c, "log_volume": 10 * k, "interval": [10 * k - 5, 10 * k + 1]}
        for k, c in enumerate([1e-3, 1e-2, 1e-1])
    ]
    _image(plots.plot_volume_vs_cutoff({"a": points, "b": points[:2]}, tmp_path / "c.png", dim=8, ceiling=40.0))
    steps = [{"step": s, "log_volume": -s, "interval": [-s - 1, -s]} for s in (1, 2, 4, 8)]
    _image(plots.plot_volume_over_training({"iso": steps, "adam": steps[1:]}, tmp_path / "t.png"))
    run = {"estimates": [-3.0, -2.0, -1.5, float("-inf")], "log_volume": -1.2, "interval": [-1.6, -1.1]}
    _image(plots.plot_estimate_histograms({"x": run, "y": run}, tmp_path / "h.png", overlay=True))


# ----- a real process ---------------------------------------------------------------------------
def _command():
    script = Path(sys.executable).with_name("localvol")
    if script.exists() or shutil.which("localvol"):
        return [str(script) if script.exists() else shutil.which("localvol")]
    return [sys.executable, "-m", "localvol_fast"]


def test_subprocess_estimate_and_bad_usage(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    out = tmp_path / "r.json"
    done = subprocess.run(
        [*_command(), *_estimate_args(out)], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "log volume" in done.stdout and PROGRESS in done.stderr
    assert VolumeResult.load(out).n_samples == 8
    bad = subprocess.run(
        [sys.executable, "-m", "localvol_fast", *_estimate_args(out, "--cutoff", "0")],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "--cutoff" in bad.stderr and "Traceback" not in bad.stderr


def test_estimate_journal_and_resume(tmp_path, in_repo):
    journal, first, second = tmp_path / "run.jsonl", tmp_path / "first.json", tmp_path / "second.json"
    common = ["estimate", "--factory", "tests.apps.cli_factory:build", "--quiet", "--journal", str(journal)]
    assert cli.main([*common, "--n-samples", "5", "--out", str(first)]) == 0
    assert cli.main([*common, "--n-samples", "5", "--out", str(first)]) == 2  # exists: needs --resume
    assert cli.main([*common, "--n-samples", "9", "--resume", "--out", str(second)]) == 0
    head, extended = VolumeResult.load(first), VolumeResult.load(second)
    assert extended.n_samples == 9 and torch.equal(extended.estimates[:5], head.estimates)
    assert cli.main(["estimate", "--factory", "tests.apps.cli_factory:build", "--resume", "--out", str(second)]) == 2


def _sequential_args(out, *extra):
    return ["estimate", "--factory", "tests.apps.cli_factory:build", "--quiet", "--method", "sequential", "--n-samples",
            "50", "--replicates", "2", "--moves-per-step", "2", "--cutoff", "0.05", "--out", str(out), *extra]


def test_estimate_with_the_sequential_method(tmp_path, in_repo):
    out, journal = tmp_path / "seq.json", tmp_path / "seq.state"
    assert cli.main(_sequential_args(out, "--start-cutoff", "0.5", "--journal", str(journal))) == 0
    result = SequentialResult.load(out)
    assert result.cutoffs == [0.05] and result.config["n_replicates"] == 2 and result.config["moves_per_step"] == 2
    assert result.config["start_cutoff"] == 0.5 and result.config["source"] == "tests.apps.cli_factory:build"
    low, high = result.log_volume_interval
    assert low < result.log_volume < high and result.log_volume < 0 and result.complete
    # its journal is the sampler's state: refused without --resume, read back with it
    assert cli.main(_sequential_args(tmp_path / "again.json", "--start-cutoff", "0.5", "--journal", str(journal))) == 2
    assert cli.main(_sequential_args(tmp_path / "again.json", "--start-cutoff", "0.5", "--journal", str(journal),
                                     "--resume")) == 0
    assert SequentialResult.load(tmp_path / "again.json").log_volumes == result.log_volumes


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--start-cutoff", "1"], "--start-cutoff applies to --method sequential only"),
        (["--replicates", "3", "--scope", "global"], "--scope, --replicates apply to --method sequential only"),
    ],
)
def test_sequential_flags_without_the_sequential_method_are_refused(tmp_path, in_repo, capsys, flags, message):
    assert cli.main(_estimate_args(tmp_path / "r.json", *flags)) == 2
    assert message in capsys.readouterr().err


def test_the_sequential_method_refuses_a_preconditioner(tmp_path, in_repo, capsys):
    assert cli.main(_sequential_args(tmp_path / "r.json", "--preconditioner", "fisher")) == 2
    assert "no preconditioner" in capsys.readouterr().err


def test_estimate_under_torchrun_gloo(tmp_path):
    """The README's torchrun command, on two CPU processes: rank 0 writes the single-process result."""
    single, shared = tmp_path / "single.json", tmp_path / "two.json"
    base = [sys.executable, "-m", "localvol_fast", "estimate", "--factory", "tests.apps.cli_factory:build", "--quiet",
            "--n-samples", "11", "--evaluation", "sequential"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([*base, "--out", str(single)], check=True, cwd=REPO, env=env, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    subprocess.run([*torchrun, "-m", "localvol_fast", *base[3:], "--distributed", "--out", str(shared)],
                   check=True, cwd=REPO, env=env, timeout=300)
    a, b = VolumeResult.load(single), VolumeResult.load(shared)
    assert torch.equal(a.estimates, b.estimates) and b.info["processes"] == 2


def test_the_cli_imports_without_transformers():
    # The demo's install (".[demo]") has no transformers: the CLI must import and run `demo --help` there.
    code = "import sys; sys.modules['transformers'] = None; import localvol_fast.apps.cli as c; sys.exit(c.main(['demo', '--help']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
