"""Outputs, gradients and running statistics against torch.nn.BatchNorm*d.

Each case builds both layers from the same random weights and statistics,
runs training steps on drifting inputs with random upstream gradients, then
eval steps, and compares everything after every step.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import numpy as np
import optax
import pytest
import torch

import jaxbn
from jaxbn.parity import AFFINE, KINDS, TRACKING, Options, to_torch, variables_of

from .helpers import assert_close, run_case


def sweep() -> list[Any]:
    """Every kind x affine x tracking x eager/jit.

    The fast lane (``-m "not slow"``) keeps every kind with the default
    options and every option on 2d, jitted; the rest of the sweep is slow
    (CI runs it all).
    """
    params = []
    for (k, kind), (a, affine), (t, tracking), jit in itertools.product(
        KINDS.items(), AFFINE.items(), TRACKING.items(), (False, True)
    ):
        fast = jit and (k == "2d" or (a == "affine" and t == "momentum=0.1"))
        params.append(
            pytest.param(
                kind,
                affine,
                tracking,
                jit,
                id=f"{k}-{a}-{t}-{'jit' if jit else 'eager'}",
                marks=() if fast else pytest.mark.slow,
            )
        )
    return params


@pytest.mark.parametrize(("kind", "affine", "tracking", "jit"), sweep())
def test_train_then_eval_matches_torch(kind, affine, tracking, jit):
    run_case(kind, Options(**affine, **tracking), jit=jit)


@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_eps_matches_torch(eps):
    run_case(KINDS["2d"], Options(eps=eps), jit=True)


def test_defaults_match_torch():
    """Fresh layers: the same parameters, statistics and first step."""
    ref = torch.nn.BatchNorm2d(4)
    layer = jaxbn.BatchNorm2d(4)
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 5)).astype(np.float32)
    variables = layer.init(jax.random.key(0), x, use_running_average=False)
    ref_variables = variables_of(ref)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, ref_variables)
    for collection, leaves in ref_variables.items():
        for name, desired in leaves.items():
            np.testing.assert_array_equal(variables[collection][name], desired, err_msg=name)
    y_ans, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    y_ref = ref(to_torch(x))
    assert_close(y_ans, y_ref, what="y")
    for name, desired in variables_of(ref)["batch_stats"].items():
        assert_close(updates["batch_stats"][name], desired, what=name)


def test_classic_handwritten_batchnorm2d_comparison():
    """The classic check: 10 SGD steps on randn(10,3,100,100)*scale+bias, then 10 eval steps.

    Running mean/var, weight, bias and outputs are compared after every step.
    """
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3)
    layer = jaxbn.BatchNorm2d(3)
    variables = variables_of(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ans = optax.sgd(0.1)
    opt_state = opt_ans.init(variables["params"])
    rng = np.random.default_rng(0)

    @jax.jit
    def train_step(variables, opt_state, x, target):
        def loss(params):
            y, updates = layer.apply(
                {**variables, "params": params},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return ((y - target) ** 2).mean(), (y, updates)

        grads, (y, updates) = jax.grad(loss, has_aux=True)(variables["params"])
        change, opt_state = opt_ans.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], change)
        return y, {"params": params, **updates}, opt_state

    for step in range(20):
        scale = rng.integers(1, 10)
        shift = rng.integers(-10, 10)
        x = (rng.standard_normal((10, 3, 100, 100)) * scale + shift).astype(np.float32)
        target = rng.standard_normal(x.shape).astype(np.float32)
        if step < 10:
            ref.train()
            y_ref = ref(to_torch(x))
            opt_ref.zero_grad()
            ((y_ref - to_torch(target)) ** 2).mean().backward()
            opt_ref.step()
            y_ans, variables, opt_state = train_step(variables, opt_state, x, target)
        else:
            ref.eval()
            with torch.no_grad():
                y_ref = ref(to_torch(x))
            y_ans = layer.apply(variables, x, use_running_average=True)
        assert_close(y_ans, y_ref, what=f"step {step} output")
        desired = variables_of(ref)
        for collection in ("params", "batch_stats"):
            for name, value in desired[collection].items():
                assert_close(variables[collection][name], value, what=f"step {step} {name}")
