"""The whole-model harness: a torch model and its Flax port, layer by layer."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict as flatten_tree

from .._torch import import_torch, to_numpy, to_tensor
from ..convert import LAYERS, default_torch_path, from_torch, inspect
from ._compare import compare

if TYPE_CHECKING:
    import torch


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorms have random weights and statistics, and whose
    dropout probabilities are 0: the model to compare a port with.

    At init a BatchNorm's weight is 1, its bias, mean 0, its variance 1, so a
    port that mixes them up (or ignores eps, or the statistics) still agrees
    with torch; random values, with ``num_batches_tracked`` 7, do not. Each
    module with ``running_mean`` and ``running_var`` (torch's BatchNorms,
    ``FrozenBatchNorm2d``, timm's) gets weight and variance in [0.5, 1.5),
    bias and mean from N(0, 0.2^2); dropout goes as in
    :func:`jaxbn.port.without_dropout`, since torch's and JAX's masks cannot agree.

    >>> import torch
    >>> bn = randomized(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))[0]
    >>> int(bn.num_batches_tracked), bool((bn.running_var != 1).all())
    (7, True)
    """
    from jaxbn.port import without_dropout

    torch = import_torch()
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: Any, lo: float, hi: float) -> None:
        if t is not None:
            t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (hi - lo) + lo)

    def normal(t: Any, std: float) -> None:
        if t is not None:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)

    quiet = without_dropout(model)
    with torch.no_grad():
        for module in quiet.modules():
            m = cast(Any, module)
            if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
                continue
            uniform(getattr(m, "weight", None), 0.5, 1.5)
            normal(getattr(m, "bias", None), 0.2)
            normal(m.running_mean, 0.2)
            uniform(m.running_var, 0.5, 1.5)
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(7)
    return quiet


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
    # reference='float64': torch's own (float32) max |diff| from the float64 run
    torch_max_abs: float | None = None
    scale: float = 0.0  # max |torch| (of the reference run)


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """Per-layer differences, in torch's execution order, and the first divergence."""

    rows: tuple[LayerDiff, ...]
    unmatched_torch: tuple[str, ...]  # torch modules with parameters and no Flax twin
    unmatched_flax: tuple[str, ...]  # Flax modules with no torch twin
    rtol: float
    atol: float
    factor: float | None = None  # reference='float64': allowed multiple of torch's own error
    # Activations whose input jax put on the other side of a kink, within
    # float32 rounding of it: 'layer1.0.relu (call 2): 1 element'. The
    # gradients were then compared with a float64 run on jax's sides.
    kinks: tuple[str, ...] = ()
    # BatchNorms that normalised few values per channel in the training step (<= 16):
    # (torch path, values). float32 is ill-conditioned there, so their tensors may
    # differ from the float64 run by more than elsewhere; a larger input is the fix.
    few_values: tuple[tuple[str, int], ...] = ()

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def worst(self) -> dict[str, tuple[float, float]]:
        """The largest error relative to its tensor's scale, jax's and torch's own, per
        kind: ``'output'`` (the model's), ``'running statistics'``, ``'gradients'``.

        A tensor (nearly) zero in exact arithmetic (the gradient of a bias
        that a BatchNorm follows) is measured against 1e-3 of the largest
        tensor of its kind, not against its own rounding noise. torch's own
        error is there with ``reference='float64'`` (else 0).
        """
        kinds: dict[str, list[LayerDiff]] = {}
        for row in self.rows:
            if row.quantity.startswith("grad"):
                kinds.setdefault("gradients", []).append(row)
            elif row.layer == "" and row.quantity.startswith("output"):
                kinds.setdefault("output", []).append(row)
            elif not row.quantity.startswith("output"):
                kinds.setdefault("running statistics", []).append(row)
        worst = {}
        for kind, rows in kinds.items():
            floor = 1e-3 * max(row.scale for row in rows)

            def relative(error: float | None, row: LayerDiff, floor: float = floor) -> float:
                return (error or 0.0) / (max(row.scale, floor) or 1.0)

            worst[kind] = (
                max(relative(row.max_abs, row) for row in rows),
                max(relative(row.torch_max_abs, row) for row in rows),
            )
        return worst

    @property
    def first_divergence(self) -> LayerDiff | None:
        return next((row for row in self.rows if not row.ok), None)

    def summary(self) -> str:
        first = self.first_divergence
        within = f"rtol={self.rtol}, atol={self.atol}"
        if self.factor is not None:
            within = f"{self.factor:g}x torch's own float32 error (vs float64) + {within}"
        followed = (
            "; gradients against a float64 run on jax's side of the kink where an "
            f"activation input is within float32 rounding of it ({', '.join(self.kinks)})"
            if self.kinks
            else ""
        )
        if first is None:
            return f"{len(self.rows)} quantities within {within}{followed}"
        theirs = "" if first.torch_max_abs is None else f" (torch's own {first.torch_max_abs:.2e})"
        small = self._small_input(first)
        return (
            f"first divergence at {first.layer or '<output>'} ({first.quantity}): "
            f"max |diff| {first.max_abs:.2e}{theirs}, relative {first.max_rel:.2e}"
            f"{followed}{small}"
        )

    def _small_input(self, first: LayerDiff) -> str:
        """The note for a first divergence at, after or (a gradient) behind a BatchNorm
        that normalised few values per channel; '' for one before them all."""
        few = dict(self.few_values)
        if first.layer in few:
            name = first.layer
        else:
            at = self.rows.index(first)
            behind = [
                row.layer
                for row in self.rows[:at]
                if row.layer in few and row.quantity.startswith("output")
            ]
            if not (behind or (few and first.quantity.startswith("grad"))):
                return ""
            name = min(behind or few, key=lambda layer: few[layer])
        return (
            f"; {name} normalises only {_plural(few[name], 'value')} per channel in this "
            "training step, where float32 rounding grows: try a larger input (batch or "
            "spatial size)"
        )

    def table(self) -> str:
        first = self.first_divergence

        def cells(row: LayerDiff) -> tuple[str, ...]:
            verdict = ("<-- first divergence" if row is first else "FAIL") if not row.ok else "ok"
            theirs = "-" if row.torch_max_abs is None else f"{row.torch_max_abs:.2e}"
            shape = "x".join(map(str, row.shape)) or "scalar"
            measured = (f"{row.max_abs:.2e}", f"{row.max_rel:.2e}")
            if self.factor is not None:  # torch's own distance from the float64 run too
                measured += (theirs,)
            return (row.layer or "<output>", row.quantity, shape, *measured, verdict)

        headers = ("layer", "quantity", "shape", "max|diff|", "relative")
        if self.factor is not None:
            headers += ("torch's own",)
        headers += ("",)
        rows = [cells(row) for row in self.rows]
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
    reference: Literal["same", "float64"] = "same",
    factor: float = 8.0,
) -> ModelReport:
    """Run a torch model and its Flax port on the same input; compare layer by layer.

    Intermediate outputs are captured with forward hooks on every torch
    module and ``capture_intermediates`` on the Flax side (jitted), and
    matched by path (torch ``layer1.0.conv1`` <-> Flax ``layer1/0/conv1``, the
    converter's default rule). Rows come in torch's execution order, so the
    first row beyond tolerance is the first layer that diverges.

    Args:
      torch_model: the reference; it is deep-copied, so its buffers and
        gradients are left as they were.
      flax_model: the port.
      variables: its variables.
      x: the input, in torch's layout (numpy or torch), or a tuple of the inputs of a
        model that takes several (RAFT's two images).
      train: run a training step (torch ``train()``; pass the Flax model's own
        flag in ``flax_kwargs``, e.g. ``{'train': True}``). Updated running
        statistics are then compared too.
      flax_x: the Flax model's input, if it differs from ``x`` (e.g. NHWC).
      flax_kwargs: extra keyword arguments for the Flax model's ``__call__``.
      channels_last: Flax activations are (N, ..., C); compare them with
        torch's (N, C, ...) by moving the last axis to 1.
      gradients: also compare the gradients of every parameter torch trains
        (``requires_grad``), through a random upstream gradient on the output.
      rtol: relative tolerance per tensor, ``|diff| <= atol + rtol * max|torch|``.
      atol: absolute tolerance per tensor, as for ``rtol``.
      seed: for the upstream gradients (one per floating-point output leaf).
      kinds: layer-kind overrides for the converter, as in
        :func:`jaxbn.from_torch` (e.g. ``'Param'`` for a module's bare
        parameters).
      reference: ``'same'`` compares with torch in the model's own dtype.
        ``'float64'`` runs torch twice, in float64 (the reference) and in its
        own dtype: the measure for training steps of deep float32 nets,
        where rounding alone moves torch's own gradients by 1e-2. A tensor
        then passes when its distance from float64, relative to its largest
        value (at least 1e-3 of the largest of its kind), is within
        ``factor`` times the worst such error torch's own run makes on a
        tensor of the same kind (outputs, gradients, running statistics),
        plus ``rtol`` (relative) and ``atol``. Integers must match exactly.
        The rows also give torch's own distance.
        Where a gradient fails and an activation input (``nn.ReLU``,
        ``ReLU6``, ``Hardtanh``) lies within float32 rounding of the kink,
        jax on one side and float64 on the other (its output within
        ``factor`` x torch's own error on that tensor), the gradients are
        compared with a float64 run whose gradient takes jax's side at those
        elements (values unchanged; torch's own error still measured on its
        own sides), and :attr:`ModelReport.kinks` names them.
      factor: see ``reference``.

    The output may be any pytree (a tensor, tuple, namedtuple such as
    GoogLeNet's, dict): every leaf is compared (``output.logits``,
    ``output.aux_logits1``, ...), and a leaf torch has and Flax lacks fails.

    Returns:
      A :class:`ModelReport`; ``report.table()`` prints it.
    """
    torch = import_torch()
    if reference not in ("same", "float64"):
        raise ValueError(f"reference must be 'same' or 'float64', got {reference!r}")
    xs = tuple(
        to_numpy(a) if isinstance(a, torch.Tensor) else np.asarray(a)
        for a in (x if isinstance(x, (tuple, list)) else (x,))
    )
    own = _TorchRun(torch_model, xs, train, gradients, seed, kinds)
    ref = own.again(torch.float64) if reference == "float64" else own
    tolerance = _Tolerance(rtol, atol, factor if reference == "float64" else None)
    ans = _FlaxRun(
        flax_model, variables, xs if flax_x is None else (flax_x,), own.cotangents,
        train=train, gradients=gradients, channels_last=channels_last, kwargs=flax_kwargs,
    )  # fmt: skip
    step = _Rows(own, ans, tolerance, _module_kinds(own.model, kinds, variables), ref)

    rows = step.outputs(ref)
    gradients_at = slice(len(rows), len(rows))  # where the gradient rows are
    if ans.grads is not None:
        rows += step.gradients(ref)
        gradients_at = slice(gradients_at.start, len(rows))
    if train and "batch_stats" in ans.state:
        rows += step.statistics(ref)
    rows, kinks = step.following_kinks(rows, gradients_at, ref)
    with_params = {
        name
        for name, m in own.model.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    }
    return ModelReport(
        rows=tuple(rows),
        unmatched_torch=tuple(sorted(with_params - set(ans.outputs))),
        unmatched_flax=tuple(sorted(set(ans.outputs) - set(ref.captured))),
        rtol=rtol,
        atol=atol,
        factor=tolerance.factor,
        kinks=tuple(kinks),
        few_values=tuple((name, n) for name, n in own.values_per_channel.items() if n <= 16),
    )


