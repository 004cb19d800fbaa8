"""Port a torchvision model once, then train and deploy it where torch is not installed.

    python examples/leave_torch.py save resnet18-port    # needs the port extra (torch, torchvision)
    python examples/leave_torch.py train resnet18-port   # needs optax (the examples extra), no torch

``save`` ports a 10-class ResNet-18 and writes the directory: ``model.py``
(the generated Flax source: yours to read and edit), ``variables.msgpack``
and ``port.json``, plus ``model.jaxexport`` (the eval function and the
training step as ``jax.export`` programs). ``train`` imports no torch: it
loads the directory with ``jaxbn.port.load``, trains the model a few steps
from ``flax.nnx`` (through ``nnx.bridge``), and calls the exported eval
program on a batch of another size.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def save(directory: Path) -> None:
    try:  # what `save` needs beyond jaxbn, said before any work starts
        import flatbuffers  # noqa: F401 (writes model.jaxexport; checked before any work)
        import torch
        import torchvision
    except ModuleNotFoundError as missing:
        raise SystemExit(
            f"examples/leave_torch.py save needs {missing.name}; install it from the checkout "
            "with: pip install -e '.[port]'"
        ) from None
    import jaxbn

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    ported = jaxbn.port(model, torch.zeros(2, 3, 32, 32))
    ported.save(directory)
    ported.export(directory / "model.jaxexport")
    lines = len((directory / "model.py").read_text().splitlines())
    print(f"saved {directory}/: model.py ({lines} lines), variables.msgpack, port.json")
    print(f"exported {directory / 'model.jaxexport'}")


def train(directory: Path, steps: int) -> None:
    try:  # what `train` needs beyond jaxbn, said before any work starts
        import optax
    except ModuleNotFoundError as missing:
        raise SystemExit(
            f"examples/leave_torch.py train needs {missing.name}; install it from the checkout "
            "with: pip install -e '.[examples]'"
        ) from None
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxbn

    ported = jaxbn.port.load(directory)  # imports model.py: no torch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    labels = np.arange(8) % 10

    # The Linen module from NNX: nnx.bridge wraps it, and the port's variables go in.
    model: Any = nnx.bridge.ToNNX(ported.module, rngs=nnx.Rngs(0)).lazy_init(x, train=False)
    nnx.update(model, nnx.bridge.variables.linen_vars_to_nnx_attrs(ported.variables))
    same = model(x, train=False) == ported.module.apply(ported.variables, x, train=False)
    print(f"nnx model equals the loaded port in eval: {bool(jnp.all(same))}")

    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer) -> jax.Array:
        def loss_fn(model: nnx.Module) -> jax.Array:
            # a training step: BatchNorm uses and updates batch statistics
            logits = model(x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(steps)]
    tracked = int(model.bn1["num_batches_tracked"])
    print(f"nnx training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps; "
          f"num_batches_tracked {tracked}")  # fmt: skip

    exported = jaxbn.port.load_exported(directory / "model.jaxexport")
    y = exported.eval.call(exported.variables, x[:3])
    expected = ported.module.apply(ported.variables, x[:3], train=False)
    print(f"exported eval at batch 3: shape {tuple(y.shape)}, largest difference from the "
          f"port {float(jnp.max(jnp.abs(y - expected))):.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("command", choices=["save", "train"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.command == "save":
        save(args.directory)
    else:
        train(args.directory, args.steps)


if __name__ == "__main__":
    main()
