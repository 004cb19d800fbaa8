"""A port as exported programs: its eval function and its training step, for jax alone.

``ported.export(file)`` writes one zip file holding the two serialised
``jax.export`` programs and the variables:

- ``eval``: ``(variables, *inputs) -> outputs``;
- ``train``: ``(variables, *inputs, key) -> (outputs, batch_stats)``, a
  training step (batch statistics, dropout drawn from ``key``, a
  ``jax.random.key``) that returns the updated statistics;
- ``variables.npz``: the variables' arrays in ``jax.tree.leaves`` order
  (the programs' own input tree puts them back).

The batch dimension is symbolic: the programs take any batch size. Loading
needs jax and numpy only (no flax, no jaxbn, no torch): :func:`load` shows how.

Serialising needs ``flatbuffers`` (the ``export`` extra: ``pip install -e
'.[export]'`` from the checkout).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from ._errors import PortError


class Exported(NamedTuple):
    """A port's exported programs (``jax.export.Exported``) and its variables."""

    eval: Any  # (variables, *inputs) -> outputs
    train: Any  # (variables, *inputs, key) -> (outputs, batch_stats)
    variables: dict[str, Any]


def export(ported: Any, inputs: list[tuple[tuple[int, ...], str]]) -> Exported:
    """Export ``ported``'s eval function and training step for inputs of these (shape,
    dtype) with a symbolic batch dimension."""
    from jax import export as jax_export

    (batch,) = jax_export.symbolic_shape("batch")
    specs = [jax.ShapeDtypeStruct((batch, *shape[1:]), np.dtype(dtype)) for shape, dtype in inputs]
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), ported.variables)
    module = ported.module

    def evaluate(variables: Any, *xs: Any) -> Any:
        return module.apply(variables, *xs, train=False)

    def train(variables: Any, *xs_and_key: Any) -> Any:
        *xs, key = xs_and_key
        y, updates = module.apply(
            variables, *xs, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return y, updates.get("batch_stats", {})

    try:
        eval_program = jax_export.export(jax.jit(evaluate))(variables, *specs)
        train_program = jax_export.export(jax.jit(train))(variables, *specs, jax.random.key(0))
    except Exception as error:  # a shape check the symbolic batch cannot pass
        raise PortError(
            f"jaxbn.port: cannot export {ported.info.get('torch_class', 'the model')} with a "
            f"symbolic batch size: {type(error).__name__}: {str(error).splitlines()[0]}"
        ) from error
    return Exported(eval_program, train_program, ported.variables)


def write(exported: Exported, file: str | os.PathLike[str]) -> Path:
    """Write the programs and the variables to one zip file (see the module's help)."""
    try:
        eval_bytes, train_bytes = exported.eval.serialize(), exported.train.serialize()
    except ImportError as error:
        raise PortError(
            f"jaxbn.port: serialising an exported program needs flatbuffers ({error}); "
            "install it from the checkout: pip install -e '.[export]'"
        ) from None
    arrays = io.BytesIO()
    np.savez(arrays, *(np.asarray(a) for a in jax.tree.leaves(exported.variables)))
    path = Path(file)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("eval", bytes(eval_bytes))
        archive.writestr("train", bytes(train_bytes))
        archive.writestr("variables.npz", arrays.getvalue())
    return path


def load(file: str | os.PathLike[str]) -> Exported:
    """Read a file :meth:`jaxbn.port.Ported.export` wrote: the two programs (call them
    with ``.call``) and the variables they take first.

    The file is a zip of ``eval`` and ``train`` (serialised ``jax.export``
    programs) and ``variables.npz``; where jaxbn is not installed, jax and numpy
    read it so::

        import io, zipfile
        import jax, numpy as np

        with zipfile.ZipFile("model.jaxexport") as z:
            eval_step = jax.export.deserialize(bytearray(z.read("eval")))
            train_step = jax.export.deserialize(bytearray(z.read("train")))
            arrays = np.load(io.BytesIO(z.read("variables.npz")))
        tree = eval_step.in_tree.children()[0].children()[0]  # (args, kwargs) -> args[0]
        variables = jax.tree.unflatten(tree, [arrays[f"arr_{i}"] for i in range(len(arrays.files))])
        y = eval_step.call(variables, x)
        y, batch_stats = train_step.call(variables, x, jax.random.key(0))
    """
    from jax import export as jax_export

    try:
        with zipfile.ZipFile(file) as archive:
            eval_program = jax_export.deserialize(bytearray(archive.read("eval")))
            train_program = jax_export.deserialize(bytearray(archive.read("train")))
            arrays = np.load(io.BytesIO(archive.read("variables.npz")))
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise PortError(
            f"jaxbn.port.load_exported: {file} is not an exported port: {error}"
        ) from None
    tree = eval_program.in_tree.children()[0].children()[0]
    leaves = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return Exported(eval_program, train_program, jax.tree.unflatten(tree, leaves))
