"""PyTorch state dicts <-> Flax variable trees, with strict accounting.

Each direction makes the flat plan of :mod:`._plan` and then moves the
tensors it names; every torch key ends up converted or listed in the report.
"""

from __future__ import annotations

import collections
import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from .._functional import count_dtype
from .._torch import to_numpy, to_tensor
from ._layouts import to_flax_layout, to_torch_layout
from ._plan import (
    ConversionError,
    Entry,
    FlaxKey,
    Report,
    Source,
    describe_all,
    plan_from_torch,
    plan_to_torch,
    spec_of_class,
    unwrap,
)

if TYPE_CHECKING:
    import torch

Variables = dict[str, Any]


class LayoutWarning(UserWarning):
    """A converted kernel that is right only if the Flax model flattens as torch does."""


def default_flax_path(prefix: str) -> tuple[str, ...]:
    """``'layer1.0.conv1'`` -> ``('layer1', '0', 'conv1')``: one Flax module per torch module."""
    return tuple(prefix.split(".")) if prefix else ()


def default_torch_path(path: tuple[str, ...]) -> str:
    """The inverse of :func:`default_flax_path`."""
    return ".".join(path)


# --- PyTorch -> Flax -------------------------------------------------------


@overload
def from_torch(
    obj: Any,
    template: Any = None,
    *,
    strict: Literal[True] = True,
    kinds: Mapping[str, str] | None = None,
    flax_path: Callable[[str], tuple[str, ...]] = default_flax_path,
    counts: Literal["error", "saturate"] = "error",
    progress: Callable[[int, int], None] | None = None,
) -> Variables: ...


@overload
def from_torch(
    obj: Any,
    template: Any = None,
    *,
    strict: Literal[False],
    kinds: Mapping[str, str] | None = None,
    flax_path: Callable[[str], tuple[str, ...]] = default_flax_path,
    counts: Literal["error", "saturate"] = "error",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Variables, Report]: ...


def from_torch(
    obj: Any,
    template: Any = None,
    *,
    strict: bool = True,
    kinds: Mapping[str, str] | None = None,
    flax_path: Callable[[str], tuple[str, ...]] = default_flax_path,
    counts: Literal["error", "saturate"] = "error",
    progress: Callable[[int, int], None] | None = None,
) -> Variables | tuple[Variables, Report]:
    """Convert a torch module or state dict into a Flax variable tree.

    Each torch module ``prefix`` becomes the Flax module path
    ``flax_path(prefix)`` (by default, split on dots:
    ``'layer1.0.conv1'`` -> ``('layer1', '0', 'conv1')``) and its tensors are
    renamed and re-laid-out by the table of its kind:

    ==============================  =========================================
    torch                           Flax
    ==============================  =========================================
    BatchNorm*d / SyncBatchNorm     params: scale, bias; batch_stats: mean,
                                    var, num_batches_tracked
    Linear                          kernel (in, out) = weight.T; bias
    Conv*d                          kernel (*k, in, out) from (out, in, *k)
    ConvTranspose*d                 kernel (*k, out, in) from (in, out, *k),
                                    for ``ConvTranspose(transpose_kernel=True)``
    FrozenBatchNorm2d               batch_stats: scale, bias, mean, var
    LayerNorm, GroupNorm, RMSNorm   scale, bias
    Embedding                       embedding (no transpose)
    PReLU                           negative_slope
    Param (bare tensors)            params/<name> (buffers: buffers/<name>)
    ==============================  =========================================

    Args:
      obj: a ``torch.nn.Module`` (layer kinds come from module types) or a
        state dict (kinds inferred from names and ranks; a 2-D ``weight``
        without ``bias`` may be Linear or Embedding and is reported unless
        ``kinds`` or the template decides). Checkpoint wrappers
        (``{'state_dict': ...}``, ``{'model': ...}``) and DDP's ``module.``
        prefix are removed.
      template: optional Flax variables (``model.init(...)`` or its
        ``jax.eval_shape``; not the linen module itself, which has none until
        initialised), or an NNX model, that the result must match key for
        key, in shape and dtype. For an NNX model, load the result with
        :func:`jaxbn.nnx.update`.
      strict: raise :class:`ConversionError` listing every problem. With
        False, return ``(variables, report)`` instead.
      kinds: ``{torch module prefix: kind}`` overrides, e.g.
        ``{'head': 'Embedding'}``; kinds are 'BatchNorm', 'FrozenBatchNorm',
        'Linear', 'Conv', 'Norm', 'Embedding', 'PReLU', 'Param' (a module's
        bare parameters and buffers, kept under their names) or a torch
        class name such as 'BatchNorm2d'. A template places bare parameters
        too.
      flax_path: maps a torch module prefix to a Flax module path.
      counts: what to do with a ``num_batches_tracked`` beyond int32 when
        jax_enable_x64 is off: 'error', or 'saturate' at the int32 maximum
        (with a warning).
      progress: called as ``progress(done, total)`` after each tensor.

    From a live module, the report also lists each layer setting the state
    dict does not carry (eps, momentum, stride, ...) that differs from
    PyTorch's default, and each Linear that depends on the flatten order;
    with a template, the latter is also a :class:`LayoutWarning`.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of numpy arrays (jax accepts
      them anywhere; ``jax.device_put`` moves them to a device), or
      ``(variables, report)`` when ``strict=False``.
    """
    source = unwrap(obj)
    report = inspect(source, template, kinds=kinds, flax_path=flax_path)
    if template is not None and report.layout_notes:
        warnings.warn(
            "these kernels are right only if the Flax model flattens its input in torch's "
            "order:\n" + "\n".join(report.layout_notes),
            LayoutWarning,
            stacklevel=2,
        )
    if strict and not report.ok:
        raise ConversionError(report, "from_torch")
    variables: Variables = {}
    for done, entry in enumerate(report.entries, 1):
        _put(variables, entry.flax_key, _to_flax(source.state, entry, counts))
        if progress is not None:
            progress(done, len(report.entries))
    _warn_bad_variances(report.entries, variables)
    return variables if strict else (variables, report)


