"""Synchronised BatchNorm on 8 CPU devices against PyTorch on the global batch.

PyTorch's SyncBatchNorm computes exactly what BatchNorm computes on the
concatenation of all devices' batches, so that is the reference: outputs,
input gradients, parameter gradients (summed over devices) and running
statistics after every step, for shard_map, pmap and sharded jit, with equal
and unequal (masked) per-device batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn.parity import to_numpy, to_torch, torch_tensors

from .helpers import assert_close

DEVICES = 8
C = 3
PER_DEVICE = 4
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() < DEVICES:
        pytest.fail(f"need {DEVICES} devices (XLA_FLAGS from conftest), got {jax.device_count()}")


def batches(step: int, lengths: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-device padded batches (NaN in the padding), their mask, and cotangents."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((DEVICES, PER_DEVICE, C, 2, 3)) * (1 + step) + 2 * step
    x = x.astype(np.float32)
    mask = np.arange(PER_DEVICE)[None, :] < np.asarray(lengths)[:, None]  # (devices, per device)
    x[~mask] = np.nan
    g = rng.standard_normal(x.shape).astype(np.float32)
    return x, mask, g


class TorchReference:
    """torch.nn.BatchNorm2d stepping on the concatenated valid samples of each group."""

    def __init__(self, groups: list[list[int]]) -> None:
        torch.manual_seed(0)
        self.groups = groups
        self.layers = [torch.nn.BatchNorm2d(C, momentum=0.3) for _ in groups]
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
                layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))

    def step(self, x, mask, g, *, training: bool):
        y = np.zeros_like(x)
        dx = np.zeros_like(x)
        dscale, dbias = [], []
        for layer, group in zip(self.layers, self.groups, strict=True):
            layer.train(training)
            valid = mask[group]
            xt = to_torch(x[group][valid]).requires_grad_(True)
            out = layer(xt)
            out.backward(to_torch(g[group][valid]))
            y_group, dx_group = np.zeros_like(x[group]), np.zeros_like(x[group])
            tensors = torch_tensors(layer)
            assert xt.grad is not None
            y_group[valid], dx_group[valid] = to_numpy(out), to_numpy(xt.grad)
            y[group], dx[group] = y_group, dx_group
            for name, grads in (("scale", dscale), ("bias", dbias)):
                grad = tensors[name].grad
                assert grad is not None
                grads.append(to_numpy(grad))
                tensors[name].grad = None
        return y, dx, dscale, dbias

    def stats(self, index: int) -> dict[str, np.ndarray]:
        tensors = torch_tensors(self.layers[index])
        return {name: to_numpy(tensors[name]) for name in ("mean", "var", "num_batches_tracked")}


def place(mesh, spec, *arrays):
    """Arrays laid out on the mesh as shard_map's in_specs say."""
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def initial():
    scale = jnp.asarray([1.0, 0.5, 2.0])
    bias = jnp.asarray([0.0, 1.0, -1.0])
    return scale, bias, jaxbn.BatchStats.create(C)


def device_step(
    x, mask, g, scale, bias, stats, *, training, axis_name: str | None = "batch", groups=None
):
    """One step on one device's batch (N, C, H, W) with its mask (N,)."""

    def loss(x, scale, bias):
        y, new = jaxbn.batch_norm(
            x,
            stats,
            scale,
            bias,
            training=training,
            momentum=0.3,
            axis=1,
            axis_name=axis_name,
            axis_index_groups=groups,
            mask=mask[:, None, None, None],
        )
        return jnp.sum(y * g), (y, new)

    (dx, dscale, dbias), (y, new) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, dx, dscale, dbias, new


def compare(answer, reference, step):
    y, dx, dscale, dbias = answer
    y_ref, dx_ref, dscale_ref, dbias_ref = reference
    assert_close(np.asarray(y), y_ref, what=f"step {step} y", atol=2e-5, rtol=2e-5)
    assert_close(np.asarray(dx), dx_ref, what=f"step {step} dx", atol=2e-5, rtol=2e-5)
    for k, (ds, db) in enumerate(zip(dscale, dbias, strict=True)):
        assert_close(
            np.asarray(ds), dscale_ref[k], what=f"step {step} dscale[{k}]", atol=1e-4, rtol=1e-5
        )
        assert_close(
            np.asarray(db), dbias_ref[k], what=f"step {step} dbias[{k}]", atol=1e-4, rtol=1e-5
        )


