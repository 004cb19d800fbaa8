"""The flat conversion plan: one :class:`Entry` per tensor, and every problem.

:func:`plan_from_torch` and :func:`plan_to_torch` decide, from the specs of
:mod:`._layouts`, where each tensor goes, its layout and its dtype, and check
the result against a template by shape and dtype, without touching any
tensor's data. ``from_torch``, ``to_torch`` and ``inspect`` all run on the
plan, so ``inspect`` reports exactly what a conversion would do.
"""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from .._functional import count_dtype
from ._layouts import KINDS, SPECS, LayerSpec, Tensor, kind_name, kind_of_class, permuted

FlaxKey = tuple[str, ...]  # (collection, *module path, variable name)
REQUIRED = "<required>"  # the default of a setting the constructor has no default for


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the plan: where it comes from, where it goes, and how."""

    torch_key: str
    flax_key: FlaxKey
    kind: str
    layout: str
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    dtype: str  # of the converted array
    rule: str = "keep"  # the spec's dtype rule: 'keep' or 'count'
    present: bool = True  # False: absent from the checkpoint, loaded as the spec's default

    @property
    def flax_name(self) -> str:
        return "/".join(self.flax_key)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A constructor argument of a torch layer that its state dict does not carry."""

    layer: str  # torch module path
    kind: str
    name: str  # 'eps', 'momentum', 'stride', ...
    value: Any
    default: Any  # PyTorch's default, or REQUIRED

    def __str__(self) -> str:
        default = (
            "no default" if self.default == REQUIRED else f"PyTorch's default {self.default!r}"
        )
        return f"{self.layer}: {self.name}={self.value!r} ({default})"


@dataclasses.dataclass(frozen=True)
class Report:
    """What a conversion did, and everything it could not do.

    ``missing``/``unexpected``/``mismatched`` compare the result with a
    template; ``unconverted`` are tensors no spec covers; ``ambiguous`` are
    modules whose kind the names and shapes do not decide. Each line names
    the torch key and the Flax path where both are known. From a live
    module, ``settings`` lists every constructor argument the state dict
    does not carry that differs from PyTorch's default (a Flax model must
    be built with them), and ``layout_notes`` every Linear whose kernel
    depends on the order in which a Flax model flattens its input.
    """

    entries: tuple[Entry, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    unconverted: tuple[str, ...] = ()
    ambiguous: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    settings: tuple[Setting, ...] = ()
    layout_notes: tuple[str, ...] = ()

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


@dataclasses.dataclass(frozen=True)
class Source:
    """A state dict and what a live module adds to it."""

    state: Mapping[str, Any]
    classes: Mapping[str, type] = dataclasses.field(default_factory=dict)  # prefix -> class
    modules: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # prefix -> module
    buffers: frozenset[str] = frozenset()  # state keys that are buffers
    notes: tuple[str, ...] = ()
    metadata: Any = None  # the state dict's _metadata (module versions)

    @property
    def live(self) -> bool:
        return bool(self.modules)


# where training scripts keep the weights in a checkpoint dict (with 'epoch', 'optimizer')
_WRAPPERS = ("state_dict", "model", "model_state_dict", "model_state")


def unwrap(obj: Any, caller: str = "from_torch") -> Source:
    """The state dict of a torch module or checkpoint, with what a module tells."""
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):
        modules = dict(obj.named_modules())
        state = obj.state_dict()
        buffers = frozenset(name for name, _ in obj.named_buffers())
        return Source(
            dict(state),
            {prefix: type(m) for prefix, m in modules.items()},
            modules,
            buffers,
            metadata=getattr(state, "_metadata", None),
        )
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{caller} takes a torch.nn.Module or a state dict, got {type(obj).__name__}. "
            "For a file use jaxbn.load_checkpoint(path) first."
        )
    notes: list[str] = []
    metadata = getattr(obj, "_metadata", None)
    state = dict(obj)
    while not _is_state_dict(state):
        wrapper = next((k for k in _WRAPPERS if k in state), None)
        if wrapper is None or not isinstance(state[wrapper], Mapping):
            bad = sorted(k for k, v in state.items() if not _is_tensor(v))
            raise TypeError(
                "expected a state dict of tensors (or a checkpoint holding one under "
                f"{', '.join(map(repr, _WRAPPERS[:-1]))} or {_WRAPPERS[-1]!r}); these entries are not "
                f"tensors: {bad[:10]}"
            )
        others = sorted(k for k in state if k != wrapper)
        notes.append(
            f"using checkpoint[{wrapper!r}]"
            + (f"; not model weights, not converted: {others}" if others else "")
        )
        metadata = getattr(state[wrapper], "_metadata", None)
        state = dict(state[wrapper])
    if state and all(key.startswith("module.") for key in state):
        notes.append("removed DDP's 'module.' prefix")
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return Source(state, notes=tuple(notes), metadata=metadata)


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "shape")


