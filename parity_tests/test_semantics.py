"""Edge cases of PyTorch's semantics, and the functional core under transforms."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.parity import KINDS, Options, jax_step_fn, make_pair, to_torch, torch_step

from .helpers import assert_close, compare_steps, run_case


def test_init_is_not_a_training_step():
    layer = jaxbn.BatchNorm2d(3, momentum=None)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 2, 2)) * 5 + 7, jnp.float32)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
    assert np.asarray(variables["batch_stats"]["num_batches_tracked"]) == 0


def test_init_accepts_a_single_example():
    """Flax models are often initialised with one example; that is not training."""
    layer = jaxbn.BatchNorm1d(3, use_running_average=False)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))
    assert jax.tree.map(jnp.shape, variables)["batch_stats"]["mean"] == (3,)


def test_untracked_layer_needs_no_mutable_and_no_flag():
    ref = torch.nn.BatchNorm2d(3, track_running_stats=False)
    layer = jaxbn.BatchNorm2d(3, track_running_stats=False)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    variables = layer.init(jax.random.key(0), x)
    assert set(variables) == {"params"}
    for training in (True, False):
        ref.train(training)
        assert_close(layer.apply(variables, x), ref(to_torch(x)), what=f"training={training}")
        assert_close(
            layer.apply(variables, x, use_running_average=not training),
            ref(to_torch(x)),
            what=f"training={training}",
        )


def test_eval_needs_no_mutable_and_changes_nothing():
    ref, layer, variables = make_pair(KINDS["2d"], Options())
    x = np.random.default_rng(0).standard_normal(KINDS["2d"].shape).astype(np.float32)
    ref.eval()
    assert_close(layer.apply(variables, x, use_running_average=True), ref(to_torch(x)), what="y")
    _, updates = layer.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
    for name, value in variables["batch_stats"].items():
        np.testing.assert_array_equal(updates["batch_stats"][name], value, err_msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "tracking",
    [{"momentum": 0.1}, {"momentum": None}, {"track_running_stats": False}],
    ids=["0.1", "None", "untracked"],
)
@pytest.mark.parametrize("kind", ["1d-NC", "2d"])
def test_empty_batch_matches_torch(kind, tracking, training):
    """N=0: empty output, statistics unchanged (never NaN), a training step counted."""
    kind = KINDS[kind]
    ref, layer, variables = make_pair(kind, Options(**tracking))
    x = np.zeros((0, *kind.shape[1:]), np.float32)
    step_ref = torch_step(ref, x, x, training=training)
    step_ans, _ = jax_step_fn(layer, training=training, jit=True)(variables, x, x)
    compare_steps(step_ans, step_ref, kind, what="empty batch")
    if "momentum" in tracking:
        assert not np.isnan(np.asarray(step_ans.stats["var"])).any()
        assert int(step_ans.stats["num_batches_tracked"]) == (4 if training else 3)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((0, 4), np.float32), "channel count differs"),
        (np.zeros((0, 3), np.int32), "integer input"),
    ],
)
def test_empty_batch_skips_the_checks_torch_skips(x, message):
    """PyTorch returns before its channel and dtype checks when the input is empty."""
    ref = torch.nn.BatchNorm1d(3)
    y_ref = ref(to_torch(x))
    y, stats = jaxbn.batch_norm(x, jaxbn.BatchStats.create(3), training=True, axis=1)
    assert y.shape == tuple(y_ref.shape), message
    assert str(y.dtype) == str(y_ref.dtype).removeprefix("torch."), message
    assert int(stats.num_batches_tracked) == int(ref.state_dict()["num_batches_tracked"]) == 1


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_extreme_momentum_matches_torch(momentum):
    run_case(KINDS["2d"], Options(momentum=momentum), jit=True)


@pytest.mark.parametrize("training", [True, False])
def test_nan_and_inf_propagate_like_torch(training):
    """A poisoned channel stays poisoned, in the output and the statistics."""
    kind = KINDS["2d"]
    ref, layer, variables = make_pair(kind, Options())
    rng = np.random.default_rng(0)
    x = rng.standard_normal(kind.shape).astype(np.float32)
    x[0, 1, 0, 0] = np.nan
    x[1, 2, 0, 0] = np.inf
    x[2, 3, 1, 1] = -np.inf
    g = rng.standard_normal(kind.shape).astype(np.float32)
    step = jax_step_fn(layer, training=True, jit=True)
    for t in range(2):
        step_ref = torch_step(ref, x, g, training=training)
        step_ans, variables = (
            step(variables, x, g)
            if training
            else (jax_step_fn(layer, training=False, jit=True)(variables, x, g))
        )
        compare_steps(step_ans, step_ref, kind, what=f"step {t}")
    if training:
        # Later clean batches do not heal the running statistics.
        clean = rng.standard_normal(kind.shape).astype(np.float32)
        step_ans, _ = step(variables, clean, g)
        compare_steps(step_ans, torch_step(ref, clean, g, training=True), kind, what="clean")
        assert np.isnan(np.asarray(step_ans.stats["mean"])[1])


def test_num_batches_tracked_dtype_follows_x64():
    layer = jaxbn.BatchNorm1d(3, use_running_average=False)
    x = jnp.ones((4, 3))
    variables = layer.init(jax.random.key(0), x)
    assert np.asarray(variables["batch_stats"]["num_batches_tracked"]).dtype == np.int32
    with jax.enable_x64(True):
        variables = layer.init(jax.random.key(0), x)
        assert np.asarray(variables["batch_stats"]["num_batches_tracked"]).dtype == np.int64
        assert torch.nn.BatchNorm1d(3).state_dict()["num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int64])
def test_num_batches_tracked_saturates_instead_of_wrapping(dtype, x64):
    top = jnp.iinfo(dtype).max
    stats = jaxbn.BatchStats(
        jnp.zeros(3, jnp.float32), jnp.ones(3, jnp.float32), jnp.asarray(top - 1, dtype)
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
    step = jax.jit(lambda s: jaxbn.batch_norm(x, s, training=True, momentum=None, axis=1)[1])
    stats = step(stats)
    assert int(stats.num_batches_tracked) == top
    stats = step(stats)
    assert int(stats.num_batches_tracked) == top
    assert stats.num_batches_tracked.dtype == dtype
    # The cumulative average keeps a tiny positive weight; PyTorch's wraps negative.
    assert np.isfinite(np.asarray(stats.mean)).all()


def test_functional_core_under_jit_vmap_and_grad():
    """The same numbers eagerly, jitted, vmapped over independent batches, and differentiated."""
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.standard_normal((3, 6, 4, 5)), jnp.float32)  # 3 independent batches
    stats = jaxbn.BatchStats.create(4)
    scale = jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(4), jnp.float32)

    def f(x, scale, bias):
        return jaxbn.batch_norm(x, stats, scale, bias, training=True, axis=1)

    eager = [f(x, scale, bias) for x in xs]
    jitted = jax.jit(f)(xs[0], scale, bias)
    mapped = jax.vmap(f, in_axes=(0, None, None))(xs, scale, bias)
    for i, (y, new_stats) in enumerate(eager):
        np.testing.assert_allclose(mapped[0][i], y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mapped[1].var[i], new_stats.var, rtol=1e-6)
    np.testing.assert_allclose(jitted[0], eager[0][0], rtol=1e-6, atol=1e-6)

    # Gradients against torch, through a random cotangent.
    g = rng.standard_normal(xs[0].shape).astype(np.float32)
    dx, dscale, dbias = jax.grad(lambda *a: jnp.sum(f(*a)[0] * g), argnums=(0, 1, 2))(
        xs[0], scale, bias
    )
    x_ref = to_torch(xs[0]).requires_grad_(True)
    w_ref, b_ref = to_torch(scale).requires_grad_(True), to_torch(bias).requires_grad_(True)
    y_ref = torch.nn.functional.batch_norm(x_ref, None, None, w_ref, b_ref, training=True)
    y_ref.backward(to_torch(g))
    assert_close(dx, x_ref.grad, what="dx")
    assert_close(dscale, w_ref.grad, what="dscale")
    assert_close(dbias, b_ref.grad, what="dbias")


def test_running_statistics_are_not_differentiated():
    """Like PyTorch's buffers, the updated statistics carry no gradient."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32)
    stats = jaxbn.BatchStats.create(3)
    grad = jax.grad(lambda x: jaxbn.batch_norm(x, stats, training=True, axis=1)[1].var.sum())(x)
    np.testing.assert_array_equal(grad, np.zeros_like(x))


