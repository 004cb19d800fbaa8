"""The ``jaxbn`` command as a user meets it.

Every user mistake: its exit code (2: a wrong argument, 1: a failure), its
one-line ``jaxbn...`` message with the shell-level fix, and no traceback.
Most run in-process (``cli.main``); the few that need a real process
(closed pipes, the installed entry point) run one.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch

from jaxbn import _bench, parity
from jaxbn.convert import LAYERS, load_variables, save_variables

from .helpers import assert_sample_matches, jaxbn_here, readme_sample, run


def one_line(err: str) -> str:
    """The ``jaxbn...`` message: the last line of stderr, which must be the only one of its kind."""
    lines = [line for line in err.splitlines() if line.startswith("jaxbn")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """A directory holding checkpoints of each sort, as the working directory."""
    monkeypatch.chdir(tmp_path)
    torch.save(torch.ones(3), "tensor.pt")
    good = {
        "fc.weight": torch.ones(2, 3),
        "fc.bias": torch.zeros(2),
        "bn.weight": torch.ones(3),
        "bn.bias": torch.zeros(3),
        "bn.running_mean": torch.zeros(3),
        "bn.running_var": torch.ones(3),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    torch.save(good, "good.pth")
    torch.save({**good, "embed.weight": torch.ones(5, 3)}, "ambiguous.pth")
    torch.save({**good, "stem.alpha": torch.ones(3)}, "unconverted.pth")
    torch.save({**good, "bn.num_batches_tracked": torch.tensor(2**40)}, "counter.pth")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "adir").mkdir()
    return tmp_path


# --- the program ---------------------------------------------------------------


def test_version(capsys):
    code, out, _ = jaxbn_here(capsys, "--version")
    assert code == 0
    assert re.fullmatch(r"jaxbn \d+\.\d+\.\d+ \(jax .*, flax .*, torch .*\)\n", out)


def test_no_command_is_a_usage_error(capsys):
    code, _, err = jaxbn_here(capsys)
    assert code == 2
    assert "jaxbn: the following arguments are required: COMMAND (see 'jaxbn --help')" in err


def test_a_wrong_flag_prints_the_subcommands_usage(capsys):
    code, _, err = jaxbn_here(capsys, "convert", "good.pth", "-o", "x.msgpack", "--bogus")
    assert code == 2
    assert err.startswith("usage: jaxbn convert ")
    assert one_line(err) == (
        "jaxbn convert: unrecognized arguments: --bogus (see 'jaxbn convert --help')"
    )


def test_a_bad_option_value_names_the_option(capsys):
    code, _, err = jaxbn_here(capsys, "bench", "--reps", "0")
    assert code == 2
    assert err.startswith("usage: jaxbn bench ")
    assert "argument --reps: expected a positive whole number, got '0'" in one_line(err)


def test_entry_point_and_closed_pipe_end_quietly():
    """``jaxbn parity --list | head -1``: the reader leaves early; no BrokenPipeError."""
    with subprocess.Popen(
        [sys.executable, "-m", "jaxbn.cli", "parity", "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()  # before the command writes anything: every write fails
        err = process.stderr.read()
        assert process.wait(timeout=120) == 141
    assert err == ""


def test_closed_pipe_in_a_shell_pipeline():
    result = run(
        "bash", "-o", "pipefail", "-c", f"'{sys.executable}' -m jaxbn.cli parity --list | head -1"
    )
    assert result.stdout == "1d-NC/affine/momentum=0.1/float32/jit\n"
    assert result.stderr == ""
    assert result.returncode in (0, 141)  # 141 when the write came after head left


def test_without_torch_the_commands_that_need_it_say_so(tmp_path):
    """torch is an optional extra: blocked, parity and inspect say how to install it."""
    (tmp_path / "m.pt").write_bytes(b"anything")
    code = (
        "import sys; sys.modules['torch'] = None; from jaxbn import cli; "
        "print(cli.main(['parity', '-k', '2d/']), cli.main(['inspect', sys.argv[1]]), "
        "cli.main(['port', 'torchvision.models:resnet18', '--input', '1,3,8,8']))"
    )
    result = run("python", "-c", code, tmp_path / "m.pt", timeout=120)
    assert result.stdout == "1 1 1\n", result.stderr
    install = "which is not installed; install it from the checkout with: pip install -e '.[torch]'"
    assert result.stderr.splitlines() == [
        f"jaxbn: jaxbn parity compares with PyTorch, {install}",
        f"jaxbn: {tmp_path / 'm.pt'}: reading it needs PyTorch or safetensors, {install}",
        "jaxbn: jaxbn port reads a PyTorch model, which is not installed; install it with "
        "torchvision and timm from the checkout: pip install -e '.[port]'",
    ]


# --- convert and inspect: mistakes caught before any work ---------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["convert", "good.pth", "-o", "adir"],
            "jaxbn: -o adir is a directory; give a file path, e.g. -o adir/model.msgpack",
        ),
        (
            ["convert", "good.pth", "-o", "missing-dir/x.msgpack"],
            "jaxbn: -o missing-dir/x.msgpack: directory missing-dir does not exist; create it "
            "(mkdir -p missing-dir) or choose another path",
        ),
        (
            ["convert", "good.pth", "-o", "good.pth"],
            "jaxbn: -o good.pth is also the input; choose another output path",
        ),
        (
            ["convert", "good.pth", "-o", "x.msgpack", "--kind", "fc=Bogus"],
            "jaxbn: --kind fc=Bogus: unknown layer kind 'Bogus'; use one of "
            f"{', '.join(sorted(LAYERS))} or a torch.nn class name such as Conv2d",
        ),
        (
            ["inspect", "good.pth", "--kind", "fc"],
            "jaxbn: --kind expects PREFIX=KIND, got 'fc'; e.g. --kind embed=Embedding",
        ),
        (
            ["inspect", "adir"],
            "jaxbn: adir is a directory, not a checkpoint file; give the path of the file in it",
        ),
        (
            ["convert", "missing.pth", "-o", "x.msgpack"],
            "jaxbn: missing.pth: no such file; check the path (ls .)",
        ),
        (
            ["convert", "good.pth", "-o", "x.msgpack", "--template", "missing.msgpack"],
            "jaxbn: missing.msgpack: no such file; check the path (ls .)",
        ),
    ],
    ids=[
        "output-is-a-directory",
        "output-directory-missing",
        "output-is-the-input",
        "unknown-kind",
        "kind-without-equals",
        "checkpoint-is-a-directory",
        "checkpoint-missing",
        "template-missing",
    ],
)
def test_wrong_arguments_are_refused_before_any_work(capsys, checkpoints, argv, message):
    code, out, err = jaxbn_here(capsys, *argv)
    assert code == 2
    assert one_line(err) == message
    assert out == ""  # nothing was converted or listed first
    assert not (checkpoints / "x.msgpack").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_is_refused_before_converting(capsys, checkpoints):
    locked = checkpoints / "locked"
    locked.mkdir(mode=0o500)
    code, out, err = jaxbn_here(capsys, "convert", "good.pth", "-o", locked / "x.msgpack")
    assert code == 2
    assert "permission denied; choose a writable path" in one_line(err)
    assert out == ""


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_bare_tensor_is_not_a_state_dict(capsys, checkpoints, command):
    argv = [command, "tensor.pt", *(["-o", "x.msgpack"] if command == "convert" else [])]
    code, _, err = jaxbn_here(capsys, *argv)
    assert code == 1
    assert one_line(err) == (
        "jaxbn: tensor.pt holds a Tensor, not a state dict of named tensors; save one with "
        "torch.save(model.state_dict(), path) and convert that file"
    )
    assert "jaxbn.load_checkpoint" not in err


def test_a_corrupt_checkpoint_is_one_line(capsys, checkpoints):
    code, _, err = jaxbn_here(capsys, "inspect", "corrupt.pt")
    assert code == 1
    assert one_line(err).startswith("jaxbn: corrupt.pt: not a readable PyTorch checkpoint")


# --- convert: strict by default ------------------------------------------------


def test_convert_writes_a_clean_checkpoint(capsys, checkpoints):
    code, out, err = jaxbn_here(capsys, "convert", "good.pth", "-o", "x.msgpack")
    assert (code, err) == (0, "")
    assert "wrote x.msgpack (7 arrays)" in out
    assert int(load_variables("x.msgpack")["batch_stats"]["bn"]["num_batches_tracked"]) == 7


def test_an_ambiguous_layer_writes_nothing_and_says_the_flags(capsys, checkpoints):
    code, out, err = jaxbn_here(capsys, "convert", "ambiguous.pth", "-o", "x.msgpack")
    assert code == 1
    assert not (checkpoints / "x.msgpack").exists()
    assert (
        "  embed (weight): could be Linear or Embedding; pass --kind embed=Linear or "
        "--kind embed=Embedding or --template VARS\n" in out
    )
    assert "kinds={" not in out + err  # no Python syntax in a shell
    assert one_line(err) == (
        "jaxbn: 1 problem(s) listed above; nothing written to x.msgpack. Settle them "
        "(--kind PREFIX=KIND, --template VARS), or pass --partial to write what converted"
    )
    # The hint works as printed.
    code, out, _ = jaxbn_here(
        capsys, "convert", "ambiguous.pth", "-o", "x.msgpack", "--kind", "embed=Embedding"
    )
    assert code == 0
    assert load_variables("x.msgpack")["params"]["embed"]["embedding"].shape == (5, 3)


def test_the_hint_leaves_out_the_template_when_one_was_given(capsys, checkpoints):
    # A template that settles nothing about `embed`: the ambiguity stays.
    template = {"params": {"fc": {"kernel": np.zeros((3, 2), np.float32)}}}
    save_variables("template.msgpack", template)
    code, out, err = jaxbn_here(
        capsys, "convert", "ambiguous.pth", "-o", "x.msgpack", "--template", "template.msgpack"
    )
    assert code == 1
    assert "pass --kind embed=Linear or --kind embed=Embedding\n" in out
    assert "template" not in one_line(err)
    assert not (checkpoints / "x.msgpack").exists()


def test_an_unconverted_tensor_writes_nothing_unless_partial(capsys, checkpoints):
    code, out, err = jaxbn_here(capsys, "convert", "unconverted.pth", "-o", "x.msgpack")
    assert code == 1
    assert "unconverted (1):\n  stem: no layer kind has these tensor names and ranks" in out
    assert "nothing written to x.msgpack" in one_line(err)
    assert not (checkpoints / "x.msgpack").exists()
    code, out, err = jaxbn_here(
        capsys, "convert", "unconverted.pth", "-o", "x.msgpack", "--partial"
    )
    assert (code, err) == (0, "")
    assert "wrote x.msgpack (7 arrays, 1 problem(s) left out)" in out
    assert set(load_variables("x.msgpack")["params"]) == {"fc", "bn"}


def test_inspect_exits_1_when_it_lists_problems(capsys, checkpoints):
    code, out, err = jaxbn_here(capsys, "inspect", "good.pth")
    assert (code, err) == (0, "")
    assert "7 tensors in 2 layers" in out
    code, out, err = jaxbn_here(capsys, "inspect", "ambiguous.pth")
    assert code == 1
    assert "pass --kind embed=Linear or --kind embed=Embedding or --template VARS" in out
    assert one_line(err) == (
        "jaxbn: 1 problem(s) listed above: jaxbn convert would refuse this checkpoint "
        "until they are settled"
    )


def test_a_counter_beyond_int32_says_the_flag(capsys, checkpoints):
    code, _, err = jaxbn_here(capsys, "convert", "counter.pth", "-o", "x.msgpack")
    assert code == 1
    assert one_line(err) == (
        f"jaxbn: counter.pth: bn.num_batches_tracked = {2**40} does not fit in int32 "
        "(jax_enable_x64 is off); run with JAX_ENABLE_X64=1 to keep it exactly, or pass "
        "--saturate-counts to clamp it (it only matters for momentum=None)"
    )
    assert not (checkpoints / "x.msgpack").exists()
    code, _, err = jaxbn_here(
        capsys, "convert", "counter.pth", "-o", "x.msgpack", "--saturate-counts"
    )
    assert code == 0
    assert (
        err == f"jaxbn: warning: bn.num_batches_tracked = {2**40} saturated to 2147483647 (int32)\n"
    )


# --- parity ----------------------------------------------------------------------


SUBSET = "2d/affine/momentum=0.1/float32"  # jit; the 70 cases run in-process in test_parity


def test_parity_command_runs_a_subset_and_saves_tolerances(capsys, tmp_path):
    """The project's main job, on a subset (test_parity runs every case; CI runs the command)."""
    report = tmp_path / "parity.json"
    code, out, err = jaxbn_here(capsys, "parity", "-k", SUBSET, "--json", report)
    assert code == 0, out + err
    assert "1 of 1 cases passed." in out
    assert "[1/1] ok   2d/affine/momentum=0.1/float32/jit" in err  # progress
    assert "max |jaxbn - torch| over every training and eval step" in out
    assert "float32: atol = rtol = 1e-05" in out
    saved = json.loads(report.read_text())
    assert saved["environment"]["torch"].startswith("2.")
    (case,) = saved["results"]
    assert case["passed"]
    assert set(case["max_abs_diff"]) == set(parity.QUANTITIES)
    assert case["tolerance"]["var"] == {"rtol": 1e-5, "atol": 1e-5}
    assert case["tolerance"]["num_batches_tracked"] == {"rtol": 0.0, "atol": 0.0}


