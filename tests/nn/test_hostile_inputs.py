"""Hostile inputs: each gives a clear error or a documented result, never a hang or a corrupted model.

Covered (issue "hostile input"): NaN/inf in the anchor; a model that returns NaN/inf at some
perturbations; integer or complex parameters; parameters on several devices; cutoffs 1e-12 .. 1e6;
sigma or bounds of the wrong shape; an optimizer state of the wrong shape; an empty dataset;
n_samples = 0; a model that mutates its own weights or buffers in forward.

Every model test runs each evaluation path where it applies - the plain-MLP fast path ("mlp", what
evaluation="vmap" picks for an nn.Sequential of Linear + activations), generic "vmap", "sequential"
and "inplace" - and checks that weights, buffers, parameter identities and train/eval modes are
bit-for-bit what they were, after a result and after an error alike. Every run is bounded (a few
directions, the search's evaluation budget); the worst case (a cost that is NaN everywhere but at the
anchor) also runs in a subprocess with a timeout, so a regression into a hang fails instead of hanging.

Each test names the behavior the issue asks for; the bugs it found were fixed.
"""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import Wrapped, assert_restored, snapshot, tiny_gpt_neox, token_batch

import localvol_fast as lv
from localvol_fast.nn.estimator import estimate

QUIET = {"progress": False}
# vmap over the GPT-NeoX attention falls back to a loop, with a UserWarning per call: noise here.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
CUTOFFS = [1e-12, 1e-9, 1e-6, 1e-3, 1.0, 1e3, 1e6]
# What a direction may end as (core.search.STATUS_NAMES); every status is a documented result.
STATUSES = {"converged", "unbounded", "nonfinite", "jump", "not_converged", "clipped"}


# --------------------------------------------------------------------------------------------------
# models, evaluation paths and the exact-restoration check
# --------------------------------------------------------------------------------------------------
def tiny_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


D_MLP = 4 * 8 + 8 + 8 * 3 + 3  # 67


# (path id, wrap the MLP?, evaluation=, the result's info["evaluation"])
PATHS = [
    ("mlp", False, "vmap", "mlp"),
    ("vmap", True, "vmap", "vmap"),
    ("sequential", True, "sequential", "sequential"),
    ("inplace", True, "inplace", "inplace"),
]
PATH_IDS = [p[0] for p in PATHS]
GENERIC = ["vmap", "sequential", "inplace"]  # the paths a custom nn.Module can take


def mlp_on_path(path: str, seed: int = 0):
    """(model, evaluation, expected mode) for one of PATHS; the model is in a mixed train/eval state."""
    _, wrap, evaluation, mode = next(p for p in PATHS if p[0] == path)
    inner = tiny_mlp(seed)
    model = Wrapped(inner) if wrap else inner
    model.train()
    inner[1].eval()  # mixed modes must come back exactly
    return model, evaluation, mode


def inputs(rows: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed))


