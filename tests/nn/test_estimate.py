"""estimate() on nn.Modules: digits MLP, tiny GPT-NeoX / GPT-2, restoration, vmap vs sequential, errors."""

import math
import warnings

import pytest
import torch
from conftest import Wrapped, tiny_gpt2, tiny_gpt_neox, token_batch

from localvol_fast.apps.digits import PRIOR_SIGMA
from localvol_fast.nn.estimator import estimate

QUIET = {"progress": False}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_restored(model, snap):
    state, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes


def test_digits_kl_volume_is_finite_and_reproducible(digits_clean):
    run = digits_clean
    kw = dict(cutoff=1e-2, n_samples=16, sigma=PRIOR_SIGMA, seed=3, **QUIET)
    a = estimate(run.model, run.x_test, **kw)
    b = estimate(run.model, run.x_test, **kw)
    assert math.isfinite(a.log_volume) and a.dim == 4810
    assert torch.equal(a.estimates, b.estimates)
    assert a.status == ["converged"] * 16
    assert a.info["evaluation"] == "mlp" and a.config["neighborhood"] == "kl"
    c = estimate(run.model, run.x_test, **{**kw, "seed": 4})
    assert not torch.equal(a.estimates, c.estimates)


def test_poisoned_network_has_smaller_volume(digits_clean, digits_poisoned):
    kw = dict(cutoff=1e-2, n_samples=24, sigma=PRIOR_SIGMA, **QUIET)
    clean = estimate(digits_clean.model, digits_clean.x_test, **kw)
    poisoned = estimate(digits_poisoned.model, digits_poisoned.x_test, **kw)
    assert digits_poisoned.accuracy() < digits_clean.accuracy()
    assert poisoned.log_volume_interval[1] < clean.log_volume_interval[0]


def test_mlp_vmap_and_sequential_paths_agree(digits_clean):
    run = digits_clean
    kw = dict(cutoff=1e-2, n_samples=6, sigma=PRIOR_SIGMA, **QUIET)
    fast = estimate(run.model, run.x_test, **kw)
    generic = estimate(Wrapped(run.model), run.x_test, evaluation="vmap", **kw)
    slow = estimate(run.model, run.x_test, use_vmap=False, **kw)
    in_place = estimate(Wrapped(run.model), run.x_test, **kw)  # the CPU default for a generic model
    modes = [r.info["evaluation"] for r in (fast, generic, slow, in_place)]
    assert modes == ["mlp", "vmap", "sequential", "inplace"]
    for other in (generic, slow, in_place):
        torch.testing.assert_close(fast.radii, other.radii, rtol=1e-4, atol=0)
        torch.testing.assert_close(fast.estimates, other.estimates, rtol=0, atol=4810 * 1e-4)


def test_mlp_path_handles_losses_subsets_and_l2(digits_clean):
    run = digits_clean
    ce = torch.nn.functional.cross_entropy
    kw = dict(cutoff=1e-2, n_samples=4, sigma=PRIOR_SIGMA, neighborhood="loss", loss_fn=ce, l2_reg=1e-3, **QUIET)
    fast = estimate(run.model, (run.x_test, run.y_test), **kw)
    generic = estimate(Wrapped(run.model), (run.x_test, run.y_test), evaluation="vmap", **kw)
    in_place = estimate(Wrapped(run.model), (run.x_test, run.y_test), evaluation="inplace", **kw)
    assert [r.info["evaluation"] for r in (fast, generic, in_place)] == ["mlp", "vmap", "inplace"]
    torch.testing.assert_close(fast.radii, generic.radii, rtol=1e-4, atol=0)
    torch.testing.assert_close(fast.radii, in_place.radii, rtol=1e-4, atol=0)
    subset = estimate(run.model, run.x_test, params=["0.weight"], n_samples=2, sigma=PRIOR_SIGMA, **QUIET)
    assert subset.info["evaluation"] == "inplace"  # only whole-MLP perturbations take the factored path


