"""The Flax leaves a port is built from: what one torch leaf module becomes.

Variables are declared in the converter's Flax layout, so a port's
variables are exactly what :func:`jaxbn.from_torch` produces; activations
stay (N, C, ...) as in torch. Depends on jax and flax only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def dtype_of(tensor: Any) -> Any:
    """A torch tensor's dtype as jax's (read from its name: no torch import)."""
    return jnp.dtype(str(tensor.dtype).removeprefix("torch."))


class Variable(NamedTuple):
    """A torch tensor as the Flax variable the converter makes of it.

    ``argument`` is the torch name; ``collection``/``name``/``shape`` the
    Flax variable (in Flax's layout); ``axes`` permute it back to torch's.
    """

    argument: str
    collection: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[int, ...]

    def declare(self, scope: Any) -> jax.Array:
        """Declare it in ``scope`` (a Flax module or scope), and return it in torch's layout."""
        init = lambda *_: self._zeros()  # noqa: E731
        if self.collection == "params":
            value = scope.param(self.name, init, self.shape, self._zeros().dtype)
        else:
            value = scope.variable(self.collection, self.name, init, self.shape).value
        return self._torch_layout(value)

    def read(self, scope: Any) -> jax.Array:
        """Its value in ``scope``, where a layer declares it (zeros before that, at init)."""
        if scope.has_variable(self.collection, self.name):
            return self._torch_layout(scope.get_variable(self.collection, self.name))
        return self._torch_layout(self._zeros())

    def _zeros(self) -> jax.Array:
        # (in the dtype JAX holds: an int64 index table is int32 unless x64 is on)
        return jnp.zeros(self.shape, jax.dtypes.canonicalize_dtype(jnp.dtype(self.dtype)))

    def _torch_layout(self, value: jax.Array) -> jax.Array:
        if self.axes == tuple(range(len(self.axes))):
            return value
        return jnp.transpose(value, self.axes)


class Op(nn.Module):
    """A torch leaf module without variables (an activation, a pooling).

    It is a module only so that it sits at its torch path, where
    ``capture_intermediates`` (and so :func:`jaxbn.parity.compare_models`)
    records its output.
    """

    fn: Callable[..., Any]
    train_aware: bool = False  # fn takes train= and rng= keywords

    def __call__(self, *args: Any, train: bool = False, **kwargs: Any) -> Any:
        if self.train_aware:
            kwargs |= {"train": train, "rng": lambda: self.make_rng("dropout")}
        return self.fn(*args, **kwargs)


class WithVariables(nn.Module):
    """A torch module whose forward is an op called with its own tensors (LayerNorm's
    weight and bias), each declared where the converter puts it."""

    fn: Callable[..., Any]
    keywords: tuple[tuple[str, Any], ...]
    tensors: tuple[Variable, ...]

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        own = {v.argument: v.declare(self) for v in self.tensors}
        return self.fn(*args, **dict(self.keywords), **own, **kwargs)


class Layer(NamedTuple):
    """What one torch leaf module becomes.

    ``make(parent=scope)`` builds the Flax module (bound where the torch
    module sits); ``call(module, train, *args, **kwargs)`` runs it with the
    module's inputs and the Flax ``train`` flag.
    """

    make: Callable[..., nn.Module]
    call: Callable[..., Any]


def plain_call(module: nn.Module, train: bool, *args: Any, **kwargs: Any) -> Any:
    """A module that behaves the same in training and eval."""
    del train
    return module(*args, **kwargs)


def train_call(module: nn.Module, train: bool, *args: Any, **kwargs: Any) -> Any:
    """A module that takes the ``train`` flag (:class:`Op`, :class:`Composite`)."""
    return module(*args, train=train, **kwargs)


def batch_norm_call(module: nn.Module, train: bool, x: Any) -> Any:
    """A jaxbn BatchNorm: a training step updates its statistics."""
    return module(x, use_running_average=not train)


class Composite(nn.Module):
    """A leaf whose variables are one layer's, followed by named child leaves.

    timm's ``BatchNormAct2d`` is a BatchNorm2d (its tensors at its own path,
    so the BatchNorm shares this module's scope) followed by its ``drop``
    and ``act`` children (at ``<path>.drop``, ``<path>.act``).
    """

    first: Layer
    children: tuple[tuple[str, Layer], ...]

    @nn.compact
    def __call__(self, x: Any, *, train: bool = False) -> Any:
        first = self.first.make()
        nn.share_scope(self, first)
        # The shared layer would record its output at this path too; keep
        # only this module's own (torch hooks see one output per module).
        before = self.get_variable("intermediates", "__call__", ())
        y = self.first.call(first, train, x)
        if self.is_mutable_collection("intermediates"):
            self.put_variable("intermediates", "__call__", before)
        for name, layer in self.children:
            y = layer.call(layer.make(name=name), train, y)
        return y


def op(fn: Callable[..., Any], train_aware: bool = False) -> Layer:
    """A leaf without variables."""
    return Layer(functools.partial(Op, fn, train_aware), train_call)