def run_recorded(fn):
    """fn() with every warning recorded: (result, [warnings])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, caught


def runtime_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def assert_documented_result(result, dim: int) -> None:
    """A result whose every direction has a documented status and a finite (or -inf) estimate."""
    assert result.dim == dim
    assert set(result.status) <= STATUSES, result.status
    assert not bool(torch.isnan(result.estimates).any())
    assert not bool((result.estimates == math.inf).any())
    assert not math.isnan(result.log_volume)
    assert (result.n_evals >= 1).all() and (result.n_evals <= 64).all()  # bounded by max_evals


# --------------------------------------------------------------------------------------------------
# 1. NaN / inf in the anchor
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", PATH_IDS)
def test_nonfinite_anchor_is_a_clear_error(path, value):
    model, evaluation, _ = mlp_on_path(path)
    inner = model.inner if isinstance(model, Wrapped) else model
    with torch.no_grad():
        inner[0].weight[1, 2] = value  # flat index 1 * 4 + 2 = 6
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"anchor holds NaN/inf values \(first at index 6: -?(nan|inf)\)"):
        estimate(model, inputs(), n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_nonfinite_anchor_of_a_language_model_is_a_clear_error(evaluation):
    model = tiny_gpt_neox()
    with torch.no_grad():
        model.gpt_neox.layers[1].attention.dense.bias[3] = math.nan
    ids, mask = token_batch()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="anchor holds NaN/inf values"):
        estimate(model, {"input_ids": ids, "attention_mask": mask}, n_samples=2, sigma=0.02, evaluation=evaluation,
                 **QUIET)
    assert_restored(model, snap)


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_nonfinite_anchor_of_a_cost_function_is_a_clear_error(value):
    anchor = torch.tensor([1.0, 2.0, value, 3.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"anchor holds NaN/inf values \(first at index 2"):
        lv.estimate_volume(lambda t: (t * t).sum(1), anchor, cutoff=0.1, n_samples=2, sigma=1.0)


def test_nonfinite_anchor_with_the_adam_preconditioner_is_the_anchor_error():
    model = tiny_mlp()
    x = inputs()
    opt = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    snap = snapshot(model)
    with pytest.raises(ValueError, match="anchor holds NaN/inf values"):
        estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=opt, **QUIET)
    assert_restored(model, snap)


@pytest.mark.parametrize("path", PATH_IDS)
def test_nonfinite_anchor_with_the_fisher_preconditioner_is_the_anchor_error(path):
    model, evaluation, _ = mlp_on_path(path)
    inner = model.inner if isinstance(model, Wrapped) else model
    with torch.no_grad():
        inner[0].weight[0, 0] = math.nan
    snap = snapshot(model)
    try:
        with pytest.raises(ValueError, match="anchor holds NaN/inf values"):
            estimate(model, inputs(), n_samples=2, sigma=0.5, preconditioner="fisher", fisher_passes=2,
                     evaluation=evaluation, **QUIET)
    finally:
        assert_restored(model, snap)  # restoration holds either way


def test_nonfinite_inputs_give_a_clear_anchor_cost_error():
    """Not on the issue's list, but the same family: NaN data makes the anchor's own cost NaN."""
    model = Wrapped(tiny_mlp())
    x = inputs()
    x[3, 1] = math.nan
    snap = snapshot(model)
    for evaluation in GENERIC:
        with pytest.raises(ValueError, match=r"fn\(anchor\) = nan"):
            estimate(model, x, n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 2. A model (or cost) that is NaN / inf at some perturbations
# --------------------------------------------------------------------------------------------------
class NonfiniteAway(torch.nn.Module):
    """Logits become ``value`` once the weight has moved more than ``bound`` (max-norm) from its start."""

    def __init__(self, bound: float, value: float):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.bound, self.value = bound, value
        self.register_buffer("start", self.lin.weight.detach().clone())

    def forward(self, x):
        out = self.lin(x)
        away = (self.lin.weight - self.start).abs().max() > self.bound
        return torch.where(away, torch.full_like(out, self.value), out)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("evaluation", GENERIC)
def test_model_nonfinite_at_some_perturbations_gives_nonfinite_statuses(evaluation, value):
    # bound 0.2: about half the directions reach the cutoff first, the others the non-finite region.
    model = NonfiniteAway(0.2, value)
    model.train()
    snap = snapshot(model)
    result, caught = run_recorded(
        lambda: estimate(model, inputs(), n_samples=8, sigma=0.5, evaluation=evaluation, **QUIET)
    )
    assert result.info["evaluation"] == evaluation
    assert set(result.status) == {"nonfinite", "converged"}
    assert bool(torch.isfinite(result.estimates).all()) and math.isfinite(result.log_volume)
    assert bool(torch.isfinite(result.radii).all()) and bool((result.radii > 0).all())
    messages = runtime_warnings(caught)
    assert len(messages) == 1 and "nonfinite" in messages[0]  # one summary warning
    assert_restored(model, snap)


@pytest.mark.parametrize("path", PATH_IDS)
def test_loss_nonfinite_at_some_perturbations_on_every_path(path):
    """The plain-MLP path cannot run a custom module, so there the NaN comes from loss_fn."""
    model, evaluation, mode = mlp_on_path(path)
    x = inputs()
    y = torch.arange(16) % 3
    with torch.no_grad():
        reference = tiny_mlp()(x)

    def loss_fn(outputs, targets):
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        return torch.where((outputs - reference).abs().max() > 0.3, torch.full_like(loss, math.nan), loss)

    snap = snapshot(model)
    result, caught = run_recorded(
        lambda: estimate(model, (x, y), neighborhood="loss", loss_fn=loss_fn, n_samples=6, sigma=0.5, cutoff=0.05,
                         evaluation=evaluation, **QUIET)
    )
    assert result.info["evaluation"] == mode
    assert_documented_result(result, D_MLP)
    assert "nonfinite" in result.status and bool(torch.isfinite(result.estimates).all())
    assert len(runtime_warnings(caught)) == 1
    assert_restored(model, snap)


class RaisesAway(NonfiniteAway):
    def forward(self, x):
        if float((self.lin.weight - self.start).abs().max()) > self.bound:
            raise FloatingPointError("model refuses this perturbation")
        return self.lin(x)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_model_raising_at_some_perturbation_propagates_and_is_restored(evaluation):
    """A model that raises mid-search (after probes were written into it in place) is still restored."""
    model = RaisesAway(0.2, math.nan)
    snap = snapshot(model)
    with pytest.raises(FloatingPointError, match="refuses"):
        estimate(model, inputs(), n_samples=4, sigma=0.5, evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


def test_cost_function_nonfinite_regions_give_documented_statuses():
    anchor = torch.zeros(5, dtype=torch.float64)

    def fn(t):
        c = (t * t).sum(1)
        c = torch.where(t[:, 0] > 0.1, torch.full_like(c, math.nan), c)
        return torch.where(t[:, 1] > 0.1, torch.full_like(c, math.inf), c)

    result, caught = run_recorded(lambda: lv.estimate_volume(fn, anchor, cutoff=1.0, n_samples=16, sigma=1.0))
    assert set(result.status) == {"nonfinite", "converged"}
    assert bool(torch.isfinite(result.estimates).all())
    assert len(runtime_warnings(caught)) == 1


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("measure", ["gaussian", "uniform"])
def test_cost_nonfinite_everywhere_but_the_anchor_is_bounded(measure, value):
    """The worst case for the search: no finite probe ever. It stops at its budget with a tiny radius.

    (The status is "not_converged" and the radius 1e-63 is the budget's artefact; the report suggests
    calling this "nonfinite" with radius 0.)
    """
    anchor = torch.zeros(5, dtype=torch.float64)

    def fn(t):
        moved = (t - anchor).abs().sum(1) > 0
        return torch.where(moved, torch.full((t.shape[0],), value, dtype=torch.float64), torch.zeros(t.shape[0], dtype=torch.float64))

    sigma = 1.0 if measure == "gaussian" else None
    result, caught = run_recorded(lambda: lv.estimate_volume(fn, anchor, cutoff=1e-2, n_samples=3, measure=measure, sigma=sigma))
    assert set(result.status) <= {"not_converged", "nonfinite"}
    assert bool((result.n_evals <= 64).all())
    assert bool((result.radii < 1e-30).all())
    assert not bool(torch.isnan(result.estimates).any()) and result.log_volume < -100
    assert len(runtime_warnings(caught)) == 1


def test_worst_case_models_finish_in_a_subprocess():
    """A model whose outputs are NaN at every perturbation, on every path, under a hard timeout."""
    script = textwrap.dedent(
        """
        import math, warnings, torch
        from localvol_fast.nn.estimator import estimate
        warnings.simplefilter("ignore")

        class NaNAway(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.lin = torch.nn.Linear(4, 3)
                self.register_buffer("start", self.lin.weight.detach().clone())
            def forward(self, x):
                out = self.lin(x)
                return torch.where((self.lin.weight != self.start).any(), torch.full_like(out, math.nan), out)

        x = torch.randn(8, 4)
        for evaluation in ("vmap", "sequential", "inplace"):
            r = estimate(NaNAway(), x, n_samples=4, sigma=0.5, evaluation=evaluation, progress=False)
            assert int(r.n_evals.max()) <= 64 and not bool(torch.isnan(r.estimates).any()), evaluation
        print("done")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "done"


# --------------------------------------------------------------------------------------------------
# 3. Integer and complex parameters
# --------------------------------------------------------------------------------------------------
class OddParameters(torch.nn.Module):
    """A float Linear plus an integer Parameter (necessarily frozen) and a trainable complex one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.count = torch.nn.Parameter(torch.tensor([3, 4]), requires_grad=False)
        self.phase = torch.nn.Parameter(torch.tensor([1 + 1j, 0.5 - 0.25j]))

    def forward(self, x):
        return self.lin(x) * (self.count.sum() / 7) * self.phase.abs().sum()


@pytest.mark.parametrize("evaluation", GENERIC)
def test_integer_and_complex_parameters_are_skipped(evaluation):
    model = OddParameters()
    snap = snapshot(model)
    result = estimate(model, inputs(), n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET)
    assert result.dim == 15 and result.config["parameters"] == ["lin.weight", "lin.bias"]
    assert_documented_result(result, 15)
    assert_restored(model, snap)


def test_skipped_integer_and_complex_parameters_are_noted():
    model = OddParameters()
    result = estimate(model, inputs(), n_samples=2, sigma=0.5, **QUIET)
    notes = " ".join(result.info["notes"])
    assert "phase" in notes and "count" in notes


def test_a_model_with_only_complex_parameters_is_a_clear_error():
    class OnlyComplex(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))

        def forward(self, x):
            return (x.to(torch.complex64) @ self.w).abs()

    model = OnlyComplex()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="no trainable floating-point parameters"):
        estimate(model, inputs(), n_samples=2, sigma=0.5, **QUIET)
    with pytest.raises(ValueError, match=r"params names \['w'\] are not trainable floating-point"):
        estimate(model, inputs(), n_samples=2, sigma=0.5, params=["w"], **QUIET)
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 4. Parameters on several devices
# --------------------------------------------------------------------------------------------------
class SplitDevices(torch.nn.Module):
    """A CPU Linear and one parameter elsewhere (the "meta" device: the only second device a CPU has)."""

    def __init__(self, other="meta", first_elsewhere=False):
        super().__init__()
        torch.manual_seed(0)
        if first_elsewhere:
            self.extra = torch.nn.Parameter(torch.zeros(3, device=other))
            self.lin = torch.nn.Linear(4, 3)
        else:
            self.lin = torch.nn.Linear(4, 3)
            self.extra = torch.nn.Parameter(torch.zeros(3, device=other))

    def forward(self, x):
        return self.lin(x) + self.extra.to(x.device)


@pytest.mark.parametrize("first_elsewhere", [False, True], ids=["cpu-first", "meta-first"])
@pytest.mark.parametrize("evaluation", GENERIC)
def test_parameters_on_several_devices_are_a_clear_error(evaluation, first_elsewhere):
    model = SplitDevices(first_elsewhere=first_elsewhere)
    snap = snapshot(model)
    try:
        with pytest.raises(ValueError, match=r"(?s)device.*extra|extra.*device"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimate(model, inputs(), n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
    finally:
        assert_restored(model, snap)  # the CPU weights are compared bit for bit, the meta one by shape




@pytest.mark.parametrize("first_elsewhere", [False, True], ids=["cpu-first", "meta-first"])
@pytest.mark.parametrize(
    "evaluation",
    ["vmap", "sequential", "inplace"],
)
def test_parameters_on_several_devices_fail_without_corrupting_the_model(evaluation, first_elsewhere):
    """Some error (never a result), and the model exactly as it was: weights, modes and all."""
    model = SplitDevices(first_elsewhere=first_elsewhere)
    snap = snapshot(model)
    with pytest.raises(Exception) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate(model, inputs(), n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
    assert "meta" in str(info.value).lower()
    assert_restored(model, snap)


@pytest.mark.gpu
@pytest.mark.parametrize("evaluation", GENERIC)
def test_parameters_on_cpu_and_cuda_are_an_error_and_restored(evaluation):
    """Real devices (not run on CPU-only machines). torch's own 'Expected all tensors to be on the same
    device' is accepted here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for first_elsewhere in (False, True):
        model = SplitDevices(other="cuda", first_elsewhere=first_elsewhere)
        model.train()
        snap = snapshot(model)
        with pytest.raises((ValueError, RuntimeError), match="device"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimate(model, inputs(), n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
        assert_restored(model, snap)


@pytest.mark.gpu
@pytest.mark.parametrize("evaluation", GENERIC)
def test_parameters_on_two_gpus_are_an_error_and_restored(evaluation):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    model = SplitDevices(other="cuda:1")
    model.lin.to("cuda:0")
    snap = snapshot(model)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        estimate(model, inputs().to("cuda:0"), n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


@pytest.mark.gpu
@pytest.mark.parametrize("evaluation", GENERIC)
def test_device_option_puts_every_parameter_back_on_its_own_device(evaluation):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = SplitDevices(other="cuda")  # lin on the CPU (first), extra on the GPU
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = estimate(model, inputs(), n_samples=2, sigma=0.5, evaluation=evaluation, device="cpu", **QUIET)
    assert_documented_result(result, 15 + 3)
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 5. Cutoffs from 1e-12 to 1e6
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("measure", ["gaussian", "uniform"])
def test_every_cutoff_works_for_a_float64_cost(measure):
    torch.manual_seed(0)
    anchor = torch.randn(20, dtype=torch.float64)
    h = torch.logspace(-2, 2, 20, dtype=torch.float64)

    def fn(thetas):
        return 0.5 * ((thetas - anchor) ** 2 * h).sum(1)

    sigma = 1.0 if measure == "gaussian" else None
    volumes = []
    for cutoff in CUTOFFS:
        result, _ = run_recorded(lambda cutoff=cutoff: lv.estimate_volume(fn, anchor, cutoff=cutoff, n_samples=4,
                                                                          measure=measure, sigma=sigma))
        assert set(result.status) <= {"converged", "unbounded"}, (cutoff, result.status)
        assert math.isfinite(result.log_volume)
        volumes.append(result.log_volume)
    assert volumes == sorted(volumes)
    together, _ = run_recorded(lambda: lv.estimate_volume(fn, anchor, cutoff=CUTOFFS, n_samples=4, measure=measure,
                                                          sigma=sigma))
    assert [r.cutoff for r in together] == CUTOFFS
    for alone, joint in zip(volumes, together):
        assert joint.log_volume == pytest.approx(alone, abs=0.25)  # rtol-level radius differences only


@pytest.mark.parametrize("path", PATH_IDS)
def test_every_cutoff_is_a_documented_result_or_the_clear_anchor_noise_error(path):
    """float32 KL is noisy at the ~1e-8 level: from 1e-6 up every cutoff gives a result (the volume
    growing with the cutoff); below, the clear error that the cutoff is under the cost's rounding noise.
    Never a hang, a NaN or a result built on noise."""
    model, evaluation, mode = mlp_on_path(path)
    snap = snapshot(model)
    volumes = []
    for cutoff in CUTOFFS:
        try:
            result, _ = run_recorded(
                lambda cutoff=cutoff: estimate(model, inputs(), cutoff=cutoff, n_samples=3, sigma=0.5,
                                               evaluation=evaluation, **QUIET)
            )
        except ValueError as error:
            assert cutoff < 1e-6, f"cutoff {cutoff} failed: {error}"
            assert f"cutoff {cutoff!r} is below what this cost resolves" in str(error)
            assert_restored(model, snap)
            continue
        assert result.info["evaluation"] == mode
        assert_documented_result(result, D_MLP)
        assert_restored(model, snap)
        if cutoff >= 1e-6:
            assert set(result.status) <= {"converged", "unbounded"}
            volumes.append(result.log_volume)
    assert len(volumes) == 5 and all(math.isfinite(v) for v in volumes)
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(volumes))  # the volume grows with the cutoff




@pytest.mark.parametrize(
    "path",
    ["mlp", "vmap", "sequential",
     "inplace"],
)
@pytest.mark.parametrize("cutoff", [1e-12, 1e-9])
def test_cutoffs_below_the_float32_noise_are_a_clear_error(path, cutoff):
    model, evaluation, _ = mlp_on_path(path)
    snap = snapshot(model)
    try:
        with pytest.raises(ValueError, match=rf"cutoff {cutoff!r}"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            estimate(model, inputs(), cutoff=cutoff, n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET)
    finally:
        assert_restored(model, snap)


def test_float64_models_reach_tiny_cutoffs_with_the_loss_neighborhood():
    """The loss neighborhood stays in float64 for a float64 model: 1e-12 works on every path. (The KL
    neighborhood caches the anchor's log-probabilities in float32 by design, so it cannot.)"""
    x, y = inputs().double(), torch.arange(16) % 3
    for path in PATH_IDS:
        model, evaluation, mode = mlp_on_path(path)
        model.double()
        snap = snapshot(model)
        for cutoff in (1e-12, 1e6):
            result, _ = run_recorded(
                lambda model=model, cutoff=cutoff, evaluation=evaluation: estimate(
                    model, (x, y), neighborhood="loss", loss_fn=torch.nn.functional.cross_entropy, cutoff=cutoff,
                    n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET)
            )
            assert result.info["evaluation"] == mode
            assert_documented_result(result, D_MLP)
        assert_restored(model, snap)
        with pytest.raises(ValueError, match=r"cutoff 1e-12 is below what this cost resolves"):
            estimate(model, x, cutoff=1e-12, n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
        assert_restored(model, snap)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_extreme_cutoffs_on_a_language_model(evaluation):
    model = tiny_gpt_neox()
    ids, mask = token_batch()
    data = {"input_ids": ids, "attention_mask": mask}
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"cutoff 1e-12 is below what this cost resolves"):
        estimate(model, data, cutoff=1e-12, n_samples=2, sigma=0.02, evaluation=evaluation, **QUIET)
    assert_restored(model, snap)
    result, caught = run_recorded(lambda: estimate(model, data, cutoff=1e6, n_samples=2, sigma=0.02,
                                                   evaluation=evaluation, **QUIET))
    assert result.status == ["unbounded", "unbounded"] and math.isfinite(result.log_volume)
    assert len(runtime_warnings(caught)) == 1
    assert_restored(model, snap)


@pytest.mark.parametrize("cutoff", [0.0, -1e-3, math.inf, math.nan, "small", [], [1e-2, 0.0]])
def test_invalid_cutoffs_are_clear_errors(cutoff):
    model = tiny_mlp()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="cutoff"):
        estimate(model, inputs(), cutoff=cutoff, n_samples=2, sigma=0.5, **QUIET)
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 6. sigma or bounds of the wrong shape
# --------------------------------------------------------------------------------------------------
WRONG_SHAPES = [
    (lambda: torch.full((D_MLP - 1,), 0.5), D_MLP - 1),
    (lambda: torch.full((D_MLP + 1,), 0.5), D_MLP + 1),
    (lambda: torch.full((2, D_MLP), 0.5), 2 * D_MLP),
    (lambda: torch.ones(0), 0),
]


@pytest.mark.parametrize("option, extra", [("sigma", {}), ("bounds", {"measure": "uniform"})])
@pytest.mark.parametrize("make, count", WRONG_SHAPES, ids=["short", "long", "2xD", "empty"])
@pytest.mark.parametrize("path", PATH_IDS)
def test_sigma_or_bounds_of_the_wrong_shape_is_a_clear_error(path, make, count, option, extra):
    model, evaluation, _ = mlp_on_path(path)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"{option} has {count} values but there are {D_MLP} parameters"):
        estimate(model, inputs(), n_samples=2, evaluation=evaluation, **{option: make()}, **extra, **QUIET)
    assert_restored(model, snap)


@pytest.mark.parametrize("path", PATH_IDS)
def test_bad_sigma_and_bounds_values_are_clear_errors(path):
    model, evaluation, _ = mlp_on_path(path)
    snap = snapshot(model)
    x = inputs()
    bad = [
        ({"sigma": -1.0}, "sigma must be a finite positive number, got -1.0"),
        ({"sigma": math.nan}, "sigma must be a finite positive number, got nan"),
        ({"sigma": torch.zeros(D_MLP)}, "sigma must be finite and positive; element 0 is 0.0"),
        ({"measure": "uniform", "bounds": math.inf}, "bounds must be a finite positive number"),
        ({"bounds": 1.0}, "bounds apply to the uniform measure"),
        ({"measure": "uniform", "sigma": 1.0}, "sigma applies to the Gaussian measure"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            estimate(model, x, n_samples=2, evaluation=evaluation, **kwargs, **QUIET)
    assert_restored(model, snap)


def test_sigma_of_shape_d_by_1_is_flattened_like_a_vector():
    """Documented: per-parameter sigma and bounds are flattened in parameter order, whatever their shape."""
    x = inputs()
    sigma = torch.linspace(0.3, 0.7, D_MLP)
    column = estimate(tiny_mlp(), x, n_samples=3, sigma=sigma.reshape(D_MLP, 1), **QUIET)
    vector = estimate(tiny_mlp(), x, n_samples=3, sigma=sigma, **QUIET)
    assert torch.equal(column.estimates, vector.estimates)


@pytest.mark.parametrize("name", ["sigma", "bounds"])
def test_sigma_and_bounds_as_lists_are_accepted_or_named_in_the_error(name):
    model = tiny_mlp()
    kwargs = {"sigma": [0.5] * D_MLP} if name == "sigma" else {"measure": "uniform", "bounds": [1.0] * D_MLP}
    try:
        result = estimate(model, inputs(), n_samples=2, **kwargs, **QUIET)
    except (TypeError, ValueError) as error:
        assert name in str(error)
    else:
        assert_documented_result(result, D_MLP)


@pytest.mark.parametrize("path", PATH_IDS)
def test_anchor_outside_the_box_gives_probability_zero_with_a_note(path):
    model, evaluation, _ = mlp_on_path(path)
    snap = snapshot(model)
    result, caught = run_recorded(
        lambda: estimate(model, inputs(), n_samples=2, measure="uniform", bounds=1e-3, evaluation=evaluation, **QUIET)
    )
    assert result.log_volume == -math.inf
    assert any("outside the box" in n for n in result.info["notes"])
    messages = runtime_warnings(caught)
    assert len(messages) == 1 and "outside the box" in messages[0]
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 7. An optimizer state of the wrong shape
# --------------------------------------------------------------------------------------------------
def trained_with_adam():
    model = tiny_mlp()
    x = inputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model, optimizer, x


@pytest.mark.parametrize("path", PATH_IDS)
def test_optimizer_state_dict_with_a_wrong_size_is_a_clear_error(path):
    base, optimizer, x = trained_with_adam()
    model, evaluation, _ = mlp_on_path(path)
    inner = model.inner if isinstance(model, Wrapped) else model
    inner.load_state_dict(base.state_dict())
    snap = snapshot(model)
    state = copy.deepcopy(optimizer.state_dict())
    state["state"][0]["exp_avg_sq"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"optimizer state for '(inner\.)?0\.weight' has shape \(5,\) but the parameter has \(8, 4\)"):
        estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=state, evaluation=evaluation, **QUIET)
    other = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    other_opt = torch.optim.Adam(other.parameters())
    other(x).sum().backward()
    other_opt.step()
    with pytest.raises(ValueError, match=r"has shape \(9, 4\) but the parameter has \(8, 4\)"):
        estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=other_opt.state_dict(),
                 evaluation=evaluation, **QUIET)
    with pytest.raises(ValueError, match="the optimizer has no state for parameters"):
        estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=other_opt, evaluation=evaluation,
                 **QUIET)
    assert_restored(model, snap)


def test_optimizer_without_adam_moments_or_with_nan_moments_is_a_clear_error():
    model, optimizer, x = trained_with_adam()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    sgd.step()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(trained_with_adam()[0].state_dict())
    snap = snapshot(model)
    with pytest.raises(ValueError, match="has no 'exp_avg_sq'.*momentum_buffer"):
        estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=sgd, **QUIET)
    optimizer.state[model[0].weight]["exp_avg_sq"][0, 0] = math.nan
    with pytest.raises(ValueError, match="moments contain NaN or inf"):
        estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=optimizer, **QUIET)
    with pytest.raises(ValueError, match=rf"preconditioner has 5 values but D = {D_MLP}"):
        estimate(model, x, n_samples=2, sigma=0.5, preconditioner=torch.ones(5), **QUIET)
    assert_restored(model, snap)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_live_optimizer_with_a_wrong_size_state_names_the_parameter(evaluation):
    model, optimizer, x = trained_with_adam()
    optimizer.state[model[0].weight]["exp_avg_sq"] = torch.ones(5)
    snap = snapshot(model)
    try:
        with pytest.raises(ValueError, match=r"(?s)optimizer.*(0\.weight|\(8, 4\))"):
            estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=optimizer,
                     evaluation=evaluation, **QUIET)
    finally:
        assert_restored(model, snap)


