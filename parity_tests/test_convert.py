"""Converters: bit-exact round trips, layer-level parity, strict accounting, files, CLI."""

from __future__ import annotations

import collections
import contextlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.convert import (
    CheckpointError,
    ConversionError,
    from_torch,
    inspect,
    load_checkpoint,
    load_variables,
    save_variables,
    to_torch,
)
from jaxbn.parity import to_numpy

from .helpers import TORCH_DTYPES, assert_close, assert_same_state, bits, jaxbn_here

SPECIALS = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -1e-45, 3.4e38]

BATCHNORM_VARIANTS = {
    "affine": {},
    "no-bias": {"bias": False},
    "no-affine": {"affine": False},
    "untracked": {"track_running_stats": False},
}


def poisoned_batchnorm(cls: type, variant: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A BatchNorm whose tensors hold NaN, +-inf, -0.0, denormals and a big counter."""
    bn = cls(len(SPECIALS), dtype=dtype, **variant)
    with torch.no_grad():
        for tensor in bn.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.tensor(SPECIALS, dtype=torch.float64).to(dtype))
            else:
                tensor.fill_(123456789)
    return bn  # parameters still require grad, as in a live model


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("variant", BATCHNORM_VARIANTS.values(), ids=BATCHNORM_VARIANTS.keys())
@pytest.mark.parametrize("cls", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d])
def test_batchnorm_round_trip_is_bit_exact(cls, variant, dtype, x64):
    bn = poisoned_batchnorm(cls, variant, TORCH_DTYPES[dtype])
    tracked = variant.get("track_running_stats", True)
    with (
        pytest.warns(UserWarning, match="negative or NaN") if tracked else contextlib.nullcontext()
    ):
        variables = from_torch(bn)
    expected_tree = {
        "params": {"scale", "bias"},
        "batch_stats": {"mean", "var", "num_batches_tracked"},
    }
    if variant.get("bias") is False:
        expected_tree["params"] = {"scale"}
    if variant.get("affine") is False:
        del expected_tree["params"]
    if variant.get("track_running_stats") is False:
        del expected_tree["batch_stats"]
    assert {k: set(v) for k, v in variables.items()} == expected_tree
    state = to_torch(variables, bn)
    assert_same_state(state, bn.state_dict())
    fresh = cls(len(SPECIALS), dtype=TORCH_DTYPES[dtype], **variant)
    assert not fresh.load_state_dict(state, strict=True).missing_keys
    if "batch_stats" in variables:
        assert np.asarray(variables["batch_stats"]["num_batches_tracked"]).dtype == np.int64


def test_state_dict_and_module_give_the_same_tree():
    bn = torch.nn.BatchNorm2d(4)
    bn(torch.randn(3, 4, 2, 2))
    from_module, from_state = from_torch(bn), from_torch(bn.state_dict())
    assert jax.tree.structure(from_module) == jax.tree.structure(from_state)
    for a, b in zip(jax.tree.leaves(from_module), jax.tree.leaves(from_state), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


def test_converted_arrays_do_not_alias_torch_memory():
    bn = torch.nn.BatchNorm1d(3)
    variables = from_torch(bn)
    with torch.no_grad():
        bn.weight.add_(1.0)
        bn.state_dict()["running_mean"].add_(1.0)
    np.testing.assert_array_equal(variables["params"]["scale"], np.ones(3))
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))


class TorchZoo(torch.nn.Module):
    """One of every supported layer kind, with torch's own default init."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = torch.nn.Conv1d(3, 4, 3)
        self.conv2d = torch.nn.Conv2d(3, 4, (3, 2), groups=1)
        self.conv3d = torch.nn.Conv3d(2, 3, 2, bias=False)
        self.deconv = torch.nn.ConvTranspose2d(3, 5, (3, 2), stride=2, padding=1, output_padding=1)
        self.linear = torch.nn.Linear(6, 2)
        self.bn = torch.nn.BatchNorm2d(4)
        self.ln = torch.nn.LayerNorm(6)
        self.gn = torch.nn.GroupNorm(2, 4)
        self.embed = torch.nn.Embedding(10, 6)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.LayerNorm(6))


