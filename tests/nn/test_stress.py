"""Property-based stress test of ``estimate`` over model structures and argument values (issue 14).

Two invariants, whatever hypothesis draws:
- the model comes back bit-identical (values, dtypes, devices, requires_grad, Parameter identity and
  sharing, buffers, grads, modes: ``conftest.assert_restored``);
- the call gives a documented result when every drawn option is valid, and a ValueError/TypeError that
  names one of the invalid options when any is not - never an internal error, never a silent result.
The number of examples is bounded (CI runs it), each example a tiny model and a few directions.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from conftest import assert_restored, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localvol_fast import STATUS_NAMES
from localvol_fast.nn.estimator import estimate

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

EXAMPLES = 60  # bounded: CI runs this file


@dataclass
class Drawn:
    """One drawn call: the model, its data, the keyword arguments, and the words an error must contain
    (one per invalid choice; empty when every choice is valid)."""

    model: torch.nn.Module
    data: object
    kwargs: dict
    invalid: list[str] = field(default_factory=list)


class Scaled(torch.nn.Module):
    """A module with a 0-d parameter and a buffer."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.scale = torch.nn.Parameter(torch.tensor(1.25))
        self.register_buffer("offset", torch.tensor(0.1))

    def forward(self, x):
        return self.inner(x) * self.scale + self.offset


def option(draw, valid, invalid, words: str, allow_invalid: bool):
    """A valid value, or (rarely, when allowed) an invalid one whose error must name ``words``."""
    if allow_invalid and draw(st.integers(0, 11)) == 0:
        return draw(st.sampled_from(invalid)), [words]
    return draw(st.sampled_from(valid)), []


@st.composite
def models(draw, allow_invalid: bool):
    """A small MLP in a mixed train/eval state, possibly with a shared layer, a transposed (non-contiguous)
    weight, a frozen parameter, a 0-d parameter and a buffer, float32 or float64. Returns (model, invalid)."""
    torch.manual_seed(draw(st.integers(0, 1000)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    width = draw(st.integers(2, 5))
    one_class = allow_invalid and draw(st.integers(0, 11)) == 0  # invalid for the KL neighborhood
    classes = 1 if one_class else draw(st.integers(2, 4))
    layers = [torch.nn.Linear(3, width), torch.nn.Tanh()]
    if draw(st.booleans()):  # the same module twice: tied weights
        shared = torch.nn.Linear(width, width)
        layers += [shared, torch.nn.GELU(), shared, torch.nn.Tanh()]
    layers.append(torch.nn.Linear(width, classes))
    model = torch.nn.Sequential(*layers)
    if draw(st.booleans()):
        model = Scaled(model)
    model = model.to(dtype)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    if draw(st.booleans()):  # a transposed weight: same values, non-contiguous memory
        first.weight = torch.nn.Parameter(first.weight.detach().t().contiguous().t())
    if draw(st.booleans()):
        first.bias.requires_grad_(False)
    model.train(draw(st.booleans()))
    first.train(draw(st.booleans()))
    invalid = ["class"] if classes == 1 else []
    return model, invalid


@st.composite
def calls(draw, allow_invalid: bool) -> Drawn:
    model, invalid = draw(models(allow_invalid))
    dtype = next(model.parameters()).dtype
    x = torch.randn(draw(st.integers(1, 6)), 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if allow_invalid and draw(st.integers(0, 11)) == 0:
        x[draw(st.integers(0, x.shape[0] - 1)), 1] = draw(st.sampled_from([math.nan, math.inf]))
        invalid.append("position")
    kwargs = {"progress": False}
    choices = [
        ("cutoff", [1e-3, 1e-2, 0.5, [1e-2, 1e-1]], [0.0, -1.0, math.nan, math.inf, "0.01", []], "cutoff"),
        ("n_samples", [1, 3, 5], [0, -2, 2.5, True, "3"], "n_samples"),
        ("seed", [0, 7, 2**64 - 1], [-1, 2**64, 1.7, "1"], "seed"),
        ("rtol", [1e-2, 0.1], [0.0, 1.0, math.nan], "rtol"),
        ("evaluation", ["auto", "vmap", "sequential", "inplace"], ["fast", None], "evaluation"),
        ("preconditioner", [None, "fisher"], ["newton", 3], "preconditioner"),
        ("measure", ["gaussian", "uniform"], ["cauchy"], "measure"),
        ("l2_reg", [0.0, 0.3], [-1.0, math.nan, math.inf], "l2_reg"),
        ("batch_size", [None, 1, 4], [0, 1.5], "batch_size"),
    ]
    for name, valid, bad, words in choices:
        value, errors = option(draw, valid, bad, words, allow_invalid)
        kwargs[name] = value
        invalid += errors
    if kwargs["measure"] == "gaussian":
        kwargs["sigma"], errors = option(draw, [None, 0.5, 3.0], [0.0, -1.0, 1e-300, 1e300, math.nan], "sigma", allow_invalid)
        invalid += errors
    return Drawn(model, x, kwargs, invalid)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls(allow_invalid=True))
def test_the_model_comes_back_and_the_answer_is_a_result_or_a_clear_error(drawn):
    check_invariants(drawn)


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls(allow_invalid=False))
def test_every_valid_call_gives_a_result_and_the_model_comes_back(drawn):
    """Only valid choices: the structures themselves (shared layers, transposed weights, 0-d parameters,
    buffers, frozen parameters, float64) must all be estimable on every evaluation path."""
    check_invariants(drawn)


def check_invariants(drawn: Drawn) -> None:
    before = snapshot(drawn.model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = estimate(drawn.model, drawn.data, **drawn.kwargs)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert drawn.invalid, f"a valid call {drawn.kwargs} raised {type(error).__name__}: {message}"
        assert any(word in message for word in drawn.invalid), (
            f"the error does not name what is wrong ({drawn.invalid}): {type(error).__name__}: {message}"
        )
    else:
        assert not drawn.invalid, f"invalid choices {drawn.invalid} gave a result instead of an error"
        results = result if isinstance(result, list) else [result]
        dim = sum(p.numel() for p in drawn.model.parameters() if p.requires_grad)
        for r in results:
            assert r.n_samples == drawn.kwargs["n_samples"] and r.dim == dim
            assert set(r.status) <= set(STATUS_NAMES)
            assert not bool(torch.isnan(r.estimates).any())
            assert not math.isnan(r.log_volume)
    finally:
        assert_restored(drawn.model, before)