class _FlaxRun:
    """The Flax model's one jitted forward (and backward of torch's upstream gradients)
    beside the torch run: every module's output by torch path, the updated state, the
    parameter gradients (None without ``gradients``)."""

    def __init__(
        self,
        model: flax.linen.Module,
        variables: Mapping[str, Any],
        xs: tuple[Any, ...],
        cotangents: Mapping[str, np.ndarray],
        *,
        train: bool,
        gradients: bool,
        channels_last: bool,
        kwargs: Mapping[str, Any] | None,
    ) -> None:
        mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
        params = variables.get("params", {})
        rest = {k: v for k, v in variables.items() if k != "params"}

        def forward(params: Any, xs: Any) -> Any:
            return model.apply(
                {"params": params, **rest}, *xs, capture_intermediates=True, mutable=mutable,
                **dict(kwargs or {}),
            )  # fmt: skip

        def step(params: Any, xs: Any, cotangents: Any) -> Any:
            """The forward and, with ``gradients``, the backward of torch's cotangents:
            one program (compiling the two apart took 20-30% longer)."""
            if not gradients:
                return (*forward(params, xs), None)
            y, vjp, state = jax.vjp(lambda p: forward(p, xs), params, has_aux=True)
            cotangent = map_leaves(
                y,
                lambda key, leaf: (
                    jnp.asarray(to_ref_layout_inverse(cotangents[key], channels_last))
                    if key in cotangents
                    else jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf))
                ),
            )
            return y, state, vjp(cotangent)[0]

        xs = tuple(jnp.asarray(a) for a in xs)
        y, self.state, self.grads = jax.jit(step)(params, xs, dict(cotangents))
        self.outputs: dict[str, Any] = {
            default_torch_path(path[:-1]): value
            for path, value in flatten_tree(dict(self.state["intermediates"])).items()
            if path and path[-1] == "__call__"
        }
        self.outputs[""] = (y,)
        self.channels_last = channels_last

    def to_ref_layout(self, a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, -1, 1) if self.channels_last and a.ndim > 2 else a