def compare_stats(stats, reference: TorchReference, index: int, step: int):
    for name, desired in reference.stats(index).items():
        assert_close(
            np.asarray(getattr(stats, name)),
            desired.astype(np.asarray(getattr(stats, name)).dtype),
            what=f"step {step} {name}",
        )


LENGTHS = {
    "equal": [PER_DEVICE] * DEVICES,
    "unequal": [4, 3, 4, 0, 2, 4, 1, 4],  # device 3 holds no sample at all
}


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_shard_map_equals_torch_on_the_global_batch(lengths):
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    scale, bias, stats = initial()
    reference = TorchReference([list(range(DEVICES))])

    def step(x, mask, g, scale, bias, stats, training):
        # Replicated parameters: shard_map's autodiff already sums their
        # gradients over the devices (as JAX does without jaxbn).
        y, dx, ds, db, new = device_step(x[0], mask[0], g[0], scale, bias, stats, training=training)
        return y[None], dx[None], ds, db, new

    in_specs = (P("batch"), P("batch"), P("batch"), P(), P(), P())
    out_specs = (P("batch"), P("batch"), P(), P(), P())

    def compiled(training: bool):
        f = functools.partial(step, training=training)
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    train, evaluate = compiled(True), compiled(False)
    for t in range(STEPS + 1):
        training = t < STEPS
        x, mask, g = batches(t, lengths)
        sharded = place(mesh, P("batch"), x, mask, g)
        replicated = place(mesh, P(), scale, bias, stats)
        y, dx, ds, db, stats = (train if training else evaluate)(*sharded, *replicated)
        ref = reference.step(x, mask, g, training=training)
        compare((y, dx, [ds], [db]), ref, t)
        compare_stats(stats, reference, 0, t)


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_pmap_equals_torch_on_the_global_batch(lengths):
    scale, bias, stats = initial()
    reference = TorchReference([list(range(DEVICES))])

    def step(x, mask, g, scale, bias, stats, training):
        y, dx, ds, db, new = device_step(x, mask, g, scale, bias, stats, training=training)
        return y, dx, lax.psum(ds, "batch"), lax.psum(db, "batch"), new

    pmapped = {
        training: jax.pmap(
            functools.partial(step, training=training),
            axis_name="batch",
            in_axes=(0, 0, 0, None, None, None),
        )
        for training in (True, False)
    }
    for t in range(STEPS + 1):
        training = t < STEPS
        x, mask, g = batches(t, lengths)
        y, dx, ds, db, new = pmapped[training](x, mask, g, scale, bias, stats)
        stats = jax.tree.map(lambda v: v[0], new)
        ref = reference.step(x, mask, g, training=training)
        compare((y, dx, [ds[0]], [db[0]]), ref, t)
        compare_stats(stats, reference, 0, t)


def test_pmap_axis_index_groups_normalise_per_group():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    lengths = LENGTHS["unequal"]
    scale, bias, stats = initial()
    reference = TorchReference(groups)

    def step(x, mask, g, scale, bias, stats):
        y, dx, ds, db, new = device_step(
            x, mask, g, scale, bias, stats, training=True, groups=groups
        )
        return (
            y,
            dx,
            lax.psum(ds, "batch", axis_index_groups=groups),
            lax.psum(db, "batch", axis_index_groups=groups),
            new,
        )

    pmapped = jax.pmap(step, axis_name="batch", in_axes=(0, 0, 0, None, None, 0))
    per_device = jax.tree.map(lambda v: jnp.stack([v] * DEVICES), stats)
    for t in range(STEPS):
        x, mask, g = batches(t, lengths)
        y, dx, ds, db, per_device = pmapped(x, mask, g, scale, bias, per_device)
        ref = reference.step(x, mask, g, training=True)
        compare((y, dx, [ds[0], ds[4]], [db[0], db[4]]), ref, t)
        for k, group in enumerate(groups):
            compare_stats(jax.tree.map(lambda v, d=group[0]: v[d], per_device), reference, k, t)


