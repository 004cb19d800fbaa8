"""Every op of the registry against torch: its value, its input gradient and, where the op
has one, its forward-mode derivative.

``CASES`` holds at least one case per registry entry (the coverage test
fails for an entry without one); each case is ported with ``jaxbn.port``,
must call the op it is filed under, and is compared with the real torch on
the same inputs. Entries that cannot have a case are in ``NO_CASE``, each
with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import activations as timm_act
from timm.layers.conv2d_same import conv2d_same
from timm.layers.create_conv2d import create_conv2d
from timm.layers.drop import DropPath
from timm.layers.linear import Linear as TimmLinear
from timm.layers.norm import LayerNorm2d
from timm.layers.norm_act import BatchNormAct2d
from timm.layers.pool2d_same import create_pool2d
from torch import nn

import jaxbn
from jaxbn.port import ops
from jaxbn.port.ops._registry import resolve

from .helpers import assert_close, fast_lane


class Fn(nn.Module):
    """``fn(*inputs)`` (up to four) as a module, so that FX records its ops."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn
        parameters = inspect.signature(fn).parameters.values() if inspect.isfunction(fn) else ()
        self.arity = max(1, sum(p.default is inspect.Parameter.empty for p in parameters))

    def forward(self, x: Any, y: Any = None, z: Any = None, w: Any = None) -> Any:
        return self.fn(*(x, y, z, w)[: self.arity])