class _Rows:
    """The report's rows, step by step: outputs, gradients and running statistics of the
    Flax run against a torch reference run, and the gradients again where a kink was
    followed. ``own`` is torch in the model's dtype (its own error, with a float64
    reference)."""

    def __init__(
        self,
        own: _TorchRun,
        ans: _FlaxRun,
        tolerance: _Tolerance,
        kinds: Mapping[str, str],
        ref: _TorchRun,
    ) -> None:
        self.own, self.ans, self.tolerance, self.kinds = own, ans, tolerance, kinds
        self.order = {name: i for i, name in enumerate(ref.captured)}

    def outputs(self, ref: _TorchRun) -> list[LayerDiff]:
        """Every module's output, in execution order: a second call after what precedes it."""
        rows: list[LayerDiff] = []
        for name, i in ref.calls:
            if name not in self.ans.outputs or i >= len(self.ans.outputs[name]):
                continue
            actual_leaves = output_leaves(self.ans.outputs[name][i])
            for key, leaf in ref.captured[name][i].items():
                quantity = key if i == 0 else f"{key} (call {i + 1})"
                if key not in actual_leaves:
                    rows.append(_missing(name, quantity, leaf.shape))
                    continue
                value = self.ans.to_ref_layout(np.asarray(actual_leaves[key]))
                theirs = self.own.captured[name][i][key] if ref is not self.own else None
                rows.append(self.tolerance.row(name, quantity, value, leaf, theirs))
        return rows

    def gradients(self, ref: _TorchRun) -> list[LayerDiff]:
        own = self.own.grads(self.kinds) if ref is not self.own else None
        return _compare_trees(
            ref.grads(self.kinds), {"params": self.ans.grads}, own, "grad", self.order,
            self.tolerance,
        )  # fmt: skip

    def statistics(self, ref: _TorchRun) -> list[LayerDiff]:
        own = self.own.stats(self.kinds) if ref is not self.own else None
        return _compare_trees(
            ref.stats(self.kinds), {"batch_stats": self.ans.state["batch_stats"]}, own, "",
            self.order, self.tolerance,
        )  # fmt: skip

    def following_kinks(
        self, rows: list[LayerDiff], gradients_at: slice, ref: _TorchRun
    ) -> tuple[list[LayerDiff], list[str]]:
        """The rows judged, and the kinks followed.

        A gradient may hinge on an activation input within float32 rounding of a
        kink (a ReLU input of 1e-7): float32 runs then take either side. Where a
        gradient fails, compare with a float64 run that takes jax's side there,
        torch's own error still measured on its own sides.
        """
        judged = self.tolerance.judge(rows)
        if ref is self.own or all(row.ok for row in judged[gradients_at]):
            return judged, []
        sides = _kink_sides(self.own, ref, self.ans.outputs, self.ans.to_ref_layout, self.tolerance)
        if not sides:
            return judged, []
        torch = import_torch()
        followed = self.gradients(ref.again(torch.float64, sides=sides))
        rows[gradients_at] = [
            dataclasses.replace(new, torch_max_abs=old.torch_max_abs, scale=old.scale)
            for old, new in zip(rows[gradients_at], followed, strict=True)
        ]
        kinks = [
            f"{name}{'' if i == 0 else f' (call {i + 1})'}: "
            f"{_plural(int(flipped.sum()), 'element')}"
            for name, calls in sides.items()
            for i, flipped in enumerate(calls)
            if flipped.any()
        ]
        return self.tolerance.judge(rows), kinks


