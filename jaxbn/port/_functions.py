"""PyTorch functions and tensor methods in JAX, with torch's signatures and semantics.

Each function takes the arguments torch's does, under the same names, so a
traced call's ``args``/``kwargs`` apply unchanged. Activations are (N, C,
...) as in torch; pooling works on the trailing spatial axes. Depends on jax
only.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def _tuple(value: Any, d: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * d
    value = tuple(value)
    return value * d if len(value) == 1 else value


def _shape_args(shape: tuple[Any, ...]) -> tuple[int, ...]:
    """``view(2, 3)`` and ``view((2, 3))`` alike."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


def _dims(dim: Any) -> Any:
    return tuple(dim) if isinstance(dim, (tuple, list)) else dim


# --- activations -----------------------------------------------------------


def _clamped(input: Array, low: float | None, high: float | None) -> Array:
    """``input`` clamped to [low, high] with torch's gradient: 1 strictly
    between the bounds, 0 at and beyond them (``jnp.maximum`` would pass
    half at a tie: ReLU's gradient at 0 would be 0.5, not torch's 0).
    NaN stays NaN."""
    inside = jnp.ones(jnp.shape(input), bool)
    if low is not None:
        inside &= input > low
    if high is not None:
        inside &= input < high
    return jnp.where(inside, input, lax.stop_gradient(jnp.clip(input, low, high)))


def relu(input: Array, inplace: bool = False) -> Array:
    return _clamped(input, 0, None)


def relu6(input: Array, inplace: bool = False) -> Array:
    return _clamped(input, 0, 6)


