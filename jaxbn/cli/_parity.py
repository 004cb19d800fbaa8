"""``jaxbn parity``: every built-in case against the installed torch, as a table."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from ._common import FAILURE, NO_TORCH, USAGE, CommandError, check_output_file


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parity = commands.add_parser(
        "parity",
        help="compare jaxbn with the installed torch on the built-in cases",
        description=(
            "Run every built-in parity case (layer kind x options, 10 training "
            "steps then 3 eval steps) against the installed torch and print the "
            "largest |jaxbn - torch| of the output, each gradient and each running "
            "statistic, and the tolerance it was held to. Exits 1 if any case fails."
        ),
    )
    parity.add_argument(
        "--json", type=pathlib.Path, metavar="PATH", help="also save results as JSON"
    )
    parity.add_argument("-k", metavar="TEXT", help="only cases whose name contains TEXT")
    parity.add_argument("--list", action="store_true", help="list the cases and exit")
    parity.set_defaults(run=run)
    return parity


def run(args: argparse.Namespace) -> int:
    from .. import parity

    if args.json:
        check_output_file("--json", args.json)
    cases = [case for case in parity.builtin_cases() if not args.k or args.k in case.name]
    if not cases:
        raise CommandError(
            f"no case matches -k {args.k!r}; see the names with: jaxbn parity --list", USAGE
        )
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    try:
        import torch  # noqa: F401 (only whether it is there)
    except ImportError:
        raise CommandError(f"jaxbn parity compares with PyTorch, {NO_TORCH}") from None
    environment = parity.environment()
    print("jaxbn parity against " + ", ".join(f"{k} {v}" for k, v in environment.items()))
    results = parity.run(cases, on_result=progress)
    print(parity.format_table(results))
    if args.json:
        report = {
            "environment": dict(environment),
            "results": [r.to_json() for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"results saved to {args.json}")
    return 0 if all(r.passed for r in results) else FAILURE


def progress(done: int, total: int, result: object) -> None:
    """One line per case, or a single updating line on a terminal."""
    from ..parity import CaseResult

    assert isinstance(result, CaseResult)
    status = "ok" if result.passed else "FAIL"
    text = f"[{done:>{len(str(total))}}/{total}] {status:4} {result.case.name}"
    if sys.stderr.isatty():
        end = "\n" if done == total or not result.passed else ""
        print(f"\r\033[K{text}", end=end, file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)