class _TorchRun:
    """One torch forward (and backward) of a copy of the model, every module's output captured."""

    def __init__(
        self,
        model: torch.nn.Module,
        x: tuple[np.ndarray, ...],
        train: bool,
        gradients: bool,
        seed: int,
        kinds: Mapping[str, str] | None,
        cotangents: Mapping[str, np.ndarray] | None = None,
        dtype: Any = None,
        sides: Mapping[str, list[np.ndarray]] | None = None,
    ) -> None:
        torch = import_torch()
        self._args = (model, x, train, gradients, seed, kinds)
        self.model = copy.deepcopy(model).train(train)
        x_t = [to_tensor(a) for a in x]
        if dtype is not None:
            self.model.to(dtype)
            x_t = [a.to(dtype) if a.is_floating_point() else a for a in x_t]
        self.kinds = kinds
        self.captured: dict[str, list[dict[str, np.ndarray]]] = {}
        self.calls: list[tuple[str, int]] = []  # (module, its call number) as they finish
        # per BatchNorm in training, the fewest values per channel it normalised
        self.values_per_channel: dict[str, int] = {}
        handles = [
            m.register_forward_hook(self._hook(name)) for name, m in self.model.named_modules()
        ]
        modules = dict(self.model.named_modules())
        for name, flipped in (sides or {}).items():
            module = modules[name]
            if hasattr(module, "inplace"):
                cast(Any, module).inplace = False  # (a copy) the input stays, for the gradient
            handles.append(module.register_forward_hook(_other_side(flipped)))
        try:
            with _float_keeps_float64() if dtype == torch.float64 else contextlib.nullcontext():
                y = self.model(*x_t)
        finally:
            for handle in handles:
                handle.remove()
        outputs = {
            key: leaf
            for key, leaf in output_leaves(y).items()
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
        }
        if cotangents is None:
            rng = np.random.default_rng(seed)
            cotangents = {
                key: rng.standard_normal(tuple(leaf.shape)).astype(to_numpy(leaf).dtype)
                for key, leaf in outputs.items()
            }
        self.cotangents = dict(cotangents)
        if gradients:
            differentiable = [key for key, leaf in outputs.items() if leaf.requires_grad]
            torch.autograd.backward(
                [outputs[key] for key in differentiable],
                [to_tensor(self.cotangents[key]).to(outputs[key].dtype) for key in differentiable],
            )

    def again(self, dtype: Any, sides: Mapping[str, list[np.ndarray]] | None = None) -> _TorchRun:
        """The same run in another dtype, with the same upstream gradients.

        ``sides``: per kinked activation and call, the elements whose gradient
        takes the other side of the kink (see :func:`_kink_sides`).
        """
        return _TorchRun(*self._args, cotangents=self.cotangents, dtype=dtype, sides=sides)

    def _hook(self, name: str) -> Callable[..., None]:
        torch = import_torch()

        def record(module: Any, inputs: Any, output: Any) -> None:
            leaves = {
                key: to_numpy(leaf).copy()  # in-place ops later must not change it
                for key, leaf in output_leaves(output).items()
                if isinstance(leaf, torch.Tensor)
            }
            calls = self.captured.setdefault(name, [])
            self.calls.append((name, len(calls)))
            calls.append(leaves)
            if module.training and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                x = inputs[0]
                count = x.numel() // x.shape[1] if x.dim() > 1 else x.numel()
                self.values_per_channel[name] = min(count, self.values_per_channel.get(name, count))

        return record

    def grads(self, layer_kinds: Mapping[str, str]) -> dict[str, Any]:
        """The parameter gradients as Flax params, each layer read as ``layer_kinds`` says."""
        return from_torch(_grads_as_state(self.model), kinds=layer_kinds)

    def stats(self, layer_kinds: Mapping[str, str]) -> dict[str, Any]:
        """The running statistics, each layer read as ``layer_kinds`` says."""
        variables = from_torch(self.model, kinds=layer_kinds)
        return {"batch_stats": variables.get("batch_stats", {})}


