"""Python's operators, ``math`` and ``getattr`` as a forward uses them, on tensors and on
sizes alike.

Shapes are static in JAX, so ``x.shape[2] % 2``, ``math.ceil(h / 7)`` and
``torch._assert(h == 224, ...)`` compute Python numbers when the ported
module is traced, as torch's forward computes them; on tensors the same
operators are elementwise.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import PortError
from ._registry import register

Array = jax.Array


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_CATEGORIES = (jnp.bool_, jnp.integer, jnp.floating, jnp.complexfloating)


def _category(value: Any) -> int:
    dtype = jnp.result_type(value)
    return next(i for i, kind in enumerate(_CATEGORIES) if jnp.issubdtype(dtype, kind))


def promoted(input: Any, other: Any) -> tuple[Any, Any]:
    """torch's promotion across kinds: an integer (or bool) tensor meets a float one as
    that float (``x * torch.arange(n)``); JAX's strict mode would refuse the pair."""
    arrays = (jax.Array, np.ndarray, np.generic)
    if not (isinstance(input, arrays) and isinstance(other, arrays)):
        return input, other
    low, high = sorted((input, other), key=_category)
    if _category(low) == _category(high):
        return input, other
    cast = low.astype(high.dtype)
    return (cast, other) if low is input else (input, cast)


