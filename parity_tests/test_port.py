"""jaxbn.port on small modules: each op against torch, the train flag, errors, the CLI.

The whole torchvision/timm models are in test_port_models.py.
"""

from __future__ import annotations

import copy
import functools
import pathlib
import re
import sys
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import stochastic_depth

import jaxbn
from jaxbn._torch import to_numpy
from jaxbn.convert import load_variables
from jaxbn.port import PortError, TrainAware, without_dropout

from .helpers import (
    assert_close,
    assert_sample_matches,
    fast_lane,
    jaxbn_here,
    readme_sample,
    run,
)


def run_both(model: torch.nn.Module, x: np.ndarray, *, train: bool = False, **options):
    """(torch output, jax output, jax batch_stats updates) of one call."""
    ported = jaxbn.port(model, torch.from_numpy(x), **options)
    model.train(train)
    with torch.no_grad():
        desired = model(torch.from_numpy(x))
    if train:
        actual, updates = ported.module.apply(
            ported.variables, x, train=True, mutable=["batch_stats"]
        )
    else:
        actual, updates = ported.module.apply(ported.variables, x, train=False), {}
    return desired, actual, updates


class Fn(torch.nn.Module):
    """``fn(x)`` as a module, so that FX records its ops."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# Odd and even sizes where floor and ceil pooling differ (10 = 2*3.5+3, 13).
X = np.random.default_rng(0).standard_normal((2, 3, 10, 13)).astype(np.float32)

POOLS = {
    "max k3 s2 ceil": torch.nn.MaxPool2d(3, 2, ceil_mode=True),
    "max k3 s2 p1": torch.nn.MaxPool2d(3, 2, 1),
    "max k2 floor odd": torch.nn.MaxPool2d(2),
    "max k3 s1 p1 ceil": torch.nn.MaxPool2d(3, 1, 1, ceil_mode=True),
    "max dilation 2": torch.nn.MaxPool2d(3, 1, 1, dilation=2),
    "avg k3 s2 p1": torch.nn.AvgPool2d(3, 2, 1),
    "avg exclude pad": torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    "avg ceil": torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True),
    "avg ceil exclude pad": torch.nn.AvgPool2d(2, 2, 1, ceil_mode=True, count_include_pad=False),
    "avg divisor": torch.nn.AvgPool2d(3, 2, divisor_override=2),
    "adaptive avg 1": torch.nn.AdaptiveAvgPool2d(1),
    "adaptive avg 4x5 (uneven)": torch.nn.AdaptiveAvgPool2d((4, 5)),
    "adaptive avg (None, 2)": torch.nn.AdaptiveAvgPool2d((None, 2)),
    "adaptive max 3": torch.nn.AdaptiveMaxPool2d(3),
    "F.max_pool2d ceil": Fn(lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True)),
    "F.avg_pool2d": Fn(lambda x: F.avg_pool2d(x, kernel_size=5, stride=3)),
    "F.adaptive_avg_pool2d": Fn(lambda x: F.adaptive_avg_pool2d(x, (4, 4))),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pooling_matches_torch(name):
    desired, actual, _ = run_both(POOLS[name], X)
    assert_close(actual, desired, what=name)


OPS = {
    "chunk uneven": lambda x: torch.cat([x.chunk(2, dim=3)[0][..., :6], x.chunk(2, 3)[1] * 2], 1),
    "split sections": lambda x: torch.split(x, [1, 2], dim=1)[1],
    "channel shuffle": lambda x: (
        torch.transpose(x.view(2, 3, 1, 10, 13), 1, 2).contiguous().view(2, -1, 10, 13)
    ),
    "flatten view mean": lambda x: x.flatten(1).view(x.size(0), -1, 13).mean(-1, keepdim=True),
    "activations": lambda x: (
        F.hardswish(x)
        + F.hardsigmoid(x)
        + F.relu6(x * 4)
        + F.silu(x)
        + F.gelu(x)
        + F.gelu(x, approximate="tanh")
        + F.mish(x)
        + F.leaky_relu(x, 0.2)
        + F.elu(x)
    ),
    "pad reflect": lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"),
    "pad crop": lambda x: F.pad(x, (-1, 2, 0, -3), value=0.5),
    "softmax sum": lambda x: torch.softmax(x, dim=1).sum(dim=(2, 3)),
    "permute unsqueeze": lambda x: x.permute(0, 2, 3, 1).unsqueeze(1).squeeze(1),
}


@pytest.mark.parametrize("name", list(OPS))
def test_tensor_ops_match_torch(name):
    desired, actual, _ = run_both(Fn(OPS[name]), X)
    assert_close(actual, desired, what=name)


def input_gradients(model: torch.nn.Module, x: np.ndarray) -> tuple[jax.Array, torch.Tensor]:
    """The gradient of ``sum(model(x) * g)`` with respect to ``x``, from the port and from
    torch (eval; ``g`` random)."""
    ported = jaxbn.port(model, torch.from_numpy(x))
    x_t = torch.from_numpy(x).requires_grad_()
    y = model.eval()(x_t * 1.0)  # (* 1.0: an in-place op must not touch x_t)
    g = np.random.default_rng(1).standard_normal(tuple(y.shape)).astype(np.float32)
    y.backward(torch.from_numpy(g))

    def loss(x: jax.Array) -> jax.Array:
        y = cast(jax.Array, ported.module.apply(ported.variables, x, train=False))
        return jnp.sum(y * g)

    return jax.grad(loss)(jnp.asarray(x)), cast(torch.Tensor, x_t.grad)


@pytest.mark.parametrize(
    "name", [name for name in POOLS if "max" in name.lower()] + ["adaptive max 2x3 (uneven)"]
)
def test_max_pooling_sends_a_tied_windows_gradient_where_torch_does(name):
    """Whole numbers in {-1, 0, 1}: most windows hold ties; torch's gradient goes to
    the first maximum of each window, in row-major order."""
    model = POOLS.get(name) or torch.nn.AdaptiveMaxPool2d((2, 3))
    x = np.random.default_rng(0).integers(-1, 2, X.shape).astype(np.float32)
    assert_close(*input_gradients(model, x), what=name)


# Activations with a kink, and inputs at each kink and around it: torch's
# gradient there (ReLU's is 0 at 0, Hardswish's 0 at -3 and 1 at 3) is the port's.
KINKED = {
    "nn.ReLU": (torch.nn.ReLU(), (0.0,)),
    "F.relu": (Fn(F.relu), (0.0,)),
    "nn.ReLU6": (torch.nn.ReLU6(), (0.0, 6.0)),
    "nn.Hardtanh": (torch.nn.Hardtanh(-0.5, 2.0), (-0.5, 2.0)),
    "F.hardtanh": (Fn(lambda x: F.hardtanh(x, -1.0, 0.5)), (-1.0, 0.5)),
    "nn.Hardswish": (torch.nn.Hardswish(), (-3.0, 3.0)),
    "nn.Hardsigmoid": (torch.nn.Hardsigmoid(), (-3.0, 3.0)),
    "nn.LeakyReLU": (torch.nn.LeakyReLU(0.2), (0.0,)),
    "nn.ELU": (torch.nn.ELU(0.5), (0.0,)),
    "nn.Softplus": (torch.nn.Softplus(beta=2.0, threshold=4.0), (2.0,)),
    "clamp": (Fn(lambda x: torch.clamp(x, -1.0, 0.5)), (-1.0, 0.5)),
    "clamp min": (Fn(lambda x: torch.clamp(x, min=-1.0)), (-1.0,)),
    # tensor bounds: torch passes half the gradient at a tie
    "clamp tensors": (Fn(lambda x: torch.clamp(x, x * 0 - 1.0, x * 0 + 0.5)), (-1.0, 0.5)),
}


@pytest.mark.parametrize("name", list(KINKED))
def test_activation_gradients_at_their_kinks_match_torch(name):
    model, kinks = KINKED[name]
    points = np.array([k + d for k in kinks for d in (-0.25, 0.0, 0.25)], np.float32)
    x = np.broadcast_to(points, (2, 3, 2, len(points))).copy()
    assert_close(*input_gradients(model, x), what=name)


def test_in_place_ops_change_the_tensor_for_later_users():
    """``F.relu(y, inplace=True)`` rewrites y: torch's later ``y + z`` sees relu(y) twice."""

    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = torch.nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 1.0
            z = F.relu(y, inplace=True)
            w = y * 2.0
            self.act(w)
            return y + z + w

    desired, actual, _ = run_both(InPlace(), X)
    assert_close(actual, desired, what="in place")
    assert float(np.min(np.asarray(actual))) >= 0.0


