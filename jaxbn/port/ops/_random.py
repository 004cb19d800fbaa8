"""Train-time randomness: dropout, stochastic depth, drop path.

These follow the Flax ``train`` flag and draw from the ``'dropout'`` RNG
(the port passes ``train=`` and ``rng=``, a function that makes a key);
the ``training`` argument torch code passes, baked in by tracing, is
replaced by the flag.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._registry import attributes, register

Array = jax.Array


def _drop(
    input: Array, p: float, train: bool, rng: Callable[[], Array], shape: tuple[int, ...]
) -> Array:
    """Zero with probability ``p`` per element of a mask of ``shape``; scale the rest."""
    if not train or p == 0:
        return input
    if p == 1:
        return jnp.zeros_like(input)
    keep = jax.random.bernoulli(rng(), 1 - p, shape)
    return jnp.where(keep, input / (1 - p), 0).astype(input.dtype)


@register(
    "torch.nn.functional.dropout",
    "torch.dropout",
    modules={"torch.nn.Dropout": attributes("p")},
    train_aware=True,
)
def dropout(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    del training
    return _drop(input, p, train, rng, input.shape)


def _feature_dropout(
    input: Array, p: float, train: bool, rng: Callable[[], Array], d: int
) -> Array:
    """Whole channels of (N, C, *d spatial) input (or unbatched (C, *d spatial))."""
    return _drop(input, p, train, rng, (*input.shape[: input.ndim - d], *(1,) * d))


@register(
    "torch.nn.functional.dropout1d",
    modules={"torch.nn.Dropout1d": attributes("p")},
    train_aware=True,
)
def dropout1d(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    del training
    return _feature_dropout(input, p, train, rng, 1)


@register(
    "torch.nn.functional.dropout2d",
    modules={"torch.nn.Dropout2d": attributes("p")},
    train_aware=True,
)
def dropout2d(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    del training
    # torch reads a 3-D input as (N, C, L), as dropout1d (and warns)
    return _feature_dropout(input, p, train, rng, 1 if input.ndim == 3 else 2)


@register(
    "torch.nn.functional.dropout3d",
    modules={"torch.nn.Dropout3d": attributes("p")},
    train_aware=True,
)
def dropout3d(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    del training
    return _feature_dropout(input, p, train, rng, 3)


@register(
    "torchvision.ops.stochastic_depth",
    modules={"torchvision.ops.StochasticDepth": attributes("p", "mode")},
    train_aware=True,
)
def stochastic_depth(
    input: Array,
    p: float,
    mode: str,
    training: bool = True,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """torchvision's: drop whole rows ('row') or the batch ('batch')."""
    del training
    if not train or p == 0.0:
        return input
    survival = 1.0 - p
    shape = (input.shape[0],) + (1,) * (input.ndim - 1) if mode == "row" else (1,) * input.ndim
    noise = jax.random.bernoulli(rng(), survival, shape).astype(input.dtype)
    if survival > 0.0:
        noise = noise / survival
    return input * noise


@register(
    "timm.layers.drop.drop_path",
    modules={"timm.layers.drop.DropPath": attributes("drop_prob", "scale_by_keep")},
    train_aware=True,
)
def drop_path(
    x: Array,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """timm's per-sample stochastic depth."""
    del training
    if drop_prob == 0.0 or not train:
        return x
    keep = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    noise = jax.random.bernoulli(rng(), keep, shape).astype(x.dtype)
    if keep > 0.0 and scale_by_keep:
        noise = noise / keep
    return x * noise
