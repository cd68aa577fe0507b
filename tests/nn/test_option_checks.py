"""Every option of ``estimate`` / ``estimate_volume`` is checked where it enters, before any work.

Issue 14, part 5: type, range and finiteness, with the value and what to do in the message; a bad
option never costs a forward pass (a counting model proves it) and never touches the model (weights,
modes and device come back bit for bit). Also the evaluation data: DataLoader(TensorDataset(x)),
masks of the wrong shape, NaN/inf inputs (the same error on every evaluation path) and token ids
outside the vocabulary.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from conftest import Wrapped, assert_restored, snapshot, tiny_gpt_neox, token_batch
from torch.utils.data import DataLoader, TensorDataset

from localvol_fast.core import checks
from localvol_fast.core.checks import (
    check_cutoffs, check_device, check_integer, check_number, check_positive_vector, check_sample_count, check_seed,
)
from localvol_fast.core.measures import SCALE_LIMITS, check_measure
from localvol_fast.engine.estimator import estimate_volume
from localvol_fast.nn.data import check_token_ids, prepare_batches
from localvol_fast.nn.estimator import estimate

QUIET = {"progress": False}
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def tiny_mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


D_MLP = 4 * 8 + 8 + 8 * 3 + 3


def inputs(rows: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed))


class Counting(Wrapped):
    """A wrapped MLP that counts its forward passes: a checked option must leave the count at 0."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def refused_before_any_work(error, match, **options):
    """estimate(...) with ``options`` raises ``error`` matching ``match``, with no forward pass and the model as it was."""
    model = Counting(tiny_mlp())
    snap = snapshot(model)
    kwargs = {"n_samples": 2, "sigma": 0.5, "evaluation": "sequential", **QUIET, **options}
    with pytest.raises(error, match=match):
        estimate(model, inputs(), **kwargs)
    assert model.calls == 0, "the option was checked only after the model ran"
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# the checks themselves
# --------------------------------------------------------------------------------------------------
def test_check_number_takes_python_numpy_and_0d_tensor_numbers():
    for value in (0.5, 1, np.float32(0.5), np.int64(2), torch.tensor(0.5), torch.tensor(3), np.array(0.25)):
        assert check_number(value, "x", minimum=0) == pytest.approx(float(value))
    with pytest.raises(TypeError, match=r"x must be a number, got True \(bool\)"):
        check_number(True, "x")
    with pytest.raises(TypeError, match=r"x must be a number, got .1. \(str\)"):
        check_number("1", "x")
    with pytest.raises(TypeError, match="x must be a number"):
        check_number(torch.ones(2), "x")
    with pytest.raises(ValueError, match="x must be a finite number"):
        check_number(math.inf, "x")


def test_check_number_range_inclusive_and_exclusive():
    assert check_number(0.0, "x", minimum=0) == 0.0
    with pytest.raises(ValueError, match=r"x must be > 0, got 0.0"):
        check_number(0.0, "x", minimum=0, inclusive=False)
    with pytest.raises(ValueError, match=r"x must be >= 0 and <= 1, got 2"):
        check_number(2, "x", minimum=0, maximum=1)
    with pytest.raises(ValueError, match=r"; do this"):
        check_number(-1, "x", minimum=0, hint="do this")


def test_check_integer_maximum_and_type_names():
    assert check_integer(np.int32(4), "k") == 4
    with pytest.raises(ValueError, match=r"k must be at most 3, got 4"):
        check_integer(4, "k", maximum=3)
    with pytest.raises(ValueError, match=r"k must be a positive integer, got 1.5 \(float\)"):
        check_integer(1.5, "k")


@pytest.mark.parametrize("seed", [1.7, 1.0, "1", True, -1, 2**64, None])
def test_seeds_that_are_not_integers_in_range_are_refused(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\).*pass an int"):
        check_seed(seed)


def test_seed_numpy_integer_is_the_same_seed():
    assert check_seed(np.int64(3)) == 3 and check_seed(torch.tensor(3)) == 3


