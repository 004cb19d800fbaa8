"""Linear maps: convolutions (modules, and functions called on tensors of their own)
and ``Linear``.

A module's variables are declared in the converter's Flax layout (a Conv
kernel is ``(*k, in/groups, out)``, a Linear kernel ``(in, out)``), so a
port's variables are exactly what :func:`jaxbn.from_torch` produces; the
activations stay (N, C, ...) as in torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from .._layers import Layer, dtype_of, plain_call
from ._padding import MODES, pad_same
from ._registry import AsLayer, per_axis, register

Array = jax.Array


def _padding(
    padding: Any, kernel: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """torch's int, tuple, 'same' (the odd one after) or 'valid' as (low, high) per axis."""
    if padding == "same":
        total = [di * (ki - 1) for ki, di in zip(kernel, dilation, strict=True)]
        return tuple((t // 2, t - t // 2) for t in total)
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    return tuple((p, p) for p in per_axis(padding, len(kernel)))


def _convolve(
    input: Array,
    weight: Array,
    bias: Array | None,
    stride: Any,
    padding: tuple[tuple[int, int], ...],
    dilation: Any,
    groups: int,
) -> Array:
    """(N, C, *spatial) or unbatched (C, *spatial) input, (out, in/groups, *k) weight."""
    d = weight.ndim - 2
    if input.ndim == d + 1:
        return _convolve(input[None], weight, bias, stride, padding, dilation, groups)[0]
    spatial = "DHW"[3 - d :]
    y = lax.conv_general_dilated(
        input,
        weight,
        window_strides=per_axis(stride, d),
        padding=padding,
        rhs_dilation=per_axis(dilation, d),
        feature_group_count=groups,
        dimension_numbers=(f"NC{spatial}", f"OI{spatial}", f"NC{spatial}"),
    )
    if bias is not None:
        y = y + bias.reshape(-1, *(1,) * d)
    return y


def _transposed_convolve(
    input: Array,
    weight: Array,
    bias: Array | None,
    stride: Any,
    padding: Any,
    output_padding: Any,
    groups: int,
    dilation: Any,
) -> Array:
    """The gradient of a convolution, as torch computes ``conv_transpose``: (in, out/groups,
    *k) weight; output length ``(n - 1) * stride - 2 * padding + dilation * (k - 1) +
    output_padding + 1``."""
    d = weight.ndim - 2
    if input.ndim == d + 1:
        return _transposed_convolve(
            input[None], weight, bias, stride, padding, output_padding, groups, dilation
        )[0]
    k = weight.shape[2:]
    s, p, op, dil = (per_axis(v, d) for v in (stride, padding, output_padding, dilation))
    ins, outs = weight.shape[0], weight.shape[1] * groups
    # (in, out/g, *k) -> (out, in/g, *k), each group's block transposed, the window flipped
    w = weight.reshape(groups, ins // groups, outs // groups, *k).swapaxes(1, 2)
    w = jnp.flip(w.reshape(outs, ins // groups, *k), axis=tuple(range(2, d + 2)))
    pairs = tuple(
        (di * (ki - 1) - pi, di * (ki - 1) - pi + oi)
        for ki, pi, oi, di in zip(k, p, op, dil, strict=True)
    )
    spatial = "DHW"[3 - d :]
    y = lax.conv_general_dilated(
        input,
        w,
        window_strides=(1,) * d,
        padding=pairs,
        lhs_dilation=s,
        rhs_dilation=dil,
        feature_group_count=groups,
        dimension_numbers=(f"NC{spatial}", f"OI{spatial}", f"NC{spatial}"),
    )
    if bias is not None:
        y = y + bias.reshape(-1, *(1,) * d)
    return y


class Conv(nn.Module):
    """``torch.nn.Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` on (N, C, *spatial) input.

    ``padding`` is explicit (low, high) per spatial axis, already resolved
    from torch's int, tuple, 'same' or 'valid' (a transposed convolution's
    is torch's, low == high). A transposed convolution's kernel is
    ``(*k, out/groups, in)``, the converter's layout of torch's ``(in,
    out/groups, *k)``.
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
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Any = None) -> jax.Array:
        d = len(self.kernel_size)
        shape = (
            (*self.kernel_size, self.out_channels // self.groups, self.in_channels)
            if self.transposed
            else (*self.kernel_size, self.in_channels // self.groups, self.out_channels)
        )
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.out_channels,), self.param_dtype)
        weight = jnp.transpose(kernel, (d + 1, d, *range(d)))  # -> torch's (out|in, ..., *k)
        if self.transposed:
            low = tuple(p for p, _ in self.padding)
            extra = self.output_padding
            if output_size is not None:  # torch's forward(input, output_size)
                extra = tuple(
                    int(want) - ((n - 1) * s - 2 * p + di * (k - 1) + 1)
                    for want, n, s, p, di, k in zip(
                        tuple(output_size)[-d:], x.shape[-d:], self.stride, low,
                        self.dilation, self.kernel_size, strict=True,
                    )
                )  # fmt: skip
            return _transposed_convolve(
                x, weight, bias, self.stride, low, extra, self.groups, self.dilation
            )
        padding = self.padding
        if self.padding_mode != "zeros":
            widths = ((0, 0),) * (x.ndim - d) + padding
            x = jnp.pad(x, widths, mode=MODES[self.padding_mode])  # type: ignore[arg-type]
            padding = ((0, 0),) * d
        return _convolve(x, weight, bias, self.stride, padding, self.dilation, self.groups)


def conv_layer(m: Any, child: Callable[[str], Layer]) -> Layer:
    """A torch ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d`` module as :class:`Conv`."""
    k, dil = tuple(m.kernel_size), tuple(m.dilation)
    return Layer(
        functools.partial(
            Conv,
            m.in_channels,
            m.out_channels,
            k,
            tuple(m.stride),
            _padding(m.padding, k, dil),
            dil,
            m.groups,
            m.bias is not None,
            m.padding_mode,
            dtype_of(m.weight),
            m.transposed,
            tuple(m.output_padding) if m.transposed else (),
        ),
        plain_call,
    )


def _conv(
    input: Array,
    weight: Array,
    bias: Array | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
) -> Array:
    """``F.conv{1,2,3}d``: zero padding, an int, a tuple, 'same' or 'valid'."""
    d = weight.ndim - 2
    pairs = _padding(padding, weight.shape[2:], per_axis(dilation, d))
    return _convolve(input, weight, bias, stride, pairs, dilation, groups)


@register(
    "torch.nn.functional.conv1d",
    "torch.conv1d",
    modules={"torch.nn.Conv1d": AsLayer(conv_layer)},
)
def conv1d(
    input: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Array:
    return _conv(input, weight, bias, stride, padding, dilation, groups)


@register(
    "torch.nn.functional.conv2d",
    "torch.conv2d",
    modules={"torch.nn.Conv2d": AsLayer(conv_layer)},
)
def conv2d(
    input: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Array:
    return _conv(input, weight, bias, stride, padding, dilation, groups)


@register(
    "torch.nn.functional.conv3d",
    "torch.conv3d",
    modules={"torch.nn.Conv3d": AsLayer(conv_layer)},
)
def conv3d(
    input: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Array:
    return _conv(input, weight, bias, stride, padding, dilation, groups)


@register(
    "torch.nn.functional.conv_transpose1d",
    "torch.conv_transpose1d",
    modules={"torch.nn.ConvTranspose1d": AsLayer(conv_layer)},
)
def conv_transpose1d(
    input: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
) -> Array:
    return _transposed_convolve(
        input, weight, bias, stride, padding, output_padding, groups, dilation
    )


@register(
    "torch.nn.functional.conv_transpose2d",
    "torch.conv_transpose2d",
    modules={"torch.nn.ConvTranspose2d": AsLayer(conv_layer)},
)
def conv_transpose2d(
    input: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
) -> Array:
    return _transposed_convolve(
        input, weight, bias, stride, padding, output_padding, groups, dilation
    )


@register(
    "torch.nn.functional.conv_transpose3d",
    "torch.conv_transpose3d",
    modules={"torch.nn.ConvTranspose3d": AsLayer(conv_layer)},
)
def conv_transpose3d(
    input: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
) -> Array:
    return _transposed_convolve(
        input, weight, bias, stride, padding, output_padding, groups, dilation
    )


def conv2d_same_layer(m: Any, child: Callable[[str], Layer]) -> Layer:
    """timm's ``Conv2dSame``: TensorFlow 'SAME' padding from the input's size, then a conv."""
    inner = conv_layer(m, child)
    k, s, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    return Layer(inner.make, functools.partial(same_padding_call, k, s, dil))


def same_padding_call(
    kernel_size: Any, stride: Any, dilation: Any, module: Any, train: bool, x: Any
) -> Any:
    """Call a convolution after TensorFlow 'SAME' padding of ``x`` (timm's ``Conv2dSame``)."""
    del train
    return module(pad_same(x, kernel_size, stride, dilation))


@register(
    "timm.layers.conv2d_same.conv2d_same",
    modules={"timm.layers.conv2d_same.Conv2dSame": AsLayer(conv2d_same_layer)},
)
def conv2d_same(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: Any = (1, 1),
    padding: Any = (0, 0),
    dilation: Any = (1, 1),
    groups: int = 1,
) -> Array:
    """timm's: 'SAME' padding from the input's size (``padding`` is ignored), then a conv."""
    x = pad_same(x, weight.shape[-2:], stride, dilation)
    return conv2d(x, weight, bias, stride, 0, dilation, groups)


class Linear(nn.Module):
    """``torch.nn.Linear``: ``x @ kernel + bias`` with ``kernel = weight.T``."""

    in_features: int
    out_features: int
    use_bias: bool = True
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # (lecun_normal divides by the fan-in: a zero-size Linear, as num_classes=0, is zeros)
        empty = self.in_features == 0 or self.out_features == 0
        kernel = self.param(
            "kernel",
            nn.initializers.zeros if empty else nn.initializers.lecun_normal(),
            (self.in_features, self.out_features),
            self.param_dtype,
        )
        y = x @ kernel
        if self.use_bias:
            y = y + self.param(
                "bias", nn.initializers.zeros, (self.out_features,), self.param_dtype
            )
        return y


def linear_layer(m: Any, child: Callable[[str], Layer]) -> Layer:
    return Layer(
        functools.partial(
            Linear, m.in_features, m.out_features, m.bias is not None, dtype_of(m.weight)
        ),
        plain_call,
    )


@register(
    "torch.nn.functional.linear",
    modules={
        "torch.nn.Linear": AsLayer(linear_layer),
        # nn.Linear with a torchscript-only cast in its own forward
        "timm.layers.linear.Linear": AsLayer(linear_layer),
    },
)
def linear(input: Array, weight: Array, bias: Array | None = None) -> Array:
    """``input @ weight.T + bias``, weight (out, in) as torch's."""
    y = input @ weight.T
    return y if bias is None else y + bias


@register("torch.einsum")
def einsum(equation: str, *operands: Any) -> Array:
    """Operands as arguments or as one list, as torch takes them."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return jnp.einsum(equation, *operands)
