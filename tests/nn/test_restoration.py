"""The model is always given back exactly (issue 14, "Reliability", part 1).

Values bit for bit, dtypes, devices, memory and strides, requires_grad, Parameter objects in every
module slot (tied weights stay one object), buffers, grads and train/eval modes - after a result, an
exception, KeyboardInterrupt and SIGTERM, on every evaluation path: the plain-MLP fast path ("mlp"),
generic "vmap", "sequential" and "inplace". Shared modules, tied weights, transposed, expanded and 0-d
parameters give a correct result (equal to an equivalent model without the quirk) or a clear error;
the meta device is refused before anything is moved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import Wrapped, assert_restored, snapshot

from localvol_fast.nn.estimator import estimate
from localvol_fast.nn.preservation import Terminated, preserved_model

QUIET = {"progress": False}
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
PATHS = ["mlp", "vmap", "sequential", "inplace"]  # "mlp": an unwrapped Sequential with evaluation="vmap"
GENERIC = ["vmap", "sequential", "inplace"]


def inputs(rows: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed))


def on_path(sequential: torch.nn.Sequential, path: str):
    """(model, evaluation): the plain Sequential for "mlp", else wrapped (so the generic paths run it)."""
    if path == "mlp":
        return sequential, "vmap"
    return Wrapped(sequential), path


def run(model, evaluation, data=None, **kw):
    kw = {"n_samples": 3, "sigma": 0.5, "evaluation": evaluation, **QUIET, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate(model, inputs() if data is None else data, **kw)


def expected_mode(path: str) -> str:
    return "mlp" if path == "mlp" else path


# --------------------------------------------------------------------------------------------------
# Shared modules and tied weights
# --------------------------------------------------------------------------------------------------
def shared_sequential() -> torch.nn.Sequential:
    """The user's report: the same nn.Linear twice in one Sequential."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(4, 4)
    return torch.nn.Sequential(lin, torch.nn.Tanh(), lin)


