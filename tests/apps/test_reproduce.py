"""The paper's digits recipe (apps.digits.train_paper_digits, PaperAdam) and `localvol reproduce digits --quick`."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")

from localvol_fast.apps.digits import (
    PAPER_STEPS,
    PRIOR_SIGMA,
    PaperAdam,
    cosine_lr,
    paper_mlp,
    train_paper_digits,
)


@pytest.fixture(scope="module")
def paper_run():
    return train_paper_digits(0)


def test_paper_network_shape_and_dimension(paper_run):
    model = paper_run.model
    assert isinstance(model[1], torch.nn.GELU) and model[1].approximate == "tanh"
    assert [tuple(p.shape) for p in model.parameters()] == [(64, 64), (64,), (10, 64), (10,)]
    assert sum(p.numel() for p in model.parameters()) == 4810
    assert paper_run.x_train.shape == (1024, 64) and paper_run.x_test.shape == (773, 64)
    assert float(paper_run.x_train.max()) <= 1.0 and float(paper_run.x_train.min()) >= 0.0
    assert PRIOR_SIGMA == pytest.approx(1 / math.sqrt(5e-4 * 1024))
    # 400 minibatch steps of the 25-epoch schedule; the paper's network fits its training set.
    assert all(paper_run.optimizer.state[p]["step"] == PAPER_STEPS == 400 for p in model.parameters())
    assert paper_run.accuracy(paper_run.x_train, paper_run.y_train) > 0.98
    assert paper_run.accuracy() > 0.93


def test_init_weights_and_biases_have_variance_one_over_fan_in():
    # Pool several seeds so each layer's sample is large enough: the std must be 1/8 (fan_in 64)
    # for biases too (torch's default draws them uniformly with std 1/(8 sqrt 3)).
    weights = torch.cat([paper_mlp(s)[0].weight.reshape(-1) for s in range(4)])
    biases = torch.cat([torch.cat([paper_mlp(s)[0].bias, paper_mlp(s)[2].bias]) for s in range(40)])
    out_weights = torch.cat([paper_mlp(s)[2].weight.reshape(-1) for s in range(10)])
    for values in (weights.detach(), biases.detach(), out_weights.detach()):
        assert float(values.std()) == pytest.approx(0.125, rel=0.05)
        assert abs(float(values.mean())) < 0.01
    assert torch.equal(paper_mlp(3)[0].weight, paper_mlp(3)[0].weight)


def test_adam_update_has_eps_inside_the_square_root():
    # Hand-computed: g = 1e-4 twice. Step 1: m = 1e-5, v = 1e-11, m_hat = 1e-4, v_hat = 1e-8;
    # update = 0.05 * 1e-4 / (sqrt(1e-8 + 1e-8) + 1e-8) = 0.05 * 0.707056...; torch's Adam (eps only
    # outside) would move by about 0.05 * 0.9999.
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = PaperAdam([p], lr=0.05, total_steps=4)
    p.grad = torch.tensor([1e-4], dtype=torch.float64)
    opt.step()
    first = 0.05 * 1e-4 / (math.sqrt(2e-8) + 1e-8)
    assert float(p.detach()) == pytest.approx(1.0 - first, rel=0, abs=1e-15)
    # Step 2 at lr(1) = 0.05 * (1 + cos(pi / 4)) / 2; m_hat = v-corrected ratios as in Adam.
    opt.step()
    b1, b2 = 0.9, 0.999
    m = (1 - b1) * 1e-4 * (1 + b1)
    v = (1 - b2) * 1e-8 * (1 + b2)
    m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
    second = 0.05 * 0.5 * (1 + math.cos(math.pi / 4)) * m_hat / (math.sqrt(v_hat + 1e-8) + 1e-8)
    assert float(p.detach()) == pytest.approx(1.0 - first - second, rel=0, abs=1e-15)
    # The stored moments are the raw ones (not bias-corrected): what the paper's preconditioner reads.
    assert float(opt.state[p]["exp_avg"]) == pytest.approx(m, rel=1e-12)
    assert float(opt.state[p]["exp_avg_sq"]) == pytest.approx(v, rel=1e-12)
    assert opt.state[p]["step"] == 2


def test_cosine_schedule_runs_from_lr_to_zero():
    assert cosine_lr(0.05, 0, 400) == 0.05
    assert cosine_lr(0.05, 200, 400) == pytest.approx(0.025)
    assert cosine_lr(0.05, 400, 400) == pytest.approx(0.0, abs=1e-18)


def test_raw_moments_and_checkpoints_and_poisoning(paper_run):
    first, second = paper_run.raw_moments()
    assert first.shape == second.shape == (4810,) and bool((second >= 0).all())
    early = train_paper_digits(0, stop_after=8)
    assert early.optimizer.state[early.model[0].weight]["step"] == 8
    poisoned = train_paper_digits(0, poison_fraction=0.4, stop_after=8)
    assert float((poisoned.y_train != early.y_train).float().mean()) == pytest.approx(0.4, abs=0.002)
    # Seeded: the same seed gives the same network bit for bit.
    again = train_paper_digits(0, stop_after=8)
    assert all(torch.equal(a, b) for a, b in zip(early.model.parameters(), again.model.parameters()))


def test_reproduce_digits_quick_writes_the_paper_table(tmp_path):
    pytest.importorskip("matplotlib")
    from localvol_fast.apps.reproduce import reproduce_digits

    results = reproduce_digits(tmp_path, quick=True, progress=False)
    report = (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["table_methods"] == results["settings"]["table_methods"]
    # One table with the paper's row names and figures beside ours.
    for name, figure in (("Adam second moment", "-7021"), ("Adam first moment", "-7705"), ("isotropic", "")):
        line = next(row for row in report.splitlines() if row.startswith(f"| {name} |"))
        assert figure in line
    table = saved["preconditioners"]
    assert table["cutoff"] == 0.01 and table["seeds"] == [0]
    assert set(table["rows"]) | set(table["skipped"]) == set(results["settings"]["table_methods"])
    adam = table["rows"]["adam"]["per_seed"]["0"]
    assert [r["preconditioner_eps"] for r in adam["sweep"]] == table["eps_grid"]
    assert adam["best_max"] == max(r["max_estimate"] for r in adam["sweep"])
    # The paper's finding at a good eps: Adam directions above isotropic ones.
    assert table["rows"]["adam"]["best_max"]["mean"] > table["rows"]["isotropic"]["best_max"]["mean"]
    assert {"training", "poisoning", "cutoff_scan", "paper_comparison"} <= set(saved)
    assert all(f["verdict"] in ("agrees", "disagrees", "partly") for f in saved["paper_comparison"])
    # The KL cutoff (1e-2) and the preconditioner eps are never both called "eps".
    import re

    assert not re.search(r"(?<!preconditioner )(?<!p-)\beps 0\.01\b", report)
    assert "KL cutoff 0.01, Adam preconditioner eps 0.001" in report



def test_the_full_hessian_row_decomposes_each_network_once(monkeypatch):
    """Every eps of the sweep rescales one eigendecomposition (minutes at D = 4,810), never recomputes it."""
    from types import SimpleNamespace

    from localvol_fast.apps.reproduce import experiments
    from localvol_fast.core.preconditioners import Eigenbasis
    from localvol_fast.nn.preconditioners import exact_curvature

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    run = SimpleNamespace(model=model, x_train=torch.randn(16, 4, dtype=torch.float64))
    calls = []

    def counted(*args):
        calls.append(args[0])
        return exact_curvature(*args)

    monkeypatch.setattr(experiments, "exact_curvature", counted)
    bases = {eps: experiments.method_options(run, "hessian-eigen", eps)["preconditioner"] for eps in (1e-1, 1e-3)}
    assert calls == ["hessian-eigen"]
    dim = sum(p.numel() for p in model.parameters())
    assert all(isinstance(b, Eigenbasis) and b.dim == dim for b in bases.values())
    assert not torch.equal(bases[1e-1].scales, bases[1e-3].scales)  # rescaled for each eps


def test_flax_ravel_index_is_the_papers_parameter_order():
    """The paper's flat vector (flax ``ravel_pytree``): per Dense layer its bias, then its kernel (in, out)
    row-major; ours: weight (out, in) then bias. Expected indices written out by hand."""
    from localvol_fast.apps.reproduce.experiments import flax_ravel_index

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 4))
    # flax: b0 -> 0, 1; K0[i, o] -> 2 + 2 i + o; b1 -> 8..11; K1[i, o] -> 12 + 4 i + o.
    expected = [2, 4, 6, 3, 5, 7] + [0, 1] + [12, 16, 13, 17, 14, 18, 15, 19] + [8, 9, 10, 11]
    assert flax_ravel_index(model).tolist() == expected
    with pytest.raises(ValueError, match="nn.Linear"):
        flax_ravel_index(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2)))


def test_paper_code_full_hessian_is_a_diagonal_of_sorted_eigenvalue_scales(monkeypatch):
    """The paper's full-Hessian row as its code applies it: the one eigendecomposition shared with ours,
    p = 1/(|lambda|^0.5 + eps) in ascending-eigenvalue order placed on the paper's flat order, det P = 1."""
    from types import SimpleNamespace

    from localvol_fast.apps.reproduce import experiments
    from localvol_fast.nn.curvature import output_fisher_matrix
    from localvol_fast.nn.parameters import ParameterLayout
    from localvol_fast.nn.preconditioners import exact_curvature

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    run = SimpleNamespace(model=model, x_train=torch.randn(16, 4, dtype=torch.float64))
    calls = []
    monkeypatch.setattr(experiments, "exact_curvature", lambda *a: calls.append(a[0]) or exact_curvature(*a))
    eps = 1e-2
    diagonal = experiments.method_options(run, "hessian-paper-code", eps)["preconditioner"]
    experiments.method_options(run, "hessian-eigen", eps)
    assert calls == ["hessian-eigen"]  # both rows read one decomposition
    # Ground truth from an independent eigh of the Fisher matrix.
    fisher = output_fisher_matrix(model, ParameterLayout(model.named_parameters()), run.x_train)
    values = torch.linalg.eigvalsh(fisher)
    p = 1 / (values.abs().sqrt() + eps)
    p = p / torch.exp(torch.log(p).mean())
    assert diagonal.shape == (27,) and float(torch.log(diagonal).mean()) == pytest.approx(0.0, abs=1e-12)
    flax_order = torch.empty_like(diagonal)
    flax_order[experiments.flax_ravel_index(model)] = diagonal
    assert torch.allclose(flax_order, p, rtol=1e-6, atol=0)


