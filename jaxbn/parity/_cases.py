"""The single-layer sweep: torch BatchNorm layers against their jaxbn twins.

A :class:`Case` names a layer kind and PyTorch options; :func:`run_case`
builds a ``torch.nn.BatchNorm*d`` with random weights and statistics, the
jaxbn twin holding the same values, runs training steps on drifting inputs
with a random upstream gradient, then eval steps, and records the largest
difference of every output, gradient and running statistic. This is what
``jaxbn parity`` runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .. import _linen
from .._torch import import_torch, to_numpy, to_tensor
from .._version import __version__
from ..convert import LAYERS, from_torch
from ._compare import TOLERANCES, compare

if TYPE_CHECKING:
    import torch


# jaxbn's variable names -> PyTorch's state-dict names, from the converter's table.
TORCH_NAMES = {p.flax: p.torch for p in LAYERS["BatchNorm"]}
PARAMS = tuple(p.flax for p in LAYERS["BatchNorm"] if p.collection == "params")


@dataclasses.dataclass(frozen=True)
class Kind:
    """A layer kind: the jaxbn and torch class names and an input shape.

    ``channels_last`` kinds run :class:`jaxbn.BatchNorm` with ``axis=-1``
    against torch on the input with its last axis moved to 1.
    """

    name: str
    jax_layer: str
    torch_layer: str
    shape: tuple[int, ...]
    channels_last: bool = False

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.channels_last else self.shape[1]

    @property
    def axis(self) -> int:
        return len(self.shape) - 1 if self.channels_last else 1

    def to_torch_layout(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        return np.moveaxis(x, -1, 1) if self.channels_last else x


KINDS = {
    kind.name: kind
    for kind in [
        Kind("1d-NC", "BatchNorm1d", "BatchNorm1d", (16, 5)),
        Kind("1d-NCL", "BatchNorm1d", "BatchNorm1d", (4, 5, 7)),
        Kind("2d", "BatchNorm2d", "BatchNorm2d", (4, 5, 6, 3)),
        Kind("3d", "BatchNorm3d", "BatchNorm3d", (2, 5, 3, 4, 2)),
        Kind("channels-last", "BatchNorm", "BatchNorm2d", (4, 6, 3, 5), True),
    ]
}


@dataclasses.dataclass(frozen=True)
class Options:
    """PyTorch constructor options, mirrored on the jaxbn side."""

    momentum: float | None = 0.1
    eps: float = 1e-5
    affine: bool = True
    use_bias: bool = True
    track_running_stats: bool = True
    dtype: str = "float32"  # of the input
    param_dtype: str | None = None  # None: float32 for half inputs, else dtype

    @property
    def parameter_dtype(self) -> str:
        if self.param_dtype is not None:
            return self.param_dtype
        return "float32" if self.dtype in ("bfloat16", "float16") else self.dtype


def torch_tensors(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A torch BatchNorm's parameters and buffers, under jaxbn's names."""
    state = dict(ref.named_parameters()) | dict(ref.named_buffers())
    return {ours: state[theirs] for ours, theirs in TORCH_NAMES.items() if theirs in state}


def variables_of(ref: torch.nn.Module) -> dict[str, Any]:
    """The jaxbn variable tree holding a torch BatchNorm's tensors."""
    return from_torch(ref)


def make_pair(
    kind: Kind, options: Options, seed: int = 0
) -> tuple[torch.nn.Module, flax.linen.Module, dict[str, Any]]:
    """A torch layer with random weights and statistics, and its jaxbn twin."""
    torch = import_torch()
    torch.manual_seed(seed)
    param_dtype = options.parameter_dtype
    # `bias=` is new in torch 2.13; pass it only when it matters.
    no_bias = {} if options.use_bias else {"bias": False}
    ref = getattr(torch.nn, kind.torch_layer)(
        kind.channels,
        eps=options.eps,
        momentum=options.momentum,
        affine=options.affine,
        track_running_stats=options.track_running_stats,
        dtype=getattr(torch, param_dtype),
        **no_bias,
    )
    with torch.no_grad():
        tensors = torch_tensors(ref)
        for name in PARAMS:
            if name in tensors:
                tensors[name].copy_(torch.randn_like(tensors[name]) * 0.5 + 1.0)
        if options.track_running_stats:
            tensors["mean"].copy_(torch.randn_like(tensors["mean"]))
            tensors["var"].copy_(torch.rand_like(tensors["var"]) + 0.5)
            tensors["num_batches_tracked"].fill_(3)
    extra: dict[str, Any] = {"axis": -1} if kind.channels_last else {}
    ans = getattr(_linen, kind.jax_layer)(
        num_features=kind.channels,
        eps=options.eps,
        momentum=options.momentum,
        affine=options.affine,
        use_bias=options.use_bias,
        track_running_stats=options.track_running_stats,
        param_dtype=jnp.dtype(param_dtype),
        **extra,
    )
    return ref, ans, variables_of(ref)


