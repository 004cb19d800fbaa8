"""The whole-model harness: a torch model and its Flax port, layer by layer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict as flatten_tree

from jaxbn._torch import import_torch, to_numpy, to_tensor
from jaxbn.convert import LAYERS, default_torch_path, from_torch, inspect

from ._compare import compare

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """How far one quantity of one layer is from torch's."""

    layer: str  # torch module path; '' is the model's output
    quantity: (
        str  # 'output', 'output.logits', 'output (call 2)', 'grad weight', 'running_mean', ...
    )
    shape: tuple[int, ...]
    max_abs: float  # max |jaxbn - torch|
    max_rel: float  # max_abs / max |torch|
    ok: bool
    detail: str = ""  # why not ok


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """Per-layer differences, in torch's execution order, and the first divergence."""

    rows: tuple[LayerDiff, ...]
    unmatched_torch: tuple[str, ...]  # torch modules with parameters and no Flax twin
    unmatched_flax: tuple[str, ...]  # Flax modules with no torch twin
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def first_divergence(self) -> LayerDiff | None:
        return next((row for row in self.rows if not row.ok), None)

    def summary(self) -> str:
        first = self.first_divergence
        if first is None:
            return f"{len(self.rows)} quantities within rtol={self.rtol}, atol={self.atol}"
        return (
            f"first divergence at {first.layer or '<output>'} ({first.quantity}): "
            f"max |diff| {first.max_abs:.2e}, relative {first.max_rel:.2e}"
        )

    def table(self) -> str:
        headers = ("layer", "quantity", "shape", "max|diff|", "relative", "")
        first = self.first_divergence
        rows = [
            (
                row.layer or "<output>",
                row.quantity,
                "x".join(map(str, row.shape)) or "scalar",
                f"{row.max_abs:.2e}",
                f"{row.max_rel:.2e}",
                ("<-- first divergence" if row is first else "FAIL") if not row.ok else "ok",
            )
            for row in self.rows
        ]
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [headers, *rows]
        ]
        if self.unmatched_torch:
            lines.append(
                f"torch modules with parameters but no Flax twin: {list(self.unmatched_torch)}"
            )
        lines.append(self.summary())
        return "\n".join(lines)


