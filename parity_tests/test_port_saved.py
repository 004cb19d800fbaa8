"""A port that leaves torch behind: generated Flax source, saved, loaded without torch.

Each model is ported, its source generated and saved with
:meth:`jaxbn.port.Ported.save`; then one subprocess in which ``import torch``
fails loads every directory with :func:`jaxbn.port.load`, runs it in eval and
in a training step on the same inputs, and takes three optax steps. Here, with
torch: those outputs and statistics equal the in-process port's bit for bit
(XLA compiles the same computation), the trained variables load into the torch
model with ``strict=True``, and the source passes ruff. The models over CI's
time budget run with ``JAXBN_ALL_MODELS=1``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn.convert import load_variables
from jaxbn.parity import randomized

from .test_port_models import ALL_MODELS, MODELS

ROOT = Path(__file__).resolve().parent.parent
# In CI (the 89 of the suite with JAXBN_ALL_MODELS=1: 3-D convolutions, RAFT's
# refinement called in a loop, stochastic depth ...): plain blocks and their variants
# (ResNet), an auxiliary head in training only (GoogLeNet: `if train:`), and timm's
# attention blocks with shape checks (EfficientViT). (The FrozenBatchNorm backbone
# moved to the opt-in lane to keep CI in its budget; all 89 passed torch-free.)
CI = ("resnet18", "googlenet", "timm_efficientvit_b0")
NAMES = tuple(MODELS) if ALL_MODELS else CI
OPTAX = ("resnet18", "timm_efficientvit_b0")  # trained three optax steps without torch


def _inputs(name: str) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(np.float32) for shape in MODELS[name].shapes]


def _leaves(tree: Any) -> dict[str, Any]:
    return {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def _save_and_run_without_torch(root: Path) -> dict[str, Path]:
    """name -> its saved port, after the torch-free run. Beside each: the in-process
    port's eval and training-step outputs and updated statistics (files, not memory:
    with JAXBN_ALL_MODELS=1 there are 89 models)."""
    found = {}
    for name in NAMES:
        xs = _inputs(name)
        example = [torch.from_numpy(x) for x in xs]
        model = randomized(MODELS[name].factory())
        ported = jaxbn.port(model, example[0] if len(example) == 1 else tuple(example))
        directory = found[name] = ported.save(root / name)
        np.savez(directory / "inputs.npz", *xs)
        if name in OPTAX:
            (directory / "optax").touch()
        rngs = {"dropout": jax.random.key(1)}
        y = ported.module.apply(ported.variables, *xs, train=False)
        yt, updates = ported.module.apply(
            ported.variables, *xs, train=True, mutable=["batch_stats"], rngs=rngs
        )
        for label, tree in (("eval", y), ("train", yt), ("stats", updates)):
            np.savez(directory / f"expected_{label}.npz", **_leaves(tree))
    done = subprocess.run(
        [sys.executable, "-m", "parity_tests._without_torch", *map(str, found.values())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120 * len(found),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return found


def test_ports_saved_then_run_and_trained_without_torch(tmp_path):
    """Every check on every model; one test, so that one pytest-xdist worker ports
    them (two would each port them all)."""
    saved = _save_and_run_without_torch(tmp_path)
    failures = []
    for name, directory in saved.items():
        for check in (_same_as_the_port, _loads_into_the_torch_model, _clean_source):
            try:
                check(name, directory)
            except AssertionError as error:
                failures.append(f"{name}: {check.__name__}: {error}")
    assert not failures, "\n".join(failures)
    if "resnet18" in saved:
        _within_twice_the_hand_written_resnet(saved["resnet18"])
        _edited_and_trained(saved["resnet18"])
    if "googlenet" in saved:
        _an_if_train_branch(saved["googlenet"])


def _same_as_the_port(name: str, directory: Path) -> None:
    """Bit for bit: the loaded model.py and the in-process port compile to the same
    computation (the same ops, in the same order)."""
    outputs = np.load(directory / "outputs.npz")
    for label in ("eval", "train"):
        expected = np.load(directory / f"expected_{label}.npz")
        assert len(expected.files) == len([k for k in outputs.files if k.startswith(label)])
        for i in range(len(expected.files)):
            np.testing.assert_array_equal(outputs[f"{label}{i}"], expected[str(i)])
    expected = np.load(directory / "expected_stats.npz")
    stats = jax.tree.leaves(load_variables(directory / "updates.msgpack"))
    assert len(stats) == len(expected.files)
    for i, got in enumerate(stats):
        np.testing.assert_array_equal(got, expected[str(i)])


def _loads_into_the_torch_model(name: str, directory: Path) -> None:
    """The training step's statistics (and, for OPTAX, parameters trained three optax
    steps) go back into the torch model strictly."""
    variables = load_variables(directory / "variables.msgpack")
    if name in OPTAX:
        updated = load_variables(directory / "trained.msgpack")
        moved = [
            not np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(updated["params"]),
                jax.tree.leaves(variables["params"]),
                strict=True,
            )
        ]
        assert sum(moved) > 0.9 * len(moved)
    else:
        updated = {**variables, **load_variables(directory / "updates.msgpack")}
    assert jax.tree.structure(updated) == jax.tree.structure(variables)
    model = MODELS[name].factory()
    model.load_state_dict(jaxbn.to_torch(updated, model), strict=True)
    tracked = [b for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    steps = 3 if name in OPTAX else 1
    assert all(int(b) == 7 + steps for b in tracked)  # (randomized() set 7)


def _clean_source(name: str, directory: Path) -> None:
    """It imports no torch, and passes ruff check and ruff format --check."""
    del name
    source = (directory / "model.py").read_text()
    imported = re.findall(r"^(?:import|from) ([\w.]+)", source, re.MULTILINE)
    assert {m.split(".")[0] for m in imported} <= {
        "functools",
        "typing",
        "flax",
        "jax",
        "numpy",
        "jaxbn",
    }
    ruff = [sys.executable, "-m", "ruff"]
    for check in (["check", "--isolated"], ["format", "--isolated", "--check"]):
        done = subprocess.run(
            [*ruff, *check, str(directory / "model.py")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


# ResNet-18 exported from its saved directory, loaded: at 64x64, since at 32x32 its
# last BatchNorm sees 2-3 values per channel in a training step, where float32 is
# ill-conditioned (the symbolic-batch program is then 4e-4 of the largest output off).
EXPORTED = {"resnet18": (2, 3, 64, 64)}


def _export_and_run_with_jax_alone(tmp_path_factory: Any) -> dict[str, Any]:
    """name -> (port, inputs, outputs of the exported programs called without flax,
    jaxbn or torch: eval at batch sizes 1 and 3, the training step at 2 and 3)."""
    found = {}
    for name, shape in EXPORTED.items():
        root = tmp_path_factory.mktemp("exported")
        model = randomized(MODELS[name].factory())
        ported = jaxbn.port.load(jaxbn.port(model, torch.zeros(shape)).save(root / name))
        file = root / f"{name}.jaxexport"
        ported.export(file)
        x = np.random.default_rng(1).standard_normal((3, *ported.info["inputs"][0][0][1:]))
        np.save(f"{file}.inputs.npy", x.astype(np.float32))
        found[name] = (ported, x.astype(np.float32), file)
    done = subprocess.run(
        [sys.executable, "-m", "parity_tests._without_torch", "--exported"]
        + [str(f[2]) for f in found.values()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (p, x, np.load(f"{file}.outputs.npz")) for name, (p, x, file) in found.items()}


def _close(got: Any, expected: Any) -> None:
    """Within float32 noise: XLA compiles the symbolic-batch program otherwise than the
    port at one batch size (measured: at most 2.6e-5 of the largest value)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    assert float(np.max(np.abs(got - expected))) <= 1e-4 * scale, (got, expected)


