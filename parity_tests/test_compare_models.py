"""The whole-model harness on outputs that are not one tensor."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.parity import LayerDiff, ModelReport, compare_models
from jaxbn.port import ops


class TwoHeads(NamedTuple):
    logits: Any
    aux: Any


class TorchNet(torch.nn.Module):
    """Like GoogLeNet: a namedtuple with an auxiliary head in training, a tensor in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4)
        self.fc = torch.nn.Linear(4, 3)
        self.aux = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.bn(x)
        if self.training:
            return TwoHeads(self.fc(h), {"scores": self.aux(h), "none": None})
        return self.fc(h)


class FlaxNet(nn.Module):
    aux_scale: float = 1.0  # != 1: a wrong auxiliary head

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Any:
        h = jaxbn.BatchNorm1d(name="bn")(x, use_running_average=not train)
        logits = nn.Dense(3, name="fc")(h)
        if train:
            aux = nn.Dense(2, name="aux")(h) * self.aux_scale
            return TwoHeads(logits, {"scores": aux, "none": None})
        return logits


def run(train: bool, aux_scale: float = 1.0, **options: Any) -> ModelReport:
    torch.manual_seed(0)
    model = TorchNet()
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    return compare_models(
        model,
        FlaxNet(aux_scale),
        jaxbn.from_torch(model),
        x,
        train=train,
        flax_kwargs={"train": train},
        gradients=True,
        **options,
    )


@pytest.mark.parametrize("train", [True, False])
def test_every_leaf_of_a_pytree_output_is_compared(train):
    report = run(train)
    assert report.ok, report.table()
    outputs = {row.quantity for row in report.rows if row.layer == ""}
    expected = {"output.logits", "output.aux['scores']"} if train else {"output"}
    assert outputs == expected
    grads = {(row.layer, row.quantity) for row in report.rows if row.quantity.startswith("grad")}
    assert ("aux", "grad weight") in grads if train else ("fc", "grad weight") in grads


def test_a_wrong_auxiliary_output_is_the_first_divergence():
    report = run(train=True, aux_scale=1.5)
    first = report.first_divergence
    assert first is not None
    assert (first.layer, first.quantity) == ("", "output.aux['scores']")


def test_a_leaf_the_flax_model_lacks_fails():
    class Lacking(FlaxNet):
        def __call__(self, x: jax.Array, train: bool) -> Any:
            out = super().__call__(x, train)
            return TwoHeads(out.logits, {"none": None}) if train else out

    torch.manual_seed(0)
    model = TorchNet()
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    report = compare_models(
        model, Lacking(), jaxbn.from_torch(model), x, train=True, flax_kwargs={"train": True}
    )
    assert not report.ok
    assert any(
        row.quantity == "output.aux['scores']" and row.detail == "missing on the Flax side"
        for row in report.rows
    )


def test_a_float64_reference_measures_against_torchs_own_error():
    """reference='float64': each row has torch float32's own distance from float64, and the
    bar is a multiple of it, so an error of 1e-4 that a fixed rtol of 1e-4 lets through fails."""
    report = run(train=True, reference="float64", rtol=0.0, atol=0.0)
    assert report.ok, report.table()
    floats = [row for row in report.rows if row.quantity != "num_batches_tracked"]
    assert all(row.torch_max_abs is not None for row in floats)
    assert "torch's own" in report.table().splitlines()[0]
    assert "8x torch's own float32 error (vs float64)" in report.summary()

    slightly_wrong = 1 + 1e-4
    assert run(train=True, aux_scale=slightly_wrong).ok  # within the fixed rtol=atol=1e-4
    report = run(train=True, aux_scale=slightly_wrong, reference="float64", rtol=0.0, atol=0.0)
    first = report.first_divergence
    assert first is not None
    assert (first.layer, first.quantity) == ("", "output.aux['scores']")
    assert first.torch_max_abs is not None
    assert first.max_abs > 100 * first.torch_max_abs
    assert "torch's own" in report.summary()