def _is_state_dict(state: Mapping[str, Any]) -> bool:
    return all(_is_tensor(v) for v in state.values())


def class_name(cls: type) -> str:
    """``torch.nn.Conv2d``, ``torchvision.models.convnext.CNBlock``: where a user finds it."""
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    return f"{module}.{cls.__qualname__}"


def spec_of_class(cls: type) -> LayerSpec | None:
    """The spec of the first class in the MRO that has one (a subclass keeps its tensors)."""
    for base in cls.__mro__:
        kind = kind_of_class(base.__name__)
        if kind is not None:
            return KINDS[kind]
    return None


# --- PyTorch -> Flax ----------------------------------------------------------


def plan_from_torch(
    source: Source,
    template: Mapping[FlaxKey, Any] | None,
    kinds: Mapping[str, str] | None,
    flax_path: Callable[[str], tuple[str, ...]],
) -> Report:
    """Where every tensor of ``source`` goes, and every problem, as a :class:`Report`."""
    overrides = {prefix: kind_name(kind) for prefix, kind in (kinds or {}).items()}
    entries: list[Entry] = []
    unconverted: list[str] = []
    ambiguous: list[str] = []
    for prefix, tensors in _group_by_module(source.state).items():
        path = flax_path(prefix)
        ranks = {name: len(tensor.shape) for name, tensor in tensors.items()}
        origin = {name: _origin(source, _join(prefix, name)) for name in tensors}
        spec, why = _spec_for_torch(prefix, ranks, origin, source, overrides, path, template)
        if spec is None:
            target = ambiguous if why.startswith("ambiguous") else unconverted
            target.append(f"{prefix or '<root>'}: {why} (keys: {', '.join(sorted(tensors))})")
            continue
        for name, tensor in tensors.items():
            row = spec.tensor_for_torch(name, ranks[name], origin[name])
            key = _join(prefix, name)
            if row is None:
                unconverted.append(f"{key}: a {spec.kind} layer has no tensor named {name!r}")
                continue
            entries.append(
                _entry_to_flax(key, path, spec, row, name, tuple(tensor.shape), tensor.dtype)
            )
        entries.extend(_absent_entries(prefix, path, spec, tensors, ranks))
    report = Report(
        entries=tuple(entries),
        unconverted=tuple(unconverted),
        ambiguous=tuple(ambiguous),
        notes=(
            *source.notes,
            *(
                f"{e.torch_key}: absent (old checkpoint); set to 0"
                for e in entries
                if not e.present
            ),
            *_state_dict_note(source, entries),
        ),
        settings=tuple(_settings(source)),
        layout_notes=tuple(_flatten_notes(source)),
    )
    if template is None:
        return report
    result = {
        e.flax_key: _held_by_jax(f"{e.dtype}[{', '.join(map(str, e.flax_shape))}]") for e in entries
    }
    held = {key: _held_by_jax(description) for key, description in template.items()}
    torch_keys = {e.flax_key: e.torch_key for e in entries}

    def label(key: FlaxKey) -> str:
        flax = "/".join(key)
        return f"{flax} (torch {torch_keys[key]})" if key in torch_keys else flax

    return dataclasses.replace(report, **accounting(result, held, label))


def _origin(source: Source, key: str) -> str:
    if not source.live:
        return "any"
    return "buffer" if key in source.buffers else "parameter"


