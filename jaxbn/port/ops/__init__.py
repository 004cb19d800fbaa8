"""Every op a port can call, by the name of torch's functional form: ``ops.relu(x)``,
``ops.max_pool2d(x, 3, 2, 1)``, ``ops.layer_norm(x, (64,), weight, bias)``.

Each is a JAX function with the arguments of its torch twin (names, defaults,
semantics, gradients), and is registered under every torch spelling of it
(module class, ``torch.nn.functional``, ``torch.``, tensor method, in place);
:data:`ENTRIES` lists them, grouped by family. Importing this package needs jax
only, not torch.
"""

from ._activations import elu as elu
from ._activations import gelu as gelu
from ._activations import hard_mish as hard_mish
from ._activations import hardsigmoid as hardsigmoid
from ._activations import hardswish as hardswish
from ._activations import hardtanh as hardtanh
from ._activations import leaky_relu as leaky_relu
from ._activations import log_softmax as log_softmax
from ._activations import mish as mish
from ._activations import prelu as prelu
from ._activations import quick_gelu as quick_gelu
from ._activations import relu as relu
from ._activations import relu6 as relu6
from ._activations import sigmoid as sigmoid
from ._activations import silu as silu
from ._activations import softmax as softmax
from ._activations import softplus as softplus
from ._activations import softsign as softsign
from ._activations import tanh as tanh
from ._attention import scaled_dot_product_attention as scaled_dot_product_attention
from ._linear import conv1d as conv1d
from ._linear import conv2d as conv2d
from ._linear import conv2d_same as conv2d_same
from ._linear import conv3d as conv3d
from ._linear import conv_transpose1d as conv_transpose1d
from ._linear import conv_transpose2d as conv_transpose2d
from ._linear import conv_transpose3d as conv_transpose3d
from ._linear import einsum as einsum
from ._linear import linear as linear
from ._normalization import batch_norm as batch_norm
from ._normalization import group_norm as group_norm
from ._normalization import instance_norm as instance_norm
from ._normalization import layer_norm as layer_norm
from ._normalization import normalize as normalize
from ._normalization import rms_norm as rms_norm
from ._padding import pad as pad
from ._padding import pad_same as pad_same
from ._pooling import adaptive_avg_pool1d as adaptive_avg_pool1d
from ._pooling import adaptive_avg_pool2d as adaptive_avg_pool2d
from ._pooling import adaptive_avg_pool3d as adaptive_avg_pool3d
from ._pooling import adaptive_max_pool1d as adaptive_max_pool1d
from ._pooling import adaptive_max_pool2d as adaptive_max_pool2d
from ._pooling import adaptive_max_pool3d as adaptive_max_pool3d
from ._pooling import avg_pool1d as avg_pool1d
from ._pooling import avg_pool2d as avg_pool2d
from ._pooling import avg_pool3d as avg_pool3d
from ._pooling import max_pool1d as max_pool1d
from ._pooling import max_pool2d as max_pool2d
from ._pooling import max_pool3d as max_pool3d
from ._python import add as add
from ._python import assert_ as assert_
from ._python import assert_is_none as assert_is_none
from ._python import ceil as ceil
from ._python import div as div
from ._python import eq as eq
from ._python import floor as floor
from ._python import floordiv as floordiv
from ._python import ge as ge
from ._python import get_attribute as getattr
from ._python import getitem as getitem
from ._python import gt as gt
from ._python import guard as guard
from ._python import invert as invert
from ._python import le as le
from ._python import length as len
from ._python import lt as lt
from ._python import matmul as matmul
from ._python import mod as mod
from ._python import mul as mul
from ._python import ne as ne
from ._python import neg as neg
from ._python import pow as pow
from ._python import setitem as setitem
from ._python import sub as sub
from ._random import drop_path as drop_path
from ._random import dropout as dropout
from ._random import dropout1d as dropout1d
from ._random import dropout2d as dropout2d
from ._random import dropout3d as dropout3d
from ._random import stochastic_depth as stochastic_depth
from ._registry import ENTRIES as ENTRIES
from ._registry import Entry as Entry
from ._resizing import grid_sample as grid_sample
from ._resizing import interpolate as interpolate
from ._tensors import abs_of as abs
from ._tensors import addcmul as addcmul
from ._tensors import amax as amax
from ._tensors import amin as amin
from ._tensors import arange as arange
from ._tensors import cat as cat
from ._tensors import chunk as chunk
from ._tensors import clamp as clamp
from ._tensors import clamp_max as clamp_max
from ._tensors import clamp_min as clamp_min
from ._tensors import clone as clone
from ._tensors import cos as cos
from ._tensors import cumsum as cumsum
from ._tensors import detach as detach
from ._tensors import dim as dim
from ._tensors import exp as exp
from ._tensors import expand as expand
from ._tensors import expand_as as expand_as
from ._tensors import flatten as flatten
from ._tensors import fold as fold
from ._tensors import identity as identity
from ._tensors import log as log
from ._tensors import masked_fill as masked_fill
from ._tensors import max_of as max
from ._tensors import mean as mean
from ._tensors import meshgrid as meshgrid
from ._tensors import min_of as min
from ._tensors import new_ones as new_ones
from ._tensors import new_zeros as new_zeros
from ._tensors import norm as norm
from ._tensors import numel as numel
from ._tensors import ones as ones
from ._tensors import ones_like as ones_like
from ._tensors import permute as permute
from ._tensors import repeat as repeat
from ._tensors import repeat_interleave as repeat_interleave
from ._tensors import reshape as reshape
from ._tensors import reshape_as as reshape_as
from ._tensors import roll as roll
from ._tensors import rsqrt as rsqrt
from ._tensors import sin as sin
from ._tensors import size as size
from ._tensors import split as split
from ._tensors import sqrt as sqrt
from ._tensors import squeeze as squeeze
from ._tensors import stack as stack
from ._tensors import std as std
from ._tensors import sum_of as sum
from ._tensors import tensor as tensor
from ._tensors import to as to
from ._tensors import to_float as float
from ._tensors import to_int as long
from ._tensors import transpose as transpose
from ._tensors import type_as as type_as
from ._tensors import unbind as unbind
from ._tensors import unflatten as unflatten
from ._tensors import unfold as unfold
from ._tensors import unfold_dim as unfold_dim
from ._tensors import unsqueeze as unsqueeze
from ._tensors import var as var
from ._tensors import zeros as zeros
from ._tensors import zeros_like as zeros_like