@contextlib.contextmanager
def _float_keeps_float64() -> Iterator[None]:
    """In the float64 reference run, ``x.float()`` is ``x.double()``: a model that casts to
    float32 on purpose (RAFT's coordinate grid, attention in float32) would otherwise
    make its reference float32 there, or fail on the mix."""
    torch = import_torch()
    original = torch.Tensor.float
    torch.Tensor.float = torch.Tensor.double  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.float = original  # type: ignore[method-assign]


@dataclasses.dataclass(frozen=True)
class _Tolerance:
    """When a Flax value is close enough to torch's: fixed, or relative to torch's own error."""

    rtol: float
    atol: float
    factor: float | None  # None: a fixed tolerance; else within factor x torch's own error

    def row(
        self, layer: str, quantity: str, actual: Any, desired: Any, theirs: Any = None
    ) -> LayerDiff:
        """One row; the tolerance scales with the tensor's largest value, since
        activations and gradients are sums whose rounding follows their scale.

        With ``theirs`` (torch's own run, against a float64 ``desired``) a
        floating-point row is only measured here and judged by :meth:`judge`.
        """
        actual, desired = np.asarray(actual), np.asarray(desired)
        shape = tuple(desired.shape)
        scale = float(np.max(np.abs(desired.astype(np.float64)), initial=0.0))
        bound = self.atol + self.rtol * scale
        torch_max_abs = None
        if theirs is not None:
            theirs = np.asarray(theirs)
            if not np.issubdtype(desired.dtype, np.integer):  # integers: exactly, here
                if actual.dtype != theirs.dtype:
                    failure = f"dtype {actual.dtype} != torch's {theirs.dtype}"
                    return LayerDiff(layer, quantity, shape, math.inf, math.inf, False, failure)
                torch_max_abs, _ = compare(theirs.astype(desired.dtype), desired, rtol=0, atol=0)
                actual, bound = actual.astype(desired.dtype), math.inf
        max_abs, failure = compare(actual, desired, rtol=0.0, atol=bound)
        relative = max_abs / scale if scale else max_abs
        return LayerDiff(
            layer, quantity, shape, max_abs, relative, not failure, failure, torch_max_abs, scale
        )

    def judge(self, rows: list[LayerDiff]) -> list[LayerDiff]:
        """Against float64: each row within ``factor`` x torch's own worst of its kind.

        torch's own error on one tensor is one sample of float32 noise (a
        gradient that is zero in exact arithmetic may come out exact in torch
        and 1e-7 in JAX), so the bar is the worst relative error torch's own
        run makes on a tensor of the same kind (outputs, gradients, running
        statistics), each tensor's error taken relative to its largest value
        but at least 1e-3 of the largest of its kind.
        """
        if self.factor is None:
            return rows
        kinds: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if row.torch_max_abs is not None:
                kinds.setdefault(_kind(row.quantity), []).append(i)
        rows = list(rows)
        for kind, members in kinds.items():
            floor = 1e-3 * max(rows[i].scale for i in members)

            def base(row: LayerDiff, floor: float = floor) -> float:
                return max(row.scale, floor) or 1.0

            own = max((rows[i].torch_max_abs or 0.0) / base(rows[i]) for i in members)
            for i in members:
                row = rows[i]
                bound = self.atol + base(row) * (self.factor * own + self.rtol)
                if row.ok and not row.max_abs <= bound:
                    rows[i] = dataclasses.replace(
                        row,
                        ok=False,
                        detail=(
                            f"max |diff| {row.max_abs:.2e} > {bound:.2e}: {self.factor:g}x "
                            f"torch's own worst relative error on {kind} ({own:.2e}), "
                            f"+ rtol={self.rtol}, atol={self.atol}"
                        ),
                    )
        return rows


