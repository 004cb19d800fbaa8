"""``jaxbn port MODULE:FACTORY --input 1,3,224,224``: port, prove it, save the variables."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``port`` subcommand to ``jaxbn``'s subparsers."""
    parser = commands.add_parser(
        "port",
        help="port a torch model to Flax and check it layer by layer",
        description=(
            "Build the torch model MODULE:FACTORY (e.g. torchvision.models:resnet50; "
            "called with no arguments, so torchvision builds weights=None), load "
            "--checkpoint if given (strictly), port it with jaxbn.port, and compare "
            "torch and the port layer by layer on a random input of shape --input: "
            "in eval, and in one training step (outputs, every parameter gradient and "
            "running statistic; dropout probabilities set to 0, as random masks "
            "differ), each against torch in float64 next to torch's own float32. "
            "Prints the first divergence and exits 1 if there is one. -o DIR saves "
            "the port to a directory (generated Flax source, variables, metadata) "
            "that jaxbn.port.load reads where torch is not installed; -o FILE.msgpack "
            "writes the variables alone; --export FILE the exported eval and "
            "training programs (jax alone runs them)."
        ),
    )
    parser.add_argument("model", metavar="MODULE:FACTORY")
    parser.add_argument(
        "--input", required=True, metavar="N,C,H,W", help="input shape, e.g. 1,3,224,224"
    )
    parser.add_argument("--checkpoint", type=pathlib.Path, metavar="FILE")
    parser.add_argument(
        "-o",
        "--output",
        type=pathlib.Path,
        metavar="DIR|FILE.msgpack",
        help="a directory to save the port to (model.py, variables.msgpack, port.json; "
        "load it with jaxbn.port.load), or a .msgpack file for the variables alone",
    )
    parser.add_argument(
        "--export",
        type=pathlib.Path,
        metavar="FILE",
        help="write the eval function and the training step as jax.export programs "
        "(any batch size) with the variables; needs flatbuffers: pip install 'jaxbn[export]'",
    )
    parser.add_argument(
        "--factor",
        type=float,
        default=8.0,
        help="torch also runs in float64 as the reference; a tensor passes when its "
        "error (relative to its largest value) is within FACTOR times the worst that "
        "torch's own float32 run makes on a tensor of its kind (default 8; rounding "
        "alone moves deep nets' float32 gradients by 1e-2)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        default=2e-6,
        help="plus this much of each tensor's largest value (default 2e-6)",
    )
    parser.add_argument("--atol", type=float, default=0.0, help="plus this (default 0)")
    parser.add_argument("--table", action="store_true", help="print every row of the reports")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds torch before the model is built (its initial weights, unless "
        "--checkpoint replaces them) and the random input (default 0)",
    )
    parser.set_defaults(run=run)
    return parser


class UsageError(Exception):
    """A mistake in the command line (exit 2)."""


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as error:
        print(f"jaxbn: {error}", file=sys.stderr)
        return 2


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n <= 0 for n in shape):
        raise UsageError(f"--input expects positive integers like 1,3,224,224, got {text!r}")
    return shape


