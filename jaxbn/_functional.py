"""Pure functional BatchNorm with PyTorch's semantics.

This module depends on jax only: no flax, no torch. Everything else in jaxbn
(the Flax modules, the converters, the parity harness) is built on
:func:`batch_norm` and :class:`BatchStats`.
"""

from __future__ import annotations

import contextvars
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple, cast, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Caller(NamedTuple):
    """How the API in use spells what the core's messages name; the layers set their own."""

    eval_hint: str = "training=False"  # how it selects eval
    channels_last_fix: str = "pass axis=-1"  # its way to take channels-last input
    checks_momentum: bool = True  # False: the layer checked it where it was defined


CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("jaxbn_caller", default=Caller())  # noqa: B039 (immutable)


class BatchStats(NamedTuple):
    """Running statistics of one BatchNorm layer, as PyTorch keeps them.

    ``var`` is PyTorch's ``running_var``: the running average of the
    *unbiased* batch variance (``n / (n - 1)`` times the variance used to
    normalise), not the biased one Flax stores.

    ``num_batches_tracked`` counts training steps. It is int32 unless
    ``jax_enable_x64`` is on (then int64, as in PyTorch), and it saturates
    at its dtype's maximum instead of wrapping around to a negative count as
    PyTorch's int64 buffer does.
    """

    mean: jax.Array  # (C,) float, PyTorch's running_mean
    var: jax.Array  # (C,) float, PyTorch's running_var (unbiased)
    num_batches_tracked: jax.Array  # () int32, or int64 under jax_enable_x64

    @classmethod
    def create(cls, num_features: int, dtype: DTypeLike = jnp.float32) -> BatchStats:
        """PyTorch's initial statistics: mean 0, var 1, no batches tracked.

        >>> jaxbn.BatchStats.create(3)
        BatchStats(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32), num_batches_tracked=Array(0, dtype=int32))
        """
        return cls(
            mean=jnp.zeros((num_features,), dtype),
            var=jnp.ones((num_features,), dtype),
            num_batches_tracked=jnp.zeros((), count_dtype()),
        )


def count_dtype() -> np.dtype:
    """dtype of ``num_batches_tracked``: int64 under x64, else int32."""
    return jax.dtypes.canonicalize_dtype(jnp.int64)


@overload
def batch_norm(
    x: ArrayLike,
    stats: BatchStats,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, BatchStats]: ...


@overload
def batch_norm(
    x: ArrayLike,
    stats: None,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, None]: ...