@pytest.mark.parametrize("source", ["state_dict", "live"])
def test_transposed_optimizer_state_is_a_clear_error(source):
    model, optimizer, x = trained_with_adam()
    snap = snapshot(model)
    if source == "live":
        state = optimizer.state[model[0].weight]
        state["exp_avg_sq"] = state["exp_avg_sq"].t().contiguous()
        opt = optimizer
    else:
        opt = copy.deepcopy(optimizer.state_dict())
        opt["state"][0]["exp_avg_sq"] = opt["state"][0]["exp_avg_sq"].t().contiguous()
    try:
        with pytest.raises(ValueError, match=r"\(4, 8\).*\(8, 4\)"):
            estimate(model, x, n_samples=2, sigma=0.5, preconditioner="adam", optimizer=opt, **QUIET)
    finally:
        assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 8. An empty dataset
# --------------------------------------------------------------------------------------------------
def _empty_datasets():
    x = inputs()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0]), batch_size=4)
    return {
        "tensor": (x[:0], {}),
        "list": ([], {}),
        "list-of-empty": ([x[:0], x[:0]], {}),
        "dataloader": (loader, {}),
        "generator": ((b for b in []), {}),
        "pair": ((x[:0], torch.zeros(0, dtype=torch.long)),
                 {"neighborhood": "loss", "loss_fn": torch.nn.functional.cross_entropy}),
    }


