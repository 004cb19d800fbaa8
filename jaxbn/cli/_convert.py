"""``jaxbn convert CKPT -o OUT``: a PyTorch checkpoint as Flax variables, strictly."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from ._checkpoints import (
    add_mapping_arguments,
    conversion_errors,
    format_summary,
    parse_kinds,
    problem_count,
)
from ._common import (
    CommandError,
    check_input_file,
    check_output_file,
    load_state,
    warnings_as_lines,
)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    convert = commands.add_parser(
        "convert",
        help="convert a PyTorch checkpoint into a Flax msgpack file",
        description=(
            "Read CKPT (.pt/.pth/.bin/.ckpt without executing pickled code, or "
            ".safetensors), convert every tensor with jaxbn.from_torch, print a "
            "per-layer summary and write OUT with Flax's msgpack serialization. "
            "Strict: if any tensor is left unconverted or ambiguous, or the "
            "result does not match --template, every problem is listed, nothing "
            "is written and the exit code is 1; --partial writes what converted."
        ),
    )
    convert.add_argument("checkpoint", type=pathlib.Path, metavar="CKPT")
    convert.add_argument("-o", "--output", type=pathlib.Path, required=True, metavar="OUT")
    convert.add_argument(
        "--template",
        type=pathlib.Path,
        metavar="VARS",
        help="a Flax msgpack file (e.g. saved model.init output) the result must match",
    )
    convert.add_argument(
        "--partial",
        action="store_true",
        help="write what converted even when problems are listed (exit 0)",
    )
    # Strict is the default; the flag stays so that older scripts keep working.
    convert.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)
    add_mapping_arguments(convert)
    convert.add_argument(
        "--saturate-counts",
        action="store_true",
        help="clamp num_batches_tracked beyond int32 instead of failing (x64 off)",
    )
    convert.set_defaults(run=run)
    return convert


def run(args: argparse.Namespace) -> int:
    from ..convert import CheckpointError, from_torch, load_variables, save_variables

    kinds = parse_kinds(args.kind)
    check_output_file("-o", args.output, args.checkpoint)
    template = None
    if args.template:
        check_input_file(args.template, "template")
        try:
            template = load_variables(args.template)
        except CheckpointError as error:
            raise CommandError(
                f"--template {error}; give a file written by jaxbn.convert.save_variables"
            ) from None
    state = load_state(args.checkpoint)
    with conversion_errors(args.checkpoint), warnings_as_lines():
        variables, report = from_torch(
            state,
            template,
            strict=False,
            kinds=kinds,
            counts="saturate" if args.saturate_counts else "error",
            progress=progress_bar,
        )
    print(format_summary(report, template_given=template is not None))
    if report.problems and not args.partial:
        raise CommandError(
            f"{problem_count(report)} problem(s) listed above; nothing written to "
            f"{args.output}. Settle them (--kind PREFIX=KIND"
            + (", --template VARS" if template is None else "")
            + "), or pass --partial to write what converted"
        )
    save_variables(args.output, variables)
    partial = f", {problem_count(report)} problem(s) left out" if report.problems else ""
    print(f"\nwrote {args.output} ({len(report.entries)} arrays{partial})")
    return 0


def progress_bar(done: int, total: int) -> None:
    """A bar on a terminal for checkpoints of many tensors; silent otherwise."""
    if total < 100 or not sys.stderr.isatty():
        return
    filled = 30 * done // total
    print(
        f"\r[{'#' * filled}{' ' * (30 - filled)}] {done}/{total} tensors", end="", file=sys.stderr
    )
    if done == total:
        print(file=sys.stderr)