__all__ = [
    "ENTRIES",
    "Entry",
    "abs",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "add",
    "addcmul",
    "amax",
    "amin",
    "arange",
    "assert_",
    "assert_is_none",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "batch_norm",
    "cat",
    "ceil",
    "chunk",
    "clamp",
    "clamp_max",
    "clamp_min",
    "clone",
    "conv1d",
    "conv2d",
    "conv2d_same",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "cos",
    "cumsum",
    "detach",
    "dim",
    "div",
    "drop_path",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "einsum",
    "elu",
    "eq",
    "exp",
    "expand",
    "expand_as",
    "flatten",
    "float",
    "floor",
    "floordiv",
    "fold",
    "ge",
    "gelu",
    "getattr",
    "getitem",
    "grid_sample",
    "group_norm",
    "gt",
    "guard",
    "hard_mish",
    "hardsigmoid",
    "hardswish",
    "hardtanh",
    "identity",
    "instance_norm",
    "interpolate",
    "invert",
    "layer_norm",
    "le",
    "leaky_relu",
    "len",
    "linear",
    "log",
    "log_softmax",
    "long",
    "lt",
    "masked_fill",
    "matmul",
    "max",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "mean",
    "meshgrid",
    "min",
    "mish",
    "mod",
    "mul",
    "ne",
    "neg",
    "new_ones",
    "new_zeros",
    "norm",
    "normalize",
    "numel",
    "ones",
    "ones_like",
    "pad",
    "pad_same",
    "permute",
    "pow",
    "prelu",
    "quick_gelu",
    "relu",
    "relu6",
    "repeat",
    "repeat_interleave",
    "reshape",
    "reshape_as",
    "rms_norm",
    "roll",
    "rsqrt",
    "scaled_dot_product_attention",
    "setitem",
    "sigmoid",
    "silu",
    "sin",
    "size",
    "softmax",
    "softplus",
    "softsign",
    "split",
    "sqrt",
    "squeeze",
    "stack",
    "std",
    "stochastic_depth",
    "sub",
    "sum",
    "tanh",
    "tensor",
    "to",
    "transpose",
    "type_as",
    "unbind",
    "unflatten",
    "unfold",
    "unfold_dim",
    "unsqueeze",
    "var",
    "zeros",
    "zeros_like",
]