def test_parity_command_fails_loudly_on_a_mismatch(monkeypatch, capsys, tmp_path):
    """A deliberate mismatch: torch keeps a Flax-convention momentum, jaxbn does not."""
    make_pair = parity.make_pair

    def flax_momentum_on_torch_side(kind, options, seed=0):
        ref: Any
        ref, ans, variables = make_pair(kind, options, seed)
        ref.momentum = 0.99
        return ref, ans, variables

    monkeypatch.setattr(parity._cases, "make_pair", flax_momentum_on_torch_side)
    code, out, _ = jaxbn_here(
        capsys, "parity", "-k", SUBSET + "/jit", "--json", tmp_path / "r.json"
    )
    assert code == 1
    assert "0 of 1 cases passed." in out
    assert "FAIL 2d/affine/momentum=0.1/float32/jit: train step 0 mean" in out
    assert not json.loads((tmp_path / "r.json").read_text())["results"][0]["passed"]


def test_parity_command_lists_and_filters(capsys):
    code, out, _ = jaxbn_here(capsys, "parity", "--list", "-k", "3d/")
    assert code == 0
    listed = out.split()
    assert listed
    assert all(name.startswith("3d/") for name in listed)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["parity", "-k", "no such case"],
            "jaxbn: no case matches -k 'no such case'; see the names with: jaxbn parity --list",
        ),
        (
            ["parity", "-k", SUBSET, "--json", "missing-dir/r.json"],
            "jaxbn: --json missing-dir/r.json: directory missing-dir does not exist; create it "
            "(mkdir -p missing-dir) or choose another path",
        ),
        (
            ["bench", "--json", "."],
            "jaxbn: --json . is a directory; give a file path, e.g. --json results.json",
        ),
    ],
    ids=["no-case", "json-directory-missing", "json-is-a-directory"],
)
def test_parity_and_bench_refuse_bad_arguments_before_running(
    capsys, tmp_path, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)
    code, out, err = jaxbn_here(capsys, *argv)
    assert code == 2
    assert one_line(err) == message
    assert out == ""