def conv_models():
    return {
        "groups dilation": torch.nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        "same": torch.nn.Conv2d(4, 4, (3, 5), padding="same", bias=False),
        "reflect padding": torch.nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"),
        "circular padding": torch.nn.Conv2d(4, 2, 3, padding=(1, 2), padding_mode="circular"),
        "depthwise": torch.nn.Conv2d(4, 8, 3, groups=4),
    }


@pytest.mark.parametrize("name", list(conv_models()))
def test_convolutions_match_torch(name):
    x = np.random.default_rng(1).standard_normal((2, 4, 10, 9)).astype(np.float32)
    desired, actual, _ = run_both(conv_models()[name], x)
    assert_close(actual, desired, what=name)


def ops_pools_and_convolutions() -> dict[str, tuple[torch.nn.Module, np.ndarray]]:
    conv_x = np.random.default_rng(1).standard_normal((2, 4, 10, 9)).astype(np.float32)
    return {
        **{f"pool: {name}": (model, X) for name, model in POOLS.items()},
        **{f"op: {name}": (Fn(fn), X) for name, fn in OPS.items()},
        **{f"conv: {name}": (model, conv_x) for name, model in conv_models().items()},
    }


@pytest.mark.parametrize("name", fast_lane(*ops_pools_and_convolutions(), keep=3))
def test_input_gradients_of_ops_pools_and_convolutions_match_torch(name):
    """Forward values alone would miss an op JAX cannot differentiate (a dilated max
    pool raised NotImplementedError only in a training step) or one it differentiates
    otherwise."""
    model, x = ops_pools_and_convolutions()[name]
    assert_close(*input_gradients(model, x), what=name)