def test_vmap_failure_falls_back_to_sequential():
    class NeedsPlainTensors(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            if float(self.linear.weight.sum()) > 1e9:  # data-dependent Python control flow: vmap refuses
                return x
            return self.linear(x)

    model = NeedsPlainTensors()
    r = estimate(model, torch.randn(8, 4), n_samples=3, sigma=0.5, evaluation="vmap", **QUIET)
    assert r.info["evaluation"] == "sequential"
    assert any("vmap was not usable" in n for n in r.info["notes"])


def test_weights_and_modes_restored_after_success_error_and_interrupt(digits_clean):
    model = digits_clean.model
    model.train()
    model[1].eval()
    snap = _snapshot(model)
    estimate(model, digits_clean.x_test[:50], n_samples=2, sigma=1.0, **QUIET)
    _assert_restored(model, snap)

    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("boom inside the model")

    handle = model[0].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            estimate(model, digits_clean.x_test[:50], n_samples=4, sigma=1.0, use_vmap=False, **QUIET)
    finally:
        handle.remove()
    _assert_restored(model, snap)

    def interrupt(module, args, output):
        with torch.no_grad():
            module.weight.add_(1.0)  # even a model that scribbles on its weights gets them back
        raise KeyboardInterrupt

    handle = model[2].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            estimate(model, digits_clean.x_test[:50], n_samples=2, sigma=1.0, **QUIET)
    finally:
        handle.remove()
    _assert_restored(model, snap)
    model.eval()


def test_parameter_subset_sets_the_dimension(digits_clean):
    run = digits_clean
    kw = dict(n_samples=4, sigma=PRIOR_SIGMA, **QUIET)
    full = estimate(run.model, run.x_test, **kw)
    last = estimate(run.model, run.x_test, params=["2.weight", "2.bias"], **kw)
    biases = estimate(run.model, run.x_test, params=lambda name, p: name.endswith("bias"), **kw)
    assert (full.dim, last.dim, biases.dim) == (4810, 650, 74)
    assert last.log_volume != full.log_volume
    with pytest.raises(ValueError, match="not trainable"):
        estimate(run.model, run.x_test, params=["nope.weight"], **kw)


def test_frozen_parameters_and_buffers_are_not_perturbed():
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    r = estimate(model, torch.randn(20, 5), n_samples=2, sigma=0.3, **QUIET)
    assert r.dim == 6 + 6 + 6 + 18 + 3  # bias0, bn weight+bias, linear2


def test_loss_neighborhood(digits_clean):
    run = digits_clean
    ce = torch.nn.functional.cross_entropy
    r = estimate(run.model, (run.x_test, run.y_test), neighborhood="loss", loss_fn=ce, n_samples=6, cutoff=1e-2,
                 sigma=PRIOR_SIGMA, **QUIET)
    assert math.isfinite(r.log_volume) and r.config["neighborhood"] == "loss"
    with pytest.raises(ValueError, match="targets"):
        estimate(run.model, run.x_test, neighborhood="loss", loss_fn=ce, n_samples=2, **QUIET)
    with pytest.raises(ValueError, match="loss_fn"):
        estimate(run.model, run.x_test, neighborhood="loss", n_samples=2, **QUIET)


def test_adam_and_fisher_preconditioners(digits_clean):
    run = digits_clean
    kw = dict(n_samples=6, sigma=PRIOR_SIGMA, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        adam = estimate(run.model, run.x_test, preconditioner="adam", optimizer=run.optimizer, **kw)
        from_state = estimate(run.model, run.x_test, preconditioner="adam", optimizer=run.optimizer.state_dict(), **kw)
        fisher = estimate(run.model, run.x_test, preconditioner="fisher", fisher_passes=4, **kw)
    assert torch.equal(adam.estimates, from_state.estimates)
    assert adam.info["preconditioner"]["name"] == "adam"
    assert fisher.info["preconditioner"]["backward_passes"] == 4 and fisher.info["preconditioner"]["seconds"] > 0
    other = torch.optim.Adam(torch.nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match="no state"):
        estimate(run.model, run.x_test, preconditioner="adam", optimizer=other, **kw)
    with pytest.raises(ValueError, match="covers"):
        estimate(run.model, run.x_test, preconditioner="adam", optimizer=other.state_dict(), **kw)
    with pytest.raises(ValueError, match="needs optimizer"):
        estimate(run.model, run.x_test, preconditioner="adam", **kw)


@pytest.mark.parametrize("factory", [tiny_gpt_neox, tiny_gpt2], ids=["gpt-neox", "gpt2"])
def test_language_model_padding_never_changes_the_result(factory):
    model = factory()
    ids, mask = token_batch()
    kw = dict(n_samples=3, sigma=0.5, cutoff=1e-3, **QUIET)
    base = estimate(model, {"input_ids": ids, "attention_mask": mask}, **kw)
    other_pads = ids.clone()
    other_pads[mask == 0] = 7
    repadded = estimate(model, {"input_ids": other_pads, "attention_mask": mask}, **kw)
    torch.testing.assert_close(base.estimates, repadded.estimates, rtol=0, atol=0)
    # Left padding: the same real tokens moved to the end of each row.
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        left_ids[r, ids.shape[1] - n :] = ids[r, :n]
        left_mask[r, ids.shape[1] - n :] = 1
    left = estimate(model, {"input_ids": left_ids, "attention_mask": left_mask}, **kw)
    torch.testing.assert_close(base.radii, left.radii, rtol=1e-4, atol=0)
    assert base.status == ["converged"] * 3 and math.isfinite(base.log_volume)


def test_language_model_batch_size_invariance_and_iterables():
    model = tiny_gpt_neox()
    ids, mask = token_batch(rows=4)
    data = {"input_ids": ids, "attention_mask": mask}
    kw = dict(n_samples=4, sigma=0.5, cutoff=1e-3, **QUIET)
    one = estimate(model, data, batch_size=1, **kw)
    four = estimate(model, data, batch_size=4, **kw)
    assert one.status == ["converged"] * 4
    torch.testing.assert_close(one.radii, four.radii, rtol=1e-4, atol=0)
    split = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    chunked = estimate(model, split, **kw)
    torch.testing.assert_close(one.radii, chunked.radii, rtol=1e-4, atol=0)


def test_bad_inputs_are_clear(digits_clean):
    run = digits_clean
    with pytest.raises(ValueError, match="empty"):
        estimate(run.model, run.x_test[:0], n_samples=2, **QUIET)
    with pytest.raises(ValueError, match="empty"):
        estimate(run.model, [], n_samples=2, **QUIET)
    with pytest.raises(ValueError, match="no parameters"):
        estimate(torch.nn.ReLU(), torch.randn(3, 2), n_samples=2, **QUIET)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable floating-point"):
        estimate(frozen, torch.randn(3, 2), n_samples=2, **QUIET)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="cutoff"):
            estimate(run.model, run.x_test, cutoff=bad, n_samples=2, **QUIET)
    with pytest.raises(TypeError, match="data must be"):
        estimate(run.model, 42, n_samples=2, **QUIET)
    with pytest.raises(ValueError, match="neighborhood"):
        estimate(run.model, run.x_test, neighborhood="wasserstein", n_samples=2, **QUIET)


@pytest.mark.gpu
def test_data_on_another_device_is_moved_with_a_note(digits_clean):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    run = digits_clean
    with pytest.warns(UserWarning, match="moved"):
        r = estimate(run.model, run.x_test.cuda(), n_samples=2, sigma=1.0, **QUIET)
    assert any("moved" in n for n in r.info["notes"])


@pytest.mark.parametrize("evaluation", ["inplace", "vmap", "sequential"])
def test_weights_restored_when_a_run_in_place_fails_midway(digits_clean, evaluation):
    model = Wrapped(digits_clean.model)
    snap = _snapshot(model)
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] > 6:  # after a few probes have been written into the weights
            raise KeyboardInterrupt

    handle = model.inner[2].register_forward_hook(explode)
    try:
        with pytest.raises(KeyboardInterrupt):
            estimate(model, digits_clean.x_test[:40], n_samples=5, sigma=1.0, evaluation=evaluation, **QUIET)
    finally:
        handle.remove()
    assert calls["n"] > 6
    _assert_restored(model, snap)
