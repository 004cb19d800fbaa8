"""The fused training path: its custom derivative against autodiff, its compiled HLO, and ``jaxbn bench``.

Speed itself is measured by ``jaxbn bench``, never asserted here.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

from .helpers import fast_lane, reference_batch_norm, run_jaxbn


def inputs(shape, axis, seed=0, offset=2.0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = jnp.asarray(rng.standard_normal(shape) * 1.5 + offset, jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(channels), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, scale, bias, cotangent


def jaxbn_train(x, scale, bias, axis):
    return jaxbn.batch_norm(x, None, scale, bias, training=True, axis=axis)[0]


@pytest.mark.parametrize(
    ("shape", "axis"),
    fast_lane(
        *(
            pytest.param(shape, axis)
            for shape, axis in [
                ((6, 4, 5, 3), 1),
                ((6, 5, 3, 4), -1),
                ((9, 7), 1),
                ((3, 2, 4, 2, 3), 1),
            ]
        )
    ),
)
def test_custom_vjp_matches_autodiff(shape, axis):
    x, scale, bias, g = inputs(shape, axis)
    _, vjp_ans = jax.vjp(lambda x, s, b: jaxbn_train(x, s, b, axis), x, scale, bias)
    _, vjp_ref = jax.vjp(
        lambda x, s, b: reference_batch_norm(x, s, b, axis % len(shape)), x, scale, bias
    )
    for name, ans, ref in zip(("dx", "dscale", "dbias"), vjp_ans(g), vjp_ref(g), strict=True):
        np.testing.assert_allclose(ans, ref, rtol=2e-5, atol=2e-5, err_msg=name)


def test_custom_vjp_without_scale_and_bias():
    x, _, _, g = inputs((8, 3, 4), 1)
    dx_ans = jax.grad(lambda x: jnp.sum(jaxbn_train(x, None, None, 1) * g))(x)
    dx_ref = jax.grad(lambda x: jnp.sum(reference_batch_norm(x, jnp.ones(3), jnp.zeros(3), 1) * g))(
        x
    )
    np.testing.assert_allclose(dx_ans, dx_ref, rtol=2e-5, atol=2e-5)


def test_second_order_gradients_match_autodiff():
    """Reverse-over-reverse (e.g. a gradient penalty) differentiates the backward pass."""
    x, scale, bias, g = inputs((6, 3, 4), 1, offset=0.5)

    def penalty(f):
        def loss(x, scale):
            grad = jax.grad(lambda x: jnp.sum(f(x, scale, bias, 1) * g))(x)
            return jnp.sum(jnp.square(grad))

        return jax.grad(loss, argnums=(0, 1))(x, scale)

    for name, ans, ref in zip(
        ("d2x", "d2scale"), penalty(jaxbn_train), penalty(reference_batch_norm), strict=True
    ):
        np.testing.assert_allclose(ans, ref, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.slow  # the fast lane has test_semantics' named-axis statistics
def test_custom_vjp_under_vmap_and_named_axis():
    x, scale, bias, g = inputs((4, 6, 3), 2)  # 4 independent batches of (6, 3)

    def loss(x):
        return jnp.sum(jaxbn_train(x, scale, bias, 1) * g[0])

    per_batch = jax.vmap(jax.grad(loss))(x)
    for i in range(4):
        expected = jax.grad(lambda x: jnp.sum(reference_batch_norm(x, scale, bias, 1) * g[0]))(x[i])
        np.testing.assert_allclose(per_batch[i], expected, rtol=2e-5, atol=2e-5)

    # Statistics over a named axis: the gradient of the whole (24, 3) batch.
    def shard_loss(x, g):
        y = jaxbn.batch_norm(x, None, scale, bias, training=True, axis=1, axis_name="i")[0]
        return jnp.sum(y * g)

    sharded = jax.vmap(jax.grad(shard_loss), axis_name="i")(x, g)
    whole = jax.grad(lambda x: jnp.sum(reference_batch_norm(x, scale, bias, 1) * g.reshape(24, 3)))(
        x.reshape(24, 3)
    )
    np.testing.assert_allclose(sharded.reshape(24, 3), whole, rtol=2e-5, atol=2e-5)


def full_size_buffers(fn, *args):
    """Buffers of the compiled program (its entry computation) as large as the input."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None
    entry = text[text.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    full = "f32[" + ",".join(map(str, args[0].shape)) + "]"
    lines = entry.splitlines()[1:]
    return [line.strip() for line in lines if f"= {full}" in line and "parameter(" not in line]


@pytest.mark.parametrize("axis", [1, -1])
def test_statistics_write_no_full_size_temporary(axis):
    """One sweep for both statistics: the only full-size buffer is the output itself."""
    shape = (8, 16, 10, 12) if axis == 1 else (8, 10, 12, 16)
    x, scale, bias, g = inputs(shape, axis)
    stats = jaxbn.BatchStats.create(16)
    forward = full_size_buffers(
        lambda x: jaxbn.batch_norm(x, stats, scale, bias, training=True, axis=axis), x
    )
    assert len(forward) == 1, forward  # y
    backward = full_size_buffers(
        lambda x, g: jax.vjp(lambda x: jaxbn_train(x, scale, bias, axis), x)[1](g), x, g
    )
    assert len(backward) == 1, backward  # dx


def test_two_pass_writes_a_full_size_temporary():
    """The check above can fail: Flax's two-pass variance materialises x - mean."""
    import flax.linen as nn

    x, *_ = inputs((8, 16, 10, 12), 1)
    layer = nn.BatchNorm(use_running_average=False, axis=1, use_fast_variance=False)
    variables = layer.init(jax.random.key(0), x)
    buffers = full_size_buffers(lambda x: layer.apply(variables, x, mutable=["batch_stats"]), x)
    assert len(buffers) >= 2, buffers


@pytest.mark.slow
def test_bench_command_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    result = run_jaxbn("bench", "--shape", "8x16x8x8", "--reps", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    for contender in (
        "jaxbn",
        "flax",
        "flax two-pass",
        "copy (floor)",
        "sum (floor)",
        "torch NCHW",
        "torch channels_last",
    ):
        assert contender in result.stdout
    assert re.search(r"8x16x8x8 nchw train\+grad: floor \d+\.\d+ ms", result.stdout)
    # The targets are set for 32x64x56x56, which this run did not time.
    assert "targets: set for 32x64x56x56, which this run did not time" in result.stdout
    assert "MISS" not in result.stdout
    report = json.loads(out.read_text())
    assert {t["mode"] for t in report["timings"]} == {"eval", "train", "train+grad"}
    assert {t["layout"] for t in report["timings"]} == {"nchw", "nhwc"}
    timing = report["timings"][0]
    assert timing["low"] <= timing["median"] <= timing["high"]
    assert "faults_per_call" in timing
    assert report["environment"]["backend"] == jax.default_backend()
    assert report["targets"] == []
    assert "contender time / jaxbn time" in report["ratios"]["x jaxbn"]
