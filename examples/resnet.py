"""ResNet-18/34/50 in Flax, laid out so that torchvision checkpoints convert as they are.

Every Flax module is named after the torchvision module it mirrors
(``conv1``, ``bn1``, ``layer1`` -> ``'0'`` -> ``conv1``, ``downsample`` ->
``'0'``/``'1'``, ``fc``), so ``jaxbn.from_torch(state_dict, template)``
converts a torchvision ``resnet18``/``resnet50`` state dict under strict
checking with no renaming.

The model takes PyTorch's (N, C, H, W) input and moves channels last once;
inside, Flax's NHWC convolutions use the same explicit, symmetric padding as
torchvision (never "SAME", which pads strided convolutions asymmetrically),
and max pooling pads with -inf, as PyTorch's does.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxbn


def conv(features: int, kernel: int, stride: int = 1, *, name: str) -> nn.Conv:
    """torch.nn.Conv2d(..., kernel, stride, padding=kernel // 2, bias=False)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


def batch_norm(train: bool, *, name: str) -> jaxbn.BatchNorm:
    """torch.nn.BatchNorm2d on NHWC activations."""
    return jaxbn.BatchNorm(use_running_average=not train, name=name)


class Downsample(nn.Module):
    """torchvision's ``downsample``: Sequential(conv1x1, BatchNorm2d) as '0', '1'."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(self.features, 1, self.stride, name="0")(x)
        return batch_norm(train, name="1")(x)


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        identity = x
        out = nn.relu(
            batch_norm(train, name="bn1")(conv(self.planes, 3, self.stride, name="conv1")(x))
        )
        out = batch_norm(train, name="bn2")(conv(self.planes, 3, name="conv2")(out))
        if self.downsample:
            identity = Downsample(self.planes, self.stride, name="downsample")(x, train)
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride is on the 3x3 conv)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        identity = x
        out = nn.relu(batch_norm(train, name="bn1")(conv(self.planes, 1, name="conv1")(x)))
        out = nn.relu(
            batch_norm(train, name="bn2")(conv(self.planes, 3, self.stride, name="conv2")(out))
        )
        out = batch_norm(train, name="bn3")(conv(self.planes * 4, 1, name="conv3")(out))
        if self.downsample:
            identity = Downsample(self.planes * 4, self.stride, name="downsample")(x, train)
        return nn.relu(out + identity)


class Layer(nn.Module):
    """torchvision's ``layerN``: blocks named '0', '1', ..."""

    block: type[BasicBlock] | type[Bottleneck]
    planes: int
    blocks: int
    stride: int
    in_planes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_planes = self.planes * self.block.expansion
        downsample = self.stride != 1 or self.in_planes != out_planes
        x = self.block(self.planes, self.stride, downsample, name="0")(x, train)
        for i in range(1, self.blocks):
            x = self.block(self.planes, name=str(i))(x, train)
        return x


def max_pool(x: jax.Array) -> jax.Array:
    """torch.nn.MaxPool2d(3, 2, padding=1) on NHWC input: the padding is -inf, never 0."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pyright: ignore[reportArgumentType]


class ResNet(nn.Module):
    block: type[BasicBlock] | type[Bottleneck]
    layers: Sequence[int]
    num_classes: int = 1000
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: (N, C, H, W) images, as torchvision takes them."""
        x = jnp.moveaxis(x, 1, -1)
        x = nn.Conv(
            self.width,
            (7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            name="conv1",
        )(x)
        x = nn.relu(batch_norm(train, name="bn1")(x))
        x = max_pool(x)
        in_planes = self.width
        for i, blocks in enumerate(self.layers):
            planes = self.width * 2**i
            x = Layer(
                self.block, planes, blocks, 1 if i == 0 else 2, in_planes, name=f"layer{i + 1}"
            )(x, train)
            in_planes = planes * self.block.expansion
        x = x.mean(axis=(1, 2))  # adaptive average pool to 1x1, then flatten
        return nn.Dense(self.num_classes, name="fc")(x)


def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


if __name__ == "__main__":
    for build in (resnet18, resnet34, resnet50):
        shapes = jax.eval_shape(
            lambda build=build: build().init(jax.random.key(0), jnp.zeros((1, 3, 224, 224)))
        )
        count = sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))
        print(f"{build.__name__}: {count / 1e6:.1f}M parameters, torchvision's module names")
