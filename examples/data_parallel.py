"""Data-parallel training with synchronised jaxbn BatchNorm on 8 CPU devices.

    python examples/data_parallel.py [--steps 5]

Each device gets 1/8 of every batch; inside ``jaxbn.synchronized("data")``
every BatchNorm layer computes its statistics over the whole global batch
(count-weighted, like torch.nn.SyncBatchNorm). The script trains the same
model once that way and once on a single device with the global batch, and
prints how far apart the running statistics and weights are after each step.
"""

from __future__ import annotations

import os

# Eight host devices; must be set before jax (and optax, which imports it) is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

try:  # what this example needs beyond jaxbn, said before any work starts
    import optax
except ModuleNotFoundError as missing:
    raise SystemExit(
        f"examples/data_parallel.py needs {missing.name}; install it from the checkout with: "
        "pip install -e '.[examples]'"
    ) from None

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features in (8, 16):
            x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
            x = nn.relu(jaxbn.BatchNorm(use_running_average=not train)(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


def loss_and_updates(
    model: CNN, params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array, total: int
):
    """Sum of this shard's losses over the *global* batch size, and new statistics."""
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum() / total
    return loss, updates["batch_stats"]


def main(steps: int = 5, batch: int = 64, verbose: bool = True) -> dict[str, float]:
    say = print if verbose else (lambda *a, **k: None)
    devices = jax.device_count()
    if devices < 2 or batch % devices:
        raise SystemExit(f"needs several devices dividing the batch; have {devices} for {batch}")
    mesh = jax.make_mesh((devices,), ("data",))
    model = CNN()
    optimizer = optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    variables = model.init(jax.random.key(0), jnp.ones((1, 12, 12, 3)), train=False)
    single = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    single["opt"] = optimizer.init(single["params"])
    synced = jax.tree.map(jnp.copy, single)

    @jax.jit
    def single_step(state: Any, images: jax.Array, labels: jax.Array) -> Any:
        grad_fn = jax.value_and_grad(loss_and_updates, argnums=1, has_aux=True)
        (loss, stats), grads = grad_fn(
            model, state["params"], state["batch_stats"], images, labels, batch
        )
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats,
            "opt": opt,
        }, loss

    def shard_step(state: Any, images: jax.Array, labels: jax.Array) -> Any:
        with jaxbn.synchronized("data"):
            grad_fn = jax.value_and_grad(loss_and_updates, argnums=1, has_aux=True)
            (loss, stats), grads = grad_fn(
                model, state["params"], state["batch_stats"], images, labels, batch
            )
        # Replicated parameters: shard_map has already summed their gradients
        # over the devices; the loss is this shard's part of the global mean.
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        new = {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats,
            "opt": opt,
        }
        return new, jax.lax.psum(loss, "data")

    parallel_step = jax.jit(
        jax.shard_map(
            shard_step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    synced = jax.device_put(synced, replicated)
    worst = {"batch_stats": 0.0, "params": 0.0, "loss": 0.0}
    say(f"{devices} devices, global batch {batch} ({batch // devices} per device)")
    for step in range(steps):
        labels = rng.integers(0, 4, batch)
        images = (rng.standard_normal((batch, 12, 12, 3)) + labels[:, None, None, None]).astype(
            np.float32
        )
        single, loss_single = single_step(single, images, labels)
        synced, loss_synced = parallel_step(
            synced, jax.device_put(images, split), jax.device_put(labels, split)
        )
        diffs = {
            name: max(
                float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                for a, b in zip(
                    jax.tree.leaves(synced[name]), jax.tree.leaves(single[name]), strict=True
                )
            )
            for name in ("batch_stats", "params")
        }
        diffs["loss"] = abs(float(loss_synced) - float(loss_single))
        worst = {k: max(worst[k], v) for k, v in diffs.items()}
        say(
            f"step {step + 1}: loss {float(loss_single):.4f}; synchronised vs single device: "
            f"running statistics {diffs['batch_stats']:.1e}, weights {diffs['params']:.1e}"
        )
    counter = jax.tree.leaves(synced["batch_stats"]["BatchNorm_0"]["num_batches_tracked"])[0]
    say(
        f"num_batches_tracked {int(counter)}; largest differences over {steps} steps: "
        f"running statistics {worst['batch_stats']:.1e}, weights {worst['params']:.1e}, "
        f"loss {worst['loss']:.1e}"
    )
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    main(args.steps)
