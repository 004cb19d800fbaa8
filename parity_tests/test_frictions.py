"""Mistakes a first user makes, and what jaxbn says back.

Each test makes the mistake, checks that the message names what was
received and the fix, and where PyTorch is involved, that the fix gives
PyTorch's numbers.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn

KEY = jax.random.key(0)

# layer, its PyTorch twin, a channels-last input shape, both layouts' names, the fix
CHANNELS_LAST = {
    "1d": (jaxbn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 6, 3), ("NLC", "NCL"), (0, 2, 1)),
    "2d": (jaxbn.BatchNorm2d, torch.nn.BatchNorm2d, (2, 5, 6, 3), ("NHWC", "NCHW"), (0, 3, 1, 2)),
    "3d": (
        jaxbn.BatchNorm3d,
        torch.nn.BatchNorm3d,
        (2, 4, 5, 6, 3),
        ("NDHWC", "NCDHW"),
        (0, 4, 1, 2, 3),
    ),
}


@pytest.mark.parametrize("kind", CHANNELS_LAST)
def test_channels_last_input_is_named_with_its_fix(kind):
    """Not "num_features=5" (which would normalise over H): the layout and the transpose."""
    layer_ans, layer_ref, shape, (layout, torch_layout), order = CHANNELS_LAST[kind]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = layer_ref(3)
    with pytest.raises(RuntimeError, match=f"running_mean should contain {shape[1]} elements"):
        ref(torch.from_numpy(x))
    layer = layer_ans(3, use_running_average=False)
    with pytest.raises(RuntimeError) as caught:
        layer.init(KEY, x)
    message = str(caught.value)
    assert message.startswith(f"running_mean should contain {shape[1]} elements not 3: ")
    assert f"the input of shape {shape} has {shape[1]} channels on axis 1" in message
    assert f"looks channels-last ({layout}, 3 channels on its last axis)" in message
    assert f"x.transpose{order} or use jaxbn.BatchNorm(axis=-1)" in message
    assert f"read as PyTorch's {torch_layout} (channels on axis 1)" in message
    # num_features only for the other case, an input that really is channels-first
    assert message.endswith(
        f"if it really is {torch_layout}, build the layer with num_features={shape[1]}."
    )

    # Both fixes give PyTorch's numbers.
    y_ref = ref(torch.from_numpy(x.transpose(order))).detach().numpy()
    variables = layer.init(KEY, x.transpose(order))
    y_ans, _ = layer.apply(variables, x.transpose(order), mutable=["batch_stats"])
    np.testing.assert_allclose(y_ans, y_ref, rtol=1e-5, atol=1e-5)
    last = jaxbn.BatchNorm(use_running_average=False)
    variables = last.init(KEY, x)
    y_last, _ = last.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_last).transpose(order), y_ref, rtol=1e-5, atol=1e-5)


def test_channels_last_without_variables_and_in_nnx():
    """The num_features check (no parameters, no statistics) and NNX say the same."""
    x = jnp.ones((2, 5, 6, 3))
    untracked = jaxbn.BatchNorm2d(3, affine=False, track_running_stats=False)
    with pytest.raises(
        RuntimeError,
        match=r"BatchNorm2d\(num_features=3\) got an input of shape \(2, 5, 6, 3\) with 5 "
        r"channels on axis 1\. The input looks channels-last \(NHWC.*x\.transpose\(0, 3, 1, 2\)",
    ):
        untracked.apply({}, x)
    with pytest.raises(RuntimeError, match=r"NHWC.*jaxbn\.nnx\.BatchNorm\(num_features, axis=-1\)"):
        jaxbn.nnx.BatchNorm2d(3)(x)
    with pytest.raises(RuntimeError, match=r"x\.transpose\(0, 3, 1, 2\) or pass axis=-1"):
        jaxbn.batch_norm(x, jaxbn.BatchStats.create(3), training=True, axis=1)
    # Wrong rank, e.g. an image batch for BatchNorm3d: the same channels-last advice.
    with pytest.raises(
        ValueError,
        match=r"BatchNorm3d expects \(N, C, D, H, W\), got shape \(2, 5, 6, 3\)\. "
        r"For channels-last data, use jaxbn\.BatchNorm\(axis=-1\)\.",
    ):
        jaxbn.BatchNorm3d(3, use_running_average=False).init(KEY, x)


def test_channel_mismatch_that_is_not_channels_last_keeps_its_advice():
    x = jnp.ones((2, 5, 6, 4))  # no axis holds the 3 channels expected
    with pytest.raises(RuntimeError) as caught:
        jaxbn.BatchNorm2d(3, use_running_average=False).init(KEY, x)
    assert "channels-last" not in str(caught.value)
    assert "build the layer with num_features=5." in str(caught.value)


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(2, name="fc")(x)


def test_from_torch_template_that_is_a_linen_module():
    """The module itself has no variables: a TypeError that says to pass its init."""
    with pytest.raises(
        TypeError,
        match=r"from_torch's `template` must be Flax variables or an NNX model, got the "
        r"flax\.linen module FlaxNet itself.*template=model\.init\(jax\.random\.key\(0\), x\)",
    ):
        jaxbn.from_torch(TorchNet(), FlaxNet())
    with pytest.raises(TypeError, match=r"got a torch\.nn\.modules\.linear\.Linear"):
        jaxbn.from_torch(TorchNet(), torch.nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"to_torch's `variables`.*module FlaxNet itself"):
        jaxbn.to_torch(FlaxNet())
    # The fix: its variables, or their shapes.
    ref = TorchNet()
    x = jnp.ones((1, 3))
    for template in (FlaxNet().init(KEY, x), jax.eval_shape(FlaxNet().init, KEY, x)):
        variables = jaxbn.from_torch(ref, template)
        np.testing.assert_array_equal(
            variables["params"]["fc"]["kernel"], ref.fc.weight.detach().numpy().T
        )


def test_training_a_ported_model_without_mutable_names_both_switches():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn, torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    ported = jaxbn.port(ref, x)
    with pytest.raises(ValueError, match="is not mutable") as caught:
        ported.module.apply(ported.variables, x.numpy(), train=True)
    message = str(caught.value)
    assert "BatchNorm2d at '1' is in a training step" in message
    assert "'batch_stats' is not mutable" in message
    assert "Pass mutable=['batch_stats'] to apply" in message
    assert "use_running_average=True on the layer, train=False on a jaxbn.port model" in message

    # Either fix: a training step that matches torch's, or eval.
    y_ans, updates = ported.module.apply(
        ported.variables, x.numpy(), train=True, mutable=["batch_stats"]
    )
    y_ref = ref.train()(x).detach().numpy()
    np.testing.assert_allclose(y_ans, y_ref, rtol=1e-5, atol=1e-5)
    stats = updates["batch_stats"]["1"]
    running_var = bn.state_dict()["running_var"].numpy()
    np.testing.assert_allclose(stats["var"], running_var, rtol=1e-5, atol=1e-6)
    y_eval = ported.module.apply({**ported.variables, **updates}, x.numpy(), train=False)
    y_eval_ref = ref.eval()(x).detach().numpy()
    np.testing.assert_allclose(y_eval, y_eval_ref, rtol=1e-5, atol=1e-5)

    # The layer alone names its own switch first.
    layer = jaxbn.BatchNorm2d(4)
    variables = layer.init(KEY, jnp.ones((2, 4, 3, 3)), use_running_average=True)
    with pytest.raises(ValueError, match=r"^BatchNorm2d is in a training step.*mutable="):
        layer.apply(variables, jnp.ones((2, 4, 3, 3)), use_running_average=False)


FLAX_MOMENTUM = r"momentum=0\.9 is the weight of the \*new\* batch"


def caught_warnings(
    action: Literal["always", "default"], run: Callable[[], None]
) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        run()
    return [w for w in caught if re.search(FLAX_MOMENTUM, str(w.message))]


def test_flax_looking_momentum_warns_once_for_init_and_apply():
    """Even where every warning is shown: once, at the line that builds the layer."""
    x = jnp.ones((2, 3, 4, 4))

    def init_and_apply():
        layer = jaxbn.BatchNorm2d(3, momentum=0.9, use_running_average=False)
        variables = layer.init(KEY, x)
        layer.apply(variables, x, mutable=["batch_stats"])
        jax.jit(lambda v: layer.apply(v, x, mutable=["batch_stats"]))(variables)

    caught = caught_warnings("always", init_and_apply)
    assert [(w.filename, w.lineno) for w in caught] == [
        (__file__, init_and_apply.__code__.co_firstlineno + 1)
    ]

    def nnx_steps():
        layer = jaxbn.nnx.BatchNorm2d(3, momentum=0.9)
        layer(x)
        layer(x)

    assert len(caught_warnings("always", nnx_steps)) == 1


def test_flax_looking_momentum_inside_a_model_warns_at_its_line_and_a_port_not_at_all():
    """Flax builds a model's layers anew in every trace, all on the user's one line (shown
    once by default); a port's layers carry the torch model's own momentum: no warning."""
    x = jnp.ones((2, 3, 4, 4))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            return jaxbn.BatchNorm2d(3, momentum=0.9, use_running_average=not train)(x)

    def init_and_apply():
        variables = Model().init(KEY, x, train=False)
        Model().apply(variables, x, train=True, mutable=["batch_stats"])

    (warning,) = caught_warnings("default", init_and_apply)
    assert warning.filename == __file__
    every = caught_warnings("always", init_and_apply)  # one per trace, never in jaxbn
    assert {(w.filename, w.lineno) for w in every} == {(warning.filename, warning.lineno)}

    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3, momentum=0.9))

    def port_and_train():
        ported = jaxbn.port(ref, torch.ones(2, 3, 4, 4))
        ported.module.apply(ported.variables, x, train=True, mutable=["batch_stats"])

    assert caught_warnings("always", port_and_train) == []
