"""``torchvision.ops.FrozenBatchNorm2d`` as a flax.linen module."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from ._layers import channel_axis, check_num_features


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, as torchvision's.

    The detection backbones' normalisation: the running statistics are used
    in training and eval alike and never updated, and none of the four
    tensors is trained. With torchvision's arithmetic, on (N, C, H, W) input::

        scale = weight * rsqrt(running_var + eps)
        bias = bias - running_mean * scale
        y = x * scale + bias

    (``rsqrt`` as ``1 / sqrt``: bit-identical to torch's CPU result.)

    All four live in ``batch_stats`` (torch registers them as buffers), so
    an optimizer over ``params`` never touches them; there is no
    ``num_batches_tracked``. The output dtype is the promotion of the
    input's and the statistics' dtypes, as in torch.

    Attributes:
      num_features: expected channel count C; None takes it from the input.
      eps: added to the variance before the square root.
      param_dtype: dtype of the statistics created by ``init``.

    >>> layer = jaxbn.FrozenBatchNorm2d(3)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3, 4, 4)))
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'bias': (3,), 'mean': (3,), 'scale': (3,), 'var': (3,)}}
    """

    num_features: int | None = None
    eps: float = 1e-5
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: ArrayLike) -> jax.Array:
        x = jnp.asarray(x)
        axis = channel_axis("BatchNorm2d", x, 1)
        check_num_features("FrozenBatchNorm2d", self.num_features, x, axis)
        features = x.shape[axis]

        def stat(name: str, init: float) -> jax.Array:
            return self.variable(
                "batch_stats", name, lambda: jnp.full((features,), init, self.param_dtype)
            ).value

        weight, bias = stat("scale", 1.0), stat("bias", 0.0)
        mean, var = stat("mean", 0.0), stat("var", 1.0)
        dtype = jnp.promote_types(x.dtype, weight.dtype)
        shape = (1, -1, 1, 1)
        weight, bias, mean, var = (
            a.astype(dtype).reshape(shape) for a in (weight, bias, mean, var)
        )
        scale = weight * (1 / jnp.sqrt(var + jnp.asarray(self.eps, dtype)))
        shift = bias - mean * scale
        return x.astype(dtype) * scale + shift
