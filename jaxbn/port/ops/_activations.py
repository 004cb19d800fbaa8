"""Activations: torch's, timm's classes for them, and softmax.

Kinked activations clamp with a select (:func:`_clamped`) so that their
gradient at a kink is torch's: ReLU passes 0 at 0, not the half that
``jnp.maximum`` passes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._registry import attributes, register, with_variables

Array = jax.Array

_TIMM = "timm.layers.activations"


def _clamped(input: Array, low: Any, high: Any) -> Array:
    """``input`` clamped to [low, high] with torch's gradient: 1 strictly
    between the bounds, 0 at and beyond them. NaN stays NaN."""
    inside = jnp.ones(jnp.shape(input), bool)
    if low is not None:
        inside &= input > low
    if high is not None:
        inside &= input < high
    return jnp.where(inside, input, lax.stop_gradient(jnp.clip(input, low, high)))


@register(
    "torch.nn.functional.relu",
    "torch.nn.functional.relu_",
    "torch.relu",
    "torch.relu_",
    "Tensor.relu",
    "Tensor.relu_",
    modules={"torch.nn.ReLU": attributes()},
)
def relu(input: Array, inplace: bool = False) -> Array:
    return _clamped(input, 0, None)


@register("torch.nn.functional.relu6", modules={"torch.nn.ReLU6": attributes()})
def relu6(input: Array, inplace: bool = False) -> Array:
    return _clamped(input, 0, 6)


@register(
    "torch.nn.functional.hardtanh",
    "torch.nn.functional.hardtanh_",
    modules={"torch.nn.Hardtanh": attributes("min_val", "max_val")},
)
def hardtanh(
    input: Array, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> Array:
    return _clamped(input, min_val, max_val)


@register(
    "torch.nn.functional.sigmoid",
    "torch.sigmoid",
    "torch.sigmoid_",
    "Tensor.sigmoid",
    "Tensor.sigmoid_",
    modules={"torch.nn.Sigmoid": attributes(), f"{_TIMM}.Sigmoid": attributes()},
)
def sigmoid(input: Array) -> Array:
    return jax.nn.sigmoid(input)


@register(
    "torch.nn.functional.silu",
    modules={"torch.nn.SiLU": attributes(), f"{_TIMM}.Swish": attributes()},
)
def silu(input: Array, inplace: bool = False) -> Array:
    return input * jax.nn.sigmoid(input)


@register(
    "torch.nn.functional.tanh",
    "torch.tanh",
    "torch.tanh_",
    "Tensor.tanh",
    "Tensor.tanh_",
    modules={"torch.nn.Tanh": attributes(), f"{_TIMM}.Tanh": attributes()},
)
def tanh(input: Array) -> Array:
    return jnp.tanh(input)


@register(
    "torch.nn.functional.hardsigmoid",
    modules={"torch.nn.Hardsigmoid": attributes(), f"{_TIMM}.HardSigmoid": attributes()},
)
def hardsigmoid(input: Array, inplace: bool = False) -> Array:
    return _clamped(input + 3, 0, 6) / 6


@register(
    "torch.nn.functional.hardswish",
    modules={"torch.nn.Hardswish": attributes(), f"{_TIMM}.HardSwish": attributes()},
)
def hardswish(input: Array, inplace: bool = False) -> Array:
    return input * _clamped(input + 3, 0, 6) / 6


@register(
    "torch.nn.functional.gelu",
    modules={
        "torch.nn.GELU": attributes("approximate"),
        f"{_TIMM}.GELU": attributes(),
        f"{_TIMM}.GELUTanh": attributes(approximate="tanh"),
    },
)
def gelu(input: Array, approximate: str = "none") -> Array:
    return jax.nn.gelu(input, approximate=approximate == "tanh")


@register(f"{_TIMM}.quick_gelu", modules={f"{_TIMM}.QuickGELU": attributes()})
def quick_gelu(input: Array, inplace: bool = False) -> Array:
    """timm's (and CLIP's) ``x * sigmoid(1.702 x)``."""
    return input * jax.nn.sigmoid(1.702 * input)


@register(
    "torch.nn.functional.leaky_relu",
    "torch.nn.functional.leaky_relu_",
    modules={"torch.nn.LeakyReLU": attributes("negative_slope")},
)
def leaky_relu(input: Array, negative_slope: float = 0.01, inplace: bool = False) -> Array:
    return jnp.where(input > 0, input, input * negative_slope)


@register(
    "torch.nn.functional.elu",
    "torch.nn.functional.elu_",
    modules={"torch.nn.ELU": attributes("alpha")},
)
def elu(input: Array, alpha: float = 1.0, inplace: bool = False) -> Array:
    return jnp.where(input > 0, input, alpha * jnp.expm1(input))


@register(
    "torch.nn.functional.softplus", modules={"torch.nn.Softplus": attributes("beta", "threshold")}
)
def softplus(input: Array, beta: float = 1.0, threshold: float = 20.0) -> Array:
    scaled = input * beta
    linear = scaled > threshold
    # (the untaken branch masked too: exp overflows past 88, and its 0 * inf gradient is NaN)
    return jnp.where(linear, input, jnp.log1p(jnp.exp(jnp.where(linear, 0, scaled))) / beta)


@register(
    "torch.nn.functional.mish",
    modules={"torch.nn.Mish": attributes(), f"{_TIMM}.Mish": attributes()},
)
def mish(input: Array, inplace: bool = False) -> Array:
    return input * jnp.tanh(softplus(input))


@register(f"{_TIMM}.hard_mish", modules={f"{_TIMM}.HardMish": attributes()})
def hard_mish(input: Array, inplace: bool = False) -> Array:
    """timm's ``0.5 * x * (x + 2).clamp(0, 2)``."""
    return 0.5 * input * _clamped(input + 2, 0, 2)