def test_sharded_jit_equals_single_device_and_torch():
    """No axis_name: jit over a batch-sharded array, XLA inserts the collectives."""
    mesh = jax.make_mesh((DEVICES,), ("batch",))
    scale, bias, stats = initial()
    reference = TorchReference([list(range(DEVICES))])

    def step(x, g, scale, bias, stats):
        mask = jnp.ones(x.shape[0], bool)
        return device_step(x, mask, g, scale, bias, stats, training=True, axis_name=None)

    sharded, single = jax.jit(step), jax.jit(step)  # compiled apart: different shardings
    batch_sharding = NamedSharding(mesh, P("batch"))
    stats_single = stats
    for t in range(STEPS):
        x, mask, g = batches(t, LENGTHS["equal"])
        x_global, g_global = x.reshape(-1, C, 2, 3), g.reshape(-1, C, 2, 3)
        xs, gs = jax.device_put(x_global, batch_sharding), jax.device_put(g_global, batch_sharding)
        assert len(xs.sharding.device_set) == DEVICES
        y, dx, ds, db, stats = sharded(xs, gs, scale, bias, stats)
        y1, dx1, ds1, db1, stats_single = single(
            jnp.asarray(x_global), jnp.asarray(g_global), scale, bias, stats_single
        )
        for a, b in zip((y, dx, ds, db, *stats), (y1, dx1, ds1, db1, *stats_single), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        ref = reference.step(x, mask, g, training=True)
        compare(
            (np.asarray(y).reshape(x.shape), np.asarray(dx).reshape(x.shape), [ds], [db]), ref, t
        )
        compare_stats(stats, reference, 0, t)


def test_masked_padding_never_leaks():
    """Garbage (NaN, huge values) in padding changes nothing that is valid."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, C)).astype(np.float32)
    mask = np.array([True, True, False, True, False, True])
    stats = jaxbn.BatchStats.create(C)
    results = []
    for garbage in (np.nan, np.inf, 1e30, 0.0):
        padded = x.copy()
        padded[~mask] = garbage
        y, new = jaxbn.batch_norm(padded, stats, training=True, axis=1, mask=mask[:, None])
        dx = jax.grad(
            lambda v: jnp.sum(
                jaxbn.batch_norm(v, None, training=True, axis=1, mask=mask[:, None])[0] ** 2
            )
        )(padded)
        results.append((np.asarray(y), np.asarray(new.mean), np.asarray(new.var), np.asarray(dx)))
        assert np.all(np.asarray(y)[~mask] == 0)
        assert np.all(np.asarray(dx)[~mask] == 0)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    y_ref = torch.nn.BatchNorm1d(C)(to_torch(x[mask]))
    assert_close(results[0][0][mask], y_ref, what="valid outputs")


def test_too_few_valid_values_keep_the_running_statistics():
    """PyTorch raises for one value per channel; with a run-time mask jaxbn keeps the statistics."""
    stats = jaxbn.BatchStats(jnp.full(C, 5.0), jnp.full(C, 7.0), jnp.asarray(2, jnp.int32))
    x = jnp.ones((4, C))
    for valid in ([True, False, False, False], [False] * 4):
        _, new = jaxbn.batch_norm(x, stats, training=True, axis=1, mask=jnp.asarray(valid)[:, None])
        np.testing.assert_array_equal(new.mean, stats.mean)
        np.testing.assert_array_equal(new.var, stats.var)
        assert int(new.num_batches_tracked) == 3


def test_mask_errors():
    x = jnp.ones((4, C))
    with pytest.raises(TypeError, match=r"`mask` must be boolean .* got dtype int32"):
        jaxbn.batch_norm(x, None, training=True, axis=1, mask=jnp.ones((4, 1), jnp.int32))
    with pytest.raises(
        ValueError, match=r"`mask` of shape \(4,\) does not broadcast to the input's shape \(4, 3\)"
    ):
        jaxbn.batch_norm(x, None, training=True, axis=1, mask=jnp.ones(4, bool))


def test_synchronized_converts_a_whole_linen_model():
    """The analogue of SyncBatchNorm.convert_sync_batchnorm: no layer names an axis."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = jaxbn.BatchNorm2d(C, use_running_average=not train)(x)
            x = nn.relu(x)
            return jaxbn.BatchNorm2d(C, use_running_average=not train)(x * 2.0 + 1.0)

    model = Model()
    x, _, _ = batches(1, LENGTHS["equal"])
    variables = model.init(jax.random.key(0), x[0], train=False)
    mesh = jax.make_mesh((DEVICES,), ("batch",))

    def shard(x):
        with jaxbn.synchronized("batch"):
            return model.apply(variables, x[0], train=True, mutable=["batch_stats"])

    y, updates = jax.jit(
        jax.shard_map(shard, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P()))
    )(*place(mesh, P("batch"), x))
    y_global, updates_global = model.apply(
        variables, x.reshape(-1, C, 2, 3), train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(np.asarray(y).reshape(-1, C, 2, 3), y_global, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(updates_global), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