def inspect(
    obj: Any,
    template: Any = None,
    *,
    kinds: Mapping[str, str] | None = None,
    flax_path: Callable[[str], tuple[str, ...]] = default_flax_path,
) -> Report:
    """What :func:`from_torch` would do, without converting any tensor.

    The report is the one :func:`from_torch` makes, for the same arguments:
    each tensor's layer kind, Flax path, shapes and layout, every key that
    would not convert, the comparison with ``template`` (a variable tree,
    its ``jax.eval_shape``, or an NNX model), and from a live module the
    settings a Flax model must be built with (:attr:`Report.settings`).
    """
    source = obj if isinstance(obj, Source) else unwrap(obj)
    flat = (
        describe_all(
            flatten_tree(_as_variables(template, "from_torch's `template`", _TEMPLATE_FIX))
        )
        if template is not None
        else None
    )
    return plan_from_torch(source, flat, kinds, flax_path)


def batch_norm_settings(module: Any) -> dict[str, Any]:
    """The jaxbn BatchNorm arguments that reproduce a torch BatchNorm module.

    A state dict carries none of these; a Flax model built with the defaults
    where torch used others (MobileNetV3's eps=1e-3, MNASNet's momentum=3e-4)
    converts strictly and is silently wrong.

    >>> import torch
    >>> batch_norm_settings(torch.nn.BatchNorm2d(8, eps=1e-3, momentum=None))
    {'num_features': 8, 'momentum': None, 'eps': 0.001, 'affine': True, 'use_bias': True, 'track_running_stats': True}

    Pass them on: ``jaxbn.BatchNorm2d(**batch_norm_settings(torch_bn))``, or
    ``jaxbn.nnx.BatchNorm2d(**...)``.
    """
    spec = spec_of_class(type(module))
    if spec is None or spec.kind != "BatchNorm":
        raise TypeError(
            f"batch_norm_settings takes a torch BatchNorm module, got {type(module).__name__}; "
            "for a whole model, jaxbn.convert.inspect(model).settings lists every layer's"
        )
    return {
        "num_features": module.num_features,
        "momentum": module.momentum,
        "eps": module.eps,
        "affine": module.affine,
        "use_bias": module.bias is not None if module.affine else True,
        "track_running_stats": module.track_running_stats,
    }


def _to_flax(state: Mapping[str, Any], entry: Entry, counts: str) -> np.ndarray:
    if not entry.present:  # e.g. the step counter an old checkpoint lacks: PyTorch loads 0
        return _count(0, entry.torch_key, counts)
    array = to_numpy(state[entry.torch_key])
    if entry.rule == "count":
        return _count(int(array), entry.torch_key, counts)
    return to_flax_layout(array, entry.layout)


def _count(value: int, key: str, counts: str) -> np.ndarray:
    dtype = count_dtype()
    top = int(np.iinfo(dtype).max)
    if value > top:
        if counts != "saturate":
            raise OverflowError(
                f"{key} = {value} does not fit in {dtype} (jax_enable_x64 is off). "
                "Enable x64 (jax.config.update('jax_enable_x64', True)) to keep it "
                "exactly, or pass counts='saturate' to clamp it to "
                f"{top}; it only matters for momentum=None."
            )
        warnings.warn(f"{key} = {value} saturated to {top} ({dtype})", UserWarning, stacklevel=4)
        value = top
    return np.asarray(value, dtype)


def _warn_bad_variances(entries: Iterable[Entry], variables: Variables) -> None:
    bad = []
    for entry in entries:
        if entry.flax_key[-1] == "var" and entry.flax_key[0] == "batch_stats":
            value = _get(variables, entry.flax_key).astype(np.float64)
            if not (value >= 0).all():
                bad.append(entry.torch_key)
    if bad:
        warnings.warn(
            f"running variances with negative or NaN entries, loaded as-is: {bad}. "
            "Eval outputs of those channels will be NaN.",
            UserWarning,
            stacklevel=3,
        )


# --- Flax -> PyTorch -------------------------------------------------------


