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

from ._functional import (
    CALLER,
    BatchStats,
    Caller,
    _check_momentum,
    batch_norm,
    channels_last_hint,
    check_axis,
)


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


def channel_axis(layer: str, x: jax.Array, axis: int, channels_last_fix: str | None = None) -> int:
    """The channel axis of ``x`` for ``layer``, with PyTorch's rank check.

    ``channels_last_fix`` is how the calling API takes channels-last input
    (e.g. "use jaxbn.BatchNorm(axis=-1)"), named in the error; None: it has none.
    """
    layout = LAYOUTS[layer]
    if layout is None:
        return check_axis(x, axis)
    if x.ndim not in layout.ranks:
        expected = " or ".join(f"{rank}D" for rank in layout.ranks)
        advice = f" For channels-last data, {channels_last_fix}." if channels_last_fix else ""
        raise ValueError(
            f"expected {expected} input (got {x.ndim}D input): {layer} expects "
            f"{layout.description}, got shape {tuple(x.shape)}.{advice}"
        )
    return 1


def check_num_features(
    layer: str,
    num_features: int | None,
    x: jax.Array,
    axis: int,
    channels_last_fix: str | None = None,
) -> None:
    """``num_features``, when given, must be the input's channel count."""
    channels = x.shape[axis]
    # (x.size may be symbolic under jax.export: compare, never take its truth value.)
    if num_features is None or x.size == 0 or num_features == channels:
        return
    otherwise = f"build the layer with num_features={channels}"
    fix = channels_last_hint(x.shape, axis, num_features, channels_last_fix, otherwise) or (
        f"Build the layer with num_features={channels}, or check the input's layout."
    )
    raise RuntimeError(
        f"{layer}(num_features={num_features}) got an input of shape "
        f"{tuple(x.shape)} with {channels} channels on axis {axis}. {fix}"
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
    channels_last_fix: ClassVar[str]  # how it takes channels-last input, e.g. "pass axis=-1"


def check_momentum(momentum: float | None) -> None:
    """Where a layer is defined: warn about a Flax-looking or out-of-range momentum.

    The warning points at the user's line that builds the layer, not at
    jaxbn, so that it comes before any training step, and the layer's
    training steps do not repeat it. (A layer built inside ``nn.compact`` is
    built again at each trace, on the same line: Python's default filter
    shows that once.) Layers that jaxbn.port builds carry the torch model's
    own momentum and are not checked.

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
    with calling(settings):
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


@contextlib.contextmanager
def calling(settings: Settings) -> Iterator[None]:
    """The core's messages inside name this layer's arguments; its momentum is not rechecked.

    A layer checks its momentum once, where it is defined (see
    :func:`check_momentum`), not in every training step the core traces.
    """
    token = CALLER.set(Caller(settings.eval_hint, settings.channels_last_fix, False))
    try:
        yield
    finally:
        CALLER.reset(token)


def finish(settings: Settings, layer: str, x: jax.Array, axis: int, y: jax.Array) -> jax.Array:
    """The layer's output: ``num_features`` checked, cast to ``dtype`` if set."""
    check_num_features(layer, settings.num_features, x, axis, settings.channels_last_fix)
    return y if settings.dtype is None else y.astype(settings.dtype)
