"""PyTorch state dicts <-> Flax variable trees, with strict accounting.

One function applies the tables of :mod:`._layouts` in each direction. Every
torch key ends up converted or listed in the report; nothing is dropped.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from .._functional import count_dtype
from ._arrays import to_numpy, to_tensor
from ._layouts import (
    LAYERS,
    LAYOUTS,
    TORCH_MODULES,
    Param,
    kind_name,
    to_flax_layout,
    to_torch_layout,
)

if TYPE_CHECKING:
    import torch

FlaxKey = tuple[str, ...]  # (collection, *module path, variable name)
Variables = dict[str, Any]


def default_flax_path(prefix: str) -> tuple[str, ...]:
    """``'layer1.0.conv1'`` -> ``('layer1', '0', 'conv1')``: one Flax module per torch module."""
    return tuple(prefix.split(".")) if prefix else ()


def default_torch_path(path: tuple[str, ...]) -> str:
    """The inverse of :func:`default_flax_path`."""
    return ".".join(path)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One converted tensor."""

    torch_key: str
    flax_key: FlaxKey
    kind: str
    layout: str
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    dtype: str

    @property
    def flax_name(self) -> str:
        return "/".join(self.flax_key)


@dataclasses.dataclass(frozen=True)
class Report:
    """What a conversion did, and everything it could not do.

    ``missing``/``unexpected``/``mismatched`` compare the result with a
    template; ``unconverted`` are tensors no table covers; ``ambiguous`` are
    modules whose kind the names and shapes do not decide. Each line names
    the torch key and the Flax path where both are known.
    """

    entries: tuple[Entry, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    unconverted: tuple[str, ...] = ()
    ambiguous: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def problems(self) -> dict[str, tuple[str, ...]]:
        groups = {
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "unconverted": self.unconverted,
            "ambiguous": self.ambiguous,
        }
        return {name: lines for name, lines in groups.items() if lines}

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe_problems(self) -> str:
        lines = []
        for name, items in self.problems.items():
            lines.append(f"{name} ({len(items)}):")
            lines.extend(f"  {item}" for item in items)
        return "\n".join(lines)


class ConversionError(ValueError):
    """Raised by a strict conversion; ``report`` holds every problem found."""

    def __init__(self, report: Report, direction: str) -> None:
        self.report = report
        count = sum(len(v) for v in report.problems.values())
        super().__init__(
            f"{direction}: {count} problem(s), listed below. Nothing was dropped: "
            "fix the mapping (kinds=, the path rule, the template), or pass "
            "strict=False to get the converted tree and this report.\n" + report.describe_problems()
        )


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
    LayerNorm, GroupNorm, RMSNorm   scale, bias
    Embedding                       embedding (no transpose)
    ==============================  =========================================

    Args:
      obj: a ``torch.nn.Module`` (layer kinds come from module types) or a
        state dict (kinds inferred from names and ranks; a 2-D ``weight``
        without ``bias`` may be Linear or Embedding and is reported unless
        ``kinds`` or the template decides). Checkpoint wrappers
        (``{'state_dict': ...}``, ``{'model': ...}``) and DDP's ``module.``
        prefix are removed.
      template: optional Flax variables (``model.init(...)`` or its
        ``jax.eval_shape``), or an NNX model, that the result must match key
        for key, in shape and dtype. For an NNX model, load the result with
        :func:`jaxbn.nnx.update`.
      strict: raise :class:`ConversionError` listing every problem. With
        False, return ``(variables, report)`` instead.
      kinds: ``{torch module prefix: kind}`` overrides, e.g.
        ``{'head': 'Embedding'}``; kinds are 'BatchNorm', 'Linear', 'Conv',
        'Norm', 'Embedding' or a torch class name such as 'BatchNorm2d'.
      flax_path: maps a torch module prefix to a Flax module path.
      counts: what to do with a ``num_batches_tracked`` beyond int32 when
        jax_enable_x64 is off: 'error', or 'saturate' at the int32 maximum
        (with a warning).
      progress: called as ``progress(done, total)`` after each tensor.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of numpy arrays (jax accepts
      them anywhere; ``jax.device_put`` moves them to a device), or
      ``(variables, report)`` when ``strict=False``.
    """
    template = _as_variables(template)
    state, report = _plan(obj, template, kinds, flax_path)
    variables: Variables = {}
    for done, entry in enumerate(report.entries, 1):
        if entry.torch_key in state:
            array = to_numpy(state[entry.torch_key])
            if entry.layout == "count":
                value = _count(int(array), entry.torch_key, counts)
            else:
                value = to_flax_layout(array, entry.layout)
        else:  # a BatchNorm counter an old checkpoint lacks: PyTorch loads 0
            value = _count(0, entry.torch_key, counts)
        _put(variables, entry.flax_key, value)
        if progress is not None:
            progress(done, len(report.entries))
    _warn_bad_variances(report.entries, variables)
    template_keys = flatten_tree(template) if template is not None else None
    report = dataclasses.replace(
        report,
        **_against_template(
            flatten_tree(variables),
            template_keys,
            {e.flax_key: e.torch_key for e in report.entries},
        ),
    )
    if strict:
        if not report.ok:
            raise ConversionError(report, "from_torch")
        return variables
    return variables, report


def inspect(
    obj: Any,
    template: Any = None,
    *,
    kinds: Mapping[str, str] | None = None,
    flax_path: Callable[[str], tuple[str, ...]] = default_flax_path,
) -> Report:
    """What :func:`from_torch` would do, without converting any tensor.

    The report lists each tensor's layer kind, Flax path, shapes and layout,
    and every key that would not convert.
    """
    return _plan(obj, template, kinds, flax_path)[1]


def _plan(
    obj: Any,
    template: Any,
    kinds: Mapping[str, str] | None,
    flax_path: Callable[[str], tuple[str, ...]],
) -> tuple[dict[str, Any], Report]:
    """The state dict, and one entry per tensor saying where it goes."""
    state, module_types, notes = _unwrap(obj)
    overrides = {prefix: kind_name(kind) for prefix, kind in (kinds or {}).items()}
    template_keys = flatten_tree(template) if template is not None else None
    entries: list[Entry] = []
    unconverted: list[str] = []
    ambiguous: list[str] = []
    for prefix, tensors in _group_by_module(state).items():
        path = flax_path(prefix)
        kind, why = _torch_kind(prefix, tensors, module_types, overrides, path, template_keys)
        if kind is None:
            target = ambiguous if why.startswith("ambiguous") else unconverted
            target.append(f"{prefix or '<root>'}: {why} (keys: {', '.join(sorted(tensors))})")
            continue
        shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        dtypes = {name: _dtype_name(tensor.dtype) for name, tensor in tensors.items()}
        if kind == "BatchNorm" and "running_mean" in shapes and "num_batches_tracked" not in shapes:
            notes.append(
                f"{_join(prefix, 'num_batches_tracked')}: absent (old checkpoint); set to 0"
            )
            shapes["num_batches_tracked"], dtypes["num_batches_tracked"] = (), "int64"
        table = {p.torch: p for p in LAYERS[kind]}
        for name, shape in shapes.items():
            key = _join(prefix, name)
            if name not in table:
                unconverted.append(f"{key}: a {kind} layer has no tensor named {name!r}")
                continue
            param = table[name]
            dtype = str(np.dtype(count_dtype())) if param.layout == "count" else dtypes[name]
            flax_shape = shape if param.layout == "count" else _permuted(shape, param.layout)
            entries.append(
                Entry(
                    key,
                    (param.collection, *path, param.flax),
                    kind,
                    param.layout,
                    shape,
                    flax_shape,
                    dtype,
                )
            )
    report = Report(
        entries=tuple(entries),
        unconverted=tuple(unconverted),
        ambiguous=tuple(ambiguous),
        notes=tuple(notes),
    )
    return state, report


def _permuted(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return tuple(shape[i] for i in LAYOUTS[layout][0](len(shape)))


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _unwrap(obj: Any) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """``(state dict, {prefix: torch class names}, notes)`` from a module or checkpoint."""
    notes: list[str] = []
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):
        types = {prefix: _torch_class_names(module) for prefix, module in obj.named_modules()}
        return dict(obj.state_dict()), types, notes
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"from_torch takes a torch.nn.Module or a state dict, got {type(obj).__name__}. "
            "For a file use jaxbn.load_checkpoint(path) first."
        )
    state = dict(obj)
    while not _is_state_dict(state):
        wrapper = next((k for k in ("state_dict", "model", "model_state_dict") if k in state), None)
        if wrapper is None or not isinstance(state[wrapper], Mapping):
            bad = sorted(k for k, v in state.items() if not _is_tensor(v))
            raise TypeError(
                "expected a state dict of tensors (or a checkpoint holding one under "
                f"'state_dict', 'model' or 'model_state_dict'); these entries are not "
                f"tensors: {bad[:10]}"
            )
        others = sorted(k for k in state if k != wrapper)
        notes.append(
            f"using checkpoint[{wrapper!r}]"
            + (f"; not model weights, not converted: {others}" if others else "")
        )
        state = dict(state[wrapper])
    if state and all(key.startswith("module.") for key in state):
        notes.append("removed DDP's 'module.' prefix")
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state, {}, notes


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "shape")


def _is_state_dict(state: Mapping[str, Any]) -> bool:
    return all(_is_tensor(v) for v in state.values())


def _torch_class_names(module: Any) -> str:
    """The first class in the module's MRO that has a layer table, else its own name."""
    for cls in type(module).__mro__:
        if cls.__name__ in TORCH_MODULES:
            return cls.__name__
    return type(module).__name__


def _group_by_module(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".")
        groups.setdefault(prefix, {})[name] = tensor
    return groups


def _torch_kind(
    prefix: str,
    tensors: Mapping[str, Any],
    module_types: Mapping[str, str],
    overrides: Mapping[str, str],
    path: tuple[str, ...],
    template_keys: Mapping[FlaxKey, Any] | None,
) -> tuple[str | None, str]:
    """The layer kind of one torch module, or None and why not."""
    if prefix in overrides:
        return overrides[prefix], ""
    if prefix in module_types:
        torch_class = module_types[prefix]
        if torch_class in TORCH_MODULES:
            return TORCH_MODULES[torch_class], ""
        return None, f"torch.nn.{torch_class} is not a supported layer kind"
    candidates = _infer_from_names({name: tuple(t.shape) for name, t in tensors.items()})
    if template_keys is not None and len(candidates) > 1:
        fitting = [
            kind
            for kind in candidates
            if kind in LAYERS
            and all(
                (p.collection, *path, p.flax) in template_keys
                for p in LAYERS[kind]
                if p.torch in tensors
            )
        ]
        candidates = fitting or candidates
    if len(candidates) == 1 and candidates[0] in LAYERS:
        return candidates[0], ""
    if candidates:
        example = next(kind for kind in candidates if kind in LAYERS)
        return None, (
            f"ambiguous: could be {' or '.join(candidates)}; pass e.g. kinds={{{prefix!r}: "
            f"{example!r}}}, the torch module, or a template"
        )
    return None, "no layer kind has these tensor names and ranks"


# A 1-D weight alone may be a norm's scale or, e.g., PReLU's slopes.
_OTHER = "a layer jaxbn has no table for (e.g. PReLU)"


def _infer_from_names(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Candidate kinds of a module in a bare state dict, from names and ranks."""
    if {"running_mean", "running_var", "num_batches_tracked"} & set(shapes):
        return ["BatchNorm"]
    weight = shapes.get("weight")
    if weight is None:
        return []
    if len(weight) == 1:
        # LayerNorm, GroupNorm, untracked BatchNorm: the same tree.
        return ["Norm"] if "bias" in shapes else ["Norm", _OTHER]
    if len(weight) == 2:
        return ["Linear"] if "bias" in shapes else ["Linear", "Embedding"]
    if 3 <= len(weight) <= 5:
        return ["Conv"]
    return []


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
        if entry.flax_key[0] == "batch_stats" and entry.flax_key[-1] == "var":
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
) -> dict[str, torch.Tensor]: ...


@overload
def to_torch(
    variables: Any,
    template: Any = None,
    *,
    strict: Literal[False],
    kinds: Mapping[str, str] | None = None,
    torch_path: Callable[[tuple[str, ...]], str] = default_torch_path,
) -> tuple[dict[str, torch.Tensor], Report]: ...


def to_torch(
    variables: Any,
    template: Any = None,
    *,
    strict: bool = True,
    kinds: Mapping[str, str] | None = None,
    torch_path: Callable[[tuple[str, ...]], str] = default_torch_path,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], Report]:
    """Convert a Flax variable tree back into a torch state dict.

    The inverse of :func:`from_torch`, bit for bit. Layer kinds come from
    ``template`` (a torch module, whose types decide) or from the Flax names:
    ``batch_stats`` -> BatchNorm, 2-D ``kernel`` -> Linear, 3-5-D ``kernel``
    -> Conv (also ConvTranspose), ``embedding`` -> Embedding, ``scale`` ->
    Norm. With a template (module or state dict) the keys, shapes and dtypes
    must match it, so that ``load_state_dict(..., strict=True)`` accepts the
    result, and the keys come in the template's order.

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}``, or an NNX model.
      template: optional ``torch.nn.Module`` or state dict.
      strict: raise :class:`ConversionError` listing every problem; with
        False, return ``(state_dict, report)``.
      kinds: ``{torch module prefix: kind}`` overrides.
      torch_path: maps a Flax module path to a torch module prefix.
    """
    torch_template, module_types, _ = _unwrap(template) if template is not None else ({}, {}, [])
    overrides = {prefix: kind_name(kind) for prefix, kind in (kinds or {}).items()}
    modules: dict[tuple[str, ...], dict[tuple[str, str], Any]] = {}
    for (collection, *path, name), value in flatten_tree(_as_variables(variables)).items():
        modules.setdefault(tuple(path), {})[(collection, name)] = value
    state: dict[str, Any] = {}
    entries: list[Entry] = []
    unconverted: list[str] = []
    for path, leaves in modules.items():
        prefix = torch_path(path)
        kind = overrides.get(prefix) or TORCH_MODULES.get(module_types.get(prefix, ""))
        kind = kind or _infer_from_flax_names(leaves)
        table: dict[tuple[str, str], Param] = {}
        if kind is not None:
            table = {(p.collection, p.flax): p for p in LAYERS[kind]}
        for (collection, name), value in leaves.items():
            flax_key = (collection, *path, name)
            param = table.get((collection, name))
            if param is None:
                why = (
                    f"a {kind} layer has no {collection} variable {name!r}"
                    if kind
                    else ("no layer kind has these variable names")
                )
                unconverted.append(f"{'/'.join(flax_key)}: {why}")
                continue
            array = np.asarray(value)
            if param.layout == "count":
                converted = array.astype(np.int64)
            else:
                converted = to_torch_layout(array, param.layout)
            key = _join(prefix, param.torch)
            state[key] = to_tensor(converted)
            entries.append(
                Entry(
                    key,
                    flax_key,
                    kind or "",
                    param.layout,
                    converted.shape,
                    array.shape,
                    str(converted.dtype),
                )
            )
    problems = _against_torch_template(state, torch_template)
    if torch_template:
        state = {key: state[key] for key in torch_template if key in state} | state
    report = Report(entries=tuple(entries), unconverted=tuple(unconverted), **problems)
    if strict:
        if not report.ok:
            raise ConversionError(report, "to_torch")
        return state
    return state, report


def _infer_from_flax_names(leaves: Mapping[tuple[str, str], Any]) -> str | None:
    names = {name for _, name in leaves}
    if any(collection == "batch_stats" for collection, _ in leaves):
        return "BatchNorm"
    if "kernel" in names:
        ndim = np.ndim(leaves.get(("params", "kernel"), 0))
        return "Linear" if ndim == 2 else "Conv" if 3 <= ndim <= 5 else None
    if "embedding" in names:
        return "Embedding"
    if "scale" in names:
        return "Norm"
    return None


def _as_variables(tree: Any) -> Any:
    """An NNX model's state as a linen-style tree; anything else as it is."""
    from flax import nnx

    if isinstance(tree, nnx.Module):
        from .._nnx import variables

        return variables(tree)
    return tree


# --- accounting ------------------------------------------------------------


def _against_template(
    result: Mapping[FlaxKey, Any],
    template: Mapping[FlaxKey, Any] | None,
    torch_keys: Mapping[FlaxKey, str],
) -> dict[str, tuple[str, ...]]:
    if template is None:
        return {}

    def name(key: FlaxKey) -> str:
        flax = "/".join(key)
        return f"{flax} (torch {torch_keys[key]})" if key in torch_keys else flax

    return _accounting(result, template, name)


def _against_torch_template(
    state: Mapping[str, Any], template: Mapping[str, Any]
) -> dict[str, tuple[str, ...]]:
    return _accounting(state, template, str) if template else {}


def _accounting(
    result: Mapping[Any, Any], template: Mapping[Any, Any], name: Callable[[Any], str]
) -> dict[str, tuple[str, ...]]:
    """Missing, unexpected and shape- or dtype-mismatched keys, each named."""
    mismatched = [
        f"{name(k)}: converted {_describe(result[k])}, template {_describe(template[k])}"
        for k in result
        if k in template and _describe(result[k]) != _describe(template[k])
    ]
    return {
        "missing": tuple(name(k) for k in template if k not in result),
        "unexpected": tuple(name(k) for k in result if k not in template),
        "mismatched": tuple(mismatched),
    }


def _describe(value: Any) -> str:
    """``'float32[3, 3, 64, 64]'`` for an array, tensor or ShapeDtypeStruct."""
    return f"{_dtype_name(value.dtype)}[{', '.join(map(str, value.shape))}]"


# --- trees -----------------------------------------------------------------


def flatten_tree(tree: Any, prefix: tuple[str, ...] = ()) -> dict[FlaxKey, Any]:
    if isinstance(tree, Mapping):
        flat: dict[FlaxKey, Any] = {}
        for key, value in tree.items():
            flat |= flatten_tree(value, (*prefix, str(key)))
        return flat
    return {prefix: tree}


def _put(tree: Variables, key: FlaxKey, value: Any) -> None:
    *parents, leaf = key
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _get(tree: Mapping[str, Any], key: FlaxKey) -> Any:
    for part in key:
        tree = tree[part]
    return tree


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