def test_readme_parity_sample_is_a_real_run():
    """The ``jaxbn parity`` sample of docs/cli.md: its rows rerun, its layout and count as printed."""
    sample = readme_sample("jaxbn parity --json results.json", "docs/cli.md")
    cases = parity.builtin_cases()
    shown = {line.split()[0] for line in sample if line.split()} & {c.name for c in cases}
    assert shown, sample
    results = parity.run([c for c in cases if c.name in shown])
    environment = parity.environment()
    output = [
        "jaxbn parity against " + ", ".join(f"{k} {v}" for k, v in environment.items()),
        *parity.format_table(results).splitlines(),
        "results saved to results.json",
    ]
    everything = f"{len(cases)} of {len(cases)} cases passed."
    assert everything in sample  # the full run's count, as docs/cli.md states it
    assert_sample_matches(["..." if line == everything else line for line in sample], output)


def test_table_says_what_its_numbers_are():
    case = parity.Case(parity.KINDS["2d"], parity.Options())
    result = parity.CaseResult(
        case, {q: 3.8e-5 if q == "var" else 0.0 for q in parity.QUANTITIES}, True, (), 0.1
    )
    lines = parity.format_table([result]).splitlines()
    assert lines[0].strip() == "max |jaxbn - torch| over every training and eval step"
    assert lines[1].split() == [
        "case",
        *[parity.HEADERS.get(q, q) for q in parity.QUANTITIES],
        "result",
    ]
    assert "3.8e-05" in lines[3]
    assert (
        "pass: every element within atol + rtol * |torch| (float32: atol = rtol = 1e-05; "
        "batches exact)" in "\n".join(lines)
    )
    assert result.to_json()["tolerance"]["dx"] == {"rtol": 1e-5, "atol": 1e-5}


