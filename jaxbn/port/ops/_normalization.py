"""Normalisation: BatchNorm (jaxbn's own layers), layer, group, instance and RMS norm,
and ``F.normalize``.

A BatchNorm module becomes a jaxbn layer with that module's own momentum
(``None`` too), eps, affine and tracking; the functional ``F.batch_norm``
ports where it does not update statistics in place (weight
standardisation calls it so).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ... import _functional, _linen
from ..._frozen import FrozenBatchNorm2d
from .._layers import Composite, Layer, batch_norm_call, dtype_of, plain_call, train_call
from ._registry import AsLayer, FromModule, Unsupported, attributes, register, with_variables
from ._tensors import vector_norm

Array = jax.Array


def batch_norm_layer(m: Any, child: Callable[[str], Layer], layer: str | None = None) -> Layer:
    """A jaxbn BatchNorm with this module's own momentum, eps, affine, tracking."""
    layer = layer or type(m).__name__
    cls = getattr(
        _linen, layer if layer in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d") else "BatchNorm"
    )
    extra = {} if cls is not _linen.BatchNorm else {"axis": 1}
    tensor = m.weight if m.weight is not None else m.running_mean
    return Layer(
        functools.partial(
            cls,
            num_features=m.num_features,
            momentum=m.momentum,
            eps=m.eps,
            affine=m.affine,
            use_bias=getattr(m, "bias", None) is not None or not m.affine,
            track_running_stats=m.track_running_stats,
            param_dtype=dtype_of(tensor) if tensor is not None else jnp.float32,
            **extra,
        ),
        batch_norm_call,
    )


def frozen_batch_norm_layer(m: Any, child: Callable[[str], Layer]) -> Layer:
    return Layer(
        functools.partial(FrozenBatchNorm2d, m.weight.shape[0], m.eps, dtype_of(m.weight)),
        plain_call,
    )


def _then_drop_and_act(first: Callable[..., Layer]) -> Callable[..., Layer]:
    """timm's ``*Act2d``: a BatchNorm at the module's own path, then its ``drop`` and ``act``."""

    def convert(m: Any, child: Callable[[str], Layer]) -> Layer:
        children = tuple((name, child(name)) for name in ("drop", "act"))
        return Layer(functools.partial(Composite, first(m, child), children), train_call)

    return convert


def _check_batch_norm(running_mean: Any = None, training: Any = False, **_: Any) -> None:
    if training is True and running_mean is not None:
        raise Unsupported(
            "F.batch_norm with running statistics in training updates them in place; the "
            "port runs BatchNorm modules (nn.BatchNorm2d, ...), not this functional form: "
            "keep the module that calls it a leaf with a converter (leaves=, converters=)"
        )