def test_a_float64_reference_leaves_the_torch_model_in_its_dtype():
    torch.manual_seed(0)
    model = TorchNet()
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    variables = jaxbn.from_torch(model)
    compare_models(
        model, FlaxNet(), variables, x, flax_kwargs={"train": False}, reference="float64"
    )
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_an_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="reference must be 'same' or 'float64', got 'f64'"):
        run(train=False, reference="f64")


class KinkedTorch(torch.nn.Module):
    """fc1's first output is ``at`` for every sample: an activation input at its kink."""

    def __init__(self, at: float, act: torch.nn.Module) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 4)
        self.act = act
        self.fc2 = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.fc1.weight[0] = 0.0
            self.fc1.bias[0] = at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OtherSide(nn.Module):
    """The activation, with the first sample's first input moved to ``to`` (its
    gradient unchanged): jax on the other side of the kink, as rounding can put it."""

    to: float
    low: float = 0.0
    high: float = np.inf
    extra_axis: bool = False  # a wrong output shape (undone by the caller)

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = h.at[0, 0].add(jax.lax.stop_gradient(self.to - h[0, 0]))
        y = ops.hardtanh(h, self.low, self.high)  # the port's, torch's gradient at a tie
        return y[..., None] if self.extra_axis else y


class KinkedFlax(nn.Module):
    act: OtherSide
    fc2_scale: float = 1.0  # != 1: a wrong output, a port error besides the kink

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = self.act(nn.Dense(4, name="fc1")(x))  # named "act", as its field
        return nn.Dense(3, name="fc2")(h.reshape(x.shape[0], 4)) * self.fc2_scale


def kinked(
    at: float, act: OtherSide, torch_act: torch.nn.Module | None = None, fc2_scale: float = 1.0
) -> ModelReport:
    torch.manual_seed(0)
    model = KinkedTorch(at, torch_act or torch.nn.ReLU(inplace=True))
    x = 3 * np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    return compare_models(
        model, KinkedFlax(act, fc2_scale), jaxbn.from_torch(model), x, train=True,
        flax_kwargs={"train": True}, gradients=True, reference="float64", rtol=0.0, atol=0.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("at", "to"), [(1e-9, -1e-9), (-1e-9, 1e-9)], ids=["jax stops it", "jax passes it"]
)
def test_a_gradient_that_hinges_on_a_kink_within_rounding_follows_jaxs_side(at, to):
    """A ReLU (in place) input of 1e-9 that jax sees on the other side of 0 changes fc1's
    gradient by 1 relative to float64; a float64 run on jax's side agrees, and the report
    says so."""
    report = kinked(at, OtherSide(to))
    assert report.ok, report.table()
    assert report.kinks == ("act: 1 element",)
    assert "jax's side of the kink" in report.summary()
    grad = next(r for r in report.rows if (r.layer, r.quantity) == ("fc1", "grad weight"))
    assert grad.torch_max_abs is not None
    assert grad.max_abs <= 8 * grad.torch_max_abs + 1e-6 * grad.scale


def test_a_bound_float32_cannot_hold_is_read_in_each_runs_own_dtype():
    """Hardtanh(-1, 0.7): jax clips at float32(0.7), float64 at 0.7. The clipped elements
    are on the same side in both; only the real flip, at -1, is followed."""
    below = float(np.nextafter(np.float32(-1), np.float32(0)))
    act = OtherSide(-1.0000001, low=-1.0, high=0.7)
    report = kinked(below, act, torch.nn.Hardtanh(-1.0, 0.7))
    assert report.ok, report.table()
    assert report.kinks == ("act: 1 element",)


