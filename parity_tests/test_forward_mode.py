"""Forward-mode autodiff through a training step, and what reverse mode saves.

jvp, jacfwd, linearize and hessian (forward-over-reverse and
reverse-over-forward) of ``jaxbn.batch_norm``, the linen and the NNX layers,
against PyTorch's forward-mode AD (``torch.func.jvp`` of ``F.batch_norm``)
and against JAX's autodiff of a plain two-pass reference. Reverse mode keeps
its closed form: its only full-size residual is ``x`` itself.
"""

from __future__ import annotations

import io
import re
import warnings
from contextlib import redirect_stdout
from functools import partial

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.func
from flax import nnx

import jaxbn
from jaxbn.parity import to_numpy, to_torch

from .helpers import assert_close, fast_lane, reference_batch_norm

SHAPES = {
    "NC": ((8, 3), 1),
    "NCL": ((4, 3, 5), 1),
    "NCHW": ((3, 4, 2, 5), 1),
    "NHWC": ((3, 2, 5, 4), -1),
    "NCDHW": ((2, 3, 2, 3, 2), 1),
}


def arrays(shape, axis, seed=0):
    """Input, parameters and one tangent for each, float32."""
    rng = np.random.default_rng(seed)
    c = shape[axis]

    def f32(*s, scale=1.0, offset=0.0):
        return (rng.standard_normal(s) * scale + offset).astype(np.float32)

    return {
        "x": f32(*shape, scale=1.5, offset=2.0),
        "scale": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "bias": f32(c),
        "mean": f32(c),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
        "dx": f32(*shape),
        "dscale": f32(c),
        "dbias": f32(c),
    }


def torch_jvp(a, axis, *, training, affine=True):
    """torch.func.jvp of F.batch_norm (channels moved to axis 1)."""
    move = (lambda v: v) if axis == 1 else (lambda v: torch.movedim(v, -1, 1))
    back = (lambda v: v) if axis == 1 else (lambda v: torch.movedim(v, 1, -1))
    mean, var = to_torch(a["mean"]), to_torch(a["var"])

    def f(x, w, b):
        return back(
            torch.nn.functional.batch_norm(
                move(x), mean, var, w if affine else None, b if affine else None, training=training
            )
        )

    primals = tuple(to_torch(a[k]) for k in ("x", "scale", "bias"))
    tangents = tuple(to_torch(a[f"d{k}"]) for k in ("x", "scale", "bias"))
    with warnings.catch_warnings():
        # Loading torch's forward-AD decompositions scripts them (a deprecation of torch's own).
        warnings.filterwarnings("ignore", r"`torch.jit.script` is deprecated", FutureWarning)
        y, dy = torch.func.jvp(f, primals, tangents)[:2]
    assert dy is not None
    return to_numpy(y), to_numpy(dy), to_numpy(mean), to_numpy(var)


def jaxbn_fn(a, axis, *, training, affine=True, **kwargs):
    stats = jaxbn.BatchStats(
        jnp.asarray(a["mean"]), jnp.asarray(a["var"]), jnp.asarray(0, jnp.int32)
    )

    def f(x, scale, bias):
        return jaxbn.batch_norm(
            x,
            stats,
            scale if affine else None,
            bias if affine else None,
            training=training,
            axis=axis,
            **kwargs,
        )

    return f


@pytest.mark.parametrize("affine", fast_lane(True, False), ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", fast_lane(True, False), ids=["train", "eval"])
@pytest.mark.parametrize("layout", SHAPES.keys())
def test_jvp_matches_torch_forward_ad(layout, training, affine):
    shape, axis = SHAPES[layout]
    a = arrays(shape, axis)
    y_ref, dy_ref, mean_ref, var_ref = torch_jvp(a, axis, training=training, affine=affine)
    f = jaxbn_fn(a, axis, training=training, affine=affine)
    primals = tuple(jnp.asarray(a[k]) for k in ("x", "scale", "bias"))
    tangents = tuple(jnp.asarray(a[k]) for k in ("dx", "dscale", "dbias"))
    (y, stats), (dy, dstats) = jax.jvp(f, primals, tangents)
    assert_close(y, y_ref, what="y")
    assert_close(dy, dy_ref, what="dy")
    # The running statistics are buffers, as in PyTorch: updated, never differentiated.
    assert_close(stats.mean, mean_ref, what="running mean")
    assert_close(stats.var, var_ref, what="running var")
    for tangent in (dstats.mean, dstats.var):
        np.testing.assert_array_equal(tangent, 0)


def train_fn(axis, **kwargs):
    def f(x, scale, bias):
        return jaxbn.batch_norm(x, None, scale, bias, training=True, axis=axis, **kwargs)[0]

    return f


def ref_fn(axis):
    def f(x, scale, bias):
        return reference_batch_norm(x, scale, bias, axis % x.ndim)

    return f


def close(ans, ref, what, tol=2e-5):
    for i, (a, r) in enumerate(zip(jax.tree.leaves(ans), jax.tree.leaves(ref), strict=True)):
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol, err_msg=f"{what} [{i}]")


