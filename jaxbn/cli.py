"""The ``jaxbn`` command."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxbn", description="PyTorch-exact BatchNorm for JAX/Flax: tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parity = commands.add_parser(
        "parity",
        help="compare jaxbn with the installed torch on the built-in cases",
        description=(
            "Run every built-in parity case (layer kind x options, 10 training "
            "steps then 3 eval steps) against the installed torch and print the "
            "largest |jaxbn - torch| of the output, each gradient and each running "
            "statistic. Exits 1 if any case fails."
        ),
    )
    parity.add_argument(
        "--json", type=pathlib.Path, metavar="PATH", help="also save results as JSON"
    )
    parity.add_argument("-k", metavar="TEXT", help="only cases whose name contains TEXT")
    parity.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    return run_parity(args)


def run_parity(args: argparse.Namespace) -> int:
    from . import parity

    cases = [case for case in parity.builtin_cases() if not args.k or args.k in case.name]
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    if not cases:
        print(f"no case matches -k {args.k!r}; see jaxbn parity --list", file=sys.stderr)
        return 2
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
    return 0 if all(r.passed for r in results) else 1


def progress(done: int, total: int, result: object) -> None:
    """One line per case, or a single updating line on a terminal."""
    from .parity import CaseResult

    assert isinstance(result, CaseResult)
    status = "ok" if result.passed else "FAIL"
    text = f"[{done:>{len(str(total))}}/{total}] {status:4} {result.case.name}"
    if sys.stderr.isatty():
        end = "\n" if done == total or not result.passed else ""
        print(f"\r\033[K{text}", end=end, file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
