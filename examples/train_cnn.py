"""Train a small Flax CNN with jaxbn BatchNorm on synthetic data, then evaluate.

    python examples/train_cnn.py [--steps 50]

The model uses Flax's channels-last convolutions, so BatchNorm normalises
axis -1 (``jaxbn.BatchNorm``); a PyTorch-layout model would use
``jaxbn.BatchNorm2d`` on (N, C, H, W) instead. Momentum, the running
variance and ``num_batches_tracked`` follow PyTorch.
"""

from __future__ import annotations

try:  # what this example needs beyond jaxbn, said before any work starts
    import optax
except ModuleNotFoundError as missing:
    raise SystemExit(
        f"examples/train_cnn.py needs {missing.name}; install it from the checkout with: "
        "pip install -e '.[examples]'"
    ) from None

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxbn


class CNN(nn.Module):
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), padding=1, use_bias=False)(x)
            x = jaxbn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.classes)(x)


def synthetic_batch(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Images whose class sets the mean brightness of one quadrant."""
    k1, k2 = jax.random.split(key)
    labels = jax.random.randint(k1, (batch,), 0, 10)
    images = jax.random.normal(k2, (batch, 16, 16, 3))
    bright = labels[:, None, None, None] % 4 == jnp.arange(4)[None, :, None, None]
    quadrants = jnp.repeat(jnp.repeat(bright.reshape(batch, 2, 2, 1), 8, 1), 8, 2)
    level = labels.astype(jnp.float32)[:, None, None, None] * 0.3
    return images + 2.0 * quadrants.astype(jnp.float32) + level, labels


def main(steps: int = 50, batch: int = 32) -> dict[str, Any]:
    model = CNN()
    key = jax.random.key(0)
    images, _ = synthetic_batch(key, batch)
    variables = model.init(key, images, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.sgd(0.05, momentum=0.9)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def evaluate(params, batch_stats, images, labels):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
        assert isinstance(logits, jax.Array)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits.argmax(-1) == labels).mean()

    # One held-out batch, evaluated before and after training: the same data both times.
    eval_images, eval_labels = synthetic_batch(jax.random.key(1), 256)
    loss_before, accuracy_before = evaluate(params, batch_stats, eval_images, eval_labels)
    losses = []
    for step in range(steps):
        images, labels = synthetic_batch(jax.random.fold_in(key, step), batch)
        params, batch_stats, opt_state, loss = train_step(
            params, batch_stats, opt_state, images, labels
        )
        losses.append(float(loss))
    loss_after, accuracy_after = evaluate(params, batch_stats, eval_images, eval_labels)
    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "eval_loss_before": float(loss_before),
        "eval_loss": float(loss_after),
        "eval_accuracy_before": float(accuracy_before),
        "eval_accuracy": float(accuracy_after),
        "num_batches_tracked": int(jnp.asarray(batch_stats["BatchNorm_0"]["num_batches_tracked"])),
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    result = main(args.steps)
    print(
        f"training loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} over "
        f"{args.steps} steps; held-out loss {result['eval_loss_before']:.3f} -> "
        f"{result['eval_loss']:.3f}, accuracy {result['eval_accuracy_before']:.2f} -> "
        f"{result['eval_accuracy']:.2f}; num_batches_tracked {result['num_batches_tracked']}"
    )