def hardtanh(
    input: Array, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> Array:
    return _clamped(input, min_val, max_val)


def sigmoid(input: Array) -> Array:
    return jax.nn.sigmoid(input)


def silu(input: Array, inplace: bool = False) -> Array:
    return input * jax.nn.sigmoid(input)


def tanh(input: Array) -> Array:
    return jnp.tanh(input)


def hardsigmoid(input: Array, inplace: bool = False) -> Array:
    return _clamped(input + 3, 0, 6) / 6


def hardswish(input: Array, inplace: bool = False) -> Array:
    return input * _clamped(input + 3, 0, 6) / 6


def gelu(input: Array, approximate: str = "none") -> Array:
    return jax.nn.gelu(input, approximate=approximate == "tanh")


def leaky_relu(input: Array, negative_slope: float = 0.01, inplace: bool = False) -> Array:
    return jnp.where(input > 0, input, input * negative_slope)


def elu(input: Array, alpha: float = 1.0, inplace: bool = False) -> Array:
    return jnp.where(input > 0, input, alpha * jnp.expm1(input))


def softplus(input: Array, beta: float = 1.0, threshold: float = 20.0) -> Array:
    scaled = input * beta
    return jnp.where(scaled > threshold, input, jnp.log1p(jnp.exp(scaled)) / beta)


def mish(input: Array, inplace: bool = False) -> Array:
    return input * jnp.tanh(softplus(input))


def softmax(input: Array, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Array:
    x = input if dtype is None else input.astype(dtype)
    return jax.nn.softmax(x, axis=-1 if dim is None else dim)


def log_softmax(
    input: Array, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None
) -> Array:
    x = input if dtype is None else input.astype(dtype)
    return jax.nn.log_softmax(x, axis=-1 if dim is None else dim)


# --- train-time randomness (keywords train= and rng= come from the port) ---


def dropout(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """``F.dropout``; ``training`` as traced is replaced by the Flax ``train`` flag."""
    del training
    return _drop(input, p, train, rng, input.shape)


def dropout2d(
    input: Array,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """``F.dropout2d``: whole channels of (N, C, H, W) input."""
    del training
    return _drop(input, p, train, rng, (*input.shape[:-2], 1, 1))


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


def stochastic_depth(
    input: Array,
    p: float,
    mode: str,
    training: bool = True,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """``torchvision.ops.stochastic_depth``: drop whole rows ('row') or the batch ('batch')."""
    del training
    if not train or p == 0.0:
        return input
    survival = 1.0 - p
    shape = (input.shape[0],) + (1,) * (input.ndim - 1) if mode == "row" else (1,) * input.ndim
    noise = jax.random.bernoulli(rng(), survival, shape).astype(input.dtype)
    if survival > 0.0:
        noise = noise / survival
    return input * noise


def drop_path(
    x: Array,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    train: bool,
    rng: Callable[[], Array],
) -> Array:
    """timm's ``drop_path`` (per-sample stochastic depth)."""
    del training
    if drop_prob == 0.0 or not train:
        return x
    keep = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    noise = jax.random.bernoulli(rng(), keep, shape).astype(x.dtype)
    if keep > 0.0 and scale_by_keep:
        noise = noise / keep
    return x * noise


# --- pooling and padding ---------------------------------------------------


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


def max_pool(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    *,
    d: int = 2,
) -> Array:
    """``F.max_pool{1,2,3}d``: -inf padding, ceil mode, dilation."""
    if return_indices:
        raise NotImplementedError("max pooling with return_indices=True is not supported")
    k = _tuple(kernel_size, d)
    s = _tuple(stride if stride not in (None, []) else kernel_size, d)
    p, dil = _tuple(padding, d), _tuple(dilation, d)
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


def avg_pool(
    input: Array,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    *,
    d: int = 2,
) -> Array:
    """``F.avg_pool{1,2,3}d`` with PyTorch's divisor (padding, ceil mode, override)."""
    k = _tuple(kernel_size, d)
    s = _tuple(stride if stride not in (None, []) else kernel_size, d)
    p = _tuple(padding, d)
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


def _adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(input: Array, output_size: Any, *, d: int = 2) -> Array:
    """``F.adaptive_avg_pool{1,2,3}d``: PyTorch's windows [floor(i*L/n), ceil((i+1)*L/n))."""
    sizes = _tuple(output_size, d)
    x = input
    for axis, out in enumerate(sizes):
        ax = input.ndim - d + axis
        length = x.shape[ax]
        out = length if out is None else out
        if length % out == 0:
            shape = (*x.shape[:ax], out, length // out, *x.shape[ax + 1 :])
            x = x.reshape(shape).mean(axis=ax + 1)
        else:
            x = jnp.stack([
                lax.slice_in_dim(x, lo, hi, axis=ax).mean(axis=ax)
                for lo, hi in _adaptive_windows(length, out)
            ], axis=ax)  # fmt: skip
    return x


def adaptive_max_pool(
    input: Array, output_size: Any, return_indices: bool = False, *, d: int = 2
) -> Array:
    """``F.adaptive_max_pool{1,2,3}d``: each window whole, so that a tie's
    gradient goes where torch's does (the window's first maximum)."""
    if return_indices:
        raise NotImplementedError("adaptive max pooling with return_indices=True")
    lead, spatial = input.shape[:-d], input.shape[-d:]
    sizes = [
        n if out is None else out for n, out in zip(spatial, _tuple(output_size, d), strict=True)
    ]
    windows = [_adaptive_windows(n, out) for n, out in zip(spatial, sizes, strict=True)]
    maxima = [
        _first_max(input[(..., *(slice(lo, hi) for lo, hi in cell))].reshape(*lead, -1))
        for cell in itertools.product(*windows)
    ]
    return jnp.stack(maxima, axis=-1).reshape(*lead, *sizes)


def _first_max(values: Array) -> Array:
    """The maximum over the last axis, its gradient all to the first maximum
    (torch's pick; a NaN counts as the maximum, as in torch)."""
    first = jnp.argmax(values, axis=-1)[..., None]
    return jnp.take_along_axis(values, first, axis=-1)[..., 0]


def pad(
    input: Array, pad: Sequence[int], mode: str = "constant", value: float | None = None
) -> Array:
    """``F.pad``: ``pad`` pairs from the last axis backwards; negative pads crop."""
    modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    widths = [(0, 0)] * input.ndim
    for i in range(len(pad) // 2):
        widths[input.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    grow = [(max(lo, 0), max(hi, 0)) for lo, hi in widths]
    kwargs = {"constant_values": 0 if value is None else value} if mode == "constant" else {}
    x = jnp.pad(input, grow, mode=modes[mode], **kwargs)  # type: ignore[arg-type]
    crop = tuple(slice(-min(lo, 0), x.shape[i] + min(hi, 0)) for i, (lo, hi) in enumerate(widths))
    return x[crop]


# --- resizing (F.interpolate) ----------------------------------------------

# Each mode of F.interpolate, and the input ranks (N, C + spatial) it takes.
RESIZE_MODES = {
    "nearest": (3, 4, 5),
    "nearest-exact": (3, 4, 5),
    "area": (3, 4, 5),
    "linear": (3,),
    "bilinear": (4,),
    "bicubic": (4,),
    "trilinear": (5,),
}


def resize_unsupported(mode: Any, antialias: Any) -> str | None:
    """Why the port cannot run ``F.interpolate(mode=mode, antialias=antialias)``, or None."""
    supported = ", ".join(repr(m) for m in RESIZE_MODES)
    if antialias:
        return (
            f"antialias=True (mode={mode!r}) is not supported: torch's antialiasing "
            f"filters have no port; supported is antialias=False with mode {supported}"
        )
    if mode not in RESIZE_MODES:
        return f"mode={mode!r} is not supported; supported modes: {supported}"
    return None


def interpolate(
    input: Array,
    size: Any = None,
    scale_factor: Any = None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    antialias: bool = False,
) -> Array:
    """``F.interpolate`` (and ``nn.Upsample``) as torch's CPU kernels compute it.

    The source index of output ``i`` on an axis of input length ``n`` and
    output length ``m`` is torch's:

    - 'nearest': ``min(floor(i * s), n - 1)`` with ``s = 1/scale_factor``
      (or ``n/m``) — OpenCV's legacy rule, not half-pixel; the 2-D kernel
      torch runs for small outputs also copies when ``m == n`` and halves
      when ``m == 2n`` (see :func:`_nearest_index`);
    - 'nearest-exact': ``min(floor((i + 0.5) * s), n - 1)``;
    - 'linear', 'bilinear', 'trilinear', 'bicubic': ``x = s * (i + 0.5) -
      0.5`` (``x = i * (n-1)/(m-1)`` with ``align_corners=True``), clamped at
      0 except for bicubic, then the 2 (or 4, Keys' A = -0.75, borders
      replicated) taps around ``floor(x)``, computed in the input's float
      type, axis by axis from the last; a copy when ``m == n`` (linear
      modes);
    - 'area': adaptive average pooling to the output size.

    ``s`` is ``1/scale_factor`` when a scale factor is given and
    ``recompute_scale_factor`` is not True (torch uses the given scale, not
    ``n/m``, which differs for non-integer scales), else ``n/m``. The output
    length is ``floor(n * scale_factor)`` or ``size``. The index tables are
    numpy constants, so the gradient is a scatter-add, as torch's; where
    torch's backward kernel is not the transpose of its forward (nearest,
    whose backward always takes the small 2-D kernel's indices; bicubic,
    whose backward rounds unfused and passes the gradient through when the
    size is kept), the gradient is torch's.

    Args:
      input: (N, C, L), (N, C, H, W) or (N, C, D, H, W).
      size: the output's spatial size (an int for every axis, or a tuple).
      scale_factor: a float for every axis, or a tuple; exactly one of
        ``size`` and ``scale_factor``.
      mode: one of :data:`RESIZE_MODES`.
      align_corners: linear modes only; None means False.
      recompute_scale_factor: True: interpolate with ``n/m`` from the
        computed output size; False or None: with the given scale factor.
      antialias: must be False (not supported).

    Returns:
      The resized array, in the input's dtype.
    """
    reason = resize_unsupported(mode, antialias)
    if reason is not None:
        raise NotImplementedError(f"F.interpolate: {reason}")
    d = input.ndim - 2
    if mode in ("nearest", "area", "nearest-exact"):
        if align_corners is not None:
            raise ValueError(
                "align_corners option can only be set with the interpolating modes: "
                f"linear | bilinear | bicubic | trilinear (got mode={mode!r})"
            )
    elif align_corners is None:
        align_corners = False
    if input.ndim not in RESIZE_MODES[mode]:
        ranks = " or ".join(f"{r}-D" for r in RESIZE_MODES[mode])
        raise NotImplementedError(
            f"F.interpolate: mode={mode!r} needs {ranks} input (N, C, *spatial), "
            f"got a {input.ndim}-D input of shape {tuple(input.shape)}"
        )
    sizes, scales = _resize_geometry(input.shape[2:], size, scale_factor, recompute_scale_factor,
                                     mode)  # fmt: skip
    if mode == "area":
        return adaptive_avg_pool(input, sizes, d=d)
    # torch computes indices and weights in float32 for integer and half types
    # (then stores weights in the input's type), in float64 for float64.
    opmath = np.float64 if input.dtype == jnp.float64 else np.float32
    if mode in ("nearest", "nearest-exact"):
        exact, small = mode == "nearest-exact", d == 2 and sum(sizes) <= 128
        shapes = list(zip(input.shape[2:], sizes, scales, strict=True))
        forward = [_nearest_index(*g, opmath, exact=exact, small_2d=small) for g in shapes]
        # torch's nearest backward always takes the small 2-D kernel's indices.
        backward = [_nearest_index(*g, opmath, exact=exact, small_2d=True) for g in shapes]
        gather = functools.partial(_gather, indices=tuple(forward))
        if all(np.array_equal(a, b) for a, b in zip(forward, backward, strict=True)):
            return gather(input)
        return _with_backward(gather, functools.partial(_gather, indices=tuple(backward)), input)
    if not jnp.issubdtype(input.dtype, jnp.floating):
        raise NotImplementedError(
            f"F.interpolate: mode={mode!r} on {input.dtype} input is not supported; "
            "cast the input to a floating dtype"
        )

    def resize(fused: bool) -> Callable[[Array], Array]:
        tables = []
        # Innermost axis first: torch sums the last axis's taps, then the next.
        for axis in reversed(range(d)):
            n, m = input.shape[2 + axis], sizes[axis]
            taps = _linear_taps if mode != "bicubic" else _cubic_taps
            tables.append((axis, *taps(n, m, bool(align_corners), scales[axis], opmath, fused)))
        return functools.partial(_weighted_taps, tables=tuple(tables))

    if mode != "bicubic":
        return resize(fused=True)(input)
    # torch's bicubic backward is a kernel of its own, compiled without fused
    # multiply-adds, that passes the gradient through unchanged when the size
    # is unchanged (although the forward of, say, scale 1.1 is no copy).
    backward = identity if tuple(sizes) == tuple(input.shape[2:]) else resize(fused=False)
    return _with_backward(resize(fused=True), backward, input)


def _gather(x: Array, indices: tuple[np.ndarray, ...]) -> Array:
    for axis, index in enumerate(indices):
        x = jnp.take(x, index, axis=2 + axis, mode="clip")
    return x


def _weighted_taps(x: Array, tables: tuple[Any, ...]) -> Array:
    """Per axis, the sum over taps of ``x[..., index, ...] * weight``, in torch's order."""
    d = x.ndim - 2
    for axis, indices, weights in tables:
        shape = (len(indices[0]),) + (1,) * (d - 1 - axis)
        y = None
        for index, weight in zip(indices, weights, strict=True):
            w = jnp.asarray(weight.astype(x.dtype).reshape(shape))
            term = jnp.take(x, index, axis=2 + axis, mode="clip") * w
            y = term if y is None else y + term
        assert y is not None
        x = y
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _with_backward(
    fn: Callable[[Array], Array], linear: Callable[[Array], Array], x: Array
) -> Array:
    """``fn(x)``, differentiated as the linear map ``linear`` (torch's backward kernel)."""
    return fn(x)


def _with_backward_fwd(fn: Callable[..., Array], linear: Callable[..., Array], x: Array) -> Any:
    return fn(x), x


def _with_backward_bwd(
    fn: Callable[..., Array], linear: Callable[..., Array], x: Array, g: Array
) -> tuple[Array]:
    return jax.vjp(linear, x)[1](g)


_with_backward.defvjp(_with_backward_fwd, _with_backward_bwd)


def _resize_geometry(
    spatial: Sequence[int],
    size: Any,
    scale_factor: Any,
    recompute_scale_factor: bool | None,
    mode: str,
) -> tuple[list[int], list[float | None]]:
    """Output sizes, and the scale factor each axis interpolates with (None: n/m)."""
    d = len(spatial)
    if size is not None and scale_factor is not None:
        raise ValueError("F.interpolate: only one of size or scale_factor should be defined")
    if size is not None:
        if recompute_scale_factor:
            raise ValueError("recompute_scale_factor is not meaningful with an explicit size.")
        sizes = [int(s) for s in size] if isinstance(size, (tuple, list)) else [int(size)] * d
        if len(sizes) != d:
            raise ValueError(
                f"F.interpolate: size={size!r} has {len(sizes)} entries for an input with "
                f"{d} spatial dimensions {tuple(spatial)}; give one per spatial dimension"
            )
        return sizes, [None] * d
    if scale_factor is None:
        raise ValueError("F.interpolate: either size or scale_factor should be defined")
    factors = (
        [float(s) for s in scale_factor]
        if isinstance(scale_factor, (tuple, list))
        else [float(scale_factor)] * d
    )
    if len(factors) != d:
        raise ValueError(
            f"F.interpolate: scale_factor={scale_factor!r} has {len(factors)} entries for an "
            f"input with {d} spatial dimensions {tuple(spatial)}; give one per spatial dimension"
        )
    sizes = [math.floor(n * s) for n, s in zip(spatial, factors, strict=True)]
    if min(sizes, default=1) <= 0:
        raise ValueError(
            f"F.interpolate: input size {tuple(spatial)} with scale_factor={scale_factor!r} "
            f"gives output size {tuple(sizes)}; sizes must be greater than 0"
        )
    # 'area' always recomputes; so does recompute_scale_factor=True.
    if recompute_scale_factor or mode == "area":
        return sizes, [None] * d
    return sizes, list(factors)


def _inverse_scale(n: int, m: int, scale: float | None, dtype: Any) -> Any:
    """torch's ``compute_scales_value``: 1/scale (computed in double), else n/m."""
    if scale is not None and scale > 0:
        return dtype(1.0 / scale)
    return dtype(n) / dtype(m)


def _nearest_index(
    n: int, m: int, scale: float | None, opmath: Any, *, exact: bool, small_2d: bool
) -> np.ndarray:
    """The source index of every output, as the torch CPU kernel that runs computes it.

    torch has two nearest kernels that round differently. A 2-D resize whose
    output has ``H + W <= 128`` (its "channels-last" kernel, which it also
    takes for contiguous input that small) works in float32 and copies when
    ``m == n``, halves when ``m == 2n``; every other resize (1-D, 3-D, larger
    2-D) works in the input's float type (float32 for integer and half types)
    with no special cases. They differ for scale factors such as 1.1 that
    keep the size.
    """
    i = np.arange(m)
    if small_2d:
        if not exact and m == n:
            return i
        if not exact and m == 2 * n:
            return i >> 1
        s = _inverse_scale(n, m, scale, np.float32)
        if exact:
            # (i + 0.5) * s is a double in torch, rounded to float by floorf.
            source = ((i + 0.5) * np.float64(s)).astype(np.float32)
        else:
            source = i.astype(np.float32) * s
    else:
        s = _inverse_scale(n, m, scale, opmath)
        if exact:
            x = np.maximum(_half_pixel(s, m, opmath), opmath(0))
            source = (x.astype(np.float64) + 0.5).astype(np.float32)
        else:
            source = (s * i.astype(opmath)).astype(np.float32)
    return np.minimum(np.floor(source).astype(np.int64), n - 1)


def _source_coordinate(
    n: int, m: int, align_corners: bool, scale: float | None, dtype: Any, cubic: bool, fused: bool
) -> np.ndarray:
    """torch's ``area_pixel_compute_scale`` and ``area_pixel_compute_source_index``."""
    if align_corners:
        ratio = dtype(n - 1) / dtype(m - 1) if m > 1 else dtype(0)
        return ratio * np.arange(m).astype(dtype)
    x = _half_pixel(_inverse_scale(n, m, scale, dtype), m, dtype, fused)
    return x if cubic else np.maximum(x, dtype(0))


def _half_pixel(ratio: Any, m: int, dtype: Any, fused: bool = True) -> np.ndarray:
    """``ratio * (i + 0.5) - 0.5``, fused in float32 as torch's CPU build computes it.

    torch's kernels are compiled with floating-point contraction, so in
    float32 this is one fused multiply-add: exact in float64 (a product of
    two float32 is), rounded once. Unfused, the coordinate (and so the
    weights) would be an ulp off, 1e-5 in the output of a 70-pixel resize.
    """
    i = np.arange(m).astype(dtype) + dtype(0.5)
    if fused and dtype == np.float32:
        return (np.float64(ratio) * i.astype(np.float64) - 0.5).astype(np.float32)
    return ratio * i - dtype(0.5)


def _floor_and_fraction(x: np.ndarray, n: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """torch's ``guard_index_and_lambda``: floorf (a float even for doubles), clamped."""
    index = np.minimum(np.floor(x.astype(np.float32)).astype(np.int64), n - 1)
    fraction = np.clip(x - index.astype(dtype), dtype(0), dtype(1))
    return index, fraction


def _linear_taps(
    n: int, m: int, align_corners: bool, scale: float | None, dtype: Any, fused: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The two source indices and weights of every output of linear interpolation."""
    if m == n:
        i = np.arange(m)
        return [i, i], [np.ones(m, dtype), np.zeros(m, dtype)]
    x = _source_coordinate(n, m, align_corners, scale, dtype, cubic=False, fused=fused)
    i0, l1 = _floor_and_fraction(x, n, dtype)
    i1 = i0 + (i0 < n - 1)
    return [i0, i1], [dtype(1) - l1, l1]


def _cubic_taps(
    n: int, m: int, align_corners: bool, scale: float | None, dtype: Any, fused: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The four source indices (borders replicated) and Keys weights (A = -0.75)."""
    x = _source_coordinate(n, m, align_corners, scale, dtype, cubic=True, fused=fused)
    i, t = _floor_and_fraction(x, n, dtype)
    a = dtype(-0.75)

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + dtype(2)) * x - (a + dtype(3))) * x * x + dtype(1)

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - dtype(5) * a) * x + dtype(8) * a) * x - dtype(4) * a

    weights = [far(t + dtype(1)), near(t), near(dtype(1) - t), far(dtype(1) - t + dtype(1))]
    indices = [np.clip(i + k, 0, n - 1) for k in (-1, 0, 1, 2)]
    return indices, weights


# --- tensors ---------------------------------------------------------------


def flatten(input: Array, start_dim: int = 0, end_dim: int = -1) -> Array:
    if input.ndim == 0:
        return input.reshape(1)
    start, end = start_dim % input.ndim, end_dim % input.ndim
    return input.reshape(*input.shape[:start], -1, *input.shape[end + 1 :])


def cat(tensors: Sequence[Array], dim: int = 0) -> Array:
    return jnp.concatenate(list(tensors), axis=dim)


def stack(tensors: Sequence[Array], dim: int = 0) -> Array:
    return jnp.stack(list(tensors), axis=dim)


def transpose(input: Array, dim0: int, dim1: int) -> Array:
    return jnp.swapaxes(input, dim0, dim1)


def permute(input: Array, *dims: Any) -> Array:
    return jnp.transpose(input, _shape_args(dims))


def reshape(input: Array, *shape: Any) -> Array:
    return jnp.reshape(input, _shape_args(shape))


def chunk(input: Array, chunks: int, dim: int = 0) -> tuple[Array, ...]:
    """``torch.chunk``: pieces of ceil(n / chunks); the last may be smaller, or fewer pieces."""
    size = -(-input.shape[dim] // chunks)
    return split(input, size, dim)


def split(input: Array, split_size_or_sections: Any, dim: int = 0) -> tuple[Array, ...]:
    n = input.shape[dim]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        bounds = [(i, min(i + step, n)) for i in range(0, n, step)] or [(0, 0)]
    else:
        edges = np.cumsum([0, *split_size_or_sections])
        bounds = list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    return tuple(lax.slice_in_dim(input, lo, hi, axis=dim) for lo, hi in bounds)


def mean(input: Array, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.mean(input, axis=_dims(dim), keepdims=keepdim, dtype=dtype)


def sum_(input: Array, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Array:
    return jnp.sum(input, axis=_dims(dim), keepdims=keepdim, dtype=dtype)


def amax(input: Array, dim: Any = (), keepdim: bool = False) -> Array:
    return jnp.max(input, axis=_dims(dim) if dim != () else None, keepdims=keepdim)


def squeeze(input: Array, dim: Any = None) -> Array:
    if dim is None:
        return jnp.squeeze(input)
    dims = tuple(d % input.ndim for d in (_dims(dim) if isinstance(dim, (tuple, list)) else (dim,)))
    # torch ignores dimensions that are not of size 1.
    return jnp.squeeze(input, tuple(d for d in dims if input.shape[d] == 1))


def unsqueeze(input: Array, dim: int) -> Array:
    return jnp.expand_dims(input, dim % (input.ndim + 1))


def size(input: Array, dim: int | None = None) -> Any:
    return tuple(input.shape) if dim is None else input.shape[dim]


def expand(input: Array, *sizes: Any) -> Array:
    shape = _shape_args(sizes)
    lead = len(shape) - input.ndim
    full = tuple((input.shape[i - lead] if s == -1 else s) for i, s in enumerate(shape))
    return jnp.broadcast_to(input, full)


def expand_as(input: Array, other: Array) -> Array:
    return jnp.broadcast_to(input, other.shape)


def view_as(input: Array, other: Array) -> Array:
    return jnp.reshape(input, other.shape)


def identity(input: Any, *args: Any, **kwargs: Any) -> Any:
    return input


def clamp(input: Array, min: Any = None, max: Any = None) -> Array:
    if all(bound is None or isinstance(bound, (int, float)) for bound in (min, max)):
        return _clamped(input, min, max)  # torch: gradient 0 at a number bound
    return jnp.clip(input, min, max)  # torch, like jnp: half at a tensor bound


def linear(input: Array, weight: Array, bias: Array | None = None) -> Array:
    y = input @ weight.T
    return y if bias is None else y + bias


def div(input: Any, other: Any, *, rounding_mode: str | None = None) -> Any:
    if rounding_mode == "floor":
        return jnp.floor_divide(input, other)
    if rounding_mode == "trunc":
        return jnp.trunc(jnp.true_divide(input, other))
    return operator.truediv(input, other)


def add(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    return input + (other if alpha == 1 else other * alpha)


def sub(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    return input - (other if alpha == 1 else other * alpha)


def getattr_(obj: Any, name: str) -> Any:
    """``x.shape`` and friends, on an array."""
    if name == "shape":
        return tuple(obj.shape)
    if name in ("ndim", "dtype", "T"):
        return getattr(obj, name)
    raise NotImplementedError(f"tensor attribute {name!r}")