def compare_models(
    torch_model: torch.nn.Module,
    flax_model: flax.linen.Module,
    variables: Mapping[str, Any],
    x: Any,
    *,
    train: bool = False,
    flax_x: Any = None,
    flax_kwargs: Mapping[str, Any] | None = None,
    channels_last: bool = False,
    gradients: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    seed: int = 0,
    kinds: Mapping[str, str] | None = None,
) -> ModelReport:
    """Run a torch model and its Flax port on the same input; compare layer by layer.

    Intermediate outputs are captured with forward hooks on every torch
    module and ``capture_intermediates`` on the Flax side, and matched by
    path (torch ``layer1.0.conv1`` <-> Flax ``layer1/0/conv1``, the converter's
    default rule). Rows come in torch's execution order, so the first row
    beyond tolerance is the first layer that diverges.

    Args:
      torch_model: the reference; it is deep-copied, so its buffers and
        gradients are left as they were.
      flax_model, variables: the port and its variables.
      x: the input, in torch's layout (numpy or torch).
      train: run a training step (torch ``train()``; pass the Flax model's own
        flag in ``flax_kwargs``, e.g. ``{'train': True}``). Updated running
        statistics are then compared too.
      flax_x: the Flax model's input, if it differs from ``x`` (e.g. NHWC).
      flax_kwargs: extra keyword arguments for the Flax model's ``__call__``.
      channels_last: Flax activations are (N, ..., C); compare them with
        torch's (N, C, ...) by moving the last axis to 1.
      gradients: also compare the gradients of every parameter, through a
        random upstream gradient on the output.
      rtol, atol: tolerance per tensor, ``|diff| <= atol + rtol * max|torch|``.
      seed: for the upstream gradients (one per floating-point output leaf).
      kinds: layer-kind overrides for the converter, as in
        :func:`jaxbn.from_torch` (e.g. ``'Param'`` for a module's bare
        parameters).

    The output may be any pytree (a tensor, tuple, namedtuple such as
    GoogLeNet's, dict): every leaf is compared (``output.logits``,
    ``output.aux_logits1``, ...), and a leaf torch has and Flax lacks fails.

    Returns:
      A :class:`ModelReport`; ``report.table()`` prints it.
    """
    import copy

    torch = import_torch()
    reference = copy.deepcopy(torch_model).train(train)
    x_ref = x if isinstance(x, torch.Tensor) else to_tensor(np.asarray(x))
    captured: dict[str, list[Any]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: Any, inputs: Any, output: Any) -> None:
            leaves = {
                key: to_numpy(leaf).copy()  # in-place ops later must not change it
                for key, leaf in output_leaves(output).items()
                if isinstance(leaf, torch.Tensor)
            }
            captured.setdefault(name, []).append(leaves)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in reference.named_modules()]
    try:
        y_ref = reference(x_ref.requires_grad_(False))
    finally:
        for handle in handles:
            handle.remove()
    to_ref_layout = (
        (lambda a: np.moveaxis(a, -1, 1) if a.ndim > 2 else a) if channels_last else (lambda a: a)
    )
    rng = np.random.default_rng(seed)
    outputs_ref = {
        key: leaf
        for key, leaf in output_leaves(y_ref).items()
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
    }
    cotangents = {
        key: rng.standard_normal(tuple(leaf.shape)).astype(to_numpy(leaf).dtype)
        for key, leaf in outputs_ref.items()
    }
    if gradients:
        differentiable = [key for key, leaf in outputs_ref.items() if leaf.requires_grad]
        torch.autograd.backward(
            [outputs_ref[key] for key in differentiable],
            [to_tensor(cotangents[key]) for key in differentiable],
        )

    kwargs = dict(flax_kwargs or {})
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    params = variables.get("params", {})
    rest = {k: v for k, v in variables.items() if k != "params"}

    def forward(params: Any) -> tuple[Any, Any]:
        return flax_model.apply(
            {"params": params, **rest},
            x if flax_x is None else flax_x,
            capture_intermediates=True,
            mutable=mutable,
            **kwargs,
        )

    y_ans, vjp, state = jax.vjp(forward, params, has_aux=True)
    flax_outputs: dict[str, Any] = {
        default_torch_path(path[:-1]): value
        for path, value in flatten_tree(dict(state["intermediates"])).items()
        if path and path[-1] == "__call__"
    }
    flax_outputs[""] = (y_ans,)

    rows: list[LayerDiff] = []
    for name, calls in captured.items():
        if name not in flax_outputs:
            continue
        for i, (desired, actual) in enumerate(zip(calls, flax_outputs[name], strict=False)):
            actual_leaves = output_leaves(actual)
            for key, leaf in desired.items():
                quantity = key if i == 0 else f"{key} (call {i + 1})"
                if key not in actual_leaves:
                    rows.append(_missing(name, quantity, leaf.shape))
                    continue
                value = to_ref_layout(np.asarray(actual_leaves[key]))
                rows.append(_diff_row(name, quantity, value, leaf, rtol, atol))
    order = {name: i for i, name in enumerate(captured)}

    if gradients:
        cotangent = map_leaves(
            y_ans,
            lambda key, leaf: jnp.asarray(
                to_ref_layout_inverse(cotangents[key], channels_last)
                if key in cotangents
                else np.zeros(np.shape(leaf), np.result_type(leaf))
            ),
        )
        (grads,) = vjp(cotangent)
        rows += _compare_trees(
            from_torch(_grads_as_state(reference), kinds=_module_kinds(reference, kinds)),
            {"params": grads},
            "grad",
            order,
            rtol,
            atol,
        )
    if train and "batch_stats" in state:
        stats_ref = {"batch_stats": from_torch(reference, kinds=kinds).get("batch_stats", {})}
        rows += _compare_trees(
            stats_ref, {"batch_stats": state["batch_stats"]}, "", order, rtol, atol
        )

    with_params = {
        name
        for name, m in reference.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    }
    return ModelReport(
        rows=tuple(rows),
        unmatched_torch=tuple(sorted(with_params - set(flax_outputs))),
        unmatched_flax=tuple(sorted(set(flax_outputs) - set(captured))),
        rtol=rtol,
        atol=atol,
    )


