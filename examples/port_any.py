"""Port a torchvision model with jaxbn.port and keep training it in JAX and in PyTorch.

    python examples/port_any.py [--model mobilenet_v3_large] [--steps 20] [--plot port_any.png]

No Flax code is written for the model: ``jaxbn.port`` traces it with
torch.fx and gives a Flax module whose variables are the torch module's
(``ported.variables == jaxbn.from_torch(model)``), with every BatchNorm a
PyTorch-exact jaxbn layer (MobileNetV3's eps=1e-3 and momentum=0.01 kept).
Both sides then take the same SGD steps on the same synthetic batches; the
script prints both loss curves and their difference and plots them.

Dropout is set to 0 on both sides: JAX and torch cannot draw the same
random masks, and the point is to compare everything else.
"""

from __future__ import annotations

try:  # what this example needs beyond jaxbn, said before any work starts
    import matplotlib  # noqa: F401 (the plot; checked before any work)
    import optax
    import torch
    import torchvision
except ModuleNotFoundError as missing:
    extra = "'.[port]'" if missing.name in ("torch", "torchvision") else "'.[examples]'"
    raise SystemExit(
        f"examples/port_any.py needs {missing.name}; install it from the checkout with: "
        f"pip install -e {extra}"
    ) from None

import argparse
import time
from typing import Any

import jax
import numpy as np

import jaxbn
from jaxbn.port import without_dropout


def batches(
    count: int, batch: int, image: int, classes: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Synthetic images whose class shifts the mean of one colour channel."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        labels = rng.integers(0, classes, batch)
        images = rng.standard_normal((batch, 3, image, image)).astype(np.float32)
        shift = (labels[:, None, None] / classes * 3).astype(np.float32)
        images[np.arange(batch), labels % 3] += shift
        out.append((images, labels.astype(np.int64)))
    return out


def build(name: str, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=classes)
    return without_dropout(model)


def main(
    model_name: str = "mobilenet_v3_large",
    steps: int = 20,
    batch: int = 16,
    image: int = 64,
    classes: int = 10,
    lr: float = 0.002,
    momentum: float = 0.9,
    plot: str | None = "port_any.png",
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    say = print if verbose else (lambda *a, **k: None)
    start = time.perf_counter()
    model = build(model_name, classes, seed)
    data = batches(steps, batch, image, classes, seed)

    ported = jaxbn.port(model, torch.from_numpy(data[0][0]))
    say(f"ported {model_name}: {len(jax.tree.leaves(ported.variables['params']))} parameters, "
        f"{len(jax.tree.leaves(ported.variables['batch_stats']))} statistics "
        f"({time.perf_counter() - start:.1f} s)")  # fmt: skip

    # torch's SGD with momentum: buf = momentum * buf + g; p -= lr * buf. optax's is the same.
    torch_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    optimizer = optax.sgd(lr, momentum=momentum)
    module = ported.module

    @jax.jit
    def jax_step(variables: Any, opt_state: Any, images: Any, labels: Any) -> Any:
        def loss_fn(params: Any) -> Any:
            logits, updates = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": stats}, opt_state, loss

    variables = ported.variables
    opt_state = optimizer.init(variables["params"])
    losses_torch, losses_jax = [], []
    model.train()
    for t, (images, labels) in enumerate(data):
        logits = model(torch.from_numpy(images))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        torch_opt.zero_grad()
        loss.backward()
        torch_opt.step()
        losses_torch.append(loss.item())
        variables, opt_state, loss_jax = jax_step(variables, opt_state, images, labels)
        losses_jax.append(float(loss_jax))
        say(f"step {t:3d}  loss torch {losses_torch[-1]:.6f}  jax {losses_jax[-1]:.6f}  "
            f"|diff| {abs(losses_torch[-1] - losses_jax[-1]):.2e}")  # fmt: skip

    # After training, the weights and running statistics of both sides.
    state = jaxbn.to_torch(variables, model)
    reference = model.state_dict()
    # Largest difference over all parameters, relative to the largest parameter
    # (per tensor, a bias that stays ~0 would divide rounding noise by itself).
    names = [k for k, _ in model.named_parameters()]
    weight_diff = max(float((state[k] - reference[k]).abs().max()) for k in names) / max(
        float(reference[k].abs().max()) for k in names
    )
    stats_diff = max(
        float((state[k].double() - reference[k].double()).abs().max())
        for k, _ in model.named_buffers()
    )
    counts = sorted({int(state[k]) for k in state if k.endswith("num_batches_tracked")})
    tracked = f"{counts[0]}" if len(counts) == 1 else f"from {counts[0]} to {counts[-1]}"
    relative = [abs(a - b) / abs(b) for a, b in zip(losses_jax, losses_torch, strict=True)]
    say(f"largest relative loss difference: {max(relative):.2e}; weights (relative) "
        f"{weight_diff:.2e}; running statistics {stats_diff:.2e}; num_batches_tracked {tracked}")  # fmt: skip
    if plot:
        save_plot(plot, model_name, losses_torch, losses_jax)
        say(f"plot saved to {plot}")
    say(f"total {time.perf_counter() - start:.1f} s")
    return {
        "losses_torch": losses_torch,
        "losses_jax": losses_jax,
        "max_relative_loss_diff": max(relative),
        "weight_diff": weight_diff,
        "stats_diff": stats_diff,
        "num_batches_tracked": counts,
    }


def save_plot(
    path: str, model_name: str, losses_torch: list[float], losses_jax: list[float]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses_torch, "o-", label="PyTorch", alpha=0.7)
    ax.plot(losses_jax, "x--", label="JAX (jaxbn.port)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    ax.set_xlabel("SGD step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"{model_name}: training continued in both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--plot", default="port_any.png")
    args = parser.parse_args()
    main(args.model, args.steps, args.batch, args.image, plot=args.plot)
