"""Data parallelism across processes (``jax.distributed``), checked against PyTorch.

    python examples/multi_process.py                 # 2 processes x 4 CPU devices here
    python examples/multi_process.py --process-id 0 --num-processes 2 \\
        --coordinator host0:12355                   # one of them, on each real host

Without ``--process-id`` the script starts ``--num-processes`` copies of
itself on this machine, each with ``--local-devices`` CPU devices, talking
over loopback (CPU collectives: gloo), waits for them with a timeout, and
always stops them. Each process then

- joins the multi-controller runtime (``jax.distributed.initialize``) and
  builds one mesh over all processes' devices (8 here);
- feeds only its own part of each global batch
  (``jax.make_array_from_process_local_data``);
- trains a small CNN with synchronised ``jaxbn.BatchNorm`` layers for 3 SGD
  steps and then evaluates it, twice: under ``shard_map`` with
  ``axis_name`` on the layers, and under plain ``jit`` over the globally
  sharded batch (XLA inserts the cross-process reductions);
- runs ``torch.nn.BatchNorm2d`` in the same CNN (float64) on the
  concatenated global batch, and prints and returns the largest difference
  of the outputs, every gradient, the weights and every running statistic.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

STEPS = 3
PER_DEVICE = 4
LR = 0.1
# jaxlib's own gloo prints this line for each device as it connects, from C++
# straight to stdout, with no setting to turn it off; threads may interleave two.
GLOO_CHATTER = re.compile(
    r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. "
    r"Expected number of connected peer ranks is : \d+\n?"
)


def without_gloo_chatter(text: str) -> str:
    """A worker's output without gloo's connection lines (a worker run by hand still shows them)."""
    while True:  # removing one of two interleaved lines leaves the other whole
        text, found = GLOO_CHATTER.subn("", text)
        if not found:
            return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    num_processes: int = 2, local_devices: int = 4, timeout: float = 300.0, verbose: bool = True
) -> list[dict[str, Any]]:
    """Runs the workers on this machine; returns each one's largest differences.

    Raises RuntimeError (with the workers' output) if one fails or any is
    still running after ``timeout`` seconds; no worker outlives this call.
    """
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        results = [os.path.join(tmp, f"result{i}.json") for i in range(num_processes)]
        logs = [open(os.path.join(tmp, f"log{i}.txt"), "w+") for i in range(num_processes)]  # noqa: SIM115
        procs: list[subprocess.Popen[bytes]] = []
        timed_out = False
        try:
            for i in range(num_processes):
                command = [sys.executable, os.path.abspath(__file__), "--process-id", str(i)]
                command += ["--num-processes", str(num_processes), "--coordinator", coordinator]
                command += ["--result", results[i]] + ([] if verbose or i else ["--quiet"])
                procs.append(
                    subprocess.Popen(command, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
                )
            deadline = time.monotonic() + timeout
            # A failed worker leaves the others waiting in a collective: stop at the first.
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            output = []
            for i, log in enumerate(logs):
                log.seek(0)
                output.append(f"--- process {i} ---\n{log.read()}")
                log.close()
        if verbose:
            print(without_gloo_chatter(output[0]))
        codes = [p.returncode for p in procs]
        if any(codes):
            tail = "\n".join(text[-4000:] for text in output)
            why = f"still running after {timeout:g} s, stopped" if timed_out else "a worker failed"
            raise RuntimeError(f"{why}: exit codes {codes}\n{tail}")
        found = []
        for path in results:
            with open(path) as f:
                found.append(json.load(f))
        return found


def worker(process_id: int, num_processes: int, coordinator: str, verbose: bool) -> dict[str, Any]:
    """One process of the run; returns its largest differences from PyTorch."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbn

    say = print if verbose else (lambda *a, **k: None)
    # gloo is the default in recent JAX; naming it keeps older versions working.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=120)
    try:
        devices = jax.device_count()
        batch = PER_DEVICE * devices
        mesh = jax.make_mesh((devices,), ("data",))
        replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        say(
            f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} of {devices} devices, global batch {batch}"
        )

        class CNN(nn.Module):
            axis_name: str | None = None

            @nn.compact
            def __call__(self, x: jax.Array, train: bool) -> jax.Array:
                for i, features in enumerate((8, 16), 1):
                    x = nn.Conv(features, (3, 3), padding=1, use_bias=False, name=f"conv{i}")(x)
                    x = jaxbn.BatchNorm(
                        use_running_average=not train, axis_name=self.axis_name, name=f"bn{i}"
                    )(x)
                    x = nn.relu(x)
                return nn.Dense(4, name="fc")(x.mean(axis=(1, 2)))

        class TorchCNN(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
                self.bn1 = torch.nn.BatchNorm2d(8)
                self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
                self.bn2 = torch.nn.BatchNorm2d(16)
                self.fc = torch.nn.Linear(16, 4)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = torch.relu(self.bn1(self.conv1(x)))
                x = torch.relu(self.bn2(self.conv2(x)))
                return self.fc(x.mean(dim=(2, 3)))

        torch.manual_seed(0)
        reference = TorchCNN()
        variables = jaxbn.from_torch(reference)  # the same float32 weights, strictly
        reference.double()
        optimizer = torch.optim.SGD(reference.parameters(), lr=LR)

        def global_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
            """Every process can make any batch; it feeds only its own rows."""
            rng = np.random.default_rng(step)
            labels = rng.integers(0, 4, batch)
            images = rng.standard_normal((batch, 8, 8, 3)) + labels[:, None, None, None]
            return images.astype(np.float32), labels.astype(np.int32)

        def local_rows(shape: tuple[int, ...]) -> slice:
            indices = split.addressable_devices_indices_map(shape).values()
            starts = sorted(index[0].start or 0 for index in indices if index is not None)
            return slice(starts[0], starts[-1] + shape[0] // devices)

        def feed(array: np.ndarray) -> jax.Array:
            rows = local_rows(array.shape)
            return jax.make_array_from_process_local_data(split, array[rows], array.shape)

        def replicate(tree: Any) -> Any:
            return jax.tree.map(
                lambda a: jax.make_array_from_callback(
                    np.shape(a), replicated, lambda i, a=a: np.asarray(a)[i]
                ),
                tree,
            )

        def fetch(a: jax.Array) -> np.ndarray:
            if a.is_fully_replicated:
                return np.asarray(a.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))

        def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]

        def train_step(model: CNN, state: Any, images: jax.Array, labels: jax.Array) -> Any:
            """One SGD step; the loss is this batch's part of the global mean."""
            params, stats = state["params"], state["batch_stats"]

            def loss_fn(params: Any) -> Any:
                logits, updates = model.apply(
                    {"params": params, "batch_stats": stats},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
                return cross_entropy(logits, labels).sum() / batch, (logits, updates)

            (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
            return {"params": params, "batch_stats": updates["batch_stats"]}, logits, grads

        def eval_step(model: CNN, state: Any, images: jax.Array) -> Any:
            return model.apply(state, images, train=False)

        # Under shard_map each device sees its own rows; the layers name the
        # mesh axis. Replicated parameters get their gradients summed over
        # the devices by shard_map's autodiff.
        synced = CNN(axis_name="data")
        state_specs = {"params": P(), "batch_stats": P()}
        variants = {
            "shard_map": (
                jax.jit(
                    jax.shard_map(
                        lambda s, x, y: train_step(synced, s, x, y),
                        mesh=mesh,
                        in_specs=(state_specs, P("data"), P("data")),
                        out_specs=(state_specs, P("data"), P()),
                    )
                ),
                jax.jit(
                    jax.shard_map(
                        lambda s, x: eval_step(synced, s, x),
                        mesh=mesh,
                        in_specs=(state_specs, P("data")),
                        out_specs=P("data"),
                    )
                ),
            ),
            # Plain jit over the global arrays: no axis_name anywhere.
            "jit": (
                jax.jit(
                    lambda s, x, y: train_step(CNN(), s, x, y),
                    out_shardings=(replicated, split, replicated),
                ),
                jax.jit(lambda s, x: eval_step(CNN(), s, x), out_shardings=split),
            ),
        }
        states = {name: replicate(variables) for name in variants}
        worst: dict[str, dict[str, float]] = {name: {} for name in variants}

        def record(name: str, quantity: str, ours: Any, theirs: Any) -> None:
            diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs))))
            worst[name][quantity] = max(worst[name].get(quantity, 0.0), diff)

        def torch_layout(params: Any, stats: Any) -> dict[str, np.ndarray]:
            # (No template: the float64 reference would not match float32 values.)
            state = jaxbn.to_torch({"params": params, "batch_stats": stats})
            return {k: v.numpy() for k, v in state.items()}

        grads_ref: dict[str, np.ndarray] = {}
        for step in range(STEPS + 1):
            training = step < STEPS
            images, labels = global_batch(step)
            x_torch = torch.from_numpy(images.transpose(0, 3, 1, 2)).double()
            reference.train(training)
            optimizer.zero_grad()
            logits_ref = reference(x_torch)
            if training:
                loss = torch.nn.functional.cross_entropy(
                    logits_ref, torch.from_numpy(labels).long()
                )
                loss.backward()
                grads_ref = {k: p.grad.numpy().copy() for k, p in reference.named_parameters()}  # type: ignore[union-attr]
                optimizer.step()
            state_ref = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
            x, y = feed(images), feed(labels)
            for name, (train, evaluate) in variants.items():
                if training:
                    states[name], logits, grads = train(states[name], x, y)
                    grads = jax.tree.map(fetch, grads)
                    stats = jax.tree.map(fetch, states[name]["batch_stats"])
                    for key, value in torch_layout(grads, stats).items():
                        if key in grads_ref:
                            record(name, "gradients", value, grads_ref[key])
                else:
                    logits = evaluate(states[name], x)
                record(
                    name,
                    "outputs" if training else "eval outputs",
                    fetch(logits),
                    logits_ref.detach().numpy(),
                )
                params = jax.tree.map(fetch, states[name]["params"])
                stats = jax.tree.map(fetch, states[name]["batch_stats"])
                for key, value in torch_layout(params, stats).items():
                    quantity = (
                        "running statistics"
                        if "running" in key or "num_batches" in key
                        else "weights"
                    )
                    record(name, quantity, value, state_ref[key])
            say(
                f"step {step + 1} ({'train' if training else 'eval'}): "
                + "; ".join(f"{name} {max(w.values()):.1e}" for name, w in worst.items())
            )
        counter = int(fetch(states["jit"]["batch_stats"]["bn1"]["num_batches_tracked"]))
        say(f"num_batches_tracked {counter}; largest differences from torch (float64):")
        for name, w in worst.items():
            say(f"  {name:9s} " + ", ".join(f"{k} {v:.1e}" for k, v in w.items()))
        return {"process": process_id, "devices": devices, "counter": counter, "worst": worst}
    finally:
        jax.distributed.shutdown()


def main() -> None:
    try:  # what this example needs beyond jaxbn, said before any work starts
        import torch  # noqa: F401 (the workers' reference; checked before starting them)
    except ModuleNotFoundError as missing:
        raise SystemExit(
            f"examples/multi_process.py needs {missing.name}; install it from the checkout with: "
            "pip install -e '.[torch]' 'torch==2.13.0'"
        ) from None
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--process-id", type=int, help="this process (omit: start all here)")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (with --process-id)")
    parser.add_argument("--local-devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds, then all stop")
    parser.add_argument("--result", help="write this process's differences here (JSON)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.process_id is None:
        launch(args.num_processes, args.local_devices, args.timeout)
        return
    if not args.coordinator:
        parser.error("--process-id needs --coordinator HOST:PORT (process 0's address)")
    result = worker(args.process_id, args.num_processes, args.coordinator, not args.quiet)
    if args.result:
        with open(args.result, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
