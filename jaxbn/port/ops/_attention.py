"""Attention: ``F.scaled_dot_product_attention`` with every one of its options."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._registry import Unsupported, register

Array = jax.Array


def _check(attn_mask: Any = None, is_causal: Any = False, **_: Any) -> None:
    if is_causal is True and attn_mask is not None:
        raise Unsupported(
            "F.scaled_dot_product_attention: attn_mask and is_causal=True together "
            "(torch refuses them too)"
        )


@register("torch.nn.functional.scaled_dot_product_attention", train_aware=True, check=_check)
def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    attn_mask: Array | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """``softmax(q @ k^T * scale + bias) @ v`` over (..., L, E) queries and (..., S, E) keys.

    ``scale`` None is ``1 / sqrt(E)``. ``attn_mask``: boolean (True takes
    part) or added to the scores, broadcast to (..., L, S); ``is_causal``
    masks keys after each query (the upper-left triangle). A query that
    every key is masked from gets zeros, as torch's math kernel gives.
    ``enable_gqa``: keys and values with fewer heads (axis -3) serve groups
    of query heads. ``dropout_p`` drops attention weights in a training step
    (the Flax ``train`` flag, the ``'dropout'`` RNG), not in eval.
    """
    length, source = query.shape[-2], key.shape[-2]
    factor = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = jnp.repeat(key, groups, axis=-3)
        value = jnp.repeat(value, groups, axis=-3)
    scores = (query @ jnp.swapaxes(key, -2, -1)) * jnp.asarray(factor, query.dtype)
    allowed = None
    if is_causal:
        allowed = jnp.tril(jnp.ones((length, source), bool))
    if attn_mask is not None:
        if attn_mask.dtype == jnp.bool_:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            scores = scores + attn_mask
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    # A row with every key masked: softmax of -inf everywhere is NaN; torch gives 0
    # (and a zero gradient, which needs finite scores there).
    masked = jnp.isneginf(scores).all(axis=-1, keepdims=True)
    weights = jnp.where(masked, 0, jax.nn.softmax(jnp.where(masked, 0, scores), axis=-1))
    if train and dropout_p > 0:
        keep = jax.random.bernoulli(rng(), 1 - dropout_p, weights.shape)
        weights = jnp.where(keep, weights / (1 - dropout_p), 0).astype(weights.dtype)
    return weights @ value
