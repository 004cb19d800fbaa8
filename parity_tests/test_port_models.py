"""jaxbn.port against the real torchvision (and timm): every BatchNorm classifier.

Each model is built with ``weights=None``, its BatchNorm weights and running
statistics randomised and every dropout probability set to 0. Then the
layer-by-layer harness (``compare_models``) runs on the model and its port,
in eval and in one training step: every layer's output, the model's output
(namedtuples too), every running statistic (``num_batches_tracked``
exactly) and every parameter gradient; and the variables round-trip
strictly and bit-exactly. Deep float32 nets differ from torch by more than
rounding of one layer, so the harness measures both jax float32 and torch
float32 against a float64 torch run (``reference='float64'``), and jax's
error must stay within a small factor of torch's own.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

import jaxbn
from jaxbn.parity import LayerDiff, compare_models, randomized

from .helpers import assert_same_state, fast_lane

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
    # at the size its auxiliary head needs (a 5x5 conv after a stride-3 pool)
    "inception_v3": (_torchvision("inception_v3"), (2, 3, 299, 299)),
    "resnet18_frozen_bn": (
        _torchvision("resnet18", norm_layer=torchvision.ops.FrozenBatchNorm2d),
        (4, 3, 32, 32),
    ),
    # timm: BatchNormAct2d (BatchNorm2d + drop + act, its own table row) and
    # Hardswish/SE blocks; a ResNet-D (deep stem, average-pool shortcuts).
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), (4, 3, 64, 64)),
    "timm_resnet18d": (_timm("resnet18d"), (4, 3, 32, 32)),
}
# Training outputs other than one tensor: torchvision's auxiliary heads,
# which run in training only (eval gives the logits alone).
TRAINING_OUTPUTS = {
    "googlenet": {"output.logits", "output.aux_logits2", "output.aux_logits1"},
    "inception_v3": {"output.logits", "output.aux_logits"},
}
# The fast lane: one plain BatchNorm CNN (test_port has each op on its own).
# The rest run in CI.
FAST = {"resnet18"}


QUANTITIES = ("eval output", "training output", "running statistics", "gradients")


def _quantity(row: LayerDiff, train: bool) -> str | None:
    """Which README column a row of the harness belongs to (None: an intermediate output)."""
    if row.quantity.startswith("grad"):
        return "gradients"
    if row.layer == "" and row.quantity.startswith("output"):
        return "training output" if train else "eval output"
    if not row.quantity.startswith("output"):
        return "running statistics"
    return None


def worst(rows: list[LayerDiff]) -> tuple[float, float]:
    """The largest error of these rows relative to its tensor's scale: jax's, torch's own.

    A tensor that is (nearly) zero in exact arithmetic (the gradient of a
    bias followed by a BatchNorm) is measured against 1e-3 of the largest
    tensor of its kind instead of its own rounding noise.
    """
    floor = 1e-3 * max(row.scale for row in rows)

    def relative(error: float | None, row: LayerDiff) -> float:
        return (error or 0.0) / (max(row.scale, floor) or 1.0)

    return (
        max(relative(row.max_abs, row) for row in rows),
        max(relative(row.torch_max_abs, row) for row in rows),
    )


RESULTS: dict[str, dict[str, Any]] = {}


def check_model(name: str) -> dict[str, Any]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = randomized(factory())
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    start = time.perf_counter()
    ported = jaxbn.port(model, torch.from_numpy(x))
    # the variables are exactly the converter's, with the port's own template
    # (which flattens in torch's order, so the converter's flatten warning is moot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxbn.convert.LayoutWarning)
        assert jaxbn.from_torch(model, ported.variables) is not None
    state = jaxbn.to_torch(ported.variables, model)  # strict, in the template's order
    fresh = factory()
    fresh.load_state_dict(state, strict=True)  # MNASNet checks the version metadata
    assert_same_state(fresh.state_dict(), model.state_dict())  # bit-exact, in order

    rows: dict[str, list[LayerDiff]] = {q: [] for q in QUANTITIES}
    outputs: dict[bool, set[str]] = {}
    for train in (False, True):
        report = compare_models(
            model, ported.module, ported.variables, x, train=train,
            flax_kwargs={"train": train}, gradients=train,
            reference="float64", factor=FACTOR, rtol=FLOOR, atol=0.0,
        )  # fmt: skip
        outputs[train] = {row.quantity for row in report.rows if row.layer == ""}
        failed = [row for row in report.rows if not row.ok]
        assert not failed, f"{name} train={train}: {report.summary()}\n" + "\n".join(
            f"  {r.layer} {r.quantity}: {r.max_abs:.2e} (torch's own {r.torch_max_abs:.2e}), "
            f"scale {r.scale:.2e}"
            for r in failed[:10]
        )
        for row in report.rows:
            quantity = _quantity(row, train)
            if quantity is not None:
                rows[quantity].append(row)
        if train:  # every step counter compared (integers: exactly)
            counts = [row for row in report.rows if row.quantity == "num_batches_tracked"]
            assert len(counts) == sum(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                for m in model.modules()
            )
    measured: dict[str, Any] = {q: worst(rows[q]) for q in QUANTITIES if rows[q]}
    measured["seconds"] = time.perf_counter() - start
    RESULTS[name] = measured
    assert outputs == {False: {"output"}, True: TRAINING_OUTPUTS.get(name, {"output"})}
    return measured


@pytest.mark.parametrize(
    "name",
    fast_lane(*MODELS, keep=FAST),
)
def test_ported_model_matches_torch(name):
    measured = check_model(name)
    print(name, {k: v for k, v in measured.items()})
