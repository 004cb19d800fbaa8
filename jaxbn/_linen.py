"""flax.linen BatchNorm layers with PyTorch's semantics.

The modules only declare variables and call :func:`jaxbn.batch_norm`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from ._functional import LIBRARIES, BatchStats, batch_norm
from ._layers import calling, channel_axis, check_momentum, finish, normalize

Initializer = Any


class _BatchNormBase(nn.Module):
    """Fields and ``__call__`` shared by every jaxbn linen BatchNorm."""

    num_features: int | None = None
    use_running_average: bool | None = None
    momentum: float | None = 0.1
    eps: float = 1e-5
    affine: bool = True
    use_bias: bool = True
    track_running_stats: bool = True
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros
    axis_name: str | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None

    layer: ClassVar[str]  # the PyTorch layer it mirrors, a key of _layers.LAYOUTS
    # A model that wraps the layer may switch it with its own flag, as a ported one does.
    eval_hint: ClassVar[str] = "use_running_average=True (train=False on a jaxbn.port model)"
    channels_last_fix: ClassVar[str] = "use jaxbn.BatchNorm(axis=-1)"

    def __post_init__(self) -> None:
        super().__post_init__()
        # The momentum is checked where user code builds the layer, not in each
        # training step. Not where a library does: Flax's clones inside init and
        # apply were checked as their original, and jaxbn.port's layers carry the
        # torch model's own value, which is torch's convention by construction.
        if self.track_running_stats and _builder(self) not in LIBRARIES:
            check_momentum(self.momentum)

    def _channel_axis(self, x: jax.Array) -> int:
        return channel_axis(self.layer, x, 1, self.channels_last_fix)

    @nn.compact
    def __call__(
        self,
        x: ArrayLike,
        use_running_average: bool | None = None,
        *,
        mask: ArrayLike | None = None,
    ) -> jax.Array:
        """Normalises ``x``; updates ``batch_stats`` in a training step.

        Args:
          x: the input.
          use_running_average: True for eval (normalise with the running
            statistics), False for a training step. Give it here or as the
            constructor field, not both. May be omitted when
            ``track_running_stats=False``, where batch statistics are always
            used.
          mask: boolean, broadcastable to ``x``: the valid elements (see
            :func:`jaxbn.batch_norm`).

        Returns:
          The normalised input, in ``dtype`` if set, else in ``x``'s dtype.
        """
        x = jnp.asarray(x)
        training = self._training(use_running_average)
        axis = self._channel_axis(x)
        features = x.shape[axis] if self.num_features is None else self.num_features

        def param(name: str, init: Initializer) -> jax.Array:
            # Loaded parameters keep their shape, so that batch_norm (not
            # Flax's shape check) reports a channel mismatch, as PyTorch does.
            shape = (features,)
            if self.has_variable("params", name):
                shape = jnp.shape(self.get_variable("params", name))
            return self.param(name, init, shape, self.param_dtype)

        scale = bias = None
        if self.affine:
            scale = param("scale", self.scale_init)
            if self.use_bias:
                bias = param("bias", self.bias_init)

        initial = BatchStats.create(features, self.param_dtype)
        variables = {}
        if self.track_running_stats:
            variables = {
                name: self.variable("batch_stats", name, lambda v=value: v)
                for name, value in initial._asdict().items()
            }

        if self.is_initializing():
            # Initialisation is not a training step: nothing is counted or
            # reduced across devices, and a tracked layer normalises with its
            # initial statistics (so a single example is fine).
            stats = initial if self.track_running_stats else None
            with calling(self):
                y, _ = batch_norm(
                    x, stats, scale, bias, training=False, eps=self.eps, axis=axis, mask=mask
                )
        else:
            stats = None
            if variables:
                stats = BatchStats(**{name: v.value for name, v in variables.items()})
            if training and stats is not None and not self.is_mutable_collection("batch_stats"):
                where = f" at '{'/'.join(self.path)}'" if self.path else ""
                raise ValueError(
                    f"{type(self).__name__}{where} is in a training step "
                    "(use_running_average=False; train=True on a jaxbn.port model) and "
                    "updates its running statistics, but 'batch_stats' is not mutable. "
                    "Pass mutable=['batch_stats'] to apply and keep the returned "
                    "statistics, or run in eval: use_running_average=True on the layer, "
                    "train=False on a jaxbn.port model."
                )
            y, new_stats = normalize(
                self, x, axis, stats, scale, bias, training=training, mask=mask
            )
            if training and new_stats is not None:
                for name, value in new_stats._asdict().items():
                    variables[name].value = value
        return finish(self, self.layer, x, axis, y)

    def _training(self, use_running_average: bool | None) -> bool:
        given = (self.use_running_average, use_running_average)
        if None not in given:
            raise ValueError(
                f"{type(self).__name__} got use_running_average both as a field "
                f"({self.use_running_average}) and as a call argument "
                f"({use_running_average}); give it in one place only."
            )
        if given == (None, None):
            if not self.track_running_stats:
                return True
            raise ValueError(
                f"{type(self).__name__} needs use_running_average: pass "
                "use_running_average=False for a training step or True for "
                "eval, as a constructor field or a call argument."
            )
        return not next(v for v in given if v is not None)


class BatchNorm(_BatchNormBase):
    """PyTorch-exact BatchNorm over any channel axis (Flax's default, -1).

    Same semantics as ``torch.nn.BatchNorm{1,2,3}d`` applied to the input
    with its channel axis moved to 1: ``momentum`` is the weight of the new
    batch (``None`` = cumulative average), ``batch_stats['var']`` is the
    *unbiased* running variance, ``num_batches_tracked`` counts training
    steps.

    Attributes:
      num_features: expected channel count C; None takes it from the input.
      use_running_average: True for eval, False for training; may instead
        be given at call time.
      momentum: weight of the new batch (PyTorch's convention; Flax's
        ``momentum=0.99`` is ``0.01`` here). None = cumulative average.
      eps: added to the variance before the square root.
      affine: learn ``scale`` (and ``bias``); False = no parameters.
      use_bias: with ``affine``, learn ``bias`` (PyTorch's ``bias``).
      track_running_stats: keep ``batch_stats``; False = no running
        statistics, batch statistics in training and eval alike.
      dtype: output dtype; None = the input's dtype, as in PyTorch.
      param_dtype: dtype of ``params`` and ``batch_stats``.
      scale_init, bias_init: initialisers (PyTorch: ones and zeros).
      axis_name, axis_index_groups: cross-device statistics, as in
        :func:`jaxbn.batch_norm`.
      axis: the channel axis.

    >>> layer = jaxbn.BatchNorm(use_running_average=False)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'num_batches_tracked': (), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> y, updates = layer.apply(variables, jnp.ones((4, 3)), mutable=["batch_stats"])
    >>> updates["batch_stats"]["num_batches_tracked"]
    Array(1, dtype=int32)
    """

    axis: int = -1
    layer = "BatchNorm"
    channels_last_fix = "pass axis=-1"

    def _channel_axis(self, x: jax.Array) -> int:
        return channel_axis(self.layer, x, self.axis, self.channels_last_fix)


class BatchNorm1d(_BatchNormBase):
    """``torch.nn.BatchNorm1d``: input (N, C) or (N, C, L), channel axis 1.

    Fields as :class:`BatchNorm`, without ``axis``.

    >>> layer = jaxbn.BatchNorm1d(3, momentum=None, use_running_average=False)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((4, 3, 5)))
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'num_batches_tracked': (), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    """

    layer = "BatchNorm1d"


class BatchNorm2d(_BatchNormBase):
    """``torch.nn.BatchNorm2d``: input (N, C, H, W), channel axis 1.

    Fields as :class:`BatchNorm`, without ``axis``.

    >>> layer = jaxbn.BatchNorm2d(3, affine=False, use_running_average=True)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3, 4, 4)))
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'num_batches_tracked': (), 'var': (3,)}}
    """

    layer = "BatchNorm2d"


class BatchNorm3d(_BatchNormBase):
    """``torch.nn.BatchNorm3d``: input (N, C, D, H, W), channel axis 1.

    Fields as :class:`BatchNorm`, without ``axis``.

    >>> layer = jaxbn.BatchNorm3d(3, track_running_stats=False)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 3, 2, 2, 2)))
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (3,), 'scale': (3,)}}
    """

    layer = "BatchNorm3d"


def _builder(module: nn.Module) -> str:
    """The top-level package whose code constructs ``module``: 'flax' for Flax's clones."""
    frame = sys._getframe(2)
    # Skip the frames of the construction itself (__init__, __post_init__, wrappers).
    while frame is not None and frame.f_locals.get("self") is module:
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "").partition(".")[0]
