"""jaxbn.port against the real torchvision and timm: BatchNorm models of every kind.

torchvision's BatchNorm classifiers, segmentation models, detection
backbones, video models and RAFT, and the smallest model of each of timm's
59 families with BatchNorm. Each model is built with ``weights=None``, its
BatchNorm weights and running statistics randomised and every dropout
probability set to 0 (:func:`jaxbn.parity.randomized`). Then the
layer-by-layer harness (``compare_models``) runs on the model and its port,
in eval and in one training step: every layer's output, the model's output
(namedtuples, dicts and lists too), every running statistic
(``num_batches_tracked`` exactly) and every parameter gradient; and the
variables round-trip strictly and bit-exactly. Deep float32 nets differ
from torch by more than rounding of one layer, so the harness measures both
jax float32 and torch float32 against a float64 torch run
(``reference='float64'``), and jax's error must stay within a small factor
of torch's own. The models over CI's time budget are skipped here unless
``JAXBN_ALL_MODELS=1``; ``benchmarks/port_sweep.py`` runs them.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torchvision

import jaxbn
from jaxbn.parity import compare_models, randomized

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


def _timm(name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _video(name: str) -> Callable[[], torch.nn.Module]:
    return lambda: getattr(torchvision.models.video, name)(weights=None)


def _segmentation(name: str) -> Callable[[], torch.nn.Module]:
    return lambda: getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None
    )


def _fpn(name: str) -> Callable[[], torch.nn.Module]:
    from torchvision.models.detection import backbone_utils

    if name == "resnet18":
        return lambda: backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None)
    return lambda: backbone_utils.mobilenet_backbone(backbone_name=name, weights=None, fpn=True)


class FewUpdates(torch.nn.Module):
    """RAFT with ``updates`` refinement steps (12 by default; each one more of the same)."""

    def __init__(self, updates: int) -> None:
        super().__init__()
        self.raft = torchvision.models.optical_flow.raft_small(weights=None)
        self.updates = updates

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> Any:
        return self.raft(image1, image2, num_flow_updates=self.updates)


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


class Row(NamedTuple):
    """A model of the suite: how to build it, its input shape(s), and whether CI runs it."""

    factory: Callable[[], torch.nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    # False: over CI's time budget (25 minutes in all); benchmarks/port_sweep.py
    # runs it, and so does this suite with JAXBN_ALL_MODELS=1.
    ci: bool = True
    outputs: tuple[frozenset[str], ...] = (frozenset({"output"}),) * 2  # eval, train


def row(factory: Callable[[], torch.nn.Module], *shapes: tuple[int, ...], **options: Any) -> Row:
    return Row(factory, shapes, **options)


def _named(*names: str) -> frozenset[str]:
    return frozenset(names)


# name -> Row. Inputs are as small as the model allows; where the last
# BatchNorms would see only 4 values per channel (1x1 activations), the
# training step is so ill-conditioned that torch float32 itself is 10-100%
# off float64, so those models get 64x64 inputs.
B32, B64, B128 = (4, 3, 32, 32), (4, 3, 64, 64), (2, 3, 128, 128)
MODELS: dict[str, Row] = {
    "resnet18": row(_torchvision("resnet18"), B32),
    "resnet50": row(_torchvision("resnet50"), B32),
    "resnext50_32x4d": row(_torchvision("resnext50_32x4d"), B32),
    "wide_resnet50_2": row(_torchvision("wide_resnet50_2"), B32),
    "mobilenet_v2": row(_torchvision("mobilenet_v2"), B64),
    "mobilenet_v3_small": row(_torchvision("mobilenet_v3_small"), B32),
    "mobilenet_v3_large": row(_torchvision("mobilenet_v3_large"), B32),
    "efficientnet_b0": row(_torchvision("efficientnet_b0"), B32),
    "efficientnet_v2_s": row(_torchvision("efficientnet_v2_s"), B32),
    "regnet_x_400mf": row(_torchvision("regnet_x_400mf"), B64),
    "regnet_y_400mf": row(_torchvision("regnet_y_400mf"), B64),
    "densenet121": row(_torchvision("densenet121"), B64),
    "shufflenet_v2_x1_0": row(_torchvision("shufflenet_v2_x1_0"), B64),
    "mnasnet0_5": row(_torchvision("mnasnet0_5"), B32),
    "vgg11_bn": row(_small_vgg, B32),
    "googlenet": row(
        _torchvision("googlenet"),
        B32,
        outputs=(
            _named("output"),
            _named("output.logits", "output.aux_logits2", "output.aux_logits1"),
        ),
    ),
    # at the size its auxiliary head needs (a 5x5 conv after a stride-3 pool)
    "inception_v3": row(
        _torchvision("inception_v3"),
        (2, 3, 299, 299),
        outputs=(_named("output"), _named("output.logits", "output.aux_logits")),
    ),
    "resnet18_frozen_bn": row(
        _torchvision("resnet18", norm_layer=torchvision.ops.FrozenBatchNorm2d), B32
    ),
    # torchvision beyond classification: segmentation (dict outputs), detection
    # backbones (frozen stems), video (3-D convolutions and pooling), optical
    # flow (two images, a list of flows; 2 of its 12 refinement steps)
    "fcn_resnet50": row(
        _segmentation("fcn_resnet50"),
        (2, 3, 64, 64),
        outputs=(_named("output['out']"),) * 2,  # (no auxiliary head: aux_loss=None)
    ),
    "deeplabv3_mobilenet_v3_large": row(
        _segmentation("deeplabv3_mobilenet_v3_large"),
        (2, 3, 64, 64),
        ci=False,
        outputs=(_named("output['out']"),) * 2,
    ),
    "lraspp_mobilenet_v3_large": row(
        _segmentation("lraspp_mobilenet_v3_large"),
        (2, 3, 64, 64),
        outputs=(_named("output['out']"),) * 2,
    ),
    "resnet18_fpn_backbone": row(
        _fpn("resnet18"),
        (2, 3, 64, 64),
        outputs=(_named(*(f"output['{k}']" for k in ("0", "1", "2", "3", "pool"))),) * 2,
    ),
    "mobilenet_v3_large_fpn_backbone": row(
        _fpn("mobilenet_v3_large"),
        (2, 3, 64, 64),
        outputs=(_named(*(f"output['{k}']" for k in ("0", "1", "pool"))),) * 2,
    ),
    "quantizable_mobilenet_v2": row(
        lambda: torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False),
        (2, 3, 64, 64),
        ci=False,
    ),
    "r3d_18": row(_video("r3d_18"), (2, 3, 4, 32, 32)),
    "mc3_18": row(_video("mc3_18"), (2, 3, 4, 32, 32)),
    "r2plus1d_18": row(_video("r2plus1d_18"), (2, 3, 4, 32, 32)),
    "s3d": row(_video("s3d"), (2, 3, 14, 224, 224), ci=False),  # its last pool needs 224x224
    "raft_small": row(
        lambda: FewUpdates(2),
        (2, 3, 128, 128),
        (2, 3, 128, 128),
        outputs=(_named("output[0]", "output[1]"),) * 2,
    ),
    # The smallest model of each of timm's families that have BatchNorm.
    **{
        f"timm_{name}": row(_timm(name), B64)
        for name in (
            "mobileone_s1",
            "cpubone_nano",
            "cs3darknet_focus_s",
            "cspnext_tiny",
            "dla46x_c",
            "mobilenetv2_035",
            "efficientvim_m1",
            "efficientvit_b0",
            "fasternet_t0",
            "fastvit_t8",
            "hgnetv2_b0",
            "iformer_t",
            "inception_next_atto",
            "mobilenetv3_small_050",
            "regnetx_002",
            "res2next50",
            "resnest14d",
            "resnet10t",
            "resnetv2_18",
            "selecsls42",
            "legacy_seresnet18",
            "shvit_s1",
            "skresnet18",
            "starnet_s050",
            "swiftformer_xs",
            "tiny_vit_5m_224",
            "tresnet_m",
            "ese_vovnet19b_slim_dw",
            "legacy_xception",
            "xception41p",
            "xcit_nano_12_p8_224",
            "efficientvit_m0",
        )
    },
    **{
        f"timm_{name}": row(_timm(name, img_size=64), B64)
        for name in (
            "levit_128s",
            "visformer_tiny",
            "volo_d1_224",
        )
    },
    "timm_efficientformer_l1": row(_timm("efficientformer_l1"), (2, 3, 224, 224)),  # 7x7 attention
    # Over CI's time budget, in the sweep (and here with JAXBN_ALL_MODELS=1).
    **{
        f"timm_{name}": row(_timm(name), B64, ci=False)
        for name in (
            "convmixer_768_32",
            "densenet121",
            "dpn48b",
            "ghostnet_050",
            "hardcorenas_b",
            "hrnet_w18_small",
            "lcnetv2_small",
            "lowformer_b0",
            "mobilevit_xxs",
            "nasnetalarge",
            "nextvit_small",
            "pnasnet5large",
            "repghostnet_050",
            "repvit_m1",
            "rexnet_100",
        )
    },
    **{
        f"timm_{name}": row(_timm(name, img_size=64), B64, ci=False)
        for name in (
            "efficientformerv2_s0",
            "maxvit_pico_rw_256",
            "vit_small_resnet50d_s16_224",
        )
    },
    **{
        f"timm_{name}": row(_timm(name), B128, ci=False)
        for name in (
            "inception_resnet_v2",
            "inception_v3",
            "inception_v4",
        )
    },
    # its ConvMlp head 64 wide, not 4096 (102M weights, which need no BatchNorm to
    # test: with the float64 reference and the gradients, more memory than CI has)
    "timm_vgg11_bn": row(_timm("vgg11_bn", mlp_ratio=1 / 64), B64),
    "timm_halonet_h1": row(_timm("halonet_h1"), (2, 3, 256, 256), ci=False),  # its halo blocks
    "timm_resnet18d": row(_timm("resnet18d"), B32),
}
# The fast lane: one plain BatchNorm CNN (test_port has each op on its own).
# The rest run in CI.
FAST = {"resnet18"}


RESULTS: dict[str, dict[str, Any]] = {}


def check_model(name: str) -> dict[str, Any]:
    factory, shapes, _, expected_outputs = MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = randomized(factory())
    xs = tuple(
        np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)
    )
    x = xs[0] if len(xs) == 1 else xs
    start = time.perf_counter()
    ported = jaxbn.port(model, x)
    # the variables are exactly the converter's, with the port's own template
    # (which flattens in torch's order, so the converter's flatten warning is moot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxbn.convert.LayoutWarning)
        assert jaxbn.from_torch(model, ported.variables) is not None
    state = jaxbn.to_torch(ported.variables, model)  # strict, in the template's order
    fresh = factory()
    fresh.load_state_dict(state, strict=True)  # MNASNet checks the version metadata
    assert_same_state(fresh.state_dict(), model.state_dict())  # bit-exact, in order
    assert len(ported.frozen) == sum(not p.requires_grad for p in model.parameters())

    measured: dict[str, Any] = {}
    outputs: list[frozenset[str]] = []
    for train in (False, True):
        report = compare_models(
            model, ported.module, ported.variables, x, train=train,
            flax_kwargs={"train": train}, gradients=train,
            reference="float64", factor=FACTOR, rtol=FLOOR, atol=0.0,
        )  # fmt: skip
        outputs.append(
            frozenset(
                row.quantity
                for row in report.rows
                if row.layer == "" and row.quantity.startswith("output")
            )
        )
        failed = [row for row in report.rows if not row.ok]
        assert not failed, f"{name} train={train}: {report.summary()}\n" + "\n".join(
            f"  {r.layer} {r.quantity}: {r.max_abs:.2e} (torch's own {r.torch_max_abs:.2e}), "
            f"scale {r.scale:.2e}"
            for r in failed[:10]
        )
        worst = report.worst()
        measured["training output" if train else "eval output"] = worst["output"]
        if train:
            measured |= {
                kind: worst[kind] for kind in ("running statistics", "gradients") if kind in worst
            }
            # every step counter compared (integers: exactly)
            counts = [row for row in report.rows if row.quantity == "num_batches_tracked"]
            assert len(counts) == sum(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                for m in model.modules()
            )
    measured["seconds"] = time.perf_counter() - start
    RESULTS[name] = measured
    assert tuple(outputs) == expected_outputs
    return measured


ALL_MODELS = bool(os.environ.get("JAXBN_ALL_MODELS"))


@pytest.mark.parametrize(
    "name",
    fast_lane(*MODELS, keep=FAST),
)
def test_ported_model_matches_torch(name):
    if not (MODELS[name].ci or ALL_MODELS):
        pytest.skip(
            "over CI's time budget: benchmarks/port_sweep.py runs it (JAXBN_ALL_MODELS=1 here)"
        )
    measured = check_model(name)
    print(name, {k: v for k, v in measured.items()})