class CallsTwice(torch.nn.Module):
    """The same function without a shared module: one Linear called twice (the reference)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("path", PATHS)
def test_a_module_used_twice_gives_the_reference_result_and_is_restored(path):
    model, evaluation = on_path(shared_sequential(), path)
    inner = model if path == "mlp" else model.inner
    weight = inner[0].weight
    snap = snapshot(model)
    got = run(model, evaluation)
    assert got.info["evaluation"] == expected_mode(path)
    assert_restored(model, snap)
    assert inner[0].weight is weight and inner[2].weight is weight and weight.requires_grad
    reference = run(CallsTwice(), "inplace")  # the model's own weights, hooks and all: the plain truth
    assert got.dim == reference.dim == 20
    torch.testing.assert_close(got.estimates, reference.estimates, rtol=1e-5, atol=1e-4)
    # The model still works (no escaped functional tensors in it).
    inner(inputs()).sum().backward()
    assert weight.grad is not None


class TiedPair(torch.nn.Module):
    """Two Linear modules holding one weight Parameter (as an embedding tied to an output layer)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class TiedByHand(torch.nn.Module):
    """TiedPair's function with its parameters in the same order, nothing shared (the reference)."""

    def __init__(self, tied: TiedPair):
        super().__init__()
        self.w = torch.nn.Parameter(tied.a.weight.detach().clone())
        self.b1 = torch.nn.Parameter(tied.a.bias.detach().clone())
        self.b2 = torch.nn.Parameter(tied.b.bias.detach().clone())

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, self.w, self.b1)), self.w, self.b2)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_a_weight_tied_between_two_modules_is_perturbed_in_both(evaluation):
    model = TiedPair()
    snap = snapshot(model)
    got = run(model, evaluation)
    assert_restored(model, snap)
    assert model.a.weight is model.b.weight
    reference = run(TiedByHand(TiedPair()), evaluation)
    torch.testing.assert_close(got.estimates, reference.estimates, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Exceptions, KeyboardInterrupt and SIGTERM on every path (raised from loss_fn, which every path calls)
# --------------------------------------------------------------------------------------------------
def tiny_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def failing_loss(after: int, fail):
    """cross entropy that calls ``fail()`` from its ``after``-th call on (the anchor's call is the first)."""
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        if len(calls) > after:
            fail()
        return torch.nn.functional.cross_entropy(outputs, targets)

    return loss_fn


def _raise(error):
    def fail():
        raise error

    return fail


@pytest.mark.parametrize("error", [FloatingPointError("boom"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize("shared", [False, True], ids=["mlp-model", "shared-module"])
@pytest.mark.parametrize("path", PATHS)
def test_an_error_or_interrupt_mid_run_leaves_the_model_exactly_as_it_was(path, shared, error):
    model, evaluation = on_path(shared_sequential() if shared else tiny_mlp(), path)
    model.train()
    with torch.no_grad():  # a grad on one parameter, none on the others: both must come back
        next(model.parameters()).grad = torch.full_like(next(model.parameters()), 0.5)
    snap = snapshot(model)
    y = torch.arange(16) % 4 if shared else torch.arange(16) % 3
    with pytest.raises(type(error)):
        run(model, evaluation, data=(inputs(), y), neighborhood="loss", loss_fn=failing_loss(2, _raise(error)))
    assert_restored(model, snap)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_with_a_handler_of_the_users_keeps_that_handler():
    """Only the default action (death without cleanup) is replaced; the user's own handler still runs."""
    received = []

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        model = tiny_mlp()
        snap = snapshot(model)
        kill = failing_loss(2, lambda: os.kill(os.getpid(), signal.SIGTERM) if not received else None)
        result = run(model, "vmap", data=(inputs(), torch.arange(16) % 3), neighborhood="loss", loss_fn=kill)
        assert received == [signal.SIGTERM] and result.dim == 67
        assert signal.getsignal(signal.SIGTERM) is handler
        assert_restored(model, snap)
    finally:
        signal.signal(signal.SIGTERM, previous)


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, warnings
    sys.path.insert(0, sys.argv[1])
    import torch
    from conftest import Wrapped, assert_restored, snapshot
    from localvol_fast.nn.estimator import estimate
    from localvol_fast.nn.preservation import Terminated
    warnings.simplefilter("ignore")

    def model_on(path):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 4)
        seq = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
        return (seq, "vmap") if path == "mlp" else (Wrapped(seq), path)

    def killing_loss():
        calls = []
        def loss_fn(outputs, targets):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return torch.nn.functional.cross_entropy(outputs, targets)
        return loss_fn

    def run(path):
        model, evaluation = model_on(path)
        model.train()
        snap = snapshot(model)
        data = (torch.randn(16, 4), torch.arange(16) % 4)
        try:
            estimate(model, data, neighborhood="loss", loss_fn=killing_loss(), n_samples=3, sigma=0.5,
                     evaluation=evaluation, progress=False)
        finally:
            assert_restored(model, snap)
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            print("restored", path, flush=True)

    for path in ["mlp", "vmap", "sequential", "inplace"]:
        try:
            run(path)
        except Terminated as stop:
            assert stop.code == 143, stop.code
    run("inplace")  # uncaught: the process must still end as a SIGTERM'd process would (status 143)
    print("not reached", flush=True)
    """
)


def test_sigterm_restores_the_model_on_every_path_then_still_ends_the_process():
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, tests], capture_output=True, text=True, timeout=300)
    lines = done.stdout.split()
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stdout.count("restored") == 5 and "not reached" not in done.stdout, (lines, done.stderr[-3000:])


def test_terminated_is_a_system_exit_with_the_sigterm_status():
    assert issubclass(Terminated, SystemExit) and Terminated().code == 128 + signal.SIGTERM


# --------------------------------------------------------------------------------------------------
# preserved_model itself: whatever the run did to the model's slots and tensors is undone
# --------------------------------------------------------------------------------------------------
class WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("stat", torch.arange(3.0))

    def forward(self, x):
        return self.lin(x) + self.stat


def test_objects_left_in_the_slots_by_a_failed_call_are_replaced_by_the_originals():
    model = WithBuffer()
    model.lin.weight.grad = torch.ones_like(model.lin.weight)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="mid-run"), preserved_model(model):
        model.lin._parameters["weight"] = torch.zeros(3, 4)  # what an escaped functional tensor looks like
        model.lin._parameters["extra"] = torch.nn.Parameter(torch.ones(2))
        del model.lin._parameters["bias"]
        model._buffers["stat"] = torch.full((3,), -1.0)
        raise RuntimeError("mid-run")
    assert_restored(model, snap)


def test_cast_frozen_and_regraded_tensors_come_back_with_their_own_memory():
    model = WithBuffer()
    model.train()
    snap = snapshot(model)
    with preserved_model(model):
        model.double()  # new memory, another dtype, for parameters (in .data) and buffers (new objects)
        model.lin.bias.requires_grad_(False)
        model.lin.weight.grad = torch.ones_like(model.lin.weight)
        with torch.no_grad():
            model.stat.add_(1)
    assert_restored(model, snap)


def test_negative_zero_and_nan_payloads_come_back_bit_for_bit():
    model = WithBuffer()
    with torch.no_grad():
        model.lin.bias[0] = -0.0
        model.stat.view(torch.int32)[1] = 0x7FC00123  # a NaN with a payload
    snap = snapshot(model)
    with preserved_model(model), torch.no_grad():
        model.lin.bias[0] = 0.0  # equal to -0.0 by value, not by bits
        model.stat[1] = float("nan")
    assert_restored(model, snap)


# --------------------------------------------------------------------------------------------------
# Devices that cannot run: refused before anything is moved
# --------------------------------------------------------------------------------------------------
class CountsForwards(torch.nn.Module):
    def __init__(self, device=None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3, device=device)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


@pytest.mark.parametrize("path", PATHS)
def test_device_meta_is_refused_before_the_model_is_moved(path):
    if path == "mlp":
        torch.manual_seed(0)
        model, evaluation = torch.nn.Sequential(torch.nn.Linear(4, 3)), "vmap"
    else:
        model, evaluation = CountsForwards(), path
    snap = snapshot(model)
    # estimate's own option check or preserved_model's, whichever comes first: both name meta, before any move.
    with pytest.raises(ValueError, match=r"meta.*(no data|no values)"):
        run(model, evaluation, device="meta")
    assert_restored(model, snap)
    assert getattr(model, "calls", 0) == 0
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_preserved_model_refuses_meta_before_moving_anything():
    model = WithBuffer()
    snap = snapshot(model)
    entered = []
    with pytest.raises(ValueError, match=r"device='meta' cannot run a model.*real device"):
        with preserved_model(model, device="meta"):
            entered.append(1)
    assert not entered
    assert_restored(model, snap)


@pytest.mark.parametrize("evaluation", GENERIC)
def test_a_model_already_on_meta_is_refused_by_name(evaluation):
    model = CountsForwards(device="meta")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"meta device.*lin\.weight, lin\.bias.*materialize"):
        run(model, evaluation)
    assert_restored(model, snap)
    assert model.calls == 0


# --------------------------------------------------------------------------------------------------
# Transposed (non-contiguous), expanded (stride 0) and 0-d parameters
# --------------------------------------------------------------------------------------------------
def transposed(sequential: torch.nn.Sequential) -> torch.nn.Sequential:
    """The same values with every weight stored transposed (non-contiguous)."""
    for m in sequential:
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.t().contiguous().t()
            assert not m.weight.is_contiguous()
    return sequential


@pytest.mark.parametrize("path", PATHS)
def test_transposed_parameters_give_the_contiguous_models_result(path):
    model, evaluation = on_path(transposed(tiny_mlp()), path)
    snap = snapshot(model)
    got = run(model, evaluation)
    assert got.info["evaluation"] == expected_mode(path)
    assert_restored(model, snap)  # strides included
    reference_model, _ = on_path(tiny_mlp(), path)
    reference = run(reference_model, evaluation)
    torch.testing.assert_close(got.estimates, reference.estimates, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.radii, reference.radii, rtol=1e-5, atol=1e-6)


def test_inplace_writes_transposed_parameters_through_their_strides():
    """Bit-identical probes: the scratch is copied into p through p's own strides, element for element."""
    got, reference = run(Wrapped(transposed(tiny_mlp())), "inplace"), run(Wrapped(tiny_mlp()), "inplace")
    torch.testing.assert_close(got.estimates, reference.estimates, rtol=1e-6, atol=1e-5)
    assert got.n_evals.tolist() == reference.n_evals.tolist()


@pytest.mark.parametrize("path", PATHS)
def test_an_expanded_parameter_is_a_clear_error_before_the_model_is_touched(path):
    sequential = tiny_mlp()
    sequential[2].bias = torch.nn.Parameter(torch.zeros(1).expand(3))
    model, evaluation = on_path(sequential, path)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'(inner\.)?2\.bias' is an expanded view \(shape \(3,\), strides \(0,\)\)"):
        run(model, evaluation)
    assert_restored(model, snap)
    # Leaving it out works.
    names = [n for n, _ in model.named_parameters() if not n.endswith("2.bias")]
    assert run(model, evaluation, params=names).dim == 67 - 3
    assert_restored(model, snap)


class Scaled(torch.nn.Module):
    """A Linear times a learned scalar: a 0-d parameter (or, as the reference, a (1,)-shaped one)."""

    def __init__(self, zero_d: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.scale = torch.nn.Parameter(torch.tensor(1.5) if zero_d else torch.tensor([1.5]))

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize("evaluation", GENERIC)
def test_a_0d_parameter_gives_the_result_of_its_1_element_twin(evaluation):
    model = Scaled()
    snap = snapshot(model)
    got = run(model, evaluation)
    assert got.info["evaluation"] == evaluation and got.dim == 16
    assert_restored(model, snap)
    reference = run(Scaled(zero_d=False), evaluation)
    torch.testing.assert_close(got.estimates, reference.estimates, rtol=1e-6, atol=1e-5)