@register("torch.nn.functional.softsign", modules={"torch.nn.Softsign": attributes()})
def softsign(input: Array) -> Array:
    return input / (1 + jnp.abs(input))


@register(
    "torch.nn.functional.prelu",
    "torch.prelu",
    modules={
        "torch.nn.PReLU": with_variables(attributes(), "weight"),
        f"{_TIMM}.PReLU": with_variables(attributes(), "weight"),
    },
)
def prelu(input: Array, weight: Array) -> Array:
    """``weight`` has one slope, or one per channel (axis 1); at 0 the gradient is the slope."""
    shape = (1,) * input.ndim if weight.size == 1 else (-1, *(1,) * (input.ndim - 2))
    return jnp.where(input > 0, input, weight.reshape(shape) * input)


@register(
    "torch.nn.functional.softmax",
    "torch.softmax",
    "Tensor.softmax",
    modules={"torch.nn.Softmax": attributes("dim")},
)
def softmax(input: Array, dim: int | None = None, _stacklevel: Any = 3, dtype: Any = None) -> Array:
    """``F.softmax``; ``torch.softmax`` and ``Tensor.softmax`` take ``dtype`` third."""
    dtype = _stacklevel if dtype is None and not isinstance(_stacklevel, int) else dtype
    x = input if dtype is None else input.astype(dtype)
    return jax.nn.softmax(x, axis=_implicit_dim(x) if dim is None else dim)


@register(
    "torch.nn.functional.log_softmax",
    "torch.log_softmax",
    "Tensor.log_softmax",
    modules={"torch.nn.LogSoftmax": attributes("dim")},
)
def log_softmax(
    input: Array, dim: int | None = None, _stacklevel: Any = 3, dtype: Any = None
) -> Array:
    """``F.log_softmax``; ``torch.log_softmax`` and the method take ``dtype`` third."""
    dtype = _stacklevel if dtype is None and not isinstance(_stacklevel, int) else dtype
    x = input if dtype is None else input.astype(dtype)
    return jax.nn.log_softmax(x, axis=_implicit_dim(x) if dim is None else dim)


def _implicit_dim(x: Array) -> int:
    """torch's (deprecated) choice when ``dim`` is not given: 0 for 0-, 1- and 3-D, else 1."""
    return 0 if x.ndim in (0, 1, 3) else 1
