"""Bad input: the same exception type and message as PyTorch, plus the fix.

Each case runs the same input through torch and through jaxbn (eager and
under jit, where the error must be raised at trace time), checks that both
raise the same exception type with PyTorch's message, and that jaxbn's
message also names what was received and how to fix it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.parity import to_torch, variables_of

from .helpers import TORCH_DTYPES


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad call: the layers, the input, and what both must say."""

    torch_cls: type[torch.nn.Module]
    jax_cls: type[Any]
    shape: tuple[int, ...]
    error: type[Exception]
    torch_message: str  # a regex both messages match
    fix: str  # a regex only jaxbn's message must match
    training: bool = True
    dtype: str = "float32"
    options: tuple[tuple[str, Any], ...] = ()


BN1, BN2, BN3 = torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d
J1, J2, J3 = jaxbn.BatchNorm1d, jaxbn.BatchNorm2d, jaxbn.BatchNorm3d
ONE_VALUE = r"Expected more than 1 value per channel when training, got input size"

CASES = {
    "one-value-1d-NC": Bad(BN1, J1, (1, 3), ValueError, ONE_VALUE, r"\(1, 3\).*larger batch"),
    "one-value-1d-NCL": Bad(BN1, J1, (1, 3, 1), ValueError, ONE_VALUE, r"\(1, 3, 1\)"),
    "one-value-2d": Bad(BN2, J2, (1, 3, 1, 1), ValueError, ONE_VALUE, r"\(1, 3, 1, 1\)"),
    "one-value-3d": Bad(BN3, J3, (1, 3, 1, 1, 1), ValueError, ONE_VALUE, r"larger batch"),
    "one-value-untracked-eval": Bad(
        BN2,
        J2,
        (1, 3, 1, 1),
        ValueError,
        ONE_VALUE,
        r"\(1, 3, 1, 1\)",
        training=False,
        options=(("track_running_stats", False),),
    ),
    "rank-1d": Bad(
        BN1, J1, (2, 3, 4, 5), ValueError, r"expected 2D or 3D input \(got 4D input\)", r"\(N, C\)"
    ),
    "rank-2d": Bad(
        BN2, J2, (2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)", r"\(N, C, H, W\)"
    ),
    "rank-3d": Bad(
        BN3,
        J3,
        (2, 3, 4, 5),
        ValueError,
        r"expected 5D input \(got 4D input\)",
        r"\(N, C, D, H, W\).*axis=-1",
    ),
    "rank-2d-eval": Bad(
        BN2, J2, (3, 4), ValueError, r"expected 4D input \(got 2D input\)", r"\(3, 4\)", False
    ),
    "channels-train": Bad(
        BN2,
        J2,
        (2, 4, 3, 3),
        RuntimeError,
        r"running_mean should contain 4 elements not 3",
        r"4 channels on axis 1.*num_features=4",
    ),
    "channels-eval": Bad(
        BN1,
        J1,
        (2, 4),
        RuntimeError,
        r"running_mean should contain 4 elements not 3",
        r"\(2, 4\)",
        training=False,
    ),
    "channels-untracked": Bad(
        BN2,
        J2,
        (2, 4, 3, 3),
        RuntimeError,
        r"weight should contain 4 elements not 3",
        r"scale has shape \(3,\); bias has shape \(3,\)",
        options=(("track_running_stats", False),),
    ),
    "eps-zero-train": Bad(
        BN2,
        J2,
        (2, 3, 2, 2),
        ValueError,
        r"batch_norm eps must be positive during training, but got 0\.0",
        r"1e-5",
        options=(("eps", 0.0),),
    ),
    "eps-negative-train": Bad(
        BN1,
        J1,
        (4, 3),
        ValueError,
        r"batch_norm eps must be positive during training, but got -0\.5",
        r"1e-5",
        options=(("eps", -0.5),),
    ),
    "eps-zero-untracked-eval": Bad(
        BN1,
        J1,
        (4, 3),
        ValueError,
        r"batch_norm eps must be positive during training, but got 0\.0",
        r"positive eps",
        training=False,
        options=(("eps", 0.0), ("track_running_stats", False)),
    ),
    "eps-negative-eval": Bad(
        BN2,
        J2,
        (2, 3, 2, 2),
        ValueError,
        r"batch_norm eps must be non-negative, but got -1\.0",
        r"eps >= 0",
        training=False,
        options=(("eps", -1.0),),
    ),
    "int-input": Bad(
        BN2,
        J2,
        (2, 3, 2, 2),
        NotImplementedError,
        r'"batch_norm" not implemented for',
        r"int32.*astype",
        dtype="int32",
    ),
    "float64-input-float32-params": Bad(
        BN2,
        J2,
        (2, 3, 2, 2),
        RuntimeError,
        r"mixed dtype",
        r"float64 but got stats.mean float32, stats.var float32, scale float32.*param_dtype",
        dtype="float64",
    ),
}


