"""Benchmark: torchvision ResNet-50 ported by jaxbn.port vs the hand-written Flax ResNet-50.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/port_resnet50.py [--batch 8] [--image 112] [--reps 10]

One training step (forward, backward, SGD with momentum, BatchNorm
statistics updated) of three contenders on the same batch, interleaved in
one process so that machine noise hits all alike:

- ``ported``: ``jaxbn.port(torchvision.models.resnet50())``, NCHW inside;
- ``flax``: ``examples/resnet.py``'s hand-written ResNet-50 (NHWC), holding
  the same torch weights;
- ``torch``: the torch model itself, eager, on the same CPU.

Targets: ported step time within 1.15x of the hand-written one, compile time
within 1.5x. The output of one run is kept in ``port_resnet50.txt``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np
import optax
import torch
import torchvision

import jaxbn

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
import resnet


def flax_step(module: Any, call: Callable[..., Any], lr: float = 0.01) -> Callable[..., Any]:
    optimizer = optax.sgd(lr, momentum=0.9)

    def step(variables: Any, opt_state: Any, x: Any, labels: Any) -> Any:
        def loss_fn(params: Any) -> Any:
            logits, updates = call(
                module, {"params": params, "batch_stats": variables["batch_stats"]}, x
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        deltas, opt_state = optimizer.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], deltas)
        return {"params": params, "batch_stats": updates["batch_stats"]}, opt_state, loss

    return step


def main(batch: int = 8, image: int = 112, reps: int = 10) -> str:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    x = np.random.default_rng(0).standard_normal((batch, 3, image, image)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 1000, batch)

    start = time.perf_counter()
    ported = jaxbn.port(model, torch.from_numpy(x))
    port_seconds = time.perf_counter() - start
    hand = resnet.resnet50()
    template = jax.eval_shape(lambda: hand.init(jax.random.key(0), x))
    hand_variables = jaxbn.from_torch(model, template)

    contenders = {
        "ported": (
            ported.module,
            ported.variables,
            lambda m, v, x: m.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
            ),
        ),
        "flax": (
            hand,
            hand_variables,
            lambda m, v, x: m.apply(v, x, train=True, mutable=["batch_stats"]),
        ),
    }
    steps, states, compile_s = {}, {}, {}
    for name, (module, variables, call) in contenders.items():
        variables = jax.device_put(variables)
        opt_state = optax.sgd(0.01, momentum=0.9).init(variables["params"])
        t = time.perf_counter()
        steps[name] = (
            jax.jit(flax_step(module, call)).lower(variables, opt_state, x, labels).compile()
        )
        compile_s[name] = time.perf_counter() - t
        states[name] = (variables, opt_state)

    # Same numbers before timing: one step of each from the same weights.
    losses = {name: float(steps[name](*states[name], x, labels)[2]) for name in steps}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xt, lt = torch.from_numpy(x), torch.from_numpy(labels)

    def torch_step() -> float:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(xt), lt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    losses["torch"] = torch_step()
    times: dict[str, list[float]] = {name: [] for name in [*steps, "torch"]}
    for _ in range(reps):
        for name in steps:
            t = time.perf_counter()
            variables, opt_state, loss = steps[name](*states[name], x, labels)
            jax.block_until_ready(loss)
            times[name].append(time.perf_counter() - t)
            states[name] = (variables, opt_state)
        t = time.perf_counter()
        torch_step()
        times["torch"].append(time.perf_counter() - t)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    lines = [
        f"jaxbn port benchmark: ResNet-50 training step, batch {batch}x3x{image}x{image}, "
        f"{reps} interleaved reps; jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"cpu count {os.cpu_count()}",
        f"jaxbn.port itself (trace + abstract check): {port_seconds:.2f} s",
        "",
        f"  {'contender':<34}{'median ms':>10}{'min ms':>10}{'compile s':>11}{'first loss':>12}",
    ]
    names = {
        "ported": "ported (jaxbn.port, NCHW)",
        "flax": "hand-written Flax (NHWC)",
        "torch": "torch eager",
    }
    for name in times:
        comp = f"{compile_s[name]:.2f}" if name in compile_s else "-"
        lines.append(
            f"  {names[name]:<34}{median[name] * 1e3:>10.1f}{min(times[name]) * 1e3:>10.1f}"
            f"{comp:>11}{losses[name]:>12.6f}"
        )
    step_ratio = median["ported"] / median["flax"]
    compile_ratio = compile_s["ported"] / compile_s["flax"]
    lines += [
        "",
        f"step time ported / hand-written: {step_ratio:.3f}  (target <= 1.15: "
        f"{'met' if step_ratio <= 1.15 else 'NOT met'})",
        f"compile time ported / hand-written: {compile_ratio:.3f}  (target <= 1.5: "
        f"{'met' if compile_ratio <= 1.5 else 'NOT met'})",
        f"step time ported / torch eager: {median['ported'] / median['torch']:.3f}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=112)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    print(main(args.batch, args.image, args.reps))