class Norms(torch.nn.Module):
    """Each BatchNorm with its own options: the port must keep every one."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn_default = torch.nn.BatchNorm2d(4)
        self.bn_cumulative = torch.nn.BatchNorm2d(4, momentum=None, eps=1e-3)
        self.bn_no_affine = torch.nn.BatchNorm2d(4, affine=False, momentum=0.3)
        self.bn_untracked = torch.nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = torch.nn.Linear(4, 5)
        self.bn1d = torch.nn.BatchNorm1d(5, momentum=3e-4, eps=1e-2)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn_untracked(self.bn_no_affine(self.bn_cumulative(self.bn_default(x))))
        return self.bn1d(self.fc(x.mean((2, 3))))


def randomised_norms() -> Norms:
    torch.manual_seed(0)
    model = Norms()
    with torch.no_grad():
        for module in model.modules():
            m = cast(Any, module)  # BatchNorm, FrozenBatchNorm2d, Dropout alike
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
                if m.track_running_stats:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(4)
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_batch_norm_keeps_its_own_options(train):
    model = randomised_norms()
    ported = jaxbn.port(model, torch.from_numpy(X))
    layers: dict[str, Any] = dict(ported.module.layers)
    assert layers["bn_cumulative"].make.keywords["momentum"] is None
    assert layers["bn_cumulative"].make.keywords["eps"] == 1e-3
    assert layers["bn1d"].make.func is jaxbn.BatchNorm1d
    assert "bn_untracked" not in ported.variables["batch_stats"]
    assert "bn_no_affine" not in ported.variables["params"]

    desired, actual, updates = run_both(model, X, train=train)
    assert_close(actual, desired, what="output")
    if train:
        state = jaxbn.to_torch({**ported.variables, **updates}, model)
        for key, value in model.state_dict().items():
            assert_close(state[key], value, what=key)
        assert int(state["bn_cumulative.num_batches_tracked"]) == 5


def test_variables_are_from_torch_and_init_declares_the_same_tree():
    model = randomised_norms()
    ported = jaxbn.port(model, torch.from_numpy(X))
    expected = jaxbn.from_torch(model)
    assert jax.tree.structure(ported.variables) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(ported.variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    template = jax.eval_shape(lambda: ported.module.init(jax.random.key(0), X))
    assert jaxbn.from_torch(model, template) is not None  # strict


class FunctionalDropout(torch.nn.Module):
    def forward(self, x):
        y = F.dropout(x, 0.5, self.training)
        return stochastic_depth(y, 0.5, "row", self.training)


def test_functional_dropout_and_stochastic_depth_follow_the_flax_train_flag():
    ported = jaxbn.port(FunctionalDropout(), torch.from_numpy(X))
    x = np.ones((64, 3, 4, 4), np.float32)
    np.testing.assert_array_equal(ported.module.apply({}, x, train=False), x)
    y = np.asarray(ported.module.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
    assert set(np.unique(y)) <= {0.0, 4.0}  # kept values scaled by 1/(1-0.5) twice
    dropped_rows = (y == 0).all(axis=(1, 2, 3))
    assert 10 < dropped_rows.sum() < 54  # stochastic depth drops whole samples
    assert 0.2 < (y[~dropped_rows] == 0).mean() < 0.8  # dropout, elementwise
    again = ported.module.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(y, again)
    with pytest.raises(Exception, match="dropout"):  # a training step needs the RNG
        ported.module.apply({}, x, train=True)


@pytest.mark.slow
def test_googlenet_auxiliary_heads_run_in_training_only():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, init_weights=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ported = jaxbn.port(model, torch.from_numpy(x))
    # The structure only (traced, not run); the values are test_port_models' googlenet.
    y = jax.eval_shape(lambda: ported.module.apply(ported.variables, x, train=False))
    assert isinstance(y, jax.ShapeDtypeStruct)
    assert y.shape == (2, 1000)
    y, _ = jax.eval_shape(
        lambda: ported.module.apply(
            ported.variables, x, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)},
        )
    )  # fmt: skip
    assert type(y).__name__ == "GoogLeNetOutputs"
    assert y._fields == ("logits", "aux_logits2", "aux_logits1")
    assert model.training  # the port leaves the torch module's mode alone


class Unsupported(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.act = torch.nn.Tanhshrink()

    def forward(self, x):
        return torch.erf(self.act(self.conv(x))).logcumsumexp(1)


def test_unsupported_ops_are_listed_together_with_the_fix():
    with pytest.raises(PortError) as error:
        jaxbn.port(Unsupported(), torch.from_numpy(X))
    message = str(error.value)
    assert "3 unsupported operation(s)" in message
    assert "act: module torch.nn.modules.activation.Tanhshrink has no converter" in message
    assert "function torch.erf" in message
    assert "tensor method .logcumsumexp()" in message
    assert "converters=" in message


def test_converters_fill_the_gaps():
    model = Unsupported()
    desired, actual, _ = run_both(
        model,
        X,
        converters={
            torch.nn.Tanhshrink: lambda m: lambda x: x - jnp.tanh(x),
            torch.erf: jax.scipy.special.erf,
            "logcumsumexp": lambda self, dim: jax.lax.cumlogsumexp(self, axis=dim),
        },
    )
    assert_close(actual, desired, what="with converters")


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class WithDataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DataDependent()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.block(self.conv(x))


def test_untraceable_module_gets_fx_reason_and_the_fix():
    with pytest.raises(PortError) as error:
        jaxbn.port(WithDataDependent(), torch.from_numpy(X))
    message = str(error.value)
    assert "torch.fx cannot trace WithDataDependent" in message
    assert "module 'block'" in message
    assert "control flow" in message
    assert "leaves=[DataDependent]" in message

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.where(x.sum() > 0, x * 2, x)

    model = WithDataDependent()
    desired, actual, _ = run_both(
        model, X, leaves=[DataDependent], converters={DataDependent: lambda m: Twice()}
    )
    assert_close(actual, desired, what="leaf with a converter")


class AddsToBatchNorm(torch.nn.BatchNorm2d):
    """A subclass with extra behaviour must not be ported as a plain BatchNorm."""

    def forward(self, input):
        return super().forward(input) + 1


def test_dispatch_is_on_the_exact_class():
    """Not ported as a plain BatchNorm2d: FX traces into it, to a statistics update the
    port refuses, naming the module."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), AddsToBatchNorm(3))
    with pytest.raises(PortError) as error:
        jaxbn.port(model, torch.from_numpy(X))
    message = str(error.value)
    assert "in module '1' (parity_tests.test_port.AddsToBatchNorm)" in message
    assert "updates the module's tensor 1.num_batches_tracked in place" in message
    assert "F.batch_norm with running statistics in training updates them in place" in message


