"""Resizing: ``F.interpolate`` (and ``nn.Upsample``) as torch's CPU kernels compute it."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._pooling import _adaptive_avg_pool
from ._registry import FromModule, Unsupported, register

Array = jax.Array


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


def check_interpolate(mode: Any = "nearest", antialias: Any = False, **_: Any) -> None:
    """``F.interpolate``'s mode and antialias, checked before anything runs (a mode
    computed in the graph is checked when the ported module runs)."""
    if isinstance(mode, str) and isinstance(antialias, bool):
        reason = resize_unsupported(mode, antialias)
        if reason is not None:
            raise Unsupported(reason)


# nn.Upsample and its fixed-mode subclasses (nearest; bilinear, align_corners=True).
_UPSAMPLE = FromModule(
    lambda m: {
        "size": m.size,
        "scale_factor": m.scale_factor,
        "mode": m.mode,
        "align_corners": m.align_corners,
        "recompute_scale_factor": m.recompute_scale_factor,
    }
)


# F.upsample, upsample_nearest and upsample_bilinear call F.interpolate, and
# FX records only the call inside.
@register(
    "torch.nn.functional.interpolate",
    modules={
        "torch.nn.Upsample": _UPSAMPLE,
        "torch.nn.UpsamplingNearest2d": _UPSAMPLE,
        "torch.nn.UpsamplingBilinear2d": _UPSAMPLE,
    },
    check=check_interpolate,
)
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
        return _adaptive_avg_pool(input, sizes, d)
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
    backward = _identity if tuple(sizes) == tuple(input.shape[2:]) else resize(fused=False)
    return _with_backward(resize(fused=True), backward, input)


def _identity(x: Array) -> Array:
    return x


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


# --- sampling at coordinates (F.grid_sample) --------------------------------------

_GRID_MODES = ("bilinear", "nearest")
_GRID_PADDING = ("zeros", "border", "reflection")


def _check_grid_sample(mode: Any = "bilinear", padding_mode: Any = "zeros", **_: Any) -> None:
    if isinstance(mode, str) and mode not in _GRID_MODES:
        raise Unsupported(f"F.grid_sample: mode={mode!r} has no port; ported: {_GRID_MODES}")
    if isinstance(padding_mode, str) and padding_mode not in _GRID_PADDING:
        raise Unsupported(f"F.grid_sample: padding_mode={padding_mode!r} is not torch's")


def _unnormalized(coord: Array, size: int, align_corners: bool) -> Array:
    """torch's ``grid_sampler_unnormalize``: [-1, 1] to pixel coordinates."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _reflected(x: Array, low: float, high: float) -> Array:
    """torch's ``reflect_coordinates`` over [low, high] (twice the bounds, so halves)."""
    if low == high:
        return jnp.zeros_like(x)
    span = (high - low) / 2
    x = jnp.abs(x - low / 2)
    flips = jnp.floor(x / span)
    extra = x - flips * span
    return jnp.where(flips % 2 == 0, extra + low / 2, span - extra + low / 2)


def _source(coord: Array, size: int, padding_mode: str, align_corners: bool) -> Array:
    """torch's ``grid_sampler_compute_source_index``."""
    x = _unnormalized(coord, size, align_corners)
    if padding_mode == "reflection":
        x = _reflected(x, 0, 2 * (size - 1)) if align_corners else _reflected(x, -1, 2 * size - 1)
    if padding_mode in ("border", "reflection"):
        x = jnp.clip(x, 0, size - 1)
    return x


@register(
    "torch.nn.functional.grid_sample",
    check=_check_grid_sample,
)
def grid_sample(
    input: Array,
    grid: Array,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = None,
) -> Array:
    """Sample (N, C, H, W) ``input`` at ``grid`` (N, Ho, Wo, 2): x (width) then y, in
    [-1, 1] (the corners' centres with ``align_corners``, else their outer edges).
    Outside, 'zeros' gives 0, 'border' the edge, 'reflection' the mirror image.
    'bilinear' is differentiable in the input and the grid; 'nearest' rounds half to
    even, as torch's ``nearbyint``."""
    n, _, h, w = input.shape
    corners = bool(align_corners)
    x = _source(grid[..., 0], w, padding_mode, corners)
    y = _source(grid[..., 1], h, padding_mode, corners)
    rows = jnp.arange(n)[:, None, None]

    def tap(iy: Array, ix: Array) -> Array:
        """input at integer (iy, ix), 0 outside: (N, Ho, Wo, C) -> (N, C, Ho, Wo)."""
        inside = (ix >= 0) & (ix <= w - 1) & (iy >= 0) & (iy <= h - 1)
        cy, cx = jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)
        values = jnp.moveaxis(input, 1, -1)[rows, cy, cx]
        return jnp.moveaxis(jnp.where(inside[..., None], values, 0), -1, 1)

    if mode == "nearest":
        return tap(jnp.round(y).astype(jnp.int32), jnp.round(x).astype(jnp.int32))
    x0, y0 = jnp.floor(x), jnp.floor(y)
    tx, ty = (x - x0)[:, None], (y - y0)[:, None]
    ix, iy = x0.astype(jnp.int32), y0.astype(jnp.int32)
    return (
        tap(iy, ix) * (1 - tx) * (1 - ty)
        + tap(iy, ix + 1) * tx * (1 - ty)
        + tap(iy + 1, ix) * (1 - tx) * ty
        + tap(iy + 1, ix + 1) * tx * ty
    )