@register("operator.add", "operator.iadd", "torch.add", "Tensor.add", "Tensor.add_")
def add(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    input, other = promoted(input, other)
    return input + (other if alpha == 1 else other * alpha)


@register(
    "operator.sub",
    "operator.isub",
    "torch.sub",
    "torch.subtract",
    "Tensor.sub",
    "Tensor.sub_",
)
def sub(input: Any, other: Any, *, alpha: Any = 1) -> Any:
    input, other = promoted(input, other)
    return input - (other if alpha == 1 else other * alpha)


@register(
    "operator.mul",
    "operator.imul",
    "torch.mul",
    "torch.multiply",
    "Tensor.mul",
    "Tensor.mul_",
)
def mul(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input * other


@register(
    "operator.truediv",
    "operator.itruediv",
    "torch.div",
    "torch.divide",
    "torch.true_divide",
    "Tensor.div",
    "Tensor.div_",
)
def div(input: Any, other: Any, *, rounding_mode: str | None = None) -> Any:
    input, other = promoted(input, other)
    if rounding_mode == "floor":
        return input // other
    if rounding_mode == "trunc":
        quotient = input / other
        return math.trunc(quotient) if _is_number(quotient) else jnp.trunc(quotient)
    return input / other


@register("operator.floordiv", "operator.ifloordiv", "torch.floor_divide", "Tensor.floor_divide")
def floordiv(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input // other


@register("operator.mod", "torch.remainder", "Tensor.remainder")
def mod(input: Any, other: Any) -> Any:
    """The remainder with the divisor's sign (Python's ``%``, torch's ``remainder``)."""
    input, other = promoted(input, other)
    return input % other


@register("operator.neg", "torch.neg", "Tensor.neg")
def neg(input: Any) -> Any:
    return -input


@register("operator.pow", "torch.pow", "Tensor.pow", "Tensor.pow_")
def pow(input: Any, exponent: Any) -> Any:
    return input**exponent


@register("operator.matmul", "torch.matmul", "Tensor.matmul", "torch.bmm", "Tensor.bmm")
def matmul(input: Array, other: Array) -> Array:
    """``@``; ``bmm`` is the 3-D case."""
    input, other = promoted(input, other)
    return jnp.matmul(input, other)


@register("operator.eq", "torch.eq", "Tensor.eq")
def eq(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input == other


@register("operator.ne", "torch.ne", "Tensor.ne")
def ne(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input != other


@register("operator.lt", "torch.lt", "Tensor.lt")
def lt(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input < other


@register("operator.le", "torch.le", "Tensor.le")
def le(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input <= other


@register("operator.gt", "torch.gt", "Tensor.gt")
def gt(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input > other


@register("operator.ge", "torch.ge", "Tensor.ge")
def ge(input: Any, other: Any) -> Any:
    input, other = promoted(input, other)
    return input >= other


@register("math.ceil", "torch.ceil", "Tensor.ceil")
def ceil(input: Any) -> Any:
    """An int for a number (``math.ceil``), elementwise for a tensor."""
    return math.ceil(input) if _is_number(input) else jnp.ceil(input)


@register("math.floor", "torch.floor", "Tensor.floor")
def floor(input: Any) -> Any:
    return math.floor(input) if _is_number(input) else jnp.floor(input)


@register("builtins.len", name="len")
def length(obj: Any) -> int:
    """``len()`` of a size tuple (or of a tensor: its first axis)."""
    return len(obj)


@register("operator.invert", "torch.bitwise_not", "Tensor.bitwise_not")
def invert(input: Any) -> Any:
    """``~x``: logical not of a bool tensor, bitwise not of an integer one."""
    return ~input


@register("operator.setitem")
def setitem(obj: Any, index: Any, value: Any) -> Any:
    """``x[index] = value``, in place in torch: the port rebinds ``x`` to the result."""
    obj = jnp.asarray(obj)
    if isinstance(value, (jax.Array, np.ndarray)):
        value = jnp.asarray(value).astype(obj.dtype)
    return obj.at[index].set(value)


@register("operator.getitem")
def getitem(obj: Any, index: Any) -> Any:
    """``x[index]``: a tensor's slices and index arrays, a size tuple's items."""
    return operator.getitem(obj, index)


@register("builtins.getattr", name="getattr")
def get_attribute(obj: Any, name: str) -> Any:
    """``x.shape`` (a tuple), ``x.ndim``, ``x.dtype``, ``x.T``; ``x.device`` is None (JAX
    places arrays itself); any attribute of another object (a named tuple's field)."""
    if isinstance(obj, jax.Array | jax.ShapeDtypeStruct) or hasattr(obj, "aval"):
        if name == "shape":
            return tuple(obj.shape)
        if name == "device":
            return None
        if name == "is_cuda":
            return False
        if name in ("ndim", "dtype", "T", "mT"):
            return getattr(obj, name)
        raise NotImplementedError(f"tensor attribute {name!r} has no port")
    return getattr(obj, name)


@register("torch._assert")
def assert_(condition: Any, message: str) -> None:
    """``torch._assert``: a condition on sizes is checked when the ported module is traced
    (an error, as in torch, if it fails); one on values cannot stop a compiled program
    and is not checked."""
    if isinstance(condition, bool) and not condition:
        raise AssertionError(message)


@register("torch.fx._symbolic_trace._assert_is_none", name="assert_is_none")
def assert_is_none(value: Any, message: str) -> None:
    """An argument the forward had as None when the model was ported (``mask=None``):
    the port has only that branch, so another value is an error, not ignored."""
    if value is not None:
        raise PortError(
            f"{message} (it was None when the model was ported, and the port has no branch "
            "for another value). Port the model again with that argument in the example "
            "input, the inputs by name: jaxbn.port(model, {name: value, ...})"
        )


@register("jaxbn.port.ops._python.guard")
def guard(value: Any, expected: Any, where: str) -> None:
    """Where torch's forward branched on a size (``if h % 7:``, ``range(n)``): the value
    it had when the port traced it. Another value would take a branch the port does not
    have, so it is an error, raised when the ported module is traced; never other numbers.
    """
    # (the value as the forward used it: bool(h % 2), int(w * 0.5))
    actual = type(expected)(value) if isinstance(expected, (bool, int)) else value
    if actual != expected:
        raise PortError(
            f"{where} was {expected!r} when the model was ported and is {actual!r} for this "
            "input, which takes another branch of torch's forward than the port has. Port "
            "the model again with an example input of this shape: jaxbn.port(model, x)"
        )
