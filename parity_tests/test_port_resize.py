"""Resizing in jaxbn.port: F.interpolate and nn.Upsample against torch's CPU kernels.

Every mode the port supports, on every rank it applies to, with ``size=``
and ``scale_factor=`` (integer, non-integer, per axis, downsampling),
``recompute_scale_factor`` and ``align_corners``: outputs and input
gradients, in float32 and float64. The whole grid runs as one jit per dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxbn
from jaxbn.port import PortError
from jaxbn.port.ops import interpolate

from .helpers import assert_close, fast_lane

SHAPES = {1: (2, 3, 7), 2: (2, 3, 7, 5), 3: (1, 2, 5, 4, 3)}
LARGE = (1, 2, 70, 66)  # a 2-D output with H + W > 128: torch takes another kernel


def case(mode: str, d: int | tuple[int, ...], **options: Any) -> tuple[str, tuple[int, ...], dict]:
    shape = SHAPES[d] if isinstance(d, int) else d
    name = f"{mode} {shape} " + " ".join(f"{k}={v}" for k, v in options.items())
    return name, shape, {"mode": mode, **options}


def s(scale: Any, recompute: bool | None = None, **options: Any) -> dict[str, Any]:
    return {"scale_factor": scale, "recompute_scale_factor": recompute, **options}


# 1.1 keeps every length here (7, 5, 4, 3) yet, with recompute_scale_factor
# None or False, interpolates with 1/1.1; 0.7 and 0.5 downsample; 1.5 and 3.3
# are non-integer; 2.0000001 doubles the size with a scale just off 2.
GRID = [
    # torch's nearest forward and backward kernels round differently (1.1, 2.0000001).
    case("nearest", 1, size=3),
    case("nearest", 1, **s(1.1)),
    case("nearest", 1, **s(1.5, True)),
    case("nearest", 2, size=11),
    case("nearest", 2, **s(0.7)),
    case("nearest", 2, **s((1.5, 0.7))),
    case("nearest", 2, **s(1.1)),
    case("nearest", 3, **s(2)),
    case("nearest", 3, **s(1.1, False)),
    case("nearest", LARGE, **s(1.0000001)),
    case("nearest-exact", 1, **s(1.5)),
    case("nearest-exact", 2, size=3),
    case("nearest-exact", 2, **s((1.5, 0.7))),
    case("nearest-exact", 2, **s(0.7, True)),
    case("nearest-exact", 3, **s(1.1)),
    case("nearest-exact", LARGE, **s(2.0000001)),
    case("area", 1, size=3),
    case("area", 2, **s(0.5)),
    case("area", 3, size=(3, 2, 2)),
    case("linear", 1, size=11),
    case("linear", 1, **s(1.5)),
    case("linear", 1, **s(0.7)),
    case("linear", 1, **s(3.3, False)),
    case("linear", 1, size=3, align_corners=True),
    case("linear", 1, **s(1.5, True, align_corners=True)),
    case("bilinear", 2, size=3),
    case("bilinear", 2, **s(1.5)),
    case("bilinear", 2, **s(1.5, True)),
    case("bilinear", 2, **s(0.7, align_corners=False)),
    case("bilinear", 2, **s(1.1)),
    case("bilinear", 2, **s((2.5, 0.7))),
    case("bilinear", 2, size=11, align_corners=True),
    case("bilinear", 2, **s(3.3, False, align_corners=True)),
    case("bilinear", 2, size=(9, 4), align_corners=True),
    case("bilinear", LARGE, **s(2.0000001)),
    # torch's bicubic backward is no transpose of its forward when the size is kept (1.1).
    case("bicubic", 2, size=11),
    case("bicubic", 2, **s(1.5)),
    case("bicubic", 2, **s(0.7, True)),
    case("bicubic", 2, **s(1.1)),
    case("bicubic", 2, **s((1.5, 0.7))),
    case("bicubic", 2, **s(0.5)),
    case("bicubic", 2, size=3, align_corners=True),
    case("bicubic", 2, **s(1.5, align_corners=True)),
    case("bicubic", LARGE, **s(2.0000001)),
    case("trilinear", 3, size=3),
    case("trilinear", 3, **s(1.5)),
    case("trilinear", 3, **s((2.0, 1.1, 0.5), True)),
    case("trilinear", 3, **s(0.7, align_corners=True)),
]


def torch_side(
    shape, options, dtype, seed
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, cotangent, torch output, torch input gradient)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    x_ref = torch.from_numpy(x).requires_grad_()
    y_ref = F.interpolate(x_ref, **options)
    g = rng.standard_normal(tuple(y_ref.shape)).astype(dtype)
    y_ref.backward(torch.from_numpy(g))
    assert x_ref.grad is not None
    return x, g, y_ref.detach().numpy(), x_ref.grad.numpy()


def jax_side(cases, xs, gs):
    """Every case's output and input gradient, in one program."""
    results = []
    for (_, _, options), x, g in zip(cases, xs, gs, strict=True):
        y, pullback = jax.vjp(functools.partial(interpolate, **options), x)
        results.append((y, pullback(g)[0]))
    return results