def test_frozen_batch_norm_is_a_converter_kind_and_never_updates():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torchvision.ops.FrozenBatchNorm2d(4))
    with torch.no_grad():
        for b in model[1].buffers():
            b.uniform_(0.5, 1.5)
    ported = jaxbn.port(model, torch.from_numpy(X))
    assert set(ported.variables["batch_stats"]["1"]) == {"scale", "bias", "mean", "var"}
    assert "1" not in ported.variables["params"]
    for train in (False, True):
        desired, actual, updates = run_both(model, X, train=train)
        assert_close(actual, desired, what=f"train={train}")
    for a, b in zip(
        jax.tree.leaves(updates["batch_stats"]),
        jax.tree.leaves(ported.variables["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(jaxbn.to_torch(ported.variables, model), strict=True)


# --- CLI ---------------------------------------------------------------------


def tiny_cnn() -> torch.nn.Module:
    """A small BatchNorm CNN for the CLI tests (MODULE:FACTORY)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True),
        torch.nn.MaxPool2d(3, 2, ceil_mode=True),
        torch.nn.Conv2d(8, 8, 3, groups=2),
        torch.nn.BatchNorm2d(8, momentum=None),
        torch.nn.Hardswish(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 4),
    )


def unsupported_cnn() -> torch.nn.Module:
    return Unsupported()


def unseeded_cnn() -> torch.nn.Module:
    """A factory that leaves its weights to torch's global RNG, as torchvision's do."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )


class TwoInputs(torch.nn.Module):
    """A forward of two tensors: jaxbn port feeds one."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class AuxInTraining(torch.nn.Module):
    """An auxiliary head in training only, whose BatchNorm sees one value per channel at
    batch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.aux = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> Any:
        x = self.bn(self.conv(x))
        return (x, self.aux(F.adaptive_avg_pool2d(x, 1))) if self.training else x


def refusing(width: int = 3) -> torch.nn.Module:
    """A factory whose own code refuses its arguments."""
    if width % 2:
        raise ValueError(f"width must be even, got {width}")
    return tiny_cnn()


def not_a_module() -> int:
    return 3


def test_cli_seeds_the_factory_so_a_rerun_reports_the_same(tmp_path, capsys):
    """One command, one report: the factory's random init follows --seed, not torch's state."""

    def ported(seed: int, name: str) -> list[np.ndarray]:
        out = tmp_path / f"{name}.msgpack"
        argv = ["port", "parity_tests.test_port:unseeded_cnn", "--input", "2,3,8,8"]
        code, printed, _ = jaxbn_here(capsys, *argv, "--seed", seed, "-o", out)
        assert code == 0, printed
        return [np.asarray(leaf) for leaf in jax.tree.leaves(load_variables(out)["params"])]

    first, again, other = ported(0, "first"), ported(0, "again"), ported(1, "other")
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_cli_ports_checks_and_writes(tmp_path, capsys):
    out = tmp_path / "v.msgpack"
    code, printed, _ = jaxbn_here(
        capsys, "port", "parity_tests.test_port:tiny_cnn", "--input", "4,3,12,12", "-o", out
    )
    assert code == 0, printed
    assert "eval: " in printed
    assert "training step: " in printed
    assert "within 8x torch's own float32 error (vs float64)" in printed
    variables = load_variables(out)
    expected = jaxbn.from_torch(tiny_cnn())
    assert jax.tree.structure(variables) == jax.tree.structure(expected)


def test_cli_saves_a_port_directory_and_an_exported_program(tmp_path, capsys):
    saved, exported = tmp_path / "saved", tmp_path / "model.jaxexport"
    argv = ["port", "parity_tests.test_port:tiny_cnn", "--input", "4,3,12,12"]
    code, printed, _ = jaxbn_here(capsys, *argv, "-o", saved, "--export", exported)
    assert code == 0, printed
    assert f"saved the port to {saved}/ (model.py, variables.msgpack, port.json)" in printed
    assert f"wrote {exported} (eval and training programs, any batch size)" in printed
    loaded = jaxbn.port.load(saved)
    expected = jaxbn.from_torch(tiny_cnn())
    assert jax.tree.structure(loaded.variables) == jax.tree.structure(expected)
    x = np.ones((2, 3, 12, 12), np.float32)
    programs = jaxbn.port.load_exported(exported)
    np.testing.assert_array_equal(
        programs.eval.call(programs.variables, x),
        loaded.module.apply(loaded.variables, x, train=False),
    )


@pytest.mark.slow
def test_cli_runs_as_the_readme_shows(tmp_path, capsys):
    """Both samples, in this process: the second run compiles nothing new.

    With ``--seed 3`` a gradient hinges on a ReLU input within float32
    rounding of zero, which jax puts on the other side: the harness follows
    jax's side in a second float64 run, says so, and the port passes.
    """
    out = tmp_path / "resnet18.msgpack"
    for command in (
        "jaxbn port torchvision.models:resnet18 --input 4,3,64,64 -o resnet18.msgpack",
        "jaxbn port torchvision.models:resnet18 --input 4,3,64,64 --seed 3",
    ):
        argv = [out if arg == "resnet18.msgpack" else arg for arg in command.split()[1:]]
        code, printed, err = jaxbn_here(capsys, *argv)
        assert code == 0, printed + err
        output = printed.replace(str(out), "resnet18.msgpack")
        assert_sample_matches(readme_sample(command), output.splitlines())


def test_cli_prints_the_first_divergence_and_fails(monkeypatch, capsys):
    """A wrong table row (Hardswish ported as ReLU) is found at its layer, in eval."""
    from jaxbn.port.ops._registry import resolve

    modules = resolve().modules
    monkeypatch.setitem(modules, torch.nn.Hardswish, modules[torch.nn.ReLU])
    code, printed, _ = jaxbn_here(
        capsys, "port", "parity_tests.test_port:tiny_cnn", "--input", "4,3,12,12"
    )
    assert code == 1, printed
    assert "eval: first divergence at 6 (output)" in printed
    assert re.search(r"^6\s+output\s+4x8x4x4 .*<-- first divergence$", printed, re.M), printed


def test_cli_reports_unsupported_ops(capsys):
    code, _, err = jaxbn_here(
        capsys, "port", "parity_tests.test_port:unsupported_cnn", "--input", "2,3,8,8"
    )
    assert code == 1
    assert err.startswith("jaxbn: 3 unsupported operation(s)")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["torchvision.models.resnet18", "--input", "1,3,8,8"], "expected MODULE:FACTORY"),
        (["no_such_module:f", "--input", "1,3,8,8"], "No module named 'no_such_module'"),
        (["torchvision.models:nope", "--input", "1,3,8,8"], "has no attribute 'nope'"),
        (["torchvision.models:resnet18", "--input", "1,3,x"], "--input expects positive"),
        (
            ["torchvision.models:ResNet", "--input", "1,3,8,8"],
            "torchvision.models:ResNet is a class whose constructor takes other arguments "
            "(missing a required argument: 'block'); give them with --kwargs",
        ),
        (
            ["torchvision.models:resnet18", "--input", "2,3,8,8", "--kwargs", "nope=1"],
            "cannot build torchvision.models:resnet18 with --kwargs nope=1: ResNet.__init__() "
            "got an unexpected keyword argument 'nope'; give the arguments it takes",
        ),
        (
            ["torchvision.models:resnet18", "--input", "2,3,8,8", "--kwargs", "num_classes"],
            "--kwargs expects NAME=VALUE pairs separated by commas, got 'num_classes'",
        ),
        (
            ["timm:create_model", "--input", "2,3,8,8"],
            "timm has no model 'create_model'; name one as timm:NAME, e.g. timm:resnet18",
        ),
        (  # the layout: torch's own forward refuses it, before the port
            ["torchvision.models:resnet18", "--input", "2,32,32,3"],
            "--input 2,32,32,3 does not fit torchvision.models:resnet18: torch's own forward "
            "fails in conv1 (Conv2d): Given groups=1, weight of size [64, 3, 7, 7], expected "
            "input[2, 32, 32, 3] to have 3 channels, but got 32 channels instead; its first "
            "layer Conv2d takes 3 channels at axis 1 (N,C,H,W: PyTorch's layout), and this "
            "shape looks channels-last: --input 2,3,32,32",
        ),
        (
            ["torchvision.models:resnet18", "--input", "3,32,32"],
            "torch's own forward fails in bn1 (BatchNorm2d): expected 4D input (got 3D input); "
            "its first layer (Conv2d, 3 channels) needs a batch dimension first: "
            "--input 1,3,32,32",
        ),
        (  # a training step torch cannot run: found before the port
            ["torchvision.models:resnet18", "--input", "1,3,32,32"],
            "--input 1,3,32,32: in a training step layer4.0.bn1 would normalise 1 value per "
            "channel, which torch refuses",
        ),
        (
            ["torchvision.models:resnet18", "--input", "2,3,8,8", "--no-check"],
            "--no-check ports without comparing, so it needs somewhere to write",
        ),
        (
            ["parity_tests.test_port:TwoInputs", "--input", "2,3,8,8"],
            "parity_tests.test_port:TwoInputs takes more than one input (TwoInputs.forward() "
            "missing 1 required positional argument: 'y'); jaxbn port feeds it one random "
            "tensor of --input's shape: port it from Python, jaxbn.port(model, (x, y))",
        ),
        (
            ["parity_tests.test_port:not_a_module", "--input", "2,3,8,8"],
            "parity_tests.test_port:not_a_module built an object of type int, not a torch "
            "module; name a function or class that returns a torch.nn.Module",
        ),
        (
            ["parity_tests.test_port:refusing", "--input", "2,3,8,8", "--kwargs", "wide=4"],
            "parity_tests.test_port:refusing takes other arguments (got an unexpected keyword "
            "argument 'wide'); give them with --kwargs",
        ),
        (  # a BatchNorm that only training runs (as GoogLeNet's auxiliary heads)
            ["parity_tests.test_port:AuxInTraining", "--input", "1,3,8,8"],
            "--input 1,3,8,8: in a training step aux would normalise 1 value per channel",
        ),
        (  # before any work: the port and its check would take minutes
            ["torchvision.models:resnet18", "--input", "1,3,8,8", "-o", "nodir/r.msgpack"],
            "-o nodir/r.msgpack: directory nodir does not exist; create it (mkdir -p nodir)",
        ),
        (
            ["torchvision.models:resnet18", "--input", "1,3,8,8", "-o", "nodir/saved"],
            "-o cannot write nodir/saved: its parent directory nodir does not exist (create "
            "it: mkdir -p nodir)",
        ),
        (
            ["torchvision.models:resnet18", "--input", "1,3,8,8", "-o", "pyproject.toml"],
            "-o pyproject.toml is a file; save a port to a directory, or the variables alone to "
            "FILE.msgpack",
        ),
        (
            ["torchvision.models:resnet18", "--input", "1,3,8,8", "--export", "nodir/m.jax"],
            "--export nodir/m.jax: directory nodir does not exist; create it",
        ),
        (
            ["torchvision.models:resnet18", "--input", "1,3,8,8", "--checkpoint", "nothere.pth"],
            "nothere.pth: no such file; check the path",
        ),
    ],
)
def test_cli_usage_errors_are_one_line(argv, message, capsys):
    code, _, err = jaxbn_here(capsys, "port", *argv)
    assert code == 2
    assert err.startswith("jaxbn: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_says_in_one_line_what_a_factory_raised(capsys):
    argv = ["parity_tests.test_port:refusing", "--input", "2,3,8,8", "--kwargs", "width=5"]
    code, _, err = jaxbn_here(capsys, "port", *argv)
    assert (code, err) == (
        1,
        "jaxbn: cannot build parity_tests.test_port:refusing: ValueError: width must be even, "
        "got 5; check --kwargs width=5\n",
    )


def test_cli_takes_a_checkpoint_saved_before_num_batches_tracked(tmp_path, capsys):
    """As torch's load_state_dict(strict=True) does: the missing counters are 0."""
    state = tiny_cnn().state_dict()
    torch.save({k: v for k, v in state.items() if "num_batches" not in k}, tmp_path / "old.pth")
    out = tmp_path / "v.msgpack"
    code, _, err = jaxbn_here(
        capsys, "port", "parity_tests.test_port:tiny_cnn", "--input", "2,3,12,12",
        "--checkpoint", tmp_path / "old.pth", "--no-check", "-o", out,
    )  # fmt: skip
    assert code == 0, err
    assert int(load_variables(out)["batch_stats"]["1"]["num_batches_tracked"]) == 0


def test_cli_says_in_one_line_how_a_checkpoint_does_not_fit(tmp_path, capsys):
    state = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.bn1.running_mean"]
    torch.save(state, tmp_path / "ten.pth")
    code, _, err = jaxbn_here(capsys, "port", "torchvision.models:resnet18", "--input",
                              "2,3,8,8", "--checkpoint", tmp_path / "ten.pth")  # fmt: skip
    assert code == 1
    assert err.splitlines() == [
        f"jaxbn: {tmp_path / 'ten.pth'} does not fit torchvision.models:resnet18: keys: 1 "
        "missing (layer1.0.bn1.running_mean); 1 unexpected (extra.weight); 2 of another shape "
        "(fc.weight: checkpoint [10, 512], model [1000, 512], fc.bias: checkpoint [10], model "
        "[1000]); build the checkpoint's architecture (its number of classes, its variant: "
        "--kwargs num_classes=...)"
    ]


def test_cli_imports_from_the_working_directory_and_builds_a_class(tmp_path):
    """`jaxbn port mymodels:Net` beside mymodels.py, as `python -c 'import mymodels'` does;
    a module class with a constructor that needs nothing is its own factory."""
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))\n"
    )
    jaxbn_command = pathlib.Path(sys.executable).with_name("jaxbn")
    result = run(jaxbn_command, "port", "mymodels:Net", "--input", "2,3,8,8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ported mymodels:Net: params 4 arrays")