def batch_norm(
    x: ArrayLike,
    stats: BatchStats | None,
    scale: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, BatchStats | None]:
    """PyTorch's ``F.batch_norm``, as a pure function of explicit state.

    In training (or whenever ``stats`` is None), each channel is normalised
    with the mean and the *biased* variance of its ``n`` values (all elements
    that share the channel index along ``axis``)::

        y = (x - batch_mean) / sqrt(batch_var + eps) * scale + bias

    and, when ``stats`` is given, the running statistics are updated as in
    PyTorch, with ``m`` the weight of the *new* batch::

        num_batches_tracked += 1
        m = momentum, or 1 / num_batches_tracked when momentum is None
        mean = (1 - m) * mean + m * batch_mean
        var  = (1 - m) * var  + m * batch_var * n / (n - 1)

    In eval (``training=False`` with ``stats``), the running statistics
    normalise and nothing is updated.

    Differentiable in reverse mode (PyTorch's closed-form backward) and in
    forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``); the running
    statistics are not differentiated, as PyTorch's buffers are not. Shapes
    may be symbolic (``jax.export``).

    Args:
      x: input of any rank >= 1, floating point. Half-precision inputs
        (bfloat16, float16) are computed in float32 and returned in their
        own dtype.
      stats: running statistics, each of shape ``(C,)``. None means PyTorch's
        ``track_running_stats=False``: batch statistics are used in training
        *and* eval, and None is returned in their place.
      scale: ``(C,)`` multiplier (PyTorch's ``weight``). None means 1.
      bias: ``(C,)`` offset (PyTorch's ``bias``). None means 0.
      training: True for a training step (PyTorch's ``module.train()``).
      momentum: weight of the new batch in the running averages (PyTorch's
        convention, the opposite of Flax's). None means a cumulative
        average, ``m = 1 / num_batches_tracked``.
      eps: added to the variance before the square root. Must be > 0 when
        batch statistics are used, >= 0 otherwise.
      axis: the channel axis: 1 for PyTorch's NC... layout, -1 for
        channels-last.
      axis_name: a named axis (``shard_map``, ``pmap``, ``vmap``) over which
        batch statistics are combined, weighted by element count.
      axis_index_groups: subsets of ``axis_name``'s devices that normalise
        together, as in ``jax.lax.psum`` (``pmap`` only: ``shard_map`` does
        not support groups).
      mask: boolean, broadcastable to ``x``; True marks valid elements, e.g.
        the real samples of a padded per-device batch. Only valid elements
        enter the batch statistics (counted over all devices); masked
        outputs are 0 and pass no gradient, so NaNs there never leak. A
        channel with at most one valid value over all devices keeps its
        running mean and variance (PyTorch would raise; a mask is only
        known at run time). None: every element is valid.

    Returns:
      ``(y, new_stats)``: ``y`` has the shape and dtype of ``x``;
      ``new_stats`` is ``stats`` updated by one training step (unchanged in
      eval), or None when ``stats`` is None.

    Raises:
      ValueError: ``axis`` out of range; a training batch with a single
        value per channel; ``eps`` out of range.
      RuntimeError: a ``(C,)`` argument whose length differs from the
        input's channel count; parameters whose dtype does not fit the
        input's.
      NotImplementedError: a non-floating-point input.

    >>> x = jnp.arange(8.0).reshape(4, 2)
    >>> y, stats = jaxbn.batch_norm(x, jaxbn.BatchStats.create(2), training=True, axis=-1)
    >>> stats.mean, stats.var, stats.num_batches_tracked
    (Array([0.3, 0.4], dtype=float32), Array([1.5666666, 1.5666666], dtype=float32), Array(1, dtype=int32))
    """
    x = jnp.asarray(x)
    scale = None if scale is None else jnp.asarray(scale)
    bias = None if bias is None else jnp.asarray(bias)
    # The checks run in PyTorch's order, so the first error raised is the same.
    shape = x.shape
    if shape == (0,) and axis == 1:
        # F.batch_norm takes an empty 1-D input (one of PyTorch's own sample
        # inputs) and returns it: a batch of no samples with no channel axis.
        x = x.reshape(0, 0)
    axis = check_axis(x, axis)
    if stats is not None:
        _check_counter(stats.num_batches_tracked)
    use_batch_stats = training or stats is None
    count = _element_count(x, axis, axis_name, axis_index_groups) if use_batch_stats else 0
    if count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input "
            f"size {tuple(x.shape)} (channel axis {axis}). A batch of one "
            "sample with no spatial extent has zero variance; train with a "
            f"larger batch, or evaluate with {CALLER.get().eval_hint}."
        )
    _check_eps(eps, use_batch_stats)
    if x.size == 0:
        # PyTorch returns before its channel and dtype checks; a training
        # step on an empty batch still counts, and changes nothing else.
        y = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)
        y = y.reshape(shape)
        if training and stats is not None:
            return y, _update(stats, None, momentum)
        return y, stats
    channel_args = _per_channel_arrays(stats, scale, bias)
    _check_channels(x, axis, channel_args)
    _check_dtypes(x, channel_args)
    valid = None if mask is None else _check_mask(mask, x)
    if training and stats is not None and CALLER.get().checks_momentum:
        _check_momentum(momentum)

    compute_dtype = jnp.float32 if x.dtype in _HALF_DTYPES else x.dtype
    channels = x.shape[axis]

    def per_channel(v: jax.Array | None, default: float) -> jax.Array:
        if v is None:
            return jnp.full(channels, default, compute_dtype)
        return v.reshape(-1).astype(compute_dtype)

    gamma, beta = per_channel(scale, 1.0), per_channel(bias, 0.0)
    # A free reshape to (before, C, after): XLA:CPU reduces and broadcasts
    # over one dimension on each side of the channels much faster than over
    # several (2.7 ms -> 1.5 ms for a shifted sum over 256x512x7x7).
    # (A trailing dimension of size 1 is dropped: channels-last is (before, C).)
    after = math.prod(x.shape[axis + 1 :])
    # (A symbolic size, under jax.export, always gets the three-axis view.)
    flat = isinstance(after, int) and after == 1
    view = x.reshape(math.prod(x.shape[:axis]), channels, *(() if flat else (after,)))
    if not use_batch_stats:
        assert stats is not None
        # PyTorch's eval kernel folds everything into one multiply-add.
        alpha = gamma / jnp.sqrt(per_channel(stats.var, 1.0) + eps)
        offset = beta - per_channel(stats.mean, 0.0) * alpha
        alpha, offset = (_broadcast(v, view) for v in _per_channel_first(alpha, offset))
        valid_view = _masked(None if valid is None else valid.reshape(view.shape))
        # Masked twice: the inner select keeps NaN padding out of the gradients.
        y = valid_view(valid_view(view.astype(compute_dtype)) * alpha + offset)
        return y.astype(x.dtype).reshape(x.shape), stats

    groups = None if axis_index_groups is None else tuple(map(tuple, axis_index_groups))
    # Under jax.export the count may be symbolic: it then enters the program
    # as a value, and a batch that turns out to hold one value per channel
    # (PyTorch's error, which only a known size can raise) keeps the running
    # statistics, as a mask does.
    static = isinstance(count, int)
    config = _TrainConfig(float(eps), float(count) if static else count, axis_name, groups)
    view_mask = None if valid is None else valid.reshape(view.shape)
    gamma, beta = _varying_like(view, gamma, beta)
    outputs = _normalize_train(config, view, gamma, beta, view_mask)
    y, mean, var, n = cast(tuple[jax.Array, ...], outputs)
    y = y.reshape(x.shape)
    if stats is None:
        return y, None
    unbiased = var * (n / jnp.maximum(n - 1, 1))
    batch = (lax.stop_gradient(mean), lax.stop_gradient(unbiased))
    return y, _update(stats, batch, momentum, None if valid is None and static else n > 1)