def test_exported_programs_run_with_jax_alone_at_any_batch_size(tmp_path_factory):
    for ported, x, outputs in _export_and_run_with_jax_alone(tmp_path_factory).values():
        _same_as_the_exported(ported, x, outputs)


def _same_as_the_exported(ported: Any, x: np.ndarray, outputs: Any) -> None:
    rngs = {"dropout": jax.random.key(1)}
    for n in (1, 3):
        _close(outputs[f"eval{n}"], ported.module.apply(ported.variables, x[:n], train=False))
    for n in (2, 3):
        yt, updates = ported.module.apply(
            ported.variables, x[:n], train=True, mutable=["batch_stats"], rngs=rngs
        )
        _close(outputs[f"train{n}"], yt)
        leaves = jax.tree.leaves(updates["batch_stats"])
        assert len([k for k in outputs.files if k.startswith(f"stats{n}_")]) == len(leaves)
        for i, leaf in enumerate(leaves):
            _close(outputs[f"stats{n}_{i}"], leaf)


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3), torch.nn.ReLU()
    )


def test_a_directory_of_another_jaxbn_version_is_refused(tmp_path):
    directory = jaxbn.port(_tiny(), torch.zeros(2, 3, 8, 8)).save(tmp_path / "tiny")
    meta = json.loads((directory / "port.json").read_text())
    assert meta["jaxbn"] == jaxbn.__version__
    assert meta["torch"] == torch.__version__
    assert meta["inputs"] == [[[2, 3, 8, 8], "float32"]]
    jaxbn.port.load(directory)  # as written: loads
    meta["jaxbn"] = "0.0.7"
    (directory / "port.json").write_text(json.dumps(meta))
    with pytest.raises(jaxbn.port.PortError) as error:
        jaxbn.port.load(directory)
    assert str(error.value) == (
        f"jaxbn.port.load: {directory} was written by jaxbn 0.0.7 (save format 1); this is "
        f"jaxbn {jaxbn.__version__} (format 1), whose layers its model.py may not match. Load "
        "it with jaxbn==0.0.7, or port the torch model again and save it with this jaxbn"
    )