def _kink_rules() -> dict[type, Callable[[Any, Any], Any]]:
    """Activations with a kink: which outputs (numpy or torch) lie where the gradient passes.

    Exact classes, as the port dispatches: a subclass may behave otherwise.
    """
    nn = import_torch().nn

    def between(module: Any, y: Any) -> Any:
        return (y > module.min_val) & (y < module.max_val)

    return {nn.ReLU: lambda module, y: y > 0, nn.ReLU6: between, nn.Hardtanh: between}


def _kink_sides(
    own: _TorchRun,
    ref: _TorchRun,
    flax_outputs: Mapping[str, Any],
    to_ref_layout: Callable[[np.ndarray], np.ndarray],
    tolerance: _Tolerance,
) -> dict[str, list[np.ndarray]]:
    """Per kinked activation and call: where jax's output is on the other side of
    the kink than float64's, though within float32 rounding of it.

    Such an element's output is near the kink in both runs (the activations
    are continuous), so it is within ``factor`` x torch's own error on that
    tensor of float64's (the bar has no ``rtol``/``atol`` terms: only
    rounding counts); only its gradient differs. A port error shows as a
    larger difference, in this row or in the layers before.
    """
    assert tolerance.factor is not None
    rules = _kink_rules()
    sides = {}
    for name, module in own.model.named_modules():
        rule = rules.get(type(module))
        if rule is None or name not in flax_outputs:
            continue
        calls = []
        for desired, theirs, actual in zip(
            ref.captured[name], own.captured[name], flax_outputs[name], strict=False
        ):
            exact = desired["output"]
            ours = output_leaves(actual).get("output")
            ours = None if ours is None else to_ref_layout(np.asarray(ours))
            # torch's own float32 error on this tensor, and factor x it
            bound = tolerance.factor * np.max(
                np.abs(theirs["output"].astype(exact.dtype) - exact), initial=0.0
            )
            if ours is None or ours.shape != exact.shape or not np.isfinite(bound):
                calls.append(np.zeros(exact.shape, bool))  # a failed row already, or overflow
                continue
            # Each side in its own dtype: jax clips at float32(0.7), float64 at 0.7.
            other = rule(module, ours) != rule(module, exact)
            calls.append(other & (np.abs(ours.astype(exact.dtype) - exact) <= bound))
        if any(flipped.any() for flipped in calls):
            sides[name] = calls
    return sides