@pytest.mark.parametrize(
    ("at", "act"),
    [(1.0, OtherSide(-1.0)), (1e-9, OtherSide(-1e-9, extra_axis=True))],
    ids=["beyond rounding", "wrong shape"],
)
def test_a_flip_that_is_a_port_error_is_a_divergence(at, act):
    """The same flip at an input of 1 (not rounding), or at 1e-9 from an activation of the
    wrong shape (no crash): nothing is followed, and the activation is the first divergence."""
    report = kinked(at, act)
    assert not report.ok
    assert report.kinks == ()
    first = report.first_divergence
    assert first is not None
    assert (first.layer, first.quantity) == ("act", "output")


def test_a_port_error_besides_a_followed_kink_still_fails_and_says_both():
    report = kinked(1e-9, OtherSide(-1e-9), fc2_scale=1.001)
    assert not report.ok
    assert report.kinks == ("act: 1 element",)
    summary = report.summary()
    assert summary.startswith("first divergence at <output> (output)"), summary
    assert summary.endswith("within float32 rounding of it (act: 1 element)"), summary


class CastsToFloat32(torch.nn.Module):
    """A float32 constant made in forward (RAFT's coordinate grid, from integers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        grid = torch.arange(x.shape[-1]).float()
        return self.conv(x) @ grid[:, None]  # (a float64/float32 matmul raises)


def test_a_model_that_casts_to_float32_has_a_float64_reference():
    """In the reference run `.float()` casts to float64: torch refused the float64/float32
    mix, and a float32 constant would have been no reference."""
    model = CastsToFloat32()
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    ported = jaxbn.port(model, x)
    report = compare_models(
        model, ported.module, ported.variables, x, reference="float64", rtol=2e-6, atol=0.0
    )
    assert report.ok, report.table()
    assert torch.Tensor.float is not torch.Tensor.double  # restored


class Twice(torch.nn.Module):
    """One ReLU called twice, as ResNet's blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(4, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.relu(self.conv2(self.relu(self.conv1(x)))))


def test_rows_follow_torchs_execution_order_and_small_batchnorms_are_named():
    """A module's second call is listed where it ran, not beside its first; a BatchNorm
    that normalised few values per channel in training is on the report."""
    model = Twice()
    x = np.random.default_rng(0).standard_normal((2, 3, 1, 1)).astype(np.float32)
    ported = jaxbn.port(model, torch.from_numpy(x))
    report = compare_models(
        model, ported.module, ported.variables, x, train=True, flax_kwargs={"train": True}
    )
    outputs = [(row.layer, row.quantity) for row in report.rows if row.quantity.startswith("out")]
    assert outputs == [
        ("conv1", "output"),
        ("relu", "output"),
        ("conv2", "output"),
        ("relu", "output (call 2)"),
        ("bn", "output"),
        ("", "output"),
    ]
    assert report.few_values == (("bn", 2),)


def test_a_first_divergence_at_a_small_batchnorm_suggests_a_larger_input():
    rows = (
        LayerDiff("conv", "output", (2, 4), 1e-7, 1e-7, True),
        LayerDiff("bn", "output", (2, 4), 1e-1, 1e-1, False),
    )
    report = ModelReport(rows, (), (), 1e-6, 0.0, few_values=(("bn", 2),))
    assert report.summary().endswith(
        "; bn normalises only 2 values per channel in this training step, where float32 "
        "rounding grows: try a larger input (batch or spatial size)"
    )
    before = ModelReport(rows[::-1], (), (), 1e-6, 0.0, few_values=(("conv", 2),))
    assert "values per channel" not in before.summary()  # conv runs after the divergence
    after = ModelReport(rows, (), (), 1e-6, 0.0, few_values=(("conv", 3),))
    assert after.summary().endswith("; conv normalises only 3 values per channel in this "
                                    "training step, where float32 rounding grows: try a "
                                    "larger input (batch or spatial size)")  # fmt: skip
    gradient = (*rows[:1], LayerDiff("conv", "grad weight", (4,), 1e-1, 1e-1, False))
    behind = ModelReport(gradient, (), (), 1e-6, 0.0, few_values=(("bn", 5), ("conv", 2)))
    assert "; conv normalises only 2 values per channel" in behind.summary()