def test_load_says_what_a_directory_lacks(tmp_path):
    (tmp_path / "model.py").write_text("")
    with pytest.raises(jaxbn.port.PortError, match=r"is not a saved port \(no variables"):
        jaxbn.port.load(tmp_path)


def test_save_refuses_a_path_it_cannot_write_before_any_work(tmp_path, monkeypatch):
    ported = jaxbn.port(_tiny(), torch.zeros(2, 3, 8, 8))
    monkeypatch.setattr(type(ported), "source", lambda self: pytest.fail("generated first"))
    with pytest.raises(jaxbn.port.PortError, match=r"its parent directory .* does not exist"):
        ported.save(tmp_path / "missing" / "port")
    (tmp_path / "file").write_text("")
    with pytest.raises(jaxbn.port.PortError, match="is a file; save a port to a directory"):
        ported.save(tmp_path / "file")


def _within_twice_the_hand_written_resnet(directory: Path) -> None:
    """A person's port of ResNet (examples/resnet.py: ResNet-18/34/50, 170 lines) next
    to the generated ResNet-18: one BasicBlock class and its downsample variant."""
    generated = (directory / "model.py").read_text()
    by_hand = (ROOT / "examples" / "resnet.py").read_text()
    assert len(generated.splitlines()) <= 2 * len(by_hand.splitlines())
    classes = re.findall(r"^class (\w+)\(", generated, re.MULTILINE)
    assert classes == [
        "Downsample", "BasicBlock", "BasicBlockWithDownsample", "Layer1", "Layer2", "ResNet"
    ]  # fmt: skip
    assert "momentum=0.1, eps=1e-05" in generated


def _an_if_train_branch(directory: Path) -> None:
    """GoogLeNet's auxiliary heads run in training only, and its outputs are a
    NamedTuple of the generated module."""
    generated = (directory / "model.py").read_text()
    assert "        if train:\n" in generated
    assert "class GoogLeNetOutputs(NamedTuple):" in generated


def _edited_and_trained(directory: Path) -> None:
    """Replace ResNet-18's 1000-class head with a 10-class one, keep the rest of the
    ported variables, and take a training step."""
    import optax

    ported = jaxbn.port.load(directory)
    source = (directory / "model.py").read_text()
    head = 'layers.Linear(512, 1000, name="fc")'
    assert source.count(head) == 1
    namespace: dict = {}
    exec(compile(source.replace(head, 'layers.Linear(512, 10, name="fc")'), "edited", "exec"),
         namespace)  # fmt: skip
    edited = namespace["ResNet"]()
    x = _inputs("resnet18")[0]
    fresh = edited.init(jax.random.key(0), x, train=False)
    params = {**ported.variables["params"], "fc": fresh["params"]["fc"]}
    variables = {**ported.variables, "params": params}

    def loss(params):
        logits, updates = edited.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        labels = np.arange(len(x)) % 10
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert grads["fc"]["kernel"].shape == (512, 10)
    assert np.isfinite(float(value))
    assert int(updates["batch_stats"]["bn1"]["num_batches_tracked"]) == 8  # (7 + this step)


def test_a_port_with_a_converter_of_ones_own_says_it_has_no_source(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanhshrink())
    converters = {torch.nn.Tanhshrink: lambda m: lambda x: x - jax.numpy.tanh(x)}
    ported = jaxbn.port(model, torch.zeros(2, 3, 8, 8), converters=converters)
    with pytest.raises(jaxbn.port.PortError, match=r"cannot write .*Sequential as Flax source"):
        ported.save(tmp_path / "port")
    assert not (tmp_path / "port").exists()


class _Step(torch.nn.Module):
    """A refinement step whose state and output a loop carries, as RAFT's update block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.bn(self.conv(h + x)))
        return h, self.head(h)


class Looped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 1)
        self.step = _Step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h, outputs = torch.zeros_like(x), []
        for _ in range(3):
            h, out = self.step(h, x)
            outputs.append(out)
            x = x * 0.5  # (the loop's own work, between the calls)
        return torch.stack(outputs)  # (the last step's state is never read)


def test_a_module_called_in_a_loop_writes_clean_source(tmp_path):
    """The last call's unread output is `_` (ruff's RUF059, found on RAFT), and the
    saved module computes what the port does."""
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ported = jaxbn.port(randomized(Looped()), torch.from_numpy(x))
    directory = ported.save(tmp_path / "looped")
    assert "_, head_2 = step_module(" in (directory / "model.py").read_text()
    _clean_source("looped", directory)
    loaded = jaxbn.port.load(directory)
    for train in (False, True):
        kwargs = {"mutable": ["batch_stats"]} if train else {}
        got = jax.tree.leaves(loaded.module.apply(loaded.variables, x, train=train, **kwargs))
        want = jax.tree.leaves(ported.module.apply(ported.variables, x, train=train, **kwargs))
        assert len(got) == len(want) == (4 if train else 1)  # (and the statistics)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
