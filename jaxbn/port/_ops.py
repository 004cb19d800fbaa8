"""The one table of what each torch module, function and tensor method becomes.

Keys are exact: a module class (dispatch is ``type(m) is cls``, never
``isinstance``, so a subclass that adds behaviour — timm's
``BatchNormAct2d`` — is its own row), a function object, or a tensor
method name. Values:

- module class -> ``convert(module, child) -> Layer``, where ``child(name)``
  converts a submodule of a composite leaf;
- function or method name -> a JAX function with torch's signature (a
  method's first argument is the tensor), wrapped in :class:`TrainAware`
  when it follows the Flax ``train`` flag and the ``'dropout'`` RNG, or in
  :class:`Checked` when some of its constant arguments have no port.

torch (and torchvision, timm when installed) are imported only when the
table is built.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import importlib
import operator
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from .. import _linen
from .._frozen import FrozenBatchNorm2d
from . import _functions as f
from ._layers import (
    Composite,
    Conv,
    Layer,
    Linear,
    Op,
    batch_norm_call,
    plain_call,
    train_call,
)
from ._module import Ref


@dataclasses.dataclass(frozen=True)
class TrainAware:
    """A function that also takes ``train=`` (the Flax flag) and ``rng=`` (a key maker)."""

    fn: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Checked:
    """A function whose constant arguments the port checks when it compiles the graph.

    ``check`` takes the traced call's arguments (tensors are placeholders) and
    raises :class:`Unsupported` for a configuration ``fn`` cannot compute, so
    that it is listed with every other unsupported op rather than failing
    when the ported module first runs.
    """

    fn: Callable[..., Any]
    check: Callable[..., None]


class Unsupported(Exception):
    """A module's or call's configuration no converter handles (the port lists every one)."""


def _dtype(tensor: Any) -> Any:
    return jnp.dtype(str(tensor.dtype).removeprefix("torch."))


def op(fn: Callable[..., Any], train_aware: bool = False) -> Layer:
    """A leaf without variables."""
    return Layer(functools.partial(Op, fn, train_aware), train_call)


# --- module rows -------------------------------------------------------------


def conv(m: Any, child: Any) -> Layer:
    d = len(m.kernel_size)
    k, dil = tuple(m.kernel_size), tuple(m.dilation)
    if m.padding == "same":
        total = [di * (ki - 1) for ki, di in zip(k, dil, strict=True)]
        padding = tuple((t // 2, t - t // 2) for t in total)
    elif m.padding == "valid":
        padding = ((0, 0),) * d
    else:
        padding = tuple((p, p) for p in m.padding)
    if getattr(m, "transposed", False):
        raise Unsupported("transposed convolution has no converter yet")
    return Layer(
        functools.partial(
            Conv,
            m.in_channels,
            m.out_channels,
            k,
            tuple(m.stride),
            padding,
            dil,
            m.groups,
            m.bias is not None,
            m.padding_mode,
            _dtype(m.weight),
        ),
        plain_call,
    )


def linear(m: Any, child: Any) -> Layer:
    return Layer(
        functools.partial(
            Linear, m.in_features, m.out_features, m.bias is not None, _dtype(m.weight)
        ),
        plain_call,
    )


def batch_norm(m: Any, child: Any, layer: str | None = None) -> Layer:
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
            param_dtype=_dtype(tensor) if tensor is not None else jnp.float32,
            **extra,
        ),
        batch_norm_call,
    )


def frozen_batch_norm(m: Any, child: Any) -> Layer:
    return Layer(
        functools.partial(FrozenBatchNorm2d, m.weight.shape[0], m.eps, _dtype(m.weight)),
        plain_call,
    )


def batch_norm_act(m: Any, child: Any) -> Layer:
    """timm's BatchNormAct2d: a BatchNorm2d at its own path, then ``drop`` and ``act``."""
    first = batch_norm(m, child, "BatchNorm2d")
    children = tuple((name, child(name)) for name in ("drop", "act"))
    return Layer(functools.partial(Composite, first, children), train_call)


def frozen_batch_norm_act(m: Any, child: Any) -> Layer:
    first = frozen_batch_norm(m, child)
    children = tuple((name, child(name)) for name in ("drop", "act"))
    return Layer(functools.partial(Composite, first, children), train_call)


