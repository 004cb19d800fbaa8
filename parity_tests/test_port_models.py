"""jaxbn.port against the real torchvision (and timm): every BatchNorm classifier.

Each model is built with ``weights=None``, its BatchNorm weights and running
statistics randomised and every dropout probability set to 0. Then against
torch, for the ported model: the eval output, one training step's output,
every running statistic after it (``num_batches_tracked`` exactly), every
parameter gradient, and a strict round trip of the variables. Deep float32
nets differ from torch by more than rounding of one layer, so both jax
float32 and torch float32 are measured against a float64 torch run, and
jax's error must stay within a small factor of torch's own.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxbn
from jaxbn.parity import compare_models

# jax float32's error against torch float64 may be this many times torch
# float32's own, plus a floor for quantities torch gets (nearly) exact.
FACTOR = 8.0
FLOOR = 2e-6


def _torchvision(name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        # GoogLeNet/Inception warn that their default init will change; the
        # test randomises what matters, so skip scipy's slow truncated normal.
        if name in ("googlenet", "inception_v3"):
            kwargs.setdefault("init_weights", False)
        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False)

    return build


def _small_vgg() -> torch.nn.Module:
    """torchvision's vgg11_bn with 64-wide hidden classifier layers instead of 4096.

    The features (every BatchNorm), the adaptive pooling to 7x7 and the NCHW
    flatten into a 25088-wide Linear are torchvision's; only the 120M
    classifier weights, which need no BatchNorm to test, are made small.
    """
    model = torchvision.models.vgg11_bn(weights=None)
    model.classifier[0] = torch.nn.Linear(512 * 7 * 7, 64)
    model.classifier[3] = torch.nn.Linear(64, 64)
    model.classifier[6] = torch.nn.Linear(64, 1000)
    return model


# name -> (factory, input shape). Inputs are as small as the model allows;
# where the last BatchNorms would see only 4 values per channel (1x1
# activations), the training step is so ill-conditioned that torch float32
# itself is 10-100% off float64, so those models get 64x64 inputs.
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
    "resnet18": (_torchvision("resnet18"), (4, 3, 32, 32)),
    "resnet50": (_torchvision("resnet50"), (4, 3, 32, 32)),
    "resnext50_32x4d": (_torchvision("resnext50_32x4d"), (4, 3, 32, 32)),
    "wide_resnet50_2": (_torchvision("wide_resnet50_2"), (4, 3, 32, 32)),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), (4, 3, 64, 64)),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), (4, 3, 32, 32)),
    "mobilenet_v3_large": (_torchvision("mobilenet_v3_large"), (4, 3, 32, 32)),
    "efficientnet_b0": (_torchvision("efficientnet_b0"), (4, 3, 32, 32)),
    "efficientnet_v2_s": (_torchvision("efficientnet_v2_s"), (4, 3, 32, 32)),
    "regnet_x_400mf": (_torchvision("regnet_x_400mf"), (4, 3, 64, 64)),
    "regnet_y_400mf": (_torchvision("regnet_y_400mf"), (4, 3, 64, 64)),
    "densenet121": (_torchvision("densenet121"), (4, 3, 64, 64)),
    "shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0"), (4, 3, 64, 64)),
    "mnasnet0_5": (_torchvision("mnasnet0_5"), (4, 3, 32, 32)),
    "vgg11_bn": (_small_vgg, (4, 3, 32, 32)),
    "googlenet": (_torchvision("googlenet"), (4, 3, 32, 32)),
    # Inception's auxiliary head needs 299x299 inputs in training (its 5x5
    # conv after a stride-3 pool); GoogLeNet covers auxiliary heads.
    "inception_v3": (_torchvision("inception_v3", aux_logits=False), (2, 3, 75, 75)),
    "resnet18_frozen_bn": (
        _torchvision("resnet18", norm_layer=torchvision.ops.FrozenBatchNorm2d),
        (4, 3, 32, 32),
    ),
    # timm: BatchNormAct2d (BatchNorm2d + drop + act, its own table row) and
    # Hardswish/SE blocks; a ResNet-D (deep stem, average-pool shortcuts).
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), (4, 3, 64, 64)),
    "timm_resnet18d": (_timm("resnet18d"), (4, 3, 32, 32)),
}
FAST = {"resnet18", "mobilenet_v3_small", "googlenet", "resnet18_frozen_bn"}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm weights and statistics; every dropout probability 0."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (hi - lo) + lo)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)

    with torch.no_grad():
        for module in model.modules():
            m = cast(Any, module)  # BatchNorm, FrozenBatchNorm2d, Dropout alike
            if isinstance(
                module, (torch.nn.modules.batchnorm._NormBase, torchvision.ops.FrozenBatchNorm2d)
            ):
                uniform(m.weight, 0.5, 1.5)
                normal(m.bias, 0.2)
                normal(m.running_mean, 0.2)
                uniform(m.running_var, 0.5, 1.5)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.fill_(7)
            if (
                isinstance(module, torch.nn.Dropout)
                or type(module) is torchvision.ops.StochasticDepth
            ):
                m.p = 0.0
            if hasattr(m, "drop_rate"):  # DenseNet's functional dropout
                m.drop_rate = 0.0
    return model


def _leaves(y: Any) -> list[Any]:
    return list(y) if isinstance(y, tuple) else [y]


def _structure(y: Any) -> Any:
    """A tensor -> 'array'; a namedtuple -> its class name and fields."""
    return (type(y).__name__, getattr(y, "_fields", None)) if isinstance(y, tuple) else "array"


def torch_run(model: torch.nn.Module, x: np.ndarray, seed: int = 1) -> dict[str, Any]:
    """Eval output, then one training step: output, gradients, statistics after it."""
    model = copy.deepcopy(model)
    dtype = next(model.parameters()).dtype
    xt = torch.from_numpy(x).to(dtype)
    model.eval()
    with torch.no_grad():
        eval_out = [t.numpy() for t in _leaves(model(xt))]
    model.train()
    y = model(xt)
    rng = np.random.default_rng(seed)
    loss: Any = sum(
        (t * torch.from_numpy(rng.standard_normal(t.shape)).to(dtype)).sum() for t in _leaves(y)
    )
    loss.backward()
    return {
        "eval": eval_out,
        "train": [t.detach().numpy() for t in _leaves(y)],
        "structure": _structure(y),
        "grads": {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None},
        "stats": {k: b.numpy() for k, b in model.named_buffers()},
        "model": model,
    }


def _jitted(module: Any) -> tuple[Any, Any]:
    evaluate = jax.jit(lambda v, x: module.apply(v, x, train=False))

    def step(params: Any, rest: Any, x: Any, cotangents: Any) -> Any:
        def loss(params: Any) -> Any:
            y, updates = module.apply(
                {"params": params, **rest}, x, train=True, mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )  # fmt: skip
            total = sum(jnp.vdot(a, g) for a, g in zip(_leaves(y), cotangents, strict=True))
            return total, (y, updates)

        return jax.grad(loss, has_aux=True)(params)

    return evaluate, jax.jit(step)


def jax_run(
    ported: jaxbn.Ported, x: np.ndarray, reference: dict[str, Any], seed: int = 1
) -> dict[str, Any]:
    evaluate, step = _jitted(ported.module)
    params = ported.variables["params"]
    rest = {k: v for k, v in ported.variables.items() if k != "params"}
    rng = np.random.default_rng(seed)
    cotangents = [rng.standard_normal(t.shape).astype(np.float32) for t in reference["train"]]
    eval_out = evaluate(ported.variables, x)
    grads, (y, updates) = step(params, rest, x, cotangents)
    variables = {"params": params, **rest, **updates}
    return {
        "eval": [np.asarray(a) for a in _leaves(eval_out)],
        "train": [np.asarray(a) for a in _leaves(y)],
        "structure": _structure(y),
        "grads": jaxbn.to_torch({"params": grads}),
        "variables": variables,
    }


def _max_abs(a: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64)), initial=0.0))


def worst(pairs: dict[str, tuple[Any, Any]]) -> tuple[float, str]:
    """The largest error relative to its tensor's scale, and where.

    A tensor that is (nearly) zero in exact arithmetic (the gradient of a
    bias followed by a BatchNorm) is measured against 1e-3 of the largest
    tensor of its kind instead of its own rounding noise.
    """
    floor = 1e-3 * max(_max_abs(d) for _, d in pairs.values())
    errors = {}
    for key, (actual, desired) in pairs.items():
        actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
        assert actual.shape == desired.shape, (key, actual.shape, desired.shape)
        errors[key] = _max_abs(actual - desired) / (max(_max_abs(desired), floor) or 1.0)
    key = max(errors, key=errors.__getitem__)
    return errors[key], key


RESULTS: dict[str, dict[str, Any]] = {}


def check_model(name: str) -> dict[str, Any]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = randomise(factory())
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    start = time.perf_counter()
    ported = jaxbn.port(model, torch.from_numpy(x))
    # the variables are exactly the converter's, with the port's own template
    # (which flattens in torch's order, so the converter's flatten warning is moot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxbn.convert.LayoutWarning)
        assert jaxbn.from_torch(model, ported.variables) is not None
    ref64 = torch_run(copy.deepcopy(model).double(), x)
    ref32 = torch_run(model, x)
    ans = jax_run(ported, x, ref32)
    assert ans["structure"] == ref32["structure"]

    state = jaxbn.to_torch(ans["variables"], model)  # strict, in the template's order
    fresh = factory()
    fresh.load_state_dict(state, strict=True)  # MNASNet checks the version metadata
    stats = {k: state[k].numpy() for k in ref64["stats"]}

    measured: dict[str, Any] = {}
    for quantity in ("eval", "train", "grads", "stats"):
        desired = ref64[quantity]
        keys = list(desired) if isinstance(desired, dict) else range(len(desired))
        actual: Any = stats if quantity == "stats" else ans[quantity]
        if quantity == "grads":
            actual = {k: v.numpy() for k, v in actual.items()}
            assert set(actual) == set(desired)
        ours = worst({str(k): (actual[k], desired[k]) for k in keys})
        theirs = worst({str(k): (ref32[quantity][k], desired[k]) for k in keys})
        measured[quantity] = (ours, theirs)
        assert ours[0] <= FACTOR * theirs[0] + FLOOR, (
            f"{name} {quantity}: jax float32 is {ours[0]:.2e} from torch float64 (worst: "
            f"{ours[1]}), torch float32 {theirs[0]:.2e} (worst: {theirs[1]})"
        )
    for key, value in ref32["stats"].items():
        if key.endswith("num_batches_tracked"):
            assert stats[key] == value == 8, key
    measured["seconds"] = time.perf_counter() - start
    RESULTS[name] = measured
    return measured


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODELS],
)
def test_ported_model_matches_torch(name):
    measured = check_model(name)
    print(name, {k: v for k, v in measured.items()})


# The harness runs eagerly, op by op with every intermediate captured: about
# 40 s per model here, so the suite runs it on the namedtuple-output GoogLeNet
# and one squeeze-excitation net (`jaxbn port` runs it on any model).
HARNESS = ("googlenet", "mobilenet_v3_small")


@pytest.mark.parametrize("name", HARNESS)
def test_layer_by_layer_harness_runs_on_the_port(name):
    """compare_models on a model and its port, in eval and in a training step.

    Eval is well conditioned: every layer within 1e-4. In a training step a
    deep float32 net is not (see test_ported_model_matches_torch, against
    float64); there the harness must run and report every output leaf
    (GoogLeNet's namedtuple included), every gradient and every statistic.
    """
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = randomise(factory())
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ported = jaxbn.port(model, torch.from_numpy(x))
    for train in (False, True):
        report = compare_models(
            model,
            ported.module,
            ported.variables,
            x,
            train=train,
            flax_kwargs={"train": train},
            gradients=train,
            rtol=1e-4,
            atol=1e-4,
        )
        quantities = {row.quantity for row in report.rows}
        assert any(q.startswith("output") for q in quantities), name
        if train:
            assert any(q.startswith("grad") for q in quantities), name
            assert "num_batches_tracked" in quantities or name == "resnet18_frozen_bn"
        else:
            assert report.ok, report.table()