class FlaxBlocks(nn.Module):
    """torch's Sequential(Linear, LayerNorm): children named '0' and '1'."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(6, use_bias=False, name="0")(x)
        return nn.LayerNorm(epsilon=1e-5, name="1")(x)


class FlaxZoo(nn.Module):
    """The Flax layers that compute what TorchZoo's do, named by torch's paths."""

    @nn.compact
    def __call__(self, inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {
            "conv1d": nn.Conv(4, (3,), padding="VALID", name="conv1d")(inputs["x1"]),
            "conv2d": nn.Conv(4, (3, 2), padding="VALID", name="conv2d")(inputs["x2"]),
            "conv3d": nn.Conv(3, (2, 2, 2), padding="VALID", use_bias=False, name="conv3d")(
                inputs["x3"]
            ),
            "deconv": nn.ConvTranspose(
                5,
                (3, 2),
                strides=(2, 2),
                padding=((1, 2), (0, 1)),
                transpose_kernel=True,
                name="deconv",
            )(inputs["x2"]),
            "linear": nn.Dense(2, name="linear")(inputs["v"]),
            "bn": jaxbn.BatchNorm(use_running_average=True, name="bn")(inputs["x4"]),
            "ln": nn.LayerNorm(epsilon=1e-5, name="ln")(inputs["v"]),
            "gn": nn.GroupNorm(2, epsilon=1e-5, name="gn")(inputs["x4"]),
            "embed": nn.Embed(10, 6, name="embed")(inputs["ids"]),
            "blocks": FlaxBlocks(name="blocks")(inputs["v"]),
        }


def zoo_inputs() -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """The same inputs in torch's layout and in Flax's (channels last)."""
    torch.manual_seed(1)
    t = {
        "x1": torch.randn(2, 3, 9),
        "x2": torch.randn(2, 3, 6, 7),
        "x3": torch.randn(2, 2, 4, 4, 4),
        "x4": torch.randn(2, 4, 5, 5),
        "v": torch.randn(2, 6),
        "ids": torch.tensor([[1, 2, 9], [0, 5, 5]]),
    }
    f = {
        k: np.moveaxis(to_numpy(v), 1, -1) if k.startswith("x") else to_numpy(v)
        for k, v in t.items()
    }
    return t, f


def zoo_template() -> dict[str, Any]:
    """FlaxZoo's variables as zeros: a template's values are never read, and
    an eager ``init`` (random initialisers, op by op) takes seconds."""
    _, f = zoo_inputs()
    shapes = jax.eval_shape(lambda: FlaxZoo().init(jax.random.key(0), f))
    return dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def torch_zoo_outputs(zoo: TorchZoo, t: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    zoo.eval()
    with torch.no_grad():
        outputs = {
            "conv1d": zoo.conv1d(t["x1"]),
            "conv2d": zoo.conv2d(t["x2"]),
            "conv3d": zoo.conv3d(t["x3"]),
            "deconv": zoo.deconv(t["x2"]),
            "linear": zoo.linear(t["v"]),
            "bn": zoo.bn(t["x4"]),
            "ln": zoo.ln(t["v"]),
            "gn": zoo.gn(t["x4"]),
            "embed": zoo.embed(t["ids"]),
            "blocks": zoo.blocks(t["v"]),
        }
    return {
        k: np.moveaxis(to_numpy(v), 1, -1) if v.ndim > 2 and k != "embed" else to_numpy(v)
        for k, v in outputs.items()
    }


def trained_zoo() -> TorchZoo:
    torch.manual_seed(0)
    zoo = TorchZoo()
    with torch.no_grad():
        for p in zoo.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # also moves norm scales off 1 and biases off 0
    zoo.bn.train()
    for _ in range(3):
        zoo.bn(torch.randn(8, 4, 3, 3) * 2 + 1)
    return zoo


def test_every_layer_kind_computes_what_torch_computes():
    zoo = trained_zoo()
    t, f = zoo_inputs()
    template = zoo_template()
    variables = from_torch(zoo, template)  # strict: every key accounted for
    outputs = FlaxZoo().apply(variables, f)
    assert isinstance(outputs, dict)
    for name, desired in torch_zoo_outputs(zoo, t).items():
        assert_close(outputs[name], desired, what=name)


def test_whole_model_round_trip_is_bit_exact_and_loads_strictly():
    zoo = trained_zoo()
    for source in (zoo, zoo.state_dict()):
        variables = from_torch(source, kinds={"embed": "Embedding", "blocks.0": "Linear"})
        state = to_torch(variables, zoo)
        assert_same_state(state, zoo.state_dict())
        fresh = TorchZoo()
        fresh.load_state_dict(state, strict=True)


def test_bare_state_dict_reports_ambiguity_instead_of_guessing():
    zoo = trained_zoo()
    with pytest.raises(ConversionError) as caught:
        from_torch(zoo.state_dict())
    message = str(caught.value)
    assert "ambiguous (2):" in message
    assert re.search(
        r"embed: ambiguous: could be Linear or Embedding; pass e.g. kinds=\{'embed'", message
    )
    assert "blocks.0: ambiguous" in message
    # A template decides: 'embedding' vs 'kernel' at those paths.
    _, f = zoo_inputs()
    template = jax.eval_shape(lambda: FlaxZoo().init(jax.random.key(0), f))
    variables = from_torch(zoo.state_dict(), template)
    assert variables["params"]["embed"]["embedding"].shape == (10, 6)
    assert variables["params"]["blocks"]["0"]["kernel"].shape == (6, 6)


def test_conversion_error_and_report_are_top_level_names():
    assert jaxbn.ConversionError is ConversionError
    assert jaxbn.Report is jaxbn.convert.Report
    with pytest.raises(jaxbn.ConversionError):
        from_torch(trained_zoo().state_dict())


def test_inspect_reports_what_from_torch_does_with_every_kind_of_template():
    """inspect and from_torch share one plan: same entries, same problems, any template."""
    from flax import nnx

    zoo = trained_zoo()
    linen = zoo_template()
    linen["params"] = {**linen["params"], "extra": {"kernel": jnp.zeros((2, 2))}}
    abstract = jax.eval_shape(lambda: linen)

    class NnxNet(nnx.Module):
        def __init__(self):
            self.embed = nnx.Embed(10, 6, rngs=nnx.Rngs(0))

    state = {k: v for k, v in zoo.state_dict().items() if k.startswith("embed.")}
    for obj, template in [
        (zoo.state_dict(), linen),
        (zoo.state_dict(), abstract),
        (state, NnxNet()),
    ]:
        report = inspect(obj, template)
        _, converted = from_torch(obj, template, strict=False)
        assert report == converted
    assert inspect(zoo.state_dict(), linen).missing == ("params/extra/kernel",)
    assert not inspect(zoo.state_dict(), linen).ambiguous  # the template decides
    nnx_report = inspect(state, NnxNet())
    assert nnx_report.ok, nnx_report.describe_problems()
    assert [e.flax_key for e in nnx_report.entries] == [("params", "embed", "embedding")]


def test_strict_accounting_lists_every_problem_at_once():
    zoo = trained_zoo()
    template = zoo_template()
    params = dict(template["params"])
    params["extra"] = {"kernel": jnp.zeros((2, 2))}  # missing from the checkpoint
    params["linear"] = {
        "kernel": jnp.zeros((6, 3)),
        "bias": jnp.zeros(2, jnp.bfloat16),
    }  # wrong shape, dtype
    template["params"] = params
    state = zoo.state_dict()
    state["head.alpha"] = torch.zeros(3)  # no table covers it
    del state["ln.bias"]
    with pytest.raises(ConversionError) as caught:
        from_torch(state, template, kinds={"embed": "Embedding", "blocks.0": "Linear"})
    report = caught.value.report
    assert report.missing == ("params/ln/bias", "params/extra/kernel")
    assert report.unexpected == ()
    assert report.mismatched == (
        "params/linear/kernel (torch linear.weight): converted float32[6, 2], template float32[6, 3]",
        "params/linear/bias (torch linear.bias): converted float32[2], template bfloat16[2]",
    )
    assert report.unconverted == (
        "head: no layer kind has these tensor names and ranks (keys: alpha)",
    )
    message = str(caught.value)
    assert "5 problem(s)" in message
    for line in (*report.missing, *report.mismatched, *report.unconverted):
        assert line in message
    variables, report = from_torch(
        state, template, strict=False, kinds={"embed": "Embedding", "blocks.0": "Linear"}
    )
    assert len(report.missing) == 2
    assert "ln" in variables["params"]


def test_unsupported_module_types_are_reported_with_their_keys():
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.Bilinear(2, 2, 2), torch.nn.LSTM(2, 2)
    )
    with pytest.raises(
        ConversionError,
        match=r"1: torch.nn.Bilinear is not a supported layer kind \(keys: bias, weight\)",
    ) as caught:
        from_torch(model)
    assert (
        "2: torch.nn.LSTM is not a supported layer kind (keys: bias_hh_l0, bias_ih_l0, weight_hh_l0, weight_ih_l0)"
        in str(caught.value)
    )


def test_one_dimensional_weight_alone_is_ambiguous():
    state = {"act.weight": torch.ones(1), "norm.weight": torch.ones(4), "norm.bias": torch.zeros(4)}
    variables, report = from_torch(state, strict=False)
    assert report.ambiguous == (
        "act: ambiguous: could be Norm or PReLU; "
        "pass e.g. kinds={'act': 'Norm'}, the torch module, or a template (keys: weight)",
    )
    assert set(variables["params"]) == {"norm"}


def test_checkpoint_wrappers_and_ddp_prefix_are_removed():
    bn = torch.nn.BatchNorm1d(3)
    state = {f"module.{k}": v for k, v in bn.state_dict().items()}
    for checkpoint in ({"state_dict": state, "epoch": 4, "optimizer": {}}, {"model": state}, state):
        variables, report = from_torch(checkpoint, strict=False)
        assert report.ok
        assert set(variables["params"]) == {"scale", "bias"}
        assert "removed DDP's 'module.' prefix" in report.notes
    _, report = from_torch({"state_dict": state, "epoch": 4}, strict=False)
    assert (
        "using checkpoint['state_dict']; not model weights, not converted: ['epoch']"
        in report.notes
    )


def test_path_rule_is_overridable_both_ways():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    variables = from_torch(
        model, flax_path=lambda prefix: tuple(prefix.replace(".", "_").split("/")) if prefix else ()
    )
    assert set(variables["params"]) == {"0_0"}
    state = to_torch(variables, model, torch_path=lambda path: ".".join(path).replace("_", "."))
    assert_same_state(state, model.state_dict())


def test_to_torch_reports_against_a_torch_template():
    variables = from_torch(torch.nn.BatchNorm1d(3))
    with pytest.raises(ConversionError) as caught:
        to_torch(variables, torch.nn.BatchNorm1d(4))
    assert caught.value.report.mismatched[0] == "weight: converted float32[3], template float32[4]"
    del variables["batch_stats"]["num_batches_tracked"]
    with pytest.raises(ConversionError, match=r"missing \(1\):\n  num_batches_tracked"):
        to_torch(variables, torch.nn.BatchNorm1d(3))


def test_old_checkpoint_without_counter_loads_as_zero_like_torch():
    bn = torch.nn.BatchNorm2d(3)
    state = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    variables, report = from_torch(state, strict=False)
    assert report.ok
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 0
    assert "num_batches_tracked: absent (old checkpoint); set to 0" in report.notes


def test_counter_beyond_int32_is_never_wrapped():
    bn = torch.nn.BatchNorm1d(3)
    bn.state_dict()["num_batches_tracked"].fill_(2**40)
    with pytest.raises(
        OverflowError,
        match=r"num_batches_tracked = 1099511627776 does not fit in int32.*counts='saturate'",
    ):
        from_torch(bn)
    with pytest.warns(UserWarning, match="saturated to 2147483647"):
        variables = from_torch(bn, counts="saturate")
    assert int(variables["batch_stats"]["num_batches_tracked"]) == 2**31 - 1
    with jax.enable_x64(True):
        assert int(from_torch(bn)["batch_stats"]["num_batches_tracked"]) == 2**40


def test_unknown_kind_name_is_rejected():
    with pytest.raises(
        ValueError, match=r"unknown layer kind 'Dense'; use one of BatchNorm, BatchNorm1d"
    ):
        from_torch(torch.nn.Linear(2, 2), kinds={"": "Dense"})


def test_not_a_state_dict_is_rejected():
    with pytest.raises(TypeError, match=r"these entries are not tensors: \['lr'\]"):
        from_torch({"weight": torch.ones(2), "lr": 0.1})
    with pytest.raises(
        TypeError, match=r"from_torch takes a torch\.nn\.Module or a state dict, got str"
    ):
        from_torch("model.pt")


def test_inspect_converts_nothing_and_matches_from_torch():
    zoo = trained_zoo()
    report = inspect(zoo)
    variables, converted = from_torch(zoo, strict=False)
    assert report.entries == converted.entries
    assert len(report.entries) == len(zoo.state_dict())
    by_key = {e.torch_key: e for e in report.entries}
    assert by_key["deconv.weight"].flax_shape == (3, 2, 5, 3)
    assert by_key["linear.weight"].layout == "transposed"
    assert variables["params"]["conv2d"]["kernel"].shape == by_key["conv2d.weight"].flax_shape


# --- files -------------------------------------------------------------------


def test_pt_and_safetensors_files_load(tmp_path):
    from safetensors.torch import save_file

    zoo = trained_zoo()
    state = zoo.state_dict()
    torch.save(state, tmp_path / "zoo.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "zoo.safetensors")
    for name in ("zoo.pt", "zoo.safetensors"):
        loaded = load_checkpoint(tmp_path / name)
        assert_same_state(collections.OrderedDict((k, loaded[k]) for k in state), state)


def test_pickled_module_is_refused_without_running_it(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(
        CheckpointError,
        match=r"whole_model.pt: holds pickled Python objects.*torch.save\(model.state_dict\(\), path\)",
    ):
        load_checkpoint(path)


def test_pickled_code_is_never_executed(tmp_path):
    import pickle

    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"weight": Exploit()}, file)
    with pytest.raises(
        CheckpointError, match=r"evil\.pt: not a readable PyTorch checkpoint.*refused it"
    ):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.pt", b"", r"empty.pt: the file is empty \(0 bytes\)"),
        ("junk.pth", b"not a checkpoint" * 10, r"junk.pth: not a readable PyTorch checkpoint"),
        ("weights.npz", b"x", r"weights.npz: unknown checkpoint type; expected one of .pt"),
        (
            "bad.safetensors",
            b"\x05\x00\x00\x00\x00\x00\x00\x00{}",
            r"bad.safetensors: not a readable safetensors file",
        ),
    ],
)
def test_bad_files_get_an_error_naming_them(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / name)


def test_truncated_checkpoint_gets_an_error_naming_it(tmp_path):
    torch.save(trained_zoo().state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"cut.pt: not a readable PyTorch checkpoint \(truncated or corrupt\?\)",
    ):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_msgpack_save_and_load_give_the_identical_tree(tmp_path, x64):
    bn = torch.nn.BatchNorm2d(len(SPECIALS), dtype=torch.bfloat16)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(SPECIALS).bfloat16())
    variables = from_torch(bn)
    variables["params"]["extra"] = {"kernel": np.arange(6, dtype=np.float16).reshape(2, 3)}
    save_variables(tmp_path / "v.msgpack", variables)
    loaded = load_variables(tmp_path / "v.msgpack")
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(bits(a), bits(b))
    assert loaded["params"]["scale"].dtype == ml_dtypes.bfloat16


# --- the command ---------------------------------------------------------------


def test_convert_command_writes_a_loadable_file(capsys, tmp_path):
    zoo = trained_zoo()
    torch.save({"state_dict": zoo.state_dict(), "epoch": 3}, tmp_path / "zoo.pt")
    out = tmp_path / "zoo.msgpack"
    code, printed, err = jaxbn_here(
        capsys,
        "convert",
        tmp_path / "zoo.pt",
        "-o",
        out,
        "--kind",
        "embed=Embedding",
        "--kind",
        "blocks.0=Linear",
    )
    assert code == 0, err
    assert re.search(
        r"deconv\s+Conv\s+weight \[3, 5, 3, 2\]\s+->\s+params/deconv/kernel \[3, 2, 5, 3\] float32\s+spatial-first",
        printed,
    )
    assert re.search(
        r"linear\s+Linear\s+weight \[2, 6\]\s+->\s+params/linear/kernel \[6, 2\] float32\s+transposed",
        printed,
    )
    assert f"wrote {out}" in printed
    assert "not converted: ['epoch']" in printed
    loaded = load_variables(out)
    expected = from_torch(zoo, kinds={"embed": "Embedding"})
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


def test_convert_command_fails_with_the_full_list(capsys, tmp_path):
    zoo = trained_zoo()
    torch.save(zoo.state_dict(), tmp_path / "zoo.pt")
    out = tmp_path / "out.msgpack"
    code, printed, err = jaxbn_here(capsys, "convert", tmp_path / "zoo.pt", "-o", out, "--strict")
    assert code == 1
    assert "ambiguous (2):" in printed
    assert "nothing written to" in err
    assert not out.exists()
    # A template with a wrong shape: listed, exit 1.
    template = zoo_template()
    template["params"] = {
        **template["params"],
        "linear": {"kernel": np.zeros((6, 3), np.float32), "bias": np.zeros(2, np.float32)},
    }
    save_variables(tmp_path / "template.msgpack", template)
    code, printed, _ = jaxbn_here(
        capsys,
        "convert",
        tmp_path / "zoo.pt",
        "-o",
        out,
        "--template",
        tmp_path / "template.msgpack",
    )
    assert code == 1
    assert (
        "params/linear/kernel (torch linear.weight): converted float32[6, 2], template float32[6, 3]"
        in printed
    )
    code, _, err = jaxbn_here(capsys, "convert", tmp_path / "nope.pt", "-o", out)
    assert code == 2  # a wrong argument, refused before any work
    assert "nope.pt: no such file" in err


def test_inspect_command_lists_layers_and_kinds(capsys, tmp_path):
    torch.save(trained_zoo().state_dict(), tmp_path / "zoo.pt")
    code, printed, err = jaxbn_here(capsys, "inspect", tmp_path / "zoo.pt")
    assert code == 1, err  # it lists problems: the ambiguous layers
    assert re.search(r"bn\s+BatchNorm\s+weight \[4\]\s+->\s+params/bn/scale \[4\] float32", printed)
    assert re.search(
        r"num_batches_tracked \[\]\s+->\s+batch_stats/bn/num_batches_tracked \[\] int32\s+count",
        printed,
    )
    assert "embed (weight): could be Linear or Embedding; pass --kind embed=Linear" in printed
    assert not list(tmp_path.glob("*.msgpack"))


class TorchResNetLike(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class FlaxResNetLike(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv(name: str) -> nn.Conv:
            return nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name=name)

        def bn(name: str) -> jaxbn.BatchNorm:
            return jaxbn.BatchNorm(use_running_average=not train, name=name)

        x = nn.relu(bn("bn1")(conv("conv1")(x)))
        x = nn.relu(x + bn("bn2")(conv("conv2")(x)))
        return nn.Dense(4, name="fc")(x.mean(axis=(1, 2)))


def test_trained_resnet_like_model_converts_and_matches_torch_in_eval():
    torch.manual_seed(0)
    model = TorchResNetLike()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        x = torch.randn(8, 3, 6, 6) * 2 + 1
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 4, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        logits_ref = model(x)
    x_ans = np.moveaxis(to_numpy(x), 1, -1)
    template = jax.eval_shape(lambda: FlaxResNetLike().init(jax.random.key(0), x_ans))
    variables = from_torch(model, template)
    assert int(variables["batch_stats"]["bn1"]["num_batches_tracked"]) == 5
    logits_ans = FlaxResNetLike().apply(variables, x_ans)
    assert_close(logits_ans, logits_ref, what="logits")


class IndexTable(torch.nn.Module):
    """A persistent int64 index buffer beside a parameter, as timm's attention-bias tables."""

    def __init__(self) -> None:
        super().__init__()
        self.biases = torch.nn.Parameter(torch.linspace(0, 1, 4))
        self.register_buffer("index", torch.tensor([[0, 3, 1], [2, 2, 0]]))