# --- bench: one ratio convention ------------------------------------------------


def timings(shape: str) -> list[_bench.Timing]:
    """jaxbn 2 ms, Flax 1 ms, torch 4 ms, the floor 1 ms, in every layout and mode."""
    medians = {
        "jaxbn": 2e-3,
        "flax": 1e-3,
        "flax two-pass": 3e-3,
        "copy (floor)": 0.5e-3,
        "sum (floor)": 0.25e-3,
        "torch NCHW": 4e-3,
        "torch channels_last": 4e-3,
    }
    return [
        _bench.Timing(shape, layout, mode, name, median, median, median, 0.0, 0.2)
        for layout in _bench.LAYOUTS
        for mode in _bench.MODES
        for name, median in medians.items()
    ]


def test_bench_ratios_are_time_over_jaxbns_everywhere():
    report = _bench.format_report(timings("32x64x56x56"))
    columns = re.search(r"\n  contender .*\n", report)
    assert columns is not None
    assert columns[0].split()[-5:-3] == ["x", "jaxbn"]

    def ratio(name: str) -> float:
        row = re.search(rf"\n  {re.escape(name)}\s+(.*)\n", report)
        assert row is not None
        return float(row[1].split()[-3])  # the x jaxbn column

    assert ratio("torch NCHW") == 2.0  # 4 ms / 2 ms: jaxbn is twice as fast
    assert ratio("flax") == 0.5
    rows = {what: value for what, value, _, _ in _bench.targets(timings("32x64x56x56"))}
    assert rows["train fwd vs torch NCHW"] == 2.0
    assert rows["train fwd vs Flax fast (nchw)"] == 0.5
    assert "ratio = contender time / jaxbn time, above 1: jaxbn faster" in report
    assert re.search(r"met  train fwd vs torch NCHW\s+2\.000", report)