class _TrainConfig(NamedTuple):
    """The static part of a training step (hashable, for custom_vjp)."""

    eps: float
    n: Any  # values per channel over all devices: a float, or symbolic under jax.export
    axis_name: str | None
    groups: tuple[tuple[int, ...], ...] | None

    def psum(self, v: jax.Array) -> jax.Array:
        return _psum(v, self.axis_name, self.groups)


def _broadcast(v: jax.Array, view: jax.Array) -> jax.Array:
    """A ``(C,)`` array against ``view``, which is (before, C) or (before, C, after)."""
    return v if view.ndim == 2 else v[:, None]


def _reduce(view: jax.Array) -> tuple[int, ...]:
    return (0,) if view.ndim == 2 else (0, 2)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _normalize_train(
    config: _TrainConfig, x: jax.Array, gamma: jax.Array, beta: jax.Array, mask: jax.Array | None
) -> tuple[jax.Array, ...]:
    """``(y, batch mean, biased batch variance, count)`` of a training step.

    One sweep over ``x`` gives both statistics, taken around a reference
    value from each channel's data, so a mean of 1e4 standard deviations
    costs no precision.

    Differentiation: a custom JVP whose tangent rule is linear in the
    tangents and written so that JAX's transpose of it *is* PyTorch's
    closed-form backward (two per-channel sums of the cotangent, then one
    pass for dx). Forward mode (``jvp``, ``jacfwd``, ``hessian``) uses the
    rule as it is; reverse mode transposes it, and saves only per-channel
    values besides ``x`` (and the mask) itself, since the rule recomputes
    the normalised input from ``x`` under ``jax.checkpoint``.
    """
    return _normalize_train_fwd(config, x, gamma, beta, mask)[0]


def _masked(mask: jax.Array | None) -> Callable[[jax.Array], jax.Array]:
    """Zero outside the mask (a select, so NaN there stays out)."""
    if mask is None:
        return lambda v: v
    return lambda v: jnp.where(mask, v, 0)