class WithTensors(nn.Module):
    """``fn(self, x)`` on tensors of its own (a weight read outside a layer)."""

    def __init__(self, fn: Callable[..., Any], **tensors: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and name != "running_mean" and name != "running_var":
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def forward(self, x: Any) -> Any:
        return self.fn(self, x)


class WritesRows(nn.Module):
    """``y[...] = value`` in a forward: torch writes in place, the port rebinds ``y``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1
        y[:, :, 0] = x[:, :, -1] * 3
        y[0] = 0.5
        return y


class OptionalMask(nn.Module):
    """``mask=None`` as attention blocks take it: ``is not None`` cannot be traced, so the
    port takes the argument as None, and checks that it stays None."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x * 2 if mask is None else x * mask


class Scaled(nn.Module):
    """``module(x * factor)``: inputs spread over an activation's kinks, or a copy of the
    input for an in-place module."""

    def __init__(self, module: nn.Module, factor: float) -> None:
        super().__init__()
        self.module = module
        self.factor = factor

    def forward(self, x: Any) -> Any:
        return self.module(x * self.factor)


@dataclasses.dataclass(frozen=True)
class Case:
    """A torch module (or function) and the shapes of its random inputs (or the inputs)."""

    model: Any
    inputs: tuple[Any, ...]
    train: bool = False  # compare a training step (BatchNorm's batch statistics)
    forward_mode: bool = True  # False where torch or the port has no forward-mode derivative

    def build(self) -> tuple[nn.Module, tuple[np.ndarray, ...]]:
        model = self.model if isinstance(self.model, nn.Module) else Fn(self.model)
        rng = np.random.default_rng(0)
        inputs = tuple(
            rng.standard_normal(i).astype(np.float32) if isinstance(i, tuple) else np.asarray(i)
            for i in self.inputs
        )
        return copy.deepcopy(model), inputs


def case(model: Any, *inputs: Any, **options: Any) -> Case:
    return Case(model, inputs or ((2, 3, 5, 6),), **options)


X = (2, 3, 5, 6)
WITH_ZEROS = np.array([[0.0, 1.5, -2.0, 0.0], [-0.0, 3.0, 0.0, -1.0]], np.float32)


def _weight(*shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(7).standard_normal(shape).astype(np.float32))


def sampled(fn: Callable[..., Any]) -> Case:
    """A grid_sample case: (2, 3, 5, 6) input, (2, 4, 3, 2) grid; torch has no
    forward-mode derivative of grid_sample."""
    return case(fn, X, (2, 4, 3, 2), forward_mode=False)


def _positive(x: torch.Tensor) -> torch.Tensor:
    return x.abs() + 0.1


CASES: dict[str, list[Case]] = {
    # --- activations ---
    "relu": [
        case(F.relu),
        case(Scaled(nn.ReLU(inplace=True), 1.0)),
        case(lambda x: (x * 1).relu_() + torch.relu(x)),
    ],
    "relu6": [case(lambda x: F.relu6(x * 4)), case(Scaled(nn.ReLU6(), 4.0))],
    "hardtanh": [case(lambda x: F.hardtanh(x, -0.5, 0.7)), case(nn.Hardtanh(-2.0, 1.0))],
    "sigmoid": [
        case(torch.sigmoid),
        case(nn.Sigmoid()),
        case(lambda x: (x * 1).sigmoid_()),
        case(timm_act.Sigmoid()),
    ],
    "silu": [case(F.silu), case(nn.SiLU()), case(timm_act.Swish())],
    "tanh": [case(torch.tanh), case(nn.Tanh()), case(lambda x: x.tanh())],
    "hardsigmoid": [case(lambda x: F.hardsigmoid(x * 3)), case(timm_act.HardSigmoid())],
    "hardswish": [case(Scaled(nn.Hardswish(), 3.0)), case(timm_act.HardSwish())],
    "gelu": [
        case(F.gelu),
        case(nn.GELU("tanh")),
        case(timm_act.GELU()),
        case(timm_act.GELUTanh()),
    ],
    "quick_gelu": [case(timm_act.QuickGELU())],
    "leaky_relu": [case(lambda x: F.leaky_relu(x, 0.2)), case(nn.LeakyReLU(0.3))],
    "elu": [case(nn.ELU(0.5)), case(F.elu)],
    "softplus": [
        case(nn.Softplus(beta=2.0, threshold=1.0)),
        case(F.softplus),
        case(Scaled(nn.Softplus(), 100.0)),  # exp overflows past 88: no NaN gradient
    ],
    "mish": [case(F.mish), case(timm_act.Mish()), case(Scaled(nn.Mish(), 100.0))],
    "hard_mish": [case(Scaled(timm_act.HardMish(), 2.0))],
    "softsign": [case(nn.Softsign()), case(F.softsign)],
    "prelu": [
        case(nn.PReLU(3, init=0.3)),
        case(nn.PReLU()),
        case(WithTensors(lambda m, x: F.prelu(x, m.weight), weight=_weight(3))),
    ],
    "softmax": [
        case(lambda x: F.softmax(x, dim=1)),
        case(nn.Softmax(dim=-1)),
        case(lambda x: x.softmax(2)),
        # torch.softmax and the method take dtype third (F.softmax, _stacklevel)
        case(lambda x: torch.softmax(x.to(torch.float16), 1, torch.float32)),
    ],
    "log_softmax": [
        case(lambda x: F.log_softmax(x, 1)),
        case(nn.LogSoftmax(1)),
        case(lambda x: torch.log_softmax(x, 3)),
    ],
    # --- train-time randomness, in eval (test_random_ops_* checks a training step) ---
    "dropout": [case(nn.Dropout(0.3)), case(lambda x: F.dropout(x, 0.3, training=False))],
    "dropout1d": [case(nn.Dropout1d(0.3), (2, 3, 5))],
    "dropout2d": [case(nn.Dropout2d(0.3))],
    "dropout3d": [case(nn.Dropout3d(0.3), (2, 3, 2, 3, 4))],
    "stochastic_depth": [case(torchvision.ops.StochasticDepth(0.3, "row"))],
    "drop_path": [case(DropPath(0.2))],
    # --- pooling ---
    "max_pool1d": [
        case(nn.MaxPool1d(3, 2, 1, ceil_mode=True), (2, 3, 10)),
        case(lambda x: F.max_pool1d(x, 2, dilation=2), (2, 3, 9)),
    ],
    "max_pool2d": [
        case(nn.MaxPool2d(3, 2, 1)),
        case(lambda x: F.max_pool2d(x, 2, ceil_mode=True)),
        case(nn.MaxPool2d(2, 1, dilation=2)),
    ],
    "max_pool3d": [
        case(nn.MaxPool3d(2, 1, 1), (2, 3, 3, 4, 5)),
        case(lambda x: F.max_pool3d(x, (1, 2, 3), (1, 2, 2), ceil_mode=True), (2, 3, 3, 5, 6)),
    ],
    "avg_pool1d": [case(nn.AvgPool1d(3, 2, 1, count_include_pad=False), (2, 3, 10))],
    "avg_pool2d": [
        case(nn.AvgPool2d(3, 2, 1, ceil_mode=True)),
        case(lambda x: F.avg_pool2d(x, 2, divisor_override=3)),
    ],
    "avg_pool3d": [
        case(nn.AvgPool3d((1, 2, 2), 2, (0, 1, 1), count_include_pad=False), (2, 3, 3, 5, 6)),
        case(lambda x: F.avg_pool3d(x, 2, ceil_mode=True), (2, 3, 3, 5, 6)),
    ],
    "adaptive_avg_pool1d": [case(nn.AdaptiveAvgPool1d(4), (2, 3, 10))],
    "adaptive_avg_pool2d": [case(nn.AdaptiveAvgPool2d((4, None))), case(nn.AdaptiveAvgPool2d(1))],
    "adaptive_avg_pool3d": [
        case(nn.AdaptiveAvgPool3d(1), (2, 3, 3, 5, 6)),
        case(lambda x: F.adaptive_avg_pool3d(x, (2, 3, 4)), (2, 3, 3, 5, 7)),
    ],
    "adaptive_max_pool1d": [case(nn.AdaptiveMaxPool1d(3), (2, 3, 10))],
    "adaptive_max_pool2d": [case(nn.AdaptiveMaxPool2d((2, 4)))],
    "adaptive_max_pool3d": [case(nn.AdaptiveMaxPool3d((1, 2, 3)), (2, 3, 3, 5, 6))],
    # --- padding ---
    "pad": [
        case(lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect")),
        case(lambda x: F.pad(x, (-1, 2, 0, -3), value=0.5)),
        case(lambda x: F.pad(x, (2, 1), mode="replicate"), (2, 3, 5)),
        case(lambda x: F.pad(x, (1, 2, 2, 1), mode="circular")),
        case(nn.ZeroPad2d((1, 0, 2, 1))),
        case(nn.ConstantPad1d(2, 3.5), (2, 3, 5)),
        case(nn.ReflectionPad2d(2)),
        case(nn.ReplicationPad3d(1), (2, 3, 2, 3, 4)),
    ],
    "pad_same": [case(create_pool2d("max", 3, 2, padding="same"), (2, 3, 7, 8))],
    # --- linear maps ---
    "conv1d": [
        case(nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
        case(
            WithTensors(
                lambda m, x: torch.conv1d(x, m.weight, None, 1, "same"), weight=_weight(4, 3, 3)
            ),
            (2, 3, 9),
        ),
    ],
    "conv2d": [
        case(nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, groups=3)),
        case(nn.Conv2d(3, 2, (3, 2), padding=1, padding_mode="reflect")),
        case(
            WithTensors(
                lambda m, x: F.conv2d(x, m.weight, m.bias, 2, 1),
                weight=_weight(4, 3, 3, 3),
                bias=_weight(4),
            )
        ),
    ],
    "conv3d": [
        case(nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1)), (2, 3, 3, 5, 6)),
        # a subclass that adds nothing: torchvision's video ResNets' own convolution
        case(torchvision.models.video.resnet.Conv3DSimple(3, 4, stride=2), (2, 3, 3, 5, 6)),
        case(
            WithTensors(
                lambda m, x: torch.conv3d(x, m.weight, padding=1), weight=_weight(2, 3, 3, 3, 3)
            ),
            (2, 3, 3, 5, 6),
        ),
    ],
    "conv_transpose1d": [
        case(nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), (2, 3, 7)),
    ],
    "conv_transpose2d": [
        case(nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, groups=3, dilation=2)),
        case(nn.ConvTranspose2d(3, 2, (2, 3), stride=(2, 1), output_padding=(1, 0), bias=False)),
        case(
            WithTensors(
                lambda m, x: F.conv_transpose2d(x, m.weight, m.bias, 2, 2, 1),
                weight=_weight(3, 4, 4, 4),
                bias=_weight(4),
            )
        ),
    ],
    "conv_transpose3d": [
        case(nn.ConvTranspose3d(3, 2, 2, stride=2), (2, 3, 2, 3, 4)),
    ],
    "conv2d_same": [
        case(create_conv2d(3, 4, 3, stride=2, padding="same"), (2, 3, 7, 8)),
        case(
            WithTensors(
                lambda m, x: conv2d_same(x, m.weight, None, (2, 2)), weight=_weight(4, 3, 3, 3)
            ),
            (2, 3, 7, 8),
        ),
    ],
    "linear": [
        case(nn.Linear(6, 4)),
        case(TimmLinear(6, 4, bias=False)),
        case(
            WithTensors(
                lambda m, x: F.linear(x, m.weight, m.bias), weight=_weight(4, 6), bias=_weight(4)
            )
        ),
    ],
    # --- normalisation ---
    "batch_norm": [
        case(nn.BatchNorm2d(3)),
        case(nn.BatchNorm2d(3, momentum=None), train=True),
        case(nn.BatchNorm1d(3), (4, 3), train=True),
        case(nn.BatchNorm3d(3, affine=False), (2, 3, 2, 3, 4), train=True),
        case(torchvision.ops.FrozenBatchNorm2d(3)),
        case(BatchNormAct2d(3, act_layer=nn.ReLU), train=True),
        case(
            WithTensors(
                lambda m, x: F.batch_norm(
                    x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, 1e-3
                ),
                running_mean=_weight(3),
                running_var=_positive(_weight(3)),
                weight=_weight(3),
                bias=_weight(3),
            )
        ),
        # weight standardisation (timm's StdConv2d): batch statistics, nothing tracked
        case(lambda x: F.batch_norm(x, None, None, training=True, momentum=0.0, eps=1e-6)),
    ],
    "layer_norm": [
        case(nn.LayerNorm(6)),
        case(nn.LayerNorm([5, 6], elementwise_affine=False)),
        case(nn.LayerNorm(6, bias=False)),
        case(
            WithTensors(lambda m, x: F.layer_norm(x, (6,), m.weight, None, 1e-3), weight=_weight(6))
        ),
        case(LayerNorm2d(3)),
    ],
    "group_norm": [
        case(nn.GroupNorm(3, 3)),
        case(nn.GroupNorm(2, 4, eps=1e-3), (2, 4, 5, 6)),
        case(nn.GroupNorm(1, 3, affine=False)),
        case(lambda x: F.group_norm(x, 3)),
    ],
    "rms_norm": [case(nn.RMSNorm(6)), case(lambda x: F.rms_norm(x, (5, 6), eps=1e-4))],
    "instance_norm": [
        case(nn.InstanceNorm2d(3)),
        case(nn.InstanceNorm1d(3, affine=True), (2, 3, 7)),
        case(lambda x: F.instance_norm(x, eps=1e-3)),
        # one unbatched sample: the module gives it a batch axis
        case(nn.InstanceNorm2d(3, affine=True), (3, 5, 6)),
        case(nn.InstanceNorm1d(3, affine=True), (3, 7)),
    ],
    "normalize": [
        case(lambda x: F.normalize(x, dim=1)),
        case(lambda x: F.normalize(x, p=1.0, dim=-1)),
        case(lambda x: F.normalize(x, p=1.0, dim=-1), WITH_ZEROS),
        case(lambda x: F.normalize(x, p=math.inf, dim=2)),
        # a zero vector: torch's gradient is 0, not NaN
        case(lambda x: F.normalize(x * (x.abs() > 0.5).float(), dim=0), (1, 3, 2)),
    ],
    # --- attention ---
    "scaled_dot_product_attention": [
        case(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            (2, 3, 4, 8),
            (2, 3, 6, 8),
            (2, 3, 6, 5),
        ),
        case(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3, is_causal=True),
            (2, 3, 4, 8),
            (2, 3, 6, 8),
            (2, 3, 6, 5),
        ),
        case(
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
            (2, 3, 4, 8),
            (2, 3, 6, 8),
            (2, 3, 6, 5),
            (4, 6),
        ),
        case(
            lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, torch.tril(torch.ones(4, 6, dtype=torch.bool), -1)
            ),
            (2, 3, 4, 8),
            (2, 3, 6, 8),
            (2, 3, 6, 5),
        ),
        case(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            (2, 4, 4, 8),
            (2, 2, 6, 8),
            (2, 2, 6, 5),
        ),
        case(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.0),
            (4, 8),
            (6, 8),
            (6, 5),
        ),
    ],
    # --- tensors ---
    "identity": [case(nn.Identity()), case(lambda x: x.contiguous() * 2)],
    "clone": [case(lambda x: x.clone() * torch.clone(x))],
    "detach": [case(lambda x: x.detach() * x)],
    "flatten": [
        case(lambda x: torch.flatten(x, 1)),
        case(nn.Flatten()),
        case(lambda x: x.flatten(2)),
    ],
    "unflatten": [case(lambda x: x.unflatten(1, (3, 1))), case(nn.Unflatten(-1, (2, 3)))],
    "reshape": [
        case(lambda x: x.view(2, -1)),
        case(lambda x: torch.reshape(x, (6, -1))),
        case(lambda x: x.reshape(x.size(0), 3, 30)),
    ],
    "reshape_as": [case(lambda x: x.reshape(6, 30).reshape_as(x) + x.flatten().view_as(x))],
    "transpose": [case(lambda x: x.transpose(1, 3)), case(lambda x: torch.swapaxes(x, 0, 2))],
    "permute": [
        case(lambda x: x.permute(0, 2, 3, 1)),
        case(lambda x: torch.permute(x, (3, 2, 1, 0))),
    ],
    "squeeze": [case(lambda x: x[:, :1].squeeze(1).squeeze(0) + torch.squeeze(x[:1, :1]))],
    "unsqueeze": [case(lambda x: x.unsqueeze(-1) + torch.unsqueeze(x, 1).permute(0, 2, 3, 4, 1))],
    "expand": [case(lambda x: x[:, :1].expand(-1, 4, -1, -1))],
    "expand_as": [case(lambda x: x[:, :1].expand_as(x))],
    "size": [case(lambda x: x.reshape(x.size(0) * x.size()[1], -1))],
    "dim": [case(lambda x: x.flatten(x.dim() - 2))],
    "numel": [case(lambda x: x.reshape(x.numel() // 6, 6))],
    "cat": [case(lambda x: torch.cat([x, x * 2], dim=1)), case(lambda x: torch.concat((x, x), -1))],
    "stack": [case(lambda x: torch.stack([x, -x], dim=2))],
    "split": [case(lambda x: torch.split(x, [2, 4], dim=3)[1] + x.split(4, dim=3)[0])],
    "chunk": [case(lambda x: torch.cat([x.chunk(2, dim=3)[1], x.chunk(4, 2)[2][..., :3]], 2))],
    "unbind": [case(lambda x: x.unbind(1)[2] + torch.unbind(x, 0)[1][0])],
    "mean": [case(lambda x: x.mean((2, 3), keepdim=True)), case(lambda x: torch.mean(x))],
    "sum": [case(lambda x: x.sum(1)), case(lambda x: torch.sum(x, dim=(0, 3)))],
    "amax": [case(lambda x: x.amax((2, 3))), case(lambda x: torch.amax(x, 1))],
    "amin": [case(lambda x: x.amin(-1, keepdim=True))],
    "max": [
        case(lambda x: x.max(dim=1).values * x.max(2, keepdim=True)[0].sum()),
        case(lambda x: torch.max(x)),
        case(lambda x, y: torch.max(x, y), X, X),
        case(lambda x: x.max(1)[1].float()[:, None] * x),
    ],
    "min": [
        case(lambda x: torch.min(x, 3).values + x.min()),
        case(lambda x: x.min(0).indices.float() + x),
    ],
    "sqrt": [case(lambda x: torch.sqrt(_positive(x)) * math.sqrt(x.shape[1]))],
    "rsqrt": [case(lambda x: _positive(x).rsqrt())],
    "exp": [case(torch.exp)],
    "log": [case(lambda x: torch.log(_positive(x)))],
    "abs": [
        case(lambda x: torch.abs(x) + x.abs()),
        case(torch.abs, WITH_ZEROS),  # torch's gradient at 0 is 0
    ],
    "clamp": [
        case(lambda x: torch.clamp(x, -0.5, 0.5)),
        case(lambda x: x.clamp(min=0.1)),
        case(lambda x: (x * 1).clamp_(max=0.2)),
        case(lambda x: torch.clip(x, x * 0 - 0.3, x * 0 + 0.4)),
    ],
    "clamp_min": [case(lambda x: x.clamp_min(0.1))],
    "clamp_max": [case(lambda x: torch.clamp_max(x, -0.1))],
    "to": [case(lambda x: x.to(torch.float32) + x.to(x))],
    "type_as": [case(lambda x: (x > 0).type_as(x) * x)],
    "float": [case(lambda x: (x > 0).float() * x)],
    "long": [case(lambda x: (x * 3).long() * x + (x * -3).int())],
    "roll": [
        case(lambda x: torch.roll(x, (1, -2), (2, 3)) * x.roll(3, -1)),
        case(lambda x: x.roll(4) + torch.roll(x, shifts=-1, dims=0)),
    ],
    "einsum": [
        case(lambda x: torch.einsum("bchw,bcgw->bhg", x, x * 2)),
        case(lambda x: torch.einsum("...ij,...kj->...ik", [x, x * 0.5 + 1])),
    ],
    "unfold": [
        case(nn.Unfold(2, dilation=(1, 2), padding=1, stride=(2, 1))),
        case(lambda x: F.unfold(x, 3)),
    ],
    "fold": [case(nn.Fold((5, 6), 2, padding=(0, 1), stride=(1, 2)), (2, 12, 16))],
    "norm": [
        case(lambda x: x.norm(dim=1)),
        case(lambda x: torch.norm(x, p=1, dim=(2, 3), keepdim=True) * x),
        case(lambda x: x.norm()),
        case(lambda x: torch.linalg.vector_norm(x, ord=math.inf, dim=-1)),
        case(lambda x: x.norm(dim=-1), WITH_ZEROS[:, :1]),  # torch's gradient at 0 is 0
    ],
    "var": [
        case(lambda x: x.var(1)),
        case(lambda x: torch.var(x, (2, 3), unbiased=False, keepdim=True)),
    ],
    "std": [case(lambda x: x.std(-1, correction=0)), case(lambda x: torch.std(x))],
    "cumsum": [case(lambda x: x.cumsum(2) + torch.cumsum(x, dim=-1))],
    "addcmul": [case(lambda x: torch.addcmul(x, x, x * 2, value=0.5) + (x * 1).addcmul_(x, x))],
    "zeros": [case(lambda x: x + torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3]))],
    "ones": [case(lambda x: x * torch.ones(x.shape[-2:], dtype=torch.float32))],
    "zeros_like": [case(lambda x: torch.zeros_like(x) + x), case(lambda x: (x * 1).zero_() + x)],
    "new_zeros": [case(lambda x: x + x.new_zeros(x.shape[-1]) + x.new_zeros((1, 1, 1)))],
    "new_ones": [case(lambda x: x * x.new_ones(x.shape[0], 1, 1, 1))],
    "masked_fill": [
        case(lambda x: x.masked_fill(x > 0.5, -100.0)),
        case(lambda x: torch.masked_fill(x, x[:1, :1] < 0, torch.tensor(2.0)) * 3),
        case(lambda x: (x * 1).masked_fill_(x.abs() < 0.3, 0) + x),
    ],
    "ones_like": [case(lambda x: torch.ones_like(x) * x)],
    "invert": [case(lambda x: x * (~(x > 0.5)).float())],
    "setitem": [case(WritesRows())],
    "sin": [case(torch.sin), case(lambda x: x.sin())],
    "cos": [case(lambda x: x.cos() * torch.cos(x))],
    "repeat": [
        case(lambda x: x.repeat(1, 2, 1, 3)),
        case(lambda x: x[0].repeat(2, 1, 1, 1)),
        case(lambda x: x.tile((2, 1))[..., 3:8, :] + torch.tile(x, (1, 1, 1, 2))[..., 4:10]),
    ],
    "repeat_interleave": [
        case(lambda x: x.repeat_interleave(2, dim=1) + torch.repeat_interleave(x, 2, 1)),
        case(lambda x: torch.repeat_interleave(x, 3)),
        case(lambda x: x.repeat_interleave(torch.tensor([1, 0, 2]), dim=1, output_size=3)),
    ],
    "arange": [
        case(
            lambda x: (
                x * torch.arange(x.shape[-1])
                + torch.arange(1, x.shape[2] + 1, dtype=torch.float32)[:, None]
            )
        ),
        case(lambda x: x + torch.arange(0.5, x.shape[-1], 1.5)[:4].sum()),
        case(lambda x: x * torch.arange(x.shape[-1], dtype=torch.long)),  # (JAX's int)
    ],
    "tensor": [
        case(lambda x: x / torch.sqrt(torch.tensor(x.shape[1])) + torch.as_tensor(x.shape[2] * 0.5))
    ],
    "meshgrid": [
        case(
            lambda x: (
                x
                * torch.stack(
                    torch.meshgrid(
                        torch.arange(x.shape[2]), torch.arange(x.shape[3]), indexing="ij"
                    )
                ).sum(0)
            )
        ),
        case(lambda x: x + torch.meshgrid(x[0, 0, :, 0], x[0, 0, 0, :], indexing="xy")[1].T),
        case(
            lambda x: x * torch.meshgrid([x[0, 0, :, 0], x[0, 0, 0, :]], indexing="ij")[0]
        ),  # (a list)
    ],
    "unfold_dim": [case(lambda x: x.unfold(2, 2, 2)), case(lambda x: x.unfold(-1, 3, 1))],
    # --- resizing ---
    "interpolate": [
        case(nn.Upsample(scale_factor=2, mode="bilinear")),
        case(
            lambda x: F.interpolate(x, size=(7, 4), mode="bicubic", align_corners=True),
            forward_mode=False,
        ),
        case(nn.UpsamplingNearest2d(scale_factor=3), forward_mode=False),
    ],
    "grid_sample": [
        sampled(lambda x, g: F.grid_sample(x, g, align_corners=True)),
        sampled(lambda x, g: F.grid_sample(x, g * 1.3, padding_mode="border", align_corners=False)),
        sampled(
            lambda x, g: F.grid_sample(x, g * 1.3, padding_mode="reflection", align_corners=True)
        ),
        sampled(
            lambda x, g: F.grid_sample(x, g * 2.5, padding_mode="reflection", align_corners=False)
        ),
        sampled(lambda x, g: F.grid_sample(x, g, mode="nearest", align_corners=False)),
    ],
    # --- Python operators and shapes ---
    "add": [case(lambda x: x + 1 + torch.add(x, x, alpha=2)), case(lambda x: (x * 1).add_(x))],
    "sub": [
        case(lambda x: 1 - x - torch.sub(x, x * x, alpha=0.5)),
        case(lambda x: (x * 1).sub_(2)),
    ],
    "mul": [case(lambda x: x * x * torch.mul(x, 3)), case(lambda x: (x * 1).mul_(x))],
    "div": [
        case(lambda x: x / _positive(x) + torch.div(x, 4)),
        case(
            lambda x: (
                torch.div(x * 10, 3, rounding_mode="floor") + x.div(2, rounding_mode="trunc") * x
            )
        ),
    ],
    # (torch has no derivative of floor_divide on tensors)
    "floordiv": [
        case(lambda x: x.reshape(x.shape[0] // 2, 2, 3, 5, 6).sum(0) + (x.detach() // 0.3) * x)
    ],
    "mod": [
        case(lambda x: x[:, :, : x.shape[2] % 3].sum(2, keepdim=True) + torch.remainder(x, 0.5))
    ],
    "neg": [case(lambda x: -x)],
    "pow": [case(lambda x: x**2 + torch.pow(_positive(x), 1.5))],
    "matmul": [
        case(lambda x: x @ x.transpose(-1, -2)),
        case(lambda x, y: torch.bmm(x, y), (3, 4, 5), (3, 5, 2)),
    ],
    "eq": [case(lambda x: x * (x == x).float())],
    "ne": [case(lambda x: x * (x != 0.5).float())],
    "lt": [case(lambda x: x * (x < 0.5).float())],
    "le": [case(lambda x: x * (x <= 0.5).float())],
    "gt": [case(lambda x: x * (x > 0.5).float())],
    "ge": [case(lambda x: x * (x >= 0.5).float())],
    "ceil": [
        case(lambda x: x.reshape(x.shape[0], math.ceil(x.shape[1] * x.shape[3] / 4), -1)),
        case(lambda x: torch.ceil(x) * x),
    ],
    "floor": [case(lambda x: x[:, : math.floor(x.shape[1] / 2)] + x.floor())],
    "getitem": [case(lambda x: x[:, 1:, None, ::2] * x[0, x.shape[1] - 1, ::2])],
    "getattr": [case(lambda x: x.reshape(x.shape[0], -1) * x.ndim)],
    "len": [case(lambda x: x.reshape(len(x.shape), -1) * len(x))],
    "guard": [
        case(lambda x: x * 2 if x.shape[2] % 2 else x),
        case(lambda x: sum(x[i] for i in range(x.shape[0]))),
        case(lambda x: torch.stack([t * 2 for t in x])),
        case(lambda x: x[..., : int(x.shape[2] * 0.5)]),  # int() of 2.5: 2
        case(lambda x: (lambda a, b: a - b)(*x.chunk(2))),  # unpacking: its length guarded
    ],
    "assert_": [case(lambda x: (torch._assert(x.shape[1] == 3, "three channels"), x * 2)[1])],
    "assert_is_none": [case(OptionalMask())],
}

# Entries without a case of their own, and why.
NO_CASE: dict[str, str] = {}


def all_cases() -> dict[str, tuple[str, Case]]:
    return {f"{name}[{i}]": (name, c) for name, cases in CASES.items() for i, c in enumerate(cases)}


def test_every_op_has_a_case():
    """A new registry entry needs a case here (or a reason in NO_CASE)."""
    entries = set(ops.ENTRIES)
    assert not (set(CASES) - entries), "cases for ops the registry lacks"
    assert not (set(NO_CASE) & set(CASES))
    missing = sorted(entries - set(CASES) - set(NO_CASE))
    assert not missing, f"registry entries without a case against torch: {missing}"


def test_every_spelling_names_something_installed():
    """torch 2.14, torchvision and timm are installed here: a spelling that resolves to
    nothing is a typo (or a name torch dropped)."""
    assert resolve().unresolved == ()


def _torch_run(model: nn.Module, inputs: tuple[np.ndarray, ...], train: bool) -> tuple[Any, ...]:
    """torch's outputs, their cotangents, the input gradients and a copy of the model holding
    its parameter gradients."""
    model.train(train)
    tensors = [torch.from_numpy(x.copy()) for x in inputs]
    floats = [t.requires_grad_() for t in tensors if t.is_floating_point()]
    y = model(*tensors)
    outputs = tuple(y) if isinstance(y, (tuple, list)) else (y,)
    cotangents = [_seeded(o, 1) for o in outputs]
    differentiated = [(o, g) for o, g in zip(outputs, cotangents, strict=True) if o.requires_grad]
    params = list(model.parameters())
    grads = torch.autograd.grad(
        [o for o, _ in differentiated],
        floats + params,
        [g for _, g in differentiated],
        allow_unused=True,
    )
    grads = [
        torch.zeros_like(t) if g is None else g for g, t in zip(grads, floats + params, strict=True)
    ]
    grad_model = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(grad_model.parameters(), grads[len(floats) :], strict=True):
            p.copy_(g)
    return outputs, cotangents, grads[: len(floats)], grad_model


def _seeded(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).standard_normal(tuple(t.shape)).astype(np.float32)
    ).to(t.dtype)


@pytest.mark.parametrize("name", fast_lane(*all_cases(), keep=20))
def test_op_matches_torch(name):
    entry, c = all_cases()[name]
    model, inputs = c.build()
    ported = jaxbn.port(copy.deepcopy(model), tuple(torch.from_numpy(x) for x in inputs))
    assert entry in ported.ops, f"the case calls {ported.ops}, not {entry}"
    outputs, cotangents, input_grads, grad_model = _torch_run(model, inputs, c.train)

    mutable = ["batch_stats"] if c.train else False
    floats = [i for i, x in enumerate(inputs) if np.issubdtype(x.dtype, np.floating)]

    def apply(variables: Any, *xs: Any) -> tuple[Any, ...]:
        full = list(inputs)
        for i, x in zip(floats, xs, strict=True):
            full[i] = x
        out = ported.module.apply(variables, *full, train=c.train, mutable=mutable)
        y = out[0] if c.train else out
        return tuple(y) if isinstance(y, (tuple, list)) else (y,)

    xs = tuple(jnp.asarray(inputs[i]) for i in floats)
    actual, vjp = jax.vjp(apply, ported.variables, *xs)
    assert len(actual) == len(outputs)
    for a, d in zip(actual, outputs, strict=True):
        assert a.shape == tuple(d.shape), name
        assert_close(a, d.detach(), what=f"{name} output")
    cotangent = tuple(
        jnp.asarray(g.numpy()) if a.dtype == jnp.float32 else np.zeros(a.shape, jax.dtypes.float0)
        for a, g in zip(actual, cotangents, strict=True)
    )
    variable_grads, *grads = vjp(cotangent)
    for i, (a, d) in enumerate(zip(grads, input_grads, strict=True)):
        assert_close(a, d, what=f"{name} input {i} gradient")
    if ported.variables.get("params"):
        desired = jaxbn.from_torch(grad_model, ported.variables)["params"]
        assert jax.tree.structure(variable_grads["params"]) == jax.tree.structure(desired)
        for a, d in zip(
            jax.tree.leaves(variable_grads["params"]), jax.tree.leaves(desired), strict=True
        ):
            assert_close(a, d, what=f"{name} parameter gradient")
    if c.forward_mode and not c.train:
        _forward_mode(model, inputs, floats, functools.partial(apply, ported.variables), name)


def _forward_mode(
    model: nn.Module,
    inputs: tuple[np.ndarray, ...],
    floats: list[int],
    apply: Callable[..., Any],
    name: str,
) -> None:
    tangents = [
        np.random.default_rng(2 + i).standard_normal(inputs[i].shape).astype(np.float32)
        for i in floats
    ]

    def torch_fn(*xs: torch.Tensor) -> Any:
        full = [torch.from_numpy(x.copy()) for x in inputs]
        for i, x in zip(floats, xs, strict=True):
            full[i] = x
        y = model.eval()(*full)
        return tuple(y) if isinstance(y, (tuple, list)) else (y,)

    with warnings.catch_warnings():
        # (torch's first forward-mode call scripts its decompositions: a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        _, desired = cast(Any, torch.func.jvp)(
            torch_fn,
            tuple(torch.from_numpy(inputs[i].copy()) for i in floats),
            tuple(torch.from_numpy(t) for t in tangents),
        )
    _, actual = jax.jvp(
        apply,
        tuple(jnp.asarray(inputs[i]) for i in floats),
        tuple(jnp.asarray(t) for t in tangents),
    )
    for a, d in zip(actual, desired, strict=True):
        if d.is_floating_point():
            assert_close(a, d, what=f"{name} forward-mode derivative")


