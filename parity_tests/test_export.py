"""``jax.export`` of training and eval steps with symbolic shapes, against PyTorch.

One exported program per step, traced once with
``jax.export.symbolic_shape('b, C, H, W')``, then called at several batch
sizes (and channel counts and spatial sizes): outputs, gradients and running
statistics match ``torch.nn.BatchNorm2d`` at each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import export

import jaxbn
from jaxbn.parity import to_numpy, to_torch

from .helpers import assert_close

SIZES = [(2, 3, 4, 5), (5, 3, 1, 1), (7, 2, 3, 1), (1, 4, 2, 2)]  # (b, C, H, W) at call time
MOMENTUM = 0.3


def specs(shape: str | tuple[int, ...] = "b, C, H, W"):
    """Abstract arguments of a step: x and g of ``shape``, (C,) vectors, statistics."""
    dims = export.symbolic_shape(shape) if isinstance(shape, str) else shape
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct(tuple(dims), f32)
    vector = jax.ShapeDtypeStruct((dims[1],), f32)
    stats = jaxbn.BatchStats._make((vector, vector, jax.ShapeDtypeStruct((), jnp.int32)))
    return x, vector, vector, stats, x


def data(size, seed=0):
    rng = np.random.default_rng(seed)
    c = size[1]
    return {
        "x": (rng.standard_normal(size) * 2 + 1).astype(np.float32),
        "g": rng.standard_normal(size).astype(np.float32),
        "scale": rng.uniform(0.5, 2, c).astype(np.float32),
        "bias": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.5, 2, c).astype(np.float32),
        "count": np.asarray(3, np.int32),
    }


def torch_step(d, *, training):
    layer = torch.nn.BatchNorm2d(d["x"].shape[1], momentum=MOMENTUM)
    with torch.no_grad():
        for name, value in (
            ("weight", d["scale"]),
            ("bias", d["bias"]),
            ("running_mean", d["mean"]),
            ("running_var", d["var"]),
        ):
            getattr(layer, name).copy_(to_torch(value))
        dict(layer.named_buffers())["num_batches_tracked"].fill_(int(d["count"]))
    layer.train(training)
    x = to_torch(d["x"]).requires_grad_(True)
    y = layer(x)
    y.backward(to_torch(d["g"]))
    dx, dscale, dbias = x.grad, layer.weight.grad, layer.bias.grad
    named = dict(layer.named_buffers())
    buffers = {"mean": named["running_mean"], "var": named["running_var"]}
    buffers["count"] = named["num_batches_tracked"]
    assert dx is not None
    assert dscale is not None
    assert dbias is not None
    return {
        "y": to_numpy(y),
        "dx": to_numpy(dx),
        "dscale": to_numpy(dscale),
        "dbias": to_numpy(dbias),
        **{k: to_numpy(v) for k, v in buffers.items()},
    }


def functional_step(training):
    def step(x, scale, bias, stats, g):
        def loss(x, scale, bias):
            y, new = jaxbn.batch_norm(
                x, stats, scale, bias, training=training, momentum=MOMENTUM, axis=1
            )
            return jnp.sum(y * g), (y, new)

        (dx, dscale, dbias), (y, new) = jax.grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias)
        return {
            "y": y,
            "dx": dx,
            "dscale": dscale,
            "dbias": dbias,
            "mean": new.mean,
            "var": new.var,
            "count": new.num_batches_tracked,
        }

    return step


def linen_step(training):
    layer = jaxbn.BatchNorm2d(momentum=MOMENTUM)

    def step(x, scale, bias, stats, g):
        batch_stats = {"mean": stats.mean, "var": stats.var, "num_batches_tracked": stats[2]}

        def loss(x, params):
            y, updates = layer.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                use_running_average=not training,
                mutable=["batch_stats"],
            )
            return jnp.sum(y * g), (y, updates["batch_stats"])

        params = {"scale": scale, "bias": bias}
        (dx, dparams), (y, new) = jax.grad(loss, (0, 1), has_aux=True)(x, params)
        return {
            "y": y,
            "dx": dx,
            "dscale": dparams["scale"],
            "dbias": dparams["bias"],
            "mean": new["mean"],
            "var": new["var"],
            "count": new["num_batches_tracked"],
        }

    return step


def exported(step):
    # (Serialising it needs the flatbuffers package, which jaxbn does not depend on.)
    return export.export(jax.jit(step))(*specs())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("api", ["functional", "linen"])
def test_exported_step_matches_torch_at_every_batch_size(api, training):
    step = {"functional": functional_step, "linen": linen_step}[api](training)
    program = exported(step)
    for seed, size in enumerate(SIZES):
        if training and np.prod(size) // size[1] == 1:
            continue  # one value per channel: see the test below
        d = data(size, seed)
        stats = jaxbn.BatchStats(*(jnp.asarray(d[k]) for k in ("mean", "var", "count")))
        out = program.call(d["x"], d["scale"], d["bias"], stats, d["g"])
        ref = torch_step(d, training=training)
        for name, desired in ref.items():
            assert out[name].dtype == (np.int32 if name == "count" else np.float32), name
            assert_close(out[name], desired.astype(out[name].dtype), what=f"{size} {name}")


def test_one_value_per_channel_is_raised_where_the_size_is_known():
    step = jax.jit(functional_step(True))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        export.export(step)(*specs((1, 3, 1, 1)))
    # A symbolic batch with a known spatial size of 2 always has > 1 value: exported fine.
    export.export(step)(*specs("b, C, 2, 1"))
    export.export(jax.jit(functional_step(False)))(*specs((1, 3, 1, 1)))  # eval: fine


def test_one_value_per_channel_at_run_time_keeps_the_running_statistics():
    """Unknowable at trace time; as for a mask, the statistics stay, the step counts."""
    d = data((1, 3, 1, 1))
    stats = jaxbn.BatchStats(*(jnp.asarray(d[k]) for k in ("mean", "var", "count")))
    out = exported(functional_step(True)).call(d["x"], d["scale"], d["bias"], stats, d["g"])
    np.testing.assert_array_equal(out["mean"], d["mean"])
    np.testing.assert_array_equal(out["var"], d["var"])
    assert int(out["count"]) == 4
    np.testing.assert_allclose(out["y"].reshape(-1), d["bias"], rtol=0, atol=0)
