"""Padding: ``F.pad`` (all its modes, and negative pads that crop), torch's padding
modules, and timm's TensorFlow-style 'SAME' padding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ._registry import FromModule, register

Array = jax.Array

# F.pad's modes as jnp.pad's.
MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _module(mode: str) -> FromModule:
    if mode == "constant":
        return FromModule(lambda m: {"pad": tuple(m.padding), "value": m.value})
    return FromModule(lambda m: {"pad": tuple(m.padding), "mode": mode})


@register(
    "torch.nn.functional.pad",
    modules={
        f"torch.nn.{kind}Pad{d}d": _module(mode)
        for kind, mode in (
            ("Zero", "constant"),
            ("Constant", "constant"),
            ("Reflection", "reflect"),
            ("Replication", "replicate"),
            ("Circular", "circular"),
        )
        for d in (1, 2, 3)
    },
)
def pad(
    input: Array, pad: Sequence[int], mode: str = "constant", value: float | None = None
) -> Array:
    """``pad`` pairs from the last axis backwards; negative pads crop."""
    widths = [(0, 0)] * input.ndim
    for i in range(len(pad) // 2):
        widths[input.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    grow = [(max(lo, 0), max(hi, 0)) for lo, hi in widths]
    kwargs = {"constant_values": 0 if value is None else value} if mode == "constant" else {}
    x = jnp.pad(input, grow, mode=MODES[mode], **kwargs)  # type: ignore[arg-type]
    crop = tuple(slice(-min(lo, 0), x.shape[i] + min(hi, 0)) for i, (lo, hi) in enumerate(widths))
    return x[crop]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of one axis: (before, after), the odd one after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


@register("timm.layers.padding.pad_same")
def pad_same(
    x: Array,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int] = (1, 1),
    value: float = 0,
) -> Array:
    """timm's: pad the last two axes for a 'SAME' window from the input's own size."""
    widths = [
        same_padding(size, k, s, d)
        for size, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation, strict=True)
    ]
    return jnp.pad(x, ((0, 0),) * (x.ndim - 2) + tuple(widths), constant_values=value)
