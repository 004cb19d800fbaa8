"""What the linen and NNX layers share: PyTorch's layer checks, and synchronisation.

Depends on jax only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import jax
from jax.typing import ArrayLike, DTypeLike

from ._functional import EVAL_HINT, BatchStats, _check_momentum, batch_norm, check_axis


class Layout(NamedTuple):
    """A PyTorch layer's accepted ranks and the layout it names in errors."""

    ranks: tuple[int, ...]
    description: str


# None: a channel axis of the user's choosing (jaxbn.BatchNorm).
LAYOUTS: dict[str, Layout | None] = {
    "BatchNorm": None,
    "BatchNorm1d": Layout((2, 3), "(N, C) or (N, C, L)"),
    "BatchNorm2d": Layout((4,), "(N, C, H, W)"),
    "BatchNorm3d": Layout((5,), "(N, C, D, H, W)"),
}


def channel_axis(layer: str, x: jax.Array, axis: int) -> int:
    """The channel axis of ``x`` for ``layer``, with PyTorch's rank check."""
    layout = LAYOUTS[layer]
    if layout is None:
        return check_axis(x, axis)
    if x.ndim not in layout.ranks:
        expected = " or ".join(f"{rank}D" for rank in layout.ranks)
        raise ValueError(
            f"expected {expected} input (got {x.ndim}D input): {layer} expects "
            f"{layout.description}, got shape {tuple(x.shape)}. For channels-last "
            "data use jaxbn.BatchNorm(axis=-1)."
        )
    return 1


def check_num_features(layer: str, num_features: int | None, x: jax.Array, axis: int) -> None:
    """``num_features``, when given, must be the input's channel count."""
    # (x.size may be symbolic under jax.export: compare, never take its truth value.)
    if x.size != 0 and num_features not in (None, x.shape[axis]):
        raise RuntimeError(
            f"{layer}(num_features={num_features}) got an input of shape "
            f"{tuple(x.shape)} with {x.shape[axis]} channels on axis {axis}. Build "
            f"the layer with num_features={x.shape[axis]}, or check the input's layout."
        )


class Sync(NamedTuple):
    axis_name: str | None = None
    axis_index_groups: Sequence[Sequence[int]] | None = None


_SYNC: contextvars.ContextVar[Sync] = contextvars.ContextVar("jaxbn_sync", default=Sync())  # noqa: B039 (immutable)


@contextlib.contextmanager
def synchronized(
    axis_name: str, axis_index_groups: Sequence[Sequence[int]] | None = None
) -> Iterator[None]:
    """Every jaxbn layer called inside combines its batch statistics over ``axis_name``.

    The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``:
    instead of rebuilding the model, trace it inside this context (within
    ``shard_map``/``pmap``/``vmap`` where ``axis_name`` is bound). Layers
    with their own ``axis_name`` keep it.

    >>> x = jnp.arange(12.0).reshape(4, 3)  # two devices' batches of (2, 3)
    >>> def shard(x):
    ...     with jaxbn.synchronized("batch"):
    ...         return jaxbn.BatchNorm1d(affine=False, track_running_stats=False).apply({}, x)
    >>> y = jax.vmap(shard, axis_name="batch")(x.reshape(2, 2, 3))
    >>> bool(jnp.allclose(y.reshape(4, 3), jaxbn.batch_norm(x, None, training=True, axis=1)[0]))
    True
    """
    token = _SYNC.set(Sync(axis_name, axis_index_groups))
    try:
        yield
    finally:
        _SYNC.reset(token)


def resolve_sync(axis_name: str | None, axis_index_groups: Sequence[Sequence[int]] | None) -> Sync:
    """A layer's own axis_name if set, else the one of :func:`synchronized`."""
    if axis_name is not None:
        return Sync(axis_name, axis_index_groups)
    return _SYNC.get()


class Settings(Protocol):
    """The fields every jaxbn layer has, linen or NNX (read here, never written)."""

    @property
    def num_features(self) -> int | None: ...
    @property
    def momentum(self) -> float | None: ...
    @property
    def eps(self) -> float: ...
    @property
    def dtype(self) -> DTypeLike | None: ...
    @property
    def axis_name(self) -> str | None: ...
    @property
    def axis_index_groups(self) -> Sequence[Sequence[int]] | None: ...

    eval_hint: ClassVar[str]  # how this API selects eval, e.g. "use_running_average=True"


def check_momentum(momentum: float | None) -> None:
    """At a layer's initialisation: warn about a Flax-looking or out-of-range momentum.

    The warning points at the user's line that builds or initialises the
    layer, not at jaxbn, so that it comes before any training step.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     check_momentum(1.5)
    >>> str(caught[0].message).split(". ")[0]
    'momentum=1.5 is outside [0, 1]'
    """
    _check_momentum(momentum)


def normalize(
    settings: Settings,
    x: jax.Array,
    axis: int,
    stats: BatchStats | None,
    scale: Any,
    bias: Any,
    *,
    training: bool,
    mask: ArrayLike | None,
) -> tuple[jax.Array, BatchStats | None]:
    """One call of a layer: :func:`jaxbn.batch_norm` with the layer's settings."""
    sync = resolve_sync(settings.axis_name, settings.axis_index_groups)
    token = EVAL_HINT.set(settings.eval_hint)  # the core's errors name this API's argument
    try:
        return batch_norm(
            x,
            stats,
            scale,
            bias,
            training=training,
            momentum=settings.momentum,
            eps=settings.eps,
            axis=axis,
            axis_name=sync.axis_name,
            axis_index_groups=sync.axis_index_groups,
            mask=mask,
        )
    finally:
        EVAL_HINT.reset(token)


def finish(settings: Settings, layer: str, x: jax.Array, axis: int, y: jax.Array) -> jax.Array:
    """The layer's output: ``num_features`` checked, cast to ``dtype`` if set."""
    check_num_features(layer, settings.num_features, x, axis)
    return y if settings.dtype is None else y.astype(settings.dtype)