def _other_side(flipped: list[np.ndarray]) -> Callable[..., Any]:
    """A forward hook for a kinked activation: at the ``flipped`` elements of each
    call, the gradient takes the other side of the kink; the values stay."""
    torch = import_torch()
    rule = _kink_rules()
    calls = iter(flipped)

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        here = torch.as_tensor(next(calls, np.zeros(output.shape, bool)))
        passes = rule[type(module)](module, output.detach()).to(output.dtype)
        x = inputs[0]
        # (x - x.detach()) is 0 and carries x's gradient: +1 where float64's
        # side stops it, -1 where it passes it.
        return output + torch.where(here, (1 - 2 * passes) * (x - x.detach()), 0)

    return hook


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _kind(quantity: str) -> str:
    if quantity.startswith("grad"):
        return "gradients"
    return "outputs" if quantity.startswith("output") else "running statistics"


def to_ref_layout_inverse(a: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(a, 1, -1) if channels_last and a.ndim > 2 else a


def _compare_trees(
    desired: Mapping[str, Any],
    actual: Mapping[str, Any],
    theirs: Mapping[str, Any] | None,
    prefix: str,
    order: Mapping[str, int],
    tolerance: _Tolerance,
) -> list[LayerDiff]:
    """Rows for matching leaves of two variable trees, in execution order of their layers."""
    flat_desired, flat_actual = flatten_tree(desired), flatten_tree(actual)
    flat_theirs = flatten_tree(theirs) if theirs is not None else {}
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
        rows.append(
            tolerance.row(
                layer, quantity, flat_actual[key], flat_desired[key], flat_theirs.get(key)
            )
        )
    return rows


def _grads_as_state(model: torch.nn.Module) -> dict[str, Any]:
    """The gradient of every parameter torch trains: one with ``requires_grad=False``
    (a detection backbone's frozen stem) has none to compare."""
    torch = import_torch()
    return {
        name: (p.grad if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _module_kinds(
    model: torch.nn.Module, kinds: Mapping[str, str] | None, template: Any
) -> dict[str, str]:
    """The kind of every layer with parameters, as the converter reads the live model
    against the Flax variables.

    A state dict of gradients alone could not say (a lone 1-D weight, a bare
    parameter); the module can, and the template places a module's own
    parameters (a relative position table) where the port has them.
    """
    entries = inspect(model, template, kinds=kinds).entries
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
