"""jaxbn.nnx: bit-equal to the linen modules, at parity with torch, convertible."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
from jaxbn.parity import (
    KINDS,
    Options,
    cotangents,
    drifting_batches,
    make_pair,
    to_torch,
    torch_step,
)

from .helpers import assert_close, compare_steps

NNX_CLASSES = {
    "BatchNorm": jaxbn.nnx.BatchNorm,
    "BatchNorm1d": jaxbn.nnx.BatchNorm1d,
    "BatchNorm2d": jaxbn.nnx.BatchNorm2d,
    "BatchNorm3d": jaxbn.nnx.BatchNorm3d,
}
OPTIONS = {
    "affine": {},
    "momentum=None": {"momentum": None},
    "no-bias": {"use_bias": False},
    "no-affine-untracked": {"affine": False, "track_running_stats": False},
}


def nnx_twin(kind, options: dict, linen_variables):
    """The NNX layer for a parity kind, holding the linen layer's variables."""
    cls = NNX_CLASSES[kind.jax_layer]
    extra = {"axis": -1} if kind.channels_last else {}
    layer = cls(kind.channels, **options, **extra)
    jaxbn.nnx.update(layer, linen_variables)
    return layer


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_nnx_is_bit_equal_to_linen(kind, options):
    _, linen_layer, variables = make_pair(kind, Options(**options))
    layer = nnx_twin(kind, options, variables)
    batches = drifting_batches(kind, 5, "float32")
    for t, x in enumerate(batches):
        training = t < 4
        y_linen, updates = linen_layer.apply(
            variables, x, use_running_average=not training, mutable=["batch_stats"]
        )
        variables = {**variables, **updates}
        (layer.train if training else layer.eval)()
        y_nnx = layer(x)
        np.testing.assert_array_equal(np.asarray(y_nnx), np.asarray(y_linen), err_msg=f"step {t}")
        nnx_state = jaxbn.nnx.variables(layer)
        for collection, leaves in variables.items():
            for name, value in leaves.items():
                np.testing.assert_array_equal(
                    nnx_state[collection][name], value, err_msg=f"step {t} {name}"
                )


@pytest.mark.parametrize("kind", ["2d", "channels-last"])
def test_nnx_matches_torch_under_nnx_jit(kind):
    """Outputs, all gradients and running statistics, through nnx.jit and nnx.grad."""
    kind = KINDS[kind]
    ref, _, variables = make_pair(kind, Options(momentum=None))
    layer = nnx_twin(kind, {"momentum": None}, variables)
    batches = drifting_batches(kind, 6, "float32")

    @nnx.jit
    def step(layer, x, g):
        def loss(layer, x):
            y = layer(x)
            return jnp.sum(y * g), y

        (grads_layer, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return y, dx, grads_layer

    for t, (x, g) in enumerate(zip(batches, cotangents(batches), strict=True)):
        training = t < 4
        (layer.train if training else layer.eval)()
        y, dx, grads = step(layer, jnp.asarray(x), jnp.asarray(g))
        step_ref = torch_step(
            ref, kind.to_torch_layout(x), kind.to_torch_layout(g), training=training
        )
        state = jaxbn.nnx.variables(layer)
        answer = type(step_ref)(
            y,
            {"x": dx, "scale": grads.scale[...], "bias": grads.bias[...]},
            dict(state["batch_stats"]),
        )
        compare_steps(answer, step_ref, kind, what=f"step {t}")


def test_nnx_train_eval_switching_and_call_override():
    layer = jaxbn.nnx.BatchNorm1d(3)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)) * 2 + 1, jnp.float32)
    layer(x)
    assert int(layer.num_batches_tracked[...]) == 1
    layer.eval()
    layer(x)
    assert int(layer.num_batches_tracked[...]) == 1
    layer(x, use_running_average=False)
    assert int(layer.num_batches_tracked[...]) == 2
    layer.train()
    layer(x)
    assert int(layer.num_batches_tracked[...]) == 3


def test_nnx_errors_match_linen():
    with pytest.raises(
        ValueError, match=r"expected 4D input \(got 3D input\): BatchNorm2d expects \(N, C, H, W\)"
    ):
        jaxbn.nnx.BatchNorm2d(3)(jnp.ones((2, 3, 4)))
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        jaxbn.nnx.BatchNorm2d(3)(jnp.ones((2, 4, 1, 1)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        jaxbn.nnx.BatchNorm1d(3)(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"unknown collections \['intermediates'\]"):
        jaxbn.nnx.update(jaxbn.nnx.BatchNorm1d(3), {"intermediates": {}})


def test_nnx_converts_from_and_to_torch():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(4)
    ref.train()
    for _ in range(3):
        ref(torch.randn(8, 4, 3, 3) * 3 + 1)
    model = jaxbn.nnx.BatchNorm2d(4)
    jaxbn.nnx.update(model, jaxbn.from_torch(ref, model))  # strict against the NNX model
    model.eval()
    ref.eval()
    x = np.random.default_rng(1).standard_normal((2, 4, 3, 3)).astype(np.float32)
    assert_close(model(x), ref(to_torch(x)), what="eval output")
    state = jaxbn.to_torch(model, ref)
    for key, value in ref.state_dict().items():
        assert torch.equal(state[key], value), key
    torch.nn.BatchNorm2d(4).load_state_dict(state, strict=True)


def test_nnx_layer_inside_a_model_converts_by_attribute_path():
    """Every value lands at its attribute path and comes back bit-exact; the outputs agree."""

    class Net(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 4, (3, 3), padding="VALID", use_bias=False, rngs=nnx.Rngs(0))
            self.bn = jaxbn.nnx.BatchNorm(4)

        def __call__(self, x):
            return self.bn(self.conv(x))

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    torch.manual_seed(0)
    ref = TorchNet()
    with torch.no_grad():  # parameters and statistics that differ from any initialiser
        ref.bn.weight.uniform_(0.5, 2.0)
        ref.bn.bias.uniform_(-1.0, 1.0)
    for _ in range(3):
        ref(torch.randn(8, 3, 6, 6) * 2 + 1)
    model = Net()
    jaxbn.nnx.update(model, jaxbn.from_torch(ref, model))
    np.testing.assert_array_equal(
        model.conv.kernel[...], ref.conv.weight.detach().numpy().transpose(2, 3, 1, 0)
    )
    for name, torch_name in [("scale", "weight"), ("bias", "bias")]:
        np.testing.assert_array_equal(
            getattr(model.bn, name)[...], getattr(ref.bn, torch_name).detach().numpy()
        )
    for name in ("mean", "var"):
        np.testing.assert_array_equal(
            getattr(model.bn, name)[...], getattr(ref.bn, f"running_{name}").numpy()
        )
    assert int(model.bn.num_batches_tracked[...]) == 3

    model.eval()
    ref.eval()
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
    with torch.no_grad():
        y_ref = ref(to_torch(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert_close(model(x), y_ref, what="eval output")

    state = jaxbn.to_torch(model, TorchNet())
    assert set(state) == set(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(state[key], value), key