def test_config_is_static_and_checked_at_trace_time():
    f = jax.jit(lambda x: jaxbn.batch_norm(x, None, training=True, axis=1)[0])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        f.trace(jax.ShapeDtypeStruct((1, 3), jnp.float32))


def test_dtype_field_casts_the_output():
    layer = jaxbn.BatchNorm1d(3, dtype=jnp.bfloat16, use_running_average=True)
    x = jnp.ones((4, 3))
    y = layer.apply(layer.init(jax.random.key(0), x), x)
    assert np.asarray(y).dtype == jnp.bfloat16


def test_custom_initialisers():
    layer = jaxbn.BatchNorm(
        scale_init=jax.nn.initializers.constant(2.0),
        bias_init=jax.nn.initializers.constant(-1.0),
        use_running_average=True,
    )
    params = layer.init(jax.random.key(0), jnp.ones((2, 5)))["params"]
    np.testing.assert_array_equal(params["scale"], np.full(5, 2.0))
    np.testing.assert_array_equal(params["bias"], np.full(5, -1.0))


def test_axis_name_statistics_equal_the_global_batch():
    """Batch statistics over a named (vmapped) axis equal those of the whole batch."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 6, 3)) * 3 + 5, jnp.float32)  # 4 shards of 6
    stats = jaxbn.BatchStats.create(3)

    def shard(x):
        return jaxbn.batch_norm(x, stats, training=True, axis=1, axis_name="batch")

    y_shards, stats_shards = jax.vmap(shard, axis_name="batch")(x)
    y_whole, stats_whole = jaxbn.batch_norm(x.reshape(24, 3), stats, training=True, axis=1)
    np.testing.assert_allclose(y_shards.reshape(24, 3), y_whole, rtol=1e-6, atol=1e-6)
    for name in ("mean", "var"):
        for i in range(4):
            np.testing.assert_allclose(
                getattr(stats_shards, name)[i], getattr(stats_whole, name), rtol=1e-6
            )
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        jax.vmap(shard, axis_name="batch")(x[:1, :1])


def test_untracked_layer_initialises_like_it_applies(x64):
    """No statistics: init uses batch statistics, as every later call does."""
    layer = jaxbn.BatchNorm1d(3, affine=False, track_running_stats=False)
    x = np.random.default_rng(0).standard_normal((4, 3))  # float64; the layer has no variables
    y_init, variables = layer.init_with_output(jax.random.key(0), x)
    y_ref = torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False).double()(to_torch(x))
    assert_close(y_init, y_ref, what="init output")
    assert_close(layer.apply(variables, x), y_ref, what="apply output")


def test_per_channel_arrays_are_matched_by_element_count_like_torch():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    scale, bias = np.full((1, 3), 2.0, np.float32), np.ones((3, 1), np.float32)
    y_ref = torch.nn.functional.batch_norm(
        to_torch(x), None, None, to_torch(scale), to_torch(bias), training=True
    )
    y, _ = jaxbn.batch_norm(x, None, scale, bias, training=True, axis=1)
    assert_close(y, y_ref, what="y")


def test_counter_must_be_an_integer_array():
    stats = jaxbn.BatchStats(jnp.zeros(3), jnp.ones(3), 0)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"num_batches_tracked must be an integer scalar array, got 0"
    ):
        jaxbn.batch_norm(jnp.ones((4, 3)), stats, training=True, axis=1)


@pytest.mark.parametrize(
    ("shape", "devices"),
    [((2**31 + 7, 1), 1), ((2**16 + 1, 1, 2**15 + 3), 1), ((2**29 + 3, 1), 8)],
    ids=["one-axis", "two-axes", "over-devices"],
)
def test_more_than_int32_values_per_channel_are_counted_exactly(shape, devices):
    """Counts beyond 2**31 (without x64) never wrap: the count is a Python int, exact.

    Such a batch is too large to run here, so the count is read where the
    training step takes it: the element count, and the constant it puts
    into the traced program (float32: the nearest float32 of the count).
    """
    from jaxbn._functional import _element_count

    per_device = math.prod(shape) // shape[1]
    expected = per_device * devices
    assert expected > 2**31
    stats = jaxbn.BatchStats.create(1)
    axis_name = None if devices == 1 else "d"

    def step(x):
        return jaxbn.batch_norm(x, stats, training=True, axis=1, axis_name=axis_name)

    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    f = step
    if devices == 1:
        assert _element_count(x, 1, None, None) == expected  # type: ignore[arg-type]
    else:
        f = jax.vmap(step, axis_name="d", out_axes=(0, None))
        x = jax.ShapeDtypeStruct((devices, *shape), jnp.float32)
    program = str(jax.make_jaxpr(f)(x))
    constants = {float(c) for c in re.findall(r"(?<![\w.])(-?\d{6,}\.\d*)(?=:f32)", program)}
    assert float(np.float32(expected)) in constants, constants
    assert all(c > 0 for c in constants), constants