@register(
    "torch.nn.functional.batch_norm",
    modules={
        **{f"torch.nn.BatchNorm{d}d": AsLayer(batch_norm_layer) for d in (1, 2, 3)},
        "torch.nn.SyncBatchNorm": AsLayer(functools.partial(batch_norm_layer, layer="BatchNorm")),
        "torchvision.ops.FrozenBatchNorm2d": AsLayer(frozen_batch_norm_layer),
        "timm.layers.norm_act.BatchNormAct2d": AsLayer(
            _then_drop_and_act(functools.partial(batch_norm_layer, layer="BatchNorm2d"))
        ),
        "timm.layers.norm_act.FrozenBatchNormAct2d": AsLayer(
            _then_drop_and_act(frozen_batch_norm_layer)
        ),
    },
    check=_check_batch_norm,
)
def batch_norm(
    input: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Array:
    """``F.batch_norm`` over axis 1: batch statistics in training (or without running ones),
    else the given running statistics; never an update."""
    if training or running_mean is None or running_var is None:
        y, _ = _functional.batch_norm(input, None, weight, bias, training=True, eps=eps, axis=1)
        return y
    stats = _functional.BatchStats(running_mean, running_var, jnp.zeros((), jnp.int32))
    y, _ = _functional.batch_norm(input, stats, weight, bias, training=False, eps=eps, axis=1)
    return y


def _accumulated(x: Array) -> Array:
    """``x`` in the type torch computes a norm in: float32 for half and bfloat16."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _normalized(x: Array, axes: tuple[int, ...], eps: float) -> Array:
    """``(x - mean) / sqrt(biased var + eps)`` over ``axes``, in float32 at least."""
    x = _accumulated(x)
    mean = jnp.mean(x, axes, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axes, keepdims=True)
    return centred * jax.lax.rsqrt(var + jnp.asarray(eps, x.dtype))


def _scaled(
    y: Array, weight: Array | None, bias: Array | None, shape: Callable[[Array], Array], like: Array
) -> Array:
    """``y * weight + bias`` (each broadcast by ``shape``) in ``y``'s type, as ``like``'s."""
    if weight is not None:
        y = y * shape(weight).astype(y.dtype)
    if bias is not None:
        y = y + shape(bias).astype(y.dtype)
    return y.astype(like.dtype)


@register(
    "torch.nn.functional.layer_norm",
    "torch.layer_norm",
    modules={
        "torch.nn.LayerNorm": with_variables(
            attributes("normalized_shape", "eps"), "weight", "bias"
        )
    },
)
def layer_norm(
    input: Array,
    normalized_shape: Sequence[int],
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
) -> Array:
    """Normalise over the last ``len(normalized_shape)`` axes, then ``* weight + bias``."""
    shape = (
        tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    )
    if tuple(input.shape[input.ndim - len(shape) :]) != shape:
        raise ValueError(
            f"layer_norm: normalized_shape={list(shape)} does not match the last axes of the "
            f"input of shape {tuple(input.shape)}"
        )
    y = _normalized(input, tuple(range(input.ndim - len(shape), input.ndim)), eps)
    return _scaled(y, weight, bias, lambda v: v, input)


@register(
    "torch.nn.functional.rms_norm",
    "torch.rms_norm",
    modules={"torch.nn.RMSNorm": with_variables(attributes("normalized_shape", "eps"), "weight")},
)
def rms_norm(
    input: Array,
    normalized_shape: Sequence[int],
    weight: Array | None = None,
    eps: float | None = None,
) -> Array:
    """``x / sqrt(mean(x^2) + eps) * weight``; eps None is the machine epsilon of the type
    torch computes in (float32's for half and bfloat16)."""
    shape = (
        tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)
    )
    axes = tuple(range(input.ndim - len(shape), input.ndim))
    x = _accumulated(input)
    eps = float(jnp.finfo(x.dtype).eps) if eps is None else eps
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axes, keepdims=True) + eps)
    return _scaled(y, weight, None, lambda v: v, input)


def _per_channel(value: Array, ndim: int) -> Array:
    return value.reshape(-1, *(1,) * (ndim - 2))


@register(
    "torch.nn.functional.group_norm",
    "torch.group_norm",
    modules={
        "torch.nn.GroupNorm": with_variables(attributes("num_groups", "eps"), "weight", "bias")
    },
)
def group_norm(
    input: Array,
    num_groups: int,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
) -> Array:
    """Normalise each of ``num_groups`` groups of channels of (N, C, ...) input."""
    n, c = input.shape[:2]
    if c % num_groups:
        raise ValueError(
            f"group_norm: {c} channels do not split into num_groups={num_groups} groups"
        )
    grouped = input.reshape(n, num_groups, -1)
    y = _normalized(grouped, (2,), eps).reshape(input.shape)
    return _scaled(y, weight, bias, lambda v: _per_channel(v, input.ndim), input)


_NO_RUNNING_STATS = "instance norm with running statistics (track_running_stats=True) has no port"


def _check_instance_norm(running_mean: Any = None, **_: Any) -> None:
    if running_mean is not None:
        raise Unsupported(_NO_RUNNING_STATS)


def _instance_norm_module(m: Any) -> dict[str, Any]:
    if m.track_running_stats:
        raise Unsupported(_NO_RUNNING_STATS)
    return {"eps": m.eps}


@register(
    "torch.nn.functional.instance_norm",
    modules={
        f"torch.nn.InstanceNorm{d}d": with_variables(
            FromModule(_instance_norm_module, unbatched=d + 1), "weight", "bias"
        )
        for d in (1, 2, 3)
    },
    check=_check_instance_norm,
)
def instance_norm(
    input: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Array:
    """Normalise each channel of each sample over its spatial axes (no running statistics)."""
    y = _normalized(input, tuple(range(2, input.ndim)), eps)
    return _scaled(y, weight, bias, lambda v: _per_channel(v, input.ndim), input)


@register("torch.nn.functional.normalize")
def normalize(
    input: Array, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Any = None
) -> Array:
    """``input / max(||input||_p, eps)`` along ``dim``; the gradient at a zero vector is 0."""
    return input / jnp.maximum(vector_norm(input, p, dim, keepdims=True), eps)