def test_n_samples_beyond_what_memory_holds_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"n_samples=1000000000000 is more directions than a run can hold"):
        check_sample_count(10**12)
    monkeypatch.setattr(checks, "_physical_memory_bytes", lambda: None)  # an OS that does not say
    assert check_sample_count(10**6) == 10**6
    with pytest.raises(ValueError, match="more directions than a run can hold"):
        check_sample_count(checks.MAX_SAMPLES)
    monkeypatch.setattr(checks, "_physical_memory_bytes", lambda: 2**20)  # a 1 MiB machine
    assert check_sample_count(2**20 // checks.BYTES_PER_DIRECTION) > 0
    with pytest.raises(ValueError, match=r"GiB and this machine has"):
        check_sample_count(2**20 // checks.BYTES_PER_DIRECTION + 1)
    with pytest.raises(ValueError, match="more directions"):  # each cutoff keeps its own records
        check_sample_count(2**20 // checks.BYTES_PER_DIRECTION, n_cutoffs=2)


def test_cutoff_as_0d_tensor_numpy_scalar_and_1d_arrays():
    assert check_cutoffs(torch.tensor(1e-2, dtype=torch.float64)) == [1e-2]
    assert check_cutoffs(np.float64(1e-2)) == [1e-2]
    assert check_cutoffs(np.array([1e-2, 1e-1])) == [1e-2, 1e-1]
    assert check_cutoffs(torch.tensor([1e-2, 1e-1], dtype=torch.float64)) == [1e-2, 1e-1]
    for bad in ("0.01", True, torch.ones(2, 2)):
        with pytest.raises(TypeError, match="cutoff must be a positive number"):
            check_cutoffs(bad)


def test_check_device():
    assert check_device(None) is None
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'nope' is not a torch device; use e.g. 'cpu'"):
        check_device("nope")
    with pytest.raises(ValueError, match="device 'meta' holds no data"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            check_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("name", ["sigma", "bounds"])
@pytest.mark.parametrize("value", [1e-300, 1e300, 1e-151, 1e151])
def test_sigma_and_bounds_whose_squares_leave_float64_are_refused(name, value):
    measure = "gaussian" if name == "sigma" else "uniform"
    with pytest.raises(ValueError, match=rf"{name} must lie in \[1e-150, 1e\+150\].*normal float64.*got {re.escape(repr(value))}"):
        check_measure(measure, 5, **{name: value})
    vector = torch.ones(5, dtype=torch.float64)
    vector[3] = value
    with pytest.raises(ValueError, match=rf"{name} must lie in .*element 3 is {re.escape(repr(value))}"):
        check_measure(measure, 5, **{name: vector})


def test_the_limits_of_the_usable_scale_range_are_accepted():
    lo, hi = SCALE_LIMITS
    assert check_positive_vector(lo, 3, "sigma", limits=SCALE_LIMITS) == (lo, None)
    assert check_positive_vector(hi, 3, "sigma", limits=SCALE_LIMITS) == (hi, None)
    assert 1.0 / lo**2 < math.inf and hi**2 < math.inf  # why these limits: the squares stay finite
    with pytest.raises(TypeError, match="sigma must be a positive number"):
        check_positive_vector(True, 3, "sigma")


# --------------------------------------------------------------------------------------------------
# estimate: every option refused at entry, before any forward pass
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"l2_reg": -1.0}, ValueError, r"l2_reg must be >= 0 .*got -1.0"),
        ({"l2_reg": math.nan}, ValueError, r"l2_reg must be a finite number .*got nan"),
        ({"l2_reg": math.inf}, ValueError, r"l2_reg must be a finite number .*got inf"),
        ({"l2_reg": "0.1"}, TypeError, r"l2_reg must be a number"),
        ({"memory_budget": "1GB"}, TypeError, r"memory_budget must be a number .*'1GB'.*2\*\*30 for 1 GiB"),
        ({"memory_budget": 0}, ValueError, r"memory_budget must be > 0"),
        ({"memory_budget": -5.0}, ValueError, r"memory_budget must be > 0"),
        ({"memory_budget": math.nan}, ValueError, r"memory_budget must be a finite number"),
        ({"data_batch_size": 0}, ValueError, r"data_batch_size must be a positive integer .*got 0"),
        ({"data_batch_size": 2.5}, ValueError, r"data_batch_size must be a positive integer"),
        ({"fisher_passes": 0}, ValueError, r"fisher_passes must be a positive integer"),
        ({"fisher_passes": 2.0}, ValueError, r"fisher_passes must be a positive integer"),
        ({"preconditioner_exponent": 0}, ValueError, r"preconditioner_exponent must be > 0"),
        ({"preconditioner_exponent": math.nan}, ValueError, r"preconditioner_exponent must be a finite number"),
        ({"preconditioner_eps": -1e-3}, ValueError, r"preconditioner_eps must be >= 0"),
        ({"preconditioner_eps": math.inf}, ValueError, r"preconditioner_eps must be a finite number"),
        ({"device": "nope"}, ValueError, r"device 'nope' is not a torch device"),
        ({"device": "meta"}, ValueError, r"device 'meta' holds no data"),
        ({"seed": 1.7}, ValueError, r"seed must be an integer .*got 1.7 \(float\)"),
        ({"seed": "1"}, ValueError, r"seed must be an integer .*got '1' \(str\)"),
        ({"cutoff": "0.01"}, TypeError, r"cutoff must be a positive number"),
        ({"sigma": 1e-300}, ValueError, r"sigma must lie in \[1e-150, 1e\+150\]"),
        ({"sigma": 1e300}, ValueError, r"sigma must lie in \[1e-150, 1e\+150\]"),
        ({"measure": "uniform", "sigma": None, "bounds": 1e-300}, ValueError, r"bounds must lie in"),
        ({"measure": "uniform", "sigma": None, "bounds": 1e300}, ValueError, r"bounds must lie in"),
        ({"measure": "normal"}, ValueError, r"measure must be 'gaussian' or 'uniform'"),
        ({"preconditioner": np.ones(D_MLP)}, TypeError, r"torch.Tensor, got ndarray; convert .*torch.as_tensor"),
        ({"preconditioner": [1.0] * D_MLP}, TypeError, r"torch.Tensor, got list"),
        ({"preconditioner": "adm"}, ValueError, r"preconditioner must be one of \('adam', 'fisher'.*\), got 'adm'"),
        ({"preconditioner": torch.ones(5)}, ValueError, rf"preconditioner has 5 values but D = {D_MLP}"),
        ({"preconditioner": "adam"}, ValueError, r"needs optimizer="),
        ({"preconditioner": "adam", "optimizer": [1]}, TypeError, r"optimizer must be a torch Adam/AdamW"),
        ({"preconditioner": "adam", "optimizer": {"x": 1}}, TypeError, r"got a dict with keys \['x'\]"),
        ({"optimizer": {"state": {}, "param_groups": []}}, ValueError, r"optimizer= is used by preconditioner='adam'"),
        ({"use_vmap": "no"}, TypeError, r"use_vmap must be True or False"),
        ({"progress": "yes"}, TypeError, r"progress must be True or False"),
        ({"resume": 2}, TypeError, r"resume must be True or False"),
        ({"output": 3}, TypeError, r"output must be None or a file path"),
        ({"batch_size": 0}, ValueError, r"batch_size must be a positive integer"),
        ({"evaluation": "fast"}, ValueError, r"evaluation must be one of"),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, dict) else "",
)
def test_bad_options_are_refused_before_any_forward_pass(options, error, match):
    refused_before_any_work(error, match, **options)


