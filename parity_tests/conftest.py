"""Shared helpers: torch <-> numpy, one comparison helper, reference/answer steps.

Everything here compares jaxbn with the real ``torch`` package.
"""

from __future__ import annotations

import os

# Eight CPU devices for the cross-device tests; must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jaxbn

jax.config.update("jax_numpy_dtype_promotion", "strict")
torch.use_deterministic_algorithms(True)

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Measured against torch 2.13 (CPU) on ordinary inputs: outputs agree to
# ~5e-7 and gradients to ~1e-6 in float32; 1e-5 leaves a wide margin.
TOLERANCES = {
    "float32": {"rtol": 1e-5, "atol": 1e-5},
    "float64": {"rtol": 1e-10, "atol": 1e-10},
    "int32": {"rtol": 0, "atol": 0},
    "int64": {"rtol": 0, "atol": 0},
}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy, keeping bfloat16 (via ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: Any) -> torch.Tensor:
    """A numpy/jax array as a torch tensor, keeping bfloat16."""
    a = np.asarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def assert_close(actual: Any, desired: Any, *, what: str = "", **tolerance: float) -> None:
    """``actual`` (jaxbn) against ``desired`` (torch) with per-dtype tolerances.

    On failure, prints both dtypes and the worst element with its index.
    """
    if isinstance(desired, torch.Tensor):
        desired = to_numpy(desired)
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype} != {desired.dtype}"
    tol = TOLERANCES[str(desired.dtype)] | tolerance
    a, d = actual.astype(np.float64), desired.astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.abs(a - d)
        bad = ~(err <= tol["atol"] + tol["rtol"] * np.abs(d))
    # NaN and inf must sit in the same places with the same signs.
    bad &= ~((a == d) | (np.isnan(a) & np.isnan(d)))
    if bad.any():
        index = np.unravel_index(
            np.argmax(np.where(bad, np.nan_to_num(err, nan=np.inf), -1)), bad.shape
        )
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements differ beyond {tol} "
            f"(dtypes {actual.dtype} vs {desired.dtype}); worst at {tuple(map(int, index))}: "
            f"jaxbn {a[index]!r} vs torch {d[index]!r}"
        )


@dataclasses.dataclass(frozen=True)
class Kind:
    """One layer kind: the jaxbn module, the torch module, the input layout."""

    name: str
    jax_cls: type[flax.linen.Module]
    torch_cls: type[torch.nn.Module]
    shape: tuple[int, ...]
    channels_last: bool = False

    def to_torch_layout(self, x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, -1, 1) if self.channels_last else x

    def from_torch_layout(self, x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, 1, -1) if self.channels_last else x

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.channels_last else self.shape[1]


KINDS = {
    kind.name: kind
    for kind in [
        Kind("1d-NC", jaxbn.BatchNorm1d, torch.nn.BatchNorm1d, (16, 5)),
        Kind("1d-NCL", jaxbn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 7)),
        Kind("2d", jaxbn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 6, 3)),
        Kind("3d", jaxbn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 4, 2)),
        Kind("channels-last", jaxbn.BatchNorm, torch.nn.BatchNorm2d, (4, 6, 3, 5), True),
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


def make_pair(
    kind: Kind, options: Options, seed: int = 0
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A torch layer with random weights and statistics, and its jaxbn twin."""
    torch.manual_seed(seed)
    param_dtype = options.param_dtype or (
        "float32" if options.dtype in ("bfloat16", "float16") else options.dtype
    )
    ref = kind.torch_cls(
        kind.channels,
        eps=options.eps,
        momentum=options.momentum,
        affine=options.affine,
        track_running_stats=options.track_running_stats,
        bias=options.use_bias,
        dtype=TORCH_DTYPES[param_dtype],
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
    ans = kind.jax_cls(
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


# jaxbn's variable names -> PyTorch's state-dict names.
TORCH_NAMES = {
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
PARAMS = ("scale", "bias")


def torch_tensors(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A torch BatchNorm's parameters and buffers, under jaxbn's names."""
    state = dict(ref.named_parameters()) | dict(ref.named_buffers())
    return {ours: state[theirs] for ours, theirs in TORCH_NAMES.items() if theirs in state}


def variables_of(ref: torch.nn.Module) -> dict[str, Any]:
    """The jaxbn variable tree holding a torch BatchNorm's tensors."""
    variables: dict[str, Any] = {}
    for name, tensor in torch_tensors(ref).items():
        collection = "params" if name in PARAMS else "batch_stats"
        value = to_numpy(tensor)
        if name == "num_batches_tracked":
            value = value.astype(jax.dtypes.canonicalize_dtype(jnp.int64))
        variables.setdefault(collection, {})[name] = jnp.asarray(value)
    return variables


class Step(NamedTuple):
    """What one forward/backward produced, on either side."""

    y: Any
    grads: dict[str, Any]  # 'x', and 'scale'/'bias' when present
    stats: dict[str, Any]  # 'mean', 'var', 'num_batches_tracked' when tracked


def torch_step(ref: torch.nn.Module, x: np.ndarray, g: np.ndarray, *, training: bool) -> Step:
    """Forward ``x`` through the torch layer and backward the cotangent ``g``."""
    ref.train(training)
    xt = to_torch(x).requires_grad_(True)
    y = ref(xt)
    y.backward(to_torch(g))
    tensors = torch_tensors(ref)
    grads = {"x": xt.grad}
    for name in PARAMS:
        if name in tensors:
            grads[name] = tensors[name].grad
            tensors[name].grad = None
    stats = {name: t.clone() for name, t in tensors.items() if name not in PARAMS}
    return Step(y.detach(), grads, stats)


def jax_step_fn(layer: Any, *, training: bool, jit: bool) -> Callable[..., tuple[Step, Any]]:
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


def compare_steps(ans: Step, ref: Step, kind: Kind, *, what: str, **tolerance: float) -> None:
    """Every output, gradient and running statistic of one step."""
    assert_close(kind.to_torch_layout(np.asarray(ans.y)), ref.y, what=f"{what} y", **tolerance)
    assert ans.grads.keys() == ref.grads.keys(), what
    for name, desired in ref.grads.items():
        actual = np.asarray(ans.grads[name])
        if name == "x":
            actual = kind.to_torch_layout(actual)
        assert_close(actual, desired, what=f"{what} d{name}", **tolerance)
    assert ans.stats.keys() == ref.stats.keys(), what
    for name, desired in ref.stats.items():
        if name == "num_batches_tracked":
            assert int(ans.stats[name]) == int(desired), f"{what} {name}"
        else:
            assert_close(ans.stats[name], desired, what=f"{what} running {name}", **tolerance)


def shifting_batches(kind: Kind, steps: int, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """Inputs whose per-channel mean and scale drift from step to step."""
    rng = np.random.default_rng(seed)
    shape = kind.shape
    axis = len(shape) - 1 if kind.channels_last else 1
    per_channel = [1] * len(shape)
    per_channel[axis] = kind.channels
    batches = []
    for t in range(steps):
        scale = rng.uniform(0.5, 3.0, per_channel) * (1 + 0.3 * t)
        shift = rng.uniform(-3.0, 3.0, per_channel) + 0.5 * t
        x = rng.standard_normal(shape) * scale + shift
        batches.append(x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype))
    return batches


def cotangents(like: list[np.ndarray], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(x.shape).astype(x.dtype) for x in like]


@pytest.fixture
def x64():
    """Enable jax_enable_x64 for one test."""
    with jax.enable_x64(True):
        yield