@pytest.mark.parametrize("layout", fast_lane("NC", "NHWC"))
def test_jacfwd_and_linearize_match_autodiff_of_a_reference(layout):
    shape, axis = SHAPES[layout]
    a = arrays(shape, axis)
    primals = tuple(jnp.asarray(a[k]) for k in ("x", "scale", "bias"))
    tangents = tuple(jnp.asarray(a[k]) for k in ("dx", "dscale", "dbias"))
    ans, ref = train_fn(axis), ref_fn(axis)
    # (Compiled: eager op-by-op dispatch of these transformations is slow.)
    jacfwd, jacrev = (partial(t, argnums=(0, 1, 2)) for t in (jax.jacfwd, jax.jacrev))
    close(jax.jit(jacfwd(ans))(*primals), jax.jit(jacfwd(ref))(*primals), "jacfwd")
    close(jax.jit(jacfwd(ans))(*primals), jax.jit(jacrev(ans))(*primals), "fwd vs rev")
    y, linear = jax.linearize(ans, *primals)
    close(y, ref(*primals), "linearize y")
    close(linear(*tangents), jax.jvp(ref, primals, tangents)[1], "linearize tangent")
    close(jax.linear_transpose(linear, *primals)(y), jax.vjp(ref, *primals)[1](y), "transpose")


@pytest.mark.parametrize("order", fast_lane("fwd-over-rev", "rev-over-fwd", "fwd-over-fwd"))
def test_hessian_matches_autodiff_of_a_reference(order):
    """Second order, all three ways, of a loss that is not quadratic in the output."""
    shape, axis = (4, 3, 2), 1
    a = arrays(shape, axis, seed=1)
    weights = jnp.asarray(a["dx"])

    def loss(f):
        def value(x, scale, bias):
            y = f(x, scale, bias)
            return jnp.sum(jnp.sin(y) * weights) + jnp.sum(y**3) / 10

        return value

    outer, inner = {
        "fwd-over-rev": (jax.jacfwd, jax.jacrev),
        "rev-over-fwd": (jax.jacrev, jax.jacfwd),
        "fwd-over-fwd": (jax.jacfwd, jax.jacfwd),
    }[order]
    primals = tuple(jnp.asarray(a[k]) for k in ("x", "scale", "bias"))

    def hessian(f):
        return jax.jit(outer(inner(loss(f), (0, 1, 2)), (0, 1, 2)))(*primals)

    close(hessian(train_fn(axis)), hessian(ref_fn(axis)), order, tol=1e-4)
    if order == "fwd-over-rev":
        close(
            jax.jit(jax.hessian(loss(train_fn(axis)), (0, 1, 2)))(*primals),
            hessian(ref_fn(axis)),
            "jax.hessian",
            tol=1e-4,
        )


