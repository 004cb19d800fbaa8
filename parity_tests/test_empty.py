"""Empty inputs of every rank, as PyTorch treats them.

PyTorch returns an empty input unchanged (same shape and dtype), leaves the
running statistics as they are, and still counts a training step; it does
so before its channel and dtype checks. The first cases are PyTorch's own
sample inputs, copied from ``torch/testing/_internal``
(``common_methods_invocations.sample_inputs_batch_norm`` and
``common_modules.module_inputs_torch_nn_BatchNorm{1,2,3}d``; importing them
needs torch's test-only dependencies), then every rank with the zero on
every axis, through ``jaxbn.batch_norm``, the linen and the NNX layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
from jaxbn.parity import to_numpy, to_torch

from .helpers import TORCH_DTYPES, assert_close

# (input shape, running-statistics length or None, weight and bias or not, kwargs)
TORCH_OPINFO_SAMPLES = [
    ((0,), 0, False, {"training": True}),
    ((0,), 0, False, {"training": False}),
]
# (layer, num_features, eps, momentum, affine, input shape)
TORCH_MODULEINFO_SAMPLES = [
    ("BatchNorm1d", 5, 1e-3, 0.3, False, (0, 5, 9)),
    ("BatchNorm2d", 5, 1e-3, 0.3, False, (0, 5, 2, 2)),
    ("BatchNorm3d", 5, 1e-3, 0.3, False, (0, 5, 2, 2, 2)),
]
FUNCTIONAL_SHAPES = [
    (0,),
    (0, 3),
    (4, 0),
    (0, 0),
    (0, 3, 4),
    (2, 3, 0),
    (2, 0, 4),
    (0, 3, 2, 2),
    (2, 3, 0, 2),
    (2, 0, 2, 2),
    (0, 3, 2, 2, 2),
    (2, 3, 2, 2, 0),
    (2, 0, 1, 1, 1),
    (0, 3, 1, 2, 1, 2),
]
LAYER_SHAPES = {
    "BatchNorm1d": [(0, 3), (0, 3, 4), (2, 3, 0), (4, 0)],
    "BatchNorm2d": [(0, 3, 2, 2), (2, 3, 0, 2), (2, 0, 2, 2)],
    "BatchNorm3d": [(0, 3, 2, 2, 2), (2, 3, 2, 0, 2), (2, 0, 1, 1, 1)],
}
DTYPES = ["float32", "float16", "bfloat16"]


def channels(shape):
    return shape[1] if len(shape) > 1 else 0


def statistics(c, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)


def torch_functional(x, mean, var, weight, bias, dtype="float32", **kwargs: Any):
    """F.batch_norm with gradients; the buffers are updated in place (or not)."""
    xt = to_torch(x).to(TORCH_DTYPES[dtype]).requires_grad_(True)
    params = [None if p is None else to_torch(p).requires_grad_(True) for p in (weight, bias)]
    buffers = [None if b is None else to_torch(b) for b in (mean, var)]
    y = torch.nn.functional.batch_norm(xt, buffers[0], buffers[1], params[0], params[1], **kwargs)
    y.sum().backward()
    grads = [None if p is None or p.grad is None else to_numpy(p.grad) for p in params]
    return to_numpy(y), [None if b is None else to_numpy(b) for b in buffers], grads


def check_functional(shape, dtype, stats_length, affine, training, momentum=0.1, eps=1e-5):
    x = np.zeros(shape, np.float32)
    x_ans = jnp.asarray(x, dtype)
    c = channels(shape)
    mean, var = statistics(stats_length) if stats_length is not None else (None, None)
    weight = np.linspace(0.5, 2, c).astype(np.float32) if affine else None
    bias = np.linspace(-1, 1, c).astype(np.float32) if affine else None
    y_ref, (mean_ref, var_ref), (dw_ref, db_ref) = torch_functional(
        x,
        mean,
        var,
        weight,
        bias,
        dtype,
        training=training,
        momentum=momentum,
        eps=eps,
    )
    stats = None
    if mean is not None:
        stats = jaxbn.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(5, jnp.int32))

    def loss(x, scale, bias):
        y, new = jaxbn.batch_norm(
            x, stats, scale, bias, training=training, momentum=momentum, eps=eps, axis=1
        )
        return jnp.sum(y.astype(jnp.float32)), (y, new)

    args = (x_ans, weight, bias)
    argnums = (0, 1, 2) if affine else (0,)
    grads, (y, new) = jax.grad(loss, argnums, has_aux=True)(*args)
    what = f"{shape} {dtype} {'train' if training else 'eval'}"
    assert y.shape == y_ref.shape, what
    assert str(y.dtype) == dtype == str(y_ref.dtype).replace("torch.", ""), what
    assert grads[0].shape == shape, what
    assert grads[0].dtype == x_ans.dtype, what
    if affine:
        assert_close(grads[1], dw_ref, what=f"{what} dscale")
        assert_close(grads[2], db_ref, what=f"{what} dbias")
    if stats is None:
        assert new is None, what
        return
    assert new is not None
    np.testing.assert_array_equal(new.mean, mean_ref, err_msg=what)
    np.testing.assert_array_equal(new.var, var_ref, err_msg=what)
    assert int(new.num_batches_tracked) == 5 + training, what  # a step is counted


@pytest.mark.parametrize(("shape", "stats_length", "affine", "kwargs"), TORCH_OPINFO_SAMPLES)
def test_torch_opinfo_samples(shape, stats_length, affine, kwargs):
    check_functional(shape, "float32", stats_length, affine, **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", FUNCTIONAL_SHAPES, ids=str)
def test_functional_every_rank(shape, dtype, training):
    c = channels(shape)
    # PyTorch fails with an IndexError on zero-channel weights; see the layer test.
    check_functional(shape, dtype, c, affine=c > 0, training=training)
    if training:
        check_functional(shape, dtype, None, affine=False, training=True)
    # An empty input returns before the channel check: statistics of another length pass.
    check_functional(shape, dtype, 7, affine=False, training=training)


def torch_layer(layer, c, *, affine=True, track=True, momentum=0.1, eps=1e-5):
    torch.manual_seed(0)
    ref = getattr(torch.nn, layer)(
        c, eps=eps, momentum=momentum, affine=affine, track_running_stats=track
    )
    if track:
        mean, var = statistics(c)
        with torch.no_grad():
            ref.running_mean.copy_(to_torch(mean))
            ref.running_var.copy_(to_torch(var))
            ref.num_batches_tracked.fill_(5)
    return ref


def run_torch_layer(ref, x, training):
    ref.train(training)
    xt = x.requires_grad_(True)
    y = ref(xt)
    y.float().sum().backward()
    state = {k: to_numpy(v) for k, v in ref.state_dict().items()}
    grads = {k: to_numpy(p.grad) for k, p in ref.named_parameters() if p.grad is not None}
    return to_numpy(y), state, grads


def run_linen(layer, ref, variables, x, training, momentum, eps):
    c = ref.num_features
    module = getattr(jaxbn, layer)(
        c,
        momentum=momentum,
        eps=eps,
        affine=ref.affine,
        track_running_stats=ref.track_running_stats,
    )

    def loss(params):
        y, updates = module.apply(
            {**variables, "params": params},
            x,
            use_running_average=not training if ref.track_running_stats else None,
            mutable=["batch_stats"],
        )
        return jnp.sum(y.astype(jnp.float32)), (y, updates.get("batch_stats", {}))

    grads, (y, stats) = jax.grad(loss, has_aux=True)(variables.get("params", {}))
    return y, stats, grads


def run_nnx(layer, ref, variables, x, training, momentum, eps):
    module = getattr(jaxbn.nnx, layer)(
        ref.num_features,
        momentum=momentum,
        eps=eps,
        affine=ref.affine,
        track_running_stats=ref.track_running_stats,
    )
    jaxbn.nnx.update(module, variables)
    module.train() if training else module.eval()
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        y = m(x)
        _, _, after = nnx.split(m, nnx.Param, ...)
        return jnp.sum(y.astype(jnp.float32)), (y, after)

    grads, (y, after) = jax.grad(loss, has_aux=True)(params)
    stats = {k: v[...] for k, v in nnx.to_flat_state(after)}
    grads = {k[-1]: v[...] for k, v in nnx.to_flat_state(grads)}
    return y, {k[-1]: v for k, v in stats.items()}, grads


TORCH_KEYS = {"mean": "running_mean", "var": "running_var"}


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize(
    ("layer", "c", "eps", "momentum", "affine", "shape"), TORCH_MODULEINFO_SAMPLES
)
def test_torch_moduleinfo_samples(api, layer, c, eps, momentum, affine, shape):
    for training in (True, False):
        check_layer(api, layer, shape, "float32", affine, True, momentum, training, eps=eps)


def check_layer(api, layer, shape, dtype, affine, track, momentum, training, eps=1e-5):
    c = channels(shape)
    ref = torch_layer(layer, c, affine=affine, track=track, momentum=momentum, eps=eps)
    variables = jaxbn.from_torch(ref)  # before torch's step changes the buffers
    x_ans = jnp.zeros(shape, dtype)
    y_ref, state_ref, grads_ref = run_torch_layer(
        ref, torch.zeros(shape, dtype=TORCH_DTYPES[dtype]), training
    )
    run = {"linen": run_linen, "nnx": run_nnx}[api]
    y, stats, grads = run(layer, ref, variables, x_ans, training, momentum, eps)
    what = f"{api} {layer} {shape} {dtype} {'train' if training else 'eval'}"
    assert y.shape == y_ref.shape, what
    assert str(y.dtype) == dtype == str(y_ref.dtype).replace("torch.", ""), what
    for ours, theirs in (("scale", "weight"), ("bias", "bias")):
        if theirs in grads_ref:
            assert_close(grads[ours], grads_ref[theirs], what=f"{what} d{ours}")
        else:
            assert ours not in grads, what
    if not track:
        assert not stats, what
        return
    for ours in ("mean", "var"):
        np.testing.assert_array_equal(stats[ours], state_ref[TORCH_KEYS[ours]], err_msg=what)
    assert int(stats["num_batches_tracked"]) == int(state_ref["num_batches_tracked"]), what


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    ("layer", "shape"), [(k, s) for k, shapes in LAYER_SHAPES.items() for s in shapes], ids=str
)
def test_layers_every_rank(layer, shape, momentum, api):
    c = channels(shape)
    for dtype in DTYPES:
        for training in (True, False):
            for affine, track in ((c > 0, True), (False, False)):
                check_layer(api, layer, shape, dtype, affine, track, momentum, training)


def test_zero_channel_layer_with_parameters_returns_the_empty_input():
    """A deliberate difference: PyTorch's affine layer with no channels fails with an IndexError."""
    ref = torch.nn.BatchNorm2d(0)
    with pytest.raises(IndexError):
        ref(torch.zeros(2, 0, 2, 2))
    module = jaxbn.BatchNorm2d(0)
    x = jnp.zeros((2, 0, 2, 2))
    variables = module.init(jax.random.key(0), x, use_running_average=True)
    y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    assert y.shape == x.shape
    assert int(np.asarray(updates["batch_stats"]["num_batches_tracked"])) == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_every_rank(training):
    """jaxbn.BatchNorm(axis=-1) on the transposed input: the same as torch on (N, C, ...)."""
    for shape in FUNCTIONAL_SHAPES[1:]:
        c = channels(shape)
        mean, var = statistics(c)
        stats = jaxbn.BatchStats(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(5, jnp.int32))
        x = jnp.zeros(shape[:1] + shape[2:] + shape[1:2])
        y, new = jaxbn.batch_norm(x, stats, training=training, axis=-1)
        y_ref, (mean_ref, var_ref), _ = torch_functional(
            np.zeros(shape, np.float32), mean, var, None, None, training=training
        )
        assert y.shape == np.moveaxis(y_ref, 1, -1).shape, shape
        np.testing.assert_array_equal(new.mean, mean_ref)
        np.testing.assert_array_equal(new.var, var_ref)
        assert int(new.num_batches_tracked) == 5 + training