def _entry_to_flax(
    key: str,
    path: FlaxKey,
    spec: LayerSpec,
    row: Tensor,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
) -> Entry:
    counted = row.dtype == "count"
    return Entry(
        key,
        (row.collection, *path, row.flax_name(name)),
        spec.kind,
        row.layout,
        shape,
        permuted(shape, row.layout),
        np.dtype(count_dtype()).name if counted else dtype_name(dtype),
        row.dtype,
    )


def _absent_entries(
    prefix: str,
    path: FlaxKey,
    spec: LayerSpec,
    tensors: Mapping[str, Any],
    ranks: Mapping[str, int],
) -> list[Entry]:
    """Tensors a checkpoint may lack (an old one's step counter), loaded as the spec says.

    Only where the rest of their collection is there: an untracked BatchNorm
    has no counter to fill.
    """
    present = {
        row.collection
        for name in tensors
        if (row := spec.tensor_for_torch(name, ranks[name])) is not None
    }
    return [
        dataclasses.replace(
            _entry_to_flax(_join(prefix, row.torch), path, spec, row, row.torch, (), "int64"),
            present=False,
        )
        for row in spec.tensors
        if row.absent is not None and row.torch not in tensors and row.collection in present
    ]


def _spec_for_torch(
    prefix: str,
    ranks: Mapping[str, int],
    origin: Mapping[str, str],
    source: Source,
    overrides: Mapping[str, str],
    path: FlaxKey,
    template: Mapping[FlaxKey, Any] | None,
) -> tuple[LayerSpec | None, str]:
    """The spec of one torch module, or None and why not."""
    if prefix in overrides:
        return KINDS[overrides[prefix]], ""
    cls = source.classes.get(prefix)
    own = spec_of_class(cls) if cls is not None else None
    if own is not None and (
        template is None
        or all(own.tensor_for_torch(n, r, origin[n]) is not None for n, r in ranks.items())
    ):
        return own, ""
    candidates = [
        spec
        for spec in SPECS
        if all(spec.tensor_for_torch(n, r, origin[n]) is not None for n, r in ranks.items())
    ]
    if template is not None:
        fitting = [
            spec
            for spec in candidates
            if all(
                (row.collection, *path, row.flax_name(n)) in template
                for n, r in ranks.items()
                if (row := spec.tensor_for_torch(n, r, origin[n])) is not None
            )
        ]
        if len(_distinct(fitting, ranks, origin)) == 1:
            # (a subclass with a tensor of its own, as timm's ScaledStdConv2d's gain, is
            # bare parameters where the template has them so)
            return fitting[0], ""
    if own is not None:
        return own, ""
    if cls is not None:
        hint = (
            ""
            if class_name(cls).startswith("torch.")
            else f"; for its own parameters pass kinds={{{prefix!r}: 'Param'}} or a template"
        )
        return None, f"{class_name(cls)} is not a supported layer kind{hint}"
    inferred = _distinct([spec for spec in candidates if spec.inferred], ranks, origin)
    if len(inferred) == 1:
        return inferred[0], ""
    if inferred:
        return None, (
            f"ambiguous: could be {' or '.join(spec.kind for spec in inferred)}; pass e.g. "
            f"kinds={{{prefix!r}: {inferred[0].kind!r}}}, the torch module, or a template"
        )
    return None, "no layer kind has these tensor names and ranks"


def _distinct(
    specs: Iterable[LayerSpec], ranks: Mapping[str, int], origin: Mapping[str, str]
) -> list[LayerSpec]:
    """Specs that convert the tensors differently: one of each group that converts alike.

    An untracked BatchNorm and a LayerNorm convert alike: that is no ambiguity.
    """
    seen: dict[Any, LayerSpec] = {}
    for spec in specs:
        outcome = frozenset(
            (n, row.collection, row.flax_name(n), row.layout, row.dtype)
            for n, r in ranks.items()
            if (row := spec.tensor_for_torch(n, r, origin[n])) is not None
        )
        if outcome not in seen or len(spec.tensors) < len(seen[outcome].tensors):
            seen[outcome] = spec  # the simplest kind names the group
    return list(seen.values())