def torch_layer(case: Bad) -> torch.nn.Module:
    ref = case.torch_cls(3, **dict(case.options))
    ref.train(case.training)
    return ref


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_error_matches_torch(case: Bad, jit: bool):
    # float64 inputs need jax_enable_x64; the rest run in jax's default mode.
    with jax.enable_x64(case.dtype == "float64"):
        check_error_matches_torch(case, jit)


def check_error_matches_torch(case: Bad, jit: bool) -> None:
    x = np.ones(case.shape, case.dtype)
    ref = torch_layer(case)
    with pytest.raises(case.error, match=case.torch_message):
        ref(to_torch(x))

    variables = variables_of(ref)
    layer = case.jax_cls(**dict(case.options))

    def apply(variables, x):
        return layer.apply(
            variables, x, use_running_average=not case.training, mutable=["batch_stats"]
        )

    with pytest.raises(case.error, match=case.torch_message) as caught:
        (jax.jit(apply) if jit else apply)(variables, jnp.asarray(x))
    assert re.search(case.fix, str(caught.value)), str(caught.value)


@pytest.mark.parametrize(
    ("axis", "message"),
    [
        (3, r"`axis=3` is out of range for a 3-D input of shape \(2, 3, 4\).*\[-3, 2\]"),
        (-4, r"`axis=-4` is out of range for a 3-D input"),
        ((1, 2), r"`axis` must be a single int.*got \(1, 2\).*axis=1"),
    ],
)
def test_axis_errors(axis, message):
    x = jnp.ones((2, 3, 4))
    with pytest.raises((ValueError, TypeError), match=message):
        jaxbn.batch_norm(x, None, training=True, axis=axis)
    with pytest.raises((ValueError, TypeError), match=message):
        jaxbn.BatchNorm(axis=axis, use_running_average=False).init(jax.random.key(0), x)


def test_scalar_input_error():
    with pytest.raises(ValueError, match=r"0-D \(scalar\) input"):
        jaxbn.batch_norm(jnp.float32(1.0), None, training=True, axis=0)


def test_use_running_average_needed_once():
    x = jnp.ones((4, 3))
    with pytest.raises(
        ValueError, match=r"BatchNorm1d needs use_running_average.*False for a training step"
    ):
        jaxbn.BatchNorm1d().init(jax.random.key(0), x)
    layer = jaxbn.BatchNorm1d(use_running_average=True)
    with pytest.raises(
        ValueError, match=r"both as a field \(True\) and as a call argument \(False\)"
    ):
        layer.init(jax.random.key(0), x, use_running_average=False)


def test_training_step_needs_mutable_batch_stats():
    layer = jaxbn.BatchNorm2d(3)
    x = jnp.ones((2, 3, 2, 2))
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(
        ValueError, match=r"'batch_stats' is not mutable.*mutable=\['batch_stats'\]"
    ):
        layer.apply(variables, x, use_running_average=False)


def test_num_features_checked_without_variables():
    """No parameters or statistics to disagree with: num_features still must."""
    layer = jaxbn.BatchNorm1d(3, affine=False, track_running_stats=False)
    with pytest.raises(
        RuntimeError, match=r"BatchNorm1d\(num_features=3\).*4 channels.*num_features=4"
    ):
        layer.apply({}, jnp.ones((2, 4)))


def test_num_features_checked_at_init():
    with pytest.raises(RuntimeError, match=r"running_mean should contain 4 elements not 3"):
        jaxbn.BatchNorm2d(3, use_running_average=False).init(
            jax.random.key(0), jnp.ones((2, 4, 1, 1))
        )


@pytest.mark.parametrize(
    ("x_dtype", "param_dtype"),
    [
        ("float32", "bfloat16"),
        ("float32", "float16"),
        ("float16", "bfloat16"),
        ("bfloat16", "float16"),
    ],
)
def test_mixed_dtypes_rejected_like_torch(x_dtype, param_dtype):
    ref = torch.nn.BatchNorm1d(3, dtype=TORCH_DTYPES[param_dtype])
    x = torch.ones(4, 3, dtype=TORCH_DTYPES[x_dtype])
    with pytest.raises(RuntimeError, match="mixed dtype"):
        ref(x)
    layer = jaxbn.BatchNorm1d(3, param_dtype=jnp.dtype(param_dtype))
    with pytest.raises(RuntimeError, match=rf"mixed dtype: input `x` is {x_dtype}"):
        layer.apply(
            variables_of(ref), jnp.ones((4, 3), x_dtype), use_running_average=False, mutable=True
        )