# Measured (torch 2.14.1, x86 CPU): worst float32 |difference| 2.4e-6 for outputs
# and gradients alike (values up to ~10: a few ulp, the order torch sums taps in);
# float64 2.7e-15. The indices match exactly: a wrong one is an error of order 1.
TOLERANCE = {
    "float32": {"rtol": 1e-6, "atol": 4e-6},
    "float64": {"rtol": 1e-12, "atol": 1e-12},
}


@pytest.mark.parametrize("dtype", fast_lane("float64", "float32"))
def test_interpolate_matches_torch(dtype, request):
    if dtype == "float64":
        request.getfixturevalue("x64")
    # float64 on every third case: the index rules are the same, compiling is the cost.
    cases = GRID if dtype == "float32" else GRID[::3]
    sides = [torch_side(shape, options, np.dtype(dtype), i) for i, (_, shape, options) in
             enumerate(cases)]  # fmt: skip
    xs = [jnp.asarray(side[0]) for side in sides]
    gs = [jnp.asarray(side[1]) for side in sides]
    results = jax.jit(functools.partial(jax_side, cases))(xs, gs)
    failures, worst = [], {"output": 0.0, "gradient": 0.0}
    for (name, _, _), (_, _, y_ref, dx_ref), (y_ans, dx_ans) in zip(cases, sides, results,
                                                                     strict=True):  # fmt: skip
        for what, ans, ref in (("output", y_ans, y_ref), ("gradient", dx_ans, dx_ref)):
            ans = np.asarray(ans)
            if ans.shape != ref.shape:
                failures.append(f"{name} {what}: shape {ans.shape}, torch {ref.shape}")
                continue
            error = float(np.max(np.abs(ans - ref)))
            worst[what] = max(worst[what], error)
            tol = TOLERANCE[dtype]
            if not np.allclose(ans, ref, rtol=tol["rtol"], atol=tol["atol"]):
                failures.append(f"{name} {what}: max |jaxbn - torch| = {error:.3g}")
    assert not failures, f"{len(failures)} of {2 * len(cases)} differ:\n" + "\n".join(failures)
    print(f"{dtype}: {len(cases)} resizes, worst {worst}")


# --- through jaxbn.port -----------------------------------------------------