def _state_dict_note(source: Source, entries: Iterable[Entry]) -> list[str]:
    if source.live:
        return []
    count = len({e.torch_key.rpartition(".")[0] for e in entries if e.kind == "BatchNorm"})
    if not count:
        return []
    return [
        f"a state dict carries no eps or momentum ({count} BatchNorm layers), nor convolution "
        "stride, padding, dilation or groups: build the Flax model with the torch code's "
        "values, or inspect the live module (jaxbn.convert.inspect(model)), which lists them"
    ]


def _settings(source: Source) -> Iterable[Setting]:
    """Constructor arguments of live layers that differ from PyTorch's defaults."""
    for prefix, module in source.modules.items():
        spec = spec_of_class(type(module))
        if spec is None or not spec.settings:
            continue
        defaults = _defaults(type(module))
        for name in spec.settings:
            if name not in defaults or not hasattr(module, name):
                continue
            value, default = getattr(module, name), defaults[name]
            if isinstance(value, tuple) and isinstance(default, int):
                default = (default,) * len(value)
            if default == REQUIRED or value != default:
                yield Setting(prefix, spec.kind, name, value, defaults[name])


def _defaults(cls: type) -> dict[str, Any]:
    """The constructor's defaults by argument name, REQUIRED where there is none."""
    try:
        parameters = pyinspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: REQUIRED if p.default is pyinspect.Parameter.empty else p.default
        for p in parameters
    }


_SPATIAL = ("Conv", "BatchNorm", "FrozenBatchNorm")


def _flatten_notes(source: Source) -> Iterable[str]:
    """Linears fed by a flattened feature map, whose kernel rows are in (C, H, W) order.

    torch flattens channels first; a Flax model that flattens an NHWC map
    takes (H, W, C) rows, converts strictly, and computes garbage. Read from
    the module order: the first Linear after a convolution or BatchNorm,
    whose inputs are a multiple of the channel count.
    """
    channels, pooled = None, None
    for prefix, module in source.modules.items():
        spec = spec_of_class(type(module))
        if spec is not None and spec.kind in _SPATIAL:
            channels = getattr(module, "out_channels", None) or getattr(
                module, "num_features", None
            )
            pooled = None
        elif type(module).__name__ in ("AdaptiveAvgPool2d", "AdaptiveMaxPool2d"):
            size = module.output_size
            pooled = (size, size) if isinstance(size, int) else tuple(size)
        elif spec is not None and spec.kind == "Linear":
            positions = module.in_features // channels if channels else 0
            if channels and positions > 1 and positions * channels == module.in_features:
                where = (
                    f"{channels} x {pooled[0]} x {pooled[1]}"
                    if pooled and None not in pooled and pooled[0] * pooled[1] == positions
                    else f"{channels} channels x {positions} positions"
                )
                yield (
                    f"{prefix}: in_features {module.in_features} = {where} from a flattened "
                    "feature map, in torch's (C, H, W) order; a Flax model must flatten the "
                    "same way (x.transpose(0, 3, 1, 2).reshape(n, -1) for NHWC), or the "
                    "kernel converts strictly and computes something else"
                )
            channels = None


# --- Flax -> PyTorch ----------------------------------------------------------


