"""The runnable examples: each as a user runs it, and what each claims.

Every ``examples/*.py`` runs as a script in a fresh process (short settings);
the README's printed samples are compared with real runs.
"""

from __future__ import annotations

import pathlib

import pytest

from .helpers import EXAMPLES, assert_sample_matches, load_example, readme_sample, run

# The quick command line of each script (`python examples/NAME.py ARGS`).
SCRIPTS = {
    "train_cnn": ["--steps", "3"],
    "data_parallel": ["--steps", "2"],
    "resnet": [],
    "port_resnet": ["--steps", "2", "--plot", "{tmp}/port_resnet.png"],
}
SLOW_SCRIPTS = {"port_resnet"}  # pretrains and converts a ResNet-18 first (~40 s)


def test_every_example_has_a_quick_command_line():
    assert set(SCRIPTS) == {path.stem for path in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_SCRIPTS else n for n in SCRIPTS],
)
def test_example_runs_as_a_script(name, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in SCRIPTS[name]]
    result = run("python", EXAMPLES / f"{name}.py", *args, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip()


def test_an_example_says_what_to_install_before_any_work(tmp_path):
    """Without matplotlib: one line naming it and the install command, before the 40 s of work."""
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['port_resnet.py']; "
        f"runpy.run_path({str(EXAMPLES / 'port_resnet.py')!r}, run_name='__main__')"
    )
    result = run("python", "-c", code, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "examples/port_resnet.py needs matplotlib; install it from the checkout with: "
        "pip install -e '.[torch,examples]'"
    )


def test_train_cnn_learns_and_counts_steps():
    """The same held-out batch before and after: loss down, accuracy up, 20 steps counted."""
    result = load_example("train_cnn").main(steps=20)
    assert result["num_batches_tracked"] == 20
    # Measured: 3.09 -> 1.85 and 0.10 -> 0.27. With the learning rate at 0 (only the
    # running statistics change) the loss ends at 2.45 and the accuracy at 0.11.
    assert result["eval_loss"] < 0.7 * result["eval_loss_before"]
    assert result["eval_accuracy"] >= 0.2 > result["eval_accuracy_before"]


def test_data_parallel_statistics_equal_a_single_device_run():
    worst = load_example("data_parallel").main(steps=3, verbose=False)
    assert worst["batch_stats"] < 1e-5
    assert worst["params"] < 1e-5
    assert worst["loss"] < 1e-5


# --- the README's printed samples, against real runs ---------------------------


def test_sample_matcher_can_fail():
    sample = ["loss 2.1283 -> 0.2502, difference 4.7e-07", "...", "written to .../p.png"]
    assert_sample_matches(
        sample, ["loss 2.1283 -> 0.2502, difference 3.1e-07", "more", "written to /tmp/3/p.png"]
    )
    for stale in (
        "loss 2.1283 -> 0.2541, difference 4.7e-07",  # a different number
        "loss 2.1283 -> 0.2502, difference 2.7e-02",  # a difference 1e5 times larger
        "loss 2.1283 -> 0.2502, worst 4.7e-07",  # other words
    ):
        with pytest.raises(AssertionError):
            assert_sample_matches(sample, [stale, "written to /tmp/p.png"])


@pytest.mark.slow
def test_readme_port_resnet_sample_is_a_real_run(tmp_path, capsys):
    """``python examples/port_resnet.py`` (25 steps) prints what the README shows."""
    port = load_example("port_resnet")
    result = port.main(plot=str(tmp_path / "port_resnet.png"))
    output = capsys.readouterr().out.splitlines()
    sample = readme_sample("python examples/port_resnet.py")
    assert_sample_matches(sample, output)
    assert result["top1_agreement"] == 1.0
    assert pathlib.Path(tmp_path / "port_resnet.png").read_bytes().startswith(b"\x89PNG")