def conv2d_same_module(m: Any, child: Any) -> Layer:
    """timm's Conv2dSame: TensorFlow 'SAME' padding from the input size, then a conv."""
    inner = conv(m, child)
    k, s, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)

    def same_pad(x: Any) -> Any:
        widths = []
        for size, ki, si, di in zip(x.shape[-2:], k, s, dil, strict=True):
            total = max((-(-size // si) - 1) * si + (ki - 1) * di + 1 - size, 0)
            widths.append((total // 2, total - total // 2))
        return jnp.pad(x, ((0, 0), (0, 0), *widths))

    def call(module: Any, train: bool, x: Any) -> Any:
        return module(same_pad(x))

    return Layer(inner.make, call)


def _activation(fn: Callable[..., Any], *names: str) -> Callable[[Any, Any], Layer]:
    def convert(m: Any, child: Any) -> Layer:
        return op(functools.partial(fn, **{name: getattr(m, name) for name in names}))

    return convert


def _pool(fn: Callable[..., Any], d: int, *names: str) -> Callable[[Any, Any], Layer]:
    def convert(m: Any, child: Any) -> Layer:
        return op(functools.partial(fn, **{n: getattr(m, n) for n in names}, d=d))

    return convert


def _dropout(fn: Callable[..., Any]) -> Callable[[Any, Any], Layer]:
    def convert(m: Any, child: Any) -> Layer:
        return op(functools.partial(fn, p=m.p), train_aware=True)

    return convert


def stochastic_depth_module(m: Any, child: Any) -> Layer:
    return op(functools.partial(f.stochastic_depth, p=m.p, mode=m.mode), train_aware=True)


def drop_path_module(m: Any, child: Any) -> Layer:
    return op(
        functools.partial(f.drop_path, drop_prob=m.drop_prob, scale_by_keep=m.scale_by_keep),
        train_aware=True,
    )


def flatten_module(m: Any, child: Any) -> Layer:
    return op(functools.partial(f.flatten, start_dim=m.start_dim, end_dim=m.end_dim))


def pad_module(mode: str) -> Callable[[Any, Any], Layer]:
    def convert(m: Any, child: Any) -> Layer:
        value = getattr(m, "value", None)
        return op(lambda x: f.pad(x, tuple(m.padding), mode, value))

    return convert


def check_interpolate(
    input: Any,
    size: Any = None,
    scale_factor: Any = None,
    mode: Any = "nearest",
    align_corners: Any = None,
    recompute_scale_factor: Any = None,
    antialias: Any = False,
) -> None:
    """``F.interpolate``'s mode and antialias, checked before anything runs."""
    if isinstance(mode, Ref) or isinstance(antialias, Ref):
        return  # computed in the graph: checked when the ported module runs
    reason = f.resize_unsupported(mode, antialias)
    if reason is not None:
        raise Unsupported(f"F.interpolate: {reason}")


def upsample_module(m: Any, child: Any) -> Layer:
    """``nn.Upsample`` and its fixed-mode subclasses (nearest; bilinear, align_corners=True)."""
    options = {
        "size": m.size,
        "scale_factor": m.scale_factor,
        "mode": m.mode,
        "align_corners": m.align_corners,
        "recompute_scale_factor": m.recompute_scale_factor,
    }
    reason = f.resize_unsupported(m.mode, False)
    if reason is not None:
        raise Unsupported(reason)
    return op(functools.partial(f.interpolate, **options))


def softmax_module(fn: Callable[..., Any]) -> Callable[[Any, Any], Layer]:
    def convert(m: Any, child: Any) -> Layer:
        return op(functools.partial(fn, dim=m.dim))

    return convert


# --- the table ---------------------------------------------------------------


def _inplace(name: str) -> Callable[..., Any]:
    return getattr(operator, name)


@functools.cache
def table() -> dict[Any, Any]:
    """The op table (built once, on first use)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    rows: dict[Any, Any] = {
        # modules with variables
        nn.Conv1d: conv,
        nn.Conv2d: conv,
        nn.Conv3d: conv,
        nn.Linear: linear,
        nn.BatchNorm1d: batch_norm,
        nn.BatchNorm2d: batch_norm,
        nn.BatchNorm3d: batch_norm,
        nn.SyncBatchNorm: functools.partial(batch_norm, layer="BatchNorm"),
        # modules without
        nn.Identity: lambda m, child: op(f.identity),
        nn.ReLU: lambda m, child: op(f.relu),
        nn.ReLU6: lambda m, child: op(f.relu6),
        nn.Hardtanh: _activation(f.hardtanh, "min_val", "max_val"),
        nn.SiLU: lambda m, child: op(f.silu),
        nn.Sigmoid: lambda m, child: op(f.sigmoid),
        nn.Tanh: lambda m, child: op(f.tanh),
        nn.Hardswish: lambda m, child: op(f.hardswish),
        nn.Hardsigmoid: lambda m, child: op(f.hardsigmoid),
        nn.GELU: _activation(f.gelu, "approximate"),
        nn.LeakyReLU: _activation(f.leaky_relu, "negative_slope"),
        nn.ELU: _activation(f.elu, "alpha"),
        nn.Softplus: _activation(f.softplus, "beta", "threshold"),
        nn.Mish: lambda m, child: op(f.mish),
        nn.Softmax: softmax_module(f.softmax),
        nn.LogSoftmax: softmax_module(f.log_softmax),
        nn.Dropout: _dropout(f.dropout),
        nn.Dropout2d: _dropout(f.dropout2d),
        nn.MaxPool1d: _pool(
            f.max_pool, 1, "kernel_size", "stride", "padding", "dilation", "ceil_mode"
        ),
        nn.MaxPool2d: _pool(
            f.max_pool, 2, "kernel_size", "stride", "padding", "dilation", "ceil_mode"
        ),
        nn.AvgPool1d: _pool(
            f.avg_pool, 1, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"
        ),
        nn.AvgPool2d: _pool(
            f.avg_pool,
            2,
            "kernel_size",
            "stride",
            "padding",
            "ceil_mode",
            "count_include_pad",
            "divisor_override",
        ),
        nn.AdaptiveAvgPool1d: _pool(f.adaptive_avg_pool, 1, "output_size"),
        nn.AdaptiveAvgPool2d: _pool(f.adaptive_avg_pool, 2, "output_size"),
        nn.AdaptiveMaxPool2d: _pool(f.adaptive_max_pool, 2, "output_size"),
        nn.Flatten: flatten_module,
        nn.ZeroPad2d: pad_module("constant"),
        nn.ConstantPad2d: pad_module("constant"),
        nn.ReflectionPad2d: pad_module("reflect"),
        nn.ReplicationPad2d: pad_module("replicate"),
        nn.Upsample: upsample_module,
        nn.UpsamplingNearest2d: upsample_module,
        nn.UpsamplingBilinear2d: upsample_module,
        # functions
        operator.add: operator.add,
        operator.sub: operator.sub,
        operator.mul: operator.mul,
        operator.truediv: operator.truediv,
        operator.floordiv: operator.floordiv,
        operator.neg: operator.neg,
        operator.pow: operator.pow,
        operator.matmul: operator.matmul,
        operator.getitem: operator.getitem,
        operator.iadd: operator.add,
        operator.imul: operator.mul,
        builtins.getattr: f.getattr_,
        torch.add: f.add,
        torch.sub: f.sub,
        torch.mul: operator.mul,
        torch.div: f.div,
        torch.matmul: jnp.matmul,
        torch.cat: f.cat,
        torch.concat: f.cat,
        torch.stack: f.stack,
        torch.flatten: f.flatten,
        torch.transpose: f.transpose,
        torch.permute: f.permute,
        torch.reshape: f.reshape,
        torch.chunk: f.chunk,
        torch.split: f.split,
        torch.mean: f.mean,
        torch.sum: f.sum_,
        torch.amax: f.amax,
        torch.squeeze: f.squeeze,
        torch.unsqueeze: f.unsqueeze,
        torch.sigmoid: f.sigmoid,
        torch.tanh: f.tanh,
        torch.relu: f.relu,
        torch.sqrt: jnp.sqrt,
        torch.rsqrt: lambda input: 1 / jnp.sqrt(input),
        torch.exp: jnp.exp,
        torch.clamp: f.clamp,
        torch.softmax: f.softmax,
        F.relu: f.relu,
        F.relu6: f.relu6,
        F.hardtanh: f.hardtanh,
        F.silu: f.silu,
        F.sigmoid: f.sigmoid,
        F.tanh: f.tanh,
        F.hardswish: f.hardswish,
        F.hardsigmoid: f.hardsigmoid,
        F.gelu: f.gelu,
        F.leaky_relu: f.leaky_relu,
        F.elu: f.elu,
        F.softplus: f.softplus,
        F.mish: f.mish,
        F.softmax: f.softmax,
        F.log_softmax: f.log_softmax,
        F.linear: f.linear,
        F.pad: f.pad,
        F.dropout: TrainAware(f.dropout),
        F.dropout2d: TrainAware(f.dropout2d),
        F.max_pool1d: functools.partial(f.max_pool, d=1),
        F.max_pool2d: functools.partial(f.max_pool, d=2),
        F.avg_pool1d: functools.partial(f.avg_pool, d=1),
        F.avg_pool2d: functools.partial(f.avg_pool, d=2),
        F.adaptive_avg_pool1d: functools.partial(f.adaptive_avg_pool, d=1),
        F.adaptive_avg_pool2d: functools.partial(f.adaptive_avg_pool, d=2),
        F.adaptive_max_pool2d: functools.partial(f.adaptive_max_pool, d=2),
        # F.upsample, upsample_nearest and upsample_bilinear call this one, and
        # FX records only the call inside.
        F.interpolate: Checked(f.interpolate, check_interpolate),
        # tensor methods (the first argument is the tensor)
        "view": f.reshape,
        "reshape": f.reshape,
        "flatten": f.flatten,
        "size": f.size,
        "dim": lambda self: self.ndim,
        "numel": lambda self: self.size,
        "contiguous": f.identity,
        "clone": f.identity,
        "detach": lambda self: self,
        "mean": f.mean,
        "sum": f.sum_,
        "amax": f.amax,
        "chunk": f.chunk,
        "split": f.split,
        "transpose": f.transpose,
        "permute": f.permute,
        "squeeze": f.squeeze,
        "unsqueeze": f.unsqueeze,
        "expand": f.expand,
        "expand_as": f.expand_as,
        "view_as": f.view_as,
        "add": f.add,
        "sub": f.sub,
        "mul": operator.mul,
        "div": f.div,
        "pow": operator.pow,
        "sigmoid": f.sigmoid,
        "tanh": f.tanh,
        "relu": f.relu,
        "softmax": f.softmax,
        "clamp": f.clamp,
        "sqrt": jnp.sqrt,
        "rsqrt": lambda self: 1 / jnp.sqrt(self),
        "exp": jnp.exp,
    }
    # In-place methods compute what their out-of-place twins do; the port
    # rebinds the mutated tensor (see Node.alias).
    for name in ("add", "sub", "mul", "div", "sigmoid", "relu", "clamp", "pow", "tanh"):
        rows[f"{name}_"] = rows[name]
    # Aliases torch keeps for the same functions.
    for name in (
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "_max_pool1d",
        "_max_pool2d",
    ):
        if hasattr(F, name):
            rows[getattr(F, name)] = rows[F.max_pool2d if "2d" in name else F.max_pool1d]
    rows |= _torchvision_rows()
    rows |= _timm_rows()
    return rows


def _torchvision_rows() -> dict[Any, Any]:
    try:
        import torchvision.ops
    except ImportError:
        return {}
    return {
        torchvision.ops.FrozenBatchNorm2d: frozen_batch_norm,
        torchvision.ops.StochasticDepth: stochastic_depth_module,
        torchvision.ops.stochastic_depth: TrainAware(f.stochastic_depth),
    }


def _timm_rows() -> dict[Any, Any]:
    try:
        from timm.layers import drop, norm_act
        from timm.layers import linear as timm_linear

        # the module, which timm.layers shadows with its function of the same name
        same = importlib.import_module("timm.layers.conv2d_same")
    except ImportError:
        return {}
    rows: dict[Any, Any] = {
        norm_act.BatchNormAct2d: batch_norm_act,
        norm_act.FrozenBatchNormAct2d: frozen_batch_norm_act,
        drop.DropPath: drop_path_module,
        drop.drop_path: TrainAware(f.drop_path),
        same.Conv2dSame: conv2d_same_module,
        timm_linear.Linear: linear,  # nn.Linear with a torchscript-only cast
    }
    return rows


def leaf_types() -> frozenset[type]:
    """Module classes the tracer must not trace into."""
    return frozenset(k for k in table() if isinstance(k, type))