def test_cli_names_the_layout_as_the_guide_shows(capsys):
    command = "jaxbn port torchvision.models:resnet18 --input 2,32,32,3"
    code, _, err = jaxbn_here(capsys, *command.split()[1:])
    assert code == 2
    assert_sample_matches(readme_sample(command, "docs/cli.md"), err.splitlines())


def test_cli_ports_a_timm_name_with_arguments_from_a_wrapped_checkpoint(tmp_path, capsys):
    """`timm:NAME --kwargs`, a training script's checkpoint dict read as convert reads it,
    and --no-check: the variables are convert's, bit for bit."""
    import timm

    state = timm.create_model("resnet18", num_classes=10).state_dict()
    wrapped = {"epoch": 3, "model_state": state, "optimizer": {"lr": torch.tensor(0.1)}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    out = tmp_path / "r.msgpack"
    code, printed, err = jaxbn_here(
        capsys, "port", "timm:resnet18", "--kwargs", "num_classes=10", "--input", "2,3,32,32",
        "--checkpoint", tmp_path / "wrapped.pth", "--no-check", "-o", out,
    )  # fmt: skip
    assert code == 0, err
    assert err == ""  # no progress lines when stderr is not a terminal
    assert "using checkpoint['model_state']; not model weights, not converted: " in printed
    assert "eval:" not in printed
    assert printed.rstrip().endswith("not compared with torch (--no-check)")
    ported, converted = load_variables(out), jaxbn.from_torch(state)
    assert jax.tree.structure(ported) == jax.tree.structure(converted)
    for a, b in zip(jax.tree.leaves(ported), jax.tree.leaves(converted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cli_shows_its_phases_on_a_terminal_only(tmp_path):
    """On a terminal, each phase with its time on stderr; the report on stdout as ever."""
    import os
    import pty
    import subprocess

    leader, follower = pty.openpty()
    command = pathlib.Path(sys.executable).with_name("jaxbn")
    argv = ["port", "parity_tests.test_port:tiny_cnn", "--input", "4,3,12,12"]
    done = subprocess.run(
        [command, *argv], stdout=subprocess.PIPE, stderr=follower, cwd=pathlib.Path.cwd(),
        timeout=600, check=False,
    )  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert done.returncode == 0, shown.decode()
    lines = [line.rpartition("\r")[2] for line in shown.decode().splitlines()]
    for phase in ("tracing and porting", "eval: torch in float32 and float64, the port "
                  "compiled and run", "training step: torch in float32"):  # fmt: skip
        assert any(re.fullmatch(rf"\x1b\[K\[ *\d+ s\] {phase}.*: \d+\.\d s", line)
                   for line in lines), (phase, lines)  # fmt: skip
    assert "eval: " in done.stdout.decode()


def test_a_ported_module_called_channels_last_names_the_layer_and_the_layout():
    ported = jaxbn.port(tiny_cnn(), torch.from_numpy(X))
    with pytest.raises(ValueError, match="looks channels-last") as caught:  # jax's class
        ported.module.apply(ported.variables, np.moveaxis(X, 1, -1), train=False)
    assert type(caught.value) is ValueError
    message = str(caught.value)
    n, c, h, w = X.shape
    assert message.startswith(f"jaxbn.port: 0 failed on input of shape {(n, h, w, c)}: ")
    assert message.endswith(
        f"(ported at input shape {X.shape}; called with {(n, h, w, c)}); an input of shape "
        f"{(n, h, w, c)} looks channels-last: the port takes torch's layout, channels at "
        f"axis 1, here {c}: x.transpose(0, 3, 1, 2)"
    )


def test_train_aware_converter_gets_the_flag():
    class Noise(torch.nn.Module):
        def forward(self, x):
            return x + 0

    def noisy(input, other, *, train, rng):
        return input + (jax.random.normal(rng(), input.shape) if train else other)

    import operator

    ported = jaxbn.port(Noise(), torch.from_numpy(X), converters={operator.add: TrainAware(noisy)})
    np.testing.assert_array_equal(ported.module.apply({}, X, train=False), X)
    y = ported.module.apply({}, X, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(np.asarray(y), X)


class LayerScaled(torch.nn.Module):
    """A block with a bare parameter, as ConvNeXt's layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma[None, :, None, None] * self.conv(x)


def test_bare_parameters_are_placed_by_the_ports_own_template():
    model = torch.nn.Sequential(LayerScaled(), torch.nn.BatchNorm2d(3))
    desired, actual, _ = run_both(model, X[:, :3], train=True)
    assert_close(actual, desired, what="output")
    ported = jaxbn.port(model, torch.from_numpy(X[:, :3]))
    gamma = model.get_parameter("0.gamma")
    np.testing.assert_array_equal(ported.variables["params"]["0"]["gamma"], gamma.detach().numpy())
    state = jaxbn.to_torch(ported.variables, model)
    assert torch.equal(state["0.gamma"], gamma)


class ReadsALinearsWeight(torch.nn.Module):
    """EVA's attention: its qkv Linear never called, its weight read with biases of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(6, 9, bias=False)
        self.q_bias = torch.nn.Parameter(torch.linspace(-1, 1, 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv.weight, self.q_bias)


def test_a_layers_tensor_read_where_the_layer_is_never_called():
    model = ReadsALinearsWeight()
    desired, actual, _ = run_both(model, X[:, :2, :3, :6], train=True)
    assert_close(actual, desired, what="output")
    ported = jaxbn.port(model, torch.from_numpy(X[:, :2, :3, :6]))
    np.testing.assert_array_equal(  # where from_torch puts a Linear's weight: transposed
        ported.variables["params"]["qkv"]["kernel"], model.qkv.weight.detach().numpy().T
    )
    state = jaxbn.to_torch(ported.variables, model)
    assert torch.equal(state["qkv.weight"], model.qkv.weight)


class GainConv(torch.nn.Conv2d):
    """timm's ScaledStdConv2d: a Conv2d with a tensor of its own and its own forward."""

    def __init__(self) -> None:
        super().__init__(3, 4, 3, padding=1)
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 2.0, 4)[:, None, None, None])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.conv2d(input, self.weight * self.gain, self.bias, self.stride, self.padding)


def test_a_layer_subclass_with_a_tensor_of_its_own_keeps_its_tensors_names():
    model = torch.nn.Sequential(GainConv(), torch.nn.BatchNorm2d(4))
    desired, actual, _ = run_both(model, X[:, :3], train=True)
    assert_close(actual, desired, what="output")
    ported = jaxbn.port(model, torch.from_numpy(X[:, :3]))
    assert set(ported.variables["params"]["0"]) == {"weight", "bias", "gain"}
    state = jaxbn.to_torch(ported.variables, model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "build",
    [
        lambda: torchvision.models.densenet121(weights=None, drop_rate=0.3),  # functional
        lambda: torchvision.models.efficientnet_b0(weights=None),  # StochasticDepth, Dropout
        lambda: pytest.importorskip("timm").create_model(
            "resnet18d", pretrained=False, drop_rate=0.2, drop_path_rate=0.2
        ),  # DropPath, the head's functional dropout
    ],
    ids=["densenet121", "efficientnet_b0", "timm_resnet18d"],
)
def test_without_dropout_makes_training_deterministic(build):
    """The harness's comparisons need torch's training step free of random masks."""
    model = build()
    quiet = without_dropout(model).train()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32))).float()
    with torch.no_grad():
        outputs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outputs.append(quiet(x))
        torch.manual_seed(1)
        noisy = model.train()(x)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.equal(noisy, outputs[0])  # the original keeps its dropout


