"""Converters against the real torchvision: every BatchNorm classification model.

Each model converts strictly from the live module and round-trips bit-exact
through ``to_torch`` into a freshly built model that loads it with
``strict=True``. What a state dict cannot carry (eps, momentum) is reported.
"""

from __future__ import annotations

import collections
import re
from typing import Any, cast

import numpy as np
import pytest
import torch
import torchvision

import jaxbn
from jaxbn.convert import batch_norm_settings, inspect

from .helpers import assert_same_state, fast_lane

# Every torchvision classification family that has BatchNorm.
MODELS = [
    "resnet18",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2_x1_0",
    "mnasnet1_0",
    "vgg11_bn",
    "googlenet",
    "inception_v3",
]


def build(name: str, seed: int = 0, **options: Any) -> torch.nn.Module:
    """A torchvision model with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    if name in ("googlenet", "inception_v3"):  # silences their init FutureWarning
        options.setdefault("init_weights", True)
    model = getattr(torchvision.models, name)(weights=None, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                assert module.running_mean is not None
                assert module.running_var is not None
                assert module.num_batches_tracked is not None
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.num_batches_tracked.fill_(
                    int(torch.randint(1, 10**6, (), generator=generator))
                )
    return model


# The fast lane: a ResNet, namedtuple outputs (GoogLeNet), eps 1e-3 and
# squeeze-excitation (MobileNetV3), version metadata (MNASNet). CI runs all.
FAST = {"resnet18", "googlenet", "mobilenet_v3_small", "mnasnet1_0"}


@pytest.mark.parametrize("name", fast_lane(*MODELS, keep=FAST))
def test_model_converts_strictly_and_round_trips_into_a_fresh_model(name):
    model = build(name)
    variables = jaxbn.from_torch(model)  # strict
    fresh = build(name, seed=1)
    state = jaxbn.to_torch(variables, fresh)
    assert isinstance(state, collections.OrderedDict)
    assert state._metadata == model.state_dict()._metadata  # type: ignore[attr-defined]
    fresh.load_state_dict(state, strict=True)
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_to_torch_without_a_template_has_no_metadata_to_give():
    state = jaxbn.to_torch(jaxbn.from_torch(build("mnasnet0_5")))
    assert isinstance(state, collections.OrderedDict)
    assert not hasattr(state, "_metadata")


@pytest.mark.parametrize(
    ("name", "layer", "settings"),
    [
        ("mnasnet1_0", "layers.1", {"momentum": pytest.approx(1 - 0.9997)}),
        ("efficientnet_v2_s", "features.0.1", {"eps": 1e-3}),
        ("mobilenet_v3_large", "features.0.1", {"eps": 1e-3, "momentum": 0.01}),
        ("inception_v3", "Conv2d_1a_3x3.bn", {"eps": 1e-3}),
    ],
)
def test_hyperparameters_a_state_dict_does_not_carry_are_reported(name, layer, settings):
    report = inspect(build(name))
    found = {(s.layer, s.name): s for s in report.settings}
    for key, value in settings.items():
        setting = found[(layer, key)]
        assert setting.value == value
        assert setting.default == {"eps": 1e-5, "momentum": 0.1}[key]
        assert setting.kind == "BatchNorm"
    # Only what differs from PyTorch's defaults is listed.
    assert not any(s.name == "affine" for s in report.settings)


def test_nothing_is_reported_for_a_model_with_default_settings():
    assert not [s for s in inspect(build("resnet18")).settings if s.kind == "BatchNorm"]


def test_convolution_settings_a_template_cannot_show_are_reported():
    report = inspect(build("resnet18"))
    found = {(s.layer, s.name): s.value for s in report.settings}
    assert found[("conv1", "stride")] == (2, 2)
    assert found[("conv1", "padding")] == (3, 3)
    assert ("conv1", "dilation") not in found
    grouped = {(s.layer, s.name): s.value for s in inspect(build("resnext50_32x4d")).settings}
    assert grouped[("layer1.0.conv2", "groups")] == 32


def test_a_state_dict_says_its_settings_are_unknown():
    report = inspect(build("mnasnet0_5").state_dict())
    assert not report.settings
    assert any("eps" in note and "momentum" in note for note in report.notes)


@pytest.mark.parametrize(
    ("name", "layer"), [("mnasnet0_5", "layers.1"), ("mobilenet_v3_small", "features.0.1")]
)
def test_batch_norm_settings_build_the_matching_jaxbn_layer(name, layer):
    torch_bn = build(name).get_submodule(layer).train()
    assert isinstance(torch_bn, torch.nn.BatchNorm2d)
    settings = batch_norm_settings(torch_bn)
    layer_ans = jaxbn.BatchNorm2d(**settings)
    variables = jaxbn.from_torch(torch_bn)
    x = (
        np.random.default_rng(0)
        .standard_normal((4, torch_bn.num_features, 5, 5))
        .astype(np.float32)
    )
    y_ans, updates = layer_ans.apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    y_ref = torch_bn(torch.from_numpy(x))
    np.testing.assert_allclose(np.asarray(y_ans), y_ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    stats_ref = jaxbn.from_torch(torch_bn)["batch_stats"]
    for key in ("mean", "var"):
        np.testing.assert_allclose(
            np.asarray(updates["batch_stats"][key]), stats_ref[key], rtol=1e-5, atol=1e-6
        )


def test_unknown_classes_are_named_by_their_module_path():
    model = torchvision.models.convnext_tiny(weights=None)
    report = inspect(model)
    assert any(
        line.startswith("features.1.0: torchvision.models.convnext.CNBlock is not")
        for line in report.unconverted
    ), report.unconverted


def test_bare_parameters_convert_as_param_kind():
    model = torchvision.models.convnext_tiny(weights=None)
    blocks = [name for name, m in model.named_modules() if type(m).__name__ == "CNBlock"]
    variables = jaxbn.from_torch(model, kinds=dict.fromkeys(blocks, "Param"))
    scale = variables["params"]["features"]["1"]["0"]["layer_scale"]
    np.testing.assert_array_equal(
        scale, model.get_parameter("features.1.0.layer_scale").detach().numpy()
    )
    state = jaxbn.to_torch(variables, torchvision.models.convnext_tiny(weights=None))
    assert_same_state(state, model.state_dict())


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )


def test_a_template_places_bare_parameters():
    model = tiny_vit()
    kinds = {
        "": "Param",
        "encoder": "Param",
        "encoder.layers.encoder_layer_0.self_attention": "Param",
    }
    template = jaxbn.from_torch(model, kinds=kinds)
    again = jaxbn.from_torch(model, template)  # the template alone decides
    np.testing.assert_array_equal(again["params"]["class_token"], template["params"]["class_token"])
    _, report = jaxbn.from_torch(model, strict=False)
    assert any(
        line.startswith("<root>: torchvision.models.vision_transformer.VisionTransformer")
        for line in report.unconverted
    )


def test_a_flatten_before_a_linear_is_flagged():
    vgg = cast(torchvision.models.VGG, build("vgg11_bn"))
    # the classifier made small; what is flagged, a Linear on 512x7x7 features, kept
    vgg.classifier[0] = torch.nn.Linear(512 * 7 * 7, 8)
    vgg.classifier[3] = torch.nn.Linear(8, 8)
    vgg.classifier[6] = torch.nn.Linear(8, 8)
    report = inspect(vgg)
    flagged = {note.split(":")[0] for note in report.layout_notes}
    assert flagged == {"classifier.0"}
    assert "512 x 7 x 7" in report.layout_notes[0]
    assert not inspect(build("resnet18")).layout_notes
    template = jaxbn.from_torch(vgg)  # stands for a hand-written Flax VGG's variables
    with pytest.warns(jaxbn.convert.LayoutWarning, match="classifier.0: in_features 25088"):
        jaxbn.from_torch(vgg, template)


def test_inspect_command_shows_what_a_live_model_adds(capsys):
    from jaxbn.cli import main

    assert main(["inspect", "torchvision.models:mnasnet0_5"]) == 0
    out = capsys.readouterr().out
    assert "settings the state dict does not carry" in out
    assert "momentum=0.00029999999999996696 (PyTorch's default 0.1): layers.1, layers.4" in out
    assert main(["inspect", "torchvision.models:vgg11_bn"]) == 0
    assert "layout: classifier.0: in_features 25088 = 512 x 7 x 7" in capsys.readouterr().out


def test_inspect_command_builds_with_arguments_and_timm_names(capsys):
    """--kwargs and timm:NAME, as for jaxbn port."""
    from jaxbn.cli import main

    assert main(["inspect", "torchvision.models:resnet18", "--kwargs", "num_classes=10"]) == 0
    assert re.search(r"^fc +Linear +weight \[10, 512\]", capsys.readouterr().out, re.M)
    assert main(["inspect", "timm:resnet10t", "--kwargs", "num_classes=7"]) == 0
    assert re.search(r"^fc +Linear +weight \[7, 512\]", capsys.readouterr().out, re.M)