def to_ref_layout_inverse(a: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(a, 1, -1) if channels_last and a.ndim > 2 else a


def _diff_row(
    layer: str, quantity: str, actual: Any, desired: Any, rtol: float, atol: float
) -> LayerDiff:
    """One row; the tolerance scales with the tensor's largest value, since
    activations and gradients are sums whose rounding follows their scale."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    scale = float(np.max(np.abs(desired.astype(np.float64)), initial=0.0))
    max_abs, failure = compare(actual, desired, rtol=0.0, atol=atol + rtol * scale)
    relative = max_abs / scale if scale else max_abs
    return LayerDiff(layer, quantity, tuple(desired.shape), max_abs, relative, not failure, failure)


def _compare_trees(
    desired: Mapping[str, Any],
    actual: Mapping[str, Any],
    prefix: str,
    order: Mapping[str, int],
    rtol: float,
    atol: float,
) -> list[LayerDiff]:
    """Rows for matching leaves of two variable trees, in execution order of their layers."""
    flat_desired, flat_actual = flatten_tree(desired), flatten_tree(actual)
    names = {p.flax: p.torch for kind in LAYERS.values() for p in kind}
    rows = []
    for key in sorted(
        flat_desired, key=lambda k: (order.get(default_torch_path(k[1:-1]), len(order)), k)
    ):
        layer = default_torch_path(key[1:-1])
        torch_name = names.get(key[-1], key[-1])
        quantity = f"{prefix} {torch_name}".strip()
        if key not in flat_actual:
            rows.append(
                LayerDiff(
                    layer, quantity, (), math.inf, math.inf, False, "missing on the Flax side"
                )
            )
            continue
        rows.append(_diff_row(layer, quantity, flat_actual[key], flat_desired[key], rtol, atol))
    return rows


def _grads_as_state(model: torch.nn.Module) -> dict[str, Any]:
    torch = import_torch()
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }


def _module_kinds(model: torch.nn.Module, kinds: Mapping[str, str] | None) -> dict[str, str]:
    """The kind of every layer with parameters, as the converter reads the live model.

    A state dict of gradients alone could not say (a lone 1-D weight, a bare
    parameter); the module can.
    """
    entries = inspect(model, kinds=kinds).entries
    return {entry.torch_key.rpartition(".")[0]: entry.kind for entry in entries}


def _missing(layer: str, quantity: str, shape: tuple[int, ...]) -> LayerDiff:
    return LayerDiff(
        layer, quantity, tuple(shape), math.inf, math.inf, False, "missing on the Flax side"
    )


def output_leaves(tree: Any, prefix: str = "output") -> dict[str, Any]:
    """The named leaves of a model output, torch's or Flax's alike.

    A tensor or array is one leaf (``'output'``); tuples, lists, namedtuples
    and dicts name theirs (``'output[0]'``, ``'output.logits'``,
    ``"output['out']"``); None is no leaf.
    """
    if tree is None:
        return {}
    children = _children(tree)
    if children is None:
        return {prefix: tree}
    leaves: dict[str, Any] = {}
    for suffix, value in children:
        leaves |= output_leaves(value, prefix + suffix)
    return leaves


def map_leaves(tree: Any, fn: Callable[[str, Any], Any], prefix: str = "output") -> Any:
    """``tree`` with each leaf replaced by ``fn(name, leaf)``, names as :func:`output_leaves`."""
    if tree is None:
        return None
    children = _children(tree)
    if children is None:
        return fn(prefix, tree)
    values = [map_leaves(value, fn, prefix + suffix) for suffix, value in children]
    if isinstance(tree, Mapping):
        return dict(zip(tree, values, strict=True))
    fields = getattr(tree, "_fields", None)
    return type(tree)(*values) if fields is not None else type(tree)(values)


def _children(tree: Any) -> list[tuple[str, Any]] | None:
    """``[(name suffix, child)]`` of a container output, None for a leaf."""
    fields = getattr(tree, "_fields", None) if isinstance(tree, tuple) else None
    if fields is not None:
        return [(f".{field}", getattr(tree, field)) for field in fields]
    if isinstance(tree, (tuple, list)):
        return [(f"[{i}]", value) for i, value in enumerate(tree)]
    if isinstance(tree, Mapping):
        return [(f"[{key!r}]", value) for key, value in tree.items()]
    return None
