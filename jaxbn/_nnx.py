"""flax.nnx BatchNorm layers with PyTorch's semantics.

The same computation as the linen layers (:func:`jaxbn.batch_norm`), held
NNX's way: ``nnx.Param`` scale and bias, ``nnx.BatchStat`` mean, var and
num_batches_tracked, and ``model.train()`` / ``model.eval()`` to switch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from ._functional import BatchStats
from ._layers import channel_axis, check_momentum, finish, normalize

Initializer = Any
_STATS = ("mean", "var", "num_batches_tracked")


class _BatchNormBase(nnx.Module):
    """Construction and ``__call__`` shared by every jaxbn NNX BatchNorm."""

    layer: ClassVar[str]
    eval_hint: ClassVar[str] = "model.eval() (or use_running_average=True)"
    channels_last_fix: ClassVar[str] = "use jaxbn.nnx.BatchNorm(num_features, axis=-1)"
    num_features: int
    momentum: float | None
    eps: float
    dtype: DTypeLike | None
    axis_name: str | None
    axis_index_groups: Sequence[Sequence[int]] | None

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        use_bias: bool = True,
        track_running_stats: bool = True,
        use_running_average: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        scale_init: Initializer = nnx.initializers.ones,
        bias_init: Initializer = nnx.initializers.zeros,
        axis_name: str | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        key = rngs.params() if rngs is not None else jax.random.key(0)
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(key, shape, param_dtype)) if affine else nnx.data(None)
        self.bias = (
            nnx.Param(bias_init(key, shape, param_dtype)) if affine and use_bias else nnx.data(None)
        )
        if track_running_stats:
            check_momentum(momentum)
            initial = BatchStats.create(num_features, param_dtype)
            self.mean = nnx.BatchStat(initial.mean)
            self.var = nnx.BatchStat(initial.var)
            self.num_batches_tracked = nnx.BatchStat(initial.num_batches_tracked)
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps
        self.track_running_stats = track_running_stats
        self.use_running_average = use_running_average
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups

    def _channel_axis(self, x: jax.Array) -> int:
        return channel_axis(self.layer, x, 1, self.channels_last_fix)

    def __call__(
        self,
        x: ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: ArrayLike | None = None,
    ) -> jax.Array:
        """Normalises ``x``; updates the running statistics in a training step.

        Args:
          x: the input.
          use_running_average: overrides the attribute (which
            ``model.eval()`` sets to True and ``model.train()`` to False).
          mask: boolean, broadcastable to ``x``: the valid elements (see
            :func:`jaxbn.batch_norm`).
        """
        x = jnp.asarray(x)
        if use_running_average is None:
            use_running_average = self.use_running_average
        axis = self._channel_axis(x)
        stats = None
        if self.track_running_stats:
            stats = BatchStats(*(getattr(self, name)[...] for name in _STATS))
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        training = not use_running_average
        y, new_stats = normalize(self, x, axis, stats, scale, bias, training=training, mask=mask)
        if training and new_stats is not None:
            for name, value in new_stats._asdict().items():
                getattr(self, name)[...] = value
        return finish(self, self.layer, x, axis, y)


class BatchNorm(_BatchNormBase):
    """PyTorch-exact BatchNorm over any channel axis, as an NNX module.

    Arguments as :class:`jaxbn.BatchNorm` (the linen module), plus ``rngs``
    for custom initialisers. Bit-equal to the linen module on the same
    inputs and parameters.

    >>> layer = jaxbn.nnx.BatchNorm(3)
    >>> y = layer(jnp.arange(12.0).reshape(4, 3))  # a training step
    >>> int(layer.num_batches_tracked[...]), layer.var[...]
    (1, Array([2.4, 2.4, 2.4], dtype=float32))
    >>> layer.eval()  # use_running_average=True from now on
    """

    layer = "BatchNorm"
    channels_last_fix = "pass axis=-1"

    def __init__(self, num_features: int, *, axis: int = -1, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.axis = axis

    def _channel_axis(self, x: jax.Array) -> int:
        return channel_axis(self.layer, x, self.axis, self.channels_last_fix)


class BatchNorm1d(_BatchNormBase):
    """``torch.nn.BatchNorm1d`` as an NNX module: (N, C) or (N, C, L)."""

    layer = "BatchNorm1d"


class BatchNorm2d(_BatchNormBase):
    """``torch.nn.BatchNorm2d`` as an NNX module: (N, C, H, W).

    >>> model = jaxbn.nnx.BatchNorm2d(8)
    >>> jax.tree.map(jnp.shape, jaxbn.nnx.variables(model))
    {'batch_stats': {'mean': (8,), 'num_batches_tracked': (), 'var': (8,)}, 'params': {'bias': (8,), 'scale': (8,)}}
    """

    layer = "BatchNorm2d"


class BatchNorm3d(_BatchNormBase):
    """``torch.nn.BatchNorm3d`` as an NNX module: (N, C, D, H, W)."""

    layer = "BatchNorm3d"


_COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def variables(model: nnx.Module) -> dict[str, Any]:
    """An NNX model's state as the linen-style tree the converters use.

    ``{'params': ..., 'batch_stats': ...}``, keyed by attribute path, so that
    :func:`jaxbn.from_torch` and :func:`jaxbn.to_torch` work on NNX models.
    """
    tree = {}
    for collection, kind in _COLLECTIONS.items():
        state = nnx.to_pure_dict(nnx.state(model, kind))
        if state:
            tree[collection] = state
    return tree


def update(model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Load a linen-style variable tree (e.g. from :func:`jaxbn.from_torch`) into ``model``."""
    unknown = set(variables) - set(_COLLECTIONS)
    if unknown:
        raise ValueError(
            f"unknown collections {sorted(unknown)}; an NNX model takes {sorted(_COLLECTIONS)}"
        )
    for collection, values in variables.items():
        state = nnx.state(model, _COLLECTIONS[collection])
        nnx.replace_by_pure_dict(state, values)
        nnx.update(model, state)