class BranchesOnWidth(torch.nn.Module):
    """Python control flow on a size, as timm's window and patch blocks have."""

    def forward(self, x):
        if x.shape[-1] % 2:  # an odd width: pad it even
            x = F.pad(x, (0, 1))
        return x.reshape(x.shape[0], -1, 2).sum(-1)


def test_control_flow_on_sizes_follows_the_example_and_refuses_another_branch():
    """Ported at an odd width, the module takes any odd width (the sizes it computes with
    stay symbolic) and refuses an even one, naming the line that branches."""
    model = BranchesOnWidth()
    ported = jaxbn.port(model, torch.from_numpy(X))  # width 13
    for width in (13, 11):
        x = X[..., :width]
        with torch.no_grad():
            desired = model(torch.from_numpy(x))
        assert_close(ported.module.apply({}, x), desired, what=f"width {width}")
    with pytest.raises(PortError) as error:
        ported.module.apply({}, X[..., :12])
    message = str(error.value)
    assert "`if x.shape[-1] % 2:  # an odd width: pad it even`" in message
    assert "test_port.py" in message
    assert "BranchesOnWidth.forward; its bool()) was True when the model was ported" in message
    assert "and is False for this input" in message
    assert "ported at input shape (2, 3, 10, 13); called with (2, 3, 10, 12)" in message


