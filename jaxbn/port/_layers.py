"""The Flax leaf modules a port is built from, in PyTorch's layout.

Variables are declared in the converter's Flax layout (a Conv kernel is
``(*k, in/groups, out)``, a Linear kernel ``(in, out)``), so a port's
variables are exactly what :func:`jaxbn.from_torch` produces; activations
stay (N, C, ...) as in torch. Depends on jax and flax only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

# jnp.pad modes for torch's padding_mode / F.pad mode.
PAD_MODES = {"zeros": "constant", "constant": "constant", "reflect": "reflect",
             "replicate": "edge", "circular": "wrap"}  # fmt: skip


class Conv(nn.Module):
    """``torch.nn.Conv{1,2,3}d`` on (N, C, *spatial) input.

    ``padding`` is explicit (low, high) per spatial axis, already resolved
    from torch's int, tuple, 'same' or 'valid'.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int = 1
    use_bias: bool = True
    padding_mode: str = "zeros"
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = len(self.kernel_size)
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, self.in_channels // self.groups, self.out_channels),
            self.param_dtype,
        )
        padding = self.padding
        if self.padding_mode != "zeros":
            widths = ((0, 0), (0, 0), *padding)
            x = jnp.pad(x, widths, mode=PAD_MODES[self.padding_mode])  # type: ignore[arg-type]
            padding = ((0, 0),) * d
        weight = jnp.transpose(kernel, (d + 1, d, *range(d)))  # -> (out, in, *k)
        spatial = "DHW"[3 - d :]
        y = lax.conv_general_dilated(
            x,
            weight,
            window_strides=self.stride,
            padding=padding,
            rhs_dilation=self.dilation,
            feature_group_count=self.groups,
            dimension_numbers=(f"NC{spatial}", f"OI{spatial}", f"NC{spatial}"),
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.out_channels,), self.param_dtype)
            y = y + bias.reshape(-1, *(1,) * d)
        return y


class Linear(nn.Module):
    """``torch.nn.Linear``: ``x @ kernel + bias`` with ``kernel = weight.T``."""

    in_features: int
    out_features: int
    use_bias: bool = True
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.in_features, self.out_features),
            self.param_dtype,
        )
        y = x @ kernel
        if self.use_bias:
            y = y + self.param(
                "bias", nn.initializers.zeros, (self.out_features,), self.param_dtype
            )
        return y


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