def _normalize_train_fwd(
    config: _TrainConfig, x: jax.Array, gamma: jax.Array, beta: jax.Array, mask: jax.Array | None
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The outputs, and the per-channel values the tangent rule needs."""
    valid = _masked(mask)
    xc = x.astype(gamma.dtype)
    n = _count(config, mask, gamma)
    reference = _reference(xc, mask, config)
    # One copy of the reference per use: XLA would otherwise share a single
    # broadcast between the two reductions and write it out in full.
    ref_sum, ref_sq, ref_out = (_broadcast(r, x) for r in _per_channel_first(*(reference,) * 3))
    sum_shifted = config.psum(jnp.sum(valid(xc - ref_sum), _reduce(x)))
    sum_squares = config.psum(jnp.sum(valid(jnp.square(xc - ref_sq)), _reduce(x)))
    shift = sum_shifted / jnp.maximum(n, 1)  # batch mean - reference
    var = jnp.maximum(sum_squares / jnp.maximum(n, 1) - jnp.square(shift), 0)
    inv_std = 1 / jnp.sqrt(var + config.eps)
    shift_b, scale_b, beta_b = (
        _broadcast(v, x) for v in _per_channel_first(shift, gamma * inv_std, beta)
    )
    y = valid(((xc - ref_out) - shift_b) * scale_b + beta_b).astype(x.dtype)
    return (y, reference + shift, var, n), (reference, shift, inv_std, n)


@_normalize_train.defjvp
def _normalize_train_jvp(
    config: _TrainConfig, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    x, gamma, _, mask = primals
    dx, dgamma, dbeta, _ = tangents
    outputs, (reference, shift, inv_std, n) = _normalize_train_fwd(config, *primals)
    # Under checkpoint, reverse mode keeps the rule's inputs (x and (C,)
    # vectors) and recomputes x_hat in the backward pass instead of saving it.
    tangent = jax.checkpoint(partial(_normalize_train_tangent, config), prevent_cse=False)
    dy, dmean, dvar = tangent(x, mask, reference, shift, inv_std, gamma, n, dx, dgamma, dbeta)
    return outputs, (dy, dmean, dvar, jnp.zeros_like(n))


def _normalize_train_tangent(
    config: _TrainConfig,
    x: jax.Array,
    mask: jax.Array | None,
    reference: jax.Array,
    shift: jax.Array,
    inv_std: jax.Array,
    gamma: jax.Array,
    n: jax.Array,
    dx: jax.Array,
    dgamma: jax.Array,
    dbeta: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Tangents of ``(y, mean, var)``: linear in ``(dx, dgamma, dbeta)``.

    ``dy = a * dx + (dbeta - a * mean(dx)) + x_hat * (dgamma - a * mean(dx * x_hat))``
    with ``a = gamma * inv_std``, means over each channel's valid values on
    all devices. Each full-size term meets the per-channel ones through one
    broadcast, so the transpose (the backward pass) reduces the cotangent
    exactly twice, ``sum(dy)`` (= dbeta) and ``sum(dy * x_hat)`` (= dgamma),
    and forms ``dx`` in one more pass: PyTorch's closed form.
    """
    valid = _masked(mask)
    xc = x.astype(gamma.dtype)
    dxc = valid(dx.astype(gamma.dtype))
    per_channel = (reference, shift, inv_std)
    # Two copies, as in the forward pass, so x_hat is never written out.
    first, second = _per_channel_first(per_channel, per_channel)

    def x_hat(values: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        reference, shift, inv_std = (_broadcast(v, x) for v in values)
        return valid(((xc - reference) - shift) * inv_std)

    sums = (jnp.sum(dxc, _reduce(x)), jnp.sum(dxc * x_hat(first), _reduce(x)))
    # (Transposed, this barrier sits on the finished per-channel terms of dx.)
    sum_dx, sum_dx_xhat = _per_channel_first(*sums)
    mean_dx = config.psum(sum_dx) / jnp.maximum(n, 1)
    mean_dx_xhat = config.psum(sum_dx_xhat) / jnp.maximum(n, 1)
    a = gamma * inv_std
    a_b, offset_b, slope_b = (
        _broadcast(v, x) for v in (a, dbeta - a * mean_dx, dgamma - a * mean_dx_xhat)
    )
    dy = valid(a_b * dxc + offset_b + x_hat(second) * slope_b).astype(x.dtype)
    # The statistics' own tangents (the caller stops them, as PyTorch's buffers are).
    return dy, mean_dx, 2 * mean_dx_xhat / inv_std


def _varying_like(x: jax.Array, *values: jax.Array) -> tuple[jax.Array, ...]:
    """``values`` marked as varying over every shard_map axis that ``x`` varies over.

    Inside shard_map, parameters replicated across devices meet a batch that
    varies; JAX's autodiff then sums their gradients over the devices. The
    custom VJP must see the same types, so the marking happens here, where
    JAX would have inserted it. (A no-op outside shard_map.)
    """

    def varying(v: jax.Array) -> frozenset[str]:
        manual = getattr(jax.typeof(v), "manual_axis_type", None)
        return frozenset(getattr(manual, "varying", ()))

    out = []
    for v in values:
        missing = varying(x) - varying(v)
        out.append(lax.pcast(v, tuple(sorted(missing)), to="varying") if missing else v)
    return tuple(out)


def _count(config: _TrainConfig, mask: jax.Array | None, like: jax.Array) -> jax.Array:
    """Valid values per channel over all devices, as a ``(C,)`` float array."""
    if mask is None:
        return jnp.full(like.shape, config.n, like.dtype)
    return config.psum(jnp.sum(mask, _reduce(mask), dtype=like.dtype))


def _per_channel_first(*values: Any) -> Any:
    """Compute per-channel values once, before the full-size loop uses them.

    XLA would otherwise fuse these small computations into the loop over
    every element and redo divisions and square roots per element.
    """
    return lax.optimization_barrier(values)


def _reference(x: jax.Array, mask: jax.Array | None, config: _TrainConfig) -> jax.Array:
    """A ``(C,)`` value near each channel's data, the same on every device.

    Any value works mathematically (it cancels); one near the data keeps the
    shifted sums small: the mean of each channel's first position after the
    channel axis over the leading axis, or, for a (before, C) view, the first
    row. Non-finite and masked values are left out, so that NaN and inf
    propagate through the sums exactly as without the shift.
    """
    sample = x if x.ndim == 2 else x[:, :, 0]
    usable = jnp.isfinite(sample)
    if mask is not None:
        usable &= mask if x.ndim == 2 else mask[:, :, 0]
    if x.ndim == 2 and not _explicitly_sharded(sample):
        # (Under explicit sharding the leading axis cannot be sliced.)
        sample, usable = sample[:1], usable[:1]
    total = config.psum(jnp.sum(jnp.where(usable, sample, 0), 0))
    count = config.psum(jnp.sum(usable, 0, dtype=sample.dtype))
    return lax.stop_gradient(total / jnp.maximum(count, 1))


def _explicitly_sharded(x: jax.Array) -> bool:
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return bool(spec) and spec[0] is not None


def _update(
    stats: BatchStats,
    batch: tuple[jax.Array, jax.Array] | None,
    momentum: float | None,
    where: jax.Array | None = None,
) -> BatchStats:
    """One PyTorch running-statistics step; ``batch`` is (mean, unbiased var).

    ``where`` (per channel) limits the update of mean and var to channels
    that had enough valid values.
    """
    count = stats.num_batches_tracked
    # PyTorch's int64 counter wraps to a negative number; ours saturates.
    tracked = jnp.where(count == jnp.iinfo(count.dtype).max, count, count + 1)
    if batch is None:
        return stats._replace(num_batches_tracked=tracked)
    batch_mean, batch_var = batch
    dtype = batch_mean.dtype  # float32 for half precision, as PyTorch computes
    m = 1.0 / tracked.astype(dtype) if momentum is None else jnp.asarray(momentum, dtype)

    def ema(running: jax.Array, new: jax.Array) -> jax.Array:
        new = new.reshape(running.shape)
        updated = (m * new + (1 - m) * running.astype(dtype)).astype(running.dtype)
        return (
            updated if where is None else jnp.where(where.reshape(running.shape), updated, running)
        )

    return BatchStats(
        mean=ema(stats.mean, batch_mean),
        var=ema(stats.var, batch_var),
        num_batches_tracked=tracked,
    )


def _psum(v: jax.Array, axis_name: str | None, groups: Sequence[Sequence[int]] | None) -> jax.Array:
    if axis_name is None:
        return v
    return lax.psum(v, axis_name, axis_index_groups=groups)


def _element_count(
    x: jax.Array,
    axis: int,
    axis_name: str | None,
    groups: Sequence[Sequence[int]] | None,
) -> int:
    """Values per channel, over all devices of ``axis_name`` (a static int)."""
    local = math.prod(x.shape[:axis] + x.shape[axis + 1 :])
    if axis_name is None:
        return local
    devices = len(groups[0]) if groups else lax.axis_size(axis_name)
    return local * int(devices)


def check_axis(x: jax.Array, axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(
            f"`axis` must be a single int (the channel axis), got {axis!r}. "
            "PyTorch's BatchNorm has exactly one channel axis: use axis=1 for "
            "(N, C, ...) inputs or axis=-1 for channels-last inputs."
        )
    if x.ndim == 0:
        raise ValueError(
            "BatchNorm needs an input with a channel axis, got a 0-D (scalar) "
            "input. Pass an array of shape (N, C, ...) or (..., C)."
        )
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"`axis={axis}` is out of range for a {x.ndim}-D input of shape "
            f"{tuple(x.shape)}; use an axis in [{-x.ndim}, {x.ndim - 1}] "
            "(1 for PyTorch's (N, C, ...) layout, -1 for channels-last)."
        )
    return int(axis) % x.ndim


def _per_channel_arrays(
    stats: BatchStats | None, scale: jax.Array | None, bias: jax.Array | None
) -> dict[str, jax.Array]:
    """The ``(C,)`` arguments that are present, in PyTorch's checking order."""
    named = {"scale": scale, "bias": bias}
    if stats is not None:
        named = {"stats.mean": stats.mean, "stats.var": stats.var} | named
    return {name: jnp.asarray(v) for name, v in named.items() if v is not None}


def _check_channels(x: jax.Array, axis: int, per_channel: dict[str, jax.Array]) -> None:
    channels = x.shape[axis]
    wrong = {name: v.shape for name, v in per_channel.items() if v.size != channels}
    if not wrong:
        return
    first = next(iter(wrong))
    expected = math.prod(wrong[first])
    torch_name = {"stats.mean": "running_mean", "stats.var": "running_var", "scale": "weight"}
    listed = "; ".join(f"{name} has shape {shape}" for name, shape in wrong.items())
    otherwise = f"build the layer with num_features={channels}"
    fix = channels_last_hint(
        x.shape, axis, expected, CALLER.get().channels_last_fix, otherwise
    ) or (
        f"Pass an input with the layer's channel count on the channel axis (axis={axis}), "
        f"or {otherwise}."
    )
    raise RuntimeError(
        f"{torch_name.get(first, first)} should contain {channels} elements "
        f"not {expected}: the input of shape {tuple(x.shape)} has "
        f"{channels} channels on axis {axis}, but {listed}. {fix}"
    )


# PyTorch's layouts by rank, channels first and channels last.
_LAYOUT_NAMES = {3: ("NCL", "NLC"), 4: ("NCHW", "NHWC"), 5: ("NCDHW", "NDHWC")}


def channels_last_hint(
    shape: Sequence[Any], axis: int, channels: int, alternative: str | None, otherwise: str
) -> str | None:
    """The fix for an input whose *last* axis holds the expected ``channels``; else None.

    ``alternative`` is how the API in use takes channels-last input (None:
    it cannot, transposing is the only fix); ``otherwise`` the fix should
    the input really have its channels on ``axis``.

    >>> print(channels_last_hint((2, 32, 32, 3), 1, 3, "pass axis=-1", "use 32 channels"))
    The input looks channels-last (NHWC, 3 channels on its last axis) but is read as PyTorch's NCHW (channels on axis 1): transpose it with x.transpose(0, 3, 1, 2) or pass axis=-1; if it really is NCHW, use 32 channels.
    """
    ndim = len(shape)
    if ndim < 3 or axis == ndim - 1 or not isinstance(shape[-1], int) or shape[-1] != channels:
        return None
    order = [*range(ndim - 1)]
    order.insert(axis, ndim - 1)
    first_name, last_name = _LAYOUT_NAMES.get(ndim, ("", "")) if axis == 1 else ("", "")
    on_last = f"{channels} channels on its last axis"
    looks = f"channels-last ({last_name}, {on_last})" if last_name else f"channels-last ({on_last})"
    read = (
        f"is read as PyTorch's {first_name} (channels on axis {axis})"
        if first_name
        else f"its channels are read from axis {axis}"
    )
    really = (
        f"it really is {first_name}" if first_name else f"its channels really are on axis {axis}"
    )
    transpose = f"transpose it with x.transpose{tuple(order)}"
    fixes = f"{transpose} or {alternative}" if alternative else transpose
    return f"The input looks {looks} but {read}: {fixes}; if {really}, {otherwise}."


def _check_dtypes(x: jax.Array, per_channel: dict[str, jax.Array]) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise NotImplementedError(
            f'"batch_norm" not implemented for {x.dtype}: the input `x` must '
            f"be floating point, got dtype {x.dtype}. Cast it first, e.g. "
            "x.astype(jnp.float32)."
        )
    dtypes = {v.dtype for v in per_channel.values()}
    allowed = {x.dtype, jnp.dtype(jnp.float32)} if x.dtype in _HALF_DTYPES else {x.dtype}
    if len(dtypes) <= 1 and dtypes <= allowed:
        return
    received = ", ".join(f"{name} {v.dtype}" for name, v in per_channel.items())
    raise RuntimeError(
        f"mixed dtype: input `x` is {x.dtype} but got {received}. As in "
        "PyTorch, scale, bias and the running statistics must all share the "
        "input's dtype (or all be float32 for a bfloat16/float16 input). "
        "Cast the input, or create the layer with a matching param_dtype."
    )


def _check_mask(mask: ArrayLike, x: jax.Array) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"`mask` must be boolean (True marks valid elements), got dtype {mask.dtype}. "
            "Use e.g. mask=lengths[:, None] > jnp.arange(n)."
        )
    try:
        broadcast = jnp.broadcast_shapes(mask.shape, x.shape)
    except ValueError:
        broadcast = None
    if broadcast != x.shape:
        raise ValueError(
            f"`mask` of shape {mask.shape} does not broadcast to the input's shape "
            f"{tuple(x.shape)}; give it the input's rank with size-1 axes where it does "
            "not vary, e.g. (N, 1, 1, 1) for whole samples of an (N, C, H, W) batch."
        )
    return jnp.broadcast_to(mask, x.shape)


def _check_counter(count: ArrayLike) -> None:
    if (
        not isinstance(count, jax.Array | np.ndarray)
        or count.shape != ()
        or not jnp.issubdtype(count.dtype, jnp.integer)
    ):
        raise TypeError(
            "stats.num_batches_tracked must be an integer scalar array, got "
            f"{count!r}. Use jnp.asarray(n, jnp.int32) (int64 under x64), as "
            "BatchStats.create does."
        )


def _check_eps(eps: float, use_batch_stats: bool) -> None:
    if use_batch_stats and not eps > 0:
        raise ValueError(
            f"batch_norm eps must be positive during training, but got {eps!r}. "
            "With batch statistics a constant channel has zero variance; use "
            "a small positive eps such as 1e-5 (PyTorch's default)."
        )
    if not use_batch_stats and not eps >= 0:
        raise ValueError(
            f"batch_norm eps must be non-negative, but got {eps!r}. Use eps >= 0, "
            "e.g. PyTorch's default 1e-5."
        )


def _check_momentum(momentum: float | None) -> None:
    """Warn, at the user's line, about a momentum that is likely a mistake."""
    if momentum is None:
        return
    if not 0 <= momentum <= 1:
        message = (
            f"momentum={momentum} is outside [0, 1]. It is the weight of the new "
            "batch (PyTorch's convention): running = (1 - momentum) * running + "
            "momentum * batch, which for a momentum outside [0, 1] overshoots and "
            "can diverge. Use a value in [0, 1], e.g. PyTorch's default 0.1."
        )
    elif 0.9 <= momentum < 1:
        message = (
            f"momentum={momentum} is the weight of the *new* batch in jaxbn "
            "(PyTorch's convention): running = (1 - momentum) * running + "
            "momentum * batch. Flax, Haiku and Keras use the opposite "
            f"convention; their momentum={momentum} is jaxbn's momentum="
            f"{1 - momentum:.6g}. If {momentum} is intended, silence this with "
            "warnings.filterwarnings."
        )
    else:
        return
    warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


# The packages whose frames a warning skips to reach the user's line.
LIBRARIES = frozenset({"jaxbn", "jax", "jaxlib", "flax"})


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` in the caller: the first frame outside the libraries.

    So that a warning points at the user's line (a layer's construction, a
    ``model.init``, a training step), not at jaxbn, Flax or JAX internals.
    """
    frame, level = sys._getframe(2), 2  # level 1 is the function that warns
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        LIBRARIES
    ):
        frame, level = frame.f_back, level + 1
    return level