def test_an_int64_buffer_fits_the_int32_template_jax_makes():
    """JAX holds integers as int32 unless x64 is on, so a template from init says int32;
    the converted int64 table is what JAX makes int32, and goes back to torch as int64."""
    model = IndexTable()
    template = {
        "params": {"biases": jax.ShapeDtypeStruct((4,), jnp.float32)},
        "buffers": {"index": jax.ShapeDtypeStruct((2, 3), jnp.int32)},
    }
    variables = jaxbn.from_torch(model, template)
    index = model.get_buffer("index")
    np.testing.assert_array_equal(variables["buffers"]["index"], index.numpy())
    state = jaxbn.to_torch(variables, model)
    assert state["index"].dtype == torch.int64
    assert torch.equal(state["index"], index)
    with pytest.raises(ConversionError, match="converted float32\\[4\\], template float64\\[4\\]"):
        jaxbn.from_torch(
            model, {**template, "params": {"biases": jax.ShapeDtypeStruct((4,), jnp.float64)}}
        )


class LearnableAffine(torch.nn.Module):
    """Bare parameters named as a norm layer's Flax variables (hgnetv2's affine block)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1.5]))
        self.bias = torch.nn.Parameter(torch.tensor([0.25]))


def test_bare_parameters_named_scale_and_bias_go_back_under_their_own_names():
    """Flax's `scale`/`bias` look like a norm layer's; the torch template says otherwise."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), LearnableAffine())
    variables = jaxbn.from_torch(model, kinds={"1": "Param"})
    assert set(variables["params"]["1"]) == {"scale", "bias"}
    state = jaxbn.to_torch(variables, model)
    assert list(state) == ["0.weight", "0.bias", "1.scale", "1.bias"]
    assert_same_state(state, model.state_dict())