@pytest.mark.parametrize("kind", list(_empty_datasets()))
@pytest.mark.parametrize("path", PATH_IDS)
def test_empty_dataset_is_a_clear_error(path, kind):
    model, evaluation, _ = mlp_on_path(path)
    data, extra = _empty_datasets()[kind]
    snap = snapshot(model)
    with pytest.raises(ValueError, match="the evaluation data is empty"):
        estimate(model, data, n_samples=2, sigma=0.5, evaluation=evaluation, **extra, **QUIET)
    assert_restored(model, snap)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_empty_or_fully_masked_token_batches_are_clear_errors(evaluation):
    model = tiny_gpt_neox()
    ids, mask = token_batch()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="the evaluation data is empty"):
        estimate(model, {"input_ids": ids[:0], "attention_mask": mask[:0]}, n_samples=2, sigma=0.02,
                 evaluation=evaluation, **QUIET)
    with pytest.raises(ValueError, match="no unmasked position"):
        estimate(model, {"input_ids": ids, "attention_mask": torch.zeros_like(mask)}, n_samples=2, sigma=0.02,
                 evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 9. n_samples = 0 (and other non-counts)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_samples", [0, -1, 2.0, True, None, "3"])
@pytest.mark.parametrize("path", PATH_IDS)
def test_n_samples_that_is_not_a_positive_count_is_a_clear_error(path, n_samples):
    model, evaluation, _ = mlp_on_path(path)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"n_samples must be a positive integer .*got {n_samples!r}"):
        estimate(model, inputs(), n_samples=n_samples, sigma=0.5, evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


def test_n_samples_zero_for_cost_functions_and_language_models():
    anchor = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_samples must be a positive integer .*got 0"):
        lv.estimate_volume(lambda t: ((t - anchor) ** 2).sum(1), anchor, cutoff=0.1, n_samples=0, sigma=1.0)
    model = tiny_gpt_neox()
    ids, mask = token_batch()
    snap = snapshot(model)
    for evaluation in GENERIC:
        with pytest.raises(ValueError, match="n_samples must be a positive integer .*got 0"):
            estimate(model, {"input_ids": ids, "attention_mask": mask}, n_samples=0, sigma=0.02,
                     evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# 10. Models that mutate their own weights or buffers in forward
# --------------------------------------------------------------------------------------------------
class BumpsWeightAfter(torch.nn.Module):
    """Adds 0.01 to its own weight after computing its output (a rogue "online update")."""

    def __init__(self, mutate: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.mutate = mutate

    def forward(self, x):
        out = self.lin(x)
        if self.mutate:
            with torch.no_grad():
                self.lin.weight.add_(0.01)
        return out


class CountsCalls(torch.nn.Module):
    """Increments an integer buffer and keeps a running mean buffer of its outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(3))

    def forward(self, x):
        self.calls += 1
        out = self.lin(x)
        if not torch._C._functorch.is_batchedtensor(out):  # a running mean cannot be updated under vmap
            self.running.mul_(0.9).add_(0.1 * out.detach().mean(0))
        return out


class ForcedBatchNorm(torch.nn.Module):
    """Puts its BatchNorm back in training mode in forward: batch statistics and running-stat updates."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn, self.out = torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)

    def forward(self, x):
        self.bn.train()
        return self.out(torch.tanh(self.bn(self.lin(x))))


class DriftingScale(torch.nn.Module):
    """Its output depends on how often it was called: a buffer multiplied by 1.01 per call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        self.scale.mul_(1.01)
        return self.lin(x) * self.scale


MUTATORS = [BumpsWeightAfter, CountsCalls, ForcedBatchNorm, DriftingScale]


@pytest.mark.parametrize("evaluation", GENERIC)
@pytest.mark.parametrize("factory", MUTATORS, ids=[m.__name__ for m in MUTATORS])
def test_self_mutating_models_give_a_result_and_are_restored(factory, evaluation):
    model = factory()
    model.train()
    snap = snapshot(model)
    result, caught = run_recorded(lambda: estimate(model, inputs(), n_samples=4, sigma=0.5, evaluation=evaluation,
                                                   **QUIET))
    assert_documented_result(result, sum(p.numel() for p in model.parameters()))
    assert bool(torch.isfinite(result.estimates).all()) and math.isfinite(result.log_volume)
    assert len(runtime_warnings(caught)) <= 1
    if factory is ForcedBatchNorm and evaluation == "vmap":  # vmap refuses in-place running stats
        assert result.info["evaluation"] == "sequential"
        assert any("vmap was not usable" in n for n in result.info["notes"])
    assert_restored(model, snap)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_self_mutating_language_model_is_restored(evaluation):
    model = tiny_gpt_neox()
    model.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def count(module, args, kwargs):
        module.calls += 1

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    ids, mask = token_batch()
    snap = snapshot(model)
    try:
        result, _ = run_recorded(lambda: estimate(model, {"input_ids": ids, "attention_mask": mask}, cutoff=1e-4,
                                                  n_samples=2, sigma=0.02, evaluation=evaluation, **QUIET))
    finally:
        handle.remove()
    assert_documented_result(result, sum(p.numel() for p in model.parameters()))
    assert_restored(model, snap)


# A model that changes its weight *after* computing its output has the same outputs as one that does
# not, at every point: the estimate must be the same on every path.


@pytest.mark.parametrize(
    "evaluation, batches",
    [
        ("vmap", 1),
        ("sequential", 1),
        ("inplace", 1),
        ("vmap", 2),
        ("sequential", 2),
        ("inplace", 2),
    ],
)
def test_a_weight_update_after_the_output_does_not_change_the_estimate(evaluation, batches):
    x = inputs()
    data = x if batches == 1 else [x[:8], x[8:]]
    kw = dict(n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET)
    mutating, honest = BumpsWeightAfter(), BumpsWeightAfter(mutate=False)
    snap = snapshot(mutating)
    got = estimate(mutating, data, **kw)
    want = estimate(honest, data, **kw)
    assert_restored(mutating, snap)
    torch.testing.assert_close(got.estimates, want.estimates, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.radii, want.radii, rtol=1e-9, atol=0)


def _hooked_mlp(kind: str, path: str):
    model, evaluation, mode = mlp_on_path(path)
    inner = model.inner if isinstance(model, Wrapped) else model
    if kind == "rescales-output":
        inner[2].register_forward_hook(lambda module, args, output: output * 3)
    else:  # "bumps-weight": a hook that updates the first layer's weight after it ran

        def bump(module, args, output):
            with torch.no_grad():
                module.weight.add_(0.01)

        inner[0].register_forward_hook(bump)
    return model, evaluation, mode


@pytest.mark.parametrize("kind", ["rescales-output", "bumps-weight"])
@pytest.mark.parametrize("path", PATH_IDS)
def test_plain_mlp_with_forward_hooks_is_restored(path, kind):
    model, evaluation, _mode = _hooked_mlp(kind, path)
    snap = snapshot(model)
    result, _ = run_recorded(lambda: estimate(model, inputs(), n_samples=3, sigma=0.5, evaluation=evaluation, **QUIET))
    assert_documented_result(result, D_MLP)
    assert_restored(model, snap)




@pytest.mark.parametrize(
    "kind, path",
    [
        ("rescales-output", "mlp"),
        ("bumps-weight", "mlp"),
        ("rescales-output", "sequential"),
        ("bumps-weight", "sequential"),
    ],
)
def test_forward_hooks_count_on_every_path(kind, path):
    """The hooked MLP must give the in-place path's result (which runs the model, hooks and all, and
    writes every probe from its anchor copy)."""
    model, evaluation, mode = _hooked_mlp(kind, path)
    kw = dict(n_samples=3, sigma=0.5, **QUIET)
    got, _ = run_recorded(lambda: estimate(model, inputs(), evaluation=evaluation, **kw))
    reference, _ = run_recorded(lambda: estimate(_hooked_mlp(kind, "inplace")[0], inputs(), evaluation="inplace", **kw))
    # The factored MLP path never calls the modules, so a hooked MLP goes the generic (vmap) way.
    assert got.info["evaluation"] == ("vmap" if mode == "mlp" else mode)
    torch.testing.assert_close(got.estimates, reference.estimates, rtol=0, atol=1e-3)