class Step(NamedTuple):
    """What one forward/backward produced, on either side."""

    y: Any
    grads: dict[str, Any]  # 'x', and 'scale'/'bias' when present
    stats: dict[str, Any]  # 'mean', 'var', 'num_batches_tracked' when tracked


def torch_step(ref: torch.nn.Module, x: np.ndarray, g: np.ndarray, *, training: bool) -> Step:
    """Forward ``x`` through the torch layer and backward the cotangent ``g``."""
    ref.train(training)
    xt = to_tensor(x).requires_grad_(True)
    y = ref(xt)
    y.backward(to_tensor(g))
    tensors = torch_tensors(ref)
    grads = {"x": xt.grad}
    for name in PARAMS:
        if name in tensors:
            grads[name] = tensors[name].grad
            tensors[name].grad = None
    stats = {name: t.clone() for name, t in tensors.items() if name not in PARAMS}
    return Step(y.detach(), grads, stats)


def jax_step_fn(
    layer: flax.linen.Module, *, training: bool, jit: bool
) -> Callable[..., tuple[Step, Any]]:
    """A function ``(variables, x, g) -> (Step, new_variables)`` for ``layer``."""

    def step(variables: dict[str, Any], x: jax.Array, g: jax.Array) -> tuple[Step, Any]:
        params = variables.get("params", {})
        rest = {k: v for k, v in variables.items() if k != "params"}

        def forward(params: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            return layer.apply(
                {"params": params, **rest},
                x,
                use_running_average=not training,
                mutable=["batch_stats"],
            )

        y, vjp, updates = jax.vjp(forward, params, x, has_aux=True)
        dparams, dx = vjp(g)
        new_variables = {**variables, **updates}
        stats = dict(new_variables.get("batch_stats", {}))
        return Step(y, {"x": dx, **dparams}, stats), new_variables

    return jax.jit(step) if jit else step


def drifting_batches(kind: Kind, steps: int, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """Inputs whose per-channel mean and scale drift from step to step."""
    rng = np.random.default_rng(seed)
    per_channel = [1] * len(kind.shape)
    per_channel[kind.axis] = kind.channels
    batches = []
    for t in range(steps):
        scale = rng.uniform(0.5, 3.0, per_channel) * (1 + 0.3 * t)
        shift = rng.uniform(-3.0, 3.0, per_channel) + 0.5 * t
        x = rng.standard_normal(kind.shape) * scale + shift
        batches.append(x.astype(np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else dtype))
    return batches


def cotangents(like: list[np.ndarray], seed: int = 1) -> list[np.ndarray]:
    """Random upstream gradients, one per batch."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(x.shape).astype(x.dtype) for x in like]


def step_quantities(ans: Step, ref: Step, kind: Kind) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{quantity: (jaxbn value, torch value)}`` for one step, in torch's layout."""
    pairs = {"y": (kind.to_torch_layout(ans.y), to_numpy(ref.y))}
    for name, desired in ref.grads.items():
        actual = np.asarray(ans.grads[name])
        pairs[f"d{name}"] = (
            kind.to_torch_layout(actual) if name == "x" else actual,
            to_numpy(desired),
        )
    for name, desired in ref.stats.items():
        pairs[name] = (np.asarray(ans.stats[name]), to_numpy(desired))
    missing = (set(ans.grads) ^ set(ref.grads)) | (set(ans.stats) ^ set(ref.stats))
    if missing:
        raise AssertionError(
            f"jaxbn and torch disagree on which quantities exist: {sorted(missing)}"
        )
    return pairs


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity case: a layer kind, PyTorch options, jit or not."""

    kind: Kind
    options: Options
    jit: bool = True
    train_steps: int = 10
    eval_steps: int = 3

    @property
    def name(self) -> str:
        o = self.options
        affine = "affine" if o.affine and o.use_bias else "no-bias" if o.affine else "no-affine"
        tracking = f"momentum={o.momentum}" if o.track_running_stats else "untracked"
        parts = [self.kind.name, affine, tracking, o.dtype, "jit" if self.jit else "eager"]
        return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """Largest |jaxbn - torch| of each quantity over all steps of a case."""

    case: Case
    max_abs_diff: dict[str, float]
    passed: bool
    failures: tuple[str, ...]  # 'step 3 dx: 2.1e-04 at (0, 1, 2, 0)', ...
    seconds: float

    def tolerances(self) -> dict[str, dict[str, float]]:
        """What each quantity was held to: every element within ``atol + rtol * |torch|``."""
        return {q: tolerance_of(q, self.case.options.dtype) for q in self.max_abs_diff}

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case.name,
            "options": dataclasses.asdict(self.case.options),
            "jit": self.case.jit,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerances(),
            "passed": self.passed,
            "failures": list(self.failures),
            "seconds": round(self.seconds, 3),
        }


def run_case(case: Case, seed: int = 0) -> CaseResult:
    """Train then eval both layers; compare everything after every step."""
    if case.options.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        with jax.enable_x64(True):
            return run_case(case, seed)
    start = time.perf_counter()
    kind, options = case.kind, case.options
    ref, ans, variables = make_pair(kind, options, seed)
    batches = drifting_batches(kind, case.train_steps + case.eval_steps, options.dtype, seed)
    train = jax_step_fn(ans, training=True, jit=case.jit)
    evaluate = jax_step_fn(ans, training=False, jit=case.jit)
    tolerance = TOLERANCES[options.dtype]
    worst: dict[str, float] = {}
    failures: list[str] = []
    for t, (x, g) in enumerate(zip(batches, cotangents(batches, seed + 1), strict=True)):
        training = t < case.train_steps
        step_ref = torch_step(
            ref, kind.to_torch_layout(x), kind.to_torch_layout(g), training=training
        )
        step_ans, variables = (train if training else evaluate)(variables, x, g)
        for name, (actual, desired) in step_quantities(step_ans, step_ref, kind).items():
            diff, failure = compare(actual, desired, **tolerance)
            worst[name] = max(worst.get(name, 0.0), diff)
            if failure:
                failures.append(f"{'train' if training else 'eval'} step {t} {name}: {failure}")
    return CaseResult(case, worst, not failures, tuple(failures), time.perf_counter() - start)


AFFINE = {
    "affine": {"affine": True, "use_bias": True},
    "no-bias": {"affine": True, "use_bias": False},
    "no-affine": {"affine": False},
}
TRACKING = {
    "momentum=0.1": {"momentum": 0.1},
    "momentum=0.5": {"momentum": 0.5},
    "momentum=None": {"momentum": None},
    "untracked": {"track_running_stats": False},
}


def builtin_cases() -> list[Case]:
    """Every layer kind x affine/bias x momentum {0.1, 0.5, None}/untracked, jitted,
    plus eager and float64 spot checks."""
    cases = [
        Case(kind, Options(**affine, **tracking))
        for kind, affine, tracking in itertools.product(
            KINDS.values(), AFFINE.values(), TRACKING.values()
        )
    ]
    cases += [Case(kind, Options(momentum=None), jit=False) for kind in KINDS.values()]
    cases += [Case(kind, Options(dtype="float64")) for kind in KINDS.values()]
    return cases


QUANTITIES = ("y", "dx", "dscale", "dbias", "mean", "var", "num_batches_tracked")
HEADERS = {"num_batches_tracked": "batches"}
EXACT = ("num_batches_tracked",)  # integers: compared exactly


def tolerance_of(quantity: str, dtype: str) -> dict[str, float]:
    """``{'rtol', 'atol'}`` a quantity of a case in ``dtype`` is held to."""
    if quantity in EXACT:
        return {"rtol": 0.0, "atol": 0.0}
    return dict(TOLERANCES[dtype])


def format_table(results: Iterable[CaseResult]) -> str:
    """A fixed-width table: one row per case, max |jaxbn - torch| per quantity.

    A legend under it gives the tolerance each quantity was held to.
    """
    results = list(results)
    headers = ["case", *(HEADERS.get(q, q) for q in QUANTITIES), "result"]
    rows = [
        [
            r.case.name,
            *(f"{r.max_abs_diff[q]:.1e}" if q in r.max_abs_diff else "-" for q in QUANTITIES),
            "pass" if r.passed else "FAIL",
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    # Over the quantity columns: what their numbers are.
    title = " " * (widths[0] + 2) + "max |jaxbn - torch| over every training and eval step"
    out = [title, line(headers), line(["-" * w for w in widths]), *map(line, rows)]
    dtypes = sorted({r.case.options.dtype for r in results})
    held = "; ".join(
        f"{dtype}: atol = rtol = {TOLERANCES[dtype]['atol']:g}"
        if TOLERANCES[dtype]["atol"] == TOLERANCES[dtype]["rtol"]
        else f"{dtype}: atol = {TOLERANCES[dtype]['atol']:g}, rtol = {TOLERANCES[dtype]['rtol']:g}"
        for dtype in dtypes
    )
    out.append(
        f"\npass: every element within atol + rtol * |torch| ({held}; "
        f"{', '.join(HEADERS.get(q, q) for q in EXACT)} exact), so large values may "
        "differ by more than atol."
    )
    failed = [r for r in results if not r.passed]
    out.append(f"\n{len(results) - len(failed)} of {len(results)} cases passed.")
    for r in failed:
        out.extend(f"FAIL {r.case.name}: {failure}" for failure in r.failures[:3])
    return "\n".join(out)


def run(
    cases: Iterable[Case], on_result: Callable[[int, int, CaseResult], None] | None = None
) -> list[CaseResult]:
    """Run ``cases`` in order; ``on_result(index, total, result)`` after each."""
    cases = list(cases)
    results = []
    for i, case in enumerate(cases):
        results.append(run_case(case))
        if on_result is not None:
            on_result(i + 1, len(cases), results[-1])
    return results


def environment() -> Mapping[str, str]:
    """Versions the results were produced with."""
    torch = import_torch()
    return {
        "jaxbn": __version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "backend": jax.default_backend(),
    }