def test_n_samples_that_cannot_be_held_is_refused_before_any_work():
    """Before: seconds of work, then a bare MemoryError. Run in a process with 4 GiB of address space,
    so that a regression fails with MemoryError instead of exhausting this machine."""
    script = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        import torch
        from localvol_fast.nn.estimator import estimate
        calls = []
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        model.register_forward_hook(lambda *args: calls.append(1))
        try:
            estimate(model, torch.randn(8, 4), n_samples=10**12, sigma=0.5, progress=False)
        except ValueError as error:
            print("refused:", error, "forward passes:", len(calls))
        """
    )
    pytest.importorskip("resource")  # POSIX only
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert "refused: n_samples=1000000000000 is more directions than a run can hold" in done.stdout, done.stderr[-2000:]
    assert "forward passes: 0" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_before_any_work():
    refused_before_any_work(ValueError, r"device 'cuda': CUDA is not available on this machine", device="cuda")


def test_valid_edge_options_still_run():
    """The checks refuse only what is wrong: numpy/0-d tensor numbers, l2_reg=0, a memory budget in bytes."""
    model = tiny_mlp()
    base = estimate(model, inputs(), n_samples=3, sigma=0.5, **QUIET)
    same = estimate(
        model, inputs(), n_samples=np.int64(3), sigma=np.float64(0.5), seed=np.int64(0), l2_reg=np.float32(0),
        memory_budget=2**30, data_batch_size=np.int64(4096), preconditioner_eps=0, **QUIET,
    )
    assert torch.equal(base.estimates, same.estimates)


def test_cutoff_as_0d_tensor_gives_one_result():
    model = tiny_mlp()
    value = torch.tensor(1e-2, dtype=torch.float64)
    as_tensor = estimate(model, inputs(), cutoff=value, n_samples=3, sigma=0.5, **QUIET)
    as_float = estimate(model, inputs(), cutoff=1e-2, n_samples=3, sigma=0.5, **QUIET)
    assert not isinstance(as_tensor, list) and torch.equal(as_tensor.estimates, as_float.estimates)
    several = estimate(model, inputs(), cutoff=np.array([1e-2, 1e-1]), n_samples=3, sigma=0.5, **QUIET)
    assert isinstance(several, list) and len(several) == 2


def test_estimate_volume_checks_its_own_options():
    anchor = torch.zeros(6, dtype=torch.float64)
    cost = lambda th: (th**2).sum(1)  # noqa: E731
    run = {"cutoff": 1e-2, "n_samples": 2, "sigma": 1.0}
    for options, error, match in [
        ({"max_evals": 0}, ValueError, r"max_evals must be a positive integer .*got 0"),
        ({"initial_radius": math.inf}, ValueError, r"initial_radius must be a finite number"),
        ({"initial_radius": 0}, ValueError, r"initial_radius must be > 0"),
        ({"initial_radius": "1"}, TypeError, r"initial_radius must be a number"),
        ({"preconditioner": np.ones(6)}, TypeError, r"torch.Tensor of positive values, got ndarray"),
        ({"cutoff": torch.tensor(1e-2), "sigma": 1e300}, ValueError, r"sigma must lie in"),
    ]:
        with pytest.raises(error, match=match):
            estimate_volume(cost, anchor, **{**run, **options})
    result = estimate_volume(cost, anchor, **{**run, "initial_radius": np.float32(0.5)})
    assert result.n_samples == 2


# --------------------------------------------------------------------------------------------------
# evaluation data
# --------------------------------------------------------------------------------------------------
def test_a_dataloader_of_a_tensordataset_of_inputs_is_accepted():
    x = inputs(16)
    model = tiny_mlp()
    from_loader = estimate(model, DataLoader(TensorDataset(x), batch_size=8), n_samples=3, sigma=0.5, **QUIET)
    from_list = estimate(model, [x[:8], x[8:]], n_samples=3, sigma=0.5, **QUIET)
    assert torch.equal(from_loader.estimates, from_list.estimates)
    batches, _ = prepare_batches(DataLoader(TensorDataset(x), batch_size=8), "cpu")
    assert [b.n_rows for b in batches] == [8, 8] and batches[0].targets is None


def test_a_dataloader_of_inputs_and_targets_still_gives_pairs():
    x, y = inputs(8), torch.zeros(8, dtype=torch.long)
    batches, _ = prepare_batches(DataLoader(TensorDataset(x, y), batch_size=4), "cpu")
    assert len(batches) == 2 and torch.equal(batches[0].targets, y[:4])


def test_attention_mask_of_the_wrong_shape_names_both_shapes():
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but input_ids has shape \(2, 5\)"):
        prepare_batches({"input_ids": ids, "attention_mask": torch.ones(2, 4, dtype=torch.long)}, "cpu")
    with pytest.raises(TypeError, match="input_ids must be a torch tensor of token ids, got list"):
        prepare_batches({"input_ids": [[1, 2]]}, "cpu")


def test_attention_mask_of_the_wrong_shape_through_estimate():
    model = tiny_gpt_neox()
    ids, mask = token_batch()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 9\) but input_ids has shape \(3, 10\)"):
        estimate(model, {"input_ids": ids, "attention_mask": mask[:, :9]}, n_samples=2, sigma=0.02, **QUIET)
    assert_restored(model, snap)


NONFINITE_PATHS = [("mlp", False, "vmap"), ("vmap", True, "vmap"), ("sequential", True, "sequential"),
                   ("inplace", True, "inplace")]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path, wrap, evaluation", NONFINITE_PATHS, ids=[p[0] for p in NONFINITE_PATHS])
def test_nonfinite_inputs_are_the_same_error_on_every_path(path, wrap, evaluation, value):
    """Before: an inf input gave -9,791 nats on the plain-MLP fast path and -94 on the generic one."""
    model = Wrapped(tiny_mlp()) if wrap else tiny_mlp()
    snap = snapshot(model)
    x = inputs()
    x[3, 1] = value
    message = rf"the evaluation data holds {value!r} in batch 0 \(input 0\), row 3, position \(3, 1\)"
    with pytest.raises(ValueError, match=message):
        estimate(model, x, n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
    with pytest.raises(ValueError, match=r"holds nan in batch 1 \(input 0\), row 2, position \(2, 0\)"):
        later = inputs(8)
        later[2, 0] = math.nan
        estimate(model, [inputs(8), later], n_samples=2, sigma=0.5, evaluation=evaluation, **QUIET)
    assert_restored(model, snap)


def test_nonfinite_inputs_are_refused_before_any_forward_pass():
    x = inputs()
    x[0, 0] = math.inf
    model = Counting(tiny_mlp())
    with pytest.raises(ValueError, match="the evaluation data holds inf"):
        estimate(model, (x, torch.zeros(16, dtype=torch.long)), n_samples=2, sigma=0.5, **QUIET)
    assert model.calls == 0


class Embedded(torch.nn.Module):
    """A token model that says its vocabulary the Hugging Face way (and counts forward passes)."""

    def __init__(self, vocab: int = 10, via_config: bool = False):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, 4), torch.nn.Linear(4, vocab)
        self.via_config, self.calls = via_config, 0
        if via_config:
            self.config = types.SimpleNamespace(vocab_size=vocab)

    def get_input_embeddings(self):
        if self.via_config:
            raise NotImplementedError
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.head(self.embed(input_ids))


@pytest.mark.parametrize("via_config", [False, True], ids=["embedding", "config"])
@pytest.mark.parametrize("bad", [10, 99, -1])
def test_token_ids_outside_the_vocabulary_are_refused_before_any_forward_pass(bad, via_config):
    model = Embedded(vocab=10, via_config=via_config)
    ids = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0))
    ids[1, 2] = bad
    snap = snapshot(model)
    message = rf"token id {bad} in batch 0 at position \(1, 2\) is outside the model's vocabulary of 10 \(ids 0..9"
    with pytest.raises(ValueError, match=message):
        estimate(model, {"input_ids": ids}, n_samples=2, sigma=0.5, evaluation="sequential", **QUIET)
    assert model.calls == 0
    assert_restored(model, snap)


def test_token_ids_inside_the_vocabulary_run():
    model = Embedded(vocab=10)
    ids = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0))
    result = estimate(model, {"input_ids": ids}, n_samples=2, sigma=0.5, evaluation="sequential", **QUIET)
    assert result.n_samples == 2 and model.calls > 0


def test_token_ids_of_a_hugging_face_model_are_checked_against_its_vocabulary():
    model = tiny_gpt_neox()  # vocab_size 61
    ids, mask = token_batch()
    ids[2, 4] = 61
    with pytest.raises(ValueError, match=r"token id 61 in batch 0 at position \(2, 4\) .*vocabulary of 61"):
        estimate(model, {"input_ids": ids, "attention_mask": mask}, n_samples=2, sigma=0.02, **QUIET)
    batches, _ = prepare_batches(ids, "cpu")  # a raw tensor of ids is checked as well
    with pytest.raises(ValueError, match="token id 61"):
        check_token_ids(batches, 61)


def test_input_ids_without_tokens_are_refused():
    with pytest.raises(ValueError, match=r"input_ids of shape \(2, 0\) hold no tokens"):
        prepare_batches({"input_ids": torch.ones(2, 0, dtype=torch.long)}, "cpu")
