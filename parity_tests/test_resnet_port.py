"""A PyTorch ResNet ported to Flax, and the layer-by-layer harness that checks ports."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.parity import compare_models

from .helpers import fast_lane, load_example


@functools.cache
def examples():
    """examples/port_resnet.py and the examples/resnet.py module it builds with."""
    port = load_example("port_resnet")
    return port, port.flax_resnet


def calibrated(arch: str, classes: int = 1000, width: int = 64, image: int = 32):
    """A torch ResNet trained a few steps with real running statistics, and its Flax twin."""
    port, _ = examples()
    torch.manual_seed(0)
    torch_model, flax_model = port.build(arch, classes, width)
    optimizer = port.torch_optimizer(torch_model, 0.005, 0.9, 1e-4)
    for images, labels in port.batches(2, 16, image, classes, 0):
        port.torch_train_step(torch_model, optimizer, images, labels)
    port.recalibrate(torch_model, port.batches(3, 16, image, classes, 3))
    torch_model.eval()
    return torch_model, flax_model


# torchvision's state dicts: resnet18 has 122 entries, resnet50 320.
TORCHVISION_KEYS = {"resnet18": 122, "resnet50": 320}
CANONICAL_KEYS = [
    "conv1.weight",
    "bn1.num_batches_tracked",
    "layer1.0.conv1.weight",
    "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.running_var",
    "layer4.1.bn2.bias",
    "fc.weight",
    "fc.bias",
]


@pytest.mark.parametrize("arch", fast_lane("resnet18", "resnet50"))
def test_torchvision_layout_converts_strictly_and_matches_in_eval(arch, tmp_path):
    torch_model, flax_model = calibrated(arch)
    state = torch_model.state_dict()
    assert len(state) == TORCHVISION_KEYS[arch]
    assert set(CANONICAL_KEYS) <= set(state)
    assert ("layer4.2.bn3.weight" in state) == (arch == "resnet50")
    torch.save(state, tmp_path / f"{arch}.pth")

    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    template = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), jnp.asarray(x)))
    variables = jaxbn.from_torch(jaxbn.load_checkpoint(tmp_path / f"{arch}.pth"), template)

    with torch.no_grad():
        logits_ref = torch_model(torch.from_numpy(x)).numpy()
    logits_ans = np.asarray(jax.jit(flax_model.apply)(variables, x))
    assert np.max(np.abs(logits_ans - logits_ref)) <= 1e-4
    np.testing.assert_array_equal(logits_ans.argmax(-1), logits_ref.argmax(-1))


# Continued training, judged against a float64 torch run, is checked by
# test_examples.test_port_resnet_runs_as_the_readme_shows (one run of the
# README's command).


def tiny(arch: str = "resnet18"):
    torch_model, flax_model = calibrated(arch, classes=5, width=8, image=16)
    variables = jaxbn.from_torch(torch_model)
    x = np.random.default_rng(2).standard_normal((6, 3, 16, 16)).astype(np.float32)
    return torch_model, flax_model, variables, x


@pytest.mark.parametrize("train", fast_lane(False, True), ids=["eval", "train"])
def test_harness_reports_clean_for_a_correct_port(train):
    torch_model, flax_model, variables, x = tiny()
    report = compare_models(
        torch_model,
        flax_model,
        variables,
        x,
        train=train,
        flax_kwargs={"train": train},
        channels_last=True,
        gradients=train,
    )
    assert report.ok, report.table()
    assert report.first_divergence is None
    quantities = {row.quantity for row in report.rows}
    assert "output" in quantities
    if train:
        assert {"grad weight", "running_mean", "running_var", "num_batches_tracked"} <= quantities
    layers = [row.layer for row in report.rows if row.quantity == "output"]
    assert layers[:3] == ["conv1", "bn1", "layer1.0.conv1"]  # torch's execution order
    assert report.unmatched_torch == ()
    assert "within rtol" in report.table()


@pytest.mark.slow
def test_harness_finds_wrong_padding_at_the_right_conv(monkeypatch):
    """The classic port bug: 'SAME' padding on a strided conv pads asymmetrically."""
    torch_model, flax_model, variables, x = tiny()
    _, resnet = examples()
    conv = resnet.conv

    def same_padding_on_strided_convs(features, kernel, stride=1, *, name):
        if stride == 2 and kernel == 3:
            return nn.Conv(
                features, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, name=name
            )
        return conv(features, kernel, stride, name=name)

    monkeypatch.setattr(resnet, "conv", same_padding_on_strided_convs)
    report = compare_models(torch_model, flax_model, variables, x, channels_last=True)
    first = report.first_divergence
    assert first is not None
    assert (first.layer, first.quantity) == ("layer2.0.conv1", "output")
    assert first.max_rel > 1e-2
    assert re.search(r"layer2\.0\.conv1\s+output.*<-- first divergence", report.table())
    earlier = [row for row in report.rows[: report.rows.index(first)]]
    assert earlier
    assert all(row.ok for row in earlier)


@pytest.mark.slow
def test_harness_finds_flax_convention_momentum_at_the_right_batchnorm(monkeypatch):
    """A BatchNorm ported with Flax's momentum=0.9: outputs agree, running statistics do not."""
    torch_model, flax_model, variables, x = tiny()
    _, resnet = examples()
    batch_norm = resnet.batch_norm

    def flax_momentum_in_bn2(train, *, name):
        if name == "bn2":
            return jaxbn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        return batch_norm(train, name=name)

    monkeypatch.setattr(resnet, "batch_norm", flax_momentum_in_bn2)
    with pytest.warns(UserWarning, match=r"momentum=0.9 is the weight of the \*new\* batch"):
        report = compare_models(
            torch_model,
            flax_model,
            variables,
            x,
            train=True,
            flax_kwargs={"train": True},
            channels_last=True,
        )
    first = report.first_divergence
    assert first is not None
    assert (first.layer, first.quantity) == ("layer1.0.bn2", "running_mean")
    assert all(row.ok for row in report.rows if row.quantity.startswith("output"))


@pytest.mark.slow
def test_harness_leaves_the_torch_model_alone():
    torch_model, flax_model, variables, x = tiny()
    before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    grads = {
        name: p.grad.clone() for name, p in torch_model.named_parameters() if p.grad is not None
    }
    compare_models(
        torch_model,
        flax_model,
        variables,
        x,
        train=True,
        flax_kwargs={"train": True},
        channels_last=True,
        gradients=True,
    )
    for key, value in torch_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    for name, p in torch_model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=0)
        else:
            assert p.grad is None, name
    assert not torch_model.training


def test_max_pool_pads_with_minus_infinity_like_torch(monkeypatch):
    """The port's stem pooling. All-negative input: zero padding would win the max at the border."""
    _, resnet = examples()
    x = -1.0 - np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    y_ref = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x)).numpy()
    y_ans = np.moveaxis(np.asarray(resnet.max_pool(jnp.moveaxis(x, 1, -1))), -1, 1)
    np.testing.assert_array_equal(y_ans, y_ref)
    assert y_ans.max() < 0
    # ... and it is the pooling the ResNet runs.
    calls = []
    pool = resnet.max_pool
    monkeypatch.setattr(resnet, "max_pool", lambda x: calls.append(x.shape) or pool(x))
    model = resnet.resnet18(num_classes=2, width=8)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 16, 16)))  # traced, not run
    assert calls == [(1, 8, 8, 8)]