@overload
def to_torch(
    variables: Any,
    template: Any = None,
    *,
    strict: Literal[True] = True,
    kinds: Mapping[str, str] | None = None,
    torch_path: Callable[[tuple[str, ...]], str] = default_torch_path,
) -> collections.OrderedDict[str, torch.Tensor]: ...


@overload
def to_torch(
    variables: Any,
    template: Any = None,
    *,
    strict: Literal[False],
    kinds: Mapping[str, str] | None = None,
    torch_path: Callable[[tuple[str, ...]], str] = default_torch_path,
) -> tuple[collections.OrderedDict[str, torch.Tensor], Report]: ...


def to_torch(
    variables: Any,
    template: Any = None,
    *,
    strict: bool = True,
    kinds: Mapping[str, str] | None = None,
    torch_path: Callable[[tuple[str, ...]], str] = default_torch_path,
) -> (
    collections.OrderedDict[str, torch.Tensor]
    | tuple[collections.OrderedDict[str, torch.Tensor], Report]
):
    """Convert a Flax variable tree back into a torch state dict.

    The inverse of :func:`from_torch`, bit for bit. Layer kinds come from
    ``template`` (a torch module, whose types decide) or from the Flax names:
    ``batch_stats`` -> BatchNorm, 2-D ``kernel`` -> Linear, 3-5-D ``kernel``
    -> Conv (also ConvTranspose), ``embedding`` -> Embedding, ``scale`` ->
    Norm. With a template (module or state dict) the keys, shapes and dtypes
    must match it, so that ``load_state_dict(..., strict=True)`` accepts the
    result, and the keys come in the template's order. The result is an
    ``OrderedDict`` carrying the template's ``_metadata`` (the module
    versions ``state_dict()`` records, which some modules check on load).

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}``, or an NNX model.
      template: optional ``torch.nn.Module`` or state dict.
      strict: raise :class:`ConversionError` listing every problem; with
        False, return ``(state_dict, report)``.
      kinds: ``{torch module prefix: kind}`` overrides.
      torch_path: maps a Flax module path to a torch module prefix.
    """
    flat = flatten_tree(_as_variables(variables, "to_torch's `variables`", _VARIABLES_FIX))
    source = unwrap(template, "to_torch's template") if template is not None else None
    report = plan_to_torch(flat, source, kinds, torch_path)
    if strict and not report.ok:
        raise ConversionError(report, "to_torch")
    converted = {
        entry.torch_key: _to_torch(flat[entry.flax_key], entry) for entry in report.entries
    }
    order = list(source.state) if source is not None else []
    state = collections.OrderedDict(
        (key, converted[key]) for key in [*order, *converted] if key in converted
    )
    if source is not None and source.metadata is not None:
        state._metadata = copy.deepcopy(source.metadata)  # type: ignore[attr-defined]
    return state if strict else (state, report)


def _to_torch(value: Any, entry: Entry) -> torch.Tensor:
    array = np.asarray(value)
    if entry.rule == "count":
        return to_tensor(array.astype(np.int64))
    return to_tensor(to_torch_layout(array, entry.layout))


_TEMPLATE_FIX = (
    "pass template=model.init(jax.random.key(0), x) for an example input x, or "
    "jax.eval_shape(model.init, jax.random.key(0), x), which allocates nothing"
)
_VARIABLES_FIX = "pass the variables the model was initialised, trained or loaded with"


def _as_variables(tree: Any, argument: str, fix: str) -> Any:
    """An NNX model's state as a linen-style tree; a variable tree as it is.

    ``argument`` names the argument in errors, and ``fix`` says what to pass
    instead of a linen module.
    """
    from flax import linen, nnx

    if isinstance(tree, nnx.Module):
        from .._nnx import variables

        return variables(tree)
    if isinstance(tree, Mapping):
        return tree
    if isinstance(tree, linen.Module):
        # Its variables need an input only the caller has.
        raise TypeError(
            f"{argument} must be Flax variables or an NNX model, got the flax.linen module "
            f"{type(tree).__name__} itself, which holds no variables until initialised: {fix}."
        )
    raise TypeError(
        f"{argument} must be Flax variables ({{'params': ..., 'batch_stats': ...}}) or an "
        f"NNX model, got a {type(tree).__module__}.{type(tree).__name__}: {fix}."
    )


# --- trees -----------------------------------------------------------------


def flatten_tree(tree: Any, prefix: tuple[str, ...] = ()) -> dict[FlaxKey, Any]:
    """``{('params', 'conv', 'kernel'): array}`` from a nested mapping."""
    if isinstance(tree, Mapping):
        flat: dict[FlaxKey, Any] = {}
        for key, value in tree.items():
            flat |= flatten_tree(value, (*prefix, str(key)))
        return flat
    return {prefix: tree}


def _get(tree: Mapping[str, Any], key: FlaxKey) -> Any:
    for part in key:
        tree = tree[part]
    return tree


def _put(tree: Variables, key: FlaxKey, value: Any) -> None:
    *parents, leaf = key
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value