def test_bench_targets_only_for_timed_shapes():
    small = timings("8x16x8x8")
    assert _bench.targets(small) == []
    assert _bench.targets_json(small) == []
    report = _bench.format_report(small)
    assert "targets: set for 32x64x56x56, which this run did not time" in report
    assert "MISS" not in report
    assert "compile" not in report.split("targets")[-1]
    # Timed alongside, the small shape's compile time does not count for the target.
    both = [
        *small,
        *(
            t
            if t.compile_seconds is None
            else _bench.Timing(**{**t.to_json(), "compile_seconds": 0.1})
            for t in timings("32x64x56x56")
        ),
    ]
    compile_rows = [r for r in _bench.targets(both) if r[0].startswith("compile")]
    assert [(value, met) for _, value, _, met in compile_rows] == [(0.1, True)]
    assert all(
        record["value_is"] in ("contender time / jaxbn time", "jaxbn time / floor time", "seconds")
        for record in _bench.targets_json(both)
    )


@pytest.mark.parametrize(
    ("actual", "desired", "message"),
    [
        (
            np.array([1, 2], np.float32),
            np.array([1, 2.001], np.float32),
            r"1 of 2 beyond .* worst at \(1,\)",
        ),
        (np.array([np.nan], np.float32), np.array([1], np.float32), "1 of 1 beyond"),
        (np.array([1], np.float32), np.array([np.nan], np.float32), "1 of 1 beyond"),
        (np.array([np.inf], np.float32), np.array([-np.inf], np.float32), "1 of 1 beyond"),
        (np.array([1, 2], np.float32), np.array([1], np.float32), "shape"),
        (np.array([1], np.float64), np.array([1], np.float32), "dtype float64 != torch's float32"),
        (np.int32(4), np.int64(5), "1 of 1 beyond"),
    ],
)
def test_compare_flags_every_kind_of_difference(actual, desired, message):
    _, failure = parity.compare(actual, desired, rtol=1e-5, atol=1e-5)
    assert failure
    assert re.search(message, failure)


def test_compare_accepts_matching_values():
    values = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
    assert parity.compare(values, values.copy(), rtol=0, atol=0) == (0.0, "")
    diff, failure = parity.compare(
        np.array([1 + 1e-6], np.float32), np.array([1], np.float32), rtol=1e-5, atol=1e-5
    )
    assert not failure
    assert math.isclose(diff, 1e-6, rel_tol=0.2)