def test_the_papers_unrotated_map_is_distributed_as_a_diagonal():
    """Why the paper's full-Hessian row is a diagonal: u @ (Q diag p) = diag(p) Q^T u has E[w_j^2] = p_j^2 / D
    for any orthogonal Q (as diag(p) u has), while the rotated Q diag(p) u has (Q diag(p^2) Q^T)_jj / D."""
    gen = torch.Generator().manual_seed(0)
    dim, n = 4, 200_000
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    p = torch.tensor([4.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    u = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    paper = torch.einsum("bi,ij->bj", u, q * p)  # the paper's einsum('...i,ij->...j', x, evecs * p)
    rotated = (u * p) @ q.T
    assert torch.allclose(dim * paper.pow(2).mean(0), p**2, rtol=0.02)
    assert torch.allclose(dim * rotated.pow(2).mean(0), torch.diag(q @ torch.diag(p**2) @ q.T), rtol=0.02)
    assert not torch.allclose(dim * rotated.pow(2).mean(0), p**2, rtol=0.1)


def _fake_row(best: float, sd: float, eps: float) -> dict:
    sweep = [{"max_estimate": best, "log_volume": best - 8.0, "preconditioner_eps": eps}]
    per_seed = {"0": {"sweep": sweep, "best_max": best, "best_eps": eps, "log_volume_at_best": best - 8.0}}
    spread = {"mean": best, "sd": sd, "min": best, "max": best, "n": 1}
    return {"per_seed": per_seed, "best_max": spread, "log_volume_at_best": {**spread, "mean": best - 8.0}}


def test_report_explains_the_full_hessian_row_with_its_figures():
    from localvol_fast.apps.reproduce.report import PAPER_CODE_HESSIAN_MEASURED, _table_section

    rows = {"isotropic": _fake_row(-9547.0, 0.0, None), "hessian-eigen": _fake_row(-6207.0, 0.0, 1e-2)}
    table = {"seeds": [0], "cutoff": 1e-2, "eps_grid": [1e-2], "n_samples": 3000, "rows": rows, "skipped": {}}
    text = "\n".join(_table_section(table))
    assert "diag(p) Q^T u" in text and "ours -6207 nats" in text and "-9,381" in text
    assert f"{PAPER_CODE_HESSIAN_MEASURED['mean']:.0f} ± {PAPER_CODE_HESSIAN_MEASURED['sd']:.0f} nats over training seeds" in text
    assert "measured once" in text
    rows["hessian-paper-code"] = _fake_row(-9312.0, 41.0, 1e-1)
    text = "\n".join(_table_section(table))
    assert "-9312 ± 41 nats over 1 seed(s)" in text and "measured once" not in text
    row = next(r for r in text.splitlines() if r.startswith("| full Hessian, as the paper's code applies it |"))
    assert "| -9381 | -9416 (0.1) | -9312 ± 41 |" in row


def test_poisoning_and_training_name_the_kl_cutoff_and_the_preconditioner_eps_apart():
    import re

    from localvol_fast.apps.reproduce.report import _poisoning_lines, _training_lines
    from localvol_fast.apps.reproduce.verdicts import _poisoning_finding

    run = {"kind": "clean", "seed": 0, "method": "adam", "train_accuracy": 1.0, "test_accuracy": 0.9,
           "log_volume": -7500.0, "interval": [-7600.0, -7400.0], "effective_sample_size": 1.0}
    poison = {"cutoff": 1e-2, "preconditioner_eps": 1e-3, "poison_fraction": 0.4,
              "runs": [run, {**run, "kind": "poisoned", "log_volume": -9000.0}],
              "means": {"adam": {"clean": -7500.0, "poisoned": -9000.0}}}
    finding = _poisoning_finding(poison)
    assert "KL cutoff 0.01" in finding["ours"] and "preconditioner eps 0.001" in finding["ours"]
    title = _poisoning_lines(poison)[0]
    assert "KL cutoff 0.01" in title and "Adam preconditioner eps 0.001" in title
    traj = {"cutoff": 1e-2, "preconditioner_eps": 1e-3, "series": {"adam": [{"step": 1, "test_accuracy": 0.5, "log_volume": -1.0}]}}
    assert "KL cutoff 0.01, Adam preconditioner eps 0.001" in _training_lines(traj)[0]
    bare_eps = re.compile(r"(?<!preconditioner )(?<!p-)\beps 0\.01\b")
    assert not any(bare_eps.search(t) for t in [finding["ours"], title, _training_lines(traj)[0]])