@torch.fx.wrap  # as timm marks its window and grid functions: plain FX cannot trace them
def _pad_even(x):
    if x.shape[-1] % 2:
        x = F.pad(x, (0, 1))
    return x


class CallsAWrappedFunction(torch.nn.Module):
    def forward(self, x):
        return _pad_even(x * 2).reshape(x.shape[0], -1, 2).sum(-1)


def test_a_function_marked_for_fx_to_leave_alone_is_traced_into_with_its_guards():
    model = CallsAWrappedFunction()
    ported = jaxbn.port(model, torch.from_numpy(X))  # width 13
    assert "pad" in ported.ops  # (the function traced into, not one call)
    with torch.no_grad():
        desired = model(torch.from_numpy(X[..., :11]))
    assert_close(ported.module.apply({}, X[..., :11]), desired, what="width 11")
    with pytest.raises(PortError) as error:
        ported.module.apply({}, X[..., :12])
    assert re.search(
        r"in _pad_even, called in [\w.]*CallsAWrappedFunction.forward; its bool", str(error.value)
    )


class MaskedWhenGiven(torch.nn.Module):
    def forward(self, x, mask=None, scale=None):
        if mask is not None:  # (a proxy is never None: FX alone would take this branch)
            x = x * mask
        return x * 2 if scale is None else x * scale


def test_an_argument_that_is_none_is_traced_as_none_and_must_stay_none():
    model = MaskedWhenGiven()
    ported = jaxbn.port(model, {"x": X, "scale": None})
    assert "mul" in ported.ops
    calls: list[dict[str, Any]] = [{}, {"mask": None}, {"scale": None, "mask": None}]
    for call in calls:
        np.testing.assert_array_equal(ported.module.apply({}, X, **call), X * 2)
    expected = r"mask has been specialized to have value None .*\(it was None when the model"
    with pytest.raises(PortError, match=expected):
        ported.module.apply({}, X, mask=X)


