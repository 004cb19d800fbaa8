"""Pooling over the trailing 1, 2 or 3 spatial axes of (N, C, ...) input, as torch pools.

Max pooling sends a tied window's gradient to its first maximum in
row-major order, as torch does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._registry import Unsupported, attributes, per_axis, register

Array = jax.Array

_MAX = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")


def _no_indices(return_indices: Any = False, **_: Any) -> None:
    if return_indices is True:
        raise Unsupported("return_indices=True (the argmax indices) has no port")


def _window_geometry(
    size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool
) -> tuple[int, int]:
    """PyTorch's output length, and the padded length the windows span."""
    span = dilation * (kernel - 1) + 1
    rounding = math.ceil if ceil_mode else math.floor
    out = rounding((size + 2 * pad - span) / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1  # the last window must start inside the input or left padding
    return out, (out - 1) * stride + span


def _pad_to(x: Array, lows: Sequence[int], lengths: Sequence[int], value: Any) -> Array:
    """Pad (or crop) the trailing axes: ``lows[i]`` before, up to ``lengths[i]`` in all."""
    d = len(lows)
    widths = [(0, 0)] * (x.ndim - d)
    for axis, (low, length) in enumerate(zip(lows, lengths, strict=True)):
        size = x.shape[x.ndim - d + axis]
        widths.append((low, max(0, length - low - size)))
    x = jnp.pad(x, widths, constant_values=value)
    index = (Ellipsis, *(slice(0, n) for n in lengths))
    return x[index]


def _first_max(values: Array) -> Array:
    """The maximum over the last axis, its gradient all to the first maximum
    (torch's pick; a NaN counts as the maximum, as in torch)."""
    first = jnp.argmax(values, axis=-1)[..., None]
    return jnp.take_along_axis(values, first, axis=-1)[..., 0]


def _max_pool(
    input: Array,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    ceil_mode: bool,
    return_indices: bool,
    d: int,
) -> Array:
    if return_indices:
        raise NotImplementedError("max pooling with return_indices=True is not supported")
    k = per_axis(kernel_size, d)
    s = per_axis(stride if stride not in (None, []) else kernel_size, d)
    p, dil = per_axis(padding, d), per_axis(dilation, d)
    size = input.shape[-d:]
    geometry = [_window_geometry(*g, ceil_mode) for g in zip(size, k, s, p, dil, strict=True)]
    floating = jnp.issubdtype(input.dtype, jnp.floating)
    lowest = -float("inf") if floating else int(jnp.iinfo(input.dtype).min)
    x = _pad_to(input, p, [length for _, length in geometry], lowest)
    if any(v != 1 for v in dil):
        # (JAX has no gradient for a dilated reduce_window max.) Every
        # window's elements along a new last axis, in torch's row-major order.
        patches = [
            x[(..., *(slice(o * v, None, t) for o, v, t in zip(offset, dil, s, strict=True)))][
                (..., *(slice(0, out) for out, _ in geometry))
            ]
            for offset in itertools.product(*map(range, k))
        ]
        return _first_max(jnp.stack(patches, axis=-1))
    return lax.reduce_window(
        x,
        lowest,  # a Python scalar, so that JAX sees a max-pool it can differentiate
        lax.max,
        (1,) * (x.ndim - d) + k,
        (1,) * (x.ndim - d) + s,
        "VALID",
        window_dilation=(1,) * (x.ndim - d) + dil,
    )


@register(
    "torch.nn.functional.max_pool1d",
    "torch.max_pool1d",
    modules={"torch.nn.MaxPool1d": attributes(*_MAX)},
    check=_no_indices,
)
def max_pool1d(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Array:
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 1)


@register(
    "torch.nn.functional.max_pool2d",
    "torch.max_pool2d",
    modules={"torch.nn.MaxPool2d": attributes(*_MAX)},
    check=_no_indices,
)
def max_pool2d(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Array:
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 2)


@register(
    "torch.nn.functional.max_pool3d",
    "torch.max_pool3d",
    modules={"torch.nn.MaxPool3d": attributes(*_MAX)},
    check=_no_indices,
)
def max_pool3d(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Array:
    return _max_pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, 3)


def _window_counts(
    size: int, kernel: int, stride: int, pad: int, out: int, include_pad: bool
) -> np.ndarray:
    """How many elements each output of average pooling divides by, on one axis."""
    counts = []
    for i in range(out):
        start = i * stride - pad
        end = min(start + kernel, size + pad)
        if not include_pad:
            start, end = max(start, 0), min(end, size)
        counts.append(end - start)
    return np.asarray(counts, np.float64)


def _avg_pool(
    input: Array,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
    d: int,
) -> Array:
    """PyTorch's divisor: padding, ceil mode, ``count_include_pad``, override."""
    k = per_axis(kernel_size, d)
    s = per_axis(stride if stride not in (None, []) else kernel_size, d)
    p = per_axis(padding, d)
    size = input.shape[-d:]
    geometry = [_window_geometry(*g, 1, ceil_mode) for g in zip(size, k, s, p, strict=True)]
    x = _pad_to(input, p, [length for _, length in geometry], 0)
    total = lax.reduce_window(
        x, 0.0 if jnp.issubdtype(input.dtype, jnp.floating) else 0, lax.add, (1,) * (x.ndim - d) + k,
        (1,) * (x.ndim - d) + s, "VALID",
    )  # fmt: skip
    if divisor_override:
        return total / jnp.asarray(divisor_override, input.dtype)
    count = np.ones((), np.float64)
    for axis in range(d):
        c = _window_counts(size[axis], k[axis], s[axis], p[axis], geometry[axis][0],
                           count_include_pad)  # fmt: skip
        count = np.multiply.outer(count, c)
    return total / jnp.asarray(count, input.dtype)


@register(
    "torch.nn.functional.avg_pool1d",
    "torch.avg_pool1d",
    modules={"torch.nn.AvgPool1d": attributes(*_AVG)},
)
def avg_pool1d(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Array:
    return _avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, None, 1)


@register(
    "torch.nn.functional.avg_pool2d",
    modules={"torch.nn.AvgPool2d": attributes(*_AVG, "divisor_override")},
)
def avg_pool2d(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Array:
    return _avg_pool(
        input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 2
    )


@register(
    "torch.nn.functional.avg_pool3d",
    modules={"torch.nn.AvgPool3d": attributes(*_AVG, "divisor_override")},
)
def avg_pool3d(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Array:
    return _avg_pool(
        input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 3
    )


def _adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's windows [floor(i*L/n), ceil((i+1)*L/n))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _sizes(spatial: Sequence[int], output_size: Any) -> list[int]:
    """``output_size`` per axis; None keeps the input's."""
    d = len(spatial)
    return [
        n if out is None else out for n, out in zip(spatial, per_axis(output_size, d), strict=True)
    ]


def _adaptive_avg_pool(input: Array, output_size: Any, d: int) -> Array:
    x = input
    for axis, out in enumerate(_sizes(input.shape[-d:], output_size)):
        ax = input.ndim - d + axis
        length = x.shape[ax]
        if length % out == 0:
            shape = (*x.shape[:ax], out, length // out, *x.shape[ax + 1 :])
            x = x.reshape(shape).mean(axis=ax + 1)
        else:
            x = jnp.stack([
                lax.slice_in_dim(x, lo, hi, axis=ax).mean(axis=ax)
                for lo, hi in _adaptive_windows(length, out)
            ], axis=ax)  # fmt: skip
    return x


@register(
    "torch.nn.functional.adaptive_avg_pool1d",
    "torch.adaptive_avg_pool1d",
    modules={"torch.nn.AdaptiveAvgPool1d": attributes("output_size")},
)
def adaptive_avg_pool1d(input: Array, output_size: Any) -> Array:
    return _adaptive_avg_pool(input, output_size, 1)


@register(
    "torch.nn.functional.adaptive_avg_pool2d",
    modules={"torch.nn.AdaptiveAvgPool2d": attributes("output_size")},
)
def adaptive_avg_pool2d(input: Array, output_size: Any) -> Array:
    return _adaptive_avg_pool(input, output_size, 2)


@register(
    "torch.nn.functional.adaptive_avg_pool3d",
    modules={"torch.nn.AdaptiveAvgPool3d": attributes("output_size")},
)
def adaptive_avg_pool3d(input: Array, output_size: Any) -> Array:
    return _adaptive_avg_pool(input, output_size, 3)


def _adaptive_max_pool(input: Array, output_size: Any, return_indices: bool, d: int) -> Array:
    """Each window whole, so that a tie's gradient goes where torch's does (the first maximum)."""
    if return_indices:
        raise NotImplementedError("adaptive max pooling with return_indices=True")
    lead, spatial = input.shape[:-d], input.shape[-d:]
    sizes = _sizes(spatial, output_size)
    windows = [_adaptive_windows(n, out) for n, out in zip(spatial, sizes, strict=True)]
    maxima = [
        _first_max(input[(..., *(slice(lo, hi) for lo, hi in cell))].reshape(*lead, -1))
        for cell in itertools.product(*windows)
    ]
    return jnp.stack(maxima, axis=-1).reshape(*lead, *sizes)


@register(
    "torch.nn.functional.adaptive_max_pool1d",
    modules={"torch.nn.AdaptiveMaxPool1d": attributes("output_size", "return_indices")},
    check=_no_indices,
)
def adaptive_max_pool1d(input: Array, output_size: Any, return_indices: bool = False) -> Array:
    return _adaptive_max_pool(input, output_size, return_indices, 1)


@register(
    "torch.nn.functional.adaptive_max_pool2d",
    modules={"torch.nn.AdaptiveMaxPool2d": attributes("output_size", "return_indices")},
    check=_no_indices,
)
def adaptive_max_pool2d(input: Array, output_size: Any, return_indices: bool = False) -> Array:
    return _adaptive_max_pool(input, output_size, return_indices, 2)


@register(
    "torch.nn.functional.adaptive_max_pool3d",
    modules={"torch.nn.AdaptiveMaxPool3d": attributes("output_size", "return_indices")},
    check=_no_indices,
)
def adaptive_max_pool3d(input: Array, output_size: Any, return_indices: bool = False) -> Array:
    return _adaptive_max_pool(input, output_size, return_indices, 3)