class Decoder(torch.nn.Module):
    """Every resizing module and the F.interpolate spellings models use (FPN, U-Net)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.up = torch.nn.Upsample(scale_factor=1.5, mode="bilinear")
        self.up_nearest = torch.nn.UpsamplingNearest2d(scale_factor=2)
        self.up_bilinear = torch.nn.UpsamplingBilinear2d(size=(5, 7))
        self.up_bicubic = torch.nn.Upsample(size=(6, 6), mode="bicubic", align_corners=False)
        self.down = torch.nn.Upsample(scale_factor=0.7, mode="nearest-exact",
                                      recompute_scale_factor=True)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        skip = F.interpolate(self.up(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = y + skip
        a = self.up_nearest(F.interpolate(y, None, 0.5, "area"))
        b = self.up_bicubic(self.up_bilinear(y))
        c = self.down(F.interpolate(y, scale_factor=(1.5, 1.1)))
        return a.mean((2, 3)) + b.mean((2, 3)) + c.mean((2, 3))


X = np.random.default_rng(0).standard_normal((2, 3, 9, 10)).astype(np.float32)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ported_module_resizes_as_torch(train):
    torch.manual_seed(0)
    model = Decoder()
    ported = jaxbn.port(model, torch.from_numpy(X))
    model.train(train)
    x_ref = torch.from_numpy(X).requires_grad_()
    y_ref = model(x_ref)
    g = np.random.default_rng(1).standard_normal(tuple(y_ref.shape)).astype(np.float32)
    y_ref.backward(torch.from_numpy(g))
    assert x_ref.grad is not None

    def forward(x):
        if train:
            y, _ = ported.module.apply(ported.variables, x, train=True, mutable=["batch_stats"])
            return y
        return ported.module.apply(ported.variables, x, train=False)

    @jax.jit
    def answer(x, g):
        y, pullback = jax.vjp(forward, x)
        return y, pullback(g)[0]

    y_ans, dx_ans = answer(jnp.asarray(X), jnp.asarray(g))
    assert_close(y_ans, y_ref.detach(), what="output")
    assert_close(dx_ans, x_ref.grad, what="input gradient")


def test_deprecated_upsample_functions_port_through_interpolate():
    """F.upsample* are Python wrappers: FX records the F.interpolate call inside."""

    class Old(torch.nn.Module):
        def forward(self, x):
            return (
                F.upsample(x, scale_factor=2, mode="bilinear")[..., ::2, ::2]
                + F.upsample_nearest(x, size=(9, 10))
                + F.upsample_bilinear(x, size=(9, 10))
            )

    with pytest.warns(UserWarning, match="deprecated"):
        ported = jaxbn.port(Old(), torch.from_numpy(X))
    with pytest.warns(UserWarning, match="deprecated"):
        desired = Old()(torch.from_numpy(X))
    assert_close(ported.module.apply({}, X), desired, what="F.upsample*")


class Unsupported(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Upsample(scale_factor=2, mode="lanczos")

    def forward(self, x):
        y = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
        return self.up(y) + F.interpolate(x, size=(9, 10), mode="bicubic", antialias=True)


def test_unsupported_resizing_is_a_port_error_naming_it():
    with pytest.raises(PortError) as error:
        jaxbn.port(Unsupported(), torch.from_numpy(X))
    message = str(error.value)
    assert "3 unsupported operation(s)" in message
    assert "up: torch.nn.modules.upsampling.Upsample: mode='lanczos' is not supported" in message
    assert "antialias=True (mode='bilinear') is not supported" in message
    assert "antialias=True (mode='bicubic') is not supported" in message
    assert "supported modes: 'nearest', 'nearest-exact', 'area'" in message


@pytest.mark.parametrize(
    ("options", "shape", "error"),
    [
        ({"size": 4, "mode": "nearest", "align_corners": False}, (1, 1, 5, 5), ValueError),
        ({"size": 4, "scale_factor": 2.0}, (1, 1, 5, 5), ValueError),
        ({"mode": "nearest"}, (1, 1, 5, 5), ValueError),
        ({"size": (4, 4, 4)}, (1, 1, 5, 5), ValueError),
        ({"size": 4, "recompute_scale_factor": True}, (1, 1, 5, 5), ValueError),
        ({"size": 4, "mode": "bilinear"}, (1, 1, 5), NotImplementedError),
    ],
)
def test_bad_arguments_fail_as_in_torch(options, shape, error):
    x = np.zeros(shape, np.float32)
    with pytest.raises(error):
        F.interpolate(torch.from_numpy(x), **options)
    with pytest.raises(error):
        interpolate(jnp.asarray(x), **options)