def plan_to_torch(
    variables: Mapping[FlaxKey, Any],
    template: Source | None,
    kinds: Mapping[str, str] | None,
    torch_path: Callable[[tuple[str, ...]], str],
) -> Report:
    """Where every Flax variable goes in a torch state dict, and every problem."""
    overrides = {prefix: kind_name(kind) for prefix, kind in (kinds or {}).items()}
    template_state = template.state if template is not None else {}
    modules: dict[FlaxKey, dict[tuple[str, str], Any]] = {}
    for (collection, *path, name), value in variables.items():
        modules.setdefault(tuple(path), {})[(collection, name)] = value
    entries: list[Entry] = []
    unconverted: list[str] = []
    for path, leaves in modules.items():
        prefix = torch_path(path)
        spec = _spec_for_flax(prefix, leaves, template, template_state, overrides)
        for (collection, name), value in leaves.items():
            flax_key = (collection, *path, name)
            row = spec.tensor_for_flax(collection, name) if spec is not None else None
            if spec is None or row is None:
                why = (
                    f"a {spec.kind} layer has no {collection} variable {name!r}"
                    if spec is not None
                    else "no layer kind has these variable names"
                )
                unconverted.append(f"{'/'.join(flax_key)}: {why}")
                continue
            shape = tuple(np.shape(value))
            entries.append(
                Entry(
                    _join(prefix, row.torch_name(name)),
                    flax_key,
                    spec.kind,
                    row.layout,
                    permuted(shape, row.layout, to_torch=True),
                    shape,
                    "int64" if row.dtype == "count" else dtype_name(value.dtype),
                    row.dtype,
                )
            )
    report = Report(entries=tuple(entries), unconverted=tuple(unconverted))
    if not template_state:
        return report
    result = {e.torch_key: f"{e.dtype}[{', '.join(map(str, e.torch_shape))}]" for e in entries}
    desired = {k: describe(v) for k, v in template_state.items()}
    return dataclasses.replace(report, **accounting(result, desired, str))


def _spec_for_flax(
    prefix: str,
    leaves: Mapping[tuple[str, str], Any],
    template: Source | None,
    template_state: Mapping[str, Any],
    overrides: Mapping[str, str],
) -> LayerSpec | None:
    if prefix in overrides:
        return KINDS[overrides[prefix]]
    classes = template.classes if template is not None else {}
    own = spec_of_class(classes[prefix]) if prefix in classes else None
    if own is not None and all(own.tensor_for_flax(c, n) is not None for c, n in leaves):
        return own
    named = [
        spec
        for spec in SPECS
        if all(
            row is not None and row.flax != "*" and (not row.ranks or np.ndim(v) in row.ranks)
            for (c, n), v in leaves.items()
            for row in [spec.tensor_for_flax(c, n)]
        )
    ]
    if template_state:
        # The kind whose torch names the template has: a module of no known kind
        # with its own `scale` and `bias` (hgnetv2's LearnableAffineBlock) is bare
        # parameters, not a norm layer's weight and bias.
        for spec in [*named, KINDS["Param"]]:
            rows = [spec.tensor_for_flax(c, n) for c, n in leaves]
            if all(
                row is not None and _join(prefix, row.torch_name(n)) in template_state
                for row, (_, n) in zip(rows, leaves, strict=True)
            ):
                return spec
    return own or (named[0] if named else None)


# --- accounting ---------------------------------------------------------------


def accounting(
    result: Mapping[Any, str], template: Mapping[Any, str], name: Callable[[Any], str]
) -> dict[str, tuple[str, ...]]:
    """Missing, unexpected and shape- or dtype-mismatched keys, each named."""
    mismatched = [
        f"{name(k)}: converted {result[k]}, template {template[k]}"
        for k in result
        if k in template and result[k] != template[k]
    ]
    return {
        "missing": tuple(name(k) for k in template if k not in result),
        "unexpected": tuple(name(k) for k in result if k not in template),
        "mismatched": tuple(mismatched),
    }


def describe(value: Any) -> str:
    """``'float32[3, 3, 64, 64]'`` for an array, tensor or ShapeDtypeStruct."""
    return f"{dtype_name(value.dtype)}[{', '.join(map(str, value.shape))}]"


def describe_all(tree: Mapping[FlaxKey, Any]) -> dict[FlaxKey, str]:
    return {key: describe(value) for key, value in tree.items()}


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _held_by_jax(description: str) -> str:
    """``'int64[49, 49]'`` as JAX holds it: an int64 index table is int32 in a template
    made by JAX unless x64 is on, and JAX makes the converted int64 array int32 too.
    (Floats are compared as they are: a float64 checkpoint against a float32 template
    is a difference worth reporting.)"""
    dtype, bracket, shape = description.partition("[")
    if np.issubdtype(np.dtype(dtype), np.integer):
        dtype = np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(dtype))).name
    return f"{dtype}{bracket}{shape}"


def _group_by_module(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition(".")
        groups.setdefault(prefix, {})[name] = tensor
    return groups


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