def test_jvp_with_mask_and_named_axis_equals_the_global_batch():
    """Statistics over a vmapped named axis, with masked (NaN) padding."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5, 3)).astype(np.float32)  # 4 devices' (5, 3) batches
    valid = rng.uniform(size=(4, 5)) < 0.7
    valid[:, :2] = True
    x[~valid] = np.nan
    dx = rng.standard_normal(x.shape).astype(np.float32)
    scale, bias = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.0, 1.0, -1.0])

    def device(x, dx, valid):
        f = train_fn(1, axis_name="i", mask=valid[:, None])
        return jax.jvp(lambda x: f(x, scale, bias), (x,), (dx,))

    y, dy = jax.vmap(device, axis_name="i")(jnp.asarray(x), jnp.asarray(dx), jnp.asarray(valid))
    flat = valid.reshape(-1)
    y_ref, dy_ref = jax.jvp(
        lambda x: reference_batch_norm(x, scale, bias, 1),
        (jnp.asarray(x.reshape(-1, 3)[flat]),),
        (jnp.asarray(dx.reshape(-1, 3)[flat]),),
    )
    close(np.asarray(y).reshape(-1, 3)[flat], y_ref, "y")
    close(np.asarray(dy).reshape(-1, 3)[flat], dy_ref, "dy")
    assert np.all(np.asarray(dy).reshape(-1, 3)[~flat] == 0)


def test_jvp_in_half_precision_keeps_the_dtype():
    a = arrays((6, 3, 4), 1)
    x = jnp.asarray(a["x"], jnp.bfloat16)
    dx = jnp.asarray(a["dx"], jnp.bfloat16)
    y, dy = jax.jvp(lambda x: train_fn(1)(x, None, None), (x,), (dx,))
    assert y.dtype == dy.dtype == jnp.bfloat16
    _, dy32 = jax.jvp(
        lambda x: train_fn(1)(x, None, None), (x.astype(jnp.float32),), (dx.astype(jnp.float32),)
    )
    np.testing.assert_allclose(np.asarray(dy, np.float32), dy32, rtol=2e-2, atol=2e-2)


def test_linen_and_nnx_layers_in_training_match_torch_forward_ad():
    shape, axis = SHAPES["NCHW"]
    a = arrays(shape, axis)
    y_ref, dy_ref, *_ = torch_jvp(
        a | {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}, 1, training=True
    )
    x, dx = jnp.asarray(a["x"]), jnp.asarray(a["dx"])
    params = {"scale": jnp.asarray(a["scale"]), "bias": jnp.asarray(a["bias"])}
    dparams = {"scale": jnp.asarray(a["dscale"]), "bias": jnp.asarray(a["dbias"])}

    layer = jaxbn.BatchNorm2d(4)
    batch_stats = layer.init(jax.random.key(0), x, use_running_average=True)["batch_stats"]

    def linen(x, params):
        return layer.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )[0]

    y, dy = jax.jvp(linen, (x, params), (dx, dparams))
    assert_close(y, y_ref, what="linen y")
    assert_close(dy, dy_ref, what="linen dy")

    model = jaxbn.nnx.BatchNorm2d(4)
    graphdef, nnx_params, rest = nnx.split(model, nnx.Param, ...)
    nnx_params["scale"][...], nnx_params["bias"][...] = params["scale"], params["bias"]
    nnx_tangents = jax.tree.map(jnp.zeros_like, nnx_params)
    nnx_tangents["scale"][...], nnx_tangents["bias"][...] = dparams["scale"], dparams["bias"]

    def nnx_fn(x, nnx_params):
        return nnx.merge(graphdef, nnx_params, rest, copy=True)(x)

    y, dy = jax.jvp(nnx_fn, (x, nnx_params), (dx, nnx_tangents))
    assert_close(y, y_ref, what="nnx y")
    assert_close(dy, dy_ref, what="nnx dy")


def saved_residuals(f, *args):
    """(shape, description) of each residual reverse mode keeps, from JAX's own report."""
    out = io.StringIO()
    with redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    found = []
    for line in out.getvalue().splitlines():
        match = re.match(r"\s*(\w+)\[([\d,]*)\]\s+(.*)", line)
        if match:
            dims = tuple(int(d) for d in match.group(2).split(",") if d)
            found.append((dims, match.group(3)))
    assert found, out.getvalue()
    return found


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_reverse_mode_saves_only_x_at_full_size(layout):
    """x (or its free reshape) and per-channel vectors: nothing else full-size."""
    shape, axis = SHAPES[layout]
    a = arrays(shape, axis)
    primals = tuple(jnp.asarray(a[k]) for k in ("x", "scale", "bias"))
    size, c = int(np.prod(shape)), shape[axis]
    for name, f in (("jaxbn", train_fn(axis)), ("reference", ref_fn(axis))):
        residuals = saved_residuals(lambda x, s, b, f=f: jnp.sum(jnp.sin(f(x, s, b))), *primals)
        # (The loss's own residual, cos(y), is full-size too; it is not BatchNorm's.)
        full = [r for r in residuals if np.prod(r[0]) == size and "output of cos" not in r[1]]
        if name == "reference":
            # The check can fail: plain autodiff keeps full-size intermediates.
            assert len(full) >= 2, residuals
            continue
        assert len(full) == 1, residuals
        assert re.match(r"(from the argument x|output of reshape)", full[0][1]), residuals
        small = [r for r in residuals if np.prod(r[0]) != size]
        assert all(r[0] in ((c,), ()) for r in small), residuals


def test_jvp_under_shard_map_equals_the_global_batch():
    """Forward mode with cross-device statistics over a mesh (8 CPU devices)."""
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("batch",))
    a = arrays((2 * devices, 3, 4), 1, seed=3)
    x, dx = jnp.asarray(a["x"]), jnp.asarray(a["dx"])
    scale, bias = jnp.asarray(a["scale"]), jnp.asarray(a["bias"])
    dscale, dbias = jnp.asarray(a["dscale"]), jnp.asarray(a["dbias"])
    spec = jax.sharding.PartitionSpec("batch")
    replicated = jax.sharding.PartitionSpec()

    def shard(x, dx, scale, bias, dscale, dbias):
        f = train_fn(1, axis_name="batch")
        return jax.jvp(f, (x, scale, bias), (dx, dscale, dbias))

    y, dy = jax.jit(
        jax.shard_map(
            shard,
            mesh=mesh,
            in_specs=(spec, spec, *(replicated,) * 4),
            out_specs=(spec, spec),
        )
    )(
        *(jax.device_put(v, jax.sharding.NamedSharding(mesh, spec)) for v in (x, dx)),
        *(
            jax.device_put(v, jax.sharding.NamedSharding(mesh, replicated))
            for v in (scale, bias, dscale, dbias)
        ),
    )
    y_ref, dy_ref = jax.jvp(ref_fn(1), (x, scale, bias), (dx, dscale, dbias))
    close(y, y_ref, "y")
    close(dy, dy_ref, "dy")
