"""``jaxbn inspect CKPT|MODULE:FUNCTION``: what convert would do, without converting."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

from ._checkpoints import (
    add_mapping_arguments,
    conversion_errors,
    format_summary,
    parse_kinds,
    problem_count,
)
from ._common import USAGE, CommandError, build_model, is_factory, load_state, parse_kwargs


def add_parser(commands: Any) -> argparse.ArgumentParser:
    inspect = commands.add_parser(
        "inspect",
        help="list a checkpoint's layers and inferred kinds without converting",
        description=(
            "List what jaxbn convert would do with CKPT: every tensor's layer kind, "
            "Flax path, shapes and layout, and every key it could not convert "
            "(then the exit code is 1). CKPT may also be a model factory, "
            "MODULE:FUNCTION (e.g. torchvision.models:mnasnet1_0, called with --kwargs "
            "or no arguments) or timm:NAME: the live module also shows the settings its state dict does "
            "not carry (eps, momentum, stride, ...) and the Linears that depend on "
            "the flatten order."
        ),
    )
    inspect.add_argument("checkpoint", metavar="CKPT")
    inspect.add_argument(
        "--kwargs",
        metavar="NAME=VALUE,...",
        help="arguments for a factory, e.g. --kwargs num_classes=10",
    )
    add_mapping_arguments(inspect)
    inspect.set_defaults(run=run)
    return inspect


def run(args: argparse.Namespace) -> int:
    from ..convert import inspect

    kinds = parse_kinds(args.kind)
    kwargs = parse_kwargs(args.kwargs)
    if is_factory(args.checkpoint):
        source: Any = build_model(args.checkpoint, kwargs)
    elif kwargs:
        raise CommandError(
            f"--kwargs builds a model from a factory; {args.checkpoint} is a checkpoint file",
            USAGE,
        )
    else:
        source = load_state(pathlib.Path(args.checkpoint))
    with conversion_errors(args.checkpoint):
        report = inspect(source, kinds=kinds)
    print(format_summary(report, template_given=False))
    if report.problems:
        raise CommandError(
            f"{problem_count(report)} problem(s) listed above: jaxbn convert would "
            "refuse this checkpoint until they are settled"
        )
    return 0