# Train-time randomness: torch's and the port's masks cannot agree, so each is
# checked for what torch's is: the axes it is shared along, the rate, the scale.
RANDOM = {
    "dropout": (nn.Dropout(0.4), (64, 3, 4, 4)),
    "dropout functional": (Fn(lambda x: F.dropout(x, 0.4)), (64, 3, 4, 4)),
    "dropout1d": (nn.Dropout1d(0.4), (64, 3, 8)),
    "dropout2d": (nn.Dropout2d(0.4), (64, 3, 4, 4)),
    "dropout3d": (nn.Dropout3d(0.4), (64, 3, 2, 3, 4)),
    "stochastic_depth": (torchvision.ops.StochasticDepth(0.4, "row"), (256, 3, 4, 4)),
    "drop_path": (DropPath(0.4), (256, 3, 4, 4)),
}


def _shared_axes(kept: np.ndarray) -> set[int]:
    """The axes along which a mask does not vary."""
    return {a for a in range(kept.ndim) if (kept == kept.take([0], axis=a)).all()}


@pytest.mark.parametrize("name", fast_lane(*RANDOM))
def test_random_ops_in_a_training_step_drop_as_torch_does(name):
    model, shape = RANDOM[name]
    x = np.ones(shape, np.float32)
    ported = jaxbn.port(copy.deepcopy(model), torch.from_numpy(x))
    y = np.asarray(ported.module.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)}))
    torch.manual_seed(0)
    desired = model.train()(torch.from_numpy(x)).numpy()
    for out in (y, desired):
        assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.6)}, name
    assert _shared_axes(y != 0) == _shared_axes(desired != 0), name
    kept = (y != 0).mean()
    draws = (y != 0).size / np.prod([shape[a] for a in _shared_axes(y != 0)])
    assert abs(kept - 0.6) < 4 * math.sqrt(0.24 / draws), (name, kept, draws)
    again = ported.module.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(y, np.asarray(again))


def test_attention_dropout_follows_the_train_flag():
    """q = k = 0 attends uniformly; with v = 1 each output is the kept share of the 64
    weights, scaled by 1 / (1 - p): a multiple of 1 / (64 * 0.6), 1 on average."""
    model = Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.4))
    q, v = np.zeros((8, 64, 4), np.float32), np.ones((8, 64, 4), np.float32)
    ported = jaxbn.port(model, (torch.from_numpy(q), torch.from_numpy(q), torch.from_numpy(v)))
    eval_output = cast(jax.Array, ported.module.apply({}, q, q, v, train=False))
    np.testing.assert_allclose(eval_output, v, rtol=1e-6)
    y = np.asarray(
        ported.module.apply({}, q, q, v, train=True, rngs={"dropout": jax.random.key(0)})
    )
    desired = model(*(torch.from_numpy(a) for a in (q, q, v))).numpy()  # torch drops, always
    for out in (y, desired):
        steps = out * 64 * 0.6
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
        assert abs(out.mean() - 1) < 0.05
