"""The ``jaxbn`` command: ``parity``, ``convert``, ``inspect``, ``port`` and ``bench``.

A mistake made at the shell never ends in a traceback: it ends in one line
on stderr, ``jaxbn: <what is wrong>; <what to type instead>``, and exit
code 2 when an argument is wrong (found before any work starts) or 1 when
the work itself fails or finds problems. A closed output pipe
(``jaxbn parity --list | head -1``) ends quietly. A traceback means a bug
in jaxbn.

One module per subcommand, each with an ``add_parser`` that adds its parser and
sets ``run``; a new subcommand is one more module in :data:`SUBCOMMANDS`.
``_common`` holds the exit codes and checks they share. The library never
imports its command line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import _bench, _convert, _inspect, _parity, _port
from ._common import USAGE, CommandError


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the ``jaxbn ...: problem; fix`` form."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    >>> main(["parity", "--list", "-k", "3d/affine/momentum=0.1/float32"])
    3d/affine/momentum=0.1/float32/jit
    0
    """
    parser = build_parser()
    try:
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:
                # Otherwise argparse blames the top-level parser and prints its usage.
                args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
        except SystemExit as done:  # --help, --version, or a usage error already printed
            return done.code if isinstance(done.code, int) else USAGE
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe is noticed here, not at interpreter exit
        return code
    except CommandError as error:
        print(f"jaxbn: {error}", file=sys.stderr)
        return error.code
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, and nothing
        # left for Python to flush into the closed pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # what a process killed by SIGPIPE returns
    except KeyboardInterrupt:
        print("jaxbn: interrupted", file=sys.stderr)
        return 128 + 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxbn", description="PyTorch-exact BatchNorm for JAX/Flax: tools.")
    parser.add_argument("--version", action="version", version=version())
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for add in SUBCOMMANDS:
        sub = add(commands)
        sub.set_defaults(parser=sub)
    return parser


def version() -> str:
    """``jaxbn 0.1.0 (jax ..., flax ...)``, without importing any of them."""

    def of(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return f"jaxbn {of('jaxbn')} (jax {of('jax')}, flax {of('flax')}, torch {of('torch')})"


SUBCOMMANDS: tuple[Callable[[Any], argparse.ArgumentParser], ...] = (
    _parity.add_parser,
    _convert.add_parser,
    _inspect.add_parser,
    _port.add_parser,
    _bench.add_parser,
)
