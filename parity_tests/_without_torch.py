"""Run by test_port_saved.py in a subprocess where torch cannot be imported.

For each saved port directory given: ``jaxbn.port.load`` it, run it in eval
and in one training step on the inputs saved beside it, and write the
outputs and the updated statistics for the parent (which has torch) to
compare; where the directory holds a file ``optax``, also take three optax
steps and write the trained variables.

With ``--script SCRIPT ARGS...``, runs a script as ``python SCRIPT ARGS``
would. With ``--exported FILE...``, flax and jaxbn cannot be imported either: each
file written by ``Ported.export`` is loaded as its documented snippet does,
with jax and numpy alone, and called at batch sizes 1 to 3 on the inputs
saved beside it.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: this process runs without it")
        return None


BLOCKED = {"torch", "torchvision", "timm"}
if sys.argv[1:2] == ["--exported"]:
    BLOCKED |= {"flax", "jaxbn"}


sys.meta_path.insert(0, _NoTorch())


def main(directories: list[str]) -> None:
    import jax
    import numpy as np
    import optax

    import jaxbn
    from jaxbn.convert import save_variables

    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch imported in the torch-free process")
    for directory in directories:
        ported = jaxbn.port.load(directory)
        inputs = np.load(f"{directory}/inputs.npz")
        xs = [inputs[f"arr_{i}"] for i in range(len(inputs.files))]
        model, variables = ported.module, ported.variables
        rngs = {"dropout": jax.random.key(1)}
        y = model.apply(variables, *xs, train=False)
        yt, updates = model.apply(variables, *xs, train=True, mutable=["batch_stats"], rngs=rngs)
        leaves = {f"eval{i}": a for i, a in enumerate(jax.tree.leaves(y))}
        leaves |= {f"train{i}": a for i, a in enumerate(jax.tree.leaves(yt))}
        np.savez(f"{directory}/outputs.npz", **leaves)
        save_variables(f"{directory}/updates.msgpack", updates)
        if not os.path.exists(f"{directory}/optax"):
            continue

        def loss(params, stats, xs=xs, model=model, variables=variables):
            out, new = model.apply(
                {**variables, "params": params, "batch_stats": stats},
                *xs,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            total = sum(jax.numpy.mean(jax.numpy.square(a)) for a in jax.tree.leaves(out))
            return total, new["batch_stats"]

        optimizer = optax.sgd(1e-3)
        params, stats = variables["params"], variables.get("batch_stats", {})
        state = optimizer.init(params)
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        losses = []
        for _ in range(3):
            (value, stats), grads = step(params, stats)
            change, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, change)
            losses.append(float(value))
        trained = {**variables, "params": params, "batch_stats": stats}
        save_variables(f"{directory}/trained.msgpack", trained)
        print(directory, "losses", losses, flush=True)


def exported(files: list[str]) -> None:
    """The snippet of jaxbn/port/_export.py, as a user without flax or jaxbn runs it."""
    import io
    import zipfile

    import jax
    import numpy as np

    for file in files:
        with zipfile.ZipFile(file) as z:
            eval_step = jax.export.deserialize(bytearray(z.read("eval")))
            train_step = jax.export.deserialize(bytearray(z.read("train")))
            arrays = np.load(io.BytesIO(z.read("variables.npz")))
        tree = eval_step.in_tree.children()[0].children()[0]
        leaves = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        variables = jax.tree.unflatten(tree, leaves)
        x = np.load(f"{file}.inputs.npy")
        results = {}
        for n in (1, 3):
            results[f"eval{n}"] = eval_step.call(variables, x[:n])
        for n in (2, 3):  # (a training step on one 32x32 image leaves 1 value per channel)
            y, stats = train_step.call(variables, x[:n], jax.random.key(1))
            results[f"train{n}"] = y
            for i, leaf in enumerate(jax.tree.leaves(stats)):
                results[f"stats{n}_{i}"] = leaf
        written: dict[str, Any] = {k: np.asarray(v) for k, v in results.items()}
        np.savez(f"{file}.outputs.npz", **written)
        print(file, "called at batch sizes 1 to 3", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--exported"]:
        exported(sys.argv[2:])
    elif sys.argv[1:2] == ["--script"]:  # a script run as `python SCRIPT ARGS`, without torch
        import runpy

        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        main(sys.argv[1:])