def test_half_stats_with_float32_params_rejected_like_torch():
    """All of scale, bias and statistics must share one dtype."""
    x = torch.ones(4, 3, dtype=torch.bfloat16)
    args = (torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(x, *args, training=True)
    stats = jaxbn.BatchStats(jnp.zeros(3), jnp.ones(3), jnp.zeros((), jnp.int32))
    with pytest.raises(
        RuntimeError, match=r"stats.mean float32, stats.var float32, scale bfloat16\."
    ):
        jaxbn.batch_norm(
            jnp.ones((4, 3), jnp.bfloat16), stats, jnp.ones(3, jnp.bfloat16), training=True, axis=1
        )


FLAX_LOOKING = (
    r"momentum={} is the weight of the \*new\* batch .* their momentum={} is jaxbn's momentum={}"
)
OUT_OF_RANGE = r"momentum={} is outside \[0, 1\]\. .* Use a value in \[0, 1\]"
SUSPICIOUS_MOMENTA = {
    0.9: FLAX_LOOKING.format(0.9, 0.9, 0.1),
    0.99: FLAX_LOOKING.format(0.99, 0.99, 0.01),
    0.999: FLAX_LOOKING.format(0.999, 0.999, 0.001),
    1.5: OUT_OF_RANGE.format(1.5),
    -0.1: OUT_OF_RANGE.format(-0.1),
}


def test_one_value_error_names_the_eval_argument_of_the_api_in_use():
    x = jnp.ones((1, 3))
    with pytest.raises(ValueError, match=r"larger batch, or evaluate with training=False\.$"):
        jaxbn.batch_norm(x, jaxbn.BatchStats.create(3), training=True, axis=1)
    linen = jaxbn.BatchNorm1d(3)
    variables = linen.init(jax.random.key(0), x, use_running_average=True)
    with pytest.raises(
        ValueError,
        match=r"evaluate with use_running_average=True \(train=False on a jaxbn\.port model\)\.",
    ):
        linen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    with pytest.raises(ValueError, match=r"evaluate with model\.eval\(\)"):
        jaxbn.nnx.BatchNorm1d(3)(x)
    # The layer's hint does not leak into later functional calls.
    with pytest.raises(ValueError, match=r"evaluate with training=False\.$"):
        jaxbn.batch_norm(x, None, training=True, axis=1)


@pytest.mark.parametrize("momentum", SUSPICIOUS_MOMENTA, ids=str)
def test_suspicious_momentum_warns_at_init_at_the_users_line(momentum):
    """At init, before any training step, pointing at this file rather than jaxbn's."""
    message = SUSPICIOUS_MOMENTA[momentum]
    x = jnp.ones((4, 3))
    with pytest.warns(UserWarning, match=message) as linen:
        jaxbn.BatchNorm1d(3, momentum=momentum).init(
            jax.random.key(0), x, use_running_average=False
        )
    with pytest.warns(UserWarning, match=message) as nnx:
        jaxbn.nnx.BatchNorm1d(3, momentum=momentum)
    with pytest.warns(UserWarning, match=message) as functional:
        jaxbn.batch_norm(x, jaxbn.BatchStats.create(3), training=True, momentum=momentum, axis=1)
    for caught in (linen, nnx, functional):
        assert [w.filename for w in caught] == [__file__]
    assert "their momentum=1.5 is jaxbn's" not in str(linen[0].message)


def test_momentum_warning_points_at_the_line_inside_a_users_model():
    """Through Flax's module machinery and jit: the line that calls the layer."""

    lines = set()

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            lines.add(inspect.currentframe().f_lineno + 1)  # pyright: ignore[reportOptionalMemberAccess]
            return jaxbn.BatchNorm(momentum=0.9, use_running_average=not train)(x)

    model = Model()
    x = jnp.arange(12.0).reshape(4, 3)
    with pytest.warns(UserWarning, match="momentum=0.9") as at_init:
        variables = model.init(jax.random.key(0), x, train=False)
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    with pytest.warns(UserWarning, match="momentum=0.9") as at_step:
        step(variables, x)
    (line,) = lines
    for caught in (at_init, at_step):
        assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0, None])
def test_ordinary_momentum_does_not_warn(momentum):
    layer = jaxbn.BatchNorm1d(3, momentum=momentum)
    x = jnp.ones((4, 3))
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