class TwoImages(torch.nn.Module):
    """Two inputs, a Python number and a step count, and a dict of a list out: RAFT's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, image1, image2, scale: float = 1.0, steps: int = 2):
        x = self.bn(self.conv(torch.cat([image1, image2], 1)))
        means = []
        for _ in range(steps):
            x = x * scale
            means.append(x.mean((2, 3)))
        return {"means": means, "last": x}


def test_several_inputs_by_position_and_by_name_and_nested_outputs():
    image1, image2 = X, X[:, ::-1].copy()
    model = TwoImages().eval()
    ported = jaxbn.port(model, {"image1": image1, "image2": image2, "steps": 3})
    with torch.no_grad():
        desired = model(torch.from_numpy(image1), torch.from_numpy(image2), 0.5, steps=3)
    apply = functools.partial(ported.module.apply, ported.variables)
    for actual in (
        apply(image1, image2, 0.5, 3),
        apply(image2=image2, image1=image1, scale=0.5, steps=3),
        apply(image1, image2, steps=3, scale=0.5),
    ):
        actual = cast(dict[str, Any], actual)
        assert set(actual) == {"means", "last"}
        assert len(actual["means"]) == 3
        for a, d in zip(actual["means"], desired["means"], strict=True):
            assert_close(a, d, what="means")
        assert_close(actual["last"], desired["last"], what="last")
    with pytest.raises(PortError, match=r"`for _ in range\(steps\):`.* was 3 when the model"):
        apply(image1, image2, steps=2)
    with pytest.raises(TypeError, match="has no input 'image3'; its inputs are image1, image2"):
        apply(image1, image3=image2)
    with pytest.raises(TypeError, match=r"needs its inputs .* missing \['image2'\]"):
        apply(image1)


class Caches(torch.nn.Module):
    """A forward that stores what it computes on the module (as levit's bias cache and
    RAFT's correlation pyramid do): tracing must not leave FX's proxies there."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.cache: dict[str, torch.Tensor] = {}
        self.calls: list[Any] = []
        self.last: Any = None

    def forward(self, x):
        self.calls.append(x.shape)
        key = str(x.shape[-1])
        if key not in self.cache:
            self.cache[key] = x.mean()
        self.last = self.bn(x)
        return self.last + self.cache[key]


def test_porting_leaves_the_torch_module_as_it_was():
    model = Caches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    ported = jaxbn.port(model, torch.from_numpy(X))
    assert model.cache == {}
    assert model.calls == []
    assert model.last is None
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the training trace updated no statistic
    assert torch.equal(torch.random.get_rng_state(), rng)
    copy.deepcopy(model)  # (proxies left on a module break deep copies)
    desired, actual, _ = run_both(model, X, train=True)
    assert_close(actual, desired, what="after the port")
    assert ported.ops


class Pair(torch.nn.Module):
    def forward(self, x):
        first, second = x  # unpacking: as many as the first axis holds
        return first - second


def test_unpacking_is_guarded_as_python_unpacks():
    """torch raises 'too many values to unpack' at a batch of 3: the port refuses it too."""
    ported = jaxbn.port(Pair(), torch.from_numpy(X[:2]))
    assert_close(ported.module.apply({}, X[:2]), Pair()(torch.from_numpy(X[:2])), what="pair")
    with pytest.raises(PortError, match=r"`first, second = x .*` .* was 2 when the model was"):
        ported.module.apply({}, np.concatenate([X, X[:1]]))


class WritesThroughASlice(torch.nn.Module):
    """Swin v2's `qkv_bias[length : 2 * length].zero_()`."""

    def forward(self, x):
        y = x * 1
        n = x.shape[1] // 3
        y[:, n : 2 * n].zero_()  # in torch, y's middle channel is now 0
        y[1].mul_(2)
        return y


class WritesThroughAViewOfAView(torch.nn.Module):
    def forward(self, x):
        y = x * 1
        y.transpose(2, 3)[:, :2].mul_(0)  # in torch, y's first two channels are now 0
        return y


class WritesThroughAnInPlaceResult(torch.nn.Module):
    def forward(self, x):
        y = x * 1
        y[..., 1].mul_(2)[:, 0].add_(100)  # mul_ returns y's view: add_ changes y too
        return y


class InPlaceOnAViewAlone(torch.nn.Module):
    def forward(self, x):
        y = (x * 1).flatten(2).transpose(1, 2)
        y += 1  # the view alone is used after: nothing else sees the change
        return y


def test_an_in_place_op_on_a_slice_is_written_back_and_deeper_views_are_refused():
    """A port has no shared memory: an in-place op on a slice of a tensor is written back
    into that tensor; through a view of a view it would be lost, and is refused."""
    desired, actual, _ = run_both(WritesThroughASlice(), X)
    assert_close(actual, desired, what="in place on a slice")
    with pytest.raises(PortError, match=r"reads 'mul', which node 'mul_' .* changed in place"):
        jaxbn.port(WritesThroughAViewOfAView(), torch.from_numpy(X))
    with pytest.raises(PortError, match=r"reads 'mul', which node 'add_' .* changed in place"):
        jaxbn.port(WritesThroughAnInPlaceResult(), torch.from_numpy(X))
    desired, actual, _ = run_both(InPlaceOnAViewAlone(), X)
    assert_close(actual, desired, what="in place on a view used alone")


class DoublesItsInput(torch.nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x * 3 if x.shape[1] > 1 else x  # a branch: the trace runs the forward


def test_the_example_input_and_the_modules_hooks_are_left_alone():
    model = DoublesItsInput()
    seen = []
    handle = model.register_forward_hook(lambda *_: seen.append(1))
    x = torch.ones(2, 3, 4)
    ported = jaxbn.port(model, x)
    assert torch.equal(x, torch.ones(2, 3, 4))  # the forward's mul_ ran on a copy
    handle.remove()
    model(torch.ones(2, 3, 4))
    assert seen == []  # the hook removed itself from the module's own dict
    np.testing.assert_array_equal(ported.module.apply({}, np.ones((2, 3, 4), np.float32)), 6.0)


class BadWidth(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.shape[-1] > 2 else y


def test_an_example_that_does_not_run_says_why_where_a_value_is_needed():
    with pytest.raises(PortError, match=r"the example input does not run through .* mat1 and mat2"):
        jaxbn.port(BadWidth(), torch.zeros(2, 5))


class Resizes(torch.nn.Module):
    def forward(self, x, mode: str = "nearest", size: tuple[int, int] = (4, 4)):
        return F.interpolate(x, size=size, mode=mode)


def test_python_values_and_bfloat16_as_example_inputs():
    ported = jaxbn.port(Resizes(), {"x": X, "mode": "bilinear", "size": (7, 5)})
    with torch.no_grad():
        desired = Resizes()(torch.from_numpy(X), "bilinear", (7, 5))
    assert_close(ported.module.apply({}, X, "bilinear", (7, 5)), desired, what="keywords")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).bfloat16()
    x = torch.from_numpy(X).bfloat16()
    ported = jaxbn.port(model, x)
    y = ported.module.apply(ported.variables, to_numpy(x), train=False)
    with torch.no_grad():
        desired = model.eval()(x).float()
    assert_close(np.asarray(y, np.float32), desired, what="bfloat16", rtol=2e-2, atol=2e-2)


def test_a_tensor_under_two_names_is_refused_by_name():
    """A module registered twice (CoaT shares its convolutions) would be two variables."""
    shared = torch.nn.Conv2d(3, 3, 1)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    with pytest.raises(PortError, match=r"2 tensor\(s\) .* 0.weight = 2.weight; 0.bias = 2.bias"):
        jaxbn.port(model, torch.from_numpy(X))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_a_linear_of_no_outputs_ports_as_torch_runs_it():
    """num_classes=0 (a head removed): torch runs it, so does the port."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 10 * 13, 0))
    desired, actual, _ = run_both(model, X)
    assert np.asarray(actual).shape == tuple(desired.shape) == (2, 0)