def _run(args: argparse.Namespace) -> int:
    from ..cli import (
        NO_TORCH,
        USAGE,
        CommandError,
        build_model,
        check_input_file,
        check_output_file,
    )

    shape = _shape(args.input)
    if not (":" in args.model and args.model.partition(":")[2]):
        raise CommandError(
            f"expected MODULE:FACTORY such as torchvision.models:resnet18, got {args.model!r}",
            USAGE,
        )
    # Paths are checked before any work (a port and its check take minutes).
    if args.checkpoint is not None:
        check_input_file(args.checkpoint)
    if args.output is not None and args.output.suffix == ".msgpack":
        check_output_file("-o", args.output, *filter(None, [args.checkpoint]))
    elif args.output is not None:
        _check_directory(args.output)
    if args.export is not None:
        check_output_file("--export", args.export, *filter(None, [args.checkpoint]))
        try:
            import flatbuffers  # noqa: F401  (jax.export's serialisation)
        except ImportError:
            raise CommandError(
                "--export needs flatbuffers to write jax.export programs: "
                "pip install 'jaxbn[export]'",
                USAGE,
            ) from None
    import numpy as np

    try:
        import torch
    except ImportError:
        raise CommandError(f"jaxbn port reads a PyTorch model, {NO_TORCH}") from None

    # The same command, the same report: the factory's random init is seeded.
    torch.manual_seed(args.seed)
    model = build_model(args.model)

    from ..convert import CheckpointError, load_checkpoint, save_variables
    from ..parity import compare_models
    from . import PortError, port, without_dropout

    if args.checkpoint is not None:
        try:
            state = load_checkpoint(args.checkpoint)
        except CheckpointError as error:
            print(f"jaxbn: {error}", file=sys.stderr)
            return 1
        misfit = _misfit(state, model.state_dict())
        if misfit:
            print(f"jaxbn: {args.checkpoint} does not fit {args.model}: {misfit}; build the "
                  "checkpoint's architecture (its number of classes, its variant)",
                  file=sys.stderr)  # fmt: skip
            return 1
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            print(f"jaxbn: {args.checkpoint} does not fit {args.model}: {error}", file=sys.stderr)
            return 1
    x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    # Compare with dropout off: torch's and JAX's random masks cannot agree.
    quiet = without_dropout(model)
    try:
        ported = port(model, torch.from_numpy(x))
        checked = port(quiet, torch.from_numpy(x))
    except PortError as error:
        print(f"jaxbn: {error}", file=sys.stderr)
        return 1
    print(f"ported {args.model}: {_count(ported.variables)}")
    failed = False
    for train in (False, True):
        mode = "training step" if train else "eval"
        try:
            report = compare_models(
                quiet,
                checked.module,
                checked.variables,
                x,
                train=train,
                flax_kwargs={"train": train},
                gradients=train,
                rtol=args.rtol,
                atol=args.atol,
                reference="float64",
                factor=args.factor,
            )
        except Exception as error:  # e.g. an output structure the harness cannot compare
            print(f"jaxbn: the {mode} comparison could not run: {type(error).__name__}: {error}",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"\n{mode}: {report.summary()}")
        if args.table or not report.ok:
            rows = report.table().splitlines()
            print("\n".join(rows if args.table else _around_first(rows)))
        failed |= not report.ok
    if args.output is not None and args.output.suffix == ".msgpack":
        save_variables(args.output, ported.variables)
        print(f"\nwrote {args.output}")
    elif args.output is not None:
        try:
            ported.save(args.output)
        except PortError as error:  # (source the port cannot write: a converter of one's own)
            print(f"jaxbn: {error}", file=sys.stderr)
            return 1
        print(f"\nsaved the port to {args.output}/ (model.py, variables.msgpack, port.json)")
    if args.export is not None:
        try:
            ported.export(args.export)
        except PortError as error:
            print(f"jaxbn: {error}", file=sys.stderr)
            return 1
        print(f"\nwrote {args.export} (eval and training programs, any batch size)")
    return 1 if failed else 0


def _check_directory(path: pathlib.Path) -> None:
    """Refuse a directory -o cannot save a port to, before any work."""
    from ..cli import USAGE, CommandError
    from ._errors import PortError
    from ._saved import check_directory

    try:
        check_directory(path)
    except PortError as error:
        message = str(error).removeprefix("jaxbn.port: ")
        raise CommandError(f"-o {message}", USAGE) from None


def _misfit(state: dict[str, Any], expected: dict[str, Any], few: int = 3) -> str:
    """One line for a checkpoint whose keys or shapes are not the model's ('' if they
    are), naming a few of each: torch's own message lists every key."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state[k].shape)}, model {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(found)} {what} ({', '.join(found[:few])}{', ...' if len(found) > few else ''})"
        for what, found in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", shapes),
        )
        if found
    ]
    return "keys: " + "; ".join(parts) if parts else ""


def _count(variables: dict[str, Any]) -> str:
    import jax

    parts = []
    for collection, tree in variables.items():
        leaves = jax.tree.leaves(tree)
        parts.append(
            f"{collection} {len(leaves)} arrays, {sum(leaf.size for leaf in leaves):,} values"
        )
    return "; ".join(parts)


def _around_first(rows: list[str]) -> list[str]:
    """The header, a few rows before the first divergence, and a few after."""
    at = next((i for i, row in enumerate(rows) if "first divergence" in row), None)
    if at is None:
        return rows[:1] + [row for row in rows[1:] if "FAIL" in row][:10]
    return rows[:1] + rows[max(1, at - 3) : at + 4]
